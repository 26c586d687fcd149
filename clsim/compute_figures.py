"""The compute figures a person reads, taken from a strategy's or a cell's record.

A record's ``compute`` (:meth:`clsim.compute.ComputeMeter.to_dict`) is None when
accounting was off, and absent in records written before it; a failed cell may have
none either. Every table and figure reads compute through these helpers, so each copes
with all of that the same way: a missing figure is None, shown as ``-``.
"""

from __future__ import annotations

from typing import Any

GFLOP = 1e9


def learning_flops(record: dict[str, Any]) -> int | None:
    """Every FLOP the strategy computed but its test predictions' (the compute axis)."""
    compute = record.get("compute")
    if not isinstance(compute, dict):
        return None
    return compute.get("learning_flops")


def compute_field(record: dict[str, Any], key: str) -> Any:
    """``record["compute"][key]``, or None when the record has no compute."""
    compute = record.get("compute")
    return compute.get(key) if isinstance(compute, dict) else None


def samples_forwarded(record: dict[str, Any], kind: str) -> int | None:
    """Samples forwarded for ``kind`` (training or evaluation), or None."""
    samples = compute_field(record, "samples_forwarded")
    return samples.get(kind) if isinstance(samples, dict) else None


def compute_budget(record: dict[str, Any]) -> dict[str, Any] | None:
    """The compute budget's account (text, kind, total, spent, over_budget, cut_batches),
    or None where the run had no compute budget."""
    budget = compute_field(record, "budget")
    return budget if isinstance(budget, dict) else None


def gflop_text(flops: float | None) -> str:
    """FLOPs in GFLOP (10^9) for reading: three significant digits, whole numbers from
    100 up (1234 rather than 1.23e+03), ``-`` for none."""
    if flops is None:
        return "-"
    gflop = flops / GFLOP
    if gflop >= 100:
        return f"{gflop:.0f}"
    return f"{gflop:.3g}"


def count_text(value: float | None) -> str:
    """A count (steps) for reading, ``-`` for none; a mean over seeds keeps one decimal
    only when it is not whole."""
    if value is None:
        return "-"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}"
