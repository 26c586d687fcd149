"""cells.jsonl: one JSON record per finished cell, appended whole and synced to disk.

Only the main process writes. Each record is one ``write`` of a complete line followed
by ``fsync``, so a kill at any moment leaves every earlier record intact and at most a
torn last line, which :meth:`CellStore.load` ignores and :meth:`CellStore.open` cuts off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class CellStore:
    """The finished cells of one comparison, keyed by cell id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by cell id (a later record of the same cell wins); torn lines skipped."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return records
        for line in self.path.read_bytes().splitlines():
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # the torn tail of a killed run (or bytes that are not a record)
            if isinstance(record, dict) and isinstance(record.get("cell"), str):
                records[record["cell"]] = record
        return records

    def open(self) -> None:
        """Open for appending, first cutting off a torn last line left by a kill."""
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        view = memoryview((json.dumps(record, sort_keys=False) + "\n").encode("utf-8"))
        while view:  # a regular file takes it in one write; loop in case it does not
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
