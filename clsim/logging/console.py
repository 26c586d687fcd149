"""What a person sees in the terminal: progress bars and the results table."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from clsim.budget import format_bytes


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
    """The summary as an aligned text table, one row per strategy."""
    header = (
        "strategy",
        "final acc",
        "avg inc acc",
        "forgetting",
        "bytes held",
        "budget",
        "over budget",
    )
    rows = []
    for name, s in strategies.items():
        if s.get("status") == "failed":
            rows.append((name, "failed", "-", "-", "-", format_bytes(s.get("budget_bytes")), "-"))
            continue
        held = format_bytes(s["peak_bytes"]) + (" (est.)" if s.get("memory_estimated") else "")
        rows.append(
            (
                name,
                f"{s['final_accuracy']:.4f}",
                f"{s['average_incremental_accuracy']:.4f}",
                f"{s['forgetting']:.4f}",
                held,
                format_bytes(s["budget_bytes"]),
                "YES" if s["over_budget"] else "no",
            )
        )
    return _align([header, *rows])


def _align(rows: Iterable[tuple[str, ...]]) -> str:
    rows = list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
