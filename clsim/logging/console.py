"""What a person sees in the terminal: progress bars and the results table."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from clsim.budget import format_bytes
from clsim.compute_figures import (
    compute_budget,
    compute_field,
    count_text,
    gflop_text,
    learning_flops,
)


def progress_factory() -> Callable[[str, int], Any]:
    """A function (description, total) -> tqdm bar on stderr, cleared when done."""
    from tqdm import tqdm

    def make(description: str, total: int) -> Any:
        return tqdm(
            total=total,
            desc=description,
            unit="batch",
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.2,
        )

    return make


def results_table(strategies: dict[str, dict[str, Any]]) -> str:
    """The summary as an aligned text table, one row per strategy: scores, the bytes held
    and, beside them, what the strategy computed to learn (GFLOP: learning FLOPs / 10^9;
    steps: optimizer steps; ``-`` with compute accounting off)."""
    header = (
        "strategy",
        "final acc",
        "avg inc acc",
        "forgetting",
        "peak held",
        "kept between",
        "GFLOP",
        "steps",
        "budget",
        "over budget",
    )
    rows = []
    for name, s in strategies.items():
        if s.get("status") == "failed":
            rows.append((name, "failed", "-", "-", "-", "-", "-", "-",
                         format_bytes(s.get("budget_bytes")), "-"))
            continue
        estimated = " (est.)" if s.get("memory_estimated") else ""
        # peak held: the most during training; kept: the most held between experiences
        # (a summary written before the split has no kept figure)
        kept = s.get("kept_bytes")
        over = "YES" if s["over_budget"] else "no"
        if s.get("budget_check") == "between":
            over += " (between)"  # checked against the bytes kept between experiences
        rows.append(
            (
                name,
                _score(s.get("final_accuracy")),
                _score(s.get("average_incremental_accuracy")),
                _score(s.get("forgetting")),
                format_bytes(s["peak_bytes"]) + estimated,
                "-" if kept is None else format_bytes(kept) + estimated,
                gflop_text(learning_flops(s)),
                count_text(compute_field(s, "steps")),
                format_bytes(s["budget_bytes"]),
                over,
            )
        )
    return _align([header, *rows])


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def family_table(summary: dict[str, Any]) -> str:
    """The family's own scores: anytime (online), per level (hierarchical), per session
    (few-shot); empty for a plain class-incremental run."""
    stream = summary.get("stream", {})
    done = {n: s for n, s in summary["strategies"].items() if s.get("status") == "ok"}
    blocks = []
    levels = [level["name"] for level in stream.get("label_levels", [])]
    if stream.get("online") and done:
        groups = ["all"] + (levels if len(levels) > 1 else [])
        header = ("strategy", *(f"{g} A_auc" for g in groups), *(f"{g} A_last" for g in groups))
        rows = [(name, *(_score(s["anytime"][g]["a_auc"]) for g in groups),
                 *(_score(s["anytime"][g]["a_last"]) for g in groups))
                for name, s in done.items()]
        blocks.append(f"anytime accuracy (every {stream.get('eval_every')} samples):\n"
                      + _align([header, *rows]))
    if stream.get("family") == "few_shot" and done:
        n = len(next(iter(done.values()))["few_shot"]["session_accuracy"])
        header = ("strategy", *(f"s{i}" for i in range(n)), "base", "novel", "drop")
        rows = []
        for name, s in done.items():
            f = s["few_shot"]
            rows.append((name, *(_score(a) for a in f["session_accuracy"]),
                         _score(f["base_accuracy"][-1]), _score(f["novel_accuracy"][-1]),
                         _score(f["performance_drop"])))
        blocks.append("accuracy per session on all seen classes; last session's base and "
                      "novel accuracy; first-to-last drop:\n" + _align([header, *rows]))
    return "\n\n".join(blocks)


def feature_cache_note(strategies: dict[str, dict[str, Any]]) -> str:
    """What the simulator's feature cache did for each strategy on a frozen encoder (not
    charged to it: clsim.feature_cache); empty when none used one."""
    parts = []
    for name, record in strategies.items():
        counts = record.get("feature_cache")
        if counts:
            uncached = counts.get("rows_uncached", 0)
            parts.append(f"{name} {counts['rows_computed']} computed, {counts['rows_reused']} "
                         f"reused" + (f", {uncached} not kept" if uncached else ""))
    if not parts:
        return ""
    return ("frozen-encoder features (the simulator's cache, not charged to strategies), "
            "rows: " + "; ".join(parts))


def compute_budget_note(strategies: dict[str, dict[str, Any]]) -> str:
    """Each compute-budgeted strategy's budget, what it spent and the batches the loop
    cut to keep to it; empty when no strategy has a compute budget."""
    lines = []
    for name, record in strategies.items():
        budget = compute_budget(record)
        if not budget:
            continue
        steps = budget["kind"] == "steps"
        total = f"{budget['total']} steps" if steps else f"{gflop_text(budget['total'])} GFLOP"
        spent = f"{budget['spent']}" if steps else gflop_text(budget["spent"])
        over = "; OVER a share (work outside the loop's steps)" if budget["over_budget"] else ""
        lines.append(f"  {name}: {budget['text']} = {total}, spent {spent}; trained "
                     f"{budget['trained_batches']} batches, cut {budget['cut_batches']}{over}")
    if not lines:
        return ""
    return "compute budgets (shared among experiences, the loop stops at each share):\n" \
        + "\n".join(lines)


def _align(rows: Iterable[tuple[str, ...]]) -> str:
    rows = list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
