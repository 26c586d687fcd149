"""The batched buffer updates against a plain, one-sample-at-a-time statement of the same
rules: bit-identical stored samples, labels, counts and generator state afterwards.

``ReferenceBuffer`` below states the rules as they were written before they were batched:
class-balanced through the buffer's one-sample-at-a-time method (kept as its fallback: one
``torch.rand`` / ``torch.randint`` per decision, the victim's slots found with ``nonzero``,
every sample written as it is placed), reservoir as a loop of single placements. It is the
specification; the batched updates must reproduce it exactly, since a replay run's
results depend on every draw.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clsim_plugins import buffers
from clsim_plugins.buffers import ExemplarBuffer


class ReferenceBuffer(ExemplarBuffer):
    """The update rules, plainly: what ``ExemplarBuffer`` computed before it was batched."""

    def add_class_balanced(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._add_class_balanced_per_sample(x, y)

    def add_reservoir(self, x: torch.Tensor, y: torch.Tensor) -> None:
        b = int(y.shape[0])
        positions = torch.arange(self.n_seen, self.n_seen + b)
        draws = (torch.rand(b, generator=self.generator, dtype=torch.float64)
                 * (positions + 1).double()).long()
        slots = torch.where(positions < self.capacity, positions, draws)
        self.n_seen += b
        np.add.at(self.class_seen, y.numpy(), 1)
        for i in (slots < self.capacity).nonzero().squeeze(1).tolist():
            self._put(int(slots[i]), x[i], int(y[i]))

    def sample(self, n: int) -> None:
        torch.randperm(self.size, generator=self.generator)  # the draw replay makes


def assert_same(fast: ExemplarBuffer, ref: ReferenceBuffer, where: str) -> None:
    assert torch.equal(fast.x, ref.x), where  # every slot, the unused ones included
    assert torch.equal(fast.y, ref.y), where
    assert fast.x.dtype == ref.x.dtype and fast.y.dtype == ref.y.dtype, where
    assert (fast.size, fast.n_seen) == (ref.size, ref.n_seen), where
    assert np.array_equal(fast.class_counts, ref.class_counts), where
    assert np.array_equal(fast.class_seen, ref.class_seen), where
    assert fast.class_counts.dtype == np.int64 and fast.class_seen.dtype == np.int64, where
    assert torch.equal(fast.generator.get_state(), ref.generator.get_state()), where


def labels_for(rng: np.random.Generator, n: int, n_classes: int, mix: str) -> np.ndarray:
    """Labels of ``n`` offered samples: classes in blocks that arrive one after another
    (old classes shrink as new ones come), interleaved, skewed, or a single class."""
    if mix == "blocks":
        return np.sort(rng.integers(0, n_classes, n))
    if mix == "skewed":
        return rng.choice(n_classes, n, p=rng.dirichlet(np.full(n_classes, 0.3)))
    if mix == "single":
        return np.full(n, rng.integers(0, n_classes))
    return rng.integers(0, n_classes, n)


SHAPES = [((2,), torch.uint8), ((1, 3, 3), torch.uint8), ((3,), torch.int64),
          ((2,), torch.float32)]


def run_pair(seed: int, rule: str, *, capacity: int, n_classes: int, mix: str,
             n: int, max_batch: int) -> None:
    """Offer the same batches to both buffers (with replay's draws in between) and
    compare after every batch."""
    rng = np.random.default_rng(seed)
    shape, dtype = SHAPES[seed % len(SHAPES)]
    labels = torch.from_numpy(labels_for(rng, n, n_classes, mix)).long()
    x = torch.from_numpy(rng.integers(0, 200, (n, *shape))).to(dtype)
    fast = ExemplarBuffer(capacity, shape, dtype, n_classes, torch.Generator().manual_seed(seed))
    ref = ReferenceBuffer(capacity, shape, dtype, n_classes, torch.Generator().manual_seed(seed))
    start = 0
    while start < n:
        end = min(n, start + int(rng.integers(1, max_batch + 1)))
        if rng.random() < 0.5:
            fast.sample(5)
            ref.sample(5)
        getattr(fast, f"add_{rule}")(x[start:end], labels[start:end])
        getattr(ref, f"add_{rule}")(x[start:end], labels[start:end])
        assert_same(fast, ref, f"seed {seed}, {rule}, {mix}, samples {start}-{end}")
        start = end


def test_word_level_draws_match_this_torch() -> None:
    """The batched path replays torch's generator word by word; on this torch it does
    (otherwise the buffer falls back to one torch draw per decision, and the equivalence
    tests below would not exercise the batched path)."""
    assert buffers._words_match_torch()


@pytest.mark.parametrize("rule", ["class_balanced", "reservoir"])
def test_random_sequences_match_the_reference(rule: str) -> None:
    """120 seeded sequences: capacities 1-64, 1-12 classes, batches of 1 to twice the
    capacity, classes in blocks, interleaved, skewed or single."""
    for seed in range(120):
        rng = np.random.default_rng(10_000 + seed)
        capacity = int(rng.choice([1, 2, 3, 5, 8, 13, 30, 64]))
        run_pair(seed, rule, capacity=capacity, n_classes=int(rng.integers(1, 13)),
                 mix=["blocks", "interleaved", "skewed", "single"][seed % 4],
                 n=int(rng.integers(1, 6 * capacity + 20)),
                 max_batch=2 * capacity + 3)


@pytest.mark.parametrize(
    ("capacity", "n_classes", "mix", "n", "max_batch"),
    [
        (3, 10, "blocks", 200, 7),        # fewer slots than classes: counts of 0 and 1
        (1, 4, "interleaved", 60, 3),     # one slot
        (20, 1, "single", 300, 50),       # one class: only self-replacement
        (10, 5, "interleaved", 100, 100), # batches far larger than the buffer
        (40, 8, "blocks", 900, 129),      # new classes arrive and the old ones shrink
        (0, 3, "interleaved", 20, 5),     # the empty buffer replay sizes its budget with
    ],
)
@pytest.mark.parametrize("rule", ["class_balanced", "reservoir"])
def test_edge_cases_match_the_reference(rule: str, capacity: int, n_classes: int, mix: str,
                                        n: int, max_batch: int) -> None:
    for seed in range(3):
        run_pair(seed, rule, capacity=capacity, n_classes=n_classes, mix=mix, n=n,
                 max_batch=max_batch)


def test_split_mnist_sized_run_matches_the_reference() -> None:
    """The benchmark's shape: 500 slots, 10 classes arriving two at a time, batches of
    128 (the stream part of a replay batch), 3,000 samples per pair of classes."""
    rng = np.random.default_rng(1)
    labels = torch.cat([torch.from_numpy(rng.permutation(np.repeat([2 * e, 2 * e + 1], 1500)))
                        for e in range(5)]).long()
    x = torch.from_numpy(rng.integers(0, 256, (len(labels), 1, 4, 4))).to(torch.uint8)
    fast = ExemplarBuffer(500, (1, 4, 4), torch.uint8, 10, torch.Generator().manual_seed(7))
    ref = ReferenceBuffer(500, (1, 4, 4), torch.uint8, 10, torch.Generator().manual_seed(7))
    for start in range(0, len(labels), 128):
        for buffer in (fast, ref):
            buffer.sample(128)
            buffer.add_class_balanced(x[start : start + 128], labels[start : start + 128])
    assert_same(fast, ref, "split MNIST sized")
    assert fast.class_counts.tolist() == [50] * 10
