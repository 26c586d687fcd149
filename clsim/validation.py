"""Turn parsed YAML into typed dataclasses, or say exactly what is wrong and where.

Constraints are data: a dataclass field's type annotation says which forms it accepts
(``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``list[T]``,
``dict[str, T]``, nested dataclasses, or a class with a ``parse`` classmethod), and its
``metadata`` may add ``min`` / ``max`` bounds (``min_exclusive`` / ``max_exclusive`` for
strict bounds; on a list they bound each item), ``min_items`` / ``max_items`` for a list,
``max_length`` and ``text: "line"`` (printable, one line) for a string, and a one-line
``help``. A dataclass may define ``check(self)`` for cross-field rules; it
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

import yaml

from clsim.errors import ConfigError
from clsim.text import bounded_message, short_repr

KeyPath = tuple[str | int, ...]


def format_path(path: KeyPath) -> str:
    """('strategies', 'er', 'plugins', 0) -> 'strategies.er.plugins[0]'.

    A key that is very long or holds a line break is shown quoted and cut, so the key
    path of a message stays one short line."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        shown = _shown_key(str(part))
        out += f".{shown}" if out else shown
    return out


def _shown_key(key: str, limit: int = 60) -> str:
    return key if len(key) <= limit and key.isprintable() else short_repr(key, limit)


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate nearest to ``name`` (for 'did you mean'); None for a long name, which
    is no typo and would make the comparison slow."""
    if len(str(name)) > 200:
        return None
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
            bounded_message(message), source=self.name, key_path=format_path(path) or None,
            line=self.line_of(path),
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
            return _check_text(value, path, source, meta)
        raise source.error(path, f"expected a string; {_got(value)}")
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, list):
            raise source.error(path, f"expected {describe(tp)}; {_got(value)}")
        item = args[0] if args else Any
        _check_length(value, path, source, meta)
        bounds = {k: v for k, v in (meta or {}).items() if k not in _LIST_KEYS}  # per item
        return [coerce(v, item, path + (i,), source, bounds) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise source.error(path, f"expected {describe(tp)}; {_got(value)}")
        item = args[1] if args else Any
        for k in value:
            if not isinstance(k, str):  # 1, 1.0 and true would otherwise collide as names
                raise source.error(path + (str(k),), f"keys must be strings; got {short_repr(k)} "
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


_LIST_KEYS = ("min_items", "max_items")


def _check_length(value: list, path: KeyPath, source: Source, meta: Mapping | None) -> None:
    """``min_items`` / ``max_items`` of a list, checked before its items are."""
    meta = meta or {}
    if "min_items" in meta and len(value) < meta["min_items"]:
        raise source.error(path, f"expected at least {meta['min_items']} item(s); "
                           f"got {len(value)}")
    if "max_items" in meta and len(value) > meta["max_items"]:
        raise source.error(path, f"expected at most {meta['max_items']:,} item(s); "
                           f"got {len(value):,}")


def _check_text(value: str, path: KeyPath, source: Source, meta: Mapping | None) -> str:
    """``max_length`` of a string, and ``text: "line"``: one line of printable characters
    (a name that lands in file names, tables and logs)."""
    meta = meta or {}
    if "max_length" in meta and len(value) > meta["max_length"]:
        raise source.error(path, f"expected at most {meta['max_length']:,} characters; got "
                           f"{len(value):,}: {short_repr(value)}")
    if meta.get("text") == "line" and not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise source.error(path, f"expected one line of printable characters; got "
                           f"{short_repr(value)}, which holds the character {bad!r}")
    return value


def _bounded(phrase: str, meta: Mapping | None) -> str:
    if not meta:
        return phrase
    parts = []
    if "min" in meta:
        parts.append((">" if meta.get("min_exclusive") else ">=") + f" {meta['min']}")
    if "max" in meta:
        parts.append(("<" if meta.get("max_exclusive") else "<=") + f" {meta['max']}")
    return f"{phrase} {' and '.join(parts)}" if parts else phrase


def _check_bounds(value: float, path: KeyPath, source: Source, meta: Mapping | None) -> Any:
    if not meta:
        return value
    low, high = meta.get("min"), meta.get("max")
    bad_low = low is not None and (value <= low if meta.get("min_exclusive") else value < low)
    bad_high = high is not None and (value >= high if meta.get("max_exclusive")
                                     else value > high)
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
                path + (str(key),),
                f"unknown key {short_repr(str(key))} (known keys: {known}){suffix}",
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


# ---------------------------------------------------------------------------
# reading YAML: plain data only, every key's line, bounded work
# ---------------------------------------------------------------------------

ALIAS_LIMIT = 100_000
"""Values that aliases (``*name`` and ``<<: *name``) may repeat in one document: far above
what a scenario or hierarchy needs, far below what hangs the checks ('billion laughs')."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every alias use (for messages) and merges
    ``<<`` keys as YAML says: a key written in the mapping wins over a merged one, and an
    earlier merged mapping over a later one (PyYAML's own merge varies with the key)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_uses: list[tuple[str, int]] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self.alias_uses.append((event.anchor, event.start_mark.line + 1))
        return super().compose_node(parent, index)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Called by the constructor on every mapping: its merged, final pairs."""
        node.value = [(k, v) for _, k, v in _mapping_items(node, (), "<yaml>")]


def load_yaml(text: str, source: str) -> tuple[Any, dict[KeyPath, int]]:
    """The plain data of a YAML document and the line of each key path in it.

    Refused, each as a :class:`ConfigError` naming ``source``, the line and key path:
    syntax errors, tags that construct objects, scalars their tag cannot read, duplicate
    keys, aliases that repeat more than :data:`ALIAS_LIMIT` values or name a value they
    are inside of, and nesting deeper than Python's recursion limit.
    """
    try:
        loader = YamlLoader(text)  # the reader refuses control characters here
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_aliases(node, loader.alias_uses, source)
        lines: dict[KeyPath, int] = {}
        _collect_lines(node, (), lines, source, set())
        return loader.construct_document(node), lines
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply (or refers to itself)",
                          source=source) from None
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in str(problem):
        problem = f"{problem} (YAML tags that construct objects are not allowed)"
    return ConfigError(f"invalid YAML: {bounded_message(problem, 300)}", source=source,
                       line=line)


def _node_children(node: yaml.Node, path: KeyPath) -> typing.Iterator[tuple[yaml.Node, KeyPath]]:
    """Each child node with its key path, in document order (keys before their values)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            yield key_node, path
            yield value_node, path + (_key_text(key_node),)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield item, path + (index,)


def _key_text(key_node: yaml.Node) -> str:
    if isinstance(key_node, yaml.ScalarNode):
        return key_node.value
    return f"<a {_NODE_KINDS.get(type(key_node), 'value')} as a key>"


_NODE_KINDS = {yaml.MappingNode: "mapping", yaml.SequenceNode: "list"}


def _check_aliases(root: yaml.Node, uses: list[tuple[str, int]], source: str) -> None:
    """Refuse aliases that repeat more than :data:`ALIAS_LIMIT` values in all, or that
    name a value they are inside of. Each node's expanded size is counted once
    (memoised), so the check costs no more than the file's size."""
    sizes: dict[int, int] = {}
    seen: set[int] = set()
    open_nodes: set[int] = set()
    uses_left = iter(uses)
    repeated = 0

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            children = [child for child, _ in _node_children(node, ())]
            sizes[id(node)] = min(ALIAS_LIMIT + 1, 1 + sum(size(c) for c in children))
        return sizes[id(node)]

    def walk(node: yaml.Node, path: KeyPath) -> None:
        nonlocal repeated
        seen.add(id(node))
        open_nodes.add(id(node))
        for child, child_path in _node_children(node, path):
            if id(child) not in seen:
                walk(child, child_path)
                continue
            anchor, line = next(uses_left, ("?", None))  # the parser's order is this walk's
            where = {"source": source, "key_path": format_path(child_path) or None,
                     "line": line}
            if id(child) in open_nodes:
                raise ConfigError(f"the alias *{short_repr(anchor)[1:-1]} is used inside the "
                                  "value it names, so that value would never end", **where)
            repeated += size(child)
            if repeated > ALIAS_LIMIT:
                raise ConfigError(
                    f"aliases repeat more than {ALIAS_LIMIT:,} values in this document "
                    f"(*{short_repr(anchor)[1:-1]} here repeats "
                    f"{_count(size(child))} values); such 'alias bombs' are refused: write "
                    "the values out, or use fewer aliases", **where)
        open_nodes.discard(id(node))

    walk(root, ())


def _count(size: int) -> str:
    return f"more than {ALIAS_LIMIT:,}" if size > ALIAS_LIMIT else f"{size:,}"


def _collect_lines(
    node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], source: str, entered: set[int]
) -> None:
    """Key path -> line, entering each node once (an alias is not expanded again), and
    refusing tags and duplicate keys on the way."""
    lines[path] = node.start_mark.line + 1
    if id(node) in entered:
        return
    entered.add(id(node))
    _refuse_tag(node, path, source)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # its tags and keys are checked where written
                _collect_lines(value_node, path + ("<<",), lines, source, entered)
        for key, key_node, value_node in _mapping_items(node, path, source):
            _collect_lines(value_node, path + (key,), lines, source, entered)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, path + (index,), lines, source, entered)


def _mapping_items(
    node: yaml.MappingNode, path: KeyPath, source: str
) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """(key, key node, value node) of a mapping after its ``<<`` merges: merged keys
    first, an earlier merged mapping winning over a later, a written key over both. A key
    written twice is refused (YAML would silently keep the last)."""
    written: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    merges = 0
    for key_node, value_node in node.value:
        is_merge = key_node.tag == _MERGE_TAG
        if not is_merge:
            _refuse_tag(key_node, path, source)
        key = "<<" if is_merge else _key_text(key_node)
        merges += is_merge
        if (key in written and not is_merge) or merges > 1 and is_merge:
            raise ConfigError(
                f"duplicate key {short_repr(key)} (each key may appear once in a mapping)",
                source=source, key_path=format_path(path + (key,)),
                line=key_node.start_mark.line + 1,
            )
        if not is_merge:
            written[key] = (key_node, value_node)
            continue
        for source_node in _merge_sources(value_node, path, source):
            for name, name_node, value in _mapping_items(source_node, path, source):
                merged.setdefault(name, (name_node, value))
    return [(key, *pair) for key, pair in {**merged, **written}.items()]


def _merge_sources(value: yaml.Node, path: KeyPath, source: str) -> list[yaml.MappingNode]:
    """The mappings a ``<<`` key merges: one mapping, or a list of them."""
    items = value.value if isinstance(value, yaml.SequenceNode) else [value]
    for item in items:
        if not isinstance(item, yaml.MappingNode):
            kind = _NODE_KINDS.get(type(item), "plain value")
            raise ConfigError(
                f"a merge key '<<' takes a mapping (such as *defaults) or a list of "
                f"mappings; got a {kind}", source=source,
                key_path=format_path(path + ("<<",)), line=item.start_mark.line + 1,
            )
    return items


def _refuse_tag(node: yaml.Node, path: KeyPath, source: str) -> None:
    """A tag the safe loader cannot construct (``!!python/object/apply:os.system``,
    ``!include``) is refused at its key path, before anything is constructed; so is a
    scalar its tag cannot read (``!!int fuzz``, a timestamp ``2001-13-45``), which PyYAML
    would report as a bare ValueError."""
    where = {"source": source, "key_path": format_path(path) or None,
             "line": node.start_mark.line + 1}
    tag = node.tag.replace("tag:yaml.org,2002:", "!!", 1)
    if node.tag not in YamlLoader.yaml_constructors:
        raise ConfigError(
            f"invalid YAML: the tag {short_repr(tag)} is not allowed (clsim reads plain data; "
            "tags that construct objects are refused)", **where,
        )
    if isinstance(node, yaml.ScalarNode):
        try:
            YamlLoader.yaml_constructors[node.tag](yaml.constructor.SafeConstructor(), node)
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
                yaml.YAMLError):
            raise ConfigError(f"invalid YAML: {short_repr(node.value)} is not a valid {tag}",
                              **where) from None
