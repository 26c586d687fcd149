"""``clsim compare``: the grid strategies x budgets x seeds, run anywhere, resumable.

The results folder holds ``grid.json`` (the scenario text and the planned cells),
``cells.jsonl`` (one record per finished cell, appended as each finishes) and the report
built from those records. ``--resume`` reruns only cells without a record, so a killed
comparison loses at most the cells that were running.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clsim.assembly import build_stream, load_scenario_data
from clsim.cellstore import CellStore
from clsim.config import parse_scenario, read_scenario_text
from clsim.errors import ConfigError
from clsim.executors import run_inline, run_process_pool, run_ray, threads_per_cell
from clsim.grid import CellTask, plan
from clsim.report import Analysis, write_report
from clsim.results import write_json_atomic

EXECUTORS = ("inline", "local", "ray")


@dataclass
class CompareResult:
    out_dir: Path
    analysis: Analysis
    ran: int
    skipped: int

    @property
    def failed(self) -> list[dict[str, Any]]:
        return self.analysis.failed


def run_compare(
    scenario_path: Path,
    out: Path,
    *,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    resume: bool = False,
    retry_failed: bool = False,
    threads: int | None = None,
    progress: bool = False,
) -> CompareResult:
    """Run (or resume) the comparison of ``scenario_path`` into ``out``, then report."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1; got {workers}")
    text = read_scenario_text(scenario_path)
    scenario = parse_scenario(
        text,
        source=str(scenario_path),
        base_dir=str(scenario_path.parent),
        default_name=scenario_path.stem,
    )
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1; got {threads}")
    if threads is None:
        threads = threads_per_cell(workers if executor != "inline" else 1)
    tasks = plan(scenario, text, threads)
    # fail fast on missing data or a bad stream, before any cell starts
    dataset = load_scenario_data(scenario)
    for seed in scenario.compare.seeds:
        build_stream(scenario, dataset, seed)
    store = CellStore(out / "cells.jsonl")
    _prepare(out, store, text, tasks, resume, executor, workers, threads)
    finished = store.load()
    todo = [
        t
        for t in tasks
        if t.cell_id not in finished or (retry_failed and finished[t.cell_id].get("status") != "ok")
    ]
    bar = _Progress(len(tasks), len(tasks) - len(todo), progress)
    store.open()
    running: set[str] = set()
    try:
        for record in _execute(
            todo,
            executor,
            workers,
            address,
            lambda t: (running.add(t.cell_id), bar.running(running)),
        ):
            running.discard(record["cell"])
            store.append(record)
            bar.done(record, running)
    finally:
        store.close()
        bar.close()
    planned = {t.cell_id for t in tasks}
    records = [r for cid, r in store.load().items() if cid in planned]
    analysis = write_report(out, records, title=f"{scenario.name}: comparison")
    return CompareResult(out, analysis, ran=len(todo), skipped=len(tasks) - len(todo))


def rebuild_report(out: Path) -> Analysis:
    """``clsim report DIR``: every report file again, from ``cells.jsonl`` alone."""
    store = CellStore(out / "cells.jsonl")
    if not store.path.exists():
        raise ConfigError(f"{store.path} not found: not a comparison folder")
    records = list(store.load().values())
    if not records:
        raise ConfigError(f"{store.path} holds no finished cell")
    for record in records:
        _check_record(record, store.path)
    name = records[0].get("scenario", out.name)
    try:
        return write_report(out, records, title=f"{name}: comparison")
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited ok record
        raise ConfigError(
            f"a cell record cannot be reported ({type(exc).__name__}: {exc}); was the file "
            "edited by hand? Rerun the damaged cells with clsim compare --resume",
            source=str(store.path),
        ) from None


# the keys every cell record has (grid.CellTask.record), with their types
_RECORD_KEYS = {"strategy": str, "budget": str, "budget_index": int, "seed": int}


def _check_record(record: dict[str, Any], path: Path) -> None:
    """A record from cells.jsonl has its cell's identity, so the report can place it."""
    for key, kind in _RECORD_KEYS.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing key" if key not in record else f"expected {kind.__name__}, got {value!r}"
            raise ConfigError(
                f"{got} in the record of cell {record['cell']!r}; every record holds "
                f"{', '.join(_RECORD_KEYS)} (was the file edited by hand?)",
                source=str(path), key_path=key,
            )


def _prepare(
    out: Path,
    store: CellStore,
    text: str,
    tasks: list[CellTask],
    resume: bool,
    executor: str,
    workers: int,
    threads: int,
) -> None:
    """Create the folder and grid.json, or check that a resumed one is the same grid."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    grid_file = out / "grid.json"
    if store.path.exists() or grid_file.exists():
        if not resume:
            raise ConfigError(
                f"--out {out} already holds a comparison; pass --resume to "
                "continue it, or choose a new folder"
            )
        previous = json.loads(grid_file.read_text(encoding="utf-8")) if grid_file.exists() else {}
        if previous.get("scenario_sha256") not in (None, digest):
            raise ConfigError(
                f"the scenario changed since the comparison in {out} started; "
                "resume it with the same file, or choose a new folder"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        grid_file,
        {
            "scenario_sha256": digest,
            "scenario": text,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "executor": executor,
            "workers": workers,
            "threads_per_cell": threads,
            "cells": [t.cell_id for t in tasks],
        },
    )


def _execute(tasks: list[CellTask], executor: str, workers: int, address: str | None, on_start):
    if executor == "ray":
        return run_ray(tasks, workers, address, on_start)
    if executor == "inline" or workers == 1:
        return run_inline(tasks, on_start)
    return run_process_pool(tasks, workers, on_start)


class _Progress:
    """Cells done, failed and running, with an ETA (tqdm on stderr), or nothing."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.failed = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                unit="cell",
                file=sys.stderr,
                desc="cells",
                dynamic_ncols=True,
            )

    def running(self, running: set[str]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(failed=self.failed, running=len(running))

    def done(self, record: dict[str, Any], running: set[str]) -> None:
        self.failed += record.get("status") != "ok"
        if self._bar is not None:
            self._bar.update(1)
            self.running(running)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
