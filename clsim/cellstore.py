"""cells.jsonl: one JSON record per finished cell, appended whole and synced to disk.

Only the main process writes. Each record is one ``write`` of a complete line followed
by ``fsync``, so a kill at any moment leaves every earlier record intact and at most a
torn last line, which :meth:`CellStore.load` ignores and :meth:`CellStore.open` cuts off.
A write that fails (disk full) is cut off too, and raised as a ResultsWriteError.

Beside it, ``cells.started.json`` (:class:`StartMarks`) counts, per cell, the starts
without a record since: a cell that kills clsim itself (``os._exit``, a segfault) is
retried once by ``--resume`` and then recorded as failed, so the rest of the grid ends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clsim.errors import ResultsWriteError
from clsim.files import require_file
from clsim.results import parse_json, write_failure, write_json_atomic
from clsim.text import short_repr

# the keys every cell record has (grid.CellTask.record), with their types; a finished
# ("ok") record also has the scores the report reads
IDENTITY = {"strategy": str, "budget": str, "budget_index": int, "seed": int}
SCORES = {"final_accuracy": (int, float), "average_incremental_accuracy": (int, float),
          "peak_bytes": int, "memory_mb": (int, float, type(None))}


@dataclass(frozen=True)
class Damaged:
    """A line of cells.jsonl that is not a usable record."""

    line: int
    cell: str | None  # the cell it names, when it names one
    key: str | None  # the key at fault, when one is
    problem: str

    def describe(self, path: Path) -> str:
        where = f"{path}:{self.line}: " + (f"{self.key}: " if self.key else "")
        return where + self.problem


def record_problem(record: dict[str, Any]) -> tuple[str, str] | None:
    """(key, what is wrong) for a record the report cannot place or score, or None."""
    if record.get("status") not in ("ok", "failed"):
        return "status", f"expected 'ok' or 'failed', got {short_repr(record.get('status'))}"
    expected = {**IDENTITY, **(SCORES if record["status"] == "ok" else {})}
    for key, kind in expected.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return key, ("missing key" if key not in record
                         else f"expected {_kind(kind)}, got {short_repr(value)}")
    return None


class CellStore:
    """The finished cells of one comparison, keyed by cell id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.damaged: list[Damaged] = []  # lines skipped by the last load()
        self._fd: int | None = None

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by cell id (a later record of the same cell wins). A torn last line is
        ignored; other lines that are not usable records are skipped and listed in
        :attr:`damaged` (a damaged record followed by a good one of its cell is not)."""
        records: dict[str, dict[str, Any]] = {}
        damaged: dict[str | int, Damaged] = {}
        self.damaged = []
        if not os.path.lexists(self.path):
            return records
        require_file(self.path, "the comparison's cell records")  # /dev/full reads forever
        lines = self.path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line.strip() or number == len(lines):  # the last: torn or empty
                continue
            record, problem = _parse(line)
            if problem is None and record_problem(record) is None:
                records[record["cell"]] = record
                damaged.pop(record["cell"], None)
                continue
            cell = record.get("cell") if isinstance(record, dict) else None
            cell = cell if isinstance(cell, str) else None
            key, problem = record_problem(record) if problem is None else (None, problem)
            if cell is not None:
                records.pop(cell, None)  # its latest record is damaged: not finished
            damaged[cell if cell is not None else number] = Damaged(number, cell, key, problem)
        self.damaged = sorted(damaged.values(), key=lambda d: d.line)
        return records

    def open(self) -> None:
        """Open for appending, first cutting off a torn last line left by a kill."""
        if os.path.lexists(self.path):
            require_file(self.path, "the comparison's cell records")  # a FIFO would block
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                               | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise ResultsWriteError(write_failure(self.path, exc)) from None

    def append(self, record: dict[str, Any]) -> None:
        """Append one whole line and sync it; a failed write leaves the file as it was."""
        view = memoryview((json.dumps(record, sort_keys=False) + "\n").encode("utf-8"))
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while view:  # a regular file takes it in one write; loop in case it does not
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)  # needs no free space
            except OSError:
                pass
            raise ResultsWriteError(write_failure(self.path, exc)) from None

    def close(self) -> None:
        """Close the file (every record is already synced); closing twice is harmless."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StartMarks:
    """``cells.started.json``: cell id -> starts in a row without a record (rewritten
    atomically). Never read as results: the report reads cells.jsonl alone."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: dict[str, int] = {}
        self._this_run: set[str] = set()

    def load(self) -> str | None:
        """Read the marks; returns a warning when the file is damaged (then no marks)."""
        if not os.path.lexists(self.path):
            return None
        require_file(self.path, "the comparison's start marks")  # a FIFO would block
        try:
            data, problem, _ = parse_json(self.path.read_bytes(), "start marks")
        except OSError as exc:
            data, problem = None, exc.strerror or type(exc).__name__
        if problem is not None:
            return f"{self.path} cannot be read ({problem}); cells that crashed clsim " \
                   "before are not known, and are retried"
        if isinstance(data, dict):
            self.counts = {k: v for k, v in data.items()
                           if isinstance(k, str) and isinstance(v, int) and v > 0}
        return None

    def started(self, cell: str) -> None:
        """Count a start of ``cell`` (once per clsim process: a pool that requeues a cell
        after another one's worker died does not count it twice)."""
        if cell in self._this_run:
            return
        self._this_run.add(cell)
        self.counts[cell] = self.counts.get(cell, 0) + 1
        write_json_atomic(self.path, self.counts)

    def finished(self, cell: str) -> None:
        """``cell`` has a record now (or will not run): forget its starts."""
        self._this_run.discard(cell)
        if self.counts.pop(cell, None) is not None:
            write_json_atomic(self.path, self.counts)

    def forget(self, cells: Iterable[str]) -> None:
        """Forget the starts of ``cells``, which were running when clsim was stopped by an
        error or the user (not a crash: a crash runs no Python). Never raises an error:
        when the marks cannot be rewritten (disk full), the file is removed (which needs
        no space), so no cell is ever recorded as crashing clsim when it did not; a cell
        that did crash before is then retried once more."""
        cells = [cell for cell in cells if cell in self.counts]
        for cell in cells:
            self._this_run.discard(cell)
            del self.counts[cell]
        if not cells:
            return
        try:
            write_json_atomic(self.path, self.counts)
        except ResultsWriteError:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass


def _parse(line: bytes) -> tuple[Any, str | None]:
    record, problem, _ = parse_json(line, "a cell record")
    if problem is not None:
        return None, problem
    if not isinstance(record, dict) or not isinstance(record.get("cell"), str):
        return record, "not a cell record (no 'cell' name)"
    return record, None


def _kind(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return "a number or null" if type(None) in kind else "a number"
    return kind.__name__

