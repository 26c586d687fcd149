"""The comparison's compute figures: accuracy against learning FLOPs, and the Pareto
frontier of memory, compute and accuracy (:func:`clsim.report.frontier_rows`).

Compute spans orders of magnitude between strategies (a replay step forwards twice the
rows of a naive one; a distillation adds a teacher), so its axis is logarithmic. Each
strategy keeps its colour and marker (:mod:`clsim.colours`); budget points are numbered
b1, b2, ... in the report's budget order, and the figure says which is which.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from clsim.colours import LINE_STYLES, strategy_style
from clsim.compute_figures import GFLOP, learning_flops
from clsim.results import write_atomic
from clsim.stats import mean_ci

if TYPE_CHECKING:
    from clsim.report import Analysis


def plot_accuracy_vs_compute(analysis: Analysis, path: Path) -> None:
    """Average and last accuracy against learning GFLOP (log axis), one line per strategy
    through its budget points (mean over the seeds that counted compute, CI error bars),
    each point labelled with its budget's number; where the points vary memory too, one
    line per memory level (solid, dashed, dotted in budget order)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, metric, name in (
        (axes[0], "average_incremental_accuracy", "average accuracy"),
        (axes[1], "final_accuracy", "last accuracy"),
    ):
        index_of = {label: i for i, (label, _) in enumerate(analysis.budgets)}
        for s in analysis.strategies:
            style = strategy_style(s)
            # one line per memory level where the points vary both axes
            for n, labels in enumerate(analysis.lines_along("compute").values()):
                points = []
                for label in labels:
                    cells = analysis.compute_cells(s, label)
                    flops = [learning_flops(r) for r in cells]
                    if not cells or min(flops) <= 0:
                        continue
                    ci = mean_ci([100.0 * r[metric] for r in cells])
                    points.append((sum(flops) / len(flops) / GFLOP, ci.mean,
                                   ci.half_width or 0.0, index_of[label]))
                if not points:
                    continue
                points.sort()
                ax.errorbar([p[0] for p in points], [p[1] for p in points],
                            yerr=[p[2] for p in points], marker=style.marker,
                            color=style.colour, capsize=3, label=s if n == 0 else None,
                            linestyle=LINE_STYLES[n % len(LINE_STYLES)])
                _number_points(ax, [(p[0], p[1], p[3]) for p in points], style.colour)
        _log_axis(ax.xaxis, ax.set_xscale)
        ax.set_ylim(0, 100)
        ax.set_xlabel("learning compute (GFLOP, 10^9 FLOPs, log scale)")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(loc="best", fontsize="small")
    _budget_key(fig, analysis)
    _save(fig, path)


def plot_frontier(analysis: Analysis, path: Path) -> None:
    """Left: memory held against learning GFLOP, coloured by last accuracy; right: last
    accuracy against learning GFLOP. Points on the Pareto frontier are ringed in red."""
    plt = _pyplot()
    rows = [r for r in analysis.frontier  # a log axis has no place for 0
            if r["on_frontier"] is not None and r["learning_flops"] > 0 and r["held_mb"] > 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    left, right = axes
    scatter = None
    for s in analysis.strategies:
        mine = [r for r in rows if r["strategy"] == s]
        if not mine:
            continue
        style = strategy_style(s)
        xs = [r["learning_flops"] / GFLOP for r in mine]
        accuracy = [100.0 * r["final_accuracy"] for r in mine]
        scatter = left.scatter(xs, [r["held_mb"] for r in mine], c=accuracy, cmap="viridis",
                               vmin=0, vmax=100, marker=style.marker, s=60,
                               edgecolors=style.colour, linewidths=1.2, label=s, zorder=3)
        right.scatter(xs, accuracy, color=style.colour, marker=style.marker, s=45, label=s,
                      zorder=3)
        for ax, ys in ((left, [r["held_mb"] for r in mine]), (right, accuracy)):
            _number_points(ax, [(x, y, r["budget_index"])
                                for x, y, r in zip(xs, ys, mine, strict=True)], style.colour)
    kept = [r for r in rows if r["on_frontier"]]
    for ax, ys in ((left, [r["held_mb"] for r in kept]),
                   (right, [100.0 * r["final_accuracy"] for r in kept])):
        ax.scatter([r["learning_flops"] / GFLOP for r in kept], ys, s=190,
                   facecolors="none", edgecolors="red", linewidths=1.6,
                   label="on the Pareto frontier", zorder=4)
        _log_axis(ax.xaxis, ax.set_xscale)
        ax.set_xlabel("learning compute (GFLOP, log scale)")
        ax.grid(alpha=0.3, which="both")
    _log_axis(left.yaxis, left.set_yscale)
    left.set_ylabel("memory held (MB, 2^20 bytes, log scale)")
    left.set_title("memory against compute (colour: last accuracy)")
    right.set_ylim(0, 100)
    right.set_ylabel("last accuracy (%)")
    right.set_title("last accuracy against compute")
    right.legend(loc="best", fontsize="small")
    if scatter is not None:
        fig.colorbar(scatter, ax=left, label="last accuracy (%)")
    _budget_key(fig, analysis)
    _save(fig, path)


def _number_points(ax, points: list[tuple[float, float, int]], colour: str) -> None:
    """Label each point with its budget's number; points at the same place share one
    label (b1,b2) instead of printing over each other."""
    labels: dict[tuple[float, float], list[str]] = {}
    for x, y, index in points:
        labels.setdefault((x, y), []).append(f"b{index + 1}")
    for (x, y), names in labels.items():
        ax.annotate(",".join(names), (x, y), textcoords="offset points", xytext=(5, 4),
                    fontsize="x-small", color=colour)


def _log_axis(axis, set_scale) -> None:
    """A log scale with ticks written as plain numbers (0.5, 2, 300), not 2x10^0; the
    minor ticks at 2, 3 and 5 labelled too when the data span less than two decades.
    Call it once the data are drawn."""
    import math

    from matplotlib.ticker import FuncFormatter, NullFormatter

    set_scale("log")
    plain = FuncFormatter(lambda value, _: f"{value:.3g}")
    axis.set_major_formatter(plain)
    low, high = axis.get_view_interval()
    narrow = low > 0 and math.log10(high / low) < 2

    def sparse(value: float, _) -> str:  # 2, 3 and 5 of each decade: 0.4 ... 0.9 crowd
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:.3g}" if mantissa in (2.0, 3.0, 5.0) else ""

    axis.set_minor_formatter(FuncFormatter(sparse) if narrow else NullFormatter())


def _budget_key(fig, analysis: Analysis) -> None:
    """Which budget each point number stands for, under the panels."""
    key = "; ".join(f"b{i + 1} = {label}" for i, (label, _) in enumerate(analysis.budgets))
    fig.text(0.5, 0.01, key, ha="center", va="bottom", fontsize="small", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:  # a failed write leaves the old figure
        write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(fig)
