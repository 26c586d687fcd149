"""The accuracy matrix and every score derived from it.

The engine evaluates, after each of the T experiences, on the test set of every
experience (future ones too), and optionally once before training. It records counts of
correct predictions rather than accuracies, so that sample-weighted scores are exact and
the record survives a JSON round trip bit for bit.

Notation below: ``R[i, j] = correct[i, j] / counts[j]``, the accuracy on experience j's
test set after training experience i; ``b[j]`` the accuracy of the untrained model on j.
Accuracies are fractions in [0, 1]. Scores over the *union* of test sets (final, seen,
average incremental accuracy) weight each experience by its test-set size; transfer and
forgetting average per experience, as their papers define them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AccuracyMatrix",
    "average_incremental_accuracy",
    "backward_transfer",
    "final_accuracy",
    "forgetting",
    "forward_transfer",
    "from_predictions",
    "per_experience_forgetting",
    "seen_accuracy",
    "summarize",
]


def _as_int64(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer counts; got dtype {array.dtype}")
    return array.astype(np.int64, copy=True)


@dataclass
class AccuracyMatrix:
    """Correct-prediction counts of a whole run.

    :param correct: ``(T, T)``; ``correct[i, j]`` = correct predictions on experience j's
        test set after training experience i.
    :param counts: ``(T,)``; test-set sizes, each >= 1.
    :param initial_correct: ``(T,)`` correct predictions of the model before any training,
        or ``None`` when that evaluation was not run (forward transfer is then undefined).
    """

    correct: np.ndarray
    counts: np.ndarray
    initial_correct: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.correct = _as_int64("correct", self.correct)
        self.counts = _as_int64("counts", self.counts)
        if self.counts.ndim != 1 or self.counts.size < 1:
            raise ValueError(f"counts must have shape (T,) with T >= 1; got {self.counts.shape}")
        t = self.counts.size
        if self.correct.shape != (t, t):
            raise ValueError(
                f"correct must have shape (T, T) = ({t}, {t}); got {self.correct.shape}"
            )
        if (self.counts < 1).any():
            raise ValueError(f"every test set needs at least one sample; counts = {self.counts}")
        _check_within("correct", self.correct, self.counts)
        if self.initial_correct is not None:
            self.initial_correct = _as_int64("initial_correct", self.initial_correct)
            if self.initial_correct.shape != (t,):
                raise ValueError(
                    f"initial_correct must have shape ({t},); got {self.initial_correct.shape}"
                )
            _check_within("initial_correct", self.initial_correct, self.counts)

    @property
    def n_experiences(self) -> int:
        """T, the number of experiences."""
        return int(self.counts.size)

    def accuracy(self) -> np.ndarray:
        """``R = correct / counts`` (column j divided by the size of test set j), float64."""
        return self.correct / self.counts[np.newaxis, :]

    def initial_accuracy(self) -> np.ndarray | None:
        """``b = initial_correct / counts``, or ``None`` without an initial evaluation."""
        if self.initial_correct is None:
            return None
        return self.initial_correct / self.counts

    def to_dict(self) -> dict[str, Any]:
        """The raw counts as JSON-ready lists (the lossless record of a run)."""
        return {
            "correct": self.correct.tolist(),
            "counts": self.counts.tolist(),
            "initial_correct": None
            if self.initial_correct is None
            else self.initial_correct.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyMatrix:
        """Inverse of :meth:`to_dict`."""
        return cls(
            correct=np.asarray(data["correct"], dtype=np.int64),
            counts=np.asarray(data["counts"], dtype=np.int64),
            initial_correct=None
            if data.get("initial_correct") is None
            else np.asarray(data["initial_correct"], dtype=np.int64),
        )


def _check_within(name: str, correct: np.ndarray, counts: np.ndarray) -> None:
    if (correct < 0).any() or (correct > counts).any():
        raise ValueError(f"{name} must lie in [0, counts[j]] for every test set j")


# ------------------------------------------------------------------------------- accuracy


def final_accuracy(m: AccuracyMatrix) -> float:
    """Accuracy on the union of all T test sets after the last experience.

    ``sum_j correct[T-1, j] / sum_j counts[j]`` -- sample-weighted, so it matches the
    stream accuracy Avalanche reports, not the plain mean of ``R[T-1, :]``.
    """
    return float(m.correct[-1].sum() / m.counts.sum())


def seen_accuracy(m: AccuracyMatrix, i: int) -> float:
    """Accuracy on the union of the test sets seen so far, after experience ``i``.

    ``sum_{j<=i} correct[i, j] / sum_{j<=i} counts[j]`` (0-based ``i`` in ``[0, T)``).
    """
    t = m.n_experiences
    if not 0 <= i < t:
        raise IndexError(f"experience index {i} out of range [0, {t})")
    return float(m.correct[i, : i + 1].sum() / m.counts[: i + 1].sum())


def average_incremental_accuracy(m: AccuracyMatrix) -> float:
    """Mean over experiences of the seen accuracy (Rebuffi et al. 2017, iCaRL).

    ``(1/T) * sum_{i<T} seen_accuracy(m, i)``.
    """
    return float(np.mean([seen_accuracy(m, i) for i in range(m.n_experiences)]))


# ------------------------------------------------------------------- forgetting, transfer


def per_experience_forgetting(m: AccuracyMatrix) -> np.ndarray:
    """Forgetting of each old experience j < T-1 (Chaudhry et al. 2018), shape ``(T-1,)``.

    ``f[j] = max_{j <= l <= T-2} R[l, j] - R[T-1, j]``: the drop from the best accuracy
    ever reached on j before the last experience, not merely from ``R[j, j]``, so a task
    that improved and then fell back counts in full. Negative when the last experience
    lifted j above every earlier value. Empty when T == 1.
    """
    r = m.accuracy()
    t = m.n_experiences
    return np.array([r[j : t - 1, j].max() - r[t - 1, j] for j in range(t - 1)], dtype=float)


def forgetting(m: AccuracyMatrix) -> float:
    """Average forgetting: ``(1/(T-1)) * sum_{j<T-1} f[j]``; 0.0 when T == 1 (nothing old)."""
    per_experience = per_experience_forgetting(m)
    return float(per_experience.mean()) if per_experience.size else 0.0


def backward_transfer(m: AccuracyMatrix) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): ``(1/(T-1)) * sum_{j<T-1} (R[T-1, j] - R[j, j])``.

    How much learning later experiences changed the accuracy on earlier ones; negative
    values are forgetting. 0.0 when T == 1.
    """
    r = m.accuracy()
    t = m.n_experiences
    if t == 1:
        return 0.0
    return float(np.mean(r[t - 1, : t - 1] - np.diag(r)[: t - 1]))


def forward_transfer(m: AccuracyMatrix) -> float | None:
    """FWT (Lopez-Paz & Ranzato 2017): ``(1/(T-1)) * sum_{j>=1} (R[j-1, j] - b[j])``.

    Accuracy on experience j just before training on it, relative to the untrained model.
    ``None`` without an initial evaluation; 0.0 when T == 1.
    """
    b = m.initial_accuracy()
    if b is None:
        return None
    t = m.n_experiences
    if t == 1:
        return 0.0
    r = m.accuracy()
    before = np.array([r[j - 1, j] for j in range(1, t)])
    return float(np.mean(before - b[1:]))


# ---------------------------------------------------------------------------------- report


def summarize(m: AccuracyMatrix) -> dict[str, Any]:
    """Every score of ``m`` as plain Python floats, lists and ``None`` (JSON-ready).

    Keys: ``accuracy_matrix`` (T lists of T floats), ``final_accuracy``,
    ``average_incremental_accuracy``, ``forgetting``, ``backward_transfer``,
    ``forward_transfer`` (``None`` without an initial evaluation), and the curves behind
    them: ``seen_accuracy`` (T floats), ``per_experience_forgetting`` (T-1 floats),
    ``initial_accuracy`` (T floats or ``None``).
    """
    initial = m.initial_accuracy()
    return {
        "accuracy_matrix": [[float(v) for v in row] for row in m.accuracy()],
        "final_accuracy": final_accuracy(m),
        "average_incremental_accuracy": average_incremental_accuracy(m),
        "forgetting": forgetting(m),
        "backward_transfer": backward_transfer(m),
        "forward_transfer": forward_transfer(m),
        "seen_accuracy": [seen_accuracy(m, i) for i in range(m.n_experiences)],
        "per_experience_forgetting": [float(v) for v in per_experience_forgetting(m)],
        "initial_accuracy": None if initial is None else [float(v) for v in initial],
    }


def from_predictions(
    preds: Sequence[Sequence[np.ndarray]],
    targets: Sequence[np.ndarray],
    initial_preds: Sequence[np.ndarray] | None = None,
) -> AccuracyMatrix:
    """Count correct predictions into an :class:`AccuracyMatrix`.

    :param preds: ``preds[i][j]`` = predicted labels on experience j's test set after
        training experience i (T rows of T arrays).
    :param targets: ``targets[j]`` = true labels of experience j's test set.
    :param initial_preds: predictions of the untrained model on each test set, if run.
    """
    t = len(targets)
    if len(preds) != t or any(len(row) != t for row in preds):
        raise ValueError(f"preds must be {t} rows of {t} arrays, one per (after, on) pair")
    labels = [np.asarray(y).reshape(-1) for y in targets]

    def n_correct(p: np.ndarray, j: int) -> int:
        p = np.asarray(p).reshape(-1)
        if p.shape != labels[j].shape:
            raise ValueError(
                f"predictions on experience {j} have {p.size} labels; its test set has "
                f"{labels[j].size}"
            )
        return int(np.count_nonzero(p == labels[j]))

    correct = np.array([[n_correct(preds[i][j], j) for j in range(t)] for i in range(t)])
    initial = None
    if initial_preds is not None:
        if len(initial_preds) != t:
            raise ValueError(f"initial_preds must hold {t} arrays; got {len(initial_preds)}")
        initial = np.array([n_correct(initial_preds[j], j) for j in range(t)])
    counts = np.array([y.size for y in labels])
    return AccuracyMatrix(
        correct=correct.reshape(t, t).astype(np.int64),
        counts=counts.astype(np.int64),
        initial_correct=None if initial is None else initial.astype(np.int64),
    )
