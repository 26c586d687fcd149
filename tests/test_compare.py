"""clsim compare: the statistics, the executors, the results store, resume and the report."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import REPO_ROOT, run_cli

from clsim.budget import BudgetPoint
from clsim.config import parse_scenario
from clsim.errors import ConfigError
from clsim.stats import PairedTest, auc, holm, mean_ci, paired_tests

GRID = """\
name: tiny_grid
data: {dataset: digits}
stream: {n_experiences: 5}
model: {name: mlp, hidden: [32]}
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.1}}
strategies:
  naive:
    plugins: [naive]
  replay:
    plugins: [replay]
compare:
  budgets: [{aligned: model + 60 exemplars}, {aligned: model + 200 exemplars}]
  seeds: [0, 1]
"""


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def test_auc_by_hand():
    # trapezoids: (2-1) * (0.5+0.7)/2 = 0.6 and (4-2) * (0.7+0.6)/2 = 1.3 -> 1.9
    assert auc([1.0, 2.0, 4.0], [0.5, 0.7, 0.6]) == pytest.approx(1.9, abs=1e-15)
    assert auc([4.0, 1.0, 2.0], [0.6, 0.5, 0.7]) == pytest.approx(1.9, abs=1e-15)  # any order
    assert auc([3.0], [0.9]) == 0.0
    with pytest.raises(ValueError, match="2 memory points but 1"):
        auc([1.0, 2.0], [0.5])


def test_auc_on_the_memo_budget_axis():
    # constant accuracy a over [7.63, 23.54] MB integrates to a * 15.91
    points = [7.63, 12.4, 16.0, 19.8, 23.54]
    assert auc(points, [0.7] * 5) == pytest.approx(0.7 * (23.54 - 7.63), abs=1e-12)


def test_confidence_interval_on_a_known_sample():
    # 1..5: mean 3, s = sqrt(2.5), sem = s / sqrt(5) = 0.70710678; t(0.975, 4) = 2.77644511
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert ci.mean == 3.0 and ci.n == 5
    assert ci.half_width == pytest.approx(2.7764451051977987 * math.sqrt(2.5 / 5), rel=1e-12)
    assert (ci.low, ci.high) == pytest.approx((3.0 - ci.half_width, 3.0 + ci.half_width))
    single = mean_ci([0.4])
    assert single.half_width is None and single.low is None
    with pytest.raises(ValueError):
        mean_ci([])


def test_holm_adjustment_by_hand():
    tests = [
        PairedTest("a", "b", 0.1, 3, 0.01),
        PairedTest("a", "c", 0.1, 3, 0.04),
        PairedTest("b", "c", 0.1, 3, 0.03),
        PairedTest("c", "d", 0.0, 1, None),
    ]
    # sorted p: 0.01*3 = 0.03; 0.03*2 = 0.06; 0.04*1 = 0.04 -> monotone 0.06
    adjusted = [t.p_adjusted for t in holm(tests)]
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and adjusted[3] is None


def test_paired_tests_use_common_seeds_and_detect_a_clear_difference():
    scores = {
        "good": {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.93},
        "bad": {0: 0.50, 1: 0.53, 2: 0.50, 3: 0.52, 4: 0.99},
    }  # seed 4 is unpaired
    (test,) = paired_tests(scores)
    assert (test.a, test.b, test.n) == ("bad", "good", 4)
    assert test.mean_difference == pytest.approx(-0.4025)
    assert test.significant()


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def test_budget_points():
    assert BudgetPoint.parse("2MB").budget.bytes == 2 * 2**20
    aligned = BudgetPoint.parse({"aligned": "model + 10 exemplars"})
    assert aligned.aligned and aligned.label == "aligned: model + 10 exemplars"
    # aligned: 'model' is the reference model, whatever the strategy's own model is
    assert aligned.resolve(model_bytes=999, reference_model_bytes=100, sample_bytes=3) == 130
    assert (
        BudgetPoint.parse("model").resolve(
            model_bytes=999, reference_model_bytes=100, sample_bytes=3
        )
        == 999
    )
    with pytest.raises(ValueError, match="unknown key 'aligend' in a budget point"):
        BudgetPoint.parse({"aligend": "1MB"})


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("seeds: [0, 1]", "seeds: [0, 0]", "seeds must differ"),
        ("budgets: [{aligned", "budgets: ['1MB', '1MB', {aligned", "repeated: 1MB"),
        ("seeds: [0, 1]", "seeds: []", "at least 1 item"),
        ("seeds: [0, 1]", "seeds: [0, 1]\n  strategies: [naive, replya]", "did you mean 'replay'"),
        ("{aligned: model + 60 exemplars}", "{aligned: 5 parsecs}", "unknown unit 'parsecs'"),
    ],
)
def test_bad_compare_sections(old, new, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_scenario(GRID.replace(old, new))


# ---------------------------------------------------------------------------
# the grid, end to end
# ---------------------------------------------------------------------------


def compare(tmp_path, *args, text=GRID, name="g.yaml", env=None):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return run_cli("compare", str(path), "--no-progress", "--threads", "1", *args, env=env)


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inline")
    proc = compare(tmp, "--out", str(tmp / "out"), "--executor", "inline")
    return proc, tmp / "out"


def test_compare_writes_every_report_file(inline_run):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    proc, out = inline_run
    assert proc.returncode == 0, proc.stderr
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 8  # header + 2 strategies x 2 budgets x 2 seeds
    auc_rows = (out / "auc.csv").read_text().splitlines()
    assert auc_rows[0].startswith("strategy,auc_a_pct,auc_a_pct_ci95,auc_l_pct,auc_l_pct_ci95,"
                                  "seeds")
    assert len(auc_rows) == 3
    report = (out / "report.md").read_text()
    for section in (
        "Area under accuracy",
        "Last accuracy at each budget",
        "Ranking and paired tests",
    ):
        assert section in report
    assert (out / "accuracy_vs_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(out / "tensorboard" / "hparams"))
    multiplexer.Reload()
    runs = [r for r in multiplexer.Runs() if r != "."]
    assert len(runs) == 8


def test_records_hold_what_the_report_needs(inline_run):
    _, out = inline_run
    records = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert len(records) == len({r["cell"] for r in records}) == 8
    for r in records:
        assert r["status"] == "ok" and r["threads"] == 1
        assert r["budget_bytes"] == round(r["memory_mb"] * 2**20)
        assert r["peak_bytes"] <= r["budget_bytes"]
        assert r["execution"]["memory_format"] == {  # an mlp, on any device
            "training": "contiguous", "evaluation": "contiguous"}
        assert r["execution"]["eval_batch_size_from"] in ("model kind mlp", "default for cuda")
    # naive keeps nothing: its accuracy cannot depend on the budget, only on the seed
    naive = {
        (r["seed"], r["budget"]): r["final_accuracy"] for r in records if r["strategy"] == "naive"
    }
    assert (
        naive[(0, "aligned: model + 60 exemplars")] == naive[(0, "aligned: model + 200 exemplars")]
    )


def test_report_is_rebuilt_from_cells_jsonl_alone(inline_run, tmp_path):
    _, out = inline_run
    (tmp_path / "only").mkdir()
    shutil.copy(out / "cells.jsonl", tmp_path / "only" / "cells.jsonl")
    proc = run_cli("report", str(tmp_path / "only"))
    assert proc.returncode == 0, proc.stderr
    for name in ("summary.csv", "auc.csv", "report.md"):
        assert (tmp_path / "only" / name).read_text() == (out / name).read_text()


def test_process_pool_gives_the_same_summary_csv(inline_run, tmp_path):
    _, inline_out = inline_run
    proc = compare(
        tmp_path, "--out", str(tmp_path / "pool"), "--executor", "local", "--workers", "2"
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pool" / "summary.csv").read_text() == (
        inline_out / "summary.csv"
    ).read_text()
    pids = {json.loads(line)["pid"] for line in (tmp_path / "pool" / "cells.jsonl").open()}
    assert len(pids) == 2  # two worker processes shared the cells


@pytest.mark.xdist_group("ray")  # one Ray cluster at a time
def test_ray_local_cluster_gives_the_same_summary_csv(inline_run, tmp_path):
    _, inline_out = inline_run
    proc = compare(tmp_path, "--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ray" / "summary.csv").read_text() == (
        inline_out / "summary.csv"
    ).read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("ray")  # one Ray cluster at a time
def test_ray_cluster_started_with_ray_start_on_loopback(inline_run, tmp_path):
    """A cluster started by 'ray start --head' on loopback, reached through --address with
    Ray's token authentication (the driver opts in with RAY_AUTH_MODE=token); beside it, a
    compare without --address starts and uses a local cluster of its own."""
    _, inline_out = inline_run
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    # Ray binds to the machine's network address unless told to stay on loopback
    loopback = {"RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = {**os.environ, **loopback}
    start = subprocess.run(
        [ray, "start", "--head", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    assert "Local node IP: 127.0.0.1" in start.stdout + start.stderr
    try:
        proc = compare(tmp_path, "--out", str(tmp_path / "cluster"), "--executor", "ray",
                       "--address", f"127.0.0.1:{port}",
                       env={**loopback, "RAY_AUTH_MODE": "token"})
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "cluster" / "summary.csv").read_text() == \
            (inline_out / "summary.csv").read_text()
        # without --address clsim starts a cluster of its own, never joins the one that
        # happens to run on the machine (another user's, or another clsim's)
        proc = compare(tmp_path, "--out", str(tmp_path / "own"), "--executor", "ray",
                       env=loopback)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "own" / "summary.csv").read_text() == \
            (inline_out / "summary.csv").read_text()
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)


def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path):
    text = GRID.replace("budgets: [", "budgets: ['1KB', ")  # too small for replay's model
    proc = compare(tmp_path, "--out", str(tmp_path / "out"), "--executor", "inline", text=text)
    assert proc.returncode == 1
    assert "2 cell(s) failed" in proc.stderr and "Traceback" not in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").open()]
    assert len(records) == 12
    failed = [r for r in records if r["status"] == "failed"]
    assert {(r["strategy"], r["budget"]) for r in failed} == {("replay", "1KB")}
    assert all("minimum budget" in r["error"] for r in failed)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Failed cells" in report and "## Over budget" in report  # naive at 1KB


def test_resume_after_sigkill_redoes_nothing_and_loses_nothing(tmp_path):
    text = GRID.replace("seeds: [0, 1]", "seeds: [0, 1, 2]").replace("epochs: 1", "epochs: 3")
    path = tmp_path / "g.yaml"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    cells = out / "cells.jsonl"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clsim.cli",
            "compare",
            str(path),
            "--out",
            str(out),
            "--executor",
            "inline",
            "--threads",
            "1",
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if cells.exists() and len(cells.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    before = cells.read_bytes()
    done_before = [json.loads(line)["cell"] for line in before.splitlines() if line.endswith(b"}")]
    assert 3 <= len(done_before) < 12, "the kill should land mid-grid"
    proc = run_cli(
        "compare",
        str(path),
        "--out",
        str(out),
        "--executor",
        "inline",
        "--threads",
        "1",
        "--no-progress",
        "--resume",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ran {12 - len(done_before)} cells, kept {len(done_before)}" in proc.stdout
    after = cells.read_bytes()
    complete_prefix = before[: before.rfind(b"\n") + 1]
    assert after.startswith(complete_prefix)  # finished records untouched
    ids = [json.loads(line)["cell"] for line in after.splitlines()]
    assert len(ids) == len(set(ids)) == 12  # none lost, none duplicated
    assert len((out / "summary.csv").read_text().splitlines()) == 13


def test_out_with_a_comparison_needs_resume(inline_run):
    _, out = inline_run
    proc = run_cli("compare", str(out.parent / "g.yaml"), "--out", str(out), "--no-progress")
    assert proc.returncode == 2 and "pass --resume" in proc.stderr


def test_resume_refuses_a_changed_scenario(inline_run, tmp_path):
    _, out = inline_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    changed = GRID.replace("seeds: [0, 1]", "seeds: [0, 1, 2]")
    proc = compare(tmp_path, "--out", str(copy), "--resume", text=changed)
    assert proc.returncode == 2 and "scenario changed" in proc.stderr


def test_scenario_without_compare_section(tmp_path):
    text = GRID.split("compare:")[0]
    proc = compare(tmp_path, "--out", str(tmp_path / "o"), text=text)
    assert proc.returncode == 2 and "no 'compare' section" in proc.stderr


def test_thread_and_worker_counts_are_checked(tmp_path):
    from pathlib import Path

    from clsim.compare import run_compare

    path = tmp_path / "g.yaml"
    path.write_text(GRID, encoding="utf-8")
    with pytest.raises(ConfigError, match="--threads must be from 1 to 1024; got -1"):
        run_compare(Path(path), tmp_path / "o", threads=-1)
    # library callers get the command line's bounds (a huge thread count crashes torch)
    with pytest.raises(ConfigError, match="--threads must be from 1 to 1024; got 100000000"):
        run_compare(Path(path), tmp_path / "o", threads=10**8)
    with pytest.raises(ConfigError, match="--workers must be from 1 to 1024; got 1025"):
        run_compare(Path(path), tmp_path / "o", workers=1025)
    assert not (tmp_path / "o").exists()
    proc = run_cli("compare", str(path), "--workers", "0")
    assert proc.returncode == 2 and "expected a positive integer; got '0'" in proc.stderr


def test_cells_run_at_the_scenarios_pinned_thread_count():
    """A scenario's 'threads:' pins every cell (so a grid repeats exactly on any machine);
    --threads overrides it; without either, the cores are shared among the workers."""
    from clsim.compare import cell_threads
    from clsim.executors import threads_per_cell

    pinned = parse_scenario(GRID.replace("name: tiny_grid", "name: tiny_grid\nthreads: 3", 1))
    unpinned = parse_scenario(GRID)
    assert pinned.threads == 3 and unpinned.threads is None
    assert cell_threads(pinned, None, "local", 2) == 3
    assert cell_threads(pinned, 5, "local", 2) == 5
    assert cell_threads(unpinned, None, "local", 2) == threads_per_cell(2)
    assert cell_threads(unpinned, None, "inline", 2) == threads_per_cell(1)
