"""Same seed, same numbers: across processes, hash seeds and every compare executor.

test_engine.py checks two in-process runs of naive and replay. Here the strategies include
plugins with generators of their own (replay's reservoir, MEMO's sampling and
augmentation, PRD's order and augmentation), and the same seed must give byte-identical
metrics in another interpreter with another hash seed, and in a comparison cell on each
executor (inline, a process pool, a local Ray cluster) as in ``clsim run``. Different
seeds must draw different class orders and give different results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from clsim.compare import run_compare
from clsim.compute import without_clocks as compute_without_clocks
from clsim.config import parse_scenario
from clsim.runner import run_scenario

SCENARIO = """\
name: determinism
seed: 0
threads: 1
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [32]}
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.1, momentum: 0.9}}
budget: 6 models + 100 exemplars
strategies:
  naive: {plugins: [naive]}
  replay: {plugins: [replay]}
  memo: {plugins: [memo]}
  prd: {plugins: [prd]}
compare:
  budgets: ['6 models + 100 exemplars']
  seeds: [0]
"""
CLOCKS = ("wall_seconds", "feature_cache", "pid")  # measurements of the process


def without_clocks(entry: dict) -> dict:
    """The entry without clock readings: its own and its compute meter's (the counts stay:
    the same run counts the same FLOPs, steps and samples on every executor)."""
    return {k: v for k, v in compute_without_clocks(entry).items() if k not in CLOCKS}


def summary_json(summary: dict) -> str:
    """summary.json as written, without wall-clock times: the bytes that must repeat."""
    strategies = {n: without_clocks(s) for n, s in summary["strategies"].items()}
    return json.dumps({**summary, "strategies": strategies}, indent=2)


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("determinism") / "d.yaml"
    path.write_text(SCENARIO, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def in_process(scenario_file) -> dict:
    """``clsim run`` of the scenario, in this process."""
    out = scenario_file.parent / "run-here"
    from clsim.config import load_scenario

    result = run_scenario(load_scenario(scenario_file), out)
    assert not result.failed, [o.error for o in result.failed]
    return json.loads((out / "summary.json").read_text())


def cells(out: Path) -> dict[str, dict]:
    return {r["cell"]: without_clocks(r)
            for r in map(json.loads, (out / "cells.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def inline_cells(scenario_file) -> dict[str, dict]:
    out = scenario_file.parent / "inline"
    run_compare(scenario_file, out, executor="inline", threads=1)
    return cells(out)


def test_a_second_interpreter_with_another_hash_seed_repeats_every_byte(in_process,
                                                                          scenario_file):
    out = scenario_file.parent / "run-there"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set and dict orders differ
    proc = subprocess.run([sys.executable, "-m", "clsim.cli", "run", str(scenario_file),
                           "--out", str(out), "--no-progress"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    there = json.loads((out / "summary.json").read_text())
    assert summary_json(there) == summary_json(in_process)
    assert {s["status"] for s in there["strategies"].values()} == {"ok"}


def test_a_compare_cell_equals_the_same_strategy_in_clsim_run(in_process, inline_cells):
    assert len(inline_cells) == 4
    for record in inline_cells.values():
        assert record["status"] == "ok", record["error"]
        run_entry = without_clocks(in_process["strategies"][record["strategy"]])
        assert {k: record[k] for k in run_entry} == run_entry
        assert record["class_order"] == in_process["class_order"]


@pytest.mark.xdist_group("ray")  # one Ray cluster at a time
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_every_executor_gives_the_same_records(executor, inline_cells, scenario_file,
                                               monkeypatch):
    if executor == "ray":  # a local cluster on loopback only, as tests/test_compare.py
        monkeypatch.setenv("RAY_ADDRESS", "")
    out = scenario_file.parent / executor
    run_compare(scenario_file, out, executor=executor, workers=2, threads=1)
    found = cells(out)
    assert found == inline_cells
    pids = {json.loads(line)["pid"] for line in (out / "cells.jsonl").read_text().splitlines()}
    assert os.getpid() not in pids  # the cells really ran elsewhere


def test_different_seeds_draw_different_orders_and_results():
    scenario = parse_scenario(SCENARIO)
    summaries = [run_scenario(scenario, None, seed=seed).summary for seed in range(6)]
    orders = [tuple(s["class_order"]) for s in summaries]
    assert len(set(orders)) == 6
    for name in scenario.strategies:
        matrices = [json.dumps(s["strategies"][name]["accuracy_matrix"]) for s in summaries]
        assert len(set(matrices)) == 6, name


def test_with_the_class_order_pinned_a_new_seed_still_changes_every_strategy():
    """With the class order pinned, a different seed still changes every strategy: the
    model's initial weights, the batch order and each plugin's private generator."""
    text = SCENARIO.replace("n_experiences: 5}", "n_experiences: 5, shuffle_classes: false}")
    scenario = parse_scenario(text)
    a, b = (run_scenario(scenario, None, seed=seed).summary for seed in (3, 4))
    assert a["class_order"] == b["class_order"] == list(range(10))
    for name in scenario.strategies:
        assert a["strategies"][name]["accuracy_matrix"] != b["strategies"][name]["accuracy_matrix"]
