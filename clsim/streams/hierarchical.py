"""Hierarchical label expansion (HLE): labels arrive coarse first, then finer.

Each level of a label hierarchy is cut into tasks of disjoint classes, and the levels
follow one another coarse to fine: with CIFAR-100, one task of 20 superclasses, then
five tasks of 20 classes. Three modes (METHODS.md section 5):

* ``single_label``: each image carries a label at one level only (disjoint images);
* ``dual_label``: every level sees all images, so the same images return with finer labels;
* ``multi_depth``: like single_label over more than two levels (all of them by default).

Labels are flat ids of the hierarchy's :class:`~clsim.labels.LabelSpace` (one id range
per level), so a batch label stays a single integer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.errors import OptionError
from clsim.hierarchy import Hierarchy, resolve_hierarchy
from clsim.stream import Experience, Stream
from clsim.streams.common import TimingOptions

_SEED_CONSTANT = 0x41E_4B1E  # this builder's own stream of randomness
_FINE_TASKS = 5  # CIFAR-100 protocol: five tasks at the finest level


@dataclass
class HierarchicalOptions(TimingOptions):
    online: bool = field(
        default=True,
        metadata={"help": "each training sample once, in stream order (HLE is online)"},
    )
    mode: Literal["single_label", "dual_label", "multi_depth"] = field(
        default="single_label",
        metadata={
            "help": "single_label: each image labelled at one level; dual_label: the "
            "same images at every level; multi_depth: single_label over all levels"
        },
    )
    levels: list[str] | None = field(
        default=None,
        metadata={
            "min_items": 2,
            "help": "hierarchy levels to use, coarse to fine, ending "
            "with the dataset's classes; default: all (multi_depth) or coarsest+finest",
        },
    )
    tasks_per_level: list[int] | None = field(
        default=None,
        metadata={
            "min": 1,
            "help": "tasks at each selected level; default 1 per level, "
            f"the finest {_FINE_TASKS} (single/dual_label)",
        },
    )
    hierarchy: str | dict | None = field(
        default=None,
        metadata={
            "help": "a mapping {levels, tree} or a YAML file holding one; default: "
            "the dataset's shipped hierarchy"
        },
    )

    def check(self) -> None:
        super().check()
        if self.levels is not None:
            if len(self.levels) < 2:
                raise OptionError(
                    "levels", f"a hierarchical stream needs at least 2 levels; got {self.levels}"
                )
            repeated = sorted({v for v in self.levels if self.levels.count(v) > 1})
            if repeated:
                raise OptionError("levels", f"levels repeat {repeated}; got {self.levels}")
        if self.tasks_per_level is not None:
            _check_tasks(self.tasks_per_level, self._n_levels())

    def _n_levels(self) -> int | None:
        """Number of levels the stream will have, when known before the hierarchy is read."""
        if self.levels is not None:
            return len(self.levels)
        return None if self.mode == "multi_depth" else 2


def _check_tasks(tasks: Sequence[int], n_levels: int | None) -> None:
    bad = [t for t in tasks if isinstance(t, bool) or not isinstance(t, int) or t < 1]
    if bad:
        raise OptionError(
            "tasks_per_level", f"every entry must be an integer >= 1; got {list(tasks)}"
        )
    if n_levels is not None and len(tasks) != n_levels:
        raise OptionError(
            "tasks_per_level",
            f"expected one entry per level ({n_levels}); got {len(tasks)}: {list(tasks)}",
        )


def _split_by_class(y: np.ndarray, n_parts: int, rng: np.random.Generator) -> np.ndarray:
    """Part (0..n_parts-1) of every sample: each class's samples, in a random order, cut
    into near-equal consecutive runs, so the parts are disjoint and cover every class."""
    order = np.lexsort((rng.random(len(y)), y))  # grouped by class, random within
    counts = np.bincount(y, minlength=int(y.max(initial=-1)) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_y = y[order]
    rank = np.arange(len(y)) - starts[sorted_y]
    part = np.empty(len(y), dtype=np.int64)
    part[order] = rank * n_parts // counts[sorted_y]
    return part


def hierarchical(
    dataset: Dataset,
    *,
    seed: int,
    mode: str = "single_label",
    levels: Sequence[str] | None = None,
    tasks_per_level: Sequence[int] | None = None,
    hierarchy: str | dict | None = None,
) -> Stream:
    """Experiences of one level each, coarse to fine, labelled with flat ids.

    Randomness comes from three independent child seeds (image split, class grouping,
    sample order), so for one seed the class groups are the same in every mode.
    """
    if mode not in ("single_label", "dual_label", "multi_depth"):
        raise OptionError(
            "mode", f"expected 'single_label', 'dual_label' or 'multi_depth'; got {mode!r}"
        )
    full = resolve_hierarchy(hierarchy, dataset)
    if levels is None:
        names = full.level_names
        levels = list(names) if mode == "multi_depth" else [names[0], names[-1]]
    if isinstance(levels, str) or len(levels) < 2:
        raise OptionError(
            "levels",
            f"a hierarchical stream needs at least 2 levels; got "
            f"{levels!r} (the hierarchy has {list(full.level_names)})",
        )
    tree: Hierarchy = full.select(levels)
    labels = tree.label_space(masked=True)
    n_levels, sizes = tree.n_levels, tree.sizes
    if tasks_per_level is None:
        tasks = [1] * n_levels
        if mode != "multi_depth":
            tasks[-1] = min(_FINE_TASKS, sizes[-1])
    else:
        _check_tasks(tasks_per_level, n_levels)
        tasks = [int(t) for t in tasks_per_level]
    for level, (n_tasks, size) in enumerate(zip(tasks, sizes, strict=True)):
        if n_tasks > size:
            raise OptionError(
                "tasks_per_level",
                f"level {tree.level_names[level]!r} has "
                f"{size} classes, too few for {n_tasks} tasks",
            )

    split_rng, class_rng, order_rng = (
        np.random.default_rng(child)
        for child in np.random.SeedSequence([seed, _SEED_CONSTANT]).spawn(3)
    )
    y_train = dataset.y_train.cpu().numpy().astype(np.int64)
    y_test = dataset.y_test.cpu().numpy().astype(np.int64)
    single = mode != "dual_label"
    part = _split_by_class(y_train, n_levels, split_rng) if single else None

    experiences: list[Experience] = []
    class_order: list[int] = []
    tasks_desc: list[dict] = []
    for level in range(n_levels):
        anc_train = tree.ancestor(level, y_train)
        anc_test = tree.ancestor(level, y_test)
        groups = np.array_split(class_rng.permutation(sizes[level]), tasks[level])
        name = tree.level_names[level]
        for group in groups:
            train_mask = np.isin(anc_train, group)
            if single:
                train_mask &= part == level
            train_idx = np.flatnonzero(train_mask)
            train_idx = train_idx[order_rng.permutation(len(train_idx))]
            test_idx = np.flatnonzero(np.isin(anc_test, group))
            group_names = [tree.class_names[level][g] for g in group[:5]]
            if not len(train_idx):
                raise OptionError(
                    "levels",
                    f"the {name!r} task with classes {group_names} "
                    f"gets no training samples: in {mode} each class's samples "
                    f"are split across {n_levels} levels; use fewer levels or "
                    "dual_label",
                )
            if not len(test_idx):
                raise OptionError(
                    "tasks_per_level",
                    f"the {name!r} task with classes "
                    f"{group_names} has no test samples in dataset "
                    f"{dataset.name!r}; use fewer tasks at that level",
                )
            flat = [int(labels.flat_id(level, int(g))) for g in group]
            train_t = torch.from_numpy(train_idx)
            test_t = torch.from_numpy(test_idx)
            experiences.append(
                Experience(
                    index=len(experiences),
                    classes=tuple(flat),
                    train_x=dataset.x_train[train_t],
                    train_y=torch.from_numpy(labels.flat_id(level, anc_train[train_idx])),
                    test_x=dataset.x_test[test_t],
                    test_y=torch.from_numpy(labels.flat_id(level, anc_test[test_idx])),
                    level=level,
                )
            )
            class_order.extend(flat)
            tasks_desc.append({"level": name, "n_classes": len(flat), "n_train": len(train_idx)})

    description = {
        "type": "hierarchical",
        "mode": mode,
        "levels": list(tree.level_names),
        "tasks_per_level": tasks,
        "level_sizes": list(sizes),
        "tasks": tasks_desc,
    }
    return Stream(
        experiences=tuple(experiences),
        n_classes=labels.n_classes,
        class_order=tuple(class_order),
        description=description,
        labels=labels,
        family="hierarchical",
        ordered=True,
    )
