"""A strategy's state as plain data that ``torch.load(weights_only=True)`` reads back.

A checkpoint must hold whatever a strategy keeps (a model a plugin may have grown,
buffers, random generators, old models, optimizers) without pickling objects: a pickle
runs code when it is loaded. :func:`encode` turns an object graph into nested dicts,
lists, strings, numbers and tensors; :func:`decode` rebuilds it. Decoding creates only
instances of allowed classes (from clsim, its plugins, torch, numpy, and the modules of
the run's own plugins) without calling ``__init__`` or ``__setstate__``; the only
constructors it calls are torch optimizers', numpy bit generators' and named tuples'.
A class or function is found by its module's own namespace in an already imported module
(never by walking attributes, so a name cannot lead out of that module), and must report
that same module and name. Shared references and cycles survive the round trip, so an
optimizer still points at the model's parameters afterwards.
"""

from __future__ import annotations

import collections
import enum
import inspect
import random
import re
import sys
import types
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from clsim.errors import ClsimError

KIND = "__clsim__"
ALWAYS_ALLOWED = ("clsim", "clsim_plugins", "torch", "numpy")
# where plain functions may come from (classes may come from any allowed module)
FUNCTION_MODULES = ("clsim", "clsim_plugins", "torch.nn.functional")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


class SnapshotError(ClsimError):
    """Something a strategy holds cannot be saved, or a checkpoint file is not valid."""


def allowed_modules(objects: Iterable[object]) -> tuple[str, ...]:
    """The always-allowed packages plus the top-level package of each object's class."""
    extra = {type(obj).__module__.split(".")[0] for obj in objects}
    return tuple(sorted(set(ALWAYS_ALLOWED) | extra))


def _path(cls_or_fn: Any) -> str:
    return f"{cls_or_fn.__module__}:{cls_or_fn.__qualname__}"


class Encoder:
    """One pass over an object graph; ``externals`` maps objects that are not saved
    (the run context, the dataset) to names that :class:`Decoder` resolves again."""

    def __init__(self, allowed: tuple[str, ...], externals: dict[str, object] | None = None):
        self.allowed = allowed
        self.externals = {id(obj): name for name, obj in (externals or {}).items()}
        self.memo: dict[int, int] = {}
        self._keep: list[object] = []  # keeps encoded objects alive so ids stay unique

    def reserve(self, obj: object) -> int:
        """An id for ``obj`` before it is encoded, so references to it met first (a
        plugin reached from another's state) point at it; see :meth:`encode_reserved`."""
        return self._new_id(obj)

    def encode_reserved(self, obj: Any, where: str) -> dict:
        """The object entry of a reserved ``obj`` (restored in place by the decoder)."""
        return self._object(obj, where, number=self.memo[id(obj)])

    def encode(self, obj: Any, where: str = "state") -> Any:
        if obj is None or type(obj) in (bool, str, int, float):
            return obj
        if id(obj) in self.externals:
            return {KIND: "external", "name": self.externals[id(obj)]}
        if id(obj) in self.memo:
            return {KIND: "ref", "id": self.memo[id(obj)]}
        encoder = self._encoder_for(obj)
        if encoder is None:
            cls = type(obj)
            raise SnapshotError(f"{where} is of class {cls.__module__}.{cls.__qualname__}, "
                                "which a checkpoint cannot hold")
        return encoder(obj, where)

    def _new_id(self, obj: object) -> int:
        self.memo[id(obj)] = number = len(self.memo)
        self._keep.append(obj)
        return number

    def _encoder_for(self, obj: Any):
        if isinstance(obj, torch.Tensor):
            return self._tensor
        if isinstance(obj, np.ndarray):
            return self._ndarray
        if isinstance(obj, np.generic):
            return self._npscalar
        if isinstance(obj, torch.dtype):
            return lambda o, w: {KIND: "dtype", "name": str(o).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return lambda o, w: {KIND: "device", "name": str(o)}
        if isinstance(obj, np.dtype):
            return lambda o, w: {KIND: "npdtype", "name": o.str}
        if isinstance(obj, torch.Generator):
            return self._generator
        if isinstance(obj, np.random.Generator):
            return self._np_generator
        if type(obj) is random.Random:
            return lambda o, w: {KIND: "random", "state": o.getstate()}
        if isinstance(obj, torch.optim.Optimizer):
            return self._optimizer
        if type(obj) in (list, set, frozenset, collections.deque):
            return self._sequence
        if type(obj) is tuple:
            return lambda o, w: {KIND: "tuple",
                                 "items": [self.encode(x, f"{w}[{i}]") for i, x in enumerate(o)]}
        if type(obj) in (dict, collections.OrderedDict, collections.defaultdict):
            return self._dict
        if isinstance(obj, bytes):
            return lambda o, w: {KIND: "bytes", "data": torch.frombuffer(bytearray(o),
                                                                        dtype=torch.uint8)}
        if type(obj) is complex:
            return lambda o, w: {KIND: "complex", "real": o.real, "imag": o.imag}
        if isinstance(obj, types.MethodType):
            return self._method
        if type(obj) is weakref.ref:  # e.g. a torch hook handle's link to its dict
            return lambda o, w: {KIND: "weakref", "target": self.encode(o(), f"{w}()")}
        if isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType):
            return self._named
        if isinstance(obj, enum.Enum):
            return lambda o, w: {KIND: "enum", "class": self._class_path(type(o), w),
                                 "name": o.name}
        if isinstance(obj, dict | list | set | frozenset | tuple | str | int | float) \
                and not (isinstance(obj, tuple) and hasattr(obj, "_fields")):
            return None  # a subclass of a builtin keeps state __dict__ does not show
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return lambda o, w: {KIND: "namedtuple", "class": self._class_path(type(o), w),
                                 "items": [self.encode(x, f"{w}.{f}")
                                           for f, x in zip(o._fields, o, strict=True)]}
        if type(obj) is types.SimpleNamespace or hasattr(obj, "__dict__") \
                or hasattr(type(obj), "__slots__"):
            return self._object
        return None

    def _allowed(self, module: str) -> bool:
        return module.split(".")[0] in self.allowed

    def _class_path(self, cls: type, where: str) -> str:
        if cls is types.SimpleNamespace:
            return "types:SimpleNamespace"
        if not self._allowed(cls.__module__) or lookup(_path(cls), self.allowed) is not cls:
            raise SnapshotError(
                f"{where} is of class {cls.__module__}.{cls.__qualname__}; a checkpoint holds "
                f"only classes defined at module level in {', '.join(self.allowed)} and "
                "found there under their own name"
            )
        return _path(cls)

    def _npscalar(self, value: np.generic, where: str) -> dict:
        plain = value.item()
        if type(plain) not in (bool, int, float, complex):
            raise SnapshotError(f"{where} is a numpy {value.dtype} scalar, which a checkpoint "
                                "cannot hold")
        if type(plain) is complex:
            plain = self.encode(plain, where)
        return {KIND: "npscalar", "dtype": value.dtype.str, "value": plain}

    def _tensor(self, tensor: torch.Tensor, where: str) -> dict:
        if vars(tensor) or tensor._backward_hooks \
                or getattr(tensor, "_post_accumulate_grad_hooks", None):
            raise SnapshotError(f"{where} is a tensor with hooks or attributes of its own, "
                                "which a checkpoint cannot hold")
        if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
            raise SnapshotError(f"{where} is an uninitialised (lazy) parameter")
        number = self._new_id(tensor)
        data = tensor.detach()
        if type(data) is not torch.Tensor:  # a subclass (Parameter's data is plain)
            data = data.as_subclass(torch.Tensor)
        return {KIND: "tensor", "id": number, "value": data,
                "parameter": isinstance(tensor, torch.nn.Parameter),
                "requires_grad": tensor.requires_grad}

    def _ndarray(self, array: np.ndarray, where: str) -> dict:
        if array.dtype.hasobject:
            raise SnapshotError(f"{where} is a numpy array of Python objects, which a "
                                "checkpoint cannot hold (use a numeric dtype)")
        number = self._new_id(array)
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        return {KIND: "ndarray", "id": number, "dtype": array.dtype.str,
                "shape": list(array.shape), "data": torch.from_numpy(raw.copy())}

    def _generator(self, generator: torch.Generator, where: str) -> dict:
        return {KIND: "generator", "id": self._new_id(generator),
                "device": str(generator.device), "state": generator.get_state()}

    def _np_generator(self, generator: np.random.Generator, where: str) -> dict:
        bit = type(generator.bit_generator).__name__
        if bit not in _BIT_GENERATORS:
            raise SnapshotError(f"{where} uses the bit generator {bit}, which a checkpoint "
                                f"cannot hold (supported: {', '.join(_BIT_GENERATORS)})")
        number = self._new_id(generator)
        return {KIND: "np_generator", "id": number, "bit_generator": bit,
                "state": self.encode(generator.bit_generator.state, f"{where}.state")}

    def _optimizer(self, optimizer: torch.optim.Optimizer, where: str) -> dict:
        cls = type(optimizer)
        if not cls.__module__.startswith("torch.optim"):
            raise SnapshotError(f"{where} is an optimizer of class {_path(cls)}; a checkpoint "
                                "holds only torch.optim optimizers")
        number = self._new_id(optimizer)
        groups = [{"params": [self.encode(p, f"{where}.param_groups[{g}].params[{i}]")
                              for i, p in enumerate(group["params"])],
                   "options": self.encode({k: v for k, v in group.items() if k != "params"},
                                          f"{where}.param_groups[{g}]")}
                  for g, group in enumerate(optimizer.param_groups)]
        state = optimizer.state_dict()["state"]
        return {KIND: "optimizer", "id": number, "class": _path(cls), "groups": groups,
                "defaults": self.encode(optimizer.defaults, f"{where}.defaults"),
                "state": self.encode(state, f"{where}.state")}

    def _sequence(self, seq, where: str) -> dict:
        number = self._new_id(seq)
        items = [self.encode(x, f"{where}[{i}]") for i, x in enumerate(seq)]
        out = {KIND: type(seq).__name__, "id": number, "items": items}
        if isinstance(seq, collections.deque):
            out["maxlen"] = seq.maxlen
        return out

    def _dict(self, mapping: dict, where: str) -> dict:
        number = self._new_id(mapping)
        keys, values = [], []
        for key, value in mapping.items():
            label = key if isinstance(key, str) else repr(key)
            keys.append(self.encode(key, f"{where} key {label}"))
            values.append(self.encode(value, f"{where}[{label!r}]"))
        out = {KIND: "dict", "id": number, "type": type(mapping).__name__,
               "keys": keys, "values": values}
        if isinstance(mapping, collections.defaultdict):
            out["factory"] = self.encode(mapping.default_factory, f"{where}.default_factory")
        return out

    def _method(self, method: types.MethodType, where: str) -> dict:
        return {KIND: "method", "self": self.encode(method.__self__, f"{where}.__self__"),
                "name": method.__func__.__name__}

    def _named(self, obj: Any, where: str) -> dict:
        module, qualname = getattr(obj, "__module__", None), obj.__qualname__
        if obj in _BUILTIN_TYPES.values():
            return {KIND: "builtin", "name": obj.__name__}
        allowed = self.allowed if isinstance(obj, type) else self._function_modules()
        path = f"{module}:{qualname}"
        if module is None or "<" in qualname or module.split(".")[0] not in allowed \
                or lookup(path, self.allowed) is not obj:
            kind = "lambda or nested function" if "<" in qualname else f"{module}.{qualname}"
            raise SnapshotError(f"{where} is a {kind}; a checkpoint holds only classes and "
                                "functions defined at module level (functions only in "
                                f"{', '.join(self._function_modules())})")
        return {KIND: "named", "path": path}

    def _function_modules(self) -> tuple[str, ...]:
        plugin_packages = tuple(m for m in self.allowed if m not in ALWAYS_ALLOWED)
        return FUNCTION_MODULES + plugin_packages

    def _object(self, obj: Any, where: str, number: int | None = None) -> dict:
        cls = type(obj)
        path = self._class_path(cls, where)
        number = self._new_id(obj) if number is None else number
        state = dict(getattr(obj, "__dict__", {}))
        for klass in cls.__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    state[slot] = getattr(obj, slot)
        return {KIND: "object", "id": number, "class": path,
                "state": {k: self.encode(v, f"{where}.{k}") for k, v in state.items()}}


class Decoder:
    """Rebuilds what :class:`Encoder` wrote, creating only allowed classes."""

    def __init__(self, allowed: tuple[str, ...], externals: dict[str, object] | None = None):
        self.allowed = allowed
        self.externals = dict(externals or {})
        self.memo: dict[int, Any] = {}

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if isinstance(node, list):  # plain lists only appear inside raw optimizer state
            return [self.decode(x) for x in node]
        if isinstance(node, tuple):
            return tuple(self.decode(x) for x in node)
        if isinstance(node, torch.Tensor):
            return node
        if not isinstance(node, dict) or KIND not in node:
            raise SnapshotError(f"the checkpoint holds an unexpected {type(node).__name__}")
        kind = node[KIND]
        if kind not in _KINDS:
            raise SnapshotError(f"the checkpoint holds an unknown entry kind {kind!r}")
        return getattr(self, f"_{kind}")(node)

    def _remember(self, node: dict, obj: Any) -> Any:
        self.memo[node["id"]] = obj
        return obj

    def _external(self, node):
        if node["name"] not in self.externals:
            raise SnapshotError(f"the checkpoint refers to {node['name']!r}, which this run "
                                "does not have")
        return self.externals[node["name"]]

    def _ref(self, node):
        if node["id"] not in self.memo:
            raise SnapshotError(f"the checkpoint refers to object {node['id']} before defining it")
        return self.memo[node["id"]]

    def _tensor(self, node):
        value = node["value"]
        if node["parameter"]:
            value = torch.nn.Parameter(value, requires_grad=node["requires_grad"])
        elif node["requires_grad"] and value.is_leaf:
            value.requires_grad_(True)
        return self._remember(node, value)

    def _ndarray(self, node):
        dtype = np.dtype(node["dtype"])
        if dtype.hasobject:
            raise SnapshotError("the checkpoint holds a numpy array of Python objects")
        data = node["data"].numpy().view(dtype).reshape(node["shape"])
        return self._remember(node, data.copy())

    def _npscalar(self, node):
        return np.dtype(node["dtype"]).type(node["value"])

    def _npdtype(self, node):
        return np.dtype(node["name"])

    def _dtype(self, node):
        dtype = getattr(torch, node["name"], None)
        if not isinstance(dtype, torch.dtype):
            raise SnapshotError(f"the checkpoint names an unknown torch dtype {node['name']!r}")
        return dtype

    def _device(self, node):
        return torch.device(node["name"])

    def _generator(self, node):
        generator = torch.Generator(device=node["device"])
        generator.set_state(node["state"])
        return self._remember(node, generator)

    def _np_generator(self, node):
        if node["bit_generator"] not in _BIT_GENERATORS:
            raise SnapshotError(f"the checkpoint names a bit generator "
                                f"{node['bit_generator']!r}")
        bit = getattr(np.random, node["bit_generator"])()
        generator = self._remember(node, np.random.Generator(bit))
        bit.state = self.decode(node["state"])
        return generator

    def _random(self, node):
        rng = random.Random()
        rng.setstate(as_tuples(node["state"]))
        return rng

    def _optimizer(self, node):
        cls = self._resolve(node["class"])
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
                and cls.__module__.startswith("torch.optim")):
            raise SnapshotError(f"the checkpoint names {node['class']} as an optimizer")
        groups = [{"params": [self.decode(p) for p in g["params"]], **self.decode(g["options"])}
                  for g in node["groups"]]
        accepted = inspect.signature(cls).parameters
        defaults = {k: v for k, v in self.decode(node["defaults"]).items() if k in accepted}
        optimizer = self._remember(node, cls(groups, **defaults))
        numbered, start = [], 0  # state_dict() numbers parameters across groups
        for group in optimizer.param_groups:
            numbered.append({**{k: v for k, v in group.items() if k != "params"},
                             "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        optimizer.load_state_dict({"state": self.decode(node["state"]),
                                   "param_groups": numbered})
        return optimizer

    def _list(self, node):
        out = self._remember(node, [])
        out.extend(self.decode(x) for x in node["items"])
        return out

    def _set(self, node):
        out = self._remember(node, set())
        out.update(self.decode(x) for x in node["items"])
        return out

    def _frozenset(self, node):
        return self._remember(node, frozenset(self.decode(x) for x in node["items"]))

    def _deque(self, node):
        out = self._remember(node, collections.deque(maxlen=node["maxlen"]))
        out.extend(self.decode(x) for x in node["items"])
        return out

    def _tuple(self, node):
        return tuple(self.decode(x) for x in node["items"])

    def _dict(self, node):
        kinds = {"dict": dict, "OrderedDict": collections.OrderedDict,
                 "defaultdict": collections.defaultdict}
        if node["type"] not in kinds:
            raise SnapshotError(f"the checkpoint holds a mapping of type {node['type']!r}")
        out = self._remember(node, kinds[node["type"]]())
        if node["type"] == "defaultdict":
            factory = self.decode(node["factory"])
            if factory is not None and not isinstance(factory, type):
                raise SnapshotError("the checkpoint gives a defaultdict a factory that is not "
                                    "a class")
            out.default_factory = factory
        for key, value in zip(node["keys"], node["values"], strict=True):
            out[self.decode(key)] = self.decode(value)
        return out

    def _bytes(self, node):
        return node["data"].numpy().tobytes()

    def _complex(self, node):
        return complex(node["real"], node["imag"])

    def _method(self, node):
        owner, name = self.decode(node["self"]), node["name"]
        if not (isinstance(name, str) and _IDENTIFIER.fullmatch(name)) or not \
                inspect.isfunction(inspect.getattr_static(type(owner), name, None)):
            raise SnapshotError(f"the checkpoint names a method {name!r} that "
                                f"{type(owner).__qualname__} does not define")
        return getattr(owner, name)

    def _weakref(self, node):
        target = self.decode(node["target"])
        return weakref.ref(_Gone() if target is None else target)

    def _builtin(self, node):
        if node["name"] not in _BUILTIN_TYPES:
            raise SnapshotError(f"the checkpoint names a builtin {node['name']!r}")
        return _BUILTIN_TYPES[node["name"]]

    def _named(self, node):
        target = self._resolve(node["path"])
        module = node["path"].partition(":")[0]
        if not isinstance(target, type) and not module.startswith(
                FUNCTION_MODULES + tuple(m for m in self.allowed if m not in ALWAYS_ALLOWED)):
            raise SnapshotError(f"the checkpoint names the function {node['path']}, outside "
                                "the modules functions may come from")
        return target

    def _enum(self, node):
        cls = self._resolve(node["class"])
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise SnapshotError(f"the checkpoint names {node['class']} as an enum")
        return cls[node["name"]]

    def _namedtuple(self, node):
        cls = self._resolve(node["class"])
        if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
            raise SnapshotError(f"the checkpoint names {node['class']} as a named tuple")
        return cls(*(self.decode(x) for x in node["items"]))

    def _object(self, node):
        cls = self._resolve(node["class"])
        if not isinstance(cls, type) or issubclass(cls, dict | list | set | tuple | str):
            raise SnapshotError(f"the checkpoint names {node['class']} as a plain class")
        obj = self._remember(node, cls.__new__(cls))
        self.fill(obj, node)
        return obj

    def fill(self, obj: Any, node: dict) -> None:
        """Set ``obj``'s attributes from an object entry, bypassing ``__setattr__`` (so a
        frozen dataclass or a torch module is restored as it was); also restores in place."""
        state = {k: self.decode(v) for k, v in node["state"].items()}
        if hasattr(obj, "__dict__"):
            obj.__dict__.clear()
        for name, value in state.items():
            if _is_slot(obj, name):
                object.__setattr__(obj, name, value)
            else:
                obj.__dict__[name] = value

    def _resolve(self, path: str) -> Any:
        target = lookup(path, self.allowed)
        if target is None:
            raise SnapshotError(f"the checkpoint names {path!r}, which is not a class or "
                                "function defined at module level in an allowed, loaded module "
                                f"({', '.join(self.allowed)})")
        return target


def lookup(path: str, allowed: tuple[str, ...]) -> Any:
    """The class or function ``module:qualname`` names, or None. Only an allowed module
    already imported is searched, by its own namespace and then through classes only (a
    nested class), and the result must report that same module and qualified name: a
    name can never lead into another module's objects or trigger an import."""
    if not isinstance(path, str):
        return None
    if path == "types:SimpleNamespace":
        return types.SimpleNamespace
    module_name, _, qualname = path.partition(":")
    module = sys.modules.get(module_name)
    if module is None or module_name.split(".")[0] not in allowed:
        return None
    parts = qualname.split(".")
    if not all(_IDENTIFIER.fullmatch(part) and not part.startswith("__") for part in parts):
        return None
    target = vars(module).get(parts[0])
    for part in parts[1:]:
        if not isinstance(target, type):
            return None
        target = vars(target).get(part)
    if not (isinstance(target, type) or inspect.isfunction(target)
            or inspect.isbuiltin(target)):
        return None
    if getattr(target, "__module__", None) != module_name \
            or getattr(target, "__qualname__", None) != qualname:
        return None
    return target


_BUILTIN_TYPES = {t.__name__: t for t in (dict, list, set, tuple, int, float, str, bool,
                                          frozenset)}
# every entry kind the decoder understands (each has a ``_kind`` method)
_KINDS = frozenset({
    "external", "ref", "tensor", "ndarray", "npscalar", "npdtype", "dtype", "device",
    "generator", "np_generator", "random", "optimizer", "list", "set", "frozenset", "deque",
    "tuple", "dict", "bytes", "complex", "weakref", "method", "builtin", "named", "enum",
    "namedtuple", "object",
})


class _Gone:
    """Stands in for the target of a weak reference that had already died."""


def _is_slot(obj: Any, name: str) -> bool:
    return any(name in getattr(k, "__slots__", ()) for k in type(obj).__mro__)


def as_tuples(value: Any) -> Any:
    """Lists back to tuples (``random.Random`` state is nested tuples)."""
    if isinstance(value, list | tuple):
        return tuple(as_tuples(v) for v in value)
    return value

