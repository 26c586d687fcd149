"""The ``avalanche`` stream type: one of Avalanche's generators over the scenario's
dataset, or one of its classic benchmarks (SplitMNIST...) over local files.

avalanche-lib is optional: this module only describes the options; the bridge
(:mod:`clsim.interop.avalanche`) and avalanche-lib itself are imported when a stream is
built, and a missing avalanche-lib is a ConfigError saying how to get it.

A classic benchmark brings its own data, read through Avalanche's data loading, so it
is read where a scenario's data is loaded (:func:`read_benchmark`, called by
``clsim.assembly.load_scenario_data``): the dataset it returns holds every sample as
Avalanche yields it, and the stream read with it is kept beside it (weakly) for
:func:`avalanche_stream` to hand out; another seed reads the benchmark again. This
module reads no scenario: the stream types sit below :mod:`clsim.config`, which
validates their options.
"""

from __future__ import annotations

import importlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from clsim.data.dataset import Dataset
from clsim.errors import OptionError
from clsim.interop.avalanche_classic import CLASSIC_BENCHMARKS
from clsim.stream import Stream
from clsim.streams.common import TimingOptions


@dataclass
class AvalancheStreamOptions(TimingOptions):
    """``stream: {type: avalanche, benchmark: ..., args: {...}}``."""

    benchmark: Literal[
        "class_incremental_benchmark", "new_instances_benchmark", "SplitMNIST",
        "PermutedMNIST", "RotatedMNIST", "SplitFMNIST", "SplitCIFAR10", "SplitCIFAR100",
    ] = field(
        default="class_incremental_benchmark",
        metadata={"help": "Avalanche generator run over the scenario's dataset, or a "
                  "classic benchmark reading its own data (needs avalanche-lib: make "
                  "venv-avalanche)"},
    )
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "keyword arguments of the generator or benchmark (e.g. "
                  "num_experiences: 5, class_order: [...]; n_experiences: 5 for SplitMNIST); "
                  "seed defaults to the run's"},
    )
    dataset_root: str | None = field(
        default=None,
        metadata={"help": "classic benchmarks: the folder torchvision reads (e.g. holding "
                  "MNIST/raw/), relative to the YAML; default: clsim arranges its own "
                  "MNIST / Fashion-MNIST files in $CLSIM_CACHE. Nothing is downloaded"},
    )


def avalanche_stream(dataset: Dataset, *, seed: int,
                     benchmark: str = "class_incremental_benchmark",
                     args: dict[str, Any] | None = None,
                     dataset_root: str | None = None) -> Stream:
    """Avalanche's ``benchmark`` generator over ``dataset``, as a clsim stream; for a
    classic benchmark, the stream read with ``dataset`` by :func:`read_benchmark`."""
    if benchmark in CLASSIC_BENCHMARKS:
        return _classic_stream(dataset, seed, benchmark, dict(args or {}))
    if dataset_root is not None:
        raise OptionError("dataset_root", f"{benchmark} splits the scenario's dataset "
                          "(data:); dataset_root is for Avalanche's classic benchmarks ("
                          + ", ".join(CLASSIC_BENCHMARKS) + ")")
    from clsim.interop.avalanche import (
        GENERATORS,
        avalanche_datasets,
        import_avalanche,
        stream_from_avalanche,
    )

    import_avalanche()
    generator = getattr(importlib.import_module(GENERATORS[benchmark]), benchmark)
    kwargs = dict(args or {})
    if "datasets_dict" in kwargs:
        raise OptionError("args.datasets_dict", "clsim passes the scenario's dataset itself")
    if "class_order" not in kwargs and "seed" not in kwargs:
        kwargs["seed"] = seed  # Avalanche draws the class order from the seed
    # Avalanche's generators reseed torch's global generator: keep clsim's untouched
    with torch.random.fork_rng(devices=[]):
        try:
            built = generator(avalanche_datasets(dataset), **kwargs)
        except TypeError as exc:
            raise OptionError("args", f"{benchmark} rejected its arguments: {exc}") from None
        except (ValueError, AssertionError) as exc:
            raise OptionError("args", f"{benchmark}: {exc}") from None
    return stream_from_avalanche(built, dataset, name=benchmark)


# ---------------------------------------------------------------------------
# classic benchmarks: SplitMNIST and the like, reading their own data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    """A classic benchmark as read for a dataset: what was asked, and its stream."""

    benchmark: str
    args: str  # the arguments as canonical JSON
    root: Path
    seed: int
    stream: Stream


_READ: weakref.WeakKeyDictionary[Dataset, _Read] = weakref.WeakKeyDictionary()


def read_benchmark(benchmark: str, args: dict[str, Any], root: Path | None,
                   data_root: str | None, seed: int) -> Dataset:
    """The data of the classic Avalanche ``benchmark``, read through Avalanche with
    ``seed`` from ``root`` (None: the files clsim arranges from its copy under
    ``data_root``); its stream is kept for :func:`avalanche_stream` to hand out. Errors
    are OptionErrors at the stream key, DataErrors (no data root) or ConfigErrors (no
    avalanche-lib)."""
    from clsim.interop.avalanche import import_avalanche
    from clsim.interop.avalanche_classic import arranged_root, read_classic

    import_avalanche()
    root = Path(root) if root is not None else arranged_root(benchmark, data_root)
    dataset, stream = read_classic(benchmark, args, root, seed)
    _READ[dataset] = _Read(benchmark, _canonical(args), root, seed, stream)
    return dataset


def _classic_stream(dataset: Dataset, seed: int, benchmark: str,
                    args: dict[str, Any]) -> Stream:
    from clsim.interop.avalanche_classic import read_classic

    read = _READ.get(dataset)
    if read is None or (read.benchmark, read.args) != (benchmark, _canonical(args)):
        raise OptionError("benchmark", f"{benchmark} brings its own data: build its stream "
                          "over the dataset clsim.assembly.load_scenario_data returns for the "
                          f"scenario, not over dataset {dataset.name!r}")
    if read.seed == seed:
        return read.stream
    other, stream = read_classic(benchmark, args, read.root, seed)
    if (other.sample_shape, other.x_train.dtype, other.n_classes) != (
            dataset.sample_shape, dataset.x_train.dtype, dataset.n_classes):
        raise OptionError("args", f"{benchmark} with seed {seed} gives samples of shape "
                          f"{other.sample_shape} and {other.n_classes} classes, unlike with "
                          f"seed {read.seed}: the run's model would not fit")
    return stream


def _canonical(args: dict[str, Any]) -> str:
    return json.dumps(args, sort_keys=True, default=str)
