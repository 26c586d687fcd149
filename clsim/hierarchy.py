"""Label hierarchies: the tree above a dataset's classes that hierarchical streams expand.

A :class:`Hierarchy` stores, for every dataset class, the index of its ancestor at each
level (coarse to fine; the finest level is the dataset's classes). Hierarchies come from
three places: shipped ones for known datasets (CIFAR-10/100, Fashion-MNIST, Omniglot),
a mapping written under ``stream.hierarchy`` in the scenario, or a YAML file holding the
same mapping. Every problem in a user hierarchy is an :class:`OptionError` whose key is
the dotted path below ``stream`` (``hierarchy.tree.animal.mammal``), so the message
points at the line to fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clsim.data.dataset import Dataset
from clsim.errors import ConfigError, DataError, OptionError
from clsim.files import require_file
from clsim.labels import LabelSpace
from clsim.validation import closest, load_yaml, short_repr

MAX_NODE_NAME = 200
"""Characters in a node name of a user hierarchy (it lands in tables and logs)."""


@dataclass(frozen=True, eq=False)
class Hierarchy:
    """Levels of classes above a dataset's classes, as a table of ancestors.

    :param level_names: coarse to fine; the last names the dataset's classes.
    :param class_names: for each level, the names of its nodes (index = id within level).
    :param path: ``(n_dataset_classes, n_levels)`` int64; ``path[c, l]`` is the index,
        within level ``l``, of dataset class ``c``'s ancestor; ``path[:, -1] == arange``.
    """

    level_names: tuple[str, ...]
    class_names: tuple[tuple[str, ...], ...]
    path: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_names", tuple(str(n) for n in self.level_names))
        object.__setattr__(
            self, "class_names", tuple(tuple(str(n) for n in names) for names in self.class_names)
        )
        path = np.array(self.path, dtype=np.int64, copy=True)
        path.setflags(write=False)  # shared by every stream built from this hierarchy
        object.__setattr__(self, "path", path)
        n_levels = len(self.level_names)
        if n_levels < 1 or len(self.class_names) != n_levels:
            raise ValueError("a hierarchy needs one list of class names per level")
        if len(set(self.level_names)) != n_levels:
            raise ValueError(f"level names repeat: {self.level_names}")
        if path.ndim != 2 or path.shape[1] != n_levels:
            raise ValueError(f"path must be (n_classes, {n_levels}); got {path.shape}")
        if not np.array_equal(path[:, -1], np.arange(path.shape[0])):
            raise ValueError("the finest level must be the dataset's classes in id order")
        for level, size in enumerate(self.sizes):
            column = path[:, level]
            if np.unique(column).tolist() != list(range(size)):
                raise ValueError(
                    f"level {self.level_names[level]!r}: every one of its {size} "
                    "nodes needs at least one class below it"
                )
            if level and not np.array_equal(self._parents(level)[column], path[:, level - 1]):
                raise ValueError(f"level {self.level_names[level]!r}: a node has two parents")

    @property
    def n_levels(self) -> int:
        return len(self.level_names)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(names) for names in self.class_names)

    def _parents(self, level: int) -> np.ndarray:
        """Index within ``level - 1`` of each node of ``level``."""
        parents = np.zeros(self.sizes[level], dtype=np.int64)
        parents[self.path[:, level]] = self.path[:, level - 1]
        return parents

    def select(self, levels: Sequence[str]) -> Hierarchy:
        """Keep ``levels`` (coarse to fine, ending with the dataset's classes)."""
        known = ", ".join(self.level_names)
        if isinstance(levels, str) or not levels:
            raise OptionError(
                "levels", f"expected a list of level names from: {known}; got "
                f"{short_repr(levels)}"
            )
        indices = []
        for name in levels:
            if name not in self.level_names:
                hint = closest(str(name), self.level_names)
                suffix = f"; did you mean {hint!r}?" if hint else ""
                raise OptionError(
                    "levels",
                    f"unknown level {short_repr(name)}; this hierarchy has "
                    f"levels {known} (coarse to fine){suffix}",
                )
            if self.level_names.index(name) in indices:
                raise OptionError("levels", f"level {name!r} is listed twice in "
                                  f"{short_repr(list(levels))}")
            indices.append(self.level_names.index(name))
        if indices != sorted(indices):
            order = [self.level_names[i] for i in sorted(indices)]
            raise OptionError(
                "levels", f"levels go coarse to fine: expected {order}; got "
                f"{short_repr(list(levels))}"
            )
        if indices[-1] != self.n_levels - 1:
            raise OptionError(
                "levels",
                f"the last level must be the dataset's classes "
                f"{self.level_names[-1]!r}; got {short_repr(list(levels))}",
            )
        return Hierarchy(
            tuple(self.level_names[i] for i in indices),
            tuple(self.class_names[i] for i in indices),
            self.path[:, indices],
        )

    def label_space(self, masked: bool = True) -> LabelSpace:
        """The flat label space of a stream over these levels (one id range per level)."""
        parents = [()] + [
            tuple(int(p) for p in self._parents(lv)) for lv in range(1, self.n_levels)
        ]
        return LabelSpace(self.level_names, self.class_names, tuple(parents), masked)

    def ancestor(self, level: int, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Index within ``level`` of the ancestors of dataset class ids ``y`` (same type)."""
        column = self.path[:, level]
        if isinstance(y, torch.Tensor):
            return torch.from_numpy(column.copy()).to(y.device)[y]
        return column[np.asarray(y)]


# ---------------------------------------------------------------- shipped hierarchies

_CIFAR10_TREE: dict[str, Any] = {
    "animal": {
        "mammal": ["cat", "deer", "dog", "horse"],
        "other_animal": ["bird", "frog"],
    },
    "vehicle": {
        "road_vehicle": ["automobile", "truck"],
        "other_vehicle": ["airplane", "ship"],
    },
}
_FASHION_MNIST_TREE: dict[str, Any] = {
    "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt", "Dress"],
    "bottoms": ["Trouser"],
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "bags": ["Bag"],
}
_SHIPPED_TREES: dict[str, dict[str, Any]] = {
    "cifar10": {"levels": ["domain", "group", "class"], "tree": _CIFAR10_TREE},
    "fashion_mnist": {"levels": ["category", "garment"], "tree": _FASHION_MNIST_TREE},
}
_SHIPPED_COARSE: dict[str, tuple[str, str]] = {
    "cifar100": ("superclass", "class"),
    "omniglot": ("alphabet", "character"),
}


def from_coarse_labels(
    dataset: Dataset, level_names: Sequence[str] = ("coarse", "class")
) -> Hierarchy:
    """Two levels read from the dataset's per-sample coarse labels.

    Every class must carry one coarse label throughout (train and test), else the data
    are inconsistent and no tree can be drawn. Coarse names with no class are dropped.
    """
    if dataset.coarse_train is None or dataset.coarse_names is None:
        raise OptionError(
            "hierarchy",
            f"dataset {dataset.name!r} has no coarse labels; give "
            "stream.hierarchy as a mapping or a file",
        )
    if len(level_names) != 2:
        raise ValueError(f"coarse labels give two levels; got names {list(level_names)}")
    y = [dataset.y_train.cpu().numpy()]
    coarse = [dataset.coarse_train.cpu().numpy()]
    if dataset.coarse_test is not None:
        y.append(dataset.y_test.cpu().numpy())
        coarse.append(dataset.coarse_test.cpu().numpy())
    y_all = np.concatenate(y).astype(np.int64)
    c_all = np.concatenate(coarse).astype(np.int64)
    n_fine, n_coarse = dataset.n_classes, len(dataset.coarse_names)
    if len(c_all) and (c_all.min() < 0 or c_all.max() >= n_coarse):
        raise DataError(
            f"dataset {dataset.name!r}: coarse labels must lie in [0, {n_coarse}); "
            f"got {int(c_all.min())}..{int(c_all.max())}"
        )
    pairs = np.unique(y_all * n_coarse + c_all)
    fine, parent = pairs // n_coarse, pairs % n_coarse
    count = np.bincount(fine, minlength=n_fine)
    if (count > 1).any():
        bad = [dataset.class_names[c] for c in np.flatnonzero(count > 1)[:5]]
        raise DataError(
            f"dataset {dataset.name!r}: {int((count > 1).sum())} class(es) carry "
            f"more than one coarse label (e.g. {bad}); the coarse labels form no tree"
        )
    if (count == 0).any():
        bad = [dataset.class_names[c] for c in np.flatnonzero(count == 0)[:5]]
        raise DataError(
            f"dataset {dataset.name!r}: {int((count == 0).sum())} class(es) have no "
            f"samples, so their coarse label is unknown (e.g. {bad})"
        )
    parent_of = np.empty(n_fine, dtype=np.int64)
    parent_of[fine] = parent
    used = np.unique(parent_of)
    remap = np.full(n_coarse, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    path = np.stack([remap[parent_of], np.arange(n_fine)], axis=1)
    names = (tuple(dataset.coarse_names[i] for i in used), tuple(dataset.class_names))
    return Hierarchy(tuple(level_names), names, path)


def shipped_hierarchy(dataset: Dataset) -> Hierarchy | None:
    """The hierarchy clsim ships for ``dataset`` (by its name), or None when it has none.

    Datasets not named here but carrying coarse labels get those as a two-level tree.
    """
    if dataset.name in _SHIPPED_COARSE:
        return from_coarse_labels(dataset, _SHIPPED_COARSE[dataset.name])
    if dataset.name in _SHIPPED_TREES:
        try:
            return hierarchy_from_spec(_SHIPPED_TREES[dataset.name], dataset)
        except OptionError as exc:
            raise OptionError(
                "hierarchy",
                f"the hierarchy shipped for {dataset.name!r} does "
                f"not fit this dataset's class names ({exc}); give "
                "stream.hierarchy as a mapping or a file",
            ) from None
    if dataset.coarse_train is not None and dataset.coarse_names is not None:
        return from_coarse_labels(dataset)
    return None


# ---------------------------------------------------------------- user hierarchies


def _normal(name: str) -> str:
    """Name as matched loosely: case and punctuation ignored ('t-shirt top' == 'T-shirt/top')."""
    return re.sub(r"[^0-9a-z]+", "", name.casefold())


class _ClassLookup:
    """Dataset class references (names, loose names, integer ids) -> class ids."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.names = list(class_names)
        self.exact = {name: i for i, name in enumerate(self.names)}
        loose: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            loose.setdefault(_normal(name), []).append(i)
        self.loose = {k: v[0] for k, v in loose.items() if len(v) == 1}

    def find(self, ref: Any, key: str) -> int:
        n = len(self.names)
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise OptionError(key, "expected a class name or an integer id; got "
                              f"{short_repr(ref)}")
        if isinstance(ref, int):
            if not 0 <= ref < n:
                raise OptionError(
                    key, f"class id {short_repr(ref)} out of range: the dataset has {n} "
                    f"classes, ids 0..{n - 1}"
                )
            return ref
        if ref in self.exact:
            return self.exact[ref]
        if _normal(ref) in self.loose:
            return self.loose[_normal(ref)]
        hint = closest(ref, self.names)
        suffix = f"; did you mean {hint!r}?" if hint else ""
        shown = ", ".join(self.names[:12]) + (", ..." if n > 12 else "")
        raise OptionError(key, f"unknown class {short_repr(ref)} (the dataset's classes: "
                          f"{shown}){suffix}")


def _node_name(name: Any, key: str) -> str:
    """A node name: a non-empty line of printable text, short enough for a table."""
    if isinstance(name, bool) or not isinstance(name, str) or not name:
        hint = " (YAML reads unquoted yes/no/on/off as booleans)" if isinstance(name, bool) else ""
        raise OptionError(
            key, f"node names must be non-empty strings; got {short_repr(name)}{hint}; quote it"
        )
    if len(name) > MAX_NODE_NAME or not name.isprintable():
        raise OptionError(
            key, f"node names are one line of at most {MAX_NODE_NAME} printable characters; "
            f"got {short_repr(name)} ({len(name):,} characters)"
        )
    return name


def hierarchy_from_spec(spec: Mapping[str, Any], dataset: Dataset) -> Hierarchy:
    """A hierarchy from ``{levels: [...], tree: {...}}`` as written under ``stream.hierarchy``.

    ``tree`` nests ``len(levels) - 1`` levels of mappings; the innermost values are lists
    of dataset classes (names or integer ids). Each class appears exactly once.
    """
    if not isinstance(spec, Mapping):
        raise OptionError(
            "hierarchy", f"expected a mapping with 'levels' and 'tree'; got {type(spec).__name__}"
        )
    for key in spec:
        if key not in ("levels", "tree"):
            hint = closest(str(key), ["levels", "tree"])
            suffix = f"; did you mean {hint!r}?" if hint else ""
            raise OptionError(
                f"hierarchy.{key}",
                f"unknown key {short_repr(key)} (known keys: levels, tree){suffix}",
            )
    for key in ("levels", "tree"):
        if key not in spec:
            raise OptionError(
                f"hierarchy.{key}",
                "missing required key (a hierarchy needs "
                "'levels', its level names coarse to fine, and 'tree')",
            )
    levels = spec["levels"]
    if (
        not isinstance(levels, list)
        or len(levels) < 2
        or any(isinstance(v, bool) or not isinstance(v, str) or not v for v in levels)
    ):
        raise OptionError(
            "hierarchy.levels",
            "expected a list of at least 2 level names, "
            f"coarse to fine, the last naming the dataset's classes; got {short_repr(levels)}",
        )
    if len(set(levels)) != len(levels):
        raise OptionError("hierarchy.levels", f"level names must differ; got "
                          f"{short_repr(levels)}")
    tree = spec["tree"]
    if not isinstance(tree, Mapping) or not tree:
        raise OptionError(
            "hierarchy.tree",
            f"expected a non-empty mapping of top-level {short_repr(levels[0])} nodes; got "
            f"{short_repr(tree)}",
        )

    depth = len(levels) - 1  # mapping levels above the class lists
    lookup = _ClassLookup(dataset.class_names)
    n = dataset.n_classes
    names: list[list[str]] = [[] for _ in range(depth)]
    where: list[dict[str, str]] = [{} for _ in range(depth)]  # node name -> its key path
    path = np.full((n, len(levels)), -1, dtype=np.int64)
    listed_at: dict[int, str] = {}

    def walk(node: Any, level: int, key: str, above: list[int]) -> None:
        if level < depth:
            if isinstance(node, list):
                raise OptionError(
                    "hierarchy.levels",
                    f"{len(levels)} levels {short_repr(levels)} need "
                    f"{depth} level(s) of mappings above the class lists, but "
                    f"{key} is a list at depth {level}",
                )
            if not isinstance(node, Mapping) or not node:
                raise OptionError(
                    key, f"expected a non-empty mapping of {short_repr(levels[level])} "
                    f"nodes; got {short_repr(node)}"
                )
            for child_name, child in node.items():
                name = _node_name(child_name, key)
                child_key = f"{key}.{name}"
                if name in where[level]:
                    raise OptionError(
                        child_key,
                        f"{short_repr(levels[level])} {name!r} appears twice "
                        f"(also at {where[level][name]}); names must be unique "
                        "within a level",
                    )
                where[level][name] = child_key
                names[level].append(name)
                walk(child, level + 1, child_key, above + [len(names[level]) - 1])
            return
        if isinstance(node, Mapping):
            raise OptionError(
                "hierarchy.levels",
                f"{len(levels)} levels {short_repr(levels)} need "
                f"{depth} level(s) of mappings above the class lists, but {key} "
                f"is a mapping at depth {level}; add a level name or flatten it",
            )
        if not isinstance(node, list) or not node:
            raise OptionError(
                key, f"expected a non-empty list of classes (names or ids); got "
                f"{short_repr(node)}"
            )
        for i, ref in enumerate(node):
            c = lookup.find(ref, key)
            if c in listed_at:
                raise OptionError(
                    key,
                    f"class {dataset.class_names[c]!r} (id {c}) is listed "
                    f"twice: here (item {i}) and at {listed_at[c]}",
                )
            listed_at[c] = key
            path[c, :-1] = above
            path[c, -1] = c

    walk(tree, 0, "hierarchy.tree", [])
    missing = np.flatnonzero(path[:, -1] < 0)
    if len(missing):
        shown = ", ".join(repr(dataset.class_names[c]) for c in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise OptionError(
            "hierarchy.tree",
            f"every one of the dataset's {n} classes must be "
            f"listed once; {len(missing)} missing: {shown}{more}",
        )
    class_names = [tuple(level_names) for level_names in names] + [tuple(dataset.class_names)]
    return Hierarchy(tuple(levels), tuple(class_names), path)


def load_hierarchy_file(path: str | os.PathLike[str], dataset: Dataset) -> Hierarchy:
    """A hierarchy from a YAML file holding ``{levels: [...], tree: {...}}``.

    The file is read as a scenario is: a named pipe, a device or a symlink loop is refused
    before it is opened, and its YAML is plain data of bounded size (no object tags, no
    alias bombs, no duplicate keys); every message names the file."""
    path = os.fspath(path)
    try:
        spec, _ = load_yaml(_read_hierarchy_text(path), path)
    except ConfigError as exc:  # from load_yaml, it starts with the file and line
        prefix = "" if exc.source is None else "hierarchy file "
        raise OptionError("hierarchy", f"{prefix}{exc}") from None
    if not isinstance(spec, dict):
        raise OptionError(
            "hierarchy",
            f"hierarchy file {path}: expected a mapping with "
            f"'levels' and 'tree'; got {type(spec).__name__}",
        )
    try:
        return hierarchy_from_spec(spec, dataset)
    except OptionError as exc:
        inner = exc.key.removeprefix("hierarchy").lstrip(".") or "(top)"
        raise OptionError("hierarchy", f"hierarchy file {path}: {inner}: {exc}") from None


def _read_hierarchy_text(path: str) -> str:
    """The file's text, or a ConfigError naming it (missing, not a regular file, not
    readable, not UTF-8)."""
    require_file(path, "hierarchy file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read hierarchy file {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"hierarchy file {path} is not UTF-8 text (byte {exc.start}); "
                          "save it as UTF-8") from None


def resolve_hierarchy(option: str | dict | None, dataset: Dataset) -> Hierarchy:
    """``stream.hierarchy``: None -> shipped, a mapping -> that tree, a string -> a file."""
    if option is None:
        found = shipped_hierarchy(dataset)
        if found is None:
            raise OptionError(
                "hierarchy",
                f"dataset {dataset.name!r} ships no hierarchy; give "
                "stream.hierarchy as a mapping or a file",
            )
        return found
    if isinstance(option, Mapping):
        return hierarchy_from_spec(option, dataset)
    if isinstance(option, (str, os.PathLike)):
        return load_hierarchy_file(option, dataset)
    raise OptionError(
        "hierarchy",
        f"expected a mapping ({{levels, tree}}), a file path or null; got {short_repr(option)}",
    )
