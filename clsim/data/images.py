"""CIFAR-10 (and any image set laid out the same way) from a zip or an extracted folder.

Layout: ``train/<class>/<image>`` and ``test/<class>/<image>`` (``.jpg``, ``.jpeg`` or
``.png``), optionally under one top-level folder. Class ids are the class folder names
sorted alphabetically, except that a class set equal to a known canonical one (CIFAR-10's)
takes the canonical order; for CIFAR-10 both orders agree. Within a class, images are
sorted by file name, so the sample order never depends on the file system or the zip.

Decoding 60k small JPEGs takes seconds, so the decoded arrays are cached as an ``.npz`` in
``$CLSIM_CACHE`` (default ``~/.cache/clsim``), one file per source path, stamped with the
source's size and modification time: a changed source, a stale or a damaged cache file
just rebuilds it. Decoding is serial on purpose: with images this small, Python overhead
dominates and threads measured slower than one loop.
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.data.guards import PIL_FORMATS as PIL_FORMATS  # where tests and users find it
from clsim.data.guards import (
    check_npz,
    data_file,
    decode_image,
    open_archive,
    present,
    read_bounded,
)
from clsim.data.limits import available_memory_bytes, require_memory
from clsim.errors import DataError, ResultsWriteError

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_ZIP_NAME = "cifar10-jpeg.zip"

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
SPLITS = ("train", "test")
_MODE_CHANNELS = {"L": 1, "RGB": 3}
# bump when the cached arrays' meaning changes, so old cache files rebuild
_CACHE_VERSION = 1
_LAYOUT_HELP = (
    "train/<class>/<image> and test/<class>/<image> with .jpg, .jpeg or .png images, "
    "optionally under one top-level folder"
)


def default_cache_dir() -> Path:
    """``$CLSIM_CACHE`` if set, else ``~/.cache/clsim``."""
    env = os.environ.get("CLSIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clsim"


def order_classes(names: Sequence[str], canonical: Sequence[str] | None = None) -> tuple[str, ...]:
    """Class ids: the canonical order when the set matches it, else alphabetical."""
    if (
        canonical is not None
        and set(names) == set(canonical)
        and len(canonical) == len(set(canonical))
    ):
        return tuple(canonical)
    return tuple(sorted(set(names)))


@dataclass(frozen=True)
class _Entry:
    split: str
    label: str
    member: str  # path inside the zip, or relative to the folder


@dataclass(frozen=True)
class _Listing:
    """What an image source holds and how to read one entry's bytes."""

    source: Path
    entries: tuple[_Entry, ...]
    read: Callable[[_Entry], bytes]


@dataclass(frozen=True)
class _Source:
    """An image source: a cache key that is cheap to compute, and a way to list it."""

    path: Path
    cache_key: str
    open: Callable[[], _Listing]


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def is_junk(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _sorted_entries(entries: list[_Entry]) -> tuple[_Entry, ...]:
    return tuple(sorted(entries, key=lambda e: (e.split, e.label, e.member)))


def _key(*parts: object) -> str:
    text = "\x1f".join(str(p) for p in (_CACHE_VERSION, *parts))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _zip_source(path: Path, title: str) -> _Source:
    """Key a zip on its path, size and mtime, so a cache hit never reads the archive."""
    data_file(path, f"{title} archive")
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"{title}: cannot read {path} ({exc})") from exc
    return _Source(
        path=path,
        cache_key=_key("zip", path.resolve(), stat.st_size, stat.st_mtime_ns),
        open=lambda: _list_zip(path, title),
    )


def _list_zip(path: Path, title: str) -> _Listing:
    # one read of the whole archive: far faster than a seek per member
    archive = open_archive(path, title)
    raw, infos = archive.raw, archive.zip.infolist()

    by_prefix: dict[str, list[tuple[_Entry, zipfile.ZipInfo]]] = {}
    for info in infos:
        parts = info.filename.split("/")
        if info.is_dir() or len(parts) < 3 or is_junk(parts) or not is_image(parts[-1]):
            continue
        split = parts[-3]
        if split not in SPLITS:
            continue
        prefix = "/".join(parts[:-3])
        entry = _Entry(split=split, label=parts[-2], member=info.filename)
        by_prefix.setdefault(prefix, []).append((entry, info))
    complete = {
        prefix: items
        for prefix, items in by_prefix.items()
        if {e.split for e, _ in items} == set(SPLITS) and prefix.count("/") == 0
    }
    if not complete:
        raise DataError(f"{title}: {path} does not hold {_LAYOUT_HELP}")
    if len(complete) > 1:
        tops = ", ".join(sorted(p + "/" if p else "(top level)" for p in complete))
        raise DataError(f"{title}: {path} holds more than one train/ and test/ set: {tops}")
    items = next(iter(complete.values()))
    infos_by_member = {entry.member: info for entry, info in items}

    def read(entry: _Entry) -> bytes:
        info = infos_by_member[entry.member]
        start = info.header_offset
        if info.compress_type == zipfile.ZIP_STORED and raw[start : start + 4] == b"PK\x03\x04":
            # stored member: slice the archive bytes, skipping zipfile's per-member overhead
            name_len, extra_len = struct.unpack("<HH", raw[start + 26 : start + 30])
            begin = start + 30 + name_len + extra_len
            data = raw[begin : begin + info.compress_size]
            if zlib.crc32(data) == info.CRC:
                return data
        # compressed, or a damaged stored member: let zipfile read it and say what is wrong
        return archive.read(info)

    return _Listing(source=path, entries=_sorted_entries([entry for entry, _ in items]), read=read)


def _split_root(folder: Path) -> Path | None:
    """The folder that holds train/ and test/: ``folder`` itself or its only subfolder."""
    if all((folder / s).is_dir() for s in SPLITS):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not is_junk([p.name])]
    if len(subdirs) == 1 and all((subdirs[0] / s).is_dir() for s in SPLITS):
        return subdirs[0]
    return None


def _folder_source(folder: Path, title: str) -> _Source:
    """Key a folder on every image's name, size and mtime (one stat per file)."""
    base = _split_root(folder)
    if base is None:
        raise DataError(f"{title}: {folder} does not hold {_LAYOUT_HELP}")
    entries: list[_Entry] = []
    stamps: list[str] = []
    for split in SPLITS:
        for class_dir in os.scandir(base / split):
            if not class_dir.is_dir() or class_dir.name.startswith("."):
                continue
            for item in os.scandir(class_dir.path):
                if item.name.startswith(".") or not is_image(item.name):
                    continue
                data_file(item.path, f"{title} image")  # a pipe named .png would block
                member = f"{split}/{class_dir.name}/{item.name}"
                entries.append(_Entry(split=split, label=class_dir.name, member=member))
                st = item.stat()
                stamps.append(f"{member}:{st.st_size}:{st.st_mtime_ns}")

    room = available_memory_bytes()

    def read(entry: _Entry) -> bytes:
        return read_bounded(base / entry.member, f"{title} image", room)

    stamps.sort()
    listing = _Listing(source=base, entries=_sorted_entries(entries), read=read)
    return _Source(
        path=base, cache_key=_key("folder", base.resolve(), *stamps), open=lambda: listing
    )


def _size_check(where: str, title: str, n: int, channels: int,
                size: tuple[int, int] | None) -> Callable[[tuple[int, int]], None]:
    """What an image's header must pass before its pixels decode: the first sizes the
    array of all ``n`` (which must fit in memory), every other must match it."""

    def check(image_size: tuple[int, int]) -> None:
        width, height = image_size
        if size is None:
            require_memory(n * channels * width * height, f"{title}: {where} is "
                           f"{width}x{height} pixels, so {n} images of {channels} channels need")
        elif image_size != size:
            raise DataError(
                f"{title}: {where} is {width}x{height} but earlier images are "
                f"{size[0]}x{size[1]}; every image must have the same size"
            )

    return check


def _decode(listing: _Listing, entries: Sequence[_Entry], mode: str, title: str) -> np.ndarray:
    """Decode ``entries`` into a uint8 (N, C, H, W) array; every image must share one size."""
    channels = _MODE_CHANNELS[mode]
    out: np.ndarray | None = None
    size: tuple[int, int] | None = None
    for i, entry in enumerate(entries):
        where = f"{entry.member} in {listing.source}"
        check = _size_check(where, title, len(entries), channels, size)
        with decode_image(listing.read(entry), where, title, check) as image:
            pixels = (image if image.mode == mode else image.convert(mode)).tobytes()
            size = image.size
        if out is None:
            out = np.empty((len(entries), size[1], size[0], channels), dtype=np.uint8)
        out[i] = np.frombuffer(pixels, dtype=np.uint8).reshape(out.shape[1:])
    if out is None:
        return np.empty((0, channels, 0, 0), dtype=np.uint8)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _build_arrays(
    listing: _Listing, mode: str, canonical: Sequence[str] | None, title: str
) -> dict[str, np.ndarray]:
    train_labels = {e.label for e in listing.entries if e.split == "train"}
    test_labels = {e.label for e in listing.entries if e.split == "test"}
    if not train_labels or not test_labels:
        raise DataError(f"{title}: {listing.source} has no images under train/ or test/")
    unknown = sorted(test_labels - train_labels)
    if unknown:
        raise DataError(
            f"{title}: {listing.source} has test classes with no train images: {', '.join(unknown)}"
        )
    class_names = order_classes(sorted(train_labels), canonical)
    class_id = {c: i for i, c in enumerate(class_names)}
    # entries are sorted by folder name; reorder by class id, then file name
    ordered = sorted(listing.entries, key=lambda e: (e.split, class_id[e.label], e.member))
    arrays: dict[str, np.ndarray] = {"class_names": np.array(class_names, dtype=np.str_)}
    for split in SPLITS:
        entries = [e for e in ordered if e.split == split]
        arrays[f"x_{split}"] = _decode(listing, entries, mode, title)
        arrays[f"y_{split}"] = np.array([class_id[e.label] for e in entries], dtype=np.int64)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{title}: {listing.source} has train images of shape "
            f"{arrays['x_train'].shape[1:]} but test images of shape "
            f"{arrays['x_test'].shape[1:]}"
        )
    return arrays


def _cache_path(cache_dir: Path, name: str, source: Path) -> Path:
    tag = hashlib.sha256(str(source.resolve()).encode("utf-8")).hexdigest()[:16]
    return cache_dir / f"{name}-{tag}.npz"


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if the file exists, matches ``key`` and is sound; else None."""
    if not path.is_file():
        return None
    try:
        check_npz(path)  # a damaged cache declaring absurd arrays is rebuilt, not loaded
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["cache_key"]) != key:
                return None
            arrays = {
                k: stored[k] for k in ("x_train", "y_train", "x_test", "y_test", "class_names")
            }
    except (DataError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error,
            NotImplementedError, RuntimeError):
        return None
    n_classes = len(arrays["class_names"])
    for split in SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != x.shape[:1]:
            return None
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            return None
    return arrays


def _write_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (:func:`clsim.results.write_atomic`); a cache that cannot be
    written is only a warning."""
    from clsim.results import write_atomic  # clsim.results is not needed to read data

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda handle: np.savez(handle, cache_key=np.array(key), **arrays))
    except (OSError, ResultsWriteError) as exc:
        reason = exc.__context__ if isinstance(exc, ResultsWriteError) else exc
        shown = getattr(reason, "strerror", None) or reason or type(exc).__name__
        warnings.warn(f"clsim: could not write the dataset cache {path}: {shown}",
                      stacklevel=3)


def _find_zip(folder: Path, preferred: str | None, title: str) -> Path | None:
    """The one zip in ``folder`` (``preferred`` first); a pipe or a device named like a
    zip is refused, not skipped."""
    if preferred and present(folder / preferred):
        return data_file(folder / preferred, f"{title} archive")
    zips = sorted(p for p in folder.glob("*.zip") if not p.is_dir())
    for path in zips:
        data_file(path, f"{title} archive")
    if len(zips) > 1:
        names = ", ".join(p.name for p in zips)
        raise DataError(
            f"{folder} holds several zip files ({names}); "
            f"expected one{f' (or {preferred})' if preferred else ''}"
        )
    return zips[0] if zips else None


def _source_for(source: Path, title: str, preferred_zip: str | None) -> _Source:
    if present(source) and not source.is_dir():
        return _zip_source(source, title)  # a regular file, or refused naming what it is
    if not source.is_dir():
        raise DataError(
            f"{title} not found: {source} does not exist "
            f"(expected {preferred_zip or 'a .zip file'} or a folder holding {_LAYOUT_HELP})"
        )
    archive = _find_zip(source, preferred_zip, title)
    if archive is not None:
        return _zip_source(archive, title)
    if _split_root(source) is None:
        raise DataError(
            f"{title} not found: {source} has no {preferred_zip or '.zip file'} and no "
            f"train/ and test/ folders (expected {preferred_zip or 'a .zip'} holding, or "
            f"the folder itself holding, {_LAYOUT_HELP})"
        )
    return _folder_source(source, title)


def load_image_folder(
    source: str | os.PathLike[str],
    *,
    name: str = "images",
    title: str | None = None,
    mode: str = "RGB",
    canonical_classes: Sequence[str] | None = None,
    mean: tuple[float, ...] = (0.0,),
    std: tuple[float, ...] = (1.0,),
    preferred_zip: str | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load ``train/<class>/<image>`` and ``test/<class>/<image>`` from a zip or a folder.

    ``source`` is a zip file, a folder holding one zip (``preferred_zip`` wins if there
    are several), or a folder holding ``train/`` and ``test/`` (directly or in its only
    subfolder). Pixels stay uint8, shape (N, C, H, W); ``mode`` is ``"RGB"`` or ``"L"``.
    """
    title = title or name
    if mode not in _MODE_CHANNELS:
        modes = sorted(_MODE_CHANNELS)
        raise DataError(f"{title}: image mode must be one of {modes}, not {mode!r}")
    found = _source_for(Path(source).expanduser(), title, preferred_zip)
    key = _key(found.cache_key, mode, tuple(canonical_classes or ()))
    arrays: dict[str, np.ndarray] | None = None
    cache_file: Path | None = None
    if cache:
        cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_file = _cache_path(cache_root, name, found.path)
        arrays = _read_cache(cache_file, key)
    if arrays is None:
        arrays = _build_arrays(found.open(), mode, canonical_classes, title)
        if cache_file is not None:
            _write_cache(cache_file, key, arrays)
    return Dataset(
        name=name,
        x_train=torch.from_numpy(arrays["x_train"]),
        y_train=torch.from_numpy(arrays["y_train"]),
        x_test=torch.from_numpy(arrays["x_test"]),
        y_test=torch.from_numpy(arrays["y_test"]),
        class_names=tuple(str(c) for c in arrays["class_names"]),
        scale=1.0 / 255.0,
        mean=mean,
        std=std,
        source=str(found.path),
    )


def load_cifar10(
    source: str | os.PathLike[str],
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """CIFAR-10 (50k/10k, 3x32x32 uint8) from ``cifar10-jpeg.zip``, another zip, or a folder."""
    return load_image_folder(
        source,
        name="cifar10",
        title="CIFAR-10",
        mode="RGB",
        canonical_classes=CIFAR10_CLASSES,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        preferred_zip=CIFAR10_ZIP_NAME,
        cache=cache,
        cache_dir=cache_dir,
    )
