"""Property-based tests of the scenario loader: whatever a file holds, loading it gives a
valid config or a ConfigError naming the file, never another exception."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from helpers import REPO_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clsim.config import ScenarioConfig, load_scenario, parse_scenario
from clsim.errors import ClsimError

SOURCE = "fuzzed.yaml"

# every key the loader knows somewhere, so added keys sometimes land on a real option
KNOWN_KEYS = [
    "name", "seed", "threads", "device", "data", "dataset", "root", "path", "stream", "type",
    "n_experiences", "increment", "initial_increment", "class_order", "online", "eval_every",
    "boundaries", "model", "hidden", "training", "epochs", "batch_size", "optimizer", "lr",
    "momentum", "budget", "strict", "strategies", "plugins", "replay", "selection", "capacity",
    "naive", "compare", "budgets", "seeds", "aligned",
]
TAGS = [
    "!!python/object/apply:os.system", "!!python/name:os.system", "!!python/tuple", "!!binary",
    "!!set", "!!omap", "!!pairs", "!!timestamp", "!!float", "!!int", "!!str", "!!bool",
    "!!null", "!!map", "!!seq", "!include", "!custom",
]

VALID = {
    "name": "fuzz",
    "seed": 3,
    "data": {"dataset": "digits"},
    "stream": {"type": "class_incremental", "n_experiences": 5,
               "class_order": [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]},
    "model": {"name": "mlp", "hidden": [16, 8]},
    "training": {"epochs": 2, "batch_size": 32,
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    "budget": "model + 100 exemplars",
    "strict": False,
    "strategies": {
        "naive": {"plugins": ["naive"]},
        "replay": {"budget": "64KB", "plugins": [{"replay": {"selection": "herding",
                                                             "capacity": 50}}]},
    },
    "compare": {"budgets": ["32KB", {"aligned": "64KB"}], "seeds": [0, 1],
                "strategies": ["naive", "replay"]},
}


# every bundled scenario too: their stream types and plugins have options of their own
BASES = [VALID] + [
    yaml.safe_load(path.read_text(encoding="utf-8"))
    for path in sorted((REPO_ROOT / "scenarios").glob("*.yaml"))
]


def loads(text: str, source: str = SOURCE) -> ScenarioConfig | None:
    """The loader's answer: a config, or None after checking the error is ours and named."""
    try:
        config = parse_scenario(text, source=source)
    except ClsimError as exc:
        assert str(exc).startswith(source), str(exc)
        return None
    assert isinstance(config, ScenarioConfig)
    return config


# ---------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(KNOWN_KEYS + ["48KB", "model", "-1", "1e400", "digits", "mlp", "sgd"]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12), st.integers(-3, 3),
                 st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Every position in a parsed document: () is the root, then keys and list indices."""
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, path + (index,))
    return out


def _at(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


@st.composite
def mutated_scenarios(draw: st.DrawFn) -> str:
    """A valid scenario after 1-3 random edits: a replaced value, a deleted key, an
    added key at any level, or a YAML tag put in front of a value."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    tag_line = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "delete", "add", "tag"]))
        positions = _paths(doc)
        if kind == "replace":
            path = draw(st.sampled_from(positions))
            if not path:
                doc = draw(values)
                break
            _at(doc, path[:-1])[path[-1]] = draw(values)
        elif kind == "delete":
            keyed = [p for p in positions if p and isinstance(_at(doc, p[:-1]), dict)]
            if keyed:
                path = draw(st.sampled_from(keyed))
                del _at(doc, path[:-1])[path[-1]]
        elif kind == "add":
            maps = [p for p in positions if isinstance(_at(doc, p), dict)]
            if maps:
                _at(doc, draw(st.sampled_from(maps)))[draw(keys)] = draw(values)
        else:
            tag_line = draw(st.integers(0, 60)), draw(st.sampled_from(TAGS))
    text = yaml.safe_dump(doc, sort_keys=False)
    if tag_line is not None:  # 'key: value' -> 'key: !tag value' on one line
        lines = text.splitlines()
        index, tag = tag_line
        candidates = [i for i, line in enumerate(lines) if ": " in line or line.startswith("- ")]
        if candidates:
            i = candidates[index % len(candidates)]
            sep = ": " if ": " in lines[i] else "- "
            head, _, rest = lines[i].partition(sep)
            lines[i] = f"{head}{sep}{tag} {rest}"
        text = "\n".join(lines) + "\n"
    return text


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_in_a_file_never_crash_the_loader(tmp_path_factory, raw):
    """From a file (the path ``clsim validate`` takes): bytes that are not UTF-8, not
    YAML or not a scenario are all one ConfigError that starts with the file's path."""
    path = tmp_path_factory.getbasetemp() / "fuzzed.yaml"
    path.write_bytes(raw)
    try:
        load_scenario(path)
    except ClsimError as exc:
        assert str(exc).startswith(str(path)), str(exc)


@FUZZ
@given(st.text(max_size=300))
def test_random_text_never_crashes_the_loader(text):
    loads(text)


@FUZZ
@given(st.text(alphabet="{}[]:,-&*!|>'\"#%@` \n\tabc01.?", max_size=120))
def test_yaml_punctuation_soup_never_crashes_the_loader(text):
    """Text made of YAML's own syntax characters reaches the parser's odd corners."""
    loads(text)


@FUZZ
@given(values)
def test_any_plain_document_never_crashes_the_loader(doc):
    loads(yaml.safe_dump(doc))


@FUZZ
@given(st.dictionaries(st.sampled_from(KNOWN_KEYS), values, max_size=8))
def test_documents_of_known_top_level_keys_never_crash_the_loader(doc):
    """Top-level keys clsim knows, with any values: the typed checks run on all of them."""
    loads(yaml.safe_dump(doc))


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated_scenarios())
def test_mutated_valid_scenario_loads_or_fails_cleanly(text):
    loads(text)


def test_the_base_scenarios_are_valid():
    """The mutations start from scenarios that load, so each one tests its own changes."""
    assert len(BASES) > 20
    for base in BASES:
        assert loads(yaml.safe_dump(base, sort_keys=False)) is not None, base.get("name")
    config = loads(yaml.safe_dump(VALID, sort_keys=False))
    assert config.strategies["replay"].plugins[0].options.capacity == 50


# valid edits: key path -> values the loader must accept and keep exactly
VALID_EDITS = {
    ("seed",): st.integers(min_value=0, max_value=2**63 - 1),
    ("training", "epochs"): st.integers(min_value=1, max_value=10_000),
    ("training", "optimizer", "lr"): st.floats(min_value=0, max_value=1e4, exclude_min=True),
    ("training", "optimizer", "momentum"): st.floats(min_value=0, max_value=1),
    ("budget",): st.integers(min_value=1, max_value=2**50),
    ("description",): st.text(max_size=40),
    ("strategies", "replay", "plugins", 0, "replay", "capacity"): st.integers(1, 10**12),
    ("compare", "seeds"): st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=5,
                                   unique=True),
}


@settings(max_examples=120, deadline=None, derandomize=True)
@given(st.data())
def test_a_valid_edit_still_loads_and_keeps_the_value(data):
    """Any value inside a key's documented range loads, and comes back unchanged while
    every other key keeps its value."""
    path = data.draw(st.sampled_from(sorted(VALID_EDITS, key=str)))
    value = data.draw(VALID_EDITS[path])
    doc = copy.deepcopy(VALID)
    _at(doc, path[:-1])[path[-1]] = value
    config = loads(yaml.safe_dump(doc, sort_keys=False))
    assert config is not None, (path, value)
    base = loads(yaml.safe_dump(VALID, sort_keys=False)).to_dict()
    plain = config.to_dict()
    if path == ("budget",):  # kept as written, and resolved to the same bytes
        assert (plain["strategies"]["naive"]["budget"], config.strategies["naive"].budget.bytes) \
            == (str(value), value)
    else:
        assert _resolved(plain, path) == value
    for section in base:
        if section != path[0] and not (path == ("budget",) and section == "strategies"):
            assert plain[section] == base[section], section


def _resolved(plain: dict, path: tuple) -> Any:
    """Where an edited key lands in ``ScenarioConfig.to_dict()``."""
    if path[0] == "strategies":  # plugins are [{ref: options}] there, as in the YAML
        return plain["strategies"]["replay"]["plugins"][0]["replay"]["capacity"]
    node: Any = plain
    for part in path:
        node = node[part]
    return node


@pytest.mark.parametrize("value", [-1, 2**63, 1.0, True, "3", None, [3]])
def test_invalid_seeds_are_config_errors_at_the_seed_key(value):
    """The counterpart of the valid-edit property: out-of-range or mistyped seeds fail at
    the key 'seed' (and nowhere else)."""
    doc = {**copy.deepcopy(VALID), "seed": value}
    with pytest.raises(ClsimError) as info:
        parse_scenario(yaml.safe_dump(doc, sort_keys=False), source=SOURCE)
    assert info.value.key_path == "seed"
    assert str(info.value).startswith(f"{SOURCE}:2: seed: ")
