"""Damaged results folders for the bad-input corpus (cases_results.yaml), written at test
time: a summary.json that is torn, nested 100 000 deep, or holds a strategy record that
is not one; a comparison's grid.json that is torn; a cells.jsonl that is a FIFO."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def _summary(tmp: Path, text: str) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "summary.json").write_text(text)


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
}
