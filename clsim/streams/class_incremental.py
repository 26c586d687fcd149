"""Class-incremental streams: disjoint groups of classes, one group per experience."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.errors import OptionError
from clsim.labels import LabelSpace
from clsim.stream import Experience, Stream
from clsim.streams.common import TimingOptions


@dataclass
class ClassIncrementalOptions(TimingOptions):
    n_experiences: int | None = field(default=None, metadata={"min": 1})
    increment: int | None = field(
        default=None, metadata={"min": 1, "help": "classes per experience"}
    )
    initial_increment: int | None = field(
        default=None, metadata={"min": 1, "help": "classes in the first experience"}
    )
    class_order: list[int] | None = field(
        default=None,
        metadata={"help": "explicit class order; default: a permutation drawn from the seed"},
    )
    shuffle_classes: bool = field(default=True, metadata={"help": "false: class order 0..C-1"})
    task_labels: bool = field(
        default=False, metadata={"help": "task ids visible to the strategy and at test"}
    )

    def check(self) -> None:
        super().check()
        if self.n_experiences is None and self.increment is None:
            raise ValueError("give 'n_experiences' or 'increment' (or both)")
        if self.task_labels and self.boundaries == "hidden":
            raise OptionError("task_labels", "task ids cannot be visible when boundaries are "
                              "hidden; set task_labels: false")


def class_groups(
    n_classes: int,
    *,
    n_experiences: int | None = None,
    increment: int | None = None,
    initial_increment: int | None = None,
) -> list[int]:
    """Sizes of the class groups, e.g. 10 classes, initial 4, increment 2 -> [4, 2, 2, 2].

    Raises ValueError with a sentence a user can act on when the numbers do not fit (an
    OptionError naming the option at fault where one is).
    """
    first = initial_increment
    if increment is None and n_experiences is None:
        raise ValueError("give either 'n_experiences' or 'increment'")
    if increment is None:
        if n_experiences < 1:
            raise OptionError("n_experiences", f"'n_experiences' must be >= 1; got {n_experiences}")
        rest_classes = n_classes - (first or 0)
        rest_exps = n_experiences - (1 if first else 0)
        if rest_exps == 0:
            if rest_classes != 0:
                raise OptionError(
                    "n_experiences",
                    f"{n_experiences} experience(s) with initial_increment={first} leave "
                    f"{rest_classes} of {n_classes} classes unassigned"
                )
            return [first]
        if rest_classes <= 0 or rest_classes % rest_exps:
            raise OptionError(
                "n_experiences",
                f"{rest_classes} classes do not split evenly into {rest_exps} experiences "
                f"(n_classes={n_classes}, n_experiences={n_experiences}, "
                f"initial_increment={first}); give 'increment' explicitly"
            )
        increment = rest_classes // rest_exps
    if increment < 1:
        raise OptionError("increment", f"'increment' must be >= 1; got {increment}")
    sizes = [first] if first else []
    remaining = n_classes - sum(sizes)
    if remaining < 0:
        raise OptionError(
            "initial_increment", f"initial_increment={first} exceeds the {n_classes} classes"
        )
    if remaining % increment:
        raise OptionError(
            "increment",
            f"the {remaining} classes after the first experience do not divide by "
            f"increment={increment}"
        )
    sizes += [increment] * (remaining // increment)
    if n_experiences is not None and len(sizes) != n_experiences:
        raise OptionError(
            "n_experiences",
            f"increment={increment} gives {len(sizes)} experiences, "
            f"but n_experiences={n_experiences}"
        )
    return sizes


def resolve_class_order(
    n_classes: int, class_order: Sequence[int] | None, seed: int, shuffle: bool = True
) -> tuple[int, ...]:
    """The explicit order if given (validated), else a permutation drawn from ``seed``."""
    if class_order is not None:
        order = [int(c) for c in class_order]
        if sorted(order) != list(range(n_classes)):
            missing = sorted(set(range(n_classes)) - set(order))
            extra = sorted(set(order) - set(range(n_classes)))
            dup = sorted({c for c in order if order.count(c) > 1})
            raise OptionError(
                "class_order",
                f"'class_order' must list each of the {n_classes} class ids exactly once"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
                + (f"; repeated {dup}" if dup else "")
            )
        return tuple(order)
    if not shuffle:
        return tuple(range(n_classes))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C1A55]))
    return tuple(int(c) for c in rng.permutation(n_classes))


def class_incremental(
    dataset: Dataset,
    *,
    seed: int,
    n_experiences: int | None = None,
    increment: int | None = None,
    initial_increment: int | None = None,
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = True,
    task_labels: bool = False,
) -> Stream:
    """Split ``dataset`` into experiences of disjoint classes.

    Labels keep their dataset ids (no remapping), so a head with ``dataset.n_classes``
    outputs serves every experience. The same arguments give the same stream, byte for
    byte: samples within an experience keep dataset order, and the engine shuffles them.
    """
    order = resolve_class_order(dataset.n_classes, class_order, seed, shuffle_classes)
    sizes = class_groups(
        dataset.n_classes,
        n_experiences=n_experiences,
        increment=increment,
        initial_increment=initial_increment,
    )
    experiences = []
    start = 0
    for index, size in enumerate(sizes):
        classes = order[start : start + size]
        start += size
        wanted = torch.tensor(classes, dtype=dataset.y_train.dtype)
        train_idx = torch.isin(dataset.y_train, wanted).nonzero().squeeze(1)
        test_idx = torch.isin(dataset.y_test, wanted).nonzero().squeeze(1)
        experiences.append(
            Experience(
                index=index,
                classes=tuple(classes),
                train_x=dataset.x_train[train_idx],
                train_y=dataset.y_train[train_idx],
                test_x=dataset.x_test[test_idx],
                test_y=dataset.y_test[test_idx],
                task_id=index if task_labels else None,
            )
        )
    return Stream(
        experiences=tuple(experiences),
        n_classes=dataset.n_classes,
        class_order=order,
        task_labels=task_labels,
        description={"type": "class_incremental", "class_groups": sizes},
        labels=LabelSpace.flat(dataset.class_names),
    )
