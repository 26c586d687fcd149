"""MNIST and Fashion-MNIST from the standard idx files, parsed with numpy alone.

The idx format is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values. Files may be gzipped
or not; the gzip magic bytes decide, not the file name, so a ``.gz`` that a browser
already unpacked still loads.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.data.guards import data_file, data_folder, present
from clsim.data.limits import require_memory
from clsim.errors import DataError

# idx type code -> big-endian numpy dtype
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

_SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_FILE_NAMES: tuple[str, ...] = tuple(
    name + ".gz" for pair in _SPLIT_FILES.values() for name in pair
)

MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_GZIP_MAGIC = b"\x1f\x8b"


def _read_header(stream: BinaryIO, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header at the start of ``stream``."""
    head = stream.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        inside = " (once gunzipped: the gzip data is damaged or is not idx)" \
            if isinstance(stream, gzip.GzipFile) else ""
        raise DataError(
            f"{path} is not an idx file{inside}: bad magic number {head.hex() or '(empty)'} "
            "(expected 0000 then a type code and the number of dimensions)"
        )
    dims = stream.read(4 * head[3])
    if len(dims) < 4 * head[3]:
        raise DataError(f"{path} is truncated inside its idx header")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    return shape, np.dtype(_IDX_DTYPES[head[2]])


def _read_values(stream: BinaryIO, nbytes: int, path: Path, what: str) -> bytearray:
    """Exactly ``nbytes`` from ``stream``; fewer, or any byte more, is an error. Reading
    one byte past the end also makes gzip check its CRC."""
    out = bytearray(nbytes)
    view, filled = memoryview(out), 0
    while filled < nbytes:
        n = stream.readinto(view[filled:])
        if not n:
            raise DataError(f"{path} holds {filled} bytes of values but its header says "
                            f"{what}; the file is truncated or damaged")
        filled += n
    if stream.read(1):
        raise DataError(f"{path} holds more than the {what} its header says; the file is "
                        "damaged (or not what its header claims)")
    return out


def read_idx_header(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) an idx file declares, read from its header alone."""
    path = data_file(path, "idx file")
    try:
        with open(path, "rb") as raw, _open_stream(raw) as stream:
            return _read_header(stream, path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a damaged gzip file ({exc}); download it again") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one idx file (gzip or not) into a numpy array of its stored type and shape.

    The header's size must fit in memory before the values are read, and the values must
    be exactly that size: a gzip bomb is read only one byte past what the header allows.
    """
    path = data_file(path, "idx file")
    try:
        with open(path, "rb") as raw, _open_stream(raw) as stream:
            shape, dtype = _read_header(stream, path)
            nbytes = math.prod(shape) * dtype.itemsize
            what = f"{shape} x {dtype.itemsize} = {nbytes} bytes"
            if stream is raw:  # not compressed: the file's size tells, nothing to read
                size = os.fstat(raw.fileno()).st_size - raw.tell()
                if size != nbytes:
                    raise DataError(
                        f"{path} holds {size} bytes of values but its header says {what}; "
                        "the file is truncated or damaged"
                    )
            require_memory(nbytes, f"{path}: its idx header declares {what}")
            values = _read_values(stream, nbytes, path, what)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a damaged gzip file ({exc}); download it again") from exc
    array = np.frombuffer(values, dtype=dtype).reshape(shape)
    # native byte order (a copy only for multi-byte values), writable for torch.from_numpy
    return array.astype(dtype.newbyteorder("="), copy=False)


def _open_stream(raw: BinaryIO) -> BinaryIO:
    """``raw`` itself, or a gunzipping stream over it when it starts with the gzip magic
    bytes (inflated lazily, so a bomb is never inflated past what the header allows)."""
    gzipped = raw.read(2) == _GZIP_MAGIC
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw  # closing raw twice is fine


def _find(folder: Path, stem: str) -> Path | None:
    """The stem's file (``.gz`` first); whatever sits there must be a regular file."""
    for name in (stem + ".gz", stem):
        candidate = folder / name
        if present(candidate):
            return data_file(candidate, "idx file")
    return None


def _load_split(
    images_path: Path, labels_path: Path, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{images_path} holds {images.dtype} values of shape {images.shape}; "
            "expected uint8 images (N, rows, cols)"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_path} holds {labels.dtype} values of shape {labels.shape}; "
            "expected one integer label per image"
        )
    if len(labels) != len(images):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"{labels_path} has labels outside [0, {n_classes}): "
            f"min {labels.min()}, max {labels.max()}"
        )
    x = torch.from_numpy(np.ascontiguousarray(images[:, None, :, :]))
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_idx_folder(
    folder: str | os.PathLike[str],
    *,
    name: str,
    title: str,
    class_names: tuple[str, ...],
    mean: float,
    std: float,
) -> Dataset:
    """Load the four standard idx files from ``folder`` into a :class:`Dataset`.

    ``title`` is the dataset's human name, used in the error that lists missing files.
    """
    folder = Path(folder)
    if present(folder):
        data_folder(folder, f"{title} folder")
    stems = [stem for pair in _SPLIT_FILES.values() for stem in pair]
    found = {stem: _find(folder, stem) for stem in stems}
    missing = [stem + ".gz" for stem, path in found.items() if path is None]
    if missing:
        where = f"{folder}" if folder.is_dir() else f"{folder} (folder does not exist)"
        raise DataError(
            f"{title} not found: {where} is missing {', '.join(missing)} "
            "(expected the four standard idx files, gzip or not)"
        )
    splits = {}
    for split, (images_stem, labels_stem) in _SPLIT_FILES.items():
        images_path, labels_path = found[images_stem], found[labels_stem]
        if images_path is None or labels_path is None:  # unreachable: checked above
            raise DataError(f"{title} not found in {folder}")
        splits[split] = _load_split(images_path, labels_path, len(class_names))
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{title} in {folder}: train images are {tuple(x_train.shape[2:])} "
            f"but test images are {tuple(x_test.shape[2:])}"
        )
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
        scale=1.0 / 255.0,
        mean=(mean,),
        std=(std,),
        source=str(folder),
    )


def load_mnist(folder: str | os.PathLike[str]) -> Dataset:
    """MNIST (60k/10k, 1x28x28 uint8) from a folder holding the standard idx files."""
    return load_idx_folder(
        folder, name="mnist", title="MNIST", class_names=MNIST_CLASSES, mean=0.1307, std=0.3081
    )


def load_fashion_mnist(folder: str | os.PathLike[str]) -> Dataset:
    """Fashion-MNIST (60k/10k, 1x28x28 uint8) from a folder of the standard idx files."""
    return load_idx_folder(
        folder,
        name="fashion_mnist",
        title="Fashion-MNIST",
        class_names=FASHION_MNIST_CLASSES,
        mean=0.2860,
        std=0.3530,
    )
