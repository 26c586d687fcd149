"""The comparison report, rebuilt from the cell records alone (``clsim report DIR``).

Writes ``summary.csv`` (one row per cell), ``auc.csv`` (AUC-A and AUC-L per strategy,
against memory and against compute), ``frontier.csv`` (the Pareto frontier of memory,
compute and accuracy), ``report.md`` (tables, ranking at each budget, paired tests,
over-budget notes), ``accuracy_vs_memory.png``, ``accuracy_vs_compute.png`` and
``frontier.png`` (:mod:`clsim.compute_plots`; only when some cell carries compute) and
TensorBoard HParams runs under ``tensorboard/hparams``; :func:`terminal_summary` is the
same story rounded for the terminal.

One unit everywhere a person reads: accuracy in %. AUC-A and AUC-L are the area under
accuracy against memory divided by the width of the memory range (the mean accuracy over
it, :func:`clsim.stats.mean_over_memory`), so they read in % like the accuracy at each
budget. A grid of one budget has no range: ``auc.csv`` then holds its header alone and
the report and terminal say why.

Compute is a cell's ``compute.learning_flops`` (every FLOP but the test predictions').
It spans orders of magnitude, so AUC over compute is the same mean on a log10 axis: the
trapezoid area under accuracy against log10(learning FLOPs) divided by the width of the
log10 range (:func:`mean_over_log_compute`). The frontier is :mod:`clsim.frontier`'s over
the (strategy, budget) points averaged over seeds (:func:`frontier_rows`). A cell whose
``compute`` is None (accounting off, a failed cell) has no place on either.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clsim.budget import format_bytes
from clsim.colours import LINE_STYLES, strategy_style
from clsim.compute_figures import (
    GFLOP,
    compute_budget,
    compute_field,
    count_text,
    gflop_text,
    learning_flops,
    samples_forwarded,
)
from clsim.compute_plots import plot_accuracy_vs_compute, plot_frontier
from clsim.frontier import Point, on_frontier
from clsim.logging.tensorboard import open_summary_writer
from clsim.results import write_atomic, write_text_atomic, writing
from clsim.stats import MeanCI, mean_ci, mean_over_memory, paired_tests, rank_groups, ranking_text

Record = dict[str, Any]
SUMMARY_COLUMNS = [
    "cell",
    "strategy",
    "budget",
    "budget_bytes",
    "memory_mb",
    "seed",
    "status",
    "final_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "forward_transfer",
    "peak_bytes",
    "kept_bytes",
    "budget_check",
    "over_budget",
    "memory_estimated",
    "learning_flops",
    "flops_total",
    "steps",
    "samples_training",
    "samples_evaluation",
    "inference_flops_per_sample",
    "compute_budget",
    "compute_budget_kind",
    "compute_budget_total",
    "compute_budget_spent",
    "compute_over_budget",
    "cut_batches",
    "threads",
    "error",
]
AUC_COLUMNS = [
    "strategy",
    "auc_a_pct",
    "auc_a_pct_ci95",
    "auc_l_pct",
    "auc_l_pct_ci95",
    "seeds",
    "memory_mb_from",
    "memory_mb_to",
    "auc_a_compute_pct",
    "auc_a_compute_pct_ci95",
    "auc_l_compute_pct",
    "auc_l_compute_pct_ci95",
    "compute_seeds",
    "learning_flops_from",
    "learning_flops_to",
]
FRONTIER_COLUMNS = [
    "strategy",
    "budget",
    "budget_index",
    "seeds",
    "held_mb",
    "learning_flops",
    "steps",
    "final_accuracy",
    "on_frontier",
]
AUC_UNIT = (
    "AUC-A (AUC-L) is the area under average incremental (last) accuracy against memory "
    "in MB (trapezoid rule over the budgets; MB = 2^20 bytes) divided by the width of the "
    "memory range, so it is the mean accuracy over that range in %, computed per seed "
    "that finished every budget, then averaged."
)
NO_AUC = ("No AUC: an area under accuracy against memory needs two budgets or more; this "
          "grid has one (auc.csv holds its header alone).")
AUC_COMPUTE_UNIT = (
    "AUC-A (AUC-L) over compute is the area under average incremental (last) accuracy "
    "against log10 of the learning FLOPs (every FLOP but the test predictions'; trapezoid "
    "rule over the budgets) divided by the width of that log10 range, so it is the mean "
    "accuracy over the compute range on a log scale, in %, computed per seed that finished "
    "every budget with compute counted, then averaged. '-' where the budgets do not change "
    "the compute (a range of width zero)."
)
FRONTIER_RULE = (
    "Each (strategy, budget) point is averaged over the seeds whose cells carry compute: "
    "memory is the bytes the budget was checked against (the peak held, or the bytes kept "
    "between experiences where budget_check is between), compute the learning FLOPs, "
    "accuracy the last accuracy. A point is on the frontier when no other point has "
    "memory <=, compute <= and last accuracy >= with at least one strict; points equal "
    "on all three are all on it."
)
BOTH_AXES = ("No AUC: the budget points vary memory and compute both, so the points of a "
             "strategy lie on no single curve along either axis (an area over memory would "
             "join cells of different compute); compare them with the frontier and the "
             "tables at each budget.")
NO_AUC_COMPUTE = ("No AUC over compute: an area under accuracy against compute needs two "
                  "budgets or more; this grid has one.")
NO_COMPUTE = (
    "No compute: no finished cell carries compute accounting (CLSIM_COMPUTE=off, or cells "
    "recorded before it), so there is no AUC over compute, no frontier, and "
    "accuracy_vs_compute.png and frontier.png are not written."
)
RANKING_RULE = (
    "Ranked by mean last accuracy. '>' stands between two neighbours only where every "
    "strategy before it beats every strategy after it (paired t-test on last accuracy "
    "over common seeds, Holm-adjusted within the budget, p < 0.05, in that direction); "
    "everywhere else '≈': not told apart."
)


@dataclass
class Analysis:
    """Everything the report says, computed once from the records."""

    records: list[Record]
    strategies: list[str]
    budgets: list[tuple[str, float | None]]  # (label, memory in MB), in budget order
    cells: dict[tuple[str, str], list[Record]] = field(default_factory=dict)  # ok cells
    auc_rows: list[dict[str, Any]] = field(default_factory=list)
    frontier: list[dict[str, Any]] = field(default_factory=list)  # (strategy, budget) points

    @property
    def has_auc(self) -> bool:
        """An area needs a memory range: two budgets or more."""
        return len(self.budgets) >= 2

    @property
    def varies_both(self) -> bool:
        """Whether the budget points vary memory and compute both: an area over one axis
        would then join points of different levels of the other (order-dependent, and
        not a curve), so there is no AUC; the frontier and the tables at each budget
        compare such grids."""
        memory = {r.get("memory_budget", r.get("budget")) for r in self.records}
        compute = {r.get("compute_budget") for r in self.records}
        return len(memory) > 1 and len(compute) > 1

    def level(self, label: str, axis: str) -> str | None:
        """The memory or compute budget (``axis``) of the budget point ``label``."""
        for r in self.records:
            if r["budget"] == label:
                return r.get("memory_budget", label) if axis == "memory" \
                    else r.get("compute_budget")
        return None

    def lines_along(self, axis: str) -> dict[str | None, list[str]]:
        """The budget labels a plot along ``axis`` joins into one line: all of them, or,
        where the points vary both axes, those at one level of the other axis each."""
        labels = [label for label, _ in self.budgets]
        if not self.varies_both:
            return {None: labels}
        other = "compute" if axis == "memory" else "memory"
        groups: dict[str | None, list[str]] = {}
        for label in labels:
            groups.setdefault(self.level(label, other), []).append(label)
        return groups

    @property
    def has_compute(self) -> bool:
        """Whether some finished cell carries compute (accounting was on)."""
        return any(learning_flops(r) is not None for cells in self.cells.values()
                   for r in cells)

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.get("status") != "ok"]

    @property
    def over_budget(self) -> list[Record]:
        return [r for r in self.records if r.get("status") == "ok" and r.get("over_budget")]

    def score(self, strategy: str, budget: str, metric: str) -> MeanCI | None:
        values = [r[metric] for r in self.cells.get((strategy, budget), [])]
        return mean_ci(values) if values else None

    def ranking(self, budget: str) -> list[list[str]]:
        """The strategies scored at ``budget``, grouped by :func:`rank_groups` on last
        accuracy (empty when none finished there)."""
        means = {}
        for s in self.strategies:
            ci = self.score(s, budget, "final_accuracy")
            if ci is not None:
                means[s] = ci.mean
        return rank_groups(means, paired_tests(self.seed_scores(budget, list(means))))

    def compute_cells(self, strategy: str, budget: str) -> list[Record]:
        """The finished cells of ``strategy`` at ``budget`` that carry compute."""
        return [r for r in self.cells.get((strategy, budget), [])
                if learning_flops(r) is not None]

    def compute_score(self, strategy: str, budget: str) -> tuple[float | None, float | None]:
        """Mean learning FLOPs and mean optimizer steps over the cells at ``budget`` that
        carry compute (None, None without any)."""
        done = self.compute_cells(strategy, budget)
        if not done:
            return None, None
        steps = [compute_field(r, "steps") for r in done]
        return (sum(learning_flops(r) for r in done) / len(done),
                None if None in steps else sum(steps) / len(steps))

    def seed_scores(self, budget: str, strategies: list[str]) -> dict[str, dict[int, float]]:
        """Last accuracy per seed of each of ``strategies`` at ``budget``."""
        return {s: {r["seed"]: r["final_accuracy"] for r in self.cells.get((s, budget), [])}
                for s in strategies}


def _checked_figure(r: Record) -> str:
    """The figure a cell's budget was checked against, named."""
    if r.get("budget_check") == "between" and r.get("kept_bytes") is not None:
        return f"kept between experiences {format_bytes(r['kept_bytes'])}"
    return f"peak {format_bytes(r['peak_bytes'])}"


def analyse(records: list[Record]) -> Analysis:
    records = sorted(records, key=lambda r: (r["strategy"], r["budget_index"], r["seed"]))
    strategies = list(dict.fromkeys(r["strategy"] for r in records))
    points: dict[int, tuple[str, float | None]] = {}
    for r in records:
        label, mb = points.get(r["budget_index"], (r["budget"], None))
        points[r["budget_index"]] = (label, mb if mb is not None else r.get("memory_mb"))
    result = Analysis(records, strategies, [points[i] for i in sorted(points)])
    for r in records:
        if r.get("status") == "ok":
            result.cells.setdefault((r["strategy"], r["budget"]), []).append(r)
    result.auc_rows = [_auc_row(result, s) for s in strategies] if result.has_auc else []
    result.frontier = frontier_rows(result)
    return result


def _auc_row(analysis: Analysis, strategy: str) -> dict[str, Any]:
    """AUC-A and AUC-L in % per seed that completed every budget, then mean and CI."""
    per_seed: dict[int, list[Record]] = defaultdict(list)
    for (name, _), cells in analysis.cells.items():
        if name == strategy:
            for r in cells:
                if r.get("memory_mb") is not None:
                    per_seed[r["seed"]].append(r)
    complete = {seed: rs for seed, rs in per_seed.items() if len(rs) == len(analysis.budgets)}
    mbs = [r["memory_mb"] for rs in complete.values() for r in rs]
    row: dict[str, Any] = {"strategy": strategy, "seeds": len(complete),
                           "memory_mb_from": min(mbs, default=None),
                           "memory_mb_to": max(mbs, default=None)}
    for name, metric in (("auc_a_pct", "average_incremental_accuracy"),
                         ("auc_l_pct", "final_accuracy")):
        per_seed = {seed: mean_over_memory([r["memory_mb"] for r in rs],
                                           [100.0 * r[metric] for r in rs])
                    for seed, rs in complete.items()}
        values = [v for v in per_seed.values() if v is not None]  # None: a range of width 0
        ci = mean_ci(values) if values else None
        row[name] = None if ci is None else ci.mean
        row[f"{name}_ci95"] = None if ci is None else ci.half_width
        row[f"{name}_per_seed"] = per_seed
    row.update(_auc_compute(analysis, strategy))
    if analysis.varies_both:  # no curve along one axis (Analysis.varies_both)
        for name in ("auc_a_pct", "auc_l_pct", "auc_a_compute_pct", "auc_l_compute_pct"):
            row[name] = row[f"{name}_ci95"] = None
            row[f"{name}_per_seed"] = {}
    return row


def mean_over_log_compute(flops: list[float], accuracy: list[float]) -> float | None:
    """The mean of ``accuracy`` over the compute range on a log10 axis: the trapezoid area
    under accuracy against log10(flops) divided by the width of the log10 range. None
    with fewer than two points, a range of width zero, or a count that is not positive
    (no logarithm)."""
    if any(f <= 0 for f in flops):
        return None
    return mean_over_memory([math.log10(f) for f in flops], accuracy)


def _auc_compute(analysis: Analysis, strategy: str) -> dict[str, Any]:
    """AUC-A and AUC-L over compute in % (:func:`mean_over_log_compute`) per seed that
    finished every budget with compute counted, then mean and CI."""
    per_seed: dict[int, list[Record]] = defaultdict(list)
    for (name, _), cells in analysis.cells.items():
        if name == strategy:
            for r in cells:
                if learning_flops(r) is not None:
                    per_seed[r["seed"]].append(r)
    complete = {seed: rs for seed, rs in per_seed.items() if len(rs) == len(analysis.budgets)}
    flops = [learning_flops(r) for rs in complete.values() for r in rs]
    row: dict[str, Any] = {"compute_seeds": len(complete),
                           "learning_flops_from": min(flops, default=None),
                           "learning_flops_to": max(flops, default=None)}
    for name, metric in (("auc_a_compute_pct", "average_incremental_accuracy"),
                         ("auc_l_compute_pct", "final_accuracy")):
        per_seed_value = {seed: mean_over_log_compute([learning_flops(r) for r in rs],
                                                      [100.0 * r[metric] for r in rs])
                          for seed, rs in complete.items()}
        values = [v for v in per_seed_value.values() if v is not None]
        ci = mean_ci(values) if values else None
        row[name] = None if ci is None else ci.mean
        row[f"{name}_ci95"] = None if ci is None else ci.half_width
        row[f"{name}_per_seed"] = per_seed_value
    return row


def held_bytes(record: Record) -> int | None:
    """The bytes a cell's budget was checked against: kept between experiences where its
    budget_check is between, else the peak held."""
    if record.get("budget_check") == "between" and record.get("kept_bytes") is not None:
        return record["kept_bytes"]
    return record.get("peak_bytes")


def frontier_rows(analysis: Analysis) -> list[dict[str, Any]]:
    """One row per (strategy, budget) with finished cells, in strategy and budget order:
    memory held (MB), learning FLOPs, optimizer steps and last accuracy averaged over the
    cells that carry compute, and ``on_frontier`` (:mod:`clsim.frontier`; None for a
    point without compute, which takes no part)."""
    rows = []
    for s in analysis.strategies:
        for index, (label, _) in enumerate(analysis.budgets):
            cells = analysis.cells.get((s, label), [])
            if not cells:
                continue
            done = [r for r in cells
                    if learning_flops(r) is not None and held_bytes(r) is not None]
            row: dict[str, Any] = {"strategy": s, "budget": label, "budget_index": index,
                                   "seeds": len(done), "held_mb": None, "learning_flops": None,
                                   "steps": None, "final_accuracy": None, "on_frontier": None}
            if done:
                steps = [compute_field(r, "steps") for r in done]
                row.update(
                    held_mb=sum(held_bytes(r) for r in done) / len(done) / 2**20,
                    learning_flops=sum(learning_flops(r) for r in done) / len(done),
                    steps=None if None in steps else sum(steps) / len(steps),
                    final_accuracy=sum(r["final_accuracy"] for r in done) / len(done),
                )
            rows.append(row)
    candidates = [r for r in rows if r["seeds"]]
    points = [Point(r["held_mb"], r["learning_flops"], r["final_accuracy"]) for r in candidates]
    for r, kept in zip(candidates, on_frontier(points), strict=True):
        r["on_frontier"] = kept
    return rows


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------


def write_report(out: Path, records: list[Record], title: str = "comparison") -> Analysis:
    """Write every report file into ``out`` from ``records``; returns the analysis."""
    analysis = analyse(records)
    write_text_atomic(out / "summary.csv", summary_csv(analysis))
    write_text_atomic(out / "auc.csv", auc_csv(analysis))
    write_text_atomic(out / "report.md", report_markdown(analysis, title))
    write_text_atomic(out / "frontier.csv", frontier_csv(analysis))
    with writing(out / "accuracy_vs_memory.png"):
        plot_accuracy_vs_memory(analysis, out / "accuracy_vs_memory.png")
    for name, plot in (("accuracy_vs_compute.png", plot_accuracy_vs_compute),
                       ("frontier.png", plot_frontier)):
        with writing(out / name):
            if analysis.has_compute:
                plot(analysis, out / name)
            else:  # no compute: no figure, and none left from an earlier report
                (out / name).unlink(missing_ok=True)
    with writing(out / "tensorboard" / "hparams"):
        write_hparams(analysis, out / "tensorboard" / "hparams")
    return analysis


def summary_csv(analysis: Analysis) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in analysis.records:
        row = {**r, **_compute_columns(r)}
        writer.writerow({k: _csv_value(row.get(k)) for k in SUMMARY_COLUMNS})
    return buffer.getvalue()


def _compute_columns(r: Record) -> dict[str, Any]:
    """summary.csv's compute columns of one cell (empty where it has no compute, or no
    compute budget)."""
    budget = compute_budget(r) or {}
    return {
        "learning_flops": learning_flops(r),
        "flops_total": compute_field(r, "flops_total"),
        "steps": compute_field(r, "steps"),
        "samples_training": samples_forwarded(r, "training"),
        "samples_evaluation": samples_forwarded(r, "evaluation"),
        "inference_flops_per_sample": compute_field(r, "inference_flops_per_sample"),
        "compute_budget": r.get("compute_budget") or budget.get("text"),
        "compute_budget_kind": budget.get("kind"),
        "compute_budget_total": budget.get("total"),
        "compute_budget_spent": budget.get("spent"),
        "compute_over_budget": budget.get("over_budget"),
        "cut_batches": budget.get("cut_batches"),
    }


def frontier_csv(analysis: Analysis) -> str:
    """:func:`frontier_rows`: held_mb in MB, learning_flops and steps as means over seeds,
    final_accuracy a fraction, on_frontier yes/no (empty for a point without compute)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FRONTIER_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in analysis.frontier:
        kept = row["on_frontier"]
        writer.writerow({**{k: _csv_value(row.get(k)) for k in FRONTIER_COLUMNS},
                         "on_frontier": "" if kept is None else ("yes" if kept else "no")})
    return buffer.getvalue()


def auc_csv(analysis: Analysis) -> str:
    """AUC-A and AUC-L in % (mean accuracy over the memory range) with the 95% CI
    half-width; the header alone when the grid has fewer than two budgets."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, AUC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in analysis.auc_rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in AUC_COLUMNS})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _fmt(ci: MeanCI | None, scale: float = 100.0, spec: str = ".2f") -> str:
    if ci is None:
        return "-"
    if ci.half_width is None:
        return f"{ci.mean * scale:{spec}}"
    return f"{ci.mean * scale:{spec}} ± {ci.half_width * scale:{spec}}"


def report_markdown(analysis: Analysis, title: str) -> str:
    lines = [f"# {title}", ""]
    seeds = sorted({r["seed"] for r in analysis.records})
    lines += [
        f"{len(analysis.records)} cells: {len(analysis.strategies)} strategies x "
        f"{len(analysis.budgets)} budgets x {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
        f"{len(analysis.failed)} failed, {len(analysis.over_budget)} over budget.",
        "Accuracies in %, mean ± half-width of the 95% confidence interval over seeds (Student t).",
        "",
        "## Area under accuracy against memory",
        "",
    ]
    if not analysis.has_auc:
        lines.append(NO_AUC)
    elif analysis.varies_both:
        lines.append(BOTH_AXES)
    else:
        lines += [
            AUC_UNIT,
            "",
            "| strategy | AUC-A (%) | AUC-L (%) | memory range (MB) | seeds |",
            "|---|---|---|---|---|",
        ]
        for row in _auc_rows_ranked(analysis):
            a = _fmt(_row_ci(row, "auc_a_pct"), 1.0)
            b = _fmt(_row_ci(row, "auc_l_pct"), 1.0)
            lines.append(f"| {row['strategy']} | {a} | {b} | {_memory_range(row)} | "
                         f"{row['seeds']} |")
    lines += _compute_markdown(analysis)
    for metric, name in (
        ("final_accuracy", "Last accuracy"),
        ("average_incremental_accuracy", "Average incremental accuracy"),
    ):
        lines += ["", f"## {name} at each budget", ""]
        header = (
            "| strategy | "
            + " | ".join(
                f"{label} ({_mb(mb)} MB)" if mb is not None else label
                for label, mb in analysis.budgets
            )
            + " |"
        )
        lines += [header, "|---" * (len(analysis.budgets) + 1) + "|"]
        for s in analysis.strategies:
            cells = [_fmt(analysis.score(s, label, metric)) for label, _ in analysis.budgets]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Ranking and paired tests at each budget",
        "",
        RANKING_RULE + " Pairs below: the mean difference in points of last accuracy; "
        "* marks p < 0.05.",
        "",
    ]
    for label, _ in analysis.budgets:
        groups = analysis.ranking(label)
        lines.append(f"- **{label}**: {ranking_text(groups) or '-'}")
        ranked = [s for group in groups for s in group]
        for t in paired_tests(analysis.seed_scores(label, ranked)):
            p = "n/a" if t.p_adjusted is None else f"{t.p_adjusted:.3g}"
            star = " *" if t.significant() else ""
            lines.append(
                f"  - {t.a} - {t.b}: {t.mean_difference * 100:+.2f} points over "
                f"{t.n} seeds, p = {p}{star}"
            )
    if analysis.over_budget:
        lines += [
            "",
            "## Over budget",
            "",
            "These cells held more bytes than their budget (they are scored, but did not "
            "respect the budget): the peak held during training, or, where the cell's "
            "budget_check is between, the bytes kept between experiences:",
            "",
        ]
        for r in analysis.over_budget:
            lines.append(f"- {r['cell']}: {_checked_figure(r)} > budget "
                         f"{format_bytes(r['budget_bytes'])}")
    over_compute = [r for r in analysis.records if r.get("status") == "ok"
                    and (compute_budget(r) or {}).get("over_budget")]
    if over_compute:
        lines += [
            "",
            "## Over a compute share",
            "",
            "In these cells work outside the loop's steps (herding, a feature pass, a "
            "closed-form solve, a plugin's own loop) took an experience over its share of "
            "the compute budget; the loop stops its own steps at each share, but not that "
            "work. They are scored; summary.csv has what each spent:",
            "",
        ]
        for r in over_compute:
            budget = compute_budget(r)
            over = [e["experience"] for e in budget["experiences"] if e["over_share"]]
            lines.append(f"- {r['cell']}: spent {budget['spent']:,} of {budget['total']:,} "
                         f"{'steps' if budget['kind'] == 'steps' else 'FLOPs'}; over the "
                         f"share of experience {', '.join(map(str, over))}")
    if analysis.failed:
        lines += ["", "## Failed cells", ""]
        for r in analysis.failed:
            lines.append(f"- {r['cell']}: {r.get('error')}")
    estimated = [r for r in analysis.records if r.get("memory_estimated")]
    if estimated:
        lines += [
            "",
            f"Note: in {len(estimated)} cells the bytes held include Python numbers "
            "charged at 8 bytes each (estimated); all other bytes are measured.",
        ]
    return "\n".join(lines) + "\n"


def _compute_markdown(analysis: Analysis) -> list[str]:
    """The AUC over compute and the frontier sections (a note alone without compute)."""
    lines = ["", "## Area under accuracy against compute", ""]
    if not analysis.has_compute:
        return lines + [NO_COMPUTE]
    if not analysis.has_auc:
        lines.append(NO_AUC_COMPUTE)
    elif analysis.varies_both:
        lines.append("No AUC over compute either (see above).")
    else:
        lines += [
            AUC_COMPUTE_UNIT,
            "",
            "| strategy | AUC-A over compute (%) | AUC-L over compute (%) | "
            "learning GFLOP range | seeds |",
            "|---|---|---|---|---|",
        ]
        for row in _auc_rows_ranked(analysis):
            a = _fmt(_row_ci(row, "auc_a_compute_pct", "compute_seeds"), 1.0)
            b = _fmt(_row_ci(row, "auc_l_compute_pct", "compute_seeds"), 1.0)
            lines.append(f"| {row['strategy']} | {a} | {b} | {_gflop_range(row)} | "
                         f"{row['compute_seeds']} |")
    lines += [
        "",
        "## Memory, compute and accuracy: the Pareto frontier",
        "",
        FRONTIER_RULE + " GFLOP = 10^9 learning FLOPs; steps = optimizer steps; both "
        "means over seeds (frontier.csv has the exact figures).",
        "",
        "| strategy | budget | memory held (MB) | GFLOP | steps | last accuracy (%) | "
        "on frontier |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in analysis.frontier:
        kept = row["on_frontier"]
        accuracy = "-" if row["final_accuracy"] is None else f"{100 * row['final_accuracy']:.2f}"
        lines.append(
            f"| {row['strategy']} | {row['budget']} | {_mb(row['held_mb'])} | "
            f"{gflop_text(row['learning_flops'])} | {count_text(row['steps'])} | {accuracy} | "
            f"{'-' if kept is None else ('yes' if kept else 'no')} |")
    return lines


def _gflop_range(row: dict[str, Any]) -> str:
    if row.get("learning_flops_from") is None:
        return "-"
    return f"{gflop_text(row['learning_flops_from'])} to {gflop_text(row['learning_flops_to'])}"


def _row_ci(row: dict[str, Any], name: str, seeds: str = "seeds") -> MeanCI | None:
    if row.get(name) is None:
        return None
    return MeanCI(row[name], row[f"{name}_ci95"], row[seeds])


def _auc_rows_ranked(analysis: Analysis) -> list[dict[str, Any]]:
    """AUC rows, highest AUC-A first (rows without one last)."""
    return sorted(analysis.auc_rows, key=lambda r: -(r["auc_a_pct"] or float("-inf")))


def _memory_range(row: dict[str, Any]) -> str:
    if row["memory_mb_from"] is None:
        return "-"
    return f"{_mb(row['memory_mb_from'])} to {_mb(row['memory_mb_to'])}"


def _mb(mb: float | None) -> str:
    """Memory in MB to three significant digits (a budget of 20 KB is 0.0195)."""
    return "-" if mb is None else f"{mb:.3g}"


# ---------------------------------------------------------------------------
# the terminal
# ---------------------------------------------------------------------------


def terminal_summary(analysis: Analysis) -> str:
    """What ``clsim compare`` prints: AUC, accuracy at each budget and the ranking, in %,
    rounded to one decimal for reading (the exact numbers are in the files)."""
    seeds = sorted({r["seed"] for r in analysis.records})
    lines = [
        f"{len(analysis.records)} cells ({len(analysis.strategies)} strategies x "
        f"{len(analysis.budgets)} budgets x {len(seeds)} seeds): {len(analysis.failed)} "
        f"failed, {len(analysis.over_budget)} over budget. Accuracies in %, mean ± 95% CI "
        "over seeds.",
        "",
    ]
    if analysis.has_auc and analysis.varies_both:
        lines += [BOTH_AXES, ""]
    elif analysis.has_auc:
        rows = [[r["strategy"], _fmt(_row_ci(r, "auc_a_pct"), 1.0, ".1f"),
                 _fmt(_row_ci(r, "auc_l_pct"), 1.0, ".1f"), _memory_range(r), str(r["seeds"])]
                for r in _auc_rows_ranked(analysis)]
        lines += ["AUC: mean accuracy over the memory range (area / range width), %",
                  _text_table(["strategy", "AUC-A (average)", "AUC-L (last)",
                               "memory (MB)", "seeds"], rows), ""]
    else:
        lines += [NO_AUC, ""]
    if analysis.has_compute and analysis.has_auc and not analysis.varies_both:
        rows = [[r["strategy"],
                 _fmt(_row_ci(r, "auc_a_compute_pct", "compute_seeds"), 1.0, ".1f"),
                 _fmt(_row_ci(r, "auc_l_compute_pct", "compute_seeds"), 1.0, ".1f"),
                 _gflop_range(r), str(r["compute_seeds"])]
                for r in _auc_rows_ranked(analysis)]
        lines += ["AUC over compute: mean accuracy over the log10 learning-FLOP range, %",
                  _text_table(["strategy", "AUC-A (average)", "AUC-L (last)",
                               "learning GFLOP", "seeds"], rows), ""]
    compute = analysis.has_compute
    rows = []
    for label, mb in analysis.budgets:
        ranked = [s for group in analysis.ranking(label) for s in group]
        for i, s in enumerate(ranked or ["-"]):
            row = [label if i == 0 else "", _mb(mb) if i == 0 else "", s,
                   _fmt(analysis.score(s, label, "final_accuracy"), spec=".1f"),
                   _fmt(analysis.score(s, label, "average_incremental_accuracy"), spec=".1f")]
            if compute:
                flops, steps = analysis.compute_score(s, label)
                row += [gflop_text(flops), count_text(steps)]
            rows.append(row)
    header = ["budget", "memory (MB)", "strategy", "last", "average"]
    lines += ["accuracy at each budget, %, best last accuracy first"
              + ("; learning GFLOP and optimizer steps, means over seeds" if compute else ""),
              _text_table(header + (["GFLOP", "steps"] if compute else []), rows), ""]
    if compute:
        kept = [f"{r['strategy']} @ {r['budget']}" for r in analysis.frontier
                if r["on_frontier"]]
        lines += ["Pareto frontier of (memory held, learning FLOPs, last accuracy): "
                  + ("; ".join(kept) or "-"), ""]
    else:
        lines += [NO_COMPUTE, ""]
    lines += ["ranking by last accuracy: '>' where every strategy before it beats every one",
              "after it (Holm-adjusted paired t-test, p < 0.05), '≈' where not told apart"]
    width = max(len(label) for label, _ in analysis.budgets)
    for label, _ in analysis.budgets:
        lines.append(f"  {label:<{width}}  {ranking_text(analysis.ranking(label)) or '-'}")
    return "\n".join(lines)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; numbers (cells starting with a digit)
    right-aligned so decimals line up."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if c[:1].isdigit() else c.ljust(w)
                         for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plot_accuracy_vs_memory(analysis: Analysis, path: Path) -> None:
    """Average and last accuracy against memory, one line per strategy, CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, name in (
        (axes[0], "average_incremental_accuracy", "average accuracy"),
        (axes[1], "final_accuracy", "last accuracy"),
    ):
        memory_of = dict(analysis.budgets)
        for s in analysis.strategies:
            style = strategy_style(s)
            # one line per compute level where the points vary both axes
            for n, labels in enumerate(analysis.lines_along("memory").values()):
                points = [(memory_of[label], analysis.score(s, label, metric))
                          for label in labels]
                points = [(mb, ci) for mb, ci in points if mb is not None and ci is not None]
                if not points:
                    continue
                xs = [mb for mb, _ in points]
                ys = [ci.mean * 100 for _, ci in points]
                errors = [(ci.half_width or 0.0) * 100 for _, ci in points]
                ax.errorbar(xs, ys, yerr=errors, marker=style.marker, color=style.colour,
                            capsize=3, label=s if n == 0 else None,
                            linestyle=LINE_STYLES[n % len(LINE_STYLES)])
        ax.set_ylim(0, 100)
        ax.set_xlabel("memory budget (MB, 2^20 bytes)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    try:  # a failed write leaves the old figure
        write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(fig)


def write_hparams(analysis: Analysis, log_dir: Path) -> None:
    """One TensorBoard HParams run per finished cell: strategy, budget, seed -> accuracies,
    peak MB and, where the cell counted compute, its learning GFLOP."""
    import shutil

    if log_dir.exists():
        shutil.rmtree(log_dir)  # rebuilt from the records, like every other report file
    with open_summary_writer(log_dir) as writer:
        for index, r in enumerate(r for r in analysis.records if r.get("status") == "ok"):
            writer.add_hparams(
                {
                    "strategy": r["strategy"],
                    "budget": r["budget"],
                    "budget_mb": float(r.get("memory_mb") or 0.0),
                    "seed": int(r["seed"]),
                },
                {
                    "hparam/final_accuracy": r["final_accuracy"],
                    "hparam/average_accuracy": r["average_incremental_accuracy"],
                    "hparam/peak_mb": r["peak_bytes"] / 2**20,
                    **({} if learning_flops(r) is None
                       else {"hparam/learning_gflop": learning_flops(r) / GFLOP}),
                },
                run_name=f"cell{index:04d}",
            )
