"""Any dataset saved as one ``.npz``: the way to bring your own data without writing a loader.

Arrays: ``x`` (N, ...) and ``y`` (N,) integer class ids, optionally ``x_test``/``y_test``
(else a stratified ``test_fraction`` of ``x`` is held out), ``class_names`` (a string
array; else the names are "0".."C-1" with C = max label + 1), and ``scale``, ``mean``,
``std`` (else 1/255 for uint8 samples and 1.0 otherwise, mean 0, std 1). ``x`` keeps its
stored dtype, so the memory ledger charges what the samples really take.

The file is read with ``allow_pickle=False``: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from clsim.data.dataset import Dataset, normalise
from clsim.data.guards import check_npz, data_file, present
from clsim.errors import DataError

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A fixed integer hash: the same numbers on every platform and library version."""
    z = values.astype(np.uint64) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (each ascending) holding out ``test_fraction`` of every class.

    Each class is shuffled by a hash of (seed, index) rather than a library RNG, so a split
    never changes with the numpy or scikit-learn version. A class keeps at least one train
    sample; its test share is ``round(n * test_fraction)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), not {test_fraction}")
    y = np.asarray(y)
    index = np.arange(len(y), dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = _splitmix64(index + np.uint64((seed * 0x632BE59BD9B4E019) & _MASK64))
    test_mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        order = members[np.lexsort((members, keys[members]))]
        n_test = min(int(np.floor(len(members) * test_fraction + 0.5)), len(members) - 1)
        test_mask[order[:n_test]] = True
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def _names(values: np.ndarray, path: Path) -> tuple[str, ...]:
    if values.ndim != 1 or values.dtype.kind not in "US":
        raise DataError(
            f"{path}: 'class_names' must be a 1-D string array, not {values.dtype} "
            f"of shape {values.shape}"
        )
    if values.dtype.kind == "S":
        return tuple(v.decode("utf-8", errors="replace") for v in values)
    return tuple(str(v) for v in values)


def _check_samples(x: np.ndarray, key: str, path: Path) -> None:
    if x.ndim < 2:
        raise DataError(
            f"{path}: {key!r} has shape {x.shape}; expected (N, D) vectors or (N, C, H, W) images"
        )
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key!r} holds {x.dtype} values; expected numbers")


def _check_labels(y: np.ndarray, x: np.ndarray, key: str, x_key: str, path: Path) -> None:
    if y.ndim != 1:
        raise DataError(f"{path}: {key!r} has shape {y.shape}; expected one label per sample")
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key!r} holds {y.dtype} values; labels must be integer class ids")
    if len(y) != len(x):
        raise DataError(f"{path}: {x_key!r} has {len(x)} samples but {key!r} has {len(y)} labels")


def _native(values: np.ndarray) -> np.ndarray:
    """``values`` in this machine's byte order (torch takes no other), same dtype width."""
    return values if values.dtype.isnative else values.astype(values.dtype.newbyteorder("="))


def _read(path: Path) -> dict[str, np.ndarray]:
    if not present(path):
        raise DataError(f"npz dataset not found: {path} does not exist (expected an .npz file)")
    data_file(path, "npz dataset")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if magic[:2] != b"PK":  # an .npz is a zip archive; np.load would try other formats
        raise DataError(f"{path} is not a readable .npz file (not a zip archive: use np.savez)")
    check_npz(path)  # what each array declares, before numpy allocates it
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: _native(stored[key]) for key in stored.files}
    except ValueError as exc:
        raise DataError(
            f"{path} is not a plain .npz ({exc}); object arrays are not loaded, store strings "
            "as a string array"
        ) from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from exc


def _check_label_ids(arrays: dict[str, np.ndarray], n_samples: int, path: Path) -> None:
    """Without 'class_names' the classes are 0..max label: a label id beyond the number of
    samples would make more classes than samples (and a name for each), so it is refused
    before anything is sized by it."""
    for key in ("y", "y_test"):
        if key in arrays and len(arrays[key]) and int(arrays[key].max()) >= n_samples:
            top = int(arrays[key].max())
            raise DataError(
                f"{path}: {key!r} holds label id {top}, but there are only {n_samples} "
                "samples; without 'class_names' the classes are 0..max label, so number "
                "the classes from 0 or store 'class_names'"
            )


def _nonfinite_inputs(x: np.ndarray, scale: float, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> int:
    """How many values of ``x`` the model would read as NaN or infinite once normalised.

    The normalisation is monotone in each value, so the per-channel extremes tell whether
    any value goes non-finite; only then are the values counted, in chunks."""
    axes = (0, *range(2, x.ndim)) if len(mean) > 1 else None
    keep = (1, len(mean)) + (1,) * (x.ndim - 2) if len(mean) > 1 else (1,) * x.ndim
    extremes = np.concatenate([np.min(x, axis=axes).reshape(keep),
                               np.max(x, axis=axes).reshape(keep)])
    if torch.isfinite(normalise(torch.from_numpy(extremes), scale, mean, std)).all():
        return 0
    chunk = max(1, 2**22 // max(1, x[0].size))
    return sum(int((~torch.isfinite(normalise(torch.from_numpy(x[i:i + chunk]), scale, mean,
                                              std))).sum())
               for i in range(0, len(x), chunk))


def _check_inputs(arrays: dict[str, np.ndarray], keys: tuple[str, ...], scale: float,
                  mean: tuple[float, ...], std: tuple[float, ...], path: Path) -> None:
    """Refuse samples that would train on NaN or infinity once normalised (NaN or inf in
    the file, or values that overflow float32 after scale, mean and std)."""
    numbers = {"scale": (scale,), "mean": mean, "std": std}
    for name, values in numbers.items():
        if not all(np.isfinite(values)):
            raise DataError(f"{path}: {name!r} holds a non-finite value {values}; expected "
                            "finite numbers")
    for key in keys:
        try:
            bad = _nonfinite_inputs(arrays[key], scale, mean, std)
        except TypeError:  # a dtype torch cannot take: refused when it is converted
            continue
        if bad:
            raise DataError(
                f"{path}: {key!r} gives {bad} of {arrays[key].size} values that are NaN or "
                f"infinite once normalised (x * scale - mean) / std in float32 (scale "
                f"{scale}, mean {mean}, std {std}); remove them or store smaller values"
            )


def _floats(
    arrays: dict[str, np.ndarray], key: str, default: tuple[float, ...], path: Path
) -> tuple[float, ...]:
    if key not in arrays:
        return default
    values = np.asarray(arrays[key])
    if values.dtype.kind not in "iuf" or values.ndim > 1 or values.size == 0:
        raise DataError(f"{path}: {key!r} must be a number or a 1-D array of numbers")
    return tuple(float(v) for v in values.reshape(-1))


def load_npz(
    path: str | os.PathLike[str],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> Dataset:
    """Load a dataset from one ``.npz`` (see the module docstring for the arrays it reads)."""
    path = Path(path).expanduser()
    arrays = _read(path)
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        present = ", ".join(sorted(arrays)) or "nothing"
        raise DataError(
            f"{path} is missing array(s) {', '.join(missing)} (it holds {present}; expected "
            "x and y, optionally x_test, y_test and class_names)"
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise DataError(f"{path} has {have!r} but not {lack!r}; give both or neither")

    x, y = arrays["x"], arrays["y"]
    _check_samples(x, "x", path)
    _check_labels(y, x, "y", "x", path)
    if len(x) == 0:
        raise DataError(f"{path}: 'x' holds no samples")
    has_test = "x_test" in arrays
    if has_test:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        _check_samples(x_test, "x_test", path)
        _check_labels(y_test, x_test, "y_test", "x_test", path)
        if x_test.shape[1:] != x.shape[1:] or x_test.dtype != x.dtype:
            raise DataError(
                f"{path}: 'x_test' samples are {x_test.dtype} {x_test.shape[1:]} but 'x' "
                f"samples are {x.dtype} {x.shape[1:]}; they must match"
            )

    labels = np.concatenate([y, arrays["y_test"]]) if has_test else y
    if "class_names" in arrays:
        class_names = _names(arrays["class_names"], path)
    else:
        _check_label_ids(arrays, len(labels), path)
        class_names = tuple(str(i) for i in range(max(int(labels.max()), 0) + 1))
    n_classes = len(class_names)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(
            f"{path}: labels must lie in [0, {n_classes}) for {n_classes} classes, but range "
            f"from {labels.min()} to {labels.max()}"
        )

    if has_test:
        x_train, y_train = x, y
    else:
        train_idx, test_idx = stratified_split(y, test_fraction, seed)
        if len(test_idx) == 0:
            raise DataError(
                f"{path}: holding out {test_fraction} of {len(x)} samples leaves no test "
                "samples; store x_test and y_test or raise test_fraction"
            )
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    default_scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    scale = _floats(arrays, "scale", (default_scale,), path)
    if len(scale) != 1:
        raise DataError(f"{path}: 'scale' must be a single number")
    mean = _floats(arrays, "mean", (0.0,), path)
    std = _floats(arrays, "std", (1.0,), path)
    if len(mean) != len(std):
        raise DataError(f"{path}: 'mean' has {len(mean)} values but 'std' has {len(std)}")
    if any(s == 0.0 for s in std):
        raise DataError(f"{path}: 'std' must not contain zeros")
    if len(mean) > 1 and x.shape[1] != len(mean):
        raise DataError(
            f"{path}: 'mean' and 'std' have {len(mean)} values but samples have "
            f"{x.shape[1]} channels (axis 1 of 'x')"
        )

    _check_inputs(arrays, ("x", "x_test") if has_test else ("x",), scale[0], mean, std, path)

    def tensor(values: np.ndarray) -> torch.Tensor:
        try:
            return torch.from_numpy(np.ascontiguousarray(values))
        except TypeError as exc:
            raise DataError(f"{path}: {values.dtype} arrays are not supported ({exc})") from exc

    return Dataset(
        name=name or path.stem,
        x_train=tensor(x_train),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=tensor(x_test),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        class_names=class_names,
        scale=scale[0],
        mean=mean,
        std=std,
        source=str(path),
    )
