"""One writer per results folder: an exclusive ``flock`` on ``FOLDER/.clsim.lock``.

Two ``clsim compare --resume`` (or ``run --resume``) on one folder would both run every
remaining cell or strategy and write duplicate records. Every command that writes into a
results folder holds this lock for its whole run; a second one is refused with the
holder's pid. The kernel drops a ``flock`` when its holder dies (even by SIGKILL), so a
stale lock file never blocks anyone; the file itself is removed on release and is never
taken for results. File descriptors are not inherited (PEP 446), so worker processes
never hold the lock on their parent's behalf.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from clsim.errors import ConfigError

LOCK_NAME = ".clsim.lock"


class FolderLock:
    """The exclusive lock on one results folder, held from :meth:`acquire` to
    :meth:`release` (or the process's end)."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder = folder
        self.command = command
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise a ConfigError naming the folder and the holder's pid."""
        while self._fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"{self.folder} is in use by another clsim ({holder}); two commands "
                    "writing one results folder would run the same work twice. Wait for it "
                    "to finish (or stop it), then run this again",
                    key_path="--out") from None
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # the previous holder removed the file as we opened it: take a new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()}, clsim {self.command}\n".encode(), 0)
        return self

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (in that order, so nobody can
        take a lock on a file that is about to disappear without noticing)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file {self.path}: {exc.strerror}",
                              key_path="--out") from None


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says ("pid 123, clsim compare --resume")."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid not yet written"


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
