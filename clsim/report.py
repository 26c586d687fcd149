"""The comparison report, rebuilt from the cell records alone (``clsim report DIR``).

Writes ``summary.csv`` (one row per cell), ``auc.csv`` (AUC-A and AUC-L per strategy),
``report.md`` (tables, ranking at each budget, paired tests, over-budget notes),
``accuracy_vs_memory.png`` and TensorBoard HParams runs under ``tensorboard/hparams``.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clsim.budget import format_bytes
from clsim.logging.tensorboard import open_summary_writer
from clsim.results import write_atomic, write_text_atomic, writing
from clsim.stats import MeanCI, auc, mean_ci, paired_tests

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
    "threads",
    "error",
]


@dataclass
class Analysis:
    """Everything the report says, computed once from the records."""

    records: list[Record]
    strategies: list[str]
    budgets: list[tuple[str, float | None]]  # (label, memory in MB), in budget order
    cells: dict[tuple[str, str], list[Record]] = field(default_factory=dict)  # ok cells
    auc_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.get("status") != "ok"]

    @property
    def over_budget(self) -> list[Record]:
        return [r for r in self.records if r.get("status") == "ok" and r.get("over_budget")]

    def score(self, strategy: str, budget: str, metric: str) -> MeanCI | None:
        values = [r[metric] for r in self.cells.get((strategy, budget), [])]
        return mean_ci(values) if values else None


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
    result.auc_rows = [_auc_row(result, s) for s in strategies]
    return result


def _auc_row(analysis: Analysis, strategy: str) -> dict[str, Any]:
    """AUC-A and AUC-L per seed over the budgets that seed completed, then mean and CI."""
    per_seed: dict[int, list[Record]] = defaultdict(list)
    for (name, _), cells in analysis.cells.items():
        if name == strategy:
            for r in cells:
                if r.get("memory_mb") is not None:
                    per_seed[r["seed"]].append(r)
    complete = {seed: rs for seed, rs in per_seed.items() if len(rs) == len(analysis.budgets)}
    row: dict[str, Any] = {"strategy": strategy, "seeds": len(complete)}
    for name, metric in (("auc_a", "average_incremental_accuracy"), ("auc_l", "final_accuracy")):
        values = [
            auc([r["memory_mb"] for r in rs], [r[metric] for r in rs]) for rs in complete.values()
        ]
        ci = mean_ci(values) if values else None
        row[name] = None if ci is None else ci.mean
        row[f"{name}_ci95"] = None if ci is None else ci.half_width
        row[f"{name}_per_seed"] = {s: v for s, v in zip(complete, values, strict=True)}
    return row


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------


def write_report(out: Path, records: list[Record], title: str = "comparison") -> Analysis:
    """Write every report file into ``out`` from ``records``; returns the analysis."""
    analysis = analyse(records)
    write_text_atomic(out / "summary.csv", summary_csv(analysis))
    write_text_atomic(out / "auc.csv", auc_csv(analysis))
    write_text_atomic(out / "report.md", report_markdown(analysis, title))
    with writing(out / "accuracy_vs_memory.png"):
        plot_accuracy_vs_memory(analysis, out / "accuracy_vs_memory.png")
    with writing(out / "tensorboard" / "hparams"):
        write_hparams(analysis, out / "tensorboard" / "hparams")
    return analysis


def summary_csv(analysis: Analysis) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in analysis.records:
        writer.writerow({k: _csv_value(r.get(k)) for k in SUMMARY_COLUMNS})
    return buffer.getvalue()


def auc_csv(analysis: Analysis) -> str:
    buffer = io.StringIO()
    columns = ["strategy", "auc_a", "auc_a_ci95", "auc_l", "auc_l_ci95", "seeds"]
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in analysis.auc_rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
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
        "AUC-A integrates average incremental accuracy and AUC-L last accuracy over memory "
        "in MB (trapezoid rule over the budgets; MB = 2^20 bytes), per seed, then averaged.",
        "",
        "| strategy | AUC-A | AUC-L | seeds |",
        "|---|---|---|---|",
    ]
    for row in sorted(analysis.auc_rows, key=lambda r: -(r["auc_a"] or float("-inf"))):
        a = _fmt(_row_ci(row, "auc_a"), 1.0, ".4g")
        b = _fmt(_row_ci(row, "auc_l"), 1.0, ".4g")
        lines.append(f"| {row['strategy']} | {a} | {b} | {row['seeds']} |")
    for metric, name in (
        ("final_accuracy", "Last accuracy"),
        ("average_incremental_accuracy", "Average incremental accuracy"),
    ):
        lines += ["", f"## {name} at each budget", ""]
        header = (
            "| strategy | "
            + " | ".join(
                f"{label} ({mb:.2f} MB)" if mb is not None else label
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
        "Ranked by mean last accuracy. Pairs: paired t-test over common seeds on last "
        "accuracy, Holm-adjusted within the budget; * marks p < 0.05.",
        "",
    ]
    for label, _ in analysis.budgets:
        ranked = sorted(
            (s for s in analysis.strategies if analysis.score(s, label, "final_accuracy")),
            key=lambda s: -analysis.score(s, label, "final_accuracy").mean,
        )
        lines.append(f"- **{label}**: " + " > ".join(ranked) if ranked else f"- **{label}**: -")
        scores = {
            s: {r["seed"]: r["final_accuracy"] for r in analysis.cells.get((s, label), [])}
            for s in ranked
        }
        for t in paired_tests(scores):
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


def _row_ci(row: dict[str, Any], name: str) -> MeanCI | None:
    if row[name] is None:
        return None
    return MeanCI(row[name], row[f"{name}_ci95"], row["seeds"])


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
        for s in analysis.strategies:
            points = [(mb, analysis.score(s, label, metric)) for label, mb in analysis.budgets]
            points = [(mb, ci) for mb, ci in points if mb is not None and ci is not None]
            if not points:
                continue
            xs = [mb for mb, _ in points]
            ys = [ci.mean * 100 for _, ci in points]
            errors = [(ci.half_width or 0.0) * 100 for _, ci in points]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=s)
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
    """One TensorBoard HParams run per finished cell: strategy, budget, seed -> accuracies."""
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
                },
                run_name=f"cell{index:04d}",
            )
