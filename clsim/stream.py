"""Experience, Stream and Batch: the data a strategy sees, held as tensors.

A stream is a plain sequence (``len``, indexing, slicing, a fresh iterator every time),
so it can be inspected, sliced for a quick run, and replayed identically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

import torch


@dataclass(frozen=True, eq=False)
class Batch:
    """A mini-batch of raw samples (storage dtype) with labels and optional task ids.

    ``n_stream`` counts the leading rows that came from the stream; rows after them were
    added by plugins (replay samples), so a buffer update can take the stream's part only.
    """

    x: torch.Tensor
    y: torch.Tensor
    task_id: torch.Tensor | None = None
    n_stream: int = -1

    def __post_init__(self) -> None:
        if self.n_stream < 0:
            object.__setattr__(self, "n_stream", int(self.x.shape[0]))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def stream_part(self) -> Batch:
        """The rows that came from the stream, without anything plugins appended."""
        if self.n_stream == len(self):
            return self
        t = None if self.task_id is None else self.task_id[: self.n_stream]
        return Batch(self.x[: self.n_stream], self.y[: self.n_stream], t, self.n_stream)

    def extend(
        self, x: torch.Tensor, y: torch.Tensor, task_id: torch.Tensor | None = None
    ) -> Batch:
        """Append rows after this batch's own; the stream part stays first."""
        x = x.to(self.x.device)
        y = y.to(self.y.device, self.y.dtype)
        t = None
        if self.task_id is not None:
            extra = task_id if task_id is not None else torch.full_like(y, -1)
            t = torch.cat([self.task_id, extra.to(self.task_id)])
        return replace(self, x=torch.cat([self.x, x]), y=torch.cat([self.y, y]), task_id=t)


@dataclass(frozen=True, eq=False)
class Experience:
    """One step of a stream: its training data, its test data and what it introduces.

    ``task_id`` is None when task identities are hidden from the strategy.
    """

    index: int
    classes: tuple[int, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    task_id: int | None = None

    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_y.shape[0])


@dataclass(frozen=True, eq=False)
class Stream(Sequence[Experience]):
    """An ordered, immutable sequence of experiences plus how it was built."""

    experiences: tuple[Experience, ...]
    n_classes: int
    class_order: tuple[int, ...]
    task_labels: bool = False
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.experiences)

    @overload
    def __getitem__(self, index: int) -> Experience: ...
    @overload
    def __getitem__(self, index: slice) -> Stream: ...

    def __getitem__(self, index: int | slice) -> Experience | Stream:
        if isinstance(index, slice):
            return replace(self, experiences=self.experiences[index])
        return self.experiences[index]

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)
