"""Statistics of a comparison: means with confidence intervals over seeds, the area under
accuracy-versus-memory (AUC-A, AUC-L) and its mean over the memory range, paired tests
between strategies, and the ranking they allow."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class MeanCI:
    """A mean over seeds and the half-width of its confidence interval (None for n < 2)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean and Student-t confidence interval: mean +- t_{(1+c)/2, n-1} * s / sqrt(n).

    The t distribution, not the normal, because a comparison has few seeds (3 to 10).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to average")
    mean = float(x.mean())
    if x.size < 2:
        return MeanCI(mean, None, int(x.size))
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    t = float(scipy_stats.t.ppf((1 + confidence) / 2, df=x.size - 1))
    return MeanCI(mean, t * sem, int(x.size))


def auc(memory_mb: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under accuracy (a fraction) against memory in MB, by the trapezoid rule.

    As in MEMO (Zhou et al., ICLR 2023): AUC-A integrates average incremental accuracy,
    AUC-L last accuracy. Points are sorted by memory; one point has no area (0.0).
    """
    if len(memory_mb) != len(accuracy):
        raise ValueError(f"{len(memory_mb)} memory points but {len(accuracy)} accuracies")
    order = np.argsort(np.asarray(memory_mb, dtype=np.float64), kind="stable")
    x = np.asarray(memory_mb, dtype=np.float64)[order]
    y = np.asarray(accuracy, dtype=np.float64)[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def mean_over_memory(memory_mb: Sequence[float], accuracy: Sequence[float]) -> float | None:
    """:func:`auc` divided by the width of the memory range: the mean accuracy over it,
    in the accuracy's own unit, so it reads like the accuracies at each budget. None with
    fewer than two points or a range of zero width (no area to average)."""
    if len(memory_mb) < 2 or max(memory_mb) - min(memory_mb) <= 0:
        return None
    return auc(memory_mb, accuracy) / (max(memory_mb) - min(memory_mb))


@dataclass(frozen=True)
class PairedTest:
    """Strategy a minus strategy b over the same seeds (paired t-test, Holm-adjusted)."""

    a: str
    b: str
    mean_difference: float
    n: int
    p_value: float | None
    p_adjusted: float | None = None

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_adjusted is not None and self.p_adjusted < alpha


def paired_tests(scores: dict[str, dict[int, float]]) -> list[PairedTest]:
    """Every pair of strategies, compared on the seeds both have, Holm-corrected together.

    ``scores[strategy][seed]`` is one number per seed (e.g. final accuracy at one budget).
    With fewer than two common seeds, or identical differences, no p-value exists (None).
    """
    names = sorted(scores)
    tests = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            seeds = sorted(set(scores[a]) & set(scores[b]))
            diff = np.array([scores[a][s] - scores[b][s] for s in seeds], dtype=np.float64)
            mean = float(diff.mean()) if diff.size else float("nan")
            p = None
            if diff.size >= 2 and float(diff.std(ddof=1)) > 0:
                p = float(scipy_stats.ttest_1samp(diff, 0.0).pvalue)
            tests.append(PairedTest(a, b, mean, int(diff.size), p))
    return holm(tests)


def holm(tests: list[PairedTest]) -> list[PairedTest]:
    """Holm-Bonferroni step-down adjustment over the tests that have a p-value."""
    ranked = sorted((t.p_value, i) for i, t in enumerate(tests) if t.p_value is not None)
    adjusted: dict[int, float] = {}
    running = 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return [
        PairedTest(t.a, t.b, t.mean_difference, t.n, t.p_value, adjusted.get(i))
        for i, t in enumerate(tests)
    ]


def rank_groups(
    means: dict[str, float], tests: list[PairedTest], alpha: float = 0.05
) -> list[list[str]]:
    """Strategies ordered by mean (best first; equal means by name), split into groups
    only where the split is significant.

    A split falls between two neighbours in that order only when every strategy before
    it beats every strategy after it: for each such pair the Holm-adjusted paired test
    has p < ``alpha`` and its mean difference favours the better-ranked one. A pair
    without a p-value (fewer than two common seeds, identical differences) is not
    significant. So in ``a ≈ b > c`` both a and b beat c significantly, and a and b are
    not told apart; a chain ``a ≈ b ≈ c`` makes no claim, even when a beats c, because
    no split separates them from b. Rendered by :func:`ranking_text`.
    """
    order = sorted(means, key=lambda s: (-means[s], s))
    beats: set[tuple[str, str]] = set()
    for t in tests:
        if t.significant(alpha) and t.mean_difference != 0:
            beats.add((t.a, t.b) if t.mean_difference > 0 else (t.b, t.a))
    groups: list[list[str]] = []
    for k, name in enumerate(order):
        split = k > 0 and all(
            (upper, lower) in beats for upper in order[:k] for lower in order[k:]
        )
        if split or not groups:
            groups.append([])
        groups[-1].append(name)
    return groups


def ranking_text(groups: list[list[str]]) -> str:
    """``a ≈ b > c``: '>' between groups of :func:`rank_groups`, '≈' within one."""
    return " > ".join(" ≈ ".join(group) for group in groups)
