"""One writer per results folder: an exclusive ``flock`` on ``FOLDER/.clsim.lock``.

Two ``clsim compare --resume`` (or ``run --resume``) on one folder would both run every
remaining cell or strategy and write duplicate records. Every command that writes into a
results folder holds this lock for its whole run; a second one is refused with the
holder's pid. The kernel drops a ``flock`` when its holder dies (even by SIGKILL), so a
stale lock file never blocks anyone; the file itself is removed on release and is never
taken for results. File descriptors are not inherited (PEP 446), so worker processes
never hold the lock on their parent's behalf.

The lock file is opened without following a symbolic link and without blocking, and
anything but a regular file is refused: a link to ``summary.json`` would otherwise be
truncated, and a named pipe would block. The flock is the lock; the holder's note in the
file is a courtesy, so a note that cannot be written (disk full) is not an error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from clsim.errors import ConfigError
from clsim.files import describe_kind
from clsim.text import shown_path

LOCK_NAME = ".clsim.lock"


class FolderLock:
    """The exclusive lock on one results folder, held from :meth:`acquire` to
    :meth:`release` (or the process's end). ``argument`` names the folder's argument in
    messages (``--out``, or ``DIR`` for ``clsim report``)."""

    def __init__(self, folder: Path, command: str, argument: str = "--out") -> None:
        self.folder = folder
        self.command = command
        self.argument = argument
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise a ConfigError naming the folder and the holder's pid."""
        while self._fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, self.path):
                    self._fd = fd
                    break
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise ConfigError(
                    f"{self.folder} is in use by another clsim ({holder}); two commands "
                    "writing one results folder would run the same work twice. Wait for it "
                    "to finish (or stop it), then run this again",
                    key_path=self.argument) from None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the previous holder removed the file as we opened it: again
        try:
            self._write_note()
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (in that order, so nobody can
        take a lock on a file that is about to disappear without noticing)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # the folder became unwritable: the file stays, the flock goes below
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _write_note(self) -> None:
        """Say who holds the lock; a note that cannot be written (disk full) is left
        empty, which others read as "pid not yet written": the flock is the lock."""
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"pid {os.getpid()}, clsim {self.command}\n".encode(), 0)
        except OSError:
            try:
                os.ftruncate(self._fd, 0)  # no half note (truncating needs no space)
            except OSError:
                pass

    def _open(self) -> int:
        """The lock file, opened (created when missing) only if it is a regular file."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o666)  # less the umask, as results files
        except OSError as exc:
            raise self._refused(exc) from None
        try:
            mode = os.fstat(fd).st_mode
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise self._not_a_file(describe_kind(mode))
        return fd

    def _refused(self, exc: OSError) -> ConfigError:
        """Why the lock file could not be opened: what is there instead, or the OS's reason."""
        try:
            mode = os.lstat(self.path).st_mode
        except OSError:
            mode = None
        if mode is not None and stat.S_ISLNK(mode):
            return self._not_a_file("a symbolic link")
        if mode is not None and not stat.S_ISREG(mode):
            return self._not_a_file(describe_kind(mode))
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return ConfigError(f"cannot create the lock file {shown_path(self.path)}: {reason}",
                           key_path=self.argument)

    def _not_a_file(self, kind: str) -> ConfigError:
        return ConfigError(
            f"the lock file {shown_path(self.path)} is {kind}; clsim creates it as a regular "
            "file and never writes through anything else. Remove it (it is not results), "
            "then run this again", key_path=self.argument)


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says ("pid 123, clsim compare --resume")."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid not yet written"


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` (not what a link there points to) is still the file ``fd`` is."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
