"""How loaders open the files a user points at: bounded, and named when wrong.

A named pipe or ``/dev/zero`` given as a data file would block or read without end; a
few kilobytes of gzip, zip or PNG can declare gigabytes; a damaged archive raises
``zlib.error`` or PIL's ``DecompressionBombError``, which are no user's business. So every
loader opens its files through these functions: the path must be a regular file (or a
folder), what a file declares (a zip member's size, an npy header, an image's pixels) is
checked against what is there and against the memory available *before* anything sized by
it is allocated, and a library's exception for damaged data becomes one
:class:`~clsim.errors.DataError` naming the file (and the archive member).
"""

from __future__ import annotations

import io
import math
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clsim.budget import format_bytes
from clsim.data.limits import available_memory_bytes, require_memory
from clsim.errors import DataError
from clsim.files import require_file, require_folder

PIL_FORMATS = ("JPEG", "PNG")
# what a damaged zip member raises while it is read
_MEMBER_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, ValueError, RuntimeError,
                  NotImplementedError)
_IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
                 zlib.error)


def present(path: Path) -> bool:
    """Whether anything (a file, a pipe, a dangling link) sits at ``path``."""
    return os.path.lexists(path)


def data_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it is a regular file; else a DataError naming it and what it is."""
    return require_file(path, what, DataError)


def data_folder(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it is a folder; else a DataError naming it and what it is."""
    return require_folder(path, what, DataError)


def read_whole(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a regular file, once its size passed the memory check."""
    return read_bounded(path, what, available_memory_bytes())


def read_bounded(path: str | os.PathLike[str], what: str, room: int | None) -> bytes:
    """The bytes of a regular file no larger than ``room`` (None: no limit known); for
    the many small files of an image folder, whose room is read once, not per file."""
    path = data_file(path, what)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if room is not None and size > room:
                raise DataError(f"{what} {path} is {size} bytes long: {format_bytes(size)}, "
                                f"more than the {format_bytes(room)} of memory available")
            return f.read(size)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """A UTF-8 text file (an index a loader reads); a byte that is not UTF-8 is named by
    its offset and line, so the user can find it."""
    raw = read_whole(path, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{what} {path} is not UTF-8 text: byte {exc.start} (line {line}) is "
            f"0x{raw[exc.start]:02x}; save the file as UTF-8"
        ) from None


# ---------------------------------------------------------------------------
# zip archives
# ---------------------------------------------------------------------------


@dataclass
class Archive:
    """A zip archive read whole into memory, whose members are read with their declared
    sizes checked first (a member declaring more than the memory available is a bomb)."""

    path: Path
    title: str
    raw: bytes
    zip: zipfile.ZipFile
    room: int | None = field(default=None)

    def read(self, info: zipfile.ZipInfo) -> bytes:
        """One member's bytes; a damaged member is a DataError naming archive and member."""
        if self.room is not None and info.file_size > self.room:
            raise DataError(
                f"{self.title}: {info.filename} in {self.path} declares "
                f"{format_bytes(info.file_size)} uncompressed, more than the "
                f"{format_bytes(self.room)} of memory available (a damaged archive or a "
                "decompression bomb)"
            )
        try:
            return self.zip.read(info)
        except _MEMBER_ERRORS as exc:
            raise DataError(
                f"{self.title}: cannot read {info.filename} from {self.path} ({exc}); the "
                "archive is damaged, download it again"
            ) from exc


def open_archive(path: Path, title: str) -> Archive:
    """The zip at ``path`` (a regular file that fits in memory), ready to read members."""
    raw = read_whole(path, f"{title} archive")
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{title}: cannot open {path} as a zip file ({exc})") from exc
    return Archive(path, title, raw, archive, available_memory_bytes())


# ---------------------------------------------------------------------------
# npz files
# ---------------------------------------------------------------------------


def npy_header(f: io.BufferedIOBase | zipfile.ZipExtFile) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an .npy stream's header, leaving the stream at the values."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(f)
    return tuple(int(d) for d in shape), dtype


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> int:
    """Bytes the array ``info`` holds once loaded, checked against what the archive
    declares for it: an npy member is its header then exactly its values."""
    name = info.filename
    try:
        with archive.open(info) as f:
            shape, dtype = npy_header(f)
            header = f.tell()
    except _MEMBER_ERRORS as exc:
        raise DataError(f"{path}: member {name} is not a readable .npy array ({exc})") from exc
    if dtype.hasobject:
        raise DataError(f"{path}: {name} holds Python objects; object arrays are not loaded, "
                        "store strings as a string array")
    values = math.prod(shape) * dtype.itemsize
    if header + values != info.file_size:
        raise DataError(
            f"{path}: {name} declares shape {shape} of {dtype} ({values} bytes of values) "
            f"but the archive holds {info.file_size - header} bytes for it; the file is "
            "damaged"
        )
    return values


def check_npz(path: Path) -> None:
    """Every array of the .npz at ``path`` declares what it holds, and all of them fit in
    memory; checked from headers, before numpy allocates what they declare."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(_member_bytes(archive, info, path) for info in archive.infolist()
                        if info.filename.endswith(".npy"))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from exc
    require_memory(total, f"{path} declares arrays of {total} bytes in all")


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


def decode_image(data: bytes, where: str, title: str,
                 check: Callable[[tuple[int, int]], None] | None = None) -> Image.Image:
    """The decoded image of ``data`` (a JPEG or PNG); ``check`` sees its (width, height)
    from the header before the pixels are decoded, so an image claiming 40000x40000 is
    refused before it is allocated. PIL's decompression-bomb warning is an error here:
    a dataset image that large is not what the user meant."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            if check is not None:
                check(image.size)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{title}: {where} is too large to decode ({exc})") from exc
    except _IMAGE_ERRORS as exc:
        raise DataError(f"{title}: {where} is not a readable image ({exc})") from exc
    return image
