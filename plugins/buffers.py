"""Exemplar storage and the rules that decide what it keeps.

Samples are stored at their raw dtype (uint8 images cost one byte per value) in tensors
allocated once at full capacity, so the ledger sees the real, constant cost of a buffer.
Labels use the narrowest integer type that holds every class id.
"""

from __future__ import annotations

import bisect
import functools
from typing import Any

import numpy as np
import torch

from clsim.errors import ConfigError

# -- torch's generator, word by word ---------------------------------------------------
#
# The class-balanced rule makes one draw per decision, and which draw comes next depends
# on the previous one. Asking torch for each costs more than the rest of the update, so
# the batched path reads the generator's next 32-bit words ahead, computes the draws from
# them exactly as torch's CPU generator does, and then advances the generator by the
# words used: the same values in the same order, and the same generator state after.
#   torch.rand((), dtype=float64)  two words w1, w2: ((w1 << 32 | w2) & (2**53 - 1)) / 2**53
#   torch.randint(n, ())           one word w: w % n, for n < 2**28 (above, two words)
# Whether this torch does so is checked once (``_words_match_torch``); where it does not,
# or the generator is not a CPU one, the update makes torch's draws one at a time.

_MASK53 = (1 << 53) - 1
_TWO_TO_MINUS_53 = 2.0**-53
_ONE_WORD_RANGE = 1 << 28  # torch.randint(n) uses one word below this n
# w % 2**16 and w % (2**16 + 1), each one word per draw, give w back (the moduli are coprime)
_LOW, _PRIME = 1 << 16, (1 << 16) + 1


def _next_words(generator: torch.Generator, n: int) -> np.ndarray:
    """The next ``n`` 32-bit words of a CPU generator (as uint64), without advancing it."""
    state = generator.get_state()
    probe = torch.Generator()
    probe.set_state(state)
    low = torch.randint(_LOW, (n,), generator=probe).numpy()
    probe.set_state(state)
    rest = torch.randint(_PRIME, (n,), generator=probe).numpy()
    # w = low + 2**16 * high and 2**16 = -1 (mod 2**16 + 1), so w = low - high (mod 2**16 + 1)
    high = (low - rest) % _PRIME
    return (low + (high << 16)).astype(np.uint64)


def _skip_words(generator: torch.Generator, n: int) -> None:
    """Advance a CPU generator by ``n`` words (one per small randint)."""
    if n:
        torch.randint(2, (n,), generator=generator)


def _uniforms(words: np.ndarray) -> list[float]:
    """Item j: torch.rand((), dtype=torch.float64) made from words j and j + 1."""
    bits = ((words[:-1] << np.uint64(32)) | words[1:]) & np.uint64(_MASK53)
    return (bits.astype(np.float64) * _TWO_TO_MINUS_53).tolist()  # exact: bits < 2**53


@functools.cache
def _words_match_torch() -> bool:
    """Whether draws computed from the words equal torch's own draws, here."""
    generator = torch.Generator().manual_seed(20_240_611)
    words = _next_words(generator, 3 * 7)
    uniforms, words = _uniforms(words), words.tolist()
    used, same = 0, True
    for n in (1, 2, 3, 500, _PRIME, 2**27 + 5, _ONE_WORD_RANGE - 1):
        same &= float(torch.rand((), generator=generator, dtype=torch.float64)) == uniforms[used]
        same &= int(torch.randint(n, (), generator=generator)) == words[used + 2] % n
        used += 3
    skipped = torch.Generator().manual_seed(20_240_611)
    _skip_words(skipped, used)
    return bool(same) and torch.equal(skipped.get_state(), generator.get_state())


def label_dtype(n_classes: int) -> torch.dtype:
    """The narrowest integer dtype holding ids 0..n_classes-1."""
    if n_classes <= 256:
        return torch.uint8
    if n_classes <= 32768:
        return torch.int16
    return torch.int32


def stored_sample_bytes(ctx: Any) -> int:
    """Bytes of one stored sample and its label: the item a budget-sized store counts."""
    return ctx.sample_bytes + torch.empty((), dtype=label_dtype(ctx.n_classes)).element_size()


def require_capacity_or_budget(plugin: str, capacity: int | None, ctx: Any,
                               example: str = "model + 500 exemplars") -> None:
    """A store needs a fixed ``capacity`` or a budget to be sized from: refuse neither."""
    if capacity is None and ctx.budget_bytes is None:
        raise ConfigError(f"{plugin} needs 'capacity' or a budget for the strategy "
                          f"(e.g. budget: '{example}')")


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
        # index_select: the same rows as x[index], several times faster on uint8 images
        return self.x.index_select(0, index), self.y.index_select(0, index).long()

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
        kept = (slots < self.capacity).nonzero().squeeze(1)
        # within one batch, a later sample overwrites an earlier one in the same slot
        writes: dict[int, int] = {}  # slot -> sample, written after the bookkeeping
        labels = y.tolist()
        counts, stored, size = self.class_counts.tolist(), self.y.numpy(), self.size
        for slot, i in zip(slots[kept].tolist(), kept.tolist(), strict=True):
            if slot == size:
                size += 1
            else:
                counts[labels[writes[slot]] if slot in writes else int(stored[slot])] -= 1
            writes[slot] = i
            counts[labels[i]] += 1
        self.size = size
        self.class_counts[:] = counts
        self._write(writes, x, labels)

    def add_class_balanced(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fill freely; when full, a sample of a class that is not the largest evicts a
        random sample of the largest class, and a sample of the largest class replaces a
        random sample of its own class with probability stored / offered for that class
        (so each class's share stays a uniform sample of what that class offered).

        Batched: the free slots are filled in one write; past that, the decisions are made
        one sample at a time on plain lists (each class's slots in ascending order, as
        ``nonzero`` lists them), with torch's draws computed from the generator's words,
        and the samples kept are written at the end. Equal to the one-at-a-time update
        (``_add_class_balanced_per_sample``) in every stored value and every draw.
        """
        if not (self.generator.device.type == "cpu" and self.capacity < _ONE_WORD_RANGE
                and y.dim() == 1 and _words_match_torch()):
            self._add_class_balanced_per_sample(x, y)
            return
        labels = y.tolist()
        fill = min(len(labels), max(0, self.capacity - self.size))
        if fill:  # sample i goes to slot size + i
            start = self.size
            self.x[start : start + fill] = x[:fill]
            self.y[start : start + fill] = y[:fill]
            added = np.bincount(y[:fill].numpy(), minlength=len(self.class_counts))
            self.class_counts += added
            self.class_seen += added
            self.size += fill
            self.n_seen += fill
        if fill < len(labels):
            self._replace_class_balanced(x, labels, fill)

    def _replace_class_balanced(self, x: torch.Tensor, labels: list[int], start: int) -> None:
        """The full buffer's decisions for samples ``start:`` (see add_class_balanced)."""
        counts, seen = self.class_counts.tolist(), self.class_seen.tolist()
        members = self._slots_by_class()
        words = _next_words(self.generator, 3 * (len(labels) - start))  # 3 at most each
        uniforms, words = _uniforms(words), words.tolist()
        used = 0
        top = max(counts)
        largest = counts.index(top)  # np.argmax: the first class with the most
        writes: dict[int, int] = {}  # slot -> sample
        for i in range(start, len(labels)):
            label = labels[i]
            seen[label] += 1
            if counts[label] >= top:
                keep_p = counts[label] / seen[label]
                used += 2
                if uniforms[used - 2] >= keep_p:
                    continue
                victim = label
            else:
                victim = largest
            slots = members[victim]
            pick = words[used] % len(slots)
            used += 1
            slot = slots[pick]
            writes[slot] = i
            if victim != label:
                del slots[pick]
                bisect.insort(members[label], slot)
                counts[victim] -= 1
                counts[label] += 1
                top = max(counts)
                largest = counts.index(top)
        _skip_words(self.generator, used)
        self.n_seen += len(labels) - start
        self.class_counts[:] = counts
        self.class_seen[:] = seen
        self._write(writes, x, labels)

    def _slots_by_class(self) -> list[list[int]]:
        """For every class, the slots holding it, ascending."""
        stored = self.y[: self.size].numpy().astype(np.int64)
        order = np.argsort(stored, kind="stable").tolist()
        ends = np.cumsum(np.bincount(stored, minlength=len(self.class_counts))).tolist()
        return [order[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def _write(self, writes: dict[int, int], x: torch.Tensor, labels: list[int]) -> None:
        """Store sample ``i`` of the batch in ``slot`` for every ``slot: i``."""
        if not writes:
            return
        slots = np.fromiter(writes, dtype=np.int64, count=len(writes))
        chosen = np.fromiter(writes.values(), dtype=np.int64, count=len(writes))
        _set_rows(self.x, slots, x, chosen)
        _set_rows(self.y, slots, torch.tensor([labels[i] for i in chosen.tolist()]),
                  np.arange(len(chosen)))

    def _add_class_balanced_per_sample(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The class-balanced rule one sample at a time, with torch's own draws."""
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


def _set_rows(target: torch.Tensor, slots: np.ndarray, source: torch.Tensor,
              rows: np.ndarray) -> None:
    """``target[slots] = source[rows]``, cast to target's dtype as torch casts. Through
    numpy where it can: its row copies beat torch's ``index_put_``, which moves narrow
    dtypes (uint8 images) element by element, by two orders of magnitude."""
    if source.dtype != target.dtype:
        source = source.to(target.dtype)
    try:
        target.numpy()[slots] = source.numpy()[rows]
    except TypeError:  # a dtype numpy lacks (bfloat16)
        target[torch.from_numpy(slots)] = source[torch.from_numpy(rows)]


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
