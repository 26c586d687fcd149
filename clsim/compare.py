"""``clsim compare``: the grid strategies x budgets x seeds, run anywhere, resumable.

The results folder holds ``grid.json`` (the scenario text and the planned cells),
``cells.jsonl`` (one record per finished cell, appended as each finishes) and the report
built from those records. ``--resume`` reruns only cells without a record, so a killed
comparison loses at most the cells that were running.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clsim.assembly import build_stream, load_scenario_data
from clsim.bounds import THREADS_MAX, WORKERS_MAX
from clsim.cellstore import IDENTITY, CellStore, StartMarks
from clsim.config import ScenarioConfig, parse_scenario, read_scenario_text
from clsim.errors import ConfigError
from clsim.executors import run_inline, run_process_pool, run_ray, threads_per_cell
from clsim.grid import CellTask, plan
from clsim.report import Analysis, terminal_summary, write_report
from clsim.results import (
    check_out_path,
    open_out_dir,
    read_json_file,
    write_json_atomic,
    write_text_atomic,
)

EXECUTORS = ("inline", "local", "ray")


@dataclass
class CompareResult:
    out_dir: Path
    analysis: Analysis
    ran: int
    skipped: int
    resumed: bool = False

    @property
    def failed(self) -> list[dict[str, Any]]:
        return self.analysis.failed


REPORT_FILES = ("report.md, summary.csv, auc.csv, frontier.csv, accuracy_vs_memory.png, "
                "accuracy_vs_compute.png, frontier.png, tensorboard/")
COMPUTE_PLOTS = ("accuracy_vs_compute.png", "frontier.png")  # written only with compute


def report_files(analysis: Analysis) -> str:
    """:data:`REPORT_FILES` as written for ``analysis``: without the compute figures when
    no cell counted compute (report.md says why)."""
    if analysis.has_compute:
        return REPORT_FILES
    return ", ".join(name for name in REPORT_FILES.split(", ") if name not in COMPUTE_PLOTS)


def compare_summary(result: CompareResult) -> str:
    """What ``clsim compare`` prints on stdout: the rounded tables, then what ran and
    where the report is. Only a resume mentions the finished cells it kept."""
    kept = f", kept {result.skipped} finished ones" if result.resumed else ""
    cached = feature_cache_by_worker(result.analysis.records)
    return (f"{terminal_summary(result.analysis)}\n\n{cached + chr(10) if cached else ''}"
            f"ran {result.ran} cells{kept}; report: {result.out_dir}/"
            f"{report_files(result.analysis)}")


def feature_cache_by_worker(records: list[dict[str, Any]]) -> str:
    """Rows of frozen-encoder features each worker process computed and reused (its
    cache lives as long as the process, across its cells); empty when no cell used it."""
    workers: dict[Any, list[int]] = {}
    for record in records:
        counts = record.get("feature_cache")
        if counts:
            row = workers.setdefault(record.get("pid"), [0, 0, 0, 0])
            row[0] += 1
            row[1] += counts["rows_computed"]
            row[2] += counts["rows_reused"]
            row[3] += counts.get("rows_uncached", 0)
    if not workers:
        return ""
    lines = [f"  worker {pid}: {cells} cells, {computed} rows computed, {reused} reused"
             + (f", {uncached} not kept" if uncached else "")
             for pid, (cells, computed, reused, uncached) in workers.items()]
    return ("frozen-encoder features (the simulator's cache, per worker process; not charged "
            "to strategies):\n" + "\n".join(lines))


def cell_threads(
    scenario: ScenarioConfig, threads: int | None, executor: str, workers: int
) -> int:
    """Torch threads per cell: ``--threads``, else the scenario's pin (so cells repeat
    exactly on any machine), else the cores shared among the concurrent cells."""
    if threads is not None:
        return threads
    return scenario.threads or threads_per_cell(workers if executor != "inline" else 1)


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
    if not 1 <= workers <= WORKERS_MAX:
        raise ConfigError(f"--workers must be from 1 to {WORKERS_MAX}; got {workers}")
    text = read_scenario_text(scenario_path)
    scenario = parse_scenario(
        text,
        source=str(scenario_path),
        base_dir=str(scenario_path.parent),
        default_name=scenario_path.stem,
    )
    if threads is not None and not 1 <= threads <= THREADS_MAX:
        raise ConfigError(f"--threads must be from 1 to {THREADS_MAX}; got {threads}")
    threads = cell_threads(scenario, threads, executor, workers)
    tasks = plan(scenario, text, threads)
    check_out_path(out)  # an --out the OS would refuse fails before anything runs
    # fail fast on missing data or a bad stream, before any cell starts
    dataset = load_scenario_data(scenario)
    for seed in scenario.compare.seeds:
        build_stream(scenario, dataset, seed)
    lock = open_out_dir(out, "compare --resume" if resume else "compare", fresh=False)
    try:
        store = CellStore(out / "cells.jsonl")
        _prepare(out, store, text, tasks, resume, executor, workers, threads)
        finished = store.load()
        _warn_damaged(store, "the cell runs again")
        marks = StartMarks(out / "cells.started.json")
        _warn(marks.load())
        todo = [t for t in tasks
                if t.cell_id not in finished
                or (retry_failed and finished[t.cell_id].get("status") != "ok")]
        if not os.path.lexists(store.path):  # created like every other results file
            write_text_atomic(store.path, "")
        store.open()
        try:
            todo = _give_up_crashing(todo, store, marks, retry_failed, finished)
            _run_cells(todo, store, marks, _Progress(len(tasks), len(tasks) - len(todo),
                                                     progress), executor, workers, address)
        finally:
            store.close()
        planned = {t.cell_id for t in tasks}
        records = [r for cid, r in store.load().items() if cid in planned]
        analysis = write_report(out, records, title=f"{scenario.name}: comparison")
    finally:
        lock.release()
    return CompareResult(out, analysis, ran=len(todo), skipped=len(tasks) - len(todo),
                         resumed=resume)


# what a cell that killed clsim twice in a row is recorded with
CRASHED = ("crashed clsim twice while running (the process running the grid died, e.g. "
           "os._exit or a segfault in a plugin); --resume --retry-failed runs it again")


def _give_up_crashing(todo: list[CellTask], store: CellStore, marks: StartMarks,
                      retry_failed: bool, finished: dict[str, Any]) -> list[CellTask]:
    """Record as failed the cells that started twice and never finished (each crashed
    clsim), so the rest of the grid can finish; returns the cells still to run. With
    ``--retry-failed``, a cell recorded failed this way before runs again."""
    still = []
    for task in todo:
        again = retry_failed and task.cell_id in finished
        if marks.counts.get(task.cell_id, 0) >= 2 and not again:
            store.append(task.record(status="failed", error=CRASHED))
            marks.finished(task.cell_id)
            _warn(f"cell {task.cell_id!r} {CRASHED}")
            continue
        if again:
            marks.finished(task.cell_id)  # a fresh count for the retry
        still.append(task)
    return still


def _run_cells(todo: list[CellTask], store: CellStore, marks: StartMarks, bar: _Progress,
               executor: str, workers: int, address: str | None) -> None:
    """Run ``todo``, appending each record as it comes; a cell is marked started first,
    so one that kills clsim is known to the next --resume."""
    running: set[str] = set()

    def started(task: CellTask) -> None:
        marks.started(task.cell_id)
        running.add(task.cell_id)
        bar.running(running)

    records = _execute(todo, executor, workers, address, started)
    try:
        for record in records:
            store.append(record)
            running.discard(record["cell"])  # only once its record is safe
            marks.finished(record["cell"])
            bar.done(record, running)
    except BaseException:
        # whatever reached here (Ctrl-C, SIGTERM, a full disk, a bug) ran Python: the
        # cells running did not crash clsim, so their starts are not held against them;
        # forget() never raises, so the error that stopped the grid is the one shown
        marks.forget(running)
        raise
    finally:
        getattr(records, "close", lambda: None)()  # stop the executor's workers
        bar.close()


def _warn_damaged(store: CellStore, then: str) -> None:
    """One warning per damaged line of cells.jsonl, saying what clsim does with it."""
    shown = store.damaged[:10]
    for damaged in shown:
        action = then if damaged.cell is not None else "skipped"
        _warn(f"{damaged.describe(store.path)}; {action}")
    if len(store.damaged) > len(shown):
        _warn(f"{len(store.damaged) - len(shown)} more damaged lines in {store.path}")


def _warn(message: str | None) -> None:
    if message:
        print(f"clsim: warning: {message}", file=sys.stderr)


def rebuild_report(out: Path) -> Analysis:
    """``clsim report DIR``: every report file again, from ``cells.jsonl`` alone. A
    damaged record of a cell stops it, naming the line and key; lines that are not
    records at all are skipped with a warning."""
    store = CellStore(out / "cells.jsonl")
    if not store.path.exists():
        raise ConfigError(f"{store.path} not found: not a comparison folder")
    with open_out_dir(out, "report", fresh=False, argument="DIR"):
        records = list(store.load().values())
        for damaged in store.damaged:
            if damaged.cell is not None:
                raise ConfigError(
                    f"{damaged.problem} in the record of cell {damaged.cell!r} (line "
                    f"{damaged.line}); every record holds {', '.join(IDENTITY)}, and a "
                    "finished one its scores (was the file edited by hand? clsim compare "
                    "--resume runs the damaged cells again)",
                    source=str(store.path), key_path=damaged.key,
                )
        if not records:
            raise ConfigError(f"{store.path} holds no finished cell")
        _warn_damaged(store, "skipped")
        name = records[0].get("scenario", out.name)
        return write_report(out, records, title=f"{name}: comparison")


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
        previous = _read_grid(grid_file) if grid_file.exists() else {}
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


def _read_grid(path: Path) -> dict[str, Any]:
    """grid.json of a comparison to resume; a damaged one stops the resume, naming it."""
    grid = read_json_file(path, "--resume: the grid file",
                          "restore it, or choose a new folder")
    if not isinstance(grid, dict):
        raise ConfigError("--resume: not a comparison's grid file (expected a mapping); "
                          "restore it, or choose a new folder", source=str(path))
    return grid


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
