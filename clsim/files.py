"""Check a path a user gave before opening it: exists, and is a regular file or a folder.

Opening a named pipe or a character device (``/dev/zero``) as a scenario, data file or
checkpoint would block forever or read without end; a symlink loop is not "missing".
Every reader of a user-given path calls :func:`require_file` or :func:`require_folder`
first, so each of these is one clear message naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from clsim.errors import ClsimError, ConfigError
from clsim.text import shown_path

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISREG, "a regular file"),
)


def describe_kind(mode: int) -> str:
    """'a named pipe (FIFO)', 'a folder', ... for an ``st_mode``."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "not a regular file"


def _stat(path: Path, what: str, error: type[ClsimError]) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            reason = "is a symbolic link loop (a link that points back to itself)"
        elif exc.errno == errno.ENOENT:
            reason = ("is a symbolic link to a missing file" if os.path.islink(path)
                      else "does not exist")
        elif exc.errno == errno.ENAMETOOLONG:
            reason = "has a name too long for the file system"
        elif exc.errno == errno.ENOTDIR:
            reason = "does not exist (a part of the path is a file, not a folder)"
        else:
            reason = f"cannot be read: {exc.strerror}"
        raise error(f"{what} {shown_path(path)} {reason}") from None


def require_file(path: str | Path, what: str, error: type[ClsimError] = ConfigError) -> Path:
    """``path`` as a Path, if it is a regular file; otherwise ``error`` naming it.

    ``what`` names the role ("scenario file", "hierarchy file", "checkpoint").
    """
    path = Path(path)
    mode = _stat(path, what, error).st_mode
    if not stat.S_ISREG(mode):
        raise error(f"{what} {shown_path(path)} is {describe_kind(mode)}; expected a "
                     "regular file")
    return path


def require_folder(path: str | Path, what: str, error: type[ClsimError] = ConfigError) -> Path:
    """``path`` as a Path, if it is a folder; otherwise ``error`` naming it."""
    path = Path(path)
    mode = _stat(path, what, error).st_mode
    if not stat.S_ISDIR(mode):
        raise error(f"{what} {shown_path(path)} is {describe_kind(mode)}; expected a folder")
    return path

