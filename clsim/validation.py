"""Turn parsed YAML into typed dataclasses, or say exactly what is wrong and where.

Constraints are data: a dataclass field's type annotation says which forms it accepts
(``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``list[T]``,
``dict[str, T]``, nested dataclasses, or a class with a ``parse`` classmethod), and its
``metadata`` may add ``min`` / ``max`` bounds (``min_exclusive`` for a strict bound) and
a one-line ``help``. A dataclass may define ``check(self)`` for cross-field rules; it
raises ValueError with a sentence showing both values.

Every problem is one :class:`clsim.errors.ConfigError` naming the file, the line where
known, the key path, what was expected and what was got.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Union

from clsim.errors import ConfigError

KeyPath = tuple[str | int, ...]


def format_path(path: KeyPath) -> str:
    """('strategies', 'er', 'plugins', 0) -> 'strategies.er.plugins[0]'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters so a pasted blob does not flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


@dataclass
class Source:
    """Where a config came from: the file name and a key path -> line map."""

    name: str = "<config>"
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(
            message, source=self.name, key_path=format_path(path) or None, line=self.line_of(path)
        )


def describe(tp: Any) -> str:
    """An English phrase for the values a type accepts: 'an int', 'one of 'a', 'b''."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(parts)
    if origin in (list, tuple, typing.Sequence):
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if origin in (dict, Mapping):
        return f"a mapping of {_plural(describe(args[1]))}" if args else "a mapping"
    if tp is bool:
        return "a boolean (true or false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "description", None) or f"a {getattr(tp, '__name__', tp)}"


def _plural(phrase: str) -> str:
    for article in ("an ", "a "):
        if phrase.startswith(article):
            return phrase[len(article) :] + "s"
    return phrase


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
    }.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    return f"got {short_repr(value)} ({_type_name(value)})"


def coerce(value: Any, tp: Any, path: KeyPath, source: Source, meta: Mapping | None = None) -> Any:
    """Check ``value`` against ``tp`` (and bounds in ``meta``) and return the typed value."""
    if tp is dict:
        tp = dict[str, Any]
    elif tp is list:
        tp = list[Any]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise source.error(path, f"expected {describe(tp)}; got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path, source, meta)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise source.error(path, f"expected {describe(tp)}; {_got(value)}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        hint = closest(str(value), [str(a) for a in args]) if isinstance(value, str) else None
        suffix = f" (did you mean {hint!r}?)" if hint else ""
        raise source.error(path, f"expected {describe(tp)}; {_got(value)}{suffix}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise source.error(path, f"expected {describe(tp)}; {_got(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _check_bounds(value, path, source, meta)
        raise source.error(path, f"expected {_bounded('an integer', meta)}; {_got(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise source.error(path, f"expected a finite number; {_got(value)}")
            return _check_bounds(float(value), path, source, meta)
        raise source.error(path, f"expected {_bounded('a number', meta)}; {_got(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise source.error(path, f"expected a string; {_got(value)}")
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, list):
            raise source.error(path, f"expected {describe(tp)}; {_got(value)}")
        item = args[0] if args else Any
        bounds = {k: v for k, v in (meta or {}).items() if k != "min_items"}  # apply per item
        items = [coerce(v, item, path + (i,), source, bounds) for i, v in enumerate(value)]
        if meta and "min_items" in meta and len(items) < meta["min_items"]:
            raise source.error(
                path, f"expected at least {meta['min_items']} item(s); got {len(items)}"
            )
        return items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise source.error(path, f"expected {describe(tp)}; {_got(value)}")
        item = args[1] if args else Any
        for k in value:
            if not isinstance(k, str):  # 1, 1.0 and true would otherwise collide as names
                raise source.error(path + (str(k),), f"keys must be strings; got {k!r} "
                                   f"({_type_name(k)}); quote it")
        return {k: coerce(v, item, path + (k,), source) for k, v in value.items()}
    parse = getattr(tp, "parse", None)
    if callable(parse):  # a type that reads its own syntax (a budget string)
        try:
            return parse(value)
        except ValueError as exc:
            raise source.error(path, str(exc)) from None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, source)
    raise TypeError(f"clsim.validation cannot check values of type {tp!r}")  # a clsim bug


def _bounded(phrase: str, meta: Mapping | None) -> str:
    if not meta:
        return phrase
    parts = []
    if "min" in meta:
        parts.append((">" if meta.get("min_exclusive") else ">=") + f" {meta['min']}")
    if "max" in meta:
        parts.append(f"<= {meta['max']}")
    return f"{phrase} {' and '.join(parts)}" if parts else phrase


def _check_bounds(value: float, path: KeyPath, source: Source, meta: Mapping | None) -> Any:
    if not meta:
        return value
    low = meta.get("min")
    bad_low = low is not None and (value <= low if meta.get("min_exclusive") else value < low)
    bad_high = "max" in meta and value > meta["max"]
    if bad_low or bad_high:
        kind = "an integer" if isinstance(value, int) else "a number"
        raise source.error(path, f"expected {_bounded(kind, meta)}; got {short_repr(value)}")
    return value


def build(cls: type, data: Any, path: KeyPath = (), source: Source | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown and missing keys."""
    source = source or Source()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise source.error(path, f"expected a mapping of options; {_got(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = closest(str(key), fields)
            suffix = f"; did you mean {hint!r}?" if hint else ""
            known = ", ".join(fields) or "none"
            raise source.error(
                path + (str(key),), f"unknown key {str(key)!r} (known keys: {known}){suffix}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], path + (name,), source, f.metadata)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise source.error(
                path + (name,), f"missing required key (expected {describe(hints[name])})"
            )
    instance = cls(**kwargs)
    check = getattr(instance, "check", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            key = getattr(exc, "key", None)  # an OptionError names the key at fault
            where = path + tuple(key.split(".")) if key else path
            raise source.error(where, str(exc)) from None
    return instance


@dataclass(frozen=True)
class OptionDoc:
    name: str
    accepts: str
    default: str
    help: str


def document(cls: type) -> list[OptionDoc]:
    """One row per option of dataclass ``cls``, for ``clsim list`` and the README."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        accepts = _bounded(describe(hints[f.name]), f.metadata)
        rows.append(OptionDoc(f.name, accepts, default, f.metadata.get("help", "")))
    return rows
