"""Hostile dataset files: each is one DataError naming the file, never a hang, a
MemoryError or an internal error. Files are built at test time (tests/bad_inputs/
setups_data.py); pipes and memory limits are real, in a subprocess with a timeout, so a
regression fails instead of hanging the suite."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from clsim.budget import Budget
from clsim.data import load_dataset
from clsim.data.guards import read_text
from clsim.data.idx import read_idx
from clsim.data.limits import MEMORY_ENV, resident_bytes
from clsim.data.npz import load_npz
from clsim.errors import DataError

_SPEC = importlib.util.spec_from_file_location(
    "setups_data", Path(__file__).parent / "bad_inputs" / "setups_data.py")
hostile = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(hostile)


def _in_subprocess(script: str, tmp_path: Path, limit_mb: int | None = None) -> dict:
    """Run ``script`` (which sets ``result``) in a fresh interpreter with a timeout, under
    an address-space limit of what it has mapped plus ``limit_mb`` when given."""
    prelude = textwrap.dedent(f"""\
        import json, resource, sys
        import clsim.data, torch
        if {limit_mb!r} is not None:
            mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                          if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (mapped + {limit_mb!r} * 2**20,
                                                    resource.RLIM_INFINITY))
        from clsim.errors import DataError
        from clsim.data import load_dataset
        from clsim.data.idx import read_idx
        result = {{}}
    """)
    (tmp_path / "job.py").write_text(prelude + textwrap.dedent(script)
                                     + "\nprint(json.dumps(result))\n")
    env = {k: v for k, v in os.environ.items() if k != MEMORY_ENV}
    proc = subprocess.run([sys.executable, str(tmp_path / "job.py")], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


# ---------------------------------------------------------------------------
# non-regular files: a pipe or a device is named, never opened
# ---------------------------------------------------------------------------


def _fifo_layouts(root: Path) -> dict[str, tuple[str, str, dict, Path]]:
    """Per loader: (dataset, data root, options, the pipe), the pipe where a file goes."""
    mnist = root / "mnist"
    hostile.small_mnist(mnist)
    (mnist / "train-images-idx3-ubyte").unlink()
    image_dir = root / "c10dir" / "cifar10"
    for split in ("train", "test"):
        (image_dir / split / "a").mkdir(parents=True)
        (image_dir / split / "a" / "0.png").write_bytes(hostile.png())
    (root / "cifar100").mkdir()
    for name in ("train", "test"):
        (root / "cifar100" / name).write_bytes(b"")
    (root / "omniglot").mkdir()
    (root / "omniglot" / "images_background_small2.zip").write_bytes(b"")
    layouts = {
        "mnist": ("mnist", root, {}, mnist / "train-images-idx3-ubyte.gz"),
        "npz": ("npz", root, {"path": "d.npz"}, root / "d.npz"),
        "cifar10": ("cifar10", root, {"cache": False}, root / "cifar10" / "cifar10-jpeg.zip"),
        "cifar10_folder_image": ("cifar10", root / "c10dir", {"cache": False},
                                 image_dir / "train" / "a" / "1.png"),
        "cifar100": ("cifar100", root, {}, root / "cifar100" / "meta"),
        "omniglot": ("omniglot", root, {},
                     root / "omniglot" / "images_background_small1.zip"),
        "omniglot_folder_image": ("omniglot", root / "o2", {},
                                  root / "o2" / "omniglot" / "Greek" / "alpha" / "0.png"),
    }
    for _, _, _, pipe in layouts.values():
        pipe.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(pipe)
    return layouts


def test_a_named_pipe_as_any_data_file_is_named_not_opened(tmp_path):
    """A FIFO where each loader reads a file: a DataError naming the pipe, at once (a
    loader that opened it would block; the subprocess's timeout turns that into a
    failure)."""
    layouts = _fifo_layouts(tmp_path)
    calls = {name: (dataset, str(root), options)
             for name, (dataset, root, options, _) in layouts.items()}
    result = _in_subprocess(f"""
        for name, (dataset, root, options) in {calls!r}.items():
            try:
                load_dataset(dataset, root=root, **options)
                result[name] = "loaded"
            except DataError as exc:
                result[name] = str(exc)
    """, tmp_path)
    for name, (_, _, _, pipe) in layouts.items():
        assert str(pipe) in result[name], (name, result[name])
        assert "a named pipe (FIFO)" in result[name], (name, result[name])


def test_a_named_pipe_as_the_data_root_or_dataset_folder_is_named(tmp_path):
    (tmp_path / "root").mkdir()
    os.mkfifo(tmp_path / "root" / "mnist")
    os.mkfifo(tmp_path / "pipe_root")
    result = _in_subprocess(f"""
        for name, root in (("folder", {str(tmp_path / 'root')!r}),
                           ("root", {str(tmp_path / 'pipe_root')!r})):
            try:
                load_dataset("mnist", root=root)
            except DataError as exc:
                result[name] = str(exc)
    """, tmp_path)
    assert str(tmp_path / "root" / "mnist") in result["folder"]
    assert "a named pipe (FIFO); expected a folder" in result["folder"]
    assert str(tmp_path / "pipe_root") in result["root"]
    assert "a named pipe (FIFO); expected a folder" in result["root"]


def test_a_clsim_validate_on_a_pipe_exits_2_naming_it(tmp_path):
    """Through the CLI as the tester ran it: exit 2, one message, no traceback."""
    os.mkfifo(tmp_path / "d.npz")
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: s\ndata: {dataset: npz, path: d.npz}\n"
                        "stream: {type: class_incremental, n_experiences: 1}\n"
                        "model: {name: mlp, hidden: [8]}\n"
                        "strategies: {naive: {plugins: [naive]}}\n")
    proc = subprocess.run([sys.executable, "-m", "clsim.cli", "validate", str(scenario)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"clsim: error: {scenario}:2: data.path: ")
    assert f"{tmp_path / 'd.npz'}' is a named pipe (FIFO)" in proc.stderr


def test_dev_zero_as_an_idx_file_or_npz_is_named(tmp_path):
    """A link to /dev/zero reads without end: refused as a character device."""
    folder = tmp_path / "mnist"
    hostile.small_mnist(folder)
    (folder / "t10k-images-idx3-ubyte").unlink()
    (folder / "t10k-images-idx3-ubyte").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="is a character device") as info:
        load_dataset("mnist", root=tmp_path)
    assert str(folder / "t10k-images-idx3-ubyte") in str(info.value)
    with pytest.raises(DataError, match="is a character device"):
        load_npz("/dev/zero")
    with pytest.raises(DataError, match="is a character device"):
        read_idx("/dev/zero")


# ---------------------------------------------------------------------------
# unbounded reads: what a file declares is checked before it is allocated
# ---------------------------------------------------------------------------


def test_a_gzip_bomb_is_read_only_to_its_header_size_under_a_memory_limit(tmp_path):
    """2 GiB of zeros behind a 100-image header, read under an address-space limit of
    256 MiB: reading stops one byte past the header's 78400 bytes."""
    bomb = tmp_path / "bomb.gz"
    header = bytes([0, 0, 0x08, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    bomb.write_bytes(hostile.gzip_bomb(header, 2))
    absurd = tmp_path / "absurd.gz"
    absurd.write_bytes(hostile.gzip_bomb(bytes([0, 0, 0x08, 2]) + (2**31).to_bytes(4, "big")
                                         * 2, 0.1))
    result = _in_subprocess("""
        for name in ("bomb.gz", "absurd.gz"):
            try:
                read_idx(name)
            except DataError as exc:
                result[name] = str(exc)
    """, tmp_path, limit_mb=256)
    assert result["bomb.gz"] == ("bomb.gz holds more than the (100, 28, 28) x 1 = 78400 "
                                 "bytes its header says; the file is damaged (or not what "
                                 "its header claims)")
    assert result["absurd.gz"].startswith("absurd.gz: its idx header declares (2147483648, "
                                          "2147483648) x 1 = 4611686018427387904 bytes: ")
    assert "of memory available (the address-space limit" in result["absurd.gz"]


def test_an_uncompressed_idx_is_checked_against_its_file_size_before_reading(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + (2**32 - 1).to_bytes(4, "big") + bytes(10))
    with pytest.raises(DataError, match=r"holds 10 bytes of values but its header says "
                       r"\(4294967295,\) x 1 = 4294967295 bytes"):
        read_idx(path)


def test_a_png_claiming_40000_squared_pixels_is_refused_before_decoding(tmp_path):
    hostile.image_zip(tmp_path / "cifar10" / "x.zip",
                      hostile.cifar_members(hostile.png_header_only(40000, 40000)))
    with pytest.raises(DataError, match="too large to decode") as info:
        load_dataset("cifar10", root=tmp_path, cache=False)
    assert "train/a/0.png in " in str(info.value) and "x.zip" in str(info.value)


def cap_room(monkeypatch, room: str) -> None:
    """$CLSIM_MEMORY_LIMIT set to leave about ``room`` beside what this process holds
    (the cap covers the whole process; a little may be allocated before the check)."""
    monkeypatch.setenv(MEMORY_ENV, str(resident_bytes() + Budget.parse(room).bytes))


def test_an_image_size_is_checked_against_memory_before_the_array(tmp_path, monkeypatch):
    """3000x3000 is below PIL's bomb limit; 4 of them in RGB (108 MB) are over a 50 MB
    cap, refused from the first header, before any pixel is decoded."""
    hostile.image_zip(tmp_path / "cifar10" / "x.zip",
                      hostile.cifar_members(hostile.png_header_only(3000, 3000)))
    cap_room(monkeypatch, "50MB")
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", root=tmp_path, cache=False)
    message = str(info.value)
    assert "train/a/0.png in" in message and "is 3000x3000 pixels, so 2 images of 3 " \
        "channels need: 51.50 MB, more than the " in message
    assert re.search(r"more than the (49|50)\.\d\d MB of memory available", message)


def test_a_zip_member_declaring_more_than_memory_is_refused(tmp_path, monkeypatch):
    """The member's declared size (central directory) is patched to 3 GB: a bomb's
    signature; with a 64 MB cap it is refused before zipfile inflates anything."""
    path = tmp_path / "cifar10" / "x.zip"
    hostile.image_zip(path, hostile.cifar_members(hostile.png()))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("train/a/0.png")
    central = raw.index(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(info.filename)] != info.filename.encode():
        central = raw.index(b"PK\x01\x02", central + 4)
    raw[central + 24:central + 28] = (3 * 10**9).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    cap_room(monkeypatch, "64MB")
    with pytest.raises(DataError, match=r"declares 2.79 GB uncompressed, more than the "
                       r"6[34]\.\d\d MB of memory available") as info:
        load_dataset("cifar10", root=tmp_path, cache=False)
    assert f"train/a/0.png in {path}" in str(info.value)


def test_damaged_zip_members_name_archive_and_member(tmp_path):
    """Bad deflate data (zlib.error) and a wrong CRC (BadZipFile): both DataErrors."""
    path = tmp_path / "cifar10" / "x.zip"
    hostile.image_zip(path, hostile.cifar_members(hostile.png()))
    hostile.damage_member(path, "test/b/0.png")
    with pytest.raises(DataError, match=r"cannot read test/b/0.png from .*x.zip \(Error -3"):
        load_dataset("cifar10", root=tmp_path, cache=False)
    hostile.image_zip(path, hostile.cifar_members(hostile.png()), zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"IEND") - 20  # a pixel byte of the first image, CRC left as it was
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"cannot read train/a/0.png from .*Bad CRC-32"):
        load_dataset("cifar10", root=tmp_path, cache=False)


def test_an_npz_array_header_is_checked_before_numpy_allocates(tmp_path, monkeypatch):
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", hostile.npy_header_only((10, 3), "<f4", bytes(120)))
        archive.writestr("y.npy", hostile.npy_header_only((2**40,), "<i8", bytes(80)))
    with pytest.raises(DataError, match=r"y.npy declares shape \(1099511627776,\) of int64 "
                       r"\(8796093022208 bytes of values\) but the archive holds 80 bytes"):
        load_npz(path)
    np.savez_compressed(path, x=np.zeros((2000, 1000), np.float32), y=np.zeros(2000, int))
    cap_room(monkeypatch, "4MB")  # 8 MB of zeros compress to a few KB
    with pytest.raises(DataError, match=f"{path} declares arrays of 8016000 bytes in all: "
                       r"7.64 MB, more than the [34]\.\d\d MB of memory available"):
        load_npz(path)


def test_an_npz_label_id_of_2_to_the_40_is_refused_before_sizing_classes(tmp_path):
    """Without class_names the classes were 0..max label: 2**40 names to build. In a
    subprocess, so a regression times out instead of hanging."""
    y = np.arange(10) % 2
    y[4] = 2**40
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3), np.float32), y=y)
    result = _in_subprocess("""
        try:
            load_dataset("npz", path="d.npz")
        except DataError as exc:
            result["error"] = str(exc)
    """, tmp_path, limit_mb=512)
    assert result["error"] == (
        "d.npz: 'y' holds label id 1099511627776, but there are only 10 samples; without "
        "'class_names' the classes are 0..max label, so number the classes from 0 or store "
        "'class_names'")


def test_a_pickle_declaring_2_to_the_40_bytes_is_refused_before_unpickling(tmp_path):
    folder = tmp_path / "cifar100"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(hostile.pickle_length_bomb())
    with pytest.raises(DataError, match="expected 1099511627776 bytes in a bytes8, but only "
                       "3 remain") as info:
        load_dataset("cifar100", root=tmp_path)
    assert str(folder / "meta") in str(info.value)


# ---------------------------------------------------------------------------
# silently accepted: inputs that normalise to NaN or infinity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("arrays", "fragment"), [
    ({"x": np.array([[1.0, np.nan], [np.inf, 2.0], [0.0, 0.0], [1.0, 1.0]])},
     "'x' gives 2 of 8 values that are NaN or infinite"),
    ({"x": np.full((4, 2), 1e300)}, "'x' gives 8 of 8 values"),  # overflows float32
    ({"x": np.ones((4, 2), np.uint8), "std": np.array([1e-45])}, "'x' gives 8 of 8 values"),
    ({"x": np.ones((4, 2, 3), np.float32), "mean": np.zeros(2), "std": np.array([1.0, 0.0])},
     "'std' must not contain zeros"),  # a constant channel divided by zero
    ({"x": np.ones((4, 2), np.uint8), "std": np.array([np.nan])},
     "'std' holds a non-finite value"),
    ({"x": np.ones((4, 2), np.float32), "x_test": np.array([[0.0, np.inf]], np.float32),
      "y_test": np.array([0])}, "'x_test' gives 1 of 2 values"),
])
def test_inputs_that_normalise_to_nan_or_inf_are_refused(tmp_path, arrays, fragment):
    path = tmp_path / "d.npz"
    np.savez(path, y=np.array([0, 1, 0, 1]), **arrays)
    with pytest.raises(DataError, match=fragment.replace("(", r"\(")) as info:
        load_npz(path, test_fraction=0.5)
    assert str(info.value).startswith(f"{path}: ")


def test_finite_npz_inputs_still_load_unchanged(tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(">f4")  # big-endian, too
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(8) % 2)
    ds = load_npz(tmp_path / "d.npz", test_fraction=0.25)
    got = np.concatenate([ds.x_train.numpy(), ds.x_test.numpy()])
    assert sorted(got.ravel().tolist()) == sorted(x.astype("<f4").ravel().tolist())


# ---------------------------------------------------------------------------
# a text index that is not UTF-8 names the file and the byte
# ---------------------------------------------------------------------------


def test_a_text_index_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "session_2.txt"
    path.write_bytes(b"12\n34\n5\xe96\n")
    with pytest.raises(DataError) as info:
        read_text(path, "index file")
    assert str(info.value) == (f"index file {path} is not UTF-8 text: byte 7 (line 3) is "
                               "0xe9; save the file as UTF-8")
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(DataError, match="is a named pipe"):
        read_text(tmp_path / "pipe.txt", "index file")
