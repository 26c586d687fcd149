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
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from clsim.errors import ConfigError, ResultsWriteError
from clsim.files import require_file
from clsim.lock import FolderLock
from clsim.text import bounded_str

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


def check_out_path(out: Path, argument: str = "--out") -> None:
    """Refuse an --out the OS would refuse for the files under it, before anything runs;
    ``argument`` names it in messages (``DIR`` for ``clsim report``)."""
    for part in out.parts:
        if len(os.fsencode(part)) > 255:
            raise ConfigError(f"{argument} has a folder name of {len(os.fsencode(part))} "
                              "bytes; file systems allow 255", key_path=argument)
    length = len(os.fsencode(str(out)))
    limit = _path_max()
    if length + DEEPEST_BELOW_OUT > limit:
        raise ConfigError(
            f"{argument} is {length} bytes long; clsim writes files up to "
            f"{DEEPEST_BELOW_OUT} bytes deeper, and this system allows paths of {limit} "
            "bytes; choose a shorter folder", key_path=argument)
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{argument} {out} exists and is not a folder")
    except OSError as exc:
        raise ConfigError(f"{argument} {out} cannot be used: {exc.strerror}") from None


def open_out_dir(out: Path, command: str, *, fresh: bool, argument: str = "--out") -> FolderLock:
    """Create ``out`` and lock it for ``command``; with ``fresh``, refuse a folder that
    already holds results, so none are overwritten (checked under the lock, so two runs
    started together cannot both see an empty folder). ``argument`` names the folder in
    messages: ``--out``, or ``DIR`` for ``clsim report``."""
    check_out_path(out, argument)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{argument} {out} cannot be created: {exc.strerror}") from None
    lock = FolderLock(out, command, argument).acquire()
    if fresh and holds_results(out):
        lock.release()
        raise ConfigError(
            f"{argument} {out} already holds results; choose a new folder "
            "(clsim never overwrites results)"
        )
    return lock


def holds_results(out: Path) -> bool:
    """Whether ``out`` holds a run's results (the lock file is not results)."""
    return any(os.path.lexists(out / name) for name in ("summary.json", "events.jsonl"))


def read_json_file(path: Path, what: str, advice: str) -> Any:
    """The JSON value in the results file ``path``, or a ConfigError naming it (and the
    line, when the JSON is broken): not a regular file (a named pipe would block), not
    readable, not UTF-8, not JSON, a number of more digits than Python converts, nested
    too deeply. ``what`` names the file's role ("the run summary"); ``advice`` says what
    to do about a damaged one."""
    require_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} cannot be read: {exc.strerror or type(exc).__name__}",
                          source=str(path)) from None
    value, problem, line = parse_json(data, "a clsim results file")
    if problem is not None:
        raise ConfigError(f"{what} is damaged: {problem}; {advice}", source=str(path),
                          line=line)
    return value


def parse_json(data: bytes, kind: str) -> tuple[Any, str | None, int | None]:
    """(value, None, None) for JSON bytes, else (None, what is wrong, its line or None);
    never raises for any ``data`` (read from a results file, or one line of cells.jsonl,
    ``kind`` naming what it should be: "a cell record")."""
    try:
        return json.loads(data.decode("utf-8")), None, None
    except UnicodeDecodeError:
        return None, "not valid UTF-8", None
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg}, column {exc.colno})", exc.lineno
    except ValueError as exc:  # Python's limit on the digits of an integer
        return None, f"not JSON clsim can read ({bounded_str(exc, 120)})", None
    except RecursionError:
        return None, f"nested too deeply to be {kind}", None


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
        fd, tmp = _new_temporary(path)
        try:
            with os.fdopen(fd, "wb") as handle:  # from here the handle closes fd
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, created 0666 less the umask in force now (as open()
    and every other results file): mkstemp would make it 0600."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _path_max() -> int:
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096
