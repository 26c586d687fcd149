"""What a person reads: compare's terminal tables, units, AUC rule, ties in the ranking,
one colour per strategy, file modes, and the run figure (run.png)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from clsim.colours import PALETTE, strategy_colour, strategy_style
from clsim.config import load_scenario, parse_scenario
from clsim.report import NO_AUC, analyse, auc_csv, report_markdown, terminal_summary
from clsim.stats import PairedTest, mean_over_memory, rank_groups, ranking_text

PNG = b"\x89PNG\r\n\x1a\n"

GRID = """\
name: reader_grid
threads: 1
data: {dataset: digits}
stream: {n_experiences: 2}
model: {name: mlp, hidden: [16]}
budget: model + 60 exemplars  # for clsim run
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.1}}
strategies:
  naive:
    plugins: [naive]
  replay:
    plugins: [replay]
compare:
  budgets: [{aligned: model + 40 exemplars}, {aligned: model + 120 exemplars}]
  seeds: [0, 1]
"""


def _record(strategy, budget_index, seed, last, average, mb):
    return {"cell": f"{strategy} | b{budget_index} | seed {seed}", "strategy": strategy,
            "budget": f"b{budget_index}", "budget_index": budget_index, "seed": seed,
            "status": "ok", "memory_mb": mb, "budget_bytes": round(mb * 2**20),
            "final_accuracy": last, "average_incremental_accuracy": average,
            "peak_bytes": 1, "over_budget": False}


# ---------------------------------------------------------------------------
# statistics: the mean over the memory range, ties
# ---------------------------------------------------------------------------


def test_mean_over_memory_is_the_area_over_the_range_width():
    # trapezoids 0.6 + 1.3 = 1.9 over a range of 3 MB
    assert mean_over_memory([1.0, 2.0, 4.0], [0.5, 0.7, 0.6]) == pytest.approx(1.9 / 3)
    assert mean_over_memory([7.6, 12.0, 23.5], [70.0] * 3) == pytest.approx(70.0)
    assert mean_over_memory([3.0], [0.9]) is None  # one budget: no range
    assert mean_over_memory([2.0, 2.0], [0.5, 0.7]) is None  # a range of width zero


def _test(a, b, difference, p):
    return PairedTest(a, b, difference, 3, p, p)


def test_rank_groups_split_only_where_everything_across_is_significant():
    means = {"a": 0.9, "b": 0.85, "c": 0.3}
    tests = [_test("a", "b", 0.05, 0.4), _test("a", "c", 0.6, 0.01), _test("b", "c", 0.55, 0.02)]
    assert ranking_text(rank_groups(means, tests)) == "a ≈ b > c"
    # a beats c, but b is told apart from neither: no split, whatever a - c says
    tests[2] = _test("b", "c", 0.55, 0.2)
    assert ranking_text(rank_groups(means, tests)) == "a ≈ b ≈ c"
    # every pair significant: a strict order
    tests = [_test("a", "b", 0.05, 0.01), _test("a", "c", 0.6, 0.01), _test("b", "c", 0.5, 0.01)]
    assert ranking_text(rank_groups(means, tests)) == "a > b > c"


def test_rank_groups_need_a_p_value_and_the_ranked_direction():
    means = {"a": 0.9, "b": 0.5}
    assert rank_groups(means, [_test("a", "b", 0.4, None)]) == [["a", "b"]]  # no p-value
    # significant, but on the common seeds b beats a: not a split in the ranked direction
    assert rank_groups(means, [_test("a", "b", -0.1, 0.01)]) == [["a", "b"]]
    assert rank_groups({}, []) == []


# ---------------------------------------------------------------------------
# the report and the terminal: units, the AUC rule, ties
# ---------------------------------------------------------------------------


def _two_budget_records():
    # good: 80% then 90% (mean over the range 85%); bad: 40% flat; seeds differ a little
    records = []
    for seed, jitter in ((0, 0.0), (1, 0.01), (2, -0.01)):
        records += [_record("good", 0, seed, 0.8 + jitter, 0.8, 1.0),
                    _record("good", 1, seed, 0.9 + jitter, 0.9, 3.0),
                    _record("bad", 0, seed, 0.4, 0.4 + jitter, 1.0),
                    _record("bad", 1, seed, 0.4 + jitter / 2, 0.4, 3.0)]
    return records


def test_auc_is_a_mean_accuracy_in_percent_everywhere():
    analysis = analyse(_two_budget_records())
    rows = {r["strategy"]: r for r in analysis.auc_rows}
    assert rows["good"]["auc_a_pct"] == pytest.approx(85.0)
    assert rows["bad"]["auc_a_pct"] == pytest.approx(40.0)
    header, *lines = auc_csv(analysis).splitlines()
    assert header == ("strategy,auc_a_pct,auc_a_pct_ci95,auc_l_pct,auc_l_pct_ci95,seeds,"
                      "memory_mb_from,memory_mb_to,auc_a_compute_pct,auc_a_compute_pct_ci95,"
                      "auc_l_compute_pct,auc_l_compute_pct_ci95,compute_seeds,"
                      "learning_flops_from,learning_flops_to")
    # these records carry no compute: its columns are empty, no compute seed
    assert lines[1].startswith("good,85.0,") and lines[1].endswith(",3,1.0,3.0,,,,,0,,")
    report = report_markdown(analysis, "t")
    assert "| good | 85.00 ± 0.00 | 85.00 ± 2.48 | 1 to 3 | 3 |" in report
    assert "the mean accuracy over that range in %" in report
    shown = terminal_summary(analysis)
    assert "mean accuracy over the memory range" in shown
    rows = [line.split() for line in shown.splitlines()]
    assert ["good", "85.0", "±", "0.0", "85.0", "±", "2.5", "1", "to", "3", "3"] in rows


def test_one_budget_has_no_auc_and_says_so():
    analysis = analyse([r for r in _two_budget_records() if r["budget_index"] == 0])
    assert auc_csv(analysis).splitlines() == [auc_csv(analysis).splitlines()[0]]  # header
    assert NO_AUC in report_markdown(analysis, "t")
    assert NO_AUC in terminal_summary(analysis)
    assert "AUC-A" not in terminal_summary(analysis)  # no "AUC 0 ± 0"


def test_ties_are_not_ranked_with_greater_than():
    records = _two_budget_records()
    # "close" differs from good by noise only; both clearly beat bad
    records += [_record("close", b, seed, r["final_accuracy"] + (0.02 if seed else -0.02),
                        0.8, r["memory_mb"])
                for r in records if r["strategy"] == "good"
                for b, seed in [(r["budget_index"], r["seed"])]]
    analysis = analyse(records)
    assert ranking_text(analysis.ranking("b1")) == "close ≈ good > bad"
    report = report_markdown(analysis, "t")
    assert "- **b1**: close ≈ good > bad" in report
    assert "everywhere else '≈'" in report
    assert "close ≈ good > bad" in terminal_summary(analysis)


# ---------------------------------------------------------------------------
# compare end to end: the terminal text, resume, file modes, colours
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    from clsim.compare import run_compare

    tmp = tmp_path_factory.mktemp("reader")
    path = tmp / "grid.yaml"
    path.write_text(GRID, encoding="utf-8")
    return path, run_compare(path, tmp / "out", executor="inline")


def test_a_fresh_compare_prints_rounded_tables_and_no_kept_cells(grid_run):
    from clsim.compare import compare_summary, run_compare

    path, result = grid_run
    shown = compare_summary(result)
    assert "kept" not in shown and "ran 8 cells; report:" in shown
    assert "strategy,auc_a" not in shown  # not the raw CSV
    assert "AUC-A (average)" in shown and "± " in shown
    again = run_compare(path, result.out_dir, executor="inline", resume=True)
    assert "ran 0 cells, kept 8 finished ones; report:" in compare_summary(again)


def test_every_result_file_gets_the_same_mode(tmp_path):
    """Under a umask that tells creation paths apart (os.open(path, 0o644) gives 0640
    where open() gives 0660), every file compare and report write has one mode."""
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace("seeds: [0, 1]", "seeds: [0]"), encoding="utf-8")
    out = tmp_path / "out"
    script = ("import os, sys; os.umask(0o007); from clsim.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    for args in (["compare", str(path), "--out", str(out), "--executor", "inline",
                  "--no-progress"], ["report", str(out)]):
        proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777)
                 for p in out.rglob("*") if p.is_file()}
        assert {"cells.jsonl", "report.md", "auc.csv", "accuracy_vs_memory.png"} <= set(modes)
        assert set(modes.values()) == {oct(0o660)}, modes


def test_every_file_of_a_run_gets_the_same_mode(tmp_path):
    """clsim run's files too (summary.json, run.png, events.jsonl, TensorBoard's), under a
    umask where os.open(path, 0o644) and open() differ."""
    path = tmp_path / "run.yaml"
    path.write_text(GRID, encoding="utf-8")
    out = tmp_path / "out"
    script = ("import os, sys; os.umask(0o002); from clsim.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, "run", str(path), "--out", str(out),
                           "--no-progress", "--limit", "30"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777)
             for p in out.rglob("*") if p.is_file()}
    assert {"summary.json", "run.png", "events.jsonl"} <= set(modes)
    assert set(modes.values()) == {oct(0o664)}, modes


def _legend_colours(fig):
    """{label: hex colour} of every legend entry in ``fig``."""
    from matplotlib.colors import to_hex

    colours = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            line = handle[0] if isinstance(handle, tuple) else handle  # errorbar: a tuple
            if hasattr(line, "get_marker"):  # a line, not a bar of the ledger
                colours[label] = to_hex(line.get_color())
    return colours


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure's legend colours, captured as it is saved."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(_legend_colours(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def test_a_strategy_has_one_colour_in_compare_and_run_figures(grid_run, tmp_path,
                                                              saved_figures):
    from clsim.report import plot_accuracy_vs_memory
    from clsim.runner import run_scenario

    _, result = grid_run
    plot_accuracy_vs_memory(result.analysis, tmp_path / "plot.png")
    run_scenario(parse_scenario(GRID), tmp_path / "run")  # clsim run draws run.png itself
    assert (tmp_path / "run" / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compare_colours, run_colours = saved_figures
    for name in ("naive", "replay"):
        assert compare_colours[name] == run_colours[name] == strategy_colour(name)
    assert strategy_colour("naive") != strategy_colour("replay")
    assert strategy_style("naive") == strategy_style("naive") and strategy_colour("x") in PALETTE


# ---------------------------------------------------------------------------
# the run figure on real summaries
# ---------------------------------------------------------------------------


def _run(name_or_text, out, only=None, limit=None):
    from clsim.runner import run_scenario

    if name_or_text.endswith(".yaml"):
        scenario = load_scenario(REPO_ROOT / "scenarios" / name_or_text)
    else:
        scenario = parse_scenario(name_or_text)
    return run_scenario(scenario, out, only=only, limit=limit).summary


@pytest.mark.parametrize(("scenario", "only"), [
    ("fscil_strategies_quick.yaml", ["nmc", "prototype_fscil"]),  # few-shot sessions
    ("hle_quick.yaml", ["replay"]),  # hierarchy, online
    ("si_blurry_quick.yaml", ["naive"]),  # boundaries hidden: no matrix, anytime accuracy
])
def test_run_figure_on_each_family(scenario, only, tmp_path):
    from clsim.run_figure import write_run_figure

    summary = _run(scenario, tmp_path, only=only)
    path = write_run_figure(tmp_path, summary)
    assert path == tmp_path / "run.png" and path.read_bytes()[:8] == PNG


def test_run_figure_copes_with_one_experience_many_and_failed_strategies(tmp_path):
    from clsim.run_figure import write_run_figure

    one = GRID.replace("n_experiences: 2", "n_experiences: 1").split("compare:")[0]
    summary = _run(one, tmp_path)
    many = dict(summary, strategies={f"s{i}": summary["strategies"]["replay"]
                                     for i in range(9)})
    many["strategies"]["broken"] = {"status": "failed", "error": "boom"}
    assert write_run_figure(tmp_path, many).read_bytes()[:8] == PNG
    assert (tmp_path / "summary.json").exists()  # beside the summary
    nothing = dict(summary, strategies={"broken": {"status": "failed"}})
    (tmp_path / "run.png").unlink()
    assert write_run_figure(tmp_path, nothing) is None
    assert not (tmp_path / "run.png").exists()


def test_a_results_file_takes_the_umask_in_force_when_it_is_written(tmp_path):
    """Not the umask of import time: a user who tightens it in a notebook after importing
    clsim gets private results (events.jsonl is created the same way)."""
    import os

    from clsim.results import write_text_atomic

    for umask, mode in ((0o077, 0o600), (0o002, 0o664)):
        previous = os.umask(umask)
        try:
            write_text_atomic(tmp_path / f"{umask:o}.txt", "x")
        finally:
            os.umask(previous)
        assert (tmp_path / f"{umask:o}.txt").stat().st_mode & 0o777 == mode
    assert not list(tmp_path.glob(".*"))  # no temporary file left
