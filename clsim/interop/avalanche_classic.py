"""Avalanche's classic benchmarks (SplitMNIST, SplitFMNIST, SplitCIFAR10, ...) over local
files, with nothing downloaded.

A classic benchmark reads its dataset through torchvision with ``download=True``:
torchvision looks for its own layout under the benchmark's ``dataset_root`` and downloads
whatever is missing. clsim never lets it get that far. Before the benchmark is built,
:func:`missing_files` lists what torchvision would look for and not find, and a missing
file is a ConfigError that names it. The layouts:

* MNIST, Fashion-MNIST: ``<root>/MNIST/raw/`` (``FashionMNIST/raw/``) holding the four idx
  files unpacked (``train-images-idx3-ubyte``...); the ``.gz`` files are accepted only
  with the checksums torchvision records, which re-packed copies (such as the ones in
  clsim's shared data folder) do not have, so torchvision would download instead.
* CIFAR-10, CIFAR-100: ``<root>/cifar-10-batches-py/`` (``cifar-100-python/``), the
  original pickles, checksummed, or the original ``.tar.gz`` beside them.

Without a ``dataset_root``, clsim arranges the MNIST layout itself (:func:`arranged_root`):
it unpacks clsim's own idx files (``mnist/``, ``fashion-mnist/`` under the data root) into
``$CLSIM_CACHE/avalanche/`` once, and points the benchmark there. clsim's CIFAR-10 (a zip
of JPEGs) cannot stand in for torchvision's pickles, so the CIFAR benchmarks need a
``dataset_root``.

:func:`read_classic` builds the benchmark and reads every sample through Avalanche's data
loading (its eval transforms: the normalised float tensors its strategies would see), as
a clsim :class:`~clsim.data.Dataset` and the :class:`~clsim.stream.Stream` over it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from clsim.data.dataset import Dataset
from clsim.data.images import default_cache_dir
from clsim.data.registry import resolve_data_root
from clsim.errors import OptionError
from clsim.stream import Stream

CLASSIC_MODULE = "avalanche.benchmarks.classic"


@dataclass(frozen=True)
class ClassicBenchmark:
    """What one of Avalanche's classic benchmarks reads."""

    dataset: str  # the clsim dataset holding the same data (data.dataset names it)
    torchvision: str  # the torchvision dataset class that reads the files
    clsim_folder: str | None  # clsim's folder whose files can be arranged for it, if any


CLASSIC_BENCHMARKS: dict[str, ClassicBenchmark] = {
    "SplitMNIST": ClassicBenchmark("mnist", "MNIST", "mnist"),
    "PermutedMNIST": ClassicBenchmark("mnist", "MNIST", "mnist"),
    "RotatedMNIST": ClassicBenchmark("mnist", "MNIST", "mnist"),
    "SplitFMNIST": ClassicBenchmark("fashion_mnist", "FashionMNIST", "fashion-mnist"),
    "SplitCIFAR10": ClassicBenchmark("cifar10", "CIFAR10", None),
    "SplitCIFAR100": ClassicBenchmark("cifar100", "CIFAR100", None),
}


# ---------------------------------------------------------------------------
# the files torchvision looks for
# ---------------------------------------------------------------------------


def missing_files(benchmark: str, root: Path) -> list[Path]:
    """The files torchvision would download for ``benchmark`` under ``root`` (none: it
    downloads nothing). Mirrors torchvision's own checks: MNIST's ``_check_exists`` (the
    unpacked files) and its ``download`` (a ``.gz`` with the recorded checksum is unpacked
    instead, into a folder that must be writable); CIFAR's ``_check_integrity`` and
    ``_load_meta`` (checksummed pickles), or the checksummed archive."""
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    cls = getattr(datasets, CLASSIC_BENCHMARKS[benchmark].torchvision)
    if hasattr(cls, "resources"):  # MNIST, FashionMNIST
        raw = root / cls.__name__ / "raw"
        missing = []
        for archive, md5 in cls.resources:
            unpacked = raw / os.path.splitext(archive)[0]
            packed_ok = check_integrity(str(raw / archive), md5) and os.access(raw, os.W_OK)
            if not unpacked.is_file() and not packed_ok:
                missing.append(unpacked)
        return missing
    base = root / cls.base_folder  # CIFAR10, CIFAR100
    files = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    missing = [base / name for name, md5 in files if not check_integrity(str(base / name), md5)]
    if missing and check_integrity(str(root / cls.filename), cls.tgz_md5) \
            and os.access(root, os.W_OK):
        return []
    return missing


def layout_hint(benchmark: str) -> str:
    spec = CLASSIC_BENCHMARKS[benchmark]
    if spec.clsim_folder is not None:
        return (f"torchvision's layout: <root>/{spec.torchvision}/raw/ with the four idx files "
                "unpacked; or omit dataset_root and clsim unpacks its own "
                f"{spec.clsim_folder}/ files (under data.root or $CLSIM_DATA) into "
                "$CLSIM_CACHE for it")
    folder = "cifar-10-batches-py" if spec.torchvision == "CIFAR10" else "cifar-100-python"
    return (f"torchvision's layout: <root>/{folder}/ with the original python pickles (their "
            "checksums are checked), or the original archive in <root>")


def checked_root(benchmark: str, root: Path) -> Path:
    """``root`` if torchvision finds all of ``benchmark``'s files there, else an
    OptionError at ``dataset_root`` naming the missing ones (nothing is downloaded)."""
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise OptionError("dataset_root", f"{root} {state}; {benchmark} expects "
                          + layout_hint(benchmark))
    missing = missing_files(benchmark, root)
    if missing:
        raise OptionError(
            "dataset_root",
            f"{benchmark} reads {CLASSIC_BENCHMARKS[benchmark].torchvision} through "
            f"torchvision, which would download what it does not find, and clsim never "
            f"downloads: missing {', '.join(map(str, missing))}; expected "
            + layout_hint(benchmark),
        )
    return root


def arranged_root(benchmark: str, data_root: str | None) -> Path:
    """A torchvision root for ``benchmark`` made from clsim's own copy of its dataset:
    the idx files, unpacked, in ``$CLSIM_CACHE/avalanche/<Name>-<stamp>/<Name>/raw/``
    (the stamp changes when the source files do). Written once, atomically."""
    spec = CLASSIC_BENCHMARKS[benchmark]
    if spec.clsim_folder is None:
        raise OptionError("dataset_root", f"{benchmark} needs a dataset_root: clsim's "
                          f"{spec.dataset} cannot stand in for the files torchvision reads; "
                          "expected " + layout_hint(benchmark))
    from torchvision import datasets

    folder = resolve_data_root(data_root) / spec.clsim_folder
    names = [os.path.splitext(archive)[0]
             for archive, _ in getattr(datasets, spec.torchvision).resources]
    sources = {}
    for name in names:
        found = [folder / f for f in (name, name + ".gz") if (folder / f).is_file()]
        if not found:
            raise OptionError("dataset_root", f"{benchmark}: no dataset_root given, and "
                              f"clsim's {spec.dataset} files to arrange are missing: "
                              f"{folder / name}(.gz) not found")
        sources[name] = found[0]
    stamp = hashlib.sha256(repr(sorted(
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources.values()
    )).encode()).hexdigest()[:12]
    root = default_cache_dir() / "avalanche" / f"{spec.torchvision}-{stamp}"
    raw = root / spec.torchvision / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name, source in sources.items():
            target = raw / name
            if not target.is_file():
                data = source.read_bytes()
                if data[:2] == b"\x1f\x8b":  # gzip, whatever the file is called
                    data = gzip.decompress(data)
                partial = raw / f".{name}.{os.getpid()}.partial"
                partial.write_bytes(data)
                os.replace(partial, target)
    except OSError as exc:
        raise OptionError("dataset_root", f"{benchmark}: no dataset_root given, and clsim "
                          f"could not arrange its {spec.dataset} files in {raw}: {exc}; set "
                          "$CLSIM_CACHE to a writable folder or give dataset_root") from None
    return root


# ---------------------------------------------------------------------------
# building and reading
# ---------------------------------------------------------------------------


def read_classic(benchmark: str, args: dict[str, Any], root: Path, seed: int,
                 ) -> tuple[Dataset, Stream]:
    """Avalanche's ``benchmark(dataset_root=root, **args)`` (``seed`` unless ``args``
    gives one), every sample read through its eval transforms: the clsim dataset of all
    of them and the stream of its experiences (views into the dataset's tensors)."""
    from clsim.interop.avalanche import (
        dataset_from_stream,
        import_avalanche,
        stream_from_avalanche,
    )

    import_avalanche()
    if "dataset_root" in args:
        raise OptionError("args.dataset_root", "give it as stream.dataset_root (a path "
                          "relative to the scenario file)")
    checked_root(benchmark, root)
    factory = getattr(importlib.import_module(CLASSIC_MODULE), benchmark)
    kwargs = {"seed": seed, **args}
    # Avalanche's generators reseed torch's global generator: keep clsim's untouched
    with torch.random.fork_rng(devices=[]):
        try:
            built = factory(dataset_root=str(root), **kwargs)
        except TypeError as exc:
            raise OptionError("args", f"{benchmark} rejected its arguments: {exc}") from None
        except (ValueError, AssertionError) as exc:
            raise OptionError("args", f"{benchmark}: {exc}") from None
        except RuntimeError as exc:  # torchvision could not read what it found
            raise OptionError("dataset_root", f"{benchmark} could not read its data under "
                              f"{root}: {exc}") from None
        stream = _in_class_order(stream_from_avalanche(built, name=benchmark),
                                 getattr(built, "classes_order", None))
    dataset = dataset_from_stream(stream, name=benchmark)
    dataset = replace(dataset, source=f"avalanche {benchmark} ({root})")
    return dataset, _as_views(stream, dataset)


def _in_class_order(stream: Stream, order: Any) -> Stream:
    """Each experience's classes, and the stream's class order, in the benchmark's
    ``classes_order`` (the order it drew; its experiences list their classes sorted)."""
    if order is None:
        return stream
    rank = {int(c): i for i, c in enumerate(order)}
    if any(c not in rank for exp in stream for c in exp.classes):
        return stream
    experiences = tuple(replace(e, classes=tuple(sorted(e.classes, key=rank.__getitem__)))
                        for e in stream)
    return replace(stream, experiences=experiences, class_order=tuple(
        dict.fromkeys(c for e in experiences for c in e.classes)))


def _as_views(stream: Stream, dataset: Dataset) -> Stream:
    """``stream`` with every experience's tensors slices of ``dataset``'s, which hold the
    same samples in the same order (so the samples are in memory once)."""
    experiences, train, test = [], 0, 0
    for exp in stream:
        experiences.append(replace(
            exp,
            train_x=dataset.x_train[train : train + exp.n_train],
            train_y=dataset.y_train[train : train + exp.n_train],
            test_x=dataset.x_test[test : test + exp.n_test],
            test_y=dataset.y_test[test : test + exp.n_test],
        ))
        train, test = train + exp.n_train, test + exp.n_test
    return replace(stream, experiences=tuple(experiences))
