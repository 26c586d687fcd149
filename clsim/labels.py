"""The label space of a stream: one flat range of class ids, cut into levels.

A class-incremental stream has one level whose ids are the dataset's classes. A
hierarchical stream has several, coarse to fine, laid out one after another: with
CIFAR-100's 20 superclasses and 100 classes, ids 0-19 are superclasses and 20-119
classes. Models keep one output per id (one head per level, side by side), so a batch
label is always a single integer and every plugin keeps working on plain ``y``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class LabelSpace:
    """Levels of class ids and the tree between them.

    :param level_names: coarse to fine, e.g. ``("superclass", "class")``; ``("class",)``
        for a flat stream.
    :param class_names: for each level, the names of its classes (index = id within level).
    :param parents: for each level, the index (within the level above) of each class's
        parent; ``parents[0]`` is empty.
    :param masked: outputs count only once their class has appeared in training (heads
        that grow with the stream, as online protocols require).
    """

    level_names: tuple[str, ...]
    class_names: tuple[tuple[str, ...], ...]
    parents: tuple[tuple[int, ...], ...]
    masked: bool = False

    def __post_init__(self) -> None:
        if not self.level_names or len(self.class_names) != len(self.level_names):
            raise ValueError("a label space needs one list of class names per level")
        if len(self.parents) != len(self.level_names) or self.parents[0]:
            raise ValueError("parents: one tuple per level, the first empty")
        for level in range(1, self.n_levels):
            parents, above = self.parents[level], self.sizes[level - 1]
            if len(parents) != self.sizes[level] or any(not 0 <= p < above for p in parents):
                raise ValueError(f"level {self.level_names[level]!r}: bad parent indices")
        # read on every evaluation batch: computed once, read-only
        for name, table in (("_level_of", np.repeat(np.arange(self.n_levels), self.sizes)),
                            ("_ancestors", self._ancestor_table())):
            table.setflags(write=False)
            object.__setattr__(self, name, table)

    @classmethod
    def flat(cls, class_names: Sequence[str], *, masked: bool = False) -> LabelSpace:
        """One level holding the dataset's classes."""
        return cls(("class",), (tuple(class_names),), ((),), masked)

    @property
    def n_levels(self) -> int:
        return len(self.level_names)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(names) for names in self.class_names)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First flat id of each level."""
        return tuple(int(v) for v in np.concatenate([[0], np.cumsum(self.sizes)[:-1]]))

    @property
    def n_classes(self) -> int:
        """Size of the flat id range: the model's number of outputs."""
        return sum(self.sizes)

    @property
    def names(self) -> tuple[str, ...]:
        """Name of every flat id; in a multi-level space prefixed by its level."""
        if self.n_levels == 1:
            return self.class_names[0]
        return tuple(f"{level}/{name}" for level, names in zip(self.level_names,
                     self.class_names, strict=True) for name in names)

    def level_slice(self, level: int) -> slice:
        start = self.offsets[level]
        return slice(start, start + self.sizes[level])

    def flat_id(self, level: int, index: np.ndarray | int) -> np.ndarray | int:
        """Flat id of class ``index`` of ``level``."""
        return self.offsets[level] + index

    def level_of(self) -> np.ndarray:
        """``(n_classes,)``: the level of every flat id (read-only)."""
        return self._level_of

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task loss: cross-entropy within each target's own level (one softmax per
        head), averaged over the batch; plain cross-entropy for a flat space."""
        if self.n_levels == 1:
            return F.cross_entropy(logits, targets)
        log_probs = torch.cat(
            [F.log_softmax(logits[:, self.level_slice(level)], dim=1)
             for level in range(self.n_levels)], dim=1)
        return -log_probs.gather(1, targets.unsqueeze(1)).mean()

    def ancestors(self) -> np.ndarray:
        """``(n_classes + 1, n_levels)`` int64 (read-only): the flat id of each id's ancestor
        at every level (itself at its own level), -1 at finer levels. The extra last row is
        all -1, so "no prediction" (-1) indexes a row that matches nothing."""
        return self._ancestors

    def _ancestor_table(self) -> np.ndarray:
        table = np.full((self.n_classes + 1, self.n_levels), -1, dtype=np.int64)
        for level in range(self.n_levels):
            rows = self.flat_id(level, np.arange(self.sizes[level]))
            ids = np.arange(self.sizes[level])
            for up in range(level, -1, -1):  # walk to the root, recording each step
                table[rows, up] = self.flat_id(up, ids)
                if up:
                    ids = np.asarray(self.parents[up], dtype=np.int64)[ids]
        return table


def correct_predictions(
    labels: LabelSpace, predictions: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Which predictions count as correct, as a bool tensor of shape ``(N,)``.

    ``predictions`` is ``(N,)`` (flat ids) or ``(N, n_levels)`` (one flat id per level,
    -1 where a level has nothing to say). With one level a prediction is right when it
    equals the target. With several, a target at level l is right when the prediction
    of level l or of any finer level has the target as its ancestor at level l: a coarse
    sample counts when the coarse head is right or the fine head's class has the right
    parent.
    """
    if labels.n_levels == 1 and predictions.dim() == 1:
        return predictions == targets
    table = torch.tensor(labels.ancestors(), device=targets.device)
    if predictions.dim() == 1:  # one flat id: it speaks for its own level only
        level = torch.tensor(labels.level_of(), device=targets.device)[predictions]
        per_level = torch.full((len(predictions), labels.n_levels), -1,
                               dtype=torch.long, device=targets.device)
        per_level.scatter_(1, level.unsqueeze(1), predictions.unsqueeze(1).long())
        predictions = per_level
    none = labels.n_classes  # the all -1 row
    predictions = torch.where(predictions < 0, torch.full_like(predictions, none), predictions)
    target_level = torch.tensor(labels.level_of(), device=targets.device)[targets]
    # ancestor of each level's prediction at the target's level: (N, n_levels)
    # (a coarser level's prediction has no ancestor at a finer level: -1, never a match)
    ancestor = table[predictions, target_level.unsqueeze(1).expand_as(predictions)]
    return (ancestor == targets.unsqueeze(1)).any(dim=1)
