"""Omniglot (alphabet -> character) from the ``images_background_small{1,2}.zip`` subsets.

Source: a folder holding both zips, or the same files extracted there. Inside, images sit
at ``<alphabet>/<character>/<file>.png``, optionally under one top-level folder (each zip
has one, ``images_background_smallN/``). The two zips overlap: Greek and Latin are in
both, byte for byte, so drawings are merged by ``<alphabet>/<character>/<file>`` and an
identical duplicate is read once; the same path with different bytes is a
:class:`~clsim.errors.DataError`. The shared subsets give 8 alphabets, 242 characters,
20 drawings each (4840 images).

* Classes: characters, named ``"<alphabet>/<character>"``, ids in sorted
  ``(alphabet, character)`` order, so the characters of one alphabet have consecutive ids.
* Coarse classes: alphabets, ``coarse_names`` sorted; ``coarse_*`` give each sample's
  alphabet.
* Pixels: each 105x105 binary PNG is read as grey (``L``), inverted so ink is 255 and
  paper 0, then resized to ``size x size`` with PIL's LANCZOS filter (antialiased; the
  usual Omniglot 28x28 preprocessing); ``size=105`` skips the resize. Stored uint8,
  shape ``(N, 1, size, size)``.
* Normalisation: ``scale = 1/255``, :data:`OMNIGLOT_MEAN` / :data:`OMNIGLOT_STD`,
  measured on the train split at the defaults (size 28, 5 test drawings, seed 0); thin
  strokes make the mean low (0.0842, std 0.2393). They are used for every ``size``: at
  105 (no resize, pure 0/255) the train split measures mean 0.0805, std 0.2721.
* Split: per character, ``test_per_class`` drawings go to test, chosen by a seeded
  permutation (one ``numpy.random.default_rng(seed)`` stream, drawn per character in
  class-id order over the file names sorted); the rest go to train. Within each split
  samples are ordered by class id, then file name, so the order never depends on the
  file system, the zip, or the permutation.

Decoding all 4840 PNGs takes about a second, so there is no cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from clsim.data.dataset import Dataset
from clsim.data.guards import (
    data_file,
    data_folder,
    decode_image,
    open_archive,
    present,
    read_bounded,
)
from clsim.data.images import is_image, is_junk
from clsim.data.limits import available_memory_bytes
from clsim.errors import ConfigError, DataError

OMNIGLOT_ZIP_NAMES: tuple[str, ...] = (
    "images_background_small1.zip",
    "images_background_small2.zip",
)
OMNIGLOT_SUBFOLDER = "omniglot"
# train split at size 28, test_per_class 5, seed 0 (ink = 1 after scaling)
OMNIGLOT_MEAN = (0.0842,)
OMNIGLOT_STD = (0.2393,)

_TITLE = "Omniglot"
_LAYOUT_HELP = (
    f"{' and '.join(OMNIGLOT_ZIP_NAMES)} (or their contents extracted), holding "
    "<alphabet>/<character>/<file>.png, optionally under one top-level folder"
)

# (alphabet, character, file name) -> (where it came from, a reader for its bytes)
_Key = tuple[str, str, str]
_Found = dict[_Key, tuple[str, Callable[[], bytes]]]


def _key_of(parts: list[str]) -> _Key | None:
    """``[top/]alphabet/character/file`` -> the key, or None for anything else."""
    if len(parts) not in (3, 4) or is_junk(parts) or not is_image(parts[-1]):
        return None
    if any(p == "" for p in parts):
        return None
    return parts[-3], parts[-2], parts[-1]


def _add(found: _Found, key: _Key, where: str, read: Callable[[], bytes]) -> None:
    """Record one drawing; a second copy must be byte-identical to the first."""
    if key not in found:
        found[key] = (where, read)
        return
    first_where, first_read = found[key]
    if first_read() != read():
        raise DataError(
            f"{_TITLE}: {'/'.join(key)} appears in both {first_where} and {where} "
            "with different contents"
        )


def _scan_zip(path: Path, found: _Found) -> int:
    archive = open_archive(path, _TITLE)
    count = 0
    for info in archive.zip.infolist():
        if info.is_dir():
            continue
        key = _key_of(info.filename.split("/"))
        if key is None:
            continue
        _add(found, key, f"{path}:{info.filename}", partial(archive.read, info))
        count += 1
    if count == 0:
        raise DataError(f"{_TITLE}: {path} holds no <alphabet>/<character>/<file>.png images")
    return count


def _scan_folder(folder: Path, found: _Found) -> int:
    count, room = 0, available_memory_bytes()  # read once, not per drawing
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_junk([d]))
        rel = Path(dirpath).relative_to(folder).parts
        if len(rel) >= 3:
            dirnames[:] = []  # [top/]alphabet/character/ is as deep as images go
        for name in filenames:
            key = _key_of([*rel, name])
            if key is None:
                continue
            file = data_file(Path(dirpath) / name, f"{_TITLE} image")  # not a pipe
            _add(found, key, str(file), partial(read_bounded, file, f"{_TITLE} image", room))
            count += 1
    return count


def _find_drawings(folder: Path) -> _Found:
    if not present(folder):
        raise DataError(f"{_TITLE} not found: {folder} does not exist (expected {_LAYOUT_HELP})")
    data_folder(folder, f"{_TITLE} folder")
    zips = [folder / name for name in OMNIGLOT_ZIP_NAMES]
    here = [data_file(z, f"{_TITLE} archive") for z in zips if present(z)]
    found: _Found = {}
    if here:
        missing = [z.name for z in zips if not present(z)]
        if missing:
            raise DataError(
                f"{_TITLE}: {folder} has {', '.join(z.name for z in here)} but not "
                f"{', '.join(missing)} (expected {_LAYOUT_HELP})"
            )
        for z in zips:
            _scan_zip(z, found)
        return found
    if _scan_folder(folder, found) == 0:
        raise DataError(
            f"{_TITLE} not found: {folder} has neither {' nor '.join(OMNIGLOT_ZIP_NAMES)} "
            f"nor extracted images (expected {_LAYOUT_HELP})"
        )
    return found


def _decode(key: _Key, where: str, data: bytes, size: int) -> np.ndarray:
    """One drawing as ink-high grey ``size x size`` (PIL's bomb limit bounds the decode)."""
    with decode_image(data, where, _TITLE) as image:
        try:
            grey = ImageOps.invert(image.convert("L"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{_TITLE}: {where} is not a readable image ({exc})") from exc
    if grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(grey, dtype=np.uint8)


def _stack(keys: Iterable[_Key], found: _Found, size: int) -> np.ndarray:
    keys = list(keys)
    out = np.empty((len(keys), 1, size, size), dtype=np.uint8)
    for i, key in enumerate(keys):
        where, read = found[key]
        out[i, 0] = _decode(key, where, read(), size)
    return out


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"dataset 'omniglot': {name} must be an integer >= {low}, not {value!r}")
    return value


def load_omniglot(
    folder: str | os.PathLike[str],
    *,
    size: int = 28,
    test_per_class: int = 5,
    seed: int = 0,
) -> Dataset:
    """Omniglot characters (fine) and alphabets (coarse), uint8 ``(N, 1, size, size)``.

    ``folder`` holds both ``images_background_small{1,2}.zip`` (or their extracted
    contents). Each character gives ``test_per_class`` drawings to test, picked by a
    permutation seeded with ``seed``, and the rest to train. Ink is 255, paper 0.
    """
    size = _check_int("size", size, 1)
    test_per_class = _check_int("test_per_class", test_per_class, 1)
    seed = _check_int("seed", seed, 0)
    folder = Path(folder).expanduser()
    found = _find_drawings(folder)

    by_class: dict[tuple[str, str], list[str]] = {}
    for alphabet, character, file in found:
        by_class.setdefault((alphabet, character), []).append(file)
    classes = sorted(by_class)
    alphabets = sorted({alphabet for alphabet, _ in classes})
    alphabet_id = {a: i for i, a in enumerate(alphabets)}

    rng = np.random.default_rng(seed)
    split_keys: dict[str, list[_Key]] = {"train": [], "test": []}
    split_labels: dict[str, list[int]] = {"train": [], "test": []}
    for label, (alphabet, character) in enumerate(classes):
        files = sorted(by_class[(alphabet, character)])
        if len(files) <= test_per_class:
            raise DataError(
                f"{_TITLE}: {alphabet}/{character} in {folder} has {len(files)} drawings, "
                f"too few for test_per_class={test_per_class} and at least one train drawing"
            )
        test_idx = set(rng.permutation(len(files))[:test_per_class].tolist())
        for i, file in enumerate(files):
            split = "test" if i in test_idx else "train"
            split_keys[split].append((alphabet, character, file))
            split_labels[split].append(label)

    coarse_of_class = torch.tensor([alphabet_id[a] for a, _ in classes], dtype=torch.int64)
    y = {s: torch.tensor(split_labels[s], dtype=torch.int64) for s in split_keys}
    x = {s: torch.from_numpy(_stack(split_keys[s], found, size)) for s in split_keys}
    return Dataset(
        name="omniglot",
        x_train=x["train"],
        y_train=y["train"],
        x_test=x["test"],
        y_test=y["test"],
        class_names=tuple(f"{a}/{c}" for a, c in classes),
        scale=1.0 / 255.0,
        mean=OMNIGLOT_MEAN,
        std=OMNIGLOT_STD,
        coarse_train=coarse_of_class[y["train"]],
        coarse_test=coarse_of_class[y["test"]],
        coarse_names=tuple(alphabets),
        source=str(folder),
    )
