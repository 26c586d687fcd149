"""Compute beside memory in what a person reads: AUC over compute, the Pareto frontier of
(memory held, learning FLOPs, last accuracy), the compute columns of summary.csv and
auc.csv, the compute figures, TensorBoard's compute scalars and the console's GFLOP and
steps. Every record is hand-made, so every figure is known."""

from __future__ import annotations

import csv
import io

import pytest
import torch

from clsim.compare import REPORT_FILES, report_files
from clsim.frontier import Point, dominates, on_frontier
from clsim.logging.console import results_table
from clsim.logging.tensorboard import TensorBoardLogger
from clsim.report import (
    FRONTIER_COLUMNS,
    NO_COMPUTE,
    analyse,
    auc_csv,
    frontier_csv,
    mean_over_log_compute,
    report_markdown,
    summary_csv,
    terminal_summary,
    write_report,
)
from clsim.stats import mean_ci

PNG = b"\x89PNG\r\n\x1a\n"
MB = 2**20


def _compute(flops, steps=10, budget=None):
    return {"mode": "on", "flops_total": flops + 500, "learning_flops": flops,
            "parts": {"training.forward": flops}, "steps": steps,
            "samples_forwarded": {"training": 640, "evaluation": 360},
            "inference_flops_per_sample": 2.5, "rows": [], "budget": budget}


def _record(strategy, budget_index, seed, last, *, flops, held_mb=1.0, steps=10,
            average=None, status="ok", budget=None, **extra):
    compute = None if flops is None else _compute(flops, steps, budget)
    return {"cell": f"{strategy} | b{budget_index} | seed {seed}", "strategy": strategy,
            "budget": f"b{budget_index}", "budget_index": budget_index, "seed": seed,
            "status": status, "memory_mb": 1.0 + budget_index,
            "budget_bytes": (1 + budget_index) * MB, "final_accuracy": last,
            "average_incremental_accuracy": last if average is None else average,
            "peak_bytes": round(held_mb * MB), "over_budget": False, "compute": compute,
            **extra}


# ---------------------------------------------------------------------------
# the frontier
# ---------------------------------------------------------------------------


def test_dominance_needs_every_axis_and_one_strict():
    p = Point(1.0, 1.0, 0.5)
    assert dominates(Point(1.0, 1.0, 0.6), p)  # better accuracy alone
    assert dominates(Point(0.5, 1.0, 0.5), p)  # less memory alone
    assert dominates(Point(1.0, 0.5, 0.5), p)  # less compute alone
    assert not dominates(Point(1.0, 1.0, 0.5), p)  # equal: no
    assert not dominates(Point(0.5, 2.0, 0.9), p)  # better twice, worse once: no
    assert on_frontier([p, Point(1.0, 1.0, 0.5), Point(2.0, 2.0, 0.4)]) == [True, True, False]
    assert on_frontier([]) == []


def _frontier_records():
    # one seed each, all at budget b0: figures of the point are the cell's own
    return [
        _record("small", 0, 0, 0.5, flops=1e9, held_mb=1.0),
        _record("twin", 0, 0, 0.5, flops=1e9, held_mb=1.0),  # equal to small: a tie
        _record("weaker", 0, 0, 0.45, flops=1e9, held_mb=1.0),  # small beats it on accuracy
        _record("dominated", 0, 0, 0.4, flops=2e9, held_mb=2.0),
        _record("costly", 0, 0, 0.9, flops=8e9, held_mb=4.0),
        # better than everything, but without compute: it takes no part
        _record("off", 0, 0, 0.99, flops=None, held_mb=0.5),
        _record("broken", 0, 0, None, flops=None, status="failed", error="boom"),
    ]


def test_frontier_keeps_ties_drops_the_dominated_and_what_has_no_compute():
    analysis = analyse(_frontier_records())
    kept = {r["strategy"]: r["on_frontier"] for r in analysis.frontier}
    assert kept == {"small": True, "twin": True, "weaker": False, "dominated": False,
                    "costly": True, "off": None}  # a failed cell has no point at all
    off = next(r for r in analysis.frontier if r["strategy"] == "off")
    assert off["seeds"] == 0 and off["learning_flops"] is None
    assert frontier_csv(analysis).splitlines() == [
        ",".join(FRONTIER_COLUMNS),
        "costly,b0,0,1,4.0,8000000000.0,10.0,0.9,yes",
        "dominated,b0,0,1,2.0,2000000000.0,10.0,0.4,no",
        "off,b0,0,0,,,,,",  # no cell with compute: no figures, not a candidate
        "small,b0,0,1,1.0,1000000000.0,10.0,0.5,yes",
        "twin,b0,0,1,1.0,1000000000.0,10.0,0.5,yes",
        "weaker,b0,0,1,1.0,1000000000.0,10.0,0.45,no",
    ]  # "broken" failed: no finished cell, no point
    report = report_markdown(analysis, "t")
    assert "| costly | b0 | 4 | 8 | 10 | 90.00 | yes |" in report
    assert "| weaker | b0 | 1 | 1 | 10 | 45.00 | no |" in report
    assert "| off | b0 | - | - | - | - | - |" in report
    assert "memory <=, compute <= and last accuracy >= with at least one strict" in report


def test_frontier_points_are_means_over_seeds_of_the_checked_bytes():
    records = [
        _record("a", 0, 0, 0.5, flops=1e9, held_mb=1.0, steps=10),
        _record("a", 0, 1, 0.75, flops=3e9, held_mb=3.0, steps=11),
        # checked between experiences: the kept bytes (1 MB), not the 9 MB peak
        _record("b", 0, 0, 0.625, flops=2e9, held_mb=9.0, budget_check="between",
                kept_bytes=MB),
    ]
    a, b = analyse(records).frontier
    assert (a["seeds"], a["held_mb"], a["learning_flops"], a["steps"], a["final_accuracy"]) \
        == (2, 2.0, 2e9, 10.5, 0.625)
    assert (b["seeds"], b["held_mb"], b["learning_flops"], b["steps"], b["final_accuracy"]) \
        == (1, 1.0, 2e9, 10.0, 0.625)
    # b holds less at equal compute and equal mean accuracy: a is dominated
    assert (a["on_frontier"], b["on_frontier"]) == (False, True)


# ---------------------------------------------------------------------------
# AUC over compute
# ---------------------------------------------------------------------------


def _auc_records():
    records = []
    # seed 0: log10 FLOPs 9, 10, 11, last accuracy 40, 60, 70 % ->
    #   (50 * 1 + 65 * 1) / 2 = 57.5
    # seed 1: log10 FLOPs 9, 10, 12 -> (50 * 1 + 65 * 2) / 3 = 60.0
    for seed, top in ((0, 1e11), (1, 1e12)):
        for index, (flops, last) in enumerate(((1e9, 0.4), (1e10, 0.6), (top, 0.7))):
            records.append(_record("grows", index, seed, last, flops=flops, average=0.8))
            # the same compute at every budget: no range to average over
            records.append(_record("flat", index, seed, last, flops=5e9))
    # seed 2 of "grows" misses compute at one budget: not a seed of AUC over compute
    for index in range(3):
        records.append(_record("grows", index, 2, 0.5, flops=None if index == 1 else 1e9))
    return records


def test_auc_over_compute_is_the_mean_accuracy_over_the_log10_range():
    assert mean_over_log_compute([1e9, 1e10, 1e11], [40.0, 60.0, 70.0]) == pytest.approx(57.5)
    assert mean_over_log_compute([1e9, 1e10, 1e12], [40.0, 60.0, 70.0]) == pytest.approx(60.0)
    assert mean_over_log_compute([5e9, 5e9], [40.0, 60.0]) is None  # width zero
    assert mean_over_log_compute([0, 1e9], [40.0, 60.0]) is None  # no logarithm of 0
    analysis = analyse(_auc_records())
    rows = {r["strategy"]: r for r in analysis.auc_rows}
    grows = rows["grows"]
    expected = mean_ci([57.5, 60.0])
    assert grows["auc_l_compute_pct"] == pytest.approx(58.75)
    assert grows["auc_l_compute_pct_ci95"] == pytest.approx(expected.half_width)
    assert grows["auc_a_compute_pct"] == pytest.approx(80.0)  # flat 80 %: its own mean
    assert grows["compute_seeds"] == 2  # seed 2 lacks compute at b1
    assert grows["seeds"] == 3  # the AUC over memory has all three
    assert (grows["learning_flops_from"], grows["learning_flops_to"]) == (1e9, 1e12)
    assert rows["flat"]["auc_l_compute_pct"] is None and rows["flat"]["compute_seeds"] == 2
    lines = {line.split(",")[0]: line.split(",") for line in auc_csv(analysis).splitlines()}
    header = lines["strategy"]
    grows_csv = dict(zip(header, lines["grows"], strict=True))
    assert float(grows_csv["auc_l_compute_pct"]) == pytest.approx(58.75)
    assert float(grows_csv["auc_a_compute_pct"]) == pytest.approx(80.0)
    assert grows_csv["compute_seeds"] == "2"
    assert (grows_csv["learning_flops_from"], grows_csv["learning_flops_to"]) == \
        ("1000000000.0", "1000000000000.0")
    flat_csv = dict(zip(header, lines["flat"], strict=True))
    assert flat_csv["auc_l_compute_pct"] == "" and flat_csv["auc_a_compute_pct"] == ""
    report = report_markdown(analysis, "t")
    assert "against log10 of the learning FLOPs" in report
    assert "| grows | 80.00 ± 0.00 | 58.75 ± 15.88 | 1 to 1000 | 2 |" in report
    assert "| flat | - | - | 5 to 5 | 2 |" in report
    shown = [line.split() for line in terminal_summary(analysis).splitlines()]
    assert ["grows", "80.0", "±", "0.0", "58.8", "±", "15.9", "1", "to", "1000", "2"] in shown


# ---------------------------------------------------------------------------
# summary.csv, the figures, the terminal, the HParams
# ---------------------------------------------------------------------------


def test_summary_csv_carries_the_compute_figures():
    budget = {"text": "2 GFLOP", "kind": "flops", "total": 2_000_000_000, "share": None,
              "spent": 1_900_000_000, "over_budget": False, "cut_batches": 3,
              "experiences": []}
    records = [
        _record("a", 0, 0, 0.5, flops=1_234_000_000, steps=40, budget=budget,
                compute_budget="2 GFLOP"),
        _record("b", 0, 0, 0.5, flops=None),
    ]
    rows = {r["strategy"]: r for r in csv.DictReader(io.StringIO(summary_csv(analyse(records))))}
    a, b = rows["a"], rows["b"]
    assert (a["learning_flops"], a["flops_total"], a["steps"]) == \
        ("1234000000", "1234000500", "40")
    assert (a["samples_training"], a["samples_evaluation"], a["inference_flops_per_sample"]) \
        == ("640", "360", "2.5")
    assert (a["compute_budget"], a["compute_budget_kind"], a["compute_budget_total"],
            a["compute_budget_spent"], a["compute_over_budget"], a["cut_batches"]) == \
        ("2 GFLOP", "flops", "2000000000", "1900000000", "False", "3")
    compute_columns = ["learning_flops", "flops_total", "steps", "samples_training",
                       "samples_evaluation", "inference_flops_per_sample", "compute_budget",
                       "compute_budget_kind", "compute_budget_total", "compute_budget_spent",
                       "compute_over_budget", "cut_batches"]
    assert all(b[k] == "" for k in compute_columns)
    # records written before compute budgets (no budget key at all) read the same way
    del records[0]["compute"]["budget"], records[0]["compute_budget"]
    again = next(csv.DictReader(io.StringIO(summary_csv(analyse(records[:1])))))
    assert again["learning_flops"] == "1234000000" and again["compute_budget"] == ""


def _png(path) -> bool:
    return path.read_bytes()[:8] == PNG


def test_compute_figures_only_when_some_cell_counted_compute(tmp_path):
    with_compute = _auc_records()
    write_report(tmp_path, with_compute, "t")
    assert _png(tmp_path / "accuracy_vs_compute.png") and _png(tmp_path / "frontier.png")
    assert _png(tmp_path / "accuracy_vs_memory.png")
    assert NO_COMPUTE not in (tmp_path / "report.md").read_text()
    assert (tmp_path / "frontier.csv").read_text().startswith(",".join(FRONTIER_COLUMNS))
    analysis = analyse(with_compute)
    assert report_files(analysis) == REPORT_FILES
    # the same grid with accounting off: no compute figure, an old one removed, and why
    for r in with_compute:
        r["compute"] = None
    analysis = write_report(tmp_path, with_compute, "t")
    assert not (tmp_path / "accuracy_vs_compute.png").exists()
    assert not (tmp_path / "frontier.png").exists()
    assert _png(tmp_path / "accuracy_vs_memory.png")
    assert NO_COMPUTE in (tmp_path / "report.md").read_text()
    assert NO_COMPUTE in terminal_summary(analysis)
    assert "frontier.png" not in report_files(analysis)
    assert "frontier.csv" in report_files(analysis)
    assert "GFLOP" not in terminal_summary(analysis)
    # frontier.csv still lists every point, none on the frontier (no compute)
    assert all(line.endswith(",0,,,,,") for line in
               (tmp_path / "frontier.csv").read_text().splitlines()[1:])


def test_terminal_shows_gflop_steps_and_the_frontier():
    analysis = analyse(_frontier_records())
    shown = terminal_summary(analysis)
    rows = [line.split() for line in shown.splitlines()]
    assert ["costly", "90.0", "90.0", "8", "10"] in rows
    assert ["b0", "1", "off", "99.0", "99.0", "-", "-"] in rows  # best first
    assert ["budget", "memory", "(MB)", "strategy", "last", "average", "GFLOP",
            "steps"] in rows
    assert ("Pareto frontier of (memory held, learning FLOPs, last accuracy): costly @ b0; "
            "small @ b0; twin @ b0") in shown


def test_hparams_carry_learning_gflop(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    records = [_record("a", 0, 0, 0.5, flops=3e9), _record("b", 0, 0, 0.5, flops=None)]
    write_report(tmp_path, records, "t")
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "tensorboard"
                                                              / "hparams"))
    multiplexer.Reload()
    gflop = {}
    for run in multiplexer.Runs():
        tags = multiplexer.GetAccumulator(run).Tags()["scalars"]
        if "hparam/learning_gflop" in tags:
            gflop[run] = [e.value for e in multiplexer.Scalars(run, "hparam/learning_gflop")]
    assert list(gflop.values()) == [[pytest.approx(3.0)]]  # a's cell alone


# ---------------------------------------------------------------------------
# TensorBoard per experience, and the console
# ---------------------------------------------------------------------------


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    # event files keep float32: seven significant digits are what was written
    return {tag: [(e.step, float(f"{e.value:.7g}")) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def _row(stage, experience, parts, evaluation_flops, steps):
    return {"stage": stage, "experience": experience, "flops": sum(parts.values()),
            "parts": parts, "optimizer_steps": steps,
            "samples_forwarded": {"training": 64 * steps, "evaluation": 100},
            "evaluation_flops": evaluation_flops,
            "inference_flops_per_sample": evaluation_flops / 100}


def test_tensorboard_writes_the_compute_of_each_experience(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    setup = _row("setup", None, {"evaluation.forward": 1_000_000}, 1_000_000, 0)
    first = _row("experience", 0, {"training.forward": 2e9, "training.backward": 4e9,
                                   "evaluation.forward": 1_000_000}, 1_000_000, 30)
    second = _row("experience", 1, {"training.forward": 1e9, "replay.herding": 5e8,
                                    "evaluation.forward": 2_000_000}, 2_000_000, 20)
    logger.compute(0, [setup, first])
    logger.compute(1, [setup, first, second])
    logger.compute(2, [])  # nothing to write
    logger.close()
    scalars = _scalars(tmp_path)
    assert scalars["compute/learning_gflop"] == [(0, 6.0), (1, 1.5)]
    assert scalars["compute/learning_gflop_so_far"] == [(0, 6.0), (1, 7.5)]
    assert scalars["compute/steps"] == [(0, 30), (1, 20)]
    assert scalars["compute/samples_forwarded/training"] == [(0, 1920), (1, 1280)]
    assert scalars["compute/samples_forwarded/evaluation"] == [(0, 100), (1, 100)]
    assert scalars["compute/inference_flops_per_sample"] == [(0, 10_000), (1, 20_000)]
    assert scalars["compute/gflop/training.backward"] == [(0, 4.0)]
    assert scalars["compute/gflop/replay.herding"] == [(1, 0.5)]
    assert scalars["compute/gflop/evaluation.forward"] == [(0, 0.001), (1, 0.002)]
    TensorBoardLogger(None).compute(0, [first])  # no folder: a no-op


def test_a_run_logs_its_compute_to_tensorboard(tmp_path):
    from clsim.assembly import build_stream, load_scenario_data
    from clsim.config import parse_scenario
    from clsim.engine import run_strategy

    torch.set_num_threads(1)
    scenario = parse_scenario("""
name: tb
seed: 0
threads: 1
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 2}
model: {name: mlp, hidden: [16]}
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.1}}
strategies:
  naive: {plugins: [naive]}
""")
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    for mode in ("on", "off"):
        logger = TensorBoardLogger(tmp_path / mode)
        outcome = run_strategy(scenario, scenario.strategies["naive"], dataset, stream,
                               seed=0, device=torch.device("cpu"), tensorboard=logger,
                               compute=mode)
        logger.close()
        assert outcome.error is None, outcome.error
        scalars = _scalars(tmp_path / mode)
        if mode == "off":  # accounting off: memory scalars, no compute ones
            assert "memory/total_bytes" in scalars
            assert not any(tag.startswith("compute/") for tag in scalars)
            continue
        compute = outcome.to_dict()["compute"]
        rows = [r for r in compute["rows"] if r["stage"] == "experience"]
        assert [s for s, _ in scalars["compute/steps"]] == [0, 1]
        assert [v for _, v in scalars["compute/steps"]] == [r["optimizer_steps"] for r in rows]
        assert sum(v for _, v in scalars["compute/steps"]) == compute["steps"]
        # nothing is computed after the last experience but the plugins' reports
        so_far = scalars["compute/learning_gflop_so_far"][-1][1]
        assert so_far == pytest.approx(compute["learning_flops"] / 1e9, rel=1e-6)
        learning = [(r["flops"] - r["evaluation_flops"]) / 1e9 for r in rows]
        assert [v for _, v in scalars["compute/learning_gflop"]] == \
            pytest.approx(learning, rel=1e-6)


def _summary(final, compute, status="ok"):
    return {"status": status, "final_accuracy": final, "average_incremental_accuracy": final,
            "forgetting": 0.1, "peak_bytes": 2048, "kept_bytes": 1024, "budget_bytes": 4096,
            "over_budget": False, "compute": compute}


def test_the_console_table_shows_gflop_and_steps_beside_the_bytes():
    table = results_table({
        "replay": _summary(0.5, _compute(1_234_000_000, steps=40)),
        "huge": _summary(0.5, _compute(123_456_000_000, steps=4000)),
        "off": _summary(0.5, None),
        "broken": _summary(None, None, status="failed"),
    })
    header, rule, *rows = [line.split("  ") for line in table.splitlines()]
    header = [cell.strip() for cell in header if cell.strip()]
    assert header == ["strategy", "final acc", "avg inc acc", "forgetting", "peak held",
                      "kept between", "GFLOP", "steps", "budget", "over budget"]
    cells = {row[0].strip(): [c.strip() for c in row if c.strip()] for row in rows}
    gflop, steps = header.index("GFLOP"), header.index("steps")
    assert (cells["replay"][gflop], cells["replay"][steps]) == ("1.23", "40")
    assert (cells["huge"][gflop], cells["huge"][steps]) == ("123", "4000")
    assert (cells["off"][gflop], cells["off"][steps]) == ("-", "-")
    assert cells["broken"][1:8] == ["failed", "-", "-", "-", "-", "-", "-"]


def test_a_grid_varying_memory_and_compute_has_no_auc_along_either_axis():
    """Points of two memory levels x two compute levels lie on no single curve along one
    axis: an area would join levels of the other and change with the order the budgets
    are listed in. The report gives none and says why."""
    def grid(order):
        records = []
        for index, (memory, compute, last) in enumerate(order):
            for seed in (0, 1):
                records.append(_record("s", index, seed, last, flops=compute,
                                       memory_budget=f"{memory}MB",
                                       compute_budget=f"{compute:g} FLOP"))
        return analyse(records)

    points = [(1, 1e9, 0.2), (4, 1e9, 0.2), (1, 1e11, 0.8), (4, 1e11, 0.8)]
    for analysis in (grid(points), grid(points[::-1])):
        assert analysis.varies_both
        (row,) = analysis.auc_rows
        assert row["auc_l_pct"] is None and row["auc_l_compute_pct"] is None
        report = report_markdown(analysis, "t")
        assert "No AUC: the budget points vary memory and compute both" in report
        assert "No AUC: the budget points vary memory and compute both" in \
            terminal_summary(analysis)
        # a plot along compute joins the points of one memory level each
        assert list(analysis.lines_along("compute")) in (["1MB", "4MB"], ["4MB", "1MB"])
    one_memory = analyse([_record("s", i, 0, last, flops=compute, memory_budget="1MB",
                                  compute_budget=f"{compute:g} FLOP")
                          for i, (_, compute, last) in enumerate(points[::2])])
    assert not one_memory.varies_both
    assert one_memory.auc_rows[0]["auc_l_compute_pct"] == pytest.approx(50.0)
