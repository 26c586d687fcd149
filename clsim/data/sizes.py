"""What a dataset will take in memory, read from file headers and listings, not the data.

:func:`estimate_dataset` answers before :func:`clsim.data.load_dataset` reads anything
large, so a run that cannot fit stops early with a clear message instead of being killed
half-way through loading. The answer is the bytes of the loaded :class:`Dataset`'s tensors
(raw samples, int64 labels, int64 coarse labels where the dataset has them): exact for
digits, MNIST, Fashion-MNIST, npz, CIFAR-10 and Omniglot, and the pickles' size for
CIFAR-100. When the files are missing or unreadable the answer is None, and the loader
then reports the problem in its own words.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from clsim.data import guards, idx, images, omniglot
from clsim.data.cifar100 import CIFAR100_FILES, find_cifar100_folder
from clsim.errors import ClsimError

_LABEL_BYTES = 8  # labels are int64 once loaded


@dataclass(frozen=True)
class DatasetSize:
    """The loaded size of a dataset, and what it was read from (for messages)."""

    name: str
    n_samples: int
    sample_shape: tuple[int, ...]
    value_bytes: int  # bytes of one stored value (1 for uint8 pixels)
    label_arrays: int = 1  # 2 with coarse labels
    n_classes: int = 10
    exact: bool = True

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.sample_shape) * self.value_bytes

    @property
    def total_bytes(self) -> int:
        return self.n_samples * (self.sample_bytes + self.label_arrays * _LABEL_BYTES)

    def describe(self) -> str:
        shape = "x".join(str(d) for d in self.sample_shape)
        about = "" if self.exact else "about "
        per = "byte" if self.value_bytes == 1 else "bytes"
        return f"{about}{self.n_samples} samples of {shape} at {self.value_bytes} {per} a value"


def _digits(root, **_) -> DatasetSize:
    return DatasetSize("digits", 1797, (1, 8, 8), 1)  # scikit-learn's bundled copy


def _idx_header(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, bytes per value) from an idx file's header; gzip or not."""
    shape, dtype = idx.read_idx_header(path)
    return shape, dtype.itemsize


def _idx_folder(name: str, *subfolders: str) -> Callable[..., DatasetSize]:
    def estimate(root, **_) -> DatasetSize:
        from clsim.data.registry import _folder

        folder = _folder(root, *subfolders)
        n, shape, width = 0, (), 1
        for images_stem, _labels in idx._SPLIT_FILES.values():
            path = idx._find(folder, images_stem)
            if path is None:
                raise FileNotFoundError(images_stem)
            dims, width = _idx_header(path)
            n, shape = n + dims[0], (1, *dims[1:])
        return DatasetSize(name, n, shape, width)

    return estimate


def _npz(root, *, path=None, name=None, **_) -> DatasetSize:
    file = Path(path).expanduser()
    if not file.is_absolute() and root is not None and str(root) != "":
        file = Path(root).expanduser() / file
    shapes = {}
    with zipfile.ZipFile(guards.data_file(file, "npz dataset")) as archive:
        for key in ("x", "x_test", "class_names"):
            if f"{key}.npy" not in archive.namelist():
                continue
            with archive.open(f"{key}.npy") as f:
                shape, dtype = guards.npy_header(f)
            shapes[key] = (shape, dtype.itemsize)
    (x_shape, width) = shapes["x"]
    n = x_shape[0] + (shapes["x_test"][0][0] if "x_test" in shapes else 0)
    classes = shapes["class_names"][0][0] if "class_names" in shapes else 10
    return DatasetSize(name or file.stem, n, tuple(x_shape[1:]), width, n_classes=classes)


def _cifar10(root, **_) -> DatasetSize:
    from clsim.data.registry import _folder

    source = images._source_for(_folder(root, "cifar10", "cifar-10"), "CIFAR-10",
                                images.CIFAR10_ZIP_NAME).path
    if source.is_file():
        with zipfile.ZipFile(source) as archive:
            members = [i.filename for i in archive.infolist() if _image_member(i.filename)]
            width, height = _image_size(archive.open(members[0]))
    else:
        members = [str(p) for p in sorted(source.rglob("*")) if _image_member(str(p))]
        with open(guards.data_file(members[0], "CIFAR-10 image"), "rb") as f:
            width, height = _image_size(f)
    classes = len({Path(m).parent.name for m in members})
    return DatasetSize("cifar10", len(members), (3, height, width), 1, n_classes=classes)


def _image_size(f: BinaryIO) -> tuple[int, int]:
    """(width, height) from an image's header: the pixels are not decoded."""
    with f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(f, formats=guards.PIL_FORMATS) as image:
            return image.size


def _image_member(name: str) -> bool:
    parts = name.replace(os.sep, "/").split("/")
    return (len(parts) >= 3 and images.is_image(parts[-1]) and not images.is_junk(parts)
            and parts[-3] in images.SPLITS)


def _cifar100(root, **_) -> DatasetSize:
    from clsim.data.registry import _folder

    base = find_cifar100_folder(_folder(root, "cifar100", "cifar-100-python"))
    size = sum((base / name).stat().st_size for name in CIFAR100_FILES if name != "meta")
    # the pickles hold the raw uint8 images; their size is the images' within a percent
    return DatasetSize("cifar100", size // 3072, (3, 32, 32), 1, label_arrays=2,
                       n_classes=100, exact=False)


def _omniglot(root, *, size: int = 28, **_) -> DatasetSize:
    from clsim.data.registry import _folder

    found = omniglot._find_drawings(_folder(root, omniglot.OMNIGLOT_SUBFOLDER))
    classes = len({(a, c) for a, c, _ in found})
    return DatasetSize("omniglot", len(found), (1, size, size), 1, label_arrays=2,
                       n_classes=classes)


ESTIMATORS: dict[str, Callable[..., DatasetSize]] = {
    "digits": _digits,
    "mnist": _idx_folder("mnist", "mnist"),
    "fashion_mnist": _idx_folder("fashion_mnist", "fashion-mnist", "fashion_mnist"),
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "omniglot": _omniglot,
    "npz": _npz,
}


def estimate_dataset(name: str, *, root=None, **options: object) -> DatasetSize | None:
    """The loaded size of dataset ``name`` (as :func:`clsim.data.load_dataset` takes it),
    from headers and listings only; None when it cannot be told cheaply (missing or
    damaged files: the loader names those)."""
    estimator = ESTIMATORS.get(str(name).strip().lower().replace("-", "_"))
    if estimator is None:
        return None
    try:
        return estimator(root, **options)
    except (ClsimError, OSError, ValueError, KeyError, IndexError, TypeError, EOFError,
            zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
            Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None
