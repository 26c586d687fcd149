"""``run.png``: a run to look at without a TensorBoard server, drawn from summary.json.

Three blocks, one panel per strategy that finished (status ok) unless said otherwise:

- the accuracy matrix as a heatmap: row i is after experience i, column j the test set
  of experience j, in %, the cells annotated while the matrix is small enough to read;
- one panel for all strategies: accuracy on the classes seen so far after each
  experience (with hidden boundaries there are no experience ends, so the anytime
  accuracy against training samples), in the strategy's colour from
  :mod:`clsim.colours`, as in ``clsim compare``'s plot;
- the ledger's named parts stacked, at each experience's peak reading (the most bytes
  any reading of that experience held: what a ``peak`` budget check compares), with the
  bytes kept at the experience's end as dots and the budget as a dashed line. Parts under
  2% of the strategy's largest reading are summed as "other parts", so a replay buffer's
  counters do not crowd the legend.

Strategies that did not finish are named in the title and skipped. Only the summary is
read, so the figure can be redrawn for any results folder.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from clsim.colours import strategy_style
from clsim.results import write_atomic

FILE_NAME = "run.png"
ANNOTATE_UP_TO = 10  # experiences: larger matrices are drawn without numbers
PANELS_PER_ROW = 4
SMALL_PART = 0.02  # of the strategy's largest reading: summed into "other parts"


def write_run_figure(out_dir: Path, summary: dict[str, Any]) -> Path | None:
    """Write ``out_dir/run.png`` (atomically) from ``summary``; returns its path, or None
    when no strategy finished, as there is nothing to draw."""
    strategies = summary.get("strategies") or {}
    done = {n: s for n, s in strategies.items() if s.get("status") == "ok"}
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stream = summary.get("stream") or {}
    word = "session" if stream.get("family") == "few_shot" else "experience"
    cols = min(len(done), PANELS_PER_ROW)
    rows = math.ceil(len(done) / cols)
    heat_rows = rows if any(s.get("accuracy_matrix") for s in done.values()) else 0
    width = max(4.2 * cols, 8.0)
    fig = plt.figure(figsize=(width, 3.6 * (heat_rows + rows + 1)), layout="constrained")
    grid = fig.add_gridspec(heat_rows + rows + 1, cols)
    heat_axes = [fig.add_subplot(grid[i // cols, i % cols])
                 for i in range(len(done) if heat_rows else 0)]
    seen_ax = fig.add_subplot(grid[heat_rows, :])
    ledger_axes = [fig.add_subplot(grid[heat_rows + 1 + i // cols, i % cols])
                   for i in range(len(done))]

    image = None
    for ax, (name, s) in zip(heat_axes, done.items(), strict=False):
        image = _heatmap(ax, name, s, word) or image
    if image is not None:
        fig.colorbar(image, ax=heat_axes, shrink=0.8, label="accuracy (%)")
    _seen_accuracy(seen_ax, done, word)
    colours = _part_colours(done)
    for ax, (name, s) in zip(ledger_axes, done.items(), strict=True):
        _ledger(ax, name, s, word, colours)

    skipped = [f"{n} ({s.get('status', 'no status')})" for n, s in strategies.items()
               if n not in done]
    matrix = "accuracy matrix; " if heat_rows else "no accuracy matrix (boundaries hidden); "
    title = (f"{summary.get('scenario', 'run')}: {matrix}seen accuracy; bytes held by named "
             f"part at each {word}'s peak reading (dots: kept at its end; dashed: budget)")
    if skipped:
        title += ". Skipped, not finished: " + ", ".join(skipped)
    fig.suptitle(textwrap.fill(title, int(width * 12)), fontsize="medium")
    path = out_dir / FILE_NAME
    try:
        write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def _heatmap(ax: Any, name: str, s: dict[str, Any], word: str) -> Any:
    """The accuracy matrix of one strategy; returns the image (None without a matrix)."""
    _title(ax, name, s)
    matrix = s.get("accuracy_matrix")
    if not matrix:
        ax.text(0.5, 0.5, "no accuracy matrix", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return None
    values = np.array([[np.nan if v is None else 100.0 * v for v in row] for row in matrix])
    image = ax.imshow(values, vmin=0.0, vmax=100.0, cmap="viridis", aspect="auto")
    n_rows, n_cols = values.shape
    if max(n_rows, n_cols) <= ANNOTATE_UP_TO:
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize="small",
                        color="black" if v > 60 else "white")
    ax.set_xlabel(f"test set of {word} j")
    ax.set_ylabel(f"after {word} i")
    _integer_ticks(ax.set_xticks, n_cols)
    _integer_ticks(ax.set_yticks, n_rows)
    return image


def _seen_accuracy(ax: Any, done: dict[str, dict[str, Any]], word: str) -> None:
    """Seen accuracy after each experience, one line per strategy; with hidden
    boundaries, anytime accuracy against the training samples seen."""
    per_experience = any(s.get("seen_accuracy") for s in done.values())
    longest = 0
    for name, s in done.items():
        style = strategy_style(name)
        if per_experience:
            ys = s.get("seen_accuracy") or []
            xs = list(range(len(ys)))
        else:
            anytime = s.get("anytime") or {}
            xs, ys = anytime.get("positions") or [], (anytime.get("all") or {}).get("accuracy")
            ys = ys or []
        points = [(x, 100.0 * y) for x, y in zip(xs, ys, strict=False) if y is not None]
        if points:
            longest = max(longest, len(ys))
            ax.plot(*zip(*points, strict=True), marker=style.marker, color=style.colour,
                    label=name)
    if per_experience:
        ax.set_xlabel(f"after {word}")
        ax.set_title(f"accuracy on the classes seen so far, after each {word}")
        _integer_ticks(ax.set_xticks, longest)
    else:
        ax.set_xlabel("training samples seen")
        ax.set_title("anytime accuracy on the classes seen so far (boundaries hidden)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="best", fontsize="small", ncols=min(len(done), 4))


def _ledger(ax: Any, name: str, s: dict[str, Any], word: str, colours: dict[str, Any]) -> None:
    """The named parts stacked at each experience's peak reading, kept bytes at its end
    as dots, the budget as a dashed line."""
    _title(ax, name, s)
    peaks, ends = _experience_readings(s.get("ledger") or [])
    if not peaks:
        ax.text(0.5, 0.5, "no ledger readings", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    budget = s.get("budget_bytes")
    largest = _largest(peaks, budget)
    scale, unit = _byte_unit(largest)
    parts = _parts(peaks.values(), largest)
    experiences = sorted(peaks)
    bottom = np.zeros(len(experiences))
    for part in parts:
        heights = np.array([_part_bytes(peaks[e], part, parts) for e in experiences]) / scale
        ax.bar(experiences, heights, bottom=bottom, color=colours[part], label=part, width=0.7)
        bottom += heights
    if ends:
        xs = sorted(ends)
        ax.plot(xs, [ends[e].get("total_bytes", 0) / scale for e in xs], "o", color="black",
                markersize=4, label="kept at the end")
    if budget:
        ax.axhline(budget / scale, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel(word)
    ax.set_ylabel(f"bytes held ({unit})")
    ax.set_ylim(0, 1.6 * largest / scale)  # room above the bars for the legend
    _integer_ticks(ax.set_xticks, len(experiences), experiences)
    ax.legend(loc="upper left", fontsize="x-small", ncols=2)


def _part_colours(done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One colour per part drawn in any panel (a part keeps it across strategies)."""
    import matplotlib

    names: dict[str, None] = {}
    for s in done.values():
        peaks, _ = _experience_readings(s.get("ledger") or [])
        largest = _largest(peaks, s.get("budget_bytes"))
        names.update(dict.fromkeys(p for p in _parts(peaks.values(), largest) if p != OTHER))
    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    colours: dict[str, Any] = {p: cmap(i % cmap.N) for i, p in enumerate(names)}
    colours[OTHER] = "lightgrey"
    return colours


def _largest(peaks: dict[int, dict[str, Any]], budget: int | None) -> int:
    """The panel's height: the largest peak reading, or the budget when higher."""
    return max([r.get("total_bytes", 0) for r in peaks.values()] + [budget or 0])


def _experience_readings(
    readings: list[dict[str, Any]],
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Per experience: the reading that held the most bytes, and its last 'end' reading."""
    peaks: dict[int, dict[str, Any]] = {}
    ends: dict[int, dict[str, Any]] = {}
    for r in readings:
        e = r.get("experience")
        if e is None:
            continue
        if e not in peaks or r.get("total_bytes", 0) > peaks[e].get("total_bytes", 0):
            peaks[e] = r
        if r.get("point") == "end":
            ends[e] = r
    return peaks, ends


OTHER = "other parts"


def _parts(readings: Any, largest: int) -> list[str]:
    """The parts drawn on their own (largest first), then OTHER when any is small."""
    most: dict[str, int] = {}
    for r in readings:
        for part, n in (r.get("parts") or {}).items():
            most[part] = max(most.get(part, 0), n)
    big = sorted((p for p, n in most.items() if n >= SMALL_PART * largest),
                 key=lambda p: (-most[p], p))
    return big + ([OTHER] if len(big) < len(most) else [])


def _part_bytes(reading: dict[str, Any], part: str, drawn: list[str]) -> int:
    parts = reading.get("parts") or {}
    if part == OTHER:
        return sum(n for p, n in parts.items() if p not in drawn)
    return parts.get(part, 0)


def _byte_unit(n: int) -> tuple[int, str]:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return size, unit
    return 1, "bytes"


def _title(ax: Any, name: str, s: dict[str, Any]) -> None:
    over = " (over budget)" if s.get("over_budget") else ""
    ax.set_title(name + over, color=strategy_style(name).colour, fontweight="bold")


def _integer_ticks(set_ticks: Any, n: int, ticks: list[int] | None = None) -> None:
    """One tick per experience while they fit; matplotlib chooses beyond 20."""
    if n <= 20:
        set_ticks(ticks if ticks is not None else list(range(n)))
