"""events.jsonl: one JSON object per line, written whole, so a crash loses nothing.

A line that cannot be written (disk full) is cut off again, so the file holds only whole
lines, and the failure is kept: the runner asks :meth:`EventLog.check` after each
strategy, because the engine records a ClsimError raised inside it as the strategy's
own failure, and a full disk is not the strategy's fault.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from clsim.errors import ConfigError, ResultsWriteError
from clsim.files import describe_kind, require_file
from clsim.results import write_failure
from clsim.text import shown_path


class EventLog:
    """Append-only JSON-lines log; every record carries its event name and wall time."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.failure: ResultsWriteError | None = None
        self._fd: int | None = None
        if path is not None:
            self._fd = _open_for_appending(path)

    def write(self, event: str, **fields: Any) -> None:
        """Append one whole line, or raise a ResultsWriteError (and remember it)."""
        if self._fd is None:
            return
        if self.failure is not None:
            raise self.failure
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = (json.dumps(record, default=_jsonable) + "\n").encode("utf-8")
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            _cut(self._fd, start)
            self.failure = ResultsWriteError(write_failure(self.path, exc))
            raise self.failure from None

    def check(self) -> None:
        """Raise the write failure met so far, if any."""
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Close the log (every line is already written whole); closing twice is harmless."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_for_appending(path: Path) -> int:
    """``path`` opened to append to, if it is missing or a regular file: opening a named
    pipe to write blocks until a reader comes, and a device is no log (a ConfigError
    naming it). Opened without blocking, and checked again once open, so a pipe put there
    in between is refused too."""
    if os.path.lexists(path):
        require_file(path, "the run's event log")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o666)  # less the umask, as every results file
    except OSError as exc:
        if os.path.lexists(path):
            require_file(path, "the run's event log")  # a pipe with no reader: ENXIO
        raise ResultsWriteError(write_failure(path, exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"the run's event log {shown_path(path)} is "
                              f"{describe_kind(mode)}; expected a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _cut(fd: int, size: int) -> None:
    """Drop a partly written line (truncating needs no free space)."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass  # /dev/full and the like cannot be truncated, and hold nothing to keep


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
