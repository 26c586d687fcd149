"""Scores of a run, by stream family, from correct-prediction counts per label.

The engine hands over ``(n_experiences, n_labels)`` hit tables: one after each
experience the strategy was shown, and one at every anytime evaluation of an online
stream. Everything here is counting and averaging, so scores are exact functions of
the predictions and survive a JSON round trip.

- every family with visible boundaries: the accuracy matrix and its scores
  (:func:`clsim.metrics.summarize`);
- online streams: anytime accuracy on the classes seen so far, A_auc (its mean over the
  evaluations, every ``eval_every`` samples and at the end), A_last, and per-class
  forgetting (best earlier accuracy minus final, averaged over classes seen before the
  end);
- hierarchical streams: the same per level, a coarse sample being right when the coarse
  head or a finer head's class (through its ancestors) is right;
- few-shot streams: accuracy per session on all seen classes, split into base (session
  0) and novel classes, and the drop from the first to the last session.

With hidden boundaries there is no experience end to evaluate at, so the three headline
keys are the anytime ones: ``final_accuracy`` = A_last, ``average_incremental_accuracy``
= A_auc, ``forgetting`` = mean per-class forgetting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clsim.metrics import AccuracyMatrix, summarize
from clsim.stream import Stream


@dataclass
class AnytimePoint:
    """One evaluation of an online stream, after ``position`` training samples."""

    position: int
    hits: np.ndarray  # (n_labels,)
    seen: np.ndarray  # (n_labels,) bool: labels met in training so far


@dataclass
class RunRecord:
    """What the engine measured, in counts."""

    counts: np.ndarray  # (n_experiences, n_labels) test samples
    initial: np.ndarray | None = None  # hits before training
    after_experience: list[np.ndarray] = field(default_factory=list)
    anytime: list[AnytimePoint] = field(default_factory=list)


def _ratio(hits: np.ndarray, counts: np.ndarray, keep: np.ndarray) -> float | None:
    total = int(counts[keep].sum())
    return None if total == 0 else float(hits[keep].sum() / total)


def score(stream: Stream, record: RunRecord) -> dict[str, Any]:
    """Every score of the run as JSON-ready plain data."""
    out: dict[str, Any] = {}
    if not stream.boundaries_hidden:
        matrix = AccuracyMatrix(
            correct=np.stack([h.sum(axis=1) for h in record.after_experience]),
            counts=record.counts.sum(axis=1),
            initial_correct=None if record.initial is None else record.initial.sum(axis=1),
        )
        out.update(summarize(matrix))
    if stream.online:
        out["anytime"] = anytime_scores(stream, record)
        if stream.boundaries_hidden:
            overall = out["anytime"]["all"]
            out.update(final_accuracy=overall["a_last"],
                       average_incremental_accuracy=overall["a_auc"],
                       forgetting=overall["class_forgetting"])
    if record.after_experience:  # per-experience scores need experience ends
        if stream.labels.n_levels > 1:
            out["levels"] = level_scores(stream, record)
        if stream.family == "few_shot":
            out["few_shot"] = few_shot_scores(stream, record)
    return out


def first_occurrence(counts: np.ndarray) -> np.ndarray:
    """``(n_experiences, n_labels)`` bool: the first experience testing each label. A
    recurring task tests its classes again in later experiences; per-label scores count
    each class's test set once."""
    tested = counts > 0
    return tested & (np.cumsum(tested, axis=0) == 1)


def per_label(table: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(n_labels,)`` hits (or counts) of ``table``, each label's test set counted once."""
    return (table * first_occurrence(counts)).sum(axis=0)


def anytime_scores(stream: Stream, record: RunRecord) -> dict[str, Any]:
    """A_auc, A_last and per-class forgetting, over all labels and per level. A_auc is the
    area under the anytime-accuracy curve over the samples seen, divided by their number:
    the mean of the evaluations, each weighted by the samples since the previous one (the
    last period may be shorter)."""
    counts = per_label(record.counts, record.counts)
    levels = stream.labels.level_of()
    groups = {"all": np.ones_like(levels, dtype=bool)}
    if stream.labels.n_levels > 1:
        groups.update({name: levels == i for i, name in enumerate(stream.labels.level_names)})
    out: dict[str, Any] = {"positions": [p.position for p in record.anytime]}
    for name, members in groups.items():
        curve = [_ratio(p.hits, counts, p.seen & members) for p in record.anytime]
        defined = [(a, w) for a, w in zip(curve, _periods(record.anytime), strict=True)
                   if a is not None]
        out[name] = {
            "accuracy": curve,
            "a_auc": (float(np.average([a for a, _ in defined], weights=[w for _, w in defined]))
                      if defined else None),
            "a_last": curve[-1] if curve else None,
            "class_forgetting": _class_forgetting(record.anytime, counts, members),
        }
    return out


def _periods(points: list[AnytimePoint]) -> list[int]:
    """Samples between each evaluation and the previous one (the first: from 0)."""
    positions = [0] + [p.position for p in points]
    return [max(1, b - a) for a, b in zip(positions, positions[1:], strict=False)]


def _class_forgetting(points: list[AnytimePoint], counts: np.ndarray,
                      members: np.ndarray) -> float | None:
    """Mean over classes seen before the last evaluation of (best earlier accuracy -
    final accuracy); a class's accuracies count from its first appearance on."""
    if len(points) < 2:
        return None
    final = points[-1]
    drops = []
    for label in np.flatnonzero(members & points[-2].seen & (counts > 0)):
        earlier = [p.hits[label] / counts[label] for p in points[:-1] if p.seen[label]]
        drops.append(max(earlier) - final.hits[label] / counts[label])
    return float(np.mean(drops)) if drops else None


def level_scores(stream: Stream, record: RunRecord) -> dict[str, Any]:
    """Per level: accuracy after each experience on that level's seen classes."""
    counts = per_label(record.counts, record.counts)
    levels = stream.labels.level_of()
    seen = np.zeros_like(levels, dtype=bool)
    curves: dict[str, list[float | None]] = {n: [] for n in stream.labels.level_names}
    for exp, hits in zip(stream, record.after_experience, strict=False):
        seen[list(exp.classes)] = True
        total = per_label(hits, record.counts)
        for i, name in enumerate(stream.labels.level_names):
            curves[name].append(_ratio(total, counts, seen & (levels == i)))
    return {name: {"accuracy_after_experience": curve,
                   "final_accuracy": curve[-1] if curve else None}
            for name, curve in curves.items()}


def few_shot_scores(stream: Stream, record: RunRecord) -> dict[str, Any]:
    """Per session: accuracy on all seen, base and novel classes; the first-to-last drop."""
    counts = per_label(record.counts, record.counts)
    base = np.zeros(counts.shape, dtype=bool)
    base[list(stream[0].classes)] = True
    seen = np.zeros_like(base)
    sessions: dict[str, list[float | None]] = {"all": [], "base": [], "novel": []}
    for exp, hits in zip(stream, record.after_experience, strict=False):
        seen[list(exp.classes)] = True
        total = per_label(hits, record.counts)
        sessions["all"].append(_ratio(total, counts, seen))
        sessions["base"].append(_ratio(total, counts, seen & base))
        sessions["novel"].append(_ratio(total, counts, seen & ~base))
    first, last = sessions["all"][0], sessions["all"][-1]
    return {
        "session_accuracy": sessions["all"],
        "base_accuracy": sessions["base"],
        "novel_accuracy": sessions["novel"],
        "performance_drop": None if first is None or last is None else first - last,
    }
