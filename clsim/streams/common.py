"""What every stream type shares: its timing options and its registry entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from clsim.errors import OptionError
from clsim.stream import Stream

DEFAULT_EVAL_EVERY = 1000  # samples between anytime evaluations (HLE, Si-Blurry protocols)


@dataclass
class TimingOptions:
    """How the stream is delivered; each stream type sets its own defaults.

    Subclasses add their builder's options after these three.
    """

    online: bool = field(
        default=False,
        metadata={"help": "each training sample once, in stream order (epochs must be 1)"},
    )
    eval_every: int | None = field(
        default=None,
        metadata={"min": 1, "help": "online: evaluate every this many training samples "
                  f"(anytime accuracy); default {DEFAULT_EVAL_EVERY}"},
    )
    boundaries: Literal["visible", "hidden"] = field(
        default="visible",
        metadata={"help": "hidden: the strategy never learns where tasks start (task-agnostic)"},
    )

    def check(self) -> None:
        if self.boundaries == "hidden" and not self.online:
            raise OptionError("online", "a stream with hidden boundaries is online (each "
                              "sample once, in stream order); set online: true")
        if self.eval_every is not None and not self.online:
            raise OptionError("eval_every", "eval_every applies to online streams; "
                              "set online: true or remove it")


TIMING_KEYS = ("online", "eval_every", "boundaries")


def one_copy(options: object) -> int:
    """Most streams hold each sample of the dataset once."""
    return 1


def same_labels(options: object, n_classes: int) -> int:
    """Most streams label samples with the dataset's own classes."""
    return n_classes


@dataclass(frozen=True)
class StreamType:
    """A stream builder, pure in (dataset, options, seed), and its options dataclass.

    ``copies(options)``: how many copies of the dataset the built stream holds (one per
    experience for transformed streams), and ``outputs(options, n_classes)`` the size of
    its label space: both for the memory check before loading.
    """

    build: Callable[..., Stream]
    options: type
    help: str
    copies: Callable[[object], int] = one_copy
    outputs: Callable[[object, int], int] = same_labels
