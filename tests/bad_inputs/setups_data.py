"""Hostile dataset files for the bad-input corpus (cases_data.yaml), written at test time.

Each builder is small: a bomb is a few kilobytes that *declare* gigabytes, so a loader
that trusts the declaration fails (MemoryError, an internal error), and one that checks
it first answers with a DataError naming the file. tests/test_data_hostile.py reuses them.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(values: np.ndarray) -> bytes:
    """``values`` (uint8) as an idx file: magic, big-endian dims, then the bytes."""
    return (bytes([0, 0, 0x08, values.ndim]) + b"".join(d.to_bytes(4, "big") for d in
                                                         values.shape) + values.tobytes())


def small_mnist(folder: Path, n: int = 20) -> None:
    """Four valid, tiny idx files (n 28x28 images of 10 classes, per split)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.zeros((n, 28, 28), np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for stem in IDX_STEMS:
        (folder / stem).write_bytes(idx_bytes(images if "images" in stem else labels))


def gzip_bomb(header: bytes, gigabytes: float) -> bytes:
    """``header`` then ``gigabytes`` of zeros, as concatenated gzip members: 16 MiB of
    zeros compress to 16 KB, repeated, so the file stays small and quick to write."""
    zeros = gzip.compress(bytes(16 * 2**20), compresslevel=9)
    return gzip.compress(header) + zeros * max(1, int(gigabytes * 64))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def png(width: int = 4, height: int = 4) -> bytes:
    """A real, decodable RGB PNG."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def image_zip(path: Path, members: dict[str, bytes], compress: int = zipfile.ZIP_DEFLATED) -> None:
    """A zip holding ``members`` (name -> bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def cifar_members(first: bytes) -> dict[str, bytes]:
    """train/test x two classes, the first (decoded first) given."""
    return {"train/a/0.png": first, "train/b/0.png": png(), "test/a/0.png": png(),
            "test/b/0.png": png()}


def damage_member(path: Path, member: str) -> None:
    """Overwrite ``member``'s deflate data with 0xff bytes (an invalid block type), so
    inflating it raises zlib.error; sizes and headers stay as they were."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                    info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start:start + info.compress_size] = b"\xff" * info.compress_size
    path.write_bytes(bytes(raw))


def npy_header_only(shape: tuple[int, ...], dtype: str, payload: bytes) -> bytes:
    """An .npy header declaring ``shape`` of ``dtype``, followed by ``payload`` only."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(dtype).str,
                                               "fortran_order": False, "shape": shape})
    return out.getvalue() + payload


def pickle_length_bomb() -> bytes:
    """Protocol 4: a bytes8 opcode declaring 2**40 bytes, followed by three."""
    return b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc"


# ---------------------------------------------------------------------------
# the corpus' setups: each writes under tmp what its scenario's data keys point at
# ---------------------------------------------------------------------------


def _idx_labels_absurd(tmp: Path) -> None:
    folder = tmp / "data" / "mnist"
    small_mnist(folder)
    header = bytes([0, 0, 0x08, 3]) + (2**32 - 1).to_bytes(4, "big") * 3
    (folder / "t10k-labels-idx1-ubyte").unlink()  # gzipped: no file size to compare
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + bytes(64)))


def _idx_gzip_bomb(tmp: Path) -> None:
    folder = tmp / "data" / "mnist"
    small_mnist(folder, n=100)
    header = bytes([0, 0, 0x08, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip_bomb(header, 0.25))


def _zip_corrupt_member(tmp: Path) -> None:
    path = tmp / "data" / "cifar10" / "cifar10-jpeg.zip"
    image_zip(path, cifar_members(png()))
    damage_member(path, "train/a/0.png")


def _png_bomb(tmp: Path) -> None:
    image_zip(tmp / "data" / "cifar10" / "cifar10-jpeg.zip",
              cifar_members(png_header_only(40000, 40000)))


def _pickle_length_bomb(tmp: Path) -> None:
    folder = tmp / "data" / "cifar100"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle_length_bomb())


def _npz_nan(tmp: Path) -> None:
    x = np.ones((20, 3), np.float32)
    x[3, 1], x[7, 2] = np.nan, np.inf
    np.savez(tmp / "data.npz", x=x, y=np.arange(20) % 2)


def _npz_lying_header(tmp: Path) -> None:
    with zipfile.ZipFile(tmp / "data.npz", "w") as archive:
        archive.writestr("x.npy", npy_header_only((10, 3), "<f4", bytes(120)))
        archive.writestr("y.npy", npy_header_only((2**40,), "<i8", bytes(80)))


SETUPS = {
    "data_idx_labels_absurd": _idx_labels_absurd,
    "data_idx_gzip_bomb": _idx_gzip_bomb,
    "data_zip_corrupt_member": _zip_corrupt_member,
    "data_png_bomb": _png_bomb,
    "data_pickle_length_bomb": _pickle_length_bomb,
    "data_npz_nan": _npz_nan,
    "data_npz_lying_header": _npz_lying_header,
}
