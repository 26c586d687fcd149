"""Experience, Stream and Batch: the data a strategy sees, held as tensors.

A stream is a plain sequence (``len``, indexing, slicing, a fresh iterator every time),
so it can be inspected, sliced for a quick run, and replayed identically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

import torch

from clsim.labels import LabelSpace


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

    ``task_id`` is None when task identities are hidden from the strategy. ``classes``
    are the flat label ids the experience introduces and tests; ``level`` is the label
    level they belong to (0 unless the stream is hierarchical). Training data may hold
    samples of other experiences' classes (blurry streams), in the order they arrive.
    """

    index: int
    classes: tuple[int, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    task_id: int | None = None
    level: int = 0

    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_y.shape[0])


@dataclass(frozen=True, eq=False)
class Stream(Sequence[Experience]):
    """An ordered, immutable sequence of experiences plus how it was built.

    ``family`` names the protocol (class_incremental, hierarchical, few_shot,
    task_agnostic), which decides the scores reported. ``online``: each training sample
    is seen once, in stream order, with an evaluation every ``eval_every`` samples
    (anytime accuracy). ``boundaries_hidden``: the strategy sees one experience holding
    the whole stream; the experiences here are the true tasks, kept for scoring.
    ``ordered``: the builder's sample order is part of the protocol (the engine keeps
    it instead of shuffling within an experience).
    """

    experiences: tuple[Experience, ...]
    n_classes: int
    class_order: tuple[int, ...]
    task_labels: bool = False
    description: dict = field(default_factory=dict)
    labels: LabelSpace | None = None
    family: str = "class_incremental"
    online: bool = False
    eval_every: int | None = None
    boundaries_hidden: bool = False
    ordered: bool = False

    def __post_init__(self) -> None:
        if self.labels is None:
            names = tuple(str(c) for c in range(self.n_classes))
            object.__setattr__(self, "labels", LabelSpace.flat(names))
        if self.labels.n_classes != self.n_classes:
            raise ValueError(f"n_classes={self.n_classes} but the label space has "
                             f"{self.labels.n_classes} ids")

    def boundaries(self) -> tuple[int, ...]:
        """Stream position (in training samples) where each true experience starts."""
        starts = [0]
        for exp in self.experiences[:-1]:
            starts.append(starts[-1] + exp.n_train)
        return tuple(starts)

    def seen_by_strategy(self) -> tuple[Experience, ...]:
        """The experiences a strategy is shown: the true ones, or with hidden boundaries
        a single one holding every training sample in stream order (no classes, no
        test data, no task id, so nothing about the tasks leaks)."""
        if not self.boundaries_hidden:
            return self.experiences
        first = self.experiences[0]
        merged = Experience(
            index=0,
            classes=(),
            train_x=torch.cat([exp.train_x for exp in self.experiences]),
            train_y=torch.cat([exp.train_y for exp in self.experiences]),
            test_x=first.test_x[:0],
            test_y=first.test_y[:0],
        )
        return (merged,)

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
