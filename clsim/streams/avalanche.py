"""The ``avalanche`` stream type: one of Avalanche's generators over the scenario's dataset.

avalanche-lib is optional: this module only describes the options; the bridge
(:mod:`clsim.interop.avalanche`) and avalanche-lib itself are imported when a stream is
built, and a missing avalanche-lib is a ConfigError saying how to get it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from clsim.data.dataset import Dataset
from clsim.errors import OptionError
from clsim.stream import Stream
from clsim.streams.common import TimingOptions


@dataclass
class AvalancheStreamOptions(TimingOptions):
    """``stream: {type: avalanche, benchmark: ..., args: {...}}``."""

    benchmark: Literal["class_incremental_benchmark", "new_instances_benchmark"] = field(
        default="class_incremental_benchmark",
        metadata={"help": "Avalanche generator run over the scenario's dataset "
                  "(needs avalanche-lib: make venv-avalanche)"},
    )
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "keyword arguments of the generator (e.g. num_experiences: 5, "
                  "class_order: [...]); seed defaults to the run's"},
    )


def avalanche_stream(dataset: Dataset, *, seed: int,
                     benchmark: str = "class_incremental_benchmark",
                     args: dict[str, Any] | None = None) -> Stream:
    """Avalanche's ``benchmark`` generator over ``dataset``, as a clsim stream."""
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
