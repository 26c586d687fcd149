"""MNIST and Fashion-MNIST from the standard idx files, parsed with numpy alone.

The idx format is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values. Files may be gzipped
or not; the gzip magic bytes decide, not the file name, so a ``.gz`` that a browser
already unpacked still loads.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from clsim.data.dataset import Dataset
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


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a damaged gzip file ({exc}); download it again") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one idx file (gzip or not) into a numpy array of its stored type and shape."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an idx file: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000 then a type code and the number of dimensions)"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of values but its header says "
            f"{shape} x {dtype.itemsize} = {expected}; the file is truncated or damaged"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # native byte order and a writable copy, so torch.from_numpy accepts it
    return values.astype(dtype.newbyteorder("="), copy=True)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        candidate = folder / name
        if candidate.is_file():
            return candidate
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
