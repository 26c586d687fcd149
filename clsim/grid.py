"""The comparison grid: strategies x budgets x seeds, and how one cell is run.

A cell is self-contained: :class:`CellTask` carries the scenario's YAML text (not a
path), so a worker process or a Ray node on another machine can rebuild everything from
it; :func:`run_cell` never raises and returns one JSON-ready record, ``status`` "ok" or
"failed" with the error, whatever the cell raised (only the user's Ctrl-C passes).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from clsim.budget import Budget
from clsim.config import ScenarioConfig, parse_scenario
from clsim.errors import ClsimError, ConfigError
from clsim.interrupts import is_contained
from clsim.plugin_manager import joined_tracebacks, recorded_tracebacks
from clsim.text import bounded_str, describe_fault, format_traceback


@dataclass(frozen=True)
class CellTask:
    """Everything a worker needs to run one cell of the grid."""

    scenario_text: str
    source: str
    base_dir: str
    strategy: str
    budget_index: int
    seed: int
    threads: int

    @property
    def cell_id(self) -> str:
        return cell_id(self.strategy, self.budget_label, self.seed)

    def record(self, **fields: Any) -> dict[str, Any]:
        """A cell record: the cell's identity, then ``fields``."""
        return {"cell": self.cell_id, "strategy": self.strategy, "budget": self.budget_label,
                "budget_index": self.budget_index, "seed": self.seed,
                "threads": self.threads, **fields}

    @property
    def budget_label(self) -> str:
        return (
            _scenario(self.scenario_text, self.source, self.base_dir)
            .compare.budgets[self.budget_index]
            .label
        )


def cell_id(strategy: str, budget_label: str, seed: int) -> str:
    return f"{strategy} | {budget_label} | seed {seed}"


def plan(scenario: ScenarioConfig, text: str, threads: int) -> list[CellTask]:
    """Every cell of the scenario's ``compare`` grid, strategy-major, in a fixed order."""
    if scenario.compare is None:
        raise ConfigError(
            "the scenario has no 'compare' section; add one with 'budgets' (and 'seeds'), "
            "e.g. compare: {budgets: ['1MB', '2MB'], seeds: [0, 1, 2]}",
            source=scenario.source,
            key_path="compare",
        )
    names = scenario.compare.strategies or list(scenario.strategies)
    return [
        CellTask(text, scenario.source, scenario.base_dir, name, b, seed, threads)
        for name in names
        for b in range(len(scenario.compare.budgets))
        for seed in scenario.compare.seeds
    ]


@functools.lru_cache(maxsize=4)
def _scenario(text: str, source: str, base_dir: str) -> ScenarioConfig:
    return parse_scenario(text, source=source, base_dir=base_dir)


@functools.lru_cache(maxsize=2)
def _dataset(text: str, source: str, base_dir: str):
    from clsim.assembly import load_scenario_data

    return load_scenario_data(_scenario(text, source, base_dir))


def run_cell(task: CellTask) -> dict[str, Any]:
    """Run one cell and return its record; every failure is recorded, never raised."""
    started = time.perf_counter()
    record = task.record(pid=os.getpid())
    tracebacks: list[str] = []
    try:
        with recorded_tracebacks() as tracebacks:  # every plugin fault, as clsim run keeps
            record.update(_run(task))
    except ClsimError as exc:
        record.update(status="failed", error=bounded_str(exc, 4000))
    except BaseException as exc:  # a bug, or a plugin's sys.exit() or own KeyboardInterrupt:
        if not is_contained(exc):  # one cell's fault must not stop the grid (the user's
            raise  # Ctrl-C does)
        record.update(status="failed", error=describe_fault(exc))
        tracebacks = [*tracebacks, format_traceback(exc)]
    if record.get("status") == "failed" and tracebacks:
        record["traceback"] = joined_tracebacks(tracebacks)
    record.setdefault("wall_seconds", round(time.perf_counter() - started, 3))
    return record


def _run(task: CellTask) -> dict[str, Any]:
    from clsim.assembly import (
        build_scenario_model,
        build_stream,
        execution_settings,
        resolve_device,
    )
    from clsim.engine import run_strategy
    from clsim.memory import model_bytes

    torch.set_num_threads(task.threads)
    scenario = _scenario(task.scenario_text, task.source, task.base_dir)
    point = scenario.compare.budgets[task.budget_index]
    dataset = _dataset(task.scenario_text, task.source, task.base_dir)
    stream = build_stream(scenario, dataset, task.seed)
    # the reference model of the aligned protocol is the scenario's model
    reference = build_scenario_model(scenario, dataset, stream)
    strategy = scenario.strategies[task.strategy]
    if point.budget is None:  # a compute point: each strategy keeps its memory budget
        budget = strategy.budget
    elif point.aligned:
        total = point.resolve(
            model_bytes=0,
            reference_model_bytes=model_bytes(reference),
            sample_bytes=dataset.sample_bytes,
        )
        budget = Budget(bytes=total, text=point.memory_label)
    else:
        budget = point.budget
    compute_budget = strategy.compute_budget if point.compute is None else point.compute
    device = resolve_device(scenario.device)
    outcome = run_strategy(
        scenario,
        dataclasses.replace(strategy, budget=budget, compute_budget=compute_budget),
        dataset,
        stream,
        seed=task.seed,
        device=device,
    )
    result = outcome.to_dict()
    result["memory_mb"] = None if outcome.budget_bytes is None else outcome.budget_bytes / 2**20
    # the cell's budget is the point's label (the report's axis); the memory budget apart
    result["memory_budget"], result["budget"] = result["budget"], point.label
    result["compute_budget"] = None if compute_budget is None else compute_budget.text
    result["class_order"] = list(stream.class_order)
    result["scenario"] = scenario.name
    result["execution"] = execution_settings(scenario, dataset.sample_shape, device)
    return result
