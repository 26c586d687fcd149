"""events.jsonl: one JSON object per line, flushed as written, so a crash loses nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class EventLog:
    """Append-only JSON-lines log; every record carries its event name and wall time."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file = None if path is None else open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
