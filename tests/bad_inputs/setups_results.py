"""Damaged results folders for the bad-input corpus (cases_results.yaml), written at test
time: a summary.json that is torn, nested 100 000 deep, holds a strategy record that is
not one, or a number of 5000 digits; a comparison's grid.json that is torn or holds such a
number; a cells.jsonl, a cells.started.json or (beside a real run's summary) an
events.jsonl that is a FIFO."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def _summary(tmp: Path, text: str) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "summary.json").write_text(text)


# more digits than Python converts to an int (4300): json.loads raises a plain ValueError
HUGE = "1" * 5000


def _started_fifo(tmp: Path) -> None:
    """A comparison to resume whose start marks are a named pipe."""
    (tmp / "out").mkdir()
    (tmp / "out" / "grid.json").write_text('{"scenario_sha256": null}\n')
    (tmp / "out" / "cells.jsonl").write_text("")
    os.mkfifo(tmp / "out" / "cells.started.json")


def _events_fifo(tmp: Path) -> None:
    """A real run (so --resume accepts its summary) whose events.jsonl is a named pipe."""
    from clsim.cli import main

    assert main(["run", "quickstart", "--out", str(tmp / "out"), "--no-progress",
                 "--limit", "5"]) == 0
    (tmp / "out" / "events.jsonl").unlink()
    os.mkfifo(tmp / "out" / "events.jsonl")


def _cells_fifo(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "grid.json").write_text('{"scenario_sha256": null}\n')
    os.mkfifo(tmp / "out" / "cells.jsonl")


SETUPS: dict[str, Callable[[Path], None]] = {
    "results_summary_torn": lambda tmp: _summary(tmp, '{\n  "strategies": {\n    "naive": {'),
    "results_summary_deep": lambda tmp: _summary(tmp, "[" * 100_000 + "]" * 100_000),
    "results_summary_bad_record": lambda tmp: _summary(
        tmp, '{"strategies": {"naive": {"status": "ok", "peak_bytes": "many"}}}\n'),
    "results_grid_torn": lambda tmp: (
        (tmp / "out").mkdir(), (tmp / "out" / "grid.json").write_text('{"scenario_sha256": ')),
    "results_cells_fifo": _cells_fifo,
    "results_started_fifo": _started_fifo,
    "results_events_fifo": _events_fifo,
    "results_summary_huge_int": lambda tmp: _summary(
        tmp, '{"strategies": {}, "seed": ' + HUGE + "}\n"),
    "results_grid_huge_int": lambda tmp: (
        (tmp / "out").mkdir(),
        (tmp / "out" / "grid.json").write_text('{"scenario_sha256": ' + HUGE + "}\n")),
}
