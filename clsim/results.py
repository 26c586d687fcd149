"""The results folder: summary.json (rewritten atomically), events.jsonl, tensorboard/.

Every command that writes a results folder opens it with :func:`open_out_dir`, which
checks the path, creates the folder and takes its lock (:mod:`clsim.lock`). A file that
cannot be written (disk full, quota, read-only file system) is a
:class:`ResultsWriteError` naming it; what was written before stays whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from clsim.errors import ConfigError, ResultsWriteError
from clsim.lock import FolderLock

# how much longer than --out the deepest path clsim writes can be (tensorboard/<name>/
# events.out.tfevents.<time>.<host>.<pid>.<n>, the report's hparams runs, temporary files)
DEEPEST_BELOW_OUT = 400
# longest file or folder name made from a strategy's name (NAME_MAX is 255 bytes, and
# temporary files add a prefix and a suffix)
NAME_BYTES = 100


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into a :class:`ResultsWriteError`."""
    try:
        yield
    except OSError as exc:
        raise ResultsWriteError(write_failure(path, exc)) from None


def write_failure(path: Path, exc: OSError) -> str:
    """The message for a write that failed: the file, the reason, what is kept."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return (f"cannot write {path}: {reason} (errno {exc.errno}); results written before "
            "it are kept as they were. Free space (or fix the folder), then continue with "
            "the same command and --resume")


def safe_name(name: str) -> str:
    """A file or folder name for ``name``: itself when it fits in :data:`NAME_BYTES`,
    else cut, with a short hash of the whole name so two long names never collide."""
    encoded = name.encode("utf-8")
    if len(encoded) <= NAME_BYTES and name not in ("", ".", "..") and "/" not in name:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    cut = encoded[: NAME_BYTES - 13].decode("utf-8", "ignore").replace("/", "_")
    return f"{cut}-{digest}"


def check_out_path(out: Path) -> None:
    """Refuse an --out the OS would refuse for the files under it, before anything runs."""
    for part in out.parts:
        if len(os.fsencode(part)) > 255:
            raise ConfigError(f"--out has a folder name of {len(os.fsencode(part))} bytes; "
                              "file systems allow 255", key_path="--out")
    length = len(os.fsencode(str(out)))
    limit = _path_max()
    if length + DEEPEST_BELOW_OUT > limit:
        raise ConfigError(
            f"--out is {length} bytes long; clsim writes files up to {DEEPEST_BELOW_OUT} "
            f"bytes deeper, and this system allows paths of {limit} bytes; choose a "
            "shorter folder", key_path="--out")
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
    except OSError as exc:
        raise ConfigError(f"--out {out} cannot be used: {exc.strerror}") from None


def open_out_dir(out: Path, command: str, *, fresh: bool) -> FolderLock:
    """Create ``out`` and lock it for ``command``; with ``fresh``, refuse a folder that
    already holds results, so none are overwritten (checked under the lock, so two runs
    started together cannot both see an empty folder)."""
    check_out_path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out} cannot be created: {exc.strerror}") from None
    lock = FolderLock(out, command).acquire()
    if fresh and holds_results(out):
        lock.release()
        raise ConfigError(
            f"--out {out} already holds results; choose a new folder "
            "(clsim never overwrites results)"
        )
    return lock


def holds_results(out: Path) -> bool:
    """Whether ``out`` holds a run's results (the lock file is not results)."""
    return any(os.path.lexists(out / name) for name in ("summary.json", "events.jsonl"))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place, so a
    reader (or a crash) never sees half a file."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, fsync it, rename it into place:
    the file at ``path`` is always whole, the old one or the new. A failed write (disk
    full) is a :class:`ResultsWriteError` and leaves the old file."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; results are files like others
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# what open() would give a new file: results are shared like any file the user writes
_FILE_MODE = 0o666 & ~_umask()


def _path_max() -> int:
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096
