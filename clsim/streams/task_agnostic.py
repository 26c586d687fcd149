"""Task-agnostic and generalized streams: blurry class splits, gradual shifts, recurring tasks.

The experiences of these streams are the *true* tasks, kept for scoring; with hidden
boundaries (the default) the strategy sees one online stream. Labels are renumbered in
order of first appearance in the training stream, so the head grows 0, 1, 2, ... as
classes arrive (Si-Blurry's convention) and label ids leak nothing about the future.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any, Literal

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.errors import OptionError
from clsim.labels import LabelSpace
from clsim.stream import Experience, Stream
from clsim.streams.class_incremental import class_groups, resolve_class_order
from clsim.streams.common import StreamType, TimingOptions

# One seed-sequence constant per builder, so their draws never coincide.
_BLURRY_SEED = 0xB1022
_GRADUAL_SEED = 0x6AD0A1
_RECURRING_SEED = 0x2EC022

_ONLINE_HELP = "each training sample once, in stream order (epochs must be 1)"
_BOUNDARIES_HELP = "hidden: the strategy never learns where tasks start (task-agnostic)"
_ORDER_HELP = "explicit class order; default: a permutation drawn from the seed"


def _online_field() -> Any:
    return field(default=True, metadata={"help": _ONLINE_HELP})


def _boundaries_field() -> Any:
    return field(default="hidden", metadata={"help": _BOUNDARIES_HELP})


def _percent_field(default: float, help_text: str) -> Any:
    return field(default=default, metadata={"min": 0, "max": 100, "help": help_text})


# ----------------------------------------------------------------------------- options


@dataclass
class SiBlurryOptions(TimingOptions):
    """Si-Blurry: random task sizes, N% disjoint classes, M% of blurry samples moved."""

    online: bool = _online_field()
    boundaries: Literal["visible", "hidden"] = _boundaries_field()
    n_tasks: int = field(default=5, metadata={"min": 1, "help": "number of true tasks (T)"})
    disjoint_percent: float = _percent_field(
        50, "N: percent of classes whose samples all stay in their own task"
    )
    blurry_percent: float = _percent_field(
        10, "M: percent of each blurry class's samples moved to other tasks"
    )
    random_split: bool = field(
        default=True, metadata={"help": "cut the class lists at random points (sizes differ)"}
    )
    class_order: list[int] | None = field(default=None, metadata={"help": _ORDER_HELP})

    def check(self) -> None:
        super().check()


@dataclass
class IBlurryOptions(SiBlurryOptions):
    """i-Blurry: like Si-Blurry with tasks of (as nearly as possible) equal size."""

    random_split: bool = field(
        default=False, metadata={"help": "cut the class lists at random points (sizes differ)"}
    )


@dataclass
class BlurryOptions(SiBlurryOptions):
    """Blurry-M: every class blurry, M% of its samples moved, equal task sizes."""

    disjoint_percent: float = _percent_field(
        0, "N: percent of classes whose samples all stay in their own task"
    )
    random_split: bool = field(
        default=False, metadata={"help": "cut the class lists at random points (sizes differ)"}
    )


@dataclass
class GradualOptions(TimingOptions):
    """Class groups whose boundaries blend linearly over a window of samples."""

    online: bool = _online_field()
    boundaries: Literal["visible", "hidden"] = _boundaries_field()
    n_tasks: int = field(default=5, metadata={"min": 1, "help": "number of class groups"})
    window: int = field(
        default=200,
        metadata={"min": 0, "help": "samples over which two tasks blend (even; half each side)"},
    )
    class_order: list[int] | None = field(default=None, metadata={"help": _ORDER_HELP})

    def check(self) -> None:
        super().check()
        if self.window % 2:
            raise OptionError(
                "window",
                f"window must be even (half from each side of a boundary); got {self.window}",
            )


@dataclass
class RecurringOptions(TimingOptions):
    """Class groups that come back: the sequence lists the group of each task."""

    online: bool = _online_field()
    boundaries: Literal["visible", "hidden"] = _boundaries_field()
    n_tasks: int = field(default=2, metadata={"min": 1, "help": "number of distinct groups"})
    sequence: list[int] = field(
        default_factory=lambda: [0, 1, 0],
        metadata={
            "min": 0,
            "min_items": 1,
            "help": "group index of each task in stream order, e.g. [0, 1, 0] = A, B, A",
        },
    )
    class_order: list[int] | None = field(default=None, metadata={"help": _ORDER_HELP})

    def check(self) -> None:
        super().check()
        _check_sequence(self.sequence, self.n_tasks)


# ----------------------------------------------------------------------------- helpers


def _rng(seed: int, constant: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, constant]))


def percent_of(percent: float, n: int) -> int:
    """``percent``% of ``n``, rounded half up, in exact arithmetic (10% of 45 -> 5)."""
    exact = Fraction(percent) * n / 100
    return int((exact + Fraction(1, 2)).__floor__())


def _class_order(dataset: Dataset, class_order: Sequence[int] | None, seed: int) -> np.ndarray:
    try:
        order = resolve_class_order(dataset.n_classes, class_order, seed)
    except ValueError as exc:
        raise OptionError("class_order", str(exc)) from None
    return np.asarray(order, dtype=np.int64)


def _check_n_tasks(n_tasks: int, n_classes: int) -> None:
    if not 1 <= n_tasks <= n_classes:
        raise OptionError(
            "n_tasks",
            f"n_tasks must be between 1 and the {n_classes} classes of the dataset; got {n_tasks}",
        )


def _groups(order: np.ndarray, n_tasks: int) -> list[np.ndarray]:
    """Even class groups in ``order``, as class_incremental cuts them."""
    _check_n_tasks(n_tasks, len(order))
    try:
        sizes = class_groups(len(order), n_experiences=n_tasks)
    except ValueError as exc:
        raise OptionError("n_tasks", str(exc)) from None
    return np.split(order, np.cumsum(sizes)[:-1])


def _check_sequence(sequence: Sequence[int], n_tasks: int) -> None:
    seq = [int(g) for g in sequence]
    if not seq:
        raise OptionError("sequence", "sequence must list at least one group index; got []")
    bad = sorted({g for g in seq if not 0 <= g < n_tasks})
    if bad:
        raise OptionError(
            "sequence",
            f"sequence entries are group indices 0..{n_tasks - 1} (n_tasks={n_tasks}); got {bad}",
        )
    missing = sorted(set(range(n_tasks)) - set(seq))
    if missing:
        raise OptionError(
            "sequence",
            f"every one of the {n_tasks} groups must occur in the "
            f"sequence; groups {missing} never do in {seq}",
        )


def _samples_by_class(y: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """Dataset indices of each class's samples, in dataset order."""
    by_class = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=n_classes)
    return np.split(by_class, np.cumsum(counts)[:-1])


def _indices_of(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(y, classes))


def _even_sizes(n: int, parts: int, first_extra: int = 0) -> np.ndarray:
    """``n`` split into ``parts`` sizes differing by at most one; the remainder goes to
    parts ``first_extra``, ``first_extra + 1``, ... (cyclically)."""
    sizes = np.full(parts, n // parts, dtype=np.int64)
    sizes[(first_extra + np.arange(n % parts)) % parts] += 1
    return sizes


def _assemble(
    dataset: Dataset,
    type_name: str,
    parts: list[np.ndarray],
    task_classes: list[np.ndarray],
    description: dict,
    empty_key: str,
) -> Stream:
    """Renumber labels by first appearance and build the experiences.

    ``parts`` holds each experience's training samples (dataset indices, stream order),
    ``task_classes`` its dataset classes (what it introduces and tests). The description
    starts with the type, then ``description``, then what every such stream records.
    """
    n_classes = dataset.n_classes
    y_train = dataset.y_train.numpy()
    y_test = dataset.y_test.numpy()
    stream_idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    seen, first = np.unique(y_train[stream_idx], return_index=True)
    appear = list(seen[np.argsort(first, kind="stable")])
    appeared = set(int(c) for c in appear)
    for classes in task_classes:  # classes never trained on: after the others, task order
        for c in classes:
            if int(c) not in appeared:
                appear.append(int(c))
                appeared.add(int(c))
    appear += [c for c in range(n_classes) if c not in appeared]
    class_of_label = np.asarray(appear, dtype=np.int64)
    label_of_class = np.empty(n_classes, dtype=np.int64)
    label_of_class[class_of_label] = np.arange(n_classes)
    relabel = torch.from_numpy(label_of_class)

    experiences = []
    for index, (train_idx, classes) in enumerate(zip(parts, task_classes, strict=True)):
        test_idx = _indices_of(y_test, classes)
        labels = tuple(sorted(int(v) for v in label_of_class[classes]))
        if len(train_idx) == 0 or len(test_idx) == 0:
            split = "training" if len(train_idx) == 0 else "test"
            raise OptionError(
                empty_key,
                f"task {index} (dataset classes "
                f"{sorted(int(c) for c in classes)}) has no {split} samples in "
                f"dataset {dataset.name!r}; use fewer tasks or another dataset",
            )
        tr = torch.from_numpy(np.ascontiguousarray(train_idx, dtype=np.int64))
        te = torch.from_numpy(np.ascontiguousarray(test_idx, dtype=np.int64))
        experiences.append(
            Experience(
                index=index,
                classes=labels,
                train_x=dataset.x_train[tr],
                train_y=relabel[dataset.y_train[tr]],
                test_x=dataset.x_test[te],
                test_y=relabel[dataset.y_test[te]],
            )
        )
    starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])[:-1]])
    names = [dataset.class_names[c] for c in class_of_label]
    return Stream(
        experiences=tuple(experiences),
        n_classes=n_classes,
        class_order=tuple(int(c) for c in class_of_label),
        task_labels=False,
        description={
            "type": type_name,
            **description,
            "task_sizes": [len(p) for p in parts],
            "boundaries": [int(s) for s in starts],
            "task_classes": [list(e.classes) for e in experiences],
            "dataset_class_of_label": [int(c) for c in class_of_label],
        },
        labels=LabelSpace.flat(names, masked=True),
        family="task_agnostic",
        ordered=True,
    )


# ----------------------------------------------------------------------------- blurry


def _blurry_split(
    n_disjoint: int, n_blurry: int, n_tasks: int, random_split: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """How many disjoint and blurry classes each task gets; every task gets >= 1 class.

    Random: the task sizes are a random composition of all classes into ``n_tasks``
    positive parts (distinct cut points), and which classes of a task are disjoint is
    drawn without replacement, so both lists are cut at random points. Even: each list
    as evenly as possible, the blurry remainder placed after the disjoint one so the
    task totals differ by at most one.
    """
    n_classes = n_disjoint + n_blurry
    if not random_split:
        disjoint = _even_sizes(n_disjoint, n_tasks)
        return disjoint, _even_sizes(n_blurry, n_tasks, first_extra=n_disjoint % n_tasks)
    cuts = np.sort(rng.choice(np.arange(1, n_classes), size=n_tasks - 1, replace=False))
    totals = np.diff(np.concatenate([[0], cuts, [n_classes]]))
    kinds = rng.permutation(np.repeat([1, 0], [n_disjoint, n_blurry]))
    disjoint = np.add.reduceat(kinds, np.concatenate([[0], cuts]))
    return disjoint.astype(np.int64), (totals - disjoint).astype(np.int64)


def blurry(
    dataset: Dataset,
    *,
    seed: int,
    n_tasks: int = 5,
    disjoint_percent: float = 50,
    blurry_percent: float = 10,
    random_split: bool = True,
    class_order: Sequence[int] | None = None,
    type_name: str = "blurry",
) -> Stream:
    """A generalized class-incremental stream (Si-Blurry, i-Blurry, Blurry-M).

    N% of the classes (first in the class order) are disjoint: all their samples arrive
    in their own task. The other classes are blurry: M% of each one's samples (rounded
    half up, per class) move to other tasks drawn uniformly. Samples within a task are
    shuffled; experience t holds the samples delivered in task t. ``type_name`` only
    labels the description (the registered wrappers set it).
    """
    n_classes = dataset.n_classes
    for key, value in (("disjoint_percent", disjoint_percent), ("blurry_percent", blurry_percent)):
        if not 0 <= value <= 100:
            raise OptionError(key, f"{key} is a percentage in 0..100; got {value}")
    _check_n_tasks(n_tasks, n_classes)
    rng = _rng(seed, _BLURRY_SEED)
    order = _class_order(dataset, class_order, seed)
    n_disjoint = percent_of(disjoint_percent, n_classes)
    disjoint_classes, blurry_classes = order[:n_disjoint], order[n_disjoint:]
    d_sizes, b_sizes = _blurry_split(n_disjoint, len(blurry_classes), n_tasks, random_split, rng)
    d_parts = np.split(disjoint_classes, np.cumsum(d_sizes)[:-1])
    b_parts = np.split(blurry_classes, np.cumsum(b_sizes)[:-1])
    task_classes = [np.concatenate([d, b]) for d, b in zip(d_parts, b_parts, strict=True)]
    task_of_class = np.empty(n_classes, dtype=np.int64)
    for t, classes in enumerate(task_classes):
        task_of_class[classes] = t

    y_train = dataset.y_train.numpy()
    samples = _samples_by_class(y_train, n_classes)
    task_of_sample = task_of_class[y_train]
    moved = np.zeros(len(y_train), dtype=bool)
    moved_out = np.zeros(n_tasks, dtype=np.int64)
    for c in blurry_classes:  # class order: a fixed sequence of draws
        n_move = percent_of(blurry_percent, len(samples[c]))
        if n_move == 0:
            continue
        own = int(task_of_class[c])
        if n_tasks == 1:
            raise OptionError(
                "blurry_percent",
                f"blurry_percent={blurry_percent} moves "
                "samples to other tasks, and n_tasks=1 has none; set "
                "blurry_percent: 0 or n_tasks >= 2",
            )
        picked = rng.permutation(samples[c])[:n_move]
        dest = rng.integers(0, n_tasks - 1, size=n_move)
        task_of_sample[picked] = dest + (dest >= own)  # any task but its own
        moved[picked] = True
        moved_out[own] += n_move
    parts = [rng.permutation(np.flatnonzero(task_of_sample == t)) for t in range(n_tasks)]
    moved_in = [int(moved[p].sum()) for p in parts]
    description = {
        "n_tasks": n_tasks,
        "disjoint_percent": disjoint_percent,
        "blurry_percent": blurry_percent,
        "random_split": random_split,
        "task_class_counts": [int(v) for v in d_sizes + b_sizes],
        "task_disjoint_counts": [int(v) for v in d_sizes],
        "task_blurry_counts": [int(v) for v in b_sizes],
        "disjoint_dataset_classes": [int(c) for c in disjoint_classes],
        "moved_in": moved_in,
        "moved_out": [int(v) for v in moved_out],
        "n_moved": int(moved.sum()),
    }
    stream = _assemble(dataset, type_name, parts, task_classes, description, "n_tasks")
    label_of = {c: label for label, c in enumerate(stream.class_order)}
    stream.description["disjoint_classes"] = sorted(label_of[int(c)] for c in disjoint_classes)
    return stream


# The three registered blurry types: one builder with each protocol's defaults (the same
# as their options classes below), recording its own type name.
si_blurry = partial(blurry, type_name="si_blurry", disjoint_percent=50, random_split=True)
i_blurry = partial(blurry, type_name="i_blurry", disjoint_percent=50, random_split=False)
blurry_m = partial(blurry, type_name="blurry", disjoint_percent=0, random_split=False)


# ----------------------------------------------------------------------------- gradual


def blend_mask(half: int, rng: np.random.Generator) -> np.ndarray:
    """Which of ``2 * half`` window positions hold a next-task sample: exactly ``half``.

    Position i is chosen with probability exactly (2i + 1) / (4 * half), rising linearly
    across the window; randomised systematic sampling (units in random order, one
    random start, integer weights) gives these marginals and a fixed count.
    """
    width = 2 * half
    if half == 0:
        return np.zeros(0, dtype=bool)
    weights = 2 * np.arange(width, dtype=np.int64) + 1  # sums to width**2 = half * period
    period = 2 * width
    perm = rng.permutation(width)
    ends = np.cumsum(weights[perm])
    start = int(rng.integers(period))
    below = -((start - ends) // period)  # points start + k * period below each end
    below = np.maximum(below, 0)
    hits = np.diff(np.concatenate([[0], below])) > 0
    mask = np.zeros(width, dtype=bool)
    mask[perm[hits]] = True
    assert int(mask.sum()) == half
    return mask


def gradual(
    dataset: Dataset,
    *,
    seed: int,
    n_tasks: int = 5,
    window: int = 200,
    class_order: Sequence[int] | None = None,
) -> Stream:
    """Class groups in sequence whose boundaries blend over ``window`` samples.

    Around each boundary the last window/2 samples of one task and the first window/2
    of the next are interleaved, each side in its own order, the next task's share
    rising linearly. The true boundary is the window's middle, so experience t is the
    stream segment of task t's length, holding a few blended neighbour samples.
    """
    if window < 0 or window % 2:
        raise OptionError(
            "window",
            f"window must be an even number >= 0 (half from each side of a boundary); got {window}",
        )
    rng = _rng(seed, _GRADUAL_SEED)
    order = _class_order(dataset, class_order, seed)
    groups = _groups(order, n_tasks)
    y_train = dataset.y_train.numpy()
    tasks = [rng.permutation(_indices_of(y_train, g)) for g in groups]
    sizes = [len(t) for t in tasks]
    if window > min(sizes):
        raise OptionError(
            "window",
            f"window must be at most the smallest task's "
            f"{min(sizes)} training samples (task sizes {sizes}); got {window}",
        )
    stream = np.concatenate(tasks)
    half = window // 2
    ends = np.cumsum(sizes)[:-1]
    for end in ends:
        mask = blend_mask(half, rng)
        segment = stream[end - half : end + half].copy()
        blended = np.empty_like(segment)
        blended[~mask] = segment[:half]
        blended[mask] = segment[half:]
        stream[end - half : end + half] = blended
    parts = np.split(stream, ends)
    description = {"n_tasks": n_tasks, "window": window, "class_groups": [len(g) for g in groups]}
    return _assemble(dataset, "gradual", parts, groups, description, "n_tasks")


# ----------------------------------------------------------------------------- recurring


def recurring(
    dataset: Dataset,
    *,
    seed: int,
    n_tasks: int = 2,
    sequence: Sequence[int] = (0, 1, 0),
    class_order: Sequence[int] | None = None,
) -> Stream:
    """Class groups that recur: one experience per entry of ``sequence``.

    A group occurring k times has its training samples split evenly (by seed) over its
    k occurrences, so every sample is seen once; each occurrence tests the whole group.
    """
    _check_sequence(sequence, n_tasks)
    seq = [int(g) for g in sequence]
    rng = _rng(seed, _RECURRING_SEED)
    order = _class_order(dataset, class_order, seed)
    groups = _groups(order, n_tasks)
    y_train = dataset.y_train.numpy()
    pieces = []
    for g, classes in enumerate(groups):
        occurrences = seq.count(g)
        idx = rng.permutation(_indices_of(y_train, classes))
        if len(idx) < occurrences:
            raise OptionError(
                "sequence",
                f"group {g} occurs {occurrences} times but has only "
                f"{len(idx)} training samples to share between them",
            )
        pieces.append(list(np.array_split(idx, occurrences)))
    parts = [pieces[g].pop(0) for g in seq]
    task_classes = [groups[g] for g in seq]
    description = {"n_tasks": n_tasks, "sequence": seq, "class_groups": [len(g) for g in groups]}
    return _assemble(dataset, "recurring", parts, task_classes, description, "sequence")


# ----------------------------------------------------------------------------- registry

TASK_AGNOSTIC_TYPES: dict[str, StreamType] = {
    "si_blurry": StreamType(
        si_blurry,
        SiBlurryOptions,
        "Si-Blurry: random task sizes, N% disjoint classes, M% of blurry samples moved; online",
    ),
    "i_blurry": StreamType(
        i_blurry,
        IBlurryOptions,
        "i-Blurry: even tasks, N% disjoint classes, M% of blurry samples moved; online",
    ),
    "blurry": StreamType(
        blurry_m,
        BlurryOptions,
        "Blurry-M: every class blurry, M% of its samples in other tasks; online",
    ),
    "gradual": StreamType(
        gradual, GradualOptions, "class groups blending linearly over a window of samples; online"
    ),
    "recurring": StreamType(
        recurring, RecurringOptions, "class groups that come back (A, B, A); online"
    ),
}
