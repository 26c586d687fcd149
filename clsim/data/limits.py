"""Memory this process may still allocate, and a check that what a file declares fits.

Available memory is the least of: ``MemAvailable`` in /proc/meminfo; the cgroup's limit
minus its usage (v2 ``memory.max`` - ``memory.current``, v1 ``memory.limit_in_bytes`` -
``memory.usage_in_bytes``); the process's address-space limit (``ulimit -v``) minus what
it has mapped; and ``$CLSIM_MEMORY_LIMIT`` (a size such as ``"2 GiB"``, read with the
budget syntax), a cap on the whole process for runs sharing a machine: its room is the
cap less the process's resident memory. A source that does not exist on this
system is skipped; with none at all, nothing is checked.

This sits below the loaders, which call :func:`require_memory` before allocating what a
file's header declares; :mod:`clsim.resources` (the whole run's estimate, which needs the
loaders' size estimates) re-exports it, so the dependency runs one way.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from clsim.budget import Budget, format_bytes
from clsim.errors import ClsimError, ConfigError, DataError

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


def _status_bytes(status: Path, field: str) -> int | None:
    """A size field of /proc/self/status (``VmRSS``, ``VmSize``) in bytes, or None."""
    try:
        return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                    if line.startswith(f"{field}:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def resident_bytes(status: Path = Path("/proc/self/status")) -> int | None:
    """This process's resident memory (VmRSS): the interpreter, torch and every module
    and array loaded so far; None where /proc cannot tell."""
    return _status_bytes(status, "VmRSS")


def env_room(environ: dict[str, str] | None = None,
             status: Path = Path("/proc/self/status")) -> MemoryLimit | None:
    """``$CLSIM_MEMORY_LIMIT`` caps the whole process, so the room it leaves is the cap
    less what the process already holds (as a cgroup's room is its limit less its usage)."""
    cap = env_limit(environ)
    if cap is None:
        return None
    held = resident_bytes(status)
    if held is None:
        return cap
    return MemoryLimit(max(0, cap.bytes - held), f"{cap.source} less the {format_bytes(held)} "
                       "this process already holds (the interpreter, torch, loaded modules)")


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
    mapped = _status_bytes(status, "VmSize")
    if mapped is None:
        return None
    return MemoryLimit(max(0, soft - mapped), "the address-space limit (ulimit -v) minus what "
                       "the process has mapped")


def available_memory() -> MemoryLimit | None:
    """The tightest of the limits above, or None when none can be read."""
    limits = [found for found in (env_room(), meminfo_limit(), address_space_limit())
              if found is not None] + cgroup_limits()
    return min(limits, key=lambda limit: limit.bytes, default=None)


def available_memory_bytes() -> int | None:
    """Bytes this process may still allocate (see :func:`available_memory`)."""
    limit = available_memory()
    return None if limit is None else limit.bytes


def require_memory(nbytes: int, what: str, error: type[ClsimError] = DataError) -> None:
    """Refuse, before allocating it, an amount a file declares (an idx header, a zip
    member's size, an image's dimensions) that exceeds the memory available: a damaged
    or hostile file is then one message naming it, not a MemoryError or the OOM killer.

    ``what`` names the file and what it declares; the message adds the bytes and the limit.
    """
    limit = available_memory()
    if limit is None or nbytes <= limit.bytes:
        return
    raise error(f"{what}: {format_bytes(nbytes)}, more than the {format_bytes(limit.bytes)} "
                f"of memory available ({limit.source}); the file is damaged or not what "
                "it claims to be")
