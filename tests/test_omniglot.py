"""Omniglot: the real subsets under ../shared/data/omniglot, plus small synthetic folders."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clsim.data import Dataset, load_dataset
from clsim.data.omniglot import OMNIGLOT_MEAN, OMNIGLOT_STD, OMNIGLOT_ZIP_NAMES, load_omniglot
from clsim.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def omniglot_dir(shared_data_root: Path) -> Path:
    folder = shared_data_root / "omniglot"
    if not all((folder / name).is_file() for name in OMNIGLOT_ZIP_NAMES):
        pytest.fail(f"Omniglot zips {OMNIGLOT_ZIP_NAMES} not found in {folder}", pytrace=False)
    return folder


@pytest.fixture(scope="module")
def omniglot(omniglot_dir: Path) -> Dataset:
    start = time.perf_counter()
    data = load_omniglot(omniglot_dir)
    print(f"\nOmniglot: load {time.perf_counter() - start:.2f}s")
    return data


def _zip_characters(folder: Path) -> set[tuple[str, str]]:
    """(alphabet, character) pairs named by the PNG paths in the real zips."""
    pairs = set()
    for name in OMNIGLOT_ZIP_NAMES:
        with zipfile.ZipFile(folder / name) as archive:
            for member in archive.namelist():
                if member.endswith(".png"):
                    top, alphabet, character, _ = member.split("/")
                    pairs.add((alphabet, character))
    return pairs


def test_classes_and_alphabets_match_the_zip_paths(omniglot: Dataset, omniglot_dir: Path) -> None:
    pairs = _zip_characters(omniglot_dir)
    assert omniglot.n_classes == 242
    assert omniglot.class_names == tuple(f"{a}/{c}" for a, c in sorted(pairs))
    assert omniglot.coarse_names == tuple(sorted({a for a, _ in pairs}))
    assert len(omniglot.coarse_names) == 8
    assert omniglot.coarse_train is not None and omniglot.coarse_test is not None
    for y, coarse in (
        (omniglot.y_train, omniglot.coarse_train),
        (omniglot.y_test, omniglot.coarse_test),
    ):
        assert coarse.dtype == torch.int64 and coarse.shape == y.shape
        for label, parent in zip(y.tolist(), coarse.tolist(), strict=True):
            alphabet = omniglot.class_names[label].split("/")[0]
            assert omniglot.coarse_names[parent] == alphabet


def test_every_character_splits_15_5(omniglot: Dataset) -> None:
    n = omniglot.n_classes
    assert torch.equal(torch.bincount(omniglot.y_train, minlength=n), torch.full((n,), 15))
    assert torch.equal(torch.bincount(omniglot.y_test, minlength=n), torch.full((n,), 5))
    # ordered by class id within each split
    assert torch.equal(omniglot.y_train, omniglot.y_train.sort().values)
    assert torch.equal(omniglot.y_test, omniglot.y_test.sort().values)


def test_shapes_dtypes_and_ink_is_high(omniglot: Dataset) -> None:
    assert omniglot.name == "omniglot"
    assert omniglot.x_train.shape == (242 * 15, 1, 28, 28)
    assert omniglot.x_test.shape == (242 * 5, 1, 28, 28)
    assert omniglot.x_train.dtype == torch.uint8 and omniglot.y_train.dtype == torch.int64
    assert omniglot.sample_bytes == 28 * 28
    for x in (omniglot.x_train, omniglot.x_test):
        assert x.float().mean() < 40  # thin strokes on a zero background
        assert x.max() == 255
        # the border is paper: (mostly) zero
        assert x[:, :, 0, :].float().mean() < 5 and x[:, :, :, 0].float().mean() < 5
    assert omniglot.scale == pytest.approx(1 / 255)
    assert (omniglot.mean, omniglot.std) == (OMNIGLOT_MEAN, OMNIGLOT_STD)
    inputs = omniglot.to_input(omniglot.x_train)
    assert abs(inputs.mean().item()) < 0.05 and abs(inputs.std().item() - 1) < 0.05


def test_registry_loads_the_same_data(omniglot: Dataset, shared_data_root: Path) -> None:
    again = load_dataset("omniglot", root=shared_data_root)
    for field in ("x_train", "y_train", "x_test", "y_test", "coarse_train", "coarse_test"):
        assert torch.equal(getattr(again, field), getattr(omniglot, field)), field
    assert again.class_names == omniglot.class_names
    assert again.coarse_names == omniglot.coarse_names
    with pytest.raises(ConfigError, match="size"):
        load_dataset("omniglot", root=shared_data_root, resolution=32)


def test_missing_folder_names_the_expected_files(tmp_path: Path) -> None:
    for absent in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(DataError) as caught:
            load_omniglot(absent)
        message = str(caught.value)
        assert str(absent) in message
        for name in OMNIGLOT_ZIP_NAMES:
            assert name in message
    with pytest.raises(DataError, match="omniglot"):
        load_dataset("omniglot", root=tmp_path)


# --- small synthetic sets ------------------------------------------------------------


def _drawing(seed: int) -> bytes:
    """A 105x105 binary PNG: black strokes on white, like Omniglot's."""
    rng = np.random.default_rng(seed)
    image = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(image)
    draw.line([tuple(p) for p in rng.integers(5, 100, size=(4, 2)).tolist()], fill=0, width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_SMALL = {"Alpha": ("character01", "character02"), "Beta": ("character01",)}


def _members(n_drawings: int = 6) -> dict[str, bytes]:
    out = {}
    for i, (alphabet, characters) in enumerate(sorted(_SMALL.items())):
        for j, character in enumerate(characters):
            for k in range(n_drawings):
                out[f"{alphabet}/{character}/{i}{j}_{k + 1:02d}.png"] = _drawing(
                    100 * i + 10 * j + k
                )
    return out


def _write_zips(folder: Path, members: dict[str, bytes]) -> None:
    """Split the alphabets over the two zips, each under a top folder; Beta in both."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(OMNIGLOT_ZIP_NAMES):
        top = name.removesuffix(".zip")
        with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, data in members.items():
                if path.startswith("Beta/") or (n == 0) == path.startswith("Alpha/"):
                    archive.writestr(f"{top}/{path}", data)


def test_synthetic_zips_decode_exactly_and_split_by_seed(tmp_path: Path) -> None:
    members = _members()
    _write_zips(tmp_path, members)
    data = load_omniglot(tmp_path, size=105, test_per_class=2, seed=3)
    assert data.class_names == ("Alpha/character01", "Alpha/character02", "Beta/character01")
    assert data.coarse_names == ("Alpha", "Beta")
    assert data.coarse_train.tolist() == [0] * 8 + [1] * 4
    assert data.x_train.shape == (12, 1, 105, 105) and data.x_test.shape == (6, 1, 105, 105)
    # size 105 means no resize: pixels are the inverted PNG, ink 255, paper 0
    pngs = sorted(p for p in members if p.startswith("Beta/"))
    expected = {p: 255 - np.asarray(Image.open(io.BytesIO(members[p])).convert("L")) for p in pngs}
    beta = [x[0].numpy() for x in data.x_train[data.y_train == 2]] + [
        x[0].numpy() for x in data.x_test[data.y_test == 2]
    ]
    assert sorted(b.tobytes() for b in beta) == sorted(e.tobytes() for e in expected.values())
    assert set(np.unique(data.x_train.numpy()).tolist()) == {0, 255}

    same = load_omniglot(tmp_path, size=105, test_per_class=2, seed=3)
    assert torch.equal(same.x_test, data.x_test) and torch.equal(same.x_train, data.x_train)
    tests = {
        load_omniglot(tmp_path, size=105, test_per_class=2, seed=s).x_test.numpy().tobytes()
        for s in range(6)
    }
    assert len(tests) > 1  # the seed picks which drawings are held out

    small = load_omniglot(tmp_path, size=16, test_per_class=1)
    assert small.x_train.shape == (15, 1, 16, 16) and small.x_test.shape == (3, 1, 16, 16)


def test_extracted_folder_matches_the_zips(tmp_path: Path) -> None:
    members = _members()
    _write_zips(tmp_path / "zips", members)
    for path, data in members.items():
        file = tmp_path / "flat" / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
    from_zips = load_omniglot(tmp_path / "zips", size=28)
    from_folder = load_omniglot(tmp_path / "flat", size=28)
    assert from_folder.class_names == from_zips.class_names
    assert torch.equal(from_folder.x_train, from_zips.x_train)
    assert torch.equal(from_folder.coarse_test, from_zips.coarse_test)


def test_bad_sources_raise_data_errors(tmp_path: Path) -> None:
    members = _members()
    one = tmp_path / "one"
    _write_zips(one, members)
    (one / OMNIGLOT_ZIP_NAMES[1]).unlink()
    with pytest.raises(DataError, match=f"not {OMNIGLOT_ZIP_NAMES[1]}"):
        load_omniglot(one)

    broken = tmp_path / "broken"
    _write_zips(broken, members)
    (broken / OMNIGLOT_ZIP_NAMES[0]).write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="cannot open .* as a zip file"):
        load_omniglot(broken)

    conflict = tmp_path / "conflict"
    changed = dict(members)
    beta = next(p for p in members if p.startswith("Beta/"))
    _write_zips(conflict, members)
    changed[beta] = _drawing(999)
    with zipfile.ZipFile(conflict / OMNIGLOT_ZIP_NAMES[1], "a") as archive:
        archive.writestr(f"extra/{beta}", changed[beta])
    with pytest.raises(DataError, match="different contents"):
        load_omniglot(conflict)

    garbage = tmp_path / "garbage"
    _write_zips(garbage, {**members, "Alpha/character01/zz_99.png": b"\x89PNG broken"})
    with pytest.raises(DataError, match="zz_99.png .* not a readable image"):
        load_omniglot(garbage)

    few = tmp_path / "few"
    _write_zips(few, _members(n_drawings=3))
    with pytest.raises(DataError, match="has 3 drawings, too few for test_per_class=3"):
        load_omniglot(few, test_per_class=3)
    with pytest.raises(ConfigError, match="test_per_class must be an integer >= 1"):
        load_omniglot(few, test_per_class=0)
