"""Memory the machine allows, and a check that a run fits before its data is loaded.

A run holds its dataset twice (the arrays and the stream's per-experience copies), its
model with gradients and optimizer state, and what each strategy keeps (at most its
budget). When that estimate exceeds the memory available, :func:`check_run_memory`
stops the run before anything large is read, with a message naming the dataset, the
estimate, the limit and the fix, instead of letting the kernel kill it part-way.

Available memory (the least of MemAvailable, the cgroup's room, ``ulimit -v`` and
``$CLSIM_MEMORY_LIMIT`` less the process's resident memory) is read by
:mod:`clsim.data.limits`, re-exported here; the loaders check what a file declares against
it before allocating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clsim.budget import format_bytes
from clsim.data.limits import (
    MEMORY_ENV,
    MemoryLimit,
    address_space_limit,
    available_memory,
    available_memory_bytes,
    cgroup_limits,
    env_limit,
    env_room,
    meminfo_limit,
    require_memory,
    resident_bytes,
)
from clsim.errors import ResourceError
from clsim.validation import Source

__all__ = [
    "MEMORY_ENV", "MemoryLimit", "RunEstimate", "address_space_limit", "available_memory",
    "available_memory_bytes", "cgroup_limits", "check_run_memory", "env_limit",
    "env_room", "estimate_run", "meminfo_limit", "require_memory", "resident_bytes",
]


@dataclass(frozen=True)
class RunEstimate:
    """Bytes a run will hold, by part (each part keyed by the scenario key that sets it)."""

    parts: dict[str, tuple[str, int]]  # label -> (key path, bytes)

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.parts.values())

    def largest_key(self) -> str:
        return max(self.parts.values(), key=lambda part: part[1])[0]


COVERAGE = ("The estimate counts the data, the model with its training state and each "
            "strategy's budget; a strategy without a budget (joint) may keep more, and a "
            "batch's activations come on top")


def estimate_run(scenario: Any, root: str | None, **options: Any) -> RunEstimate | None:
    """The bytes a run of ``scenario`` will hold, before anything is loaded; None when the
    dataset's size cannot be told from its files."""
    from clsim.data.sizes import estimate_dataset
    from clsim.streams import STREAM_TYPES

    size = estimate_dataset(scenario.data.dataset, root=root, **options)
    if size is None:
        return None
    name = scenario.model.name
    stream_type, stream_options = STREAM_TYPES[scenario.stream.type], scenario.stream.options
    copies = stream_type.copies(stream_options)
    weights = _model_bytes(scenario, size.sample_shape,
                           stream_type.outputs(stream_options, size.n_classes))
    state = {"sgd": 1 if scenario.training.optimizer.momentum else 0, "adam": 2, "adamw": 2}
    model_copies = 2 + state.get(scenario.training.optimizer.name, 2)  # weights, grads, moments
    budgets = [s.budget.resolve(model_bytes=weights, sample_bytes=size.sample_bytes) - weights
               for s in scenario.strategies.values() if s.budget is not None]
    return RunEstimate({
        f"dataset {size.name!r}, {size.describe()} with labels": ("data.dataset",
                                                                 size.total_bytes),
        # a transformed stream holds one copy per experience: fewer experiences, less
        "its copies in the stream": ("stream.n_experiences" if copies > 1 else "data.dataset",
                                     copies * size.total_bytes),
        f"model {name!r} with gradients and optimizer state": ("model", model_copies * weights),
        "strategy state beyond the model (the largest budget)":
            ("strategies", max([0, *budgets])),
    })


def _model_bytes(scenario: Any, sample_shape: tuple[int, ...], n_classes: int) -> int:
    """Parameter and buffer bytes of the scenario's model, built on the meta device (no
    memory is allocated, so an absurd width costs nothing to measure)."""
    import torch

    from clsim.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(scenario.model.name, sample_shape, n_classes,
                                scenario.model.options)
    except Exception:  # an option the builder refuses is reported when it is built for real
        return 0
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def check_run_memory(scenario: Any, root: str | None = None, **options: Any) -> None:
    """Stop a run that would need more memory than is available, before it loads its data.

    Raises :class:`clsim.errors.ResourceError` naming the scenario key of the largest
    part (the dataset, the model or the budgets), the estimate by part, the limit and
    where it comes from.
    """
    limit = available_memory()
    if limit is None:
        return
    estimate = estimate_run(scenario, root, **options)
    if estimate is None or estimate.total_bytes <= limit.bytes:
        return
    parts = "; ".join(f"{label}: {format_bytes(nbytes)}"
                      for label, (_, nbytes) in estimate.parts.items())
    fix = "use a subset of the data (an npz file of fewer samples), a smaller model or " \
        "smaller budgets"
    if limit.source.startswith(f"${MEMORY_ENV}"):
        fix += f", or raise ${MEMORY_ENV}"
    key = estimate.largest_key()
    raise ResourceError(
        f"not enough memory for this run: it needs about {format_bytes(estimate.total_bytes)} "
        f"({parts}) but {format_bytes(limit.bytes)} is available ({limit.source}); stopped "
        f"before loading the data: {fix}. {COVERAGE}",
        source=scenario.source, key_path=key,
        line=Source(scenario.source, scenario.lines).line_of(tuple(key.split("."))),
    )
