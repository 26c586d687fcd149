"""Dataset loaders: the real files under shared/data, and small files written here."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clsim.data import Dataset, dataset_names, load_dataset, resolve_data_root
from clsim.data import images as images_module
from clsim.data.cifar100 import load_cifar100
from clsim.data.idx import read_idx
from clsim.data.images import CIFAR10_CLASSES, default_cache_dir, load_image_folder
from clsim.data.npz import load_npz, stratified_split
from clsim.errors import ConfigError, DataError

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _check_common(ds: Dataset, n_train: int, n_test: int, shape: tuple[int, ...]) -> None:
    assert ds.x_train.shape == (n_train, *shape)
    assert ds.x_test.shape == (n_test, *shape)
    assert ds.x_train.dtype == torch.uint8 and ds.x_test.dtype == torch.uint8
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert int(ds.y_train.min()) >= 0 and int(ds.y_train.max()) < ds.n_classes
    assert ds.sample_shape == shape


# --------------------------------------------------------------------------- digits


def test_digits_shape_dtype_range_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLSIM_DATA", raising=False)  # the embedded default needs no root
    ds = load_dataset("digits")
    _check_common(ds, 1346, 451, (1, 8, 8))
    assert ds.name == "digits"
    assert ds.class_names == tuple(str(d) for d in range(10))
    assert ds.scale == 1 / 16
    assert int(ds.x_train.max()) == 16 and int(ds.x_test.max()) <= 16
    # stratified: every class has about a quarter of its samples in test
    train_counts = torch.bincount(ds.y_train, minlength=10)
    test_counts = torch.bincount(ds.y_test, minlength=10)
    fraction = test_counts.double() / (train_counts + test_counts).double()
    assert torch.all((fraction - 0.25).abs() < 0.01)
    x = ds.to_input(ds.x_train)
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 0.01


def test_digits_split_is_deterministic_and_pinned() -> None:
    first, second = load_dataset("digits"), load_dataset("digits")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    # pinned: changing the split would silently change every digits result
    assert torch.bincount(first.y_test).tolist() == [45, 46, 44, 46, 45, 46, 45, 45, 44, 45]
    assert _sha(first.y_test)[:16] == DIGITS_Y_TEST_SHA
    # train and test together are exactly sklearn's 1797 samples
    from sklearn.datasets import load_digits as sk_digits

    ref = np.sort(sk_digits().images.astype(np.uint8).reshape(1797, -1), axis=0)
    mine = torch.cat([first.x_train, first.x_test]).reshape(1797, -1).numpy()
    assert np.array_equal(np.sort(mine, axis=0), ref)


DIGITS_Y_TEST_SHA = "75233989ca8cd956"


def test_stratified_split_properties() -> None:
    y = np.repeat(np.arange(5), [10, 20, 3, 1, 40])
    train, test = stratified_split(y, 0.25, seed=7)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert np.bincount(y[test], minlength=5).tolist() == [3, 5, 1, 0, 10]
    again_train, again_test = stratified_split(y, 0.25, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    _, other_test = stratified_split(y, 0.25, seed=8)
    assert not np.array_equal(test, other_test)
    with pytest.raises(DataError, match="test_fraction"):
        stratified_split(y, 1.0, seed=0)


# --------------------------------------------------------------------------- MNIST family


def test_mnist_real_files(shared_data_root: Path) -> None:
    ds = load_dataset("mnist", root=shared_data_root)
    _check_common(ds, 60000, 10000, (1, 28, 28))
    assert ds.class_names == tuple(str(d) for d in range(10))
    assert torch.bincount(ds.y_train).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]  # fmt: skip
    assert torch.bincount(ds.y_test).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert int(ds.x_train.sum()) == 1567298545
    assert int(ds.x_test.sum()) == 264923200
    assert _sha(ds.x_train[0]) == (
        "23ceaef5eb61f0e70d64ac18fdf0f60df3d5971cf30bbadac7b6ebf07f782d2c"
    )
    assert (ds.scale, ds.mean, ds.std) == (1 / 255, (0.1307,), (0.3081,))
    assert ds.source == str(shared_data_root / "mnist")
    normalised = ds.to_input(ds.x_train[:20000])
    assert abs(float(normalised.mean())) < 0.02 and abs(float(normalised.std()) - 1) < 0.02


def test_fashion_mnist_real_files(shared_data_root: Path) -> None:
    ds = load_dataset("fashion_mnist", root=shared_data_root)
    _check_common(ds, 60000, 10000, (1, 28, 28))
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert len(set(ds.class_names)) == 10
    assert ds.y_train[:5].tolist() == [9, 0, 0, 3, 0]
    assert int(ds.x_train.sum()) == 3431114169
    assert int(ds.x_test.sum()) == 573469082
    assert (ds.mean, ds.std) == ((0.2860,), (0.3530,))


def test_idx_plain_and_gzip_agree(shared_data_root: Path, tmp_path: Path) -> None:
    gz = shared_data_root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    assert np.array_equal(read_idx(gz), read_idx(plain))


def _idx_bytes(values: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, values.ndim]) + np.array(values.shape, dtype=">u4").tobytes()
    return header + values.astype(np.uint8).tobytes()


def _write_small_mnist(folder: Path, *, gzip_some: bool = True) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    arrays = (
        rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 12, dtype=np.uint8),
        rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 5, dtype=np.uint8),
    )
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, values) in enumerate(zip(IDX_FILES, arrays, strict=True)):
        data = _idx_bytes(values)
        if gzip_some and i % 2 == 0:
            (folder / name).write_bytes(gzip.compress(data))
        else:
            (folder / name.removesuffix(".gz")).write_bytes(data)
    return arrays


def test_idx_loader_accepts_uncompressed_files(tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = _write_small_mnist(tmp_path / "mnist")
    ds = load_dataset("mnist", root=tmp_path)
    assert np.array_equal(ds.x_train.numpy()[:, 0], x_train)
    assert np.array_equal(ds.y_train.numpy(), y_train)
    assert np.array_equal(ds.x_test.numpy()[:, 0], x_test)
    assert np.array_equal(ds.y_test.numpy(), y_test)


def test_idx_bad_magic_and_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 12)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)
    broken_gz = tmp_path / "broken.gz"
    noise = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    broken_gz.write_bytes(gzip.compress(noise)[:300])
    with pytest.raises(DataError, match="gzip"):
        read_idx(broken_gz)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    _write_small_mnist(folder, gzip_some=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([0, 1, 2, 3, 10])))
    with pytest.raises(DataError, match=r"outside \[0, 10\)"):
        load_dataset("mnist", root=tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    _write_small_mnist(folder, gzip_some=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([0, 1, 2])))
    with pytest.raises(DataError, match="5 images but .* 3 labels"):
        load_dataset("mnist", root=tmp_path)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="session")
def cifar10_loads(
    shared_data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Dataset, Dataset, Path, float, float]:
    """Decode the real zip once per session into a private cache, then load it again."""
    cache = tmp_path_factory.mktemp("clsim-cache")
    start = time.perf_counter()
    first = load_dataset("cifar10", root=shared_data_root, cache_dir=cache)
    decoded = time.perf_counter() - start
    start = time.perf_counter()
    second = load_dataset("cifar10", root=shared_data_root, cache_dir=cache)
    cached = time.perf_counter() - start
    print(f"\nCIFAR-10: decode {decoded:.2f}s, cached load {cached:.2f}s")
    return first, second, cache, decoded, cached


def test_cifar10_real_zip(cifar10_loads: tuple[Dataset, Dataset, Path, float, float]) -> None:
    ds = cifar10_loads[0]
    _check_common(ds, 50000, 10000, (3, 32, 32))
    assert ds.class_names == CIFAR10_CLASSES
    assert torch.bincount(ds.y_train).tolist() == [5000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    # samples come class by class, files sorted by name
    assert torch.equal(ds.y_train, torch.arange(10).repeat_interleave(5000))
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    channel_mean = ds.x_train[::5].double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(channel_mean, torch.tensor([0.49, 0.48, 0.45]).double(), atol=0.03)
    assert ds.source.endswith("cifar10-jpeg.zip")


def test_cifar10_cache_hit_gives_identical_tensors(
    cifar10_loads: tuple[Dataset, Dataset, Path, float, float],
) -> None:
    first, second, cache, _, _ = cifar10_loads
    assert len(list(cache.glob("cifar10-*.npz"))) == 1
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert first.class_names == second.class_names


def test_cifar10_first_image_matches_direct_decode(
    shared_data_root: Path, cifar10_loads: tuple[Dataset, Dataset, Path, float, float]
) -> None:
    ds = cifar10_loads[0]
    with zipfile.ZipFile(shared_data_root / "cifar10" / "cifar10-jpeg.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("test/truck/"))
        image = Image.open(io.BytesIO(archive.read(names[-1]))).convert("RGB")
    expected = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
    assert torch.equal(ds.x_test[-1], expected)


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLSIM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CLSIM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "clsim"


# --------------------------------------------------------------------------- image folders


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _small_images() -> dict[str, np.ndarray]:
    """member -> HWC pixels: two classes named so alphabetical order differs from listing."""
    rng = np.random.default_rng(1)
    members = {}
    for split, n in (("train", 3), ("test", 2)):
        for label in ("zebra", "ant"):
            for i in range(n):
                members[f"{split}/{label}/{i:02d}.png"] = rng.integers(
                    0, 256, (6, 5, 3), dtype=np.uint8
                )
    return members


def _write_zip(path: Path, members: dict[str, np.ndarray], prefix: str = "") -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, pixels in reversed(list(members.items())):
            archive.writestr(prefix + member, _png(pixels))
        archive.writestr(prefix + "train/ant/notes.txt", "not an image")
        archive.writestr("__MACOSX/._junk.png", b"junk")


def _expected(members: dict[str, np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(k for k in members if k.startswith(split + "/"))  # ant < zebra, by file
    x = np.stack([members[k].transpose(2, 0, 1) for k in keys])
    y = np.array([0 if "/ant/" in k else 1 for k in keys])
    return x, y


@pytest.mark.parametrize("prefix", ["", "cifar-like/"])
def test_image_zip_exact_pixels_and_alphabetical_classes(tmp_path: Path, prefix: str) -> None:
    members = _small_images()
    _write_zip(tmp_path / "set.zip", members, prefix)
    ds = load_image_folder(tmp_path / "set.zip", name="small", cache_dir=tmp_path / "cache")
    assert ds.class_names == ("ant", "zebra")
    for split in ("train", "test"):
        x, y = _expected(members, split)
        assert np.array_equal(getattr(ds, f"x_{split}").numpy(), x)
        assert np.array_equal(getattr(ds, f"y_{split}").numpy(), y)


def test_image_folder_matches_zip(tmp_path: Path) -> None:
    members = _small_images()
    _write_zip(tmp_path / "set.zip", members)
    extracted = tmp_path / "extracted"
    for member, pixels in members.items():
        (extracted / member).parent.mkdir(parents=True, exist_ok=True)
        (extracted / member).write_bytes(_png(pixels))
    from_zip = load_image_folder(tmp_path / "set.zip", cache=False)
    from_folder = load_image_folder(extracted, cache=False)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(from_zip, name), getattr(from_folder, name))


def test_canonical_cifar10_order_wins_over_alphabetical() -> None:
    shuffled = list(reversed(CIFAR10_CLASSES))
    assert images_module.order_classes(shuffled, CIFAR10_CLASSES) == CIFAR10_CLASSES
    assert images_module.order_classes(["b", "a"], CIFAR10_CLASSES) == ("a", "b")


def test_image_cache_rebuilds_on_corruption_and_source_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = _small_images()
    source = tmp_path / "set.zip"
    _write_zip(source, members)
    cache = tmp_path / "cache"
    builds = []
    real_build = images_module._build_arrays

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(images_module, "_build_arrays", counting_build)

    def load() -> Dataset:
        return load_image_folder(source, name="small", cache_dir=cache)

    reference = load()
    (cache_file,) = cache.glob("small-*.npz")
    assert len(builds) == 1
    assert torch.equal(load().x_train, reference.x_train) and len(builds) == 1  # hit
    cache_file.write_bytes(b"garbage")
    assert torch.equal(load().x_train, reference.x_train) and len(builds) == 2  # corrupt
    assert torch.equal(load().x_train, reference.x_train) and len(builds) == 2  # rewritten
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert torch.equal(load().x_train, reference.x_train) and len(builds) == 3  # changed
    assert list(cache.glob("small-*.npz")) == [cache_file]  # replaced, not accumulated
    load_image_folder(source, name="small", cache=False)
    assert len(builds) == 4


def test_image_errors(tmp_path: Path) -> None:
    no_layout = tmp_path / "flat.zip"
    with zipfile.ZipFile(no_layout, "w") as archive:
        archive.writestr("a/b.png", _png(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(DataError, match="train/<class>/<image>"):
        load_image_folder(no_layout, cache=False)

    mixed = _small_images()
    mixed["train/ant/99.png"] = np.zeros((7, 7, 3), np.uint8)
    _write_zip(tmp_path / "mixed.zip", mixed)
    with pytest.raises(DataError, match="same size"):
        load_image_folder(tmp_path / "mixed.zip", cache=False)

    broken = tmp_path / "broken.zip"
    members = _small_images()
    _write_zip(broken, members)
    with zipfile.ZipFile(broken, "a") as archive:
        archive.writestr("train/ant/50.jpg", b"not a jpeg at all")
    with pytest.raises(DataError, match="train/ant/50.jpg"):
        load_image_folder(broken, cache=False)

    stored = tmp_path / "stored.zip"
    with zipfile.ZipFile(stored, "w", compression=zipfile.ZIP_STORED) as archive:
        for member, pixels in _small_images().items():
            archive.writestr(member, _png(pixels))
    damaged = bytearray(stored.read_bytes())
    damaged[damaged.index(b"IHDR") + 6] ^= 0xFF  # inside the first stored member
    stored.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="CRC"):
        load_image_folder(stored, cache=False)

    not_zip = tmp_path / "not.zip"
    not_zip.write_bytes(b"hello")
    with pytest.raises(DataError, match="zip"):
        load_image_folder(not_zip, cache=False)


def test_unwritable_cache_only_warns(tmp_path: Path) -> None:
    members = _small_images()
    _write_zip(tmp_path / "set.zip", members)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("in the way")
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        ds = load_image_folder(tmp_path / "set.zip", cache_dir=blocker)
    assert ds.class_names == ("ant", "zebra")


# --------------------------------------------------------------------------- CIFAR-100

FINE = ("apple", "aquarium_fish", "baby", "bear", "beaver", "bed")
COARSE = ("fruit_and_vegetables", "fish", "people", "large_omnivores", "aquatic_mammals")
FINE_TO_COARSE = (0, 1, 2, 3, 4, 4)


def _cifar100_split(n: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, len(FINE), n).tolist()
    return {
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": fine,
        b"coarse_labels": [FINE_TO_COARSE[f] for f in fine],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def _write_cifar100(folder: Path, protocol: int = 2) -> dict[str, dict[bytes, object]]:
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": _cifar100_split(9, 0), "test": _cifar100_split(4, 1)}
    meta = {
        b"fine_label_names": [n.encode() for n in FINE],
        b"coarse_label_names": [n.encode() for n in COARSE],
    }
    for name, record in (*splits.items(), ("meta", meta)):
        (folder / name).write_bytes(pickle.dumps(record, protocol=protocol))
    return splits


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("layout", ["cifar100", "cifar100/cifar-100-python", "cifar-100-python"])
def test_cifar100_pickles(tmp_path: Path, protocol: int, layout: str) -> None:
    splits = _write_cifar100(tmp_path / layout, protocol)
    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.class_names == FINE and ds.coarse_names == COARSE
    assert ds.source == str(tmp_path / layout)
    for split, record in splits.items():
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        coarse = getattr(ds, f"coarse_{split}")
        assert x.dtype == torch.uint8 and x.shape == (len(y), 3, 32, 32)
        assert y.tolist() == record[b"fine_labels"]
        assert coarse is not None and coarse.dtype == torch.int64
        assert coarse.tolist() == record[b"coarse_labels"]
        data = record[b"data"]
        assert isinstance(data, np.ndarray)
        # channel-major: red plane, then green, then blue, each row by row
        assert int(x[1, 2, 3, 4]) == int(data[1, 2 * 1024 + 3 * 32 + 4])
        assert np.array_equal(x.reshape(len(y), -1).numpy(), data)
    assert len(ds.mean) == 3 and ds.scale == 1 / 255


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_cifar100_refuses_pickles_with_globals(tmp_path: Path, payload: str) -> None:
    folder = tmp_path / "cifar100"
    _write_cifar100(folder)
    marker = tmp_path / "pwned"
    record = _cifar100_split(3, 0)
    record[b"data"] = _Exploit(marker) if payload == "os.system" else _Eval()
    (folder / "train").write_bytes(pickle.dumps(record, protocol=2))
    with pytest.raises(DataError, match="plain data and numpy arrays") as caught:
        load_dataset("cifar100", root=tmp_path)
    assert str(folder / "train") in str(caught.value)
    assert not marker.exists()


def test_cifar100_malformed(tmp_path: Path) -> None:
    folder = tmp_path / "cifar100"
    splits = _write_cifar100(folder)
    record = dict(splits["test"])
    record[b"fine_labels"] = [0, 1, 2, len(FINE)]
    (folder / "test").write_bytes(pickle.dumps(record))
    with pytest.raises(DataError, match="fine_labels"):
        load_cifar100(folder)
    record[b"fine_labels"] = [0, 1, 2, 3]
    del record[b"coarse_labels"]
    (folder / "test").write_bytes(pickle.dumps(record))
    with pytest.raises(DataError, match="coarse_labels"):
        load_cifar100(folder)
    (folder / "test").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(DataError, match=str(folder / "test")):
        load_cifar100(folder)


# --------------------------------------------------------------------------- npz


def test_npz_round_trip_with_test_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.normal(size=(20, 7)).astype(np.float32),
        "y": rng.integers(0, 3, 20),
        "x_test": rng.normal(size=(6, 7)).astype(np.float32),
        "y_test": rng.integers(0, 3, 6).astype(np.int32),
        "class_names": np.array(["cat", "dog", "emu"]),
    }
    np.savez(tmp_path / "mine.npz", **arrays)
    ds = load_dataset("npz", path=tmp_path / "mine.npz")
    assert ds.name == "mine" and ds.class_names == ("cat", "dog", "emu")
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    assert np.array_equal(ds.x_train.numpy(), arrays["x"])
    assert np.array_equal(ds.x_test.numpy(), arrays["x_test"])
    assert np.array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert ds.scale == 1.0 and ds.sample_bytes == 7 * 4


def test_npz_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    x = np.arange(200, dtype=np.uint8).reshape(100, 1, 2)
    y = np.repeat(np.arange(4), 25)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    first = load_dataset("npz", root=tmp_path, path="d.npz")  # relative to root
    second = load_npz(tmp_path / "d.npz")
    assert torch.equal(first.x_test, second.x_test)
    assert torch.bincount(first.y_test).tolist() == [5, 5, 5, 5]
    assert first.class_names == ("0", "1", "2", "3") and first.scale == 1 / 255
    assert first.x_train.dtype == torch.uint8
    together = torch.cat([first.x_train, first.x_test]).reshape(100, -1)[:, 0]
    assert sorted(together.tolist()) == list(range(0, 200, 2))
    other = load_npz(tmp_path / "d.npz", seed=1, test_fraction=0.4)
    assert torch.bincount(other.y_test).tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros(3, np.int64)}, "missing array"),
        ({"x": np.zeros((3, 2))}, "missing array"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, np.int64)}, "3 samples but 'y' has 4"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, 1.0, 1.5])}, "integer class ids"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, r"\[0, 2\)"),
        (
            {"x": np.zeros((4, 2)), "y": np.array([0, 1, 2, 1]), "class_names": np.array(["a"])},
            r"\[0, 1\)",
        ),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(4, np.int64), "x_test": np.zeros((1, 2))},
            "'x_test' but not 'y_test'",
        ),
        (
            {
                "x": np.zeros((4, 2)),
                "y": np.zeros(4, np.int64),
                "x_test": np.zeros((2, 3)),
                "y_test": np.zeros(2, np.int64),
            },
            "must match",
        ),
        ({"x": np.zeros(4), "y": np.zeros(4, np.int64)}, "expected \\(N, D\\)"),
        (
            {
                "x": np.zeros((4, 2)),
                "y": np.zeros(4, np.int64),
                "class_names": np.array(["a", None], dtype=object),
            },
            "object arrays",
        ),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as caught:
        load_npz(path)
    assert str(path) in str(caught.value)


def test_npz_missing_file_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.npz'} does not exist"):
        load_dataset("npz", path=tmp_path / "nope.npz")
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(tmp_path / "garbage.npz")
    with pytest.raises(ConfigError, match="path"):
        load_dataset("npz")


# --------------------------------------------------------------------------- registry


def test_missing_idx_files_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    shutil.copy(Path(__file__), folder / "unrelated.py")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"")  # un-gzipped counts as present
    with pytest.raises(DataError) as caught:
        load_dataset("mnist", root=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"MNIST not found: {folder} is missing ")
    assert "train-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in message
    assert "train-labels" not in message and "t10k-images" not in message
    assert "gzip or not" in message


def test_missing_datasets_name_the_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"Fashion-MNIST not found: {tmp_path / 'fashion-mnist'}"):
        load_dataset("fashion_mnist", root=tmp_path)
    with pytest.raises(DataError, match="CIFAR-10 not found") as caught:
        load_dataset("cifar10", root=tmp_path, cache=False)
    assert str(tmp_path / "cifar10") in str(caught.value)
    assert "cifar10-jpeg.zip" in str(caught.value)
    folder = tmp_path / "cifar100"
    _write_cifar100(folder)
    (folder / "meta").unlink()
    with pytest.raises(DataError) as caught:
        load_dataset("cifar100", root=tmp_path)
    assert f"CIFAR-100 not found: {folder} is missing meta " in str(caught.value)


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLSIM_DATA", raising=False)
    with pytest.raises(DataError, match=r"data\.root.*CLSIM_DATA"):
        resolve_data_root(None)
    with pytest.raises(DataError, match="no data root"):
        load_dataset("mnist")
    monkeypatch.setenv("CLSIM_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_root(other) == other
    with pytest.raises(DataError, match=f"{tmp_path / 'absent'} does not exist"):
        resolve_data_root(tmp_path / "absent")
    monkeypatch.setenv("CLSIM_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="CLSIM_DATA"):
        resolve_data_root(None)


def test_unknown_dataset_suggests_closest() -> None:
    with pytest.raises(DataError, match="did you mean 'fashion_mnist'") as caught:
        load_dataset("fashion_mnst")
    for name in dataset_names():
        assert name in str(caught.value)
    with pytest.raises(DataError, match="did you mean 'cifar100'"):
        load_dataset("cifar1000")
    expected = {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "omniglot", "npz"}
    assert set(dataset_names()) == expected


def test_names_are_normalised_and_options_checked() -> None:
    assert load_dataset("Digits").name == "digits"
    with pytest.raises(ConfigError, match="takes no options; got unknown option"):
        load_dataset("digits", shuffle=True)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("npz", path="x.npz", fraction=0.1)
