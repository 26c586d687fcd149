"""Memory the machine allows, and a check that a run fits before its data is loaded.

A run holds its dataset twice (the arrays and the stream's per-experience copies), its
model with gradients and optimizer state, and what each strategy keeps (at most its
budget). When that estimate exceeds the memory available, :func:`check_run_memory`
stops the run before anything large is read, with a message naming the dataset, the
estimate, the limit and the fix, instead of letting the kernel kill it part-way.

Available memory is the least of: ``MemAvailable`` in /proc/meminfo; the cgroup's limit
minus its usage (v2 ``memory.max`` - ``memory.current``, v1 ``memory.limit_in_bytes`` -
``memory.usage_in_bytes``); the process's address-space limit (``ulimit -v``) minus what
it has mapped; and ``$CLSIM_MEMORY_LIMIT`` (a size such as ``"2 GiB"``, read with the
budget syntax), a cap for runs sharing a machine. A source that does not exist on this
system is skipped; with none at all, nothing is checked.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clsim.budget import Budget, format_bytes
from clsim.errors import ConfigError, ResourceError
from clsim.validation import Source

MEMORY_ENV = "CLSIM_MEMORY_LIMIT"
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryLimit:
    """Bytes available, and where that number comes from (for messages)."""

    bytes: int
    source: str


def env_limit(environ: dict[str, str] | None = None) -> MemoryLimit | None:
    """``$CLSIM_MEMORY_LIMIT`` as a limit; a value that is not a positive size is an error."""
    text = (os.environ if environ is None else environ).get(MEMORY_ENV, "").strip()
    if not text:
        return None
    try:
        size = Budget.parse(text)
    except ValueError as exc:
        raise ConfigError(f"${MEMORY_ENV}: expected a size such as '2 GiB' or '500MB'; "
                          f"{exc}") from None
    if size.exemplars or size.models or size.bytes <= 0:
        raise ConfigError(f"${MEMORY_ENV}: expected a positive size in bytes, such as "
                          f"'2 GiB' or '500MB'; got {text!r}")
    return MemoryLimit(size.bytes, f"${MEMORY_ENV}={text}")


def meminfo_limit(path: Path = Path("/proc/meminfo")) -> MemoryLimit | None:
    """``MemAvailable``: what the kernel can give without swapping."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return MemoryLimit(int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo")
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_limits(root: Path = _CGROUP_ROOT,
                  membership: Path = Path("/proc/self/cgroup")) -> list[MemoryLimit]:
    """The room left in this process's memory cgroup: v2 (the unified hierarchy, line
    ``0::PATH`` of /proc/self/cgroup) and v1 (the line naming the memory controller)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            found = _cgroup_room(root / relative, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            found = _cgroup_room(root / "memory" / relative, "memory.limit_in_bytes",
                                 "memory.usage_in_bytes")
        else:
            continue
        if found is not None:
            limits.append(found)
    return limits


def _cgroup_room(folder: Path, limit_name: str, usage_name: str) -> MemoryLimit | None:
    try:
        limit_text = (folder / limit_name).read_text().strip()
        usage = int((folder / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 2**60:
        return None  # no limit set ('max' in v2, a huge number in v1)
    return MemoryLimit(max(0, int(limit_text) - usage),
                       f"the cgroup {folder}: {limit_name} minus {usage_name}")


def address_space_limit(status: Path = Path("/proc/self/status")) -> MemoryLimit | None:
    """The soft ``RLIMIT_AS`` (ulimit -v) minus the address space already mapped."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        mapped = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                      if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return MemoryLimit(max(0, soft - mapped), "the address-space limit (ulimit -v) minus what "
                       "the process has mapped")


def available_memory() -> MemoryLimit | None:
    """The tightest of the limits above, or None when none can be read."""
    limits = [found for found in (env_limit(), meminfo_limit(), address_space_limit())
              if found is not None] + cgroup_limits()
    return min(limits, key=lambda limit: limit.bytes, default=None)


def available_memory_bytes() -> int | None:
    """Bytes this process may still allocate (see :func:`available_memory`)."""
    limit = available_memory()
    return None if limit is None else limit.bytes


@dataclass(frozen=True)
class RunEstimate:
    """Bytes a run will hold, by part (each part keyed by the scenario key that sets it)."""

    parts: dict[str, tuple[str, int]]  # label -> (key path, bytes)

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.parts.values())

    def largest_key(self) -> str:
        return max(self.parts.values(), key=lambda part: part[1])[0]


def estimate_run(scenario: Any, root: str | None, **options: Any) -> RunEstimate | None:
    """The bytes a run of ``scenario`` will hold, before anything is loaded; None when the
    dataset's size cannot be told from its files."""
    from clsim.data.sizes import estimate_dataset

    size = estimate_dataset(scenario.data.dataset, root=root, **options)
    if size is None:
        return None
    name = scenario.model.name
    weights = _model_bytes(scenario, size.sample_shape, size.n_classes)
    state = {"sgd": 1 if scenario.training.optimizer.momentum else 0, "adam": 2, "adamw": 2}
    copies = 2 + state.get(scenario.training.optimizer.name, 2)  # weights, grads, moments
    budgets = [s.budget.resolve(model_bytes=weights, sample_bytes=size.sample_bytes) - weights
               for s in scenario.strategies.values() if s.budget is not None]
    return RunEstimate({
        f"dataset {size.name!r}, {size.describe()} with labels": ("data.dataset",
                                                                 size.total_bytes),
        "its copies in the stream": ("data.dataset", size.total_bytes),
        f"model {name!r} with gradients and optimizer state": ("model", copies * weights),
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
        f"before loading the data: {fix}",
        source=scenario.source, key_path=key,
        line=Source(scenario.source, scenario.lines).line_of(tuple(key.split("."))),
    )
