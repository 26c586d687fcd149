"""The memory ledger: bytes a strategy holds, measured by walking it.

The engine measures at four points of every experience (``LedgerRecord.point``):
``start`` (after ``clsim_before_experience``: a teacher or old-model copy just taken),
``trained`` (after the last batch, before ``clsim_after_experience``: whatever a plugin
built lazily or accumulated while training, and the optimizer the loop still carries),
``anytime`` (at each anytime evaluation of an online stream) and ``end`` (after
``clsim_after_experience``: what is kept *between* experiences). ``peak_bytes`` is the
largest reading at any point, ``kept_bytes`` the largest at an ``end``; the budget is
checked against one of them (``budget_check``: ``peak``, the default, or ``between``).

What is counted, at the real width of each dtype:

* the model's parameters and buffers (BatchNorm statistics, an analytic learner's
  autocorrelation matrix registered as a buffer), and any tensor kept as a plain
  attribute of one of its modules;
* everything reachable from each plugin object: attributes, lists, tuples, sets, dicts,
  nested objects, tensors, numpy arrays and modules (old models, experts).

A tensor is charged the size of its whole storage (a view keeps its base alive), once,
however many references reach it, in the first place found (the model before plugins).
Python numbers, strings and bytes in plugin state are charged 8 bytes per number and
their length per string; those parts are marked *estimated*. Not charged: the plugin's
declared ``options`` (configuration, not learned state), the run context, callables,
classes, modules of code and random generators.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import functools
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

_PY_NUMBER_BYTES = 8
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _buffers, hooks, training...
_SKIP_TYPES = (
    types.ModuleType, types.BuiltinFunctionType, types.CodeType, type, torch.Generator,
    np.random.Generator, np.random.SeedSequence, torch.device, torch.dtype,
    staticmethod, classmethod, property,
)


@dataclass
class Measurement:
    """One reading of the ledger: total bytes and the named parts that make it."""

    parts: dict[str, int] = field(default_factory=dict)
    estimated_parts: set[str] = field(default_factory=set)

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def estimated(self) -> bool:
        return bool(self.estimated_parts)

    def bytes_of(self, prefix: str) -> int:
        """Bytes of the parts whose name is ``prefix`` or starts with ``prefix.``."""
        return sum(n for k, n in self.parts.items() if k == prefix or k.startswith(prefix + "."))

    def grown_since(self, earlier: Measurement) -> dict[str, tuple[int, int]]:
        """The parts holding more bytes now than in ``earlier`` (a part it lacked held 0),
        as part -> (bytes then, bytes now), the largest growth first (then by name)."""
        grown = {part: (earlier.parts.get(part, 0), nbytes)
                 for part, nbytes in self.parts.items() if nbytes > earlier.parts.get(part, 0)}
        return dict(sorted(grown.items(), key=lambda kv: (kv[1][0] - kv[1][1], kv[0])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "parts": dict(sorted(self.parts.items())),
            "estimated": self.estimated,
            "estimated_parts": sorted(self.estimated_parts),
        }


class _Walker:
    """Depth-first walk that charges each storage once and names where it was found."""

    def __init__(self, skip_types: tuple[type, ...] = ()) -> None:
        self.result = Measurement()
        self._storages: set[tuple[str, int]] = set()
        self._visited: set[int] = set()
        self._skip = _SKIP_TYPES + skip_types

    def charge(self, part: str, nbytes: int, estimated: bool = False) -> None:
        self.result.parts[part] = self.result.parts.get(part, 0) + nbytes
        if estimated:
            self.result.estimated_parts.add(part)

    def tensor(self, t: torch.Tensor, part: str) -> None:
        if t.layout != torch.strided:
            pieces = _sparse_pieces(t)
            for piece in pieces:
                self.tensor(piece, part)
            return
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.data_ptr() == 0 or key in self._storages:
            return
        self._storages.add(key)
        self.charge(part, storage.nbytes())

    def array(self, a: np.ndarray, part: str) -> None:
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        # keyed by address, like a CPU tensor's storage: torch.from_numpy shares it
        key = ("cpu", root.__array_interface__["data"][0])
        if key in self._storages:
            return
        self._storages.add(key)
        self.charge(part, root.nbytes)
        if root.dtype == object:  # an array of references: charge what they point to
            for item in root.flat:
                self.value(item, part, collapse=True)

    def buffer(self, key: tuple[str, int], nbytes: int, part: str) -> None:
        if key not in self._storages:
            self._storages.add(key)
            self.charge(part, nbytes)

    def module(self, m: nn.Module, name: str) -> None:
        for sub in m.modules():
            if id(sub) in self._visited:
                continue
            self._visited.add(id(sub))
            for p in sub._parameters.values():
                if p is not None:
                    self.tensor(p, f"{name}.parameters")
            for b in sub._buffers.values():
                if b is not None:
                    self.tensor(b, f"{name}.buffers")
            for attr, value in vars(sub).items():
                # kernel sizes, strides and other settings are configuration, not state
                if attr not in _MODULE_INTERNALS and not _only_scalars(value):
                    self.value(value, f"{name}.{attr}", collapse=True)

    def value(self, obj: Any, part: str, collapse: bool = False) -> None:
        """Charge whatever ``obj`` holds to ``part`` (containers keep their holder's name)."""
        if obj is None or isinstance(obj, self._skip):
            return
        if isinstance(obj, torch.Tensor):
            self.tensor(obj, part)
            return
        if isinstance(obj, np.ndarray):
            self.array(obj, part)
            return
        if _is_scalar(obj):
            self.charge(part, _scalar_bytes(obj), estimated=True)
            return
        if id(obj) in self._visited:
            return
        if isinstance(obj, nn.Module):
            self.module(obj, part)
            return
        self._visited.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                if not isinstance(key, str):  # string keys are names; others may hold data
                    self.value(key, part, collapse=True)
                self.value(value, part, collapse=True)
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            for value in obj:
                self.value(value, part, collapse=True)
        elif isinstance(obj, torch.UntypedStorage):
            self.buffer((str(obj.device), obj.data_ptr()), obj.nbytes(), part)
        elif isinstance(obj, array.array):
            address, length = obj.buffer_info()
            self.buffer(("cpu", address), length * obj.itemsize, part)
        elif isinstance(obj, (types.FunctionType, types.MethodType, functools.partial,
                              types.GeneratorType)):
            for value in _captured(obj):  # what a closure, method or partial keeps alive
                self.value(value, part, collapse=True)
        else:
            for attr, value in _attributes(obj):
                self.value(value, part if collapse else f"{part}.{attr}", collapse)


def _attributes(obj: Any) -> Iterable[tuple[str, Any]]:
    items = list(getattr(obj, "__dict__", {}).items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        named = {name for name, _ in items}
        items += [(f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj)
                  if f.name not in named]
    for klass in type(obj).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if hasattr(obj, slot) and slot not in ("__dict__", "__weakref__"):
                items.append((slot, getattr(obj, slot)))
    return items


def _captured(obj: Any) -> list[Any]:
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, functools.partial):
        return [obj.func, obj.args, obj.keywords]
    if isinstance(obj, types.GeneratorType):
        return list(obj.gi_frame.f_locals.values()) if obj.gi_frame is not None else []
    cells = [cell.cell_contents for cell in obj.__closure__ or () if _cell_full(cell)]
    return cells + list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())


def _cell_full(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises ValueError
    except ValueError:
        return False
    return True


def _only_scalars(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_only_scalars(v) for v in value)
    return value is None or _is_scalar(value)


def _is_scalar(obj: Any) -> bool:
    return isinstance(obj, (bool, int, float, complex, str, bytes, bytearray, np.generic))


def _scalar_bytes(obj: Any) -> int:
    if isinstance(obj, str):
        return len(obj.encode("utf-8"))
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, np.generic):
        return obj.nbytes
    return _PY_NUMBER_BYTES


def _sparse_pieces(t: torch.Tensor) -> list[torch.Tensor]:
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    raise TypeError(f"the memory ledger cannot measure tensors of layout {t.layout}")


def measure(
    model: nn.Module | None,
    plugins: Iterable[tuple[str, Any]] = (),
    *,
    skip_types: tuple[type, ...] = (),
    held: Iterable[tuple[str, Any]] = (),
) -> Measurement:
    """Bytes held by ``model``, by each ``(name, plugin)`` and by each ``(part, value)`` of
    ``held`` (what the training loop itself keeps, such as an optimizer's state), part by
    part.

    The model is walked first, so a plugin that merely refers to the live model is not
    charged for it; a *copy* (an old model kept for distillation) is charged to the
    plugin that holds it. ``held`` comes last: a parameter it refers to is charged where
    the model or a plugin holds it.
    """
    walker = _Walker(skip_types)
    if model is not None:
        walker.module(model, "model")
    for name, plugin in plugins:
        walker._visited.add(id(plugin))
        declared = getattr(plugin, "options", None)
        for attr, value in _attributes(plugin):
            if attr == "options" and value is declared and dataclasses.is_dataclass(value):
                continue
            walker.value(value, f"{name}.{attr}")
        for attr, value in _class_state(type(plugin)):  # shared by instances, still held
            walker.value(value, f"{name}.{attr}")
    for part, value in held:
        walker.value(value, part)
    return walker.result


def _class_state(cls: type) -> list[tuple[str, Any]]:
    """Data kept on a plugin's class (not its methods, descriptors or declared Options)."""
    items = []
    for klass in cls.__mro__:
        if klass is object:
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("__") or attr == "Options" or callable(value):
                continue
            if isinstance(value, (staticmethod, classmethod, property, type)):
                continue
            items.append((attr, value))
    return items


def model_bytes(model: nn.Module) -> int:
    """Parameters and buffers of ``model`` at their dtype width (shared storage once)."""
    return measure(model).total_bytes


# where a reading is taken in an experience, in order (the module docstring says why)
POINTS = ("start", "trained", "anytime", "end")
# which readings the budget is checked against: every one (the peak held during
# training) or those between experiences only
BUDGET_CHECKS = ("peak", "between")


@dataclass
class LedgerRecord:
    experience: int
    measurement: Measurement
    over_budget: bool  # over the budget at a point the budget check counts
    position: int | None = None  # training samples seen when measured
    point: str = "end"  # one of POINTS


@dataclass
class Ledger:
    """The ledger of one run: readings at the points of every experience, checked against
    the budget. ``check`` is ``peak`` (every reading counts) or ``between`` (only the
    readings taken between experiences, at ``end``)."""

    budget_bytes: int | None
    records: list[LedgerRecord] = field(default_factory=list)
    check: str = "peak"

    def __post_init__(self) -> None:
        if self.check not in BUDGET_CHECKS:
            raise ValueError(f"budget_check must be one of {', '.join(BUDGET_CHECKS)}; "
                             f"got {self.check!r}")

    def checks(self, point: str) -> bool:
        """Whether the budget is checked at a reading taken at ``point``."""
        return self.check == "peak" or point == "end"

    def record(
        self, experience: int, measurement: Measurement, position: int | None = None,
        point: str = "end",
    ) -> LedgerRecord:
        if point not in POINTS:
            raise ValueError(f"a ledger point is one of {', '.join(POINTS)}; got {point!r}")
        over = self.budget_bytes is not None and self.checks(point) \
            and measurement.total_bytes > self.budget_bytes
        entry = LedgerRecord(experience, measurement, over, position, point)
        self.records.append(entry)
        return entry

    @property
    def peak_bytes(self) -> int:
        """The most bytes held at any point, during training included."""
        return max((r.measurement.total_bytes for r in self.records), default=0)

    @property
    def kept_bytes(self) -> int:
        """The most bytes kept between experiences (readings at ``end``)."""
        return max((r.measurement.total_bytes for r in self.records if r.point == "end"),
                   default=0)

    @property
    def checked_bytes(self) -> int:
        """The figure the budget is checked against: ``peak_bytes`` or ``kept_bytes``."""
        return self.peak_bytes if self.check == "peak" else self.kept_bytes

    @property
    def over_budget(self) -> bool:
        return any(r.over_budget for r in self.records)

    @property
    def estimated(self) -> bool:
        return any(r.measurement.estimated for r in self.records)

    def to_list(self) -> list[dict[str, Any]]:
        return [
            {"experience": r.experience, "point": r.point, "position": r.position,
             "over_budget": r.over_budget, **r.measurement.to_dict()}
            for r in self.records
        ]
