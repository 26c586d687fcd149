"""The Pareto frontier of (memory, compute, accuracy): the results no other result beats
on every axis at once.

Less memory and less compute are better, more accuracy is better. Point ``q`` dominates
point ``p`` when ``q.memory <= p.memory``, ``q.compute <= p.compute`` and
``q.accuracy >= p.accuracy`` with at least one of the three strict; ``p`` is on the
frontier when no point dominates it. Two points equal on all three axes do not dominate
each other, so both stay on it. Comparisons are exact (no tolerance): the figures are
means over seeds, and a tolerance would be a second, hidden definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    """One result on the three axes."""

    memory: float
    compute: float
    accuracy: float


def dominates(q: Point, p: Point) -> bool:
    """Whether ``q`` is at least as good as ``p`` on every axis and better on one."""
    at_least = q.memory <= p.memory and q.compute <= p.compute and q.accuracy >= p.accuracy
    better = q.memory < p.memory or q.compute < p.compute or q.accuracy > p.accuracy
    return at_least and better


def on_frontier(points: Sequence[Point]) -> list[bool]:
    """For each point, whether no other point dominates it (quadratic: a grid has tens
    of points)."""
    return [not any(dominates(q, p) for q in points) for p in points]
