"""CIFAR-100 from the python-version pickles, read through a restricted unpickler.

The files are ``train``, ``test`` and ``meta``, in a folder or in its ``cifar-100-python/``
subfolder. ``train``/``test`` are dicts with ``data`` (N x 3072 uint8, channel-major: the
1024 red values, then green, then blue), ``fine_labels`` and ``coarse_labels``; ``meta``
holds ``fine_label_names`` and ``coarse_label_names``. Keys are bytes once loaded with
``encoding="bytes"`` (the files come from Python 2); str keys are accepted too.

Unpickling runs code named by the file, so :class:`SafeUnpickler` resolves no global but
the numpy names an ndarray needs and the one CPython emits for bytes at protocol 2;
anything else (``os.system``, ``builtins.eval``...) is refused with a :class:`DataError`.
"""

from __future__ import annotations

import codecs
import importlib
import io
import os
import pickle
import pickletools
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.data.guards import data_file, present, read_whole
from clsim.errors import DataError

CIFAR100_FILES: tuple[str, ...] = ("train", "test", "meta")
CIFAR100_SUBFOLDER = "cifar-100-python"
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _numpy_private(module: str, name: str) -> Any:
    """A numpy-internal function under its numpy 2 home, falling back to numpy 1's.

    Importing the old ``numpy.core`` path on numpy 2 works but warns, hence the order.
    """
    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except (ImportError, AttributeError):
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


_RECONSTRUCT = _numpy_private("multiarray", "_reconstruct")  # ndarray, protocols 0-4
_FROMBUFFER = _numpy_private("numeric", "_frombuffer")  # ndarray, protocol 5
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # what CPython writes for a bytes object at protocol 2: _codecs.encode(str, "latin1")
    ("_codecs", "encode"): codecs.encode,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for plain data and numpy arrays only: every other global is refused."""

    def __init__(self, file: BinaryIO, *, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise DataError(
                f"{self._source} refers to {module}.{name}; a dataset pickle may only hold "
                "plain data and numpy arrays, so it was not loaded (is the file genuine?)"
            )
        return allowed


def _check_lengths(raw: bytes, path: Path) -> None:
    """Every length the pickle declares (of a bytes, a string, a frame) fits in the file.

    The unpickler allocates a declared length before reading it, so a few bytes claiming
    2**40 would be a MemoryError; walking the opcodes first reads only what is there."""
    try:
        for _ in pickletools.genops(io.BytesIO(raw)):
            pass
    except ValueError as exc:
        raise DataError(f"{path} is not a readable CIFAR pickle ({exc})") from exc


def safe_pickle_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` with :class:`SafeUnpickler`; any failure becomes a DataError."""
    path = Path(path)
    raw = read_whole(path, "CIFAR pickle")
    _check_lengths(raw, path)
    try:
        return SafeUnpickler(io.BytesIO(raw), source=str(path)).load()
    except DataError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        OverflowError,
    ) as exc:
        raise DataError(f"{path} is not a readable CIFAR pickle ({exc})") from exc


def _field(record: Any, key: str, path: Path) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{path} holds a {type(record).__name__}; expected a dict")
    for candidate in (key.encode("ascii"), key):
        if candidate in record:
            return record[candidate]
    raise DataError(f"{path} has no {key!r} entry (expected keys: data, fine_labels, ...)")


def _names(record: Any, key: str, path: Path) -> tuple[str, ...]:
    values = _field(record, key, path)
    if not isinstance(values, (list, tuple)) or not values:
        raise DataError(f"{path}: {key!r} must be a non-empty list of names")
    names = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise DataError(f"{path}: {key!r} holds a {type(value).__name__}; expected names")
        names.append(value)
    return tuple(names)


def _labels(record: Any, key: str, n: int, n_classes: int, path: Path) -> torch.Tensor:
    raw = _field(record, key, path)
    try:
        labels = np.asarray(raw)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: {key!r} is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or (len(labels) and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: {key!r} must be a flat list of integers")
    if len(labels) != n:
        raise DataError(f"{path}: {key!r} has {len(labels)} entries for {n} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"{path}: {key!r} has labels outside [0, {n_classes}): "
            f"min {labels.min()}, max {labels.max()}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def _images(record: Any, path: Path) -> torch.Tensor:
    raw = _field(record, "data", path)
    data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes) else np.asarray(raw)
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(f"{path}: 'data' holds {data.dtype} values; expected uint8 pixels")
        data = data.astype(np.uint8)
    if data.size % 3072:
        raise DataError(
            f"{path}: 'data' has {data.size} values, not a multiple of 3072 (3x32x32 per image)"
        )
    return torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))


def find_cifar100_folder(folder: str | os.PathLike[str]) -> Path:
    """The folder holding the pickles: ``folder`` or its ``cifar-100-python/`` subfolder."""
    folder = Path(folder)
    for candidate in (folder, folder / CIFAR100_SUBFOLDER):
        if all(present(candidate / name) for name in CIFAR100_FILES):
            for name in CIFAR100_FILES:  # a pipe or a device there is named, not read
                data_file(candidate / name, "CIFAR-100 pickle")
            return candidate
    # name what is missing where the user most likely put the files
    sub = folder / CIFAR100_SUBFOLDER
    where = sub if sub.is_dir() else folder
    missing = [name for name in CIFAR100_FILES if not (where / name).is_file()]
    state = "" if where.is_dir() else " (folder does not exist)"
    raise DataError(
        f"CIFAR-100 not found: {where}{state} is missing {', '.join(missing)} "
        f"(expected the python-version pickles {', '.join(CIFAR100_FILES)}, in that folder "
        f"or in its {CIFAR100_SUBFOLDER}/ subfolder)"
    )


def load_cifar100(folder: str | os.PathLike[str]) -> Dataset:
    """CIFAR-100 (50k/10k, 3x32x32 uint8) with fine labels as classes and coarse parents."""
    base = find_cifar100_folder(folder)
    meta_path = base / "meta"
    meta = safe_pickle_load(meta_path)
    fine_names = _names(meta, "fine_label_names", meta_path)
    coarse_names = _names(meta, "coarse_label_names", meta_path)
    splits = {}
    for split in ("train", "test"):
        path = base / split
        record = safe_pickle_load(path)
        x = _images(record, path)
        fine = _labels(record, "fine_labels", len(x), len(fine_names), path)
        coarse = _labels(record, "coarse_labels", len(x), len(coarse_names), path)
        splits[split] = (x, fine, coarse)
    (x_train, y_train, c_train), (x_test, y_test, c_test) = splits["train"], splits["test"]
    return Dataset(
        name="cifar100",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=fine_names,
        scale=1.0 / 255.0,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        coarse_train=c_train,
        coarse_test=c_test,
        coarse_names=coarse_names,
        source=str(base),
    )
