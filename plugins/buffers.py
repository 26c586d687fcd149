"""Exemplar storage and the rules that decide what it keeps.

Samples are stored at their raw dtype (uint8 images cost one byte per value) in tensors
allocated once at full capacity, so the ledger sees the real, constant cost of a buffer.
Labels use the narrowest integer type that holds every class id.
"""

from __future__ import annotations

import numpy as np
import torch


def label_dtype(n_classes: int) -> torch.dtype:
    """The narrowest integer dtype holding ids 0..n_classes-1."""
    if n_classes <= 256:
        return torch.uint8
    if n_classes <= 32768:
        return torch.int16
    return torch.int32


class ExemplarBuffer:
    """A fixed-capacity store of (raw sample, label) pairs.

    ``x[:size]`` and ``y[:size]`` hold the samples; ``class_counts[c]`` how many of
    class c are stored and ``class_seen[c]`` how many of class c were offered.
    """

    def __init__(
        self,
        capacity: int,
        sample_shape: tuple[int, ...],
        sample_dtype: torch.dtype,
        n_classes: int,
        generator: torch.Generator,
    ) -> None:
        self.capacity = capacity
        self.x = torch.zeros((capacity, *sample_shape), dtype=sample_dtype)
        self.y = torch.zeros(capacity, dtype=label_dtype(n_classes))
        self.size = 0
        self.n_seen = 0
        self.class_counts = np.zeros(n_classes, dtype=np.int64)
        self.class_seen = np.zeros(n_classes, dtype=np.int64)
        self.generator = generator

    def __len__(self) -> int:
        return self.size

    # -- drawing --------------------------------------------------------------

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` stored pairs drawn uniformly without replacement (fewer if fewer stored)."""
        n = min(n, self.size)
        index = torch.randperm(self.size, generator=self.generator)[:n]
        return self.x[index], self.y[index].long()

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[: self.size], self.y[: self.size].long()

    # -- selection rules ------------------------------------------------------

    def add_reservoir(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Reservoir sampling: the n-th sample offered (0-based) goes to slot n while
        n < capacity, else to slot j ~ U[0, n] when j < capacity. Every sample offered
        ends up stored with probability capacity / offered."""
        b = int(y.shape[0])
        positions = torch.arange(self.n_seen, self.n_seen + b)
        draws = (
            torch.rand(b, generator=self.generator, dtype=torch.float64) * (positions + 1).double()
        ).long()
        slots = torch.where(positions < self.capacity, positions, draws)
        self.n_seen += b
        np.add.at(self.class_seen, y.numpy(), 1)
        keep = slots < self.capacity
        # within one batch, a later sample overwrites an earlier one in the same slot
        for i in keep.nonzero().squeeze(1).tolist():
            self._put(int(slots[i]), x[i], int(y[i]))

    def add_class_balanced(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fill freely; when full, a sample of a class that is not the largest evicts a
        random sample of the largest class, and a sample of the largest class replaces a
        random sample of its own class with probability stored / offered for that class
        (so each class's share stays a uniform sample of what that class offered)."""
        for i, label in enumerate(y.tolist()):
            self.n_seen += 1
            self.class_seen[label] += 1
            if self.size < self.capacity:
                self._put(self.size, x[i], label)
                continue
            largest = int(np.argmax(self.class_counts))
            if self.class_counts[label] >= self.class_counts[largest]:
                keep_p = self.class_counts[label] / self.class_seen[label]
                if torch.rand((), generator=self.generator, dtype=torch.float64) >= keep_p:
                    continue
                victim_class = label
            else:
                victim_class = largest
            slots = (self.y[: self.size] == victim_class).nonzero().squeeze(1)
            pick = int(torch.randint(len(slots), (), generator=self.generator))
            self._put(int(slots[pick]), x[i], label)

    def replace_all(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Overwrite the contents with ``(x, y)`` (herding rebuilds the buffer each experience)."""
        n = int(y.shape[0])
        if n > self.capacity:
            raise ValueError(f"{n} exemplars do not fit a buffer of {self.capacity}")
        self.x[:n] = x
        self.y[:n] = y.to(self.y.dtype)
        self.size = n
        self.class_counts[:] = np.bincount(y.numpy(), minlength=len(self.class_counts))

    def _put(self, slot: int, x: torch.Tensor, label: int) -> None:
        if slot == self.size:
            self.size += 1
        else:
            self.class_counts[int(self.y[slot])] -= 1
        self.x[slot] = x
        self.y[slot] = label
        self.class_counts[label] += 1


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL herding: indices of ``m`` samples whose running mean best tracks the class mean.

    Features are L2-normalised; step k picks, among samples not yet picked, the one that
    minimises ||mu - (phi_i + sum of picked) / k||. The order is prefix-stable: the
    first m' of an m-selection are the m'-selection.
    """
    phi = torch.nn.functional.normalize(features.double(), dim=1)
    mu = phi.mean(dim=0)
    m = min(m, phi.shape[0])
    picked: list[int] = []
    running = torch.zeros_like(mu)
    taken = torch.zeros(phi.shape[0], dtype=torch.bool, device=phi.device)
    half_norms = (phi * phi).sum(dim=1) / 2
    for k in range(1, m + 1):
        # ||mu - (r + phi_i)/k||^2 = ||mu - r/k||^2 - 2/k <mu - r/k, phi_i> + ||phi_i||^2/k^2,
        # and every ||phi_i|| is 1 (a zero feature stays 0, so its term is kept): the
        # argmin over i is one matrix-vector product instead of an (n, d) difference
        score = phi @ (mu - running / k) - half_norms / k
        score[taken] = float("-inf")
        index = int(torch.argmax(score))
        picked.append(index)
        taken[index] = True
        running += phi[index]
    return torch.tensor(picked, dtype=torch.long)
