"""Label hierarchies (shipped, inline, from a file) and the hierarchical (HLE) builder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import stream_hash

from clsim.data import load_dataset
from clsim.data.dataset import Dataset
from clsim.data.idx import FASHION_MNIST_CLASSES
from clsim.data.images import CIFAR10_CLASSES
from clsim.errors import DataError, OptionError
from clsim.hierarchy import (
    Hierarchy,
    from_coarse_labels,
    hierarchy_from_spec,
    load_hierarchy_file,
    resolve_hierarchy,
    shipped_hierarchy,
)
from clsim.streams.hierarchical import HierarchicalOptions, hierarchical
from clsim.validation import build

PARITY = {"levels": ["parity", "digit"], "tree": {"even": [0, 2, 4, 6, 8], "odd": [1, 3, 5, 7, 9]}}
THREE = {
    "levels": ["size", "parity", "digit"],
    "tree": {
        "low": {"low_even": [0, 2, 4], "low_odd": [1, 3]},
        "high": {"high_even": [6, 8], "high_odd": [5, 7, 9]},
    },
}
CIFAR10_SPEC = {
    "levels": ["domain", "group", "class"],
    "tree": {
        "animal": {"mammal": ["cat", "deer", "dog", "horse"], "other_animal": ["bird", "frog"]},
        "vehicle": {"road_vehicle": ["automobile", "truck"], "other_vehicle": ["airplane", "ship"]},
    },
}


def synthetic(
    name: str, class_names, *, per_class=6, test_per_class=2, coarse=None, coarse_names=None
) -> Dataset:
    """x holds each sample's own index, so streams can be traced back to the dataset."""
    n = len(class_names)
    y_train = torch.arange(n).repeat(per_class)
    y_test = torch.arange(n).repeat(test_per_class)
    extra = {}
    if coarse is not None:
        table = torch.tensor(coarse)
        extra = {
            "coarse_train": table[y_train],
            "coarse_test": table[y_test],
            "coarse_names": tuple(coarse_names),
        }
    return Dataset(
        name,
        torch.arange(len(y_train)).unsqueeze(1),
        y_train,
        torch.arange(len(y_test)).unsqueeze(1),
        y_test,
        tuple(class_names),
        **extra,
    )


@pytest.fixture(scope="module")
def digits() -> Dataset:
    """Real digits labels, with x replaced by sample indices to trace samples."""
    ds = load_dataset("digits")
    return replace(
        ds,
        x_train=torch.arange(len(ds.y_train)).unsqueeze(1),
        x_test=torch.arange(len(ds.y_test)).unsqueeze(1),
    )


def names_of(h: Hierarchy, level: int, classes) -> list[str]:
    return [h.class_names[level][h.path[c, level]] for c in classes]


# ------------------------------------------------------------------ hierarchies


def test_shipped_cifar10_matches_names_not_ids():
    ds = synthetic("cifar10", tuple(reversed(CIFAR10_CLASSES)))  # ids differ from canonical
    h = shipped_hierarchy(ds)
    assert h.level_names == ("domain", "group", "class")
    assert h.class_names[0] == ("animal", "vehicle")
    ids = {name: i for i, name in enumerate(ds.class_names)}
    for name in ("cat", "deer", "dog", "horse"):
        assert names_of(h, 1, [ids[name]]) == ["mammal"]
        assert names_of(h, 0, [ids[name]]) == ["animal"]
    assert names_of(h, 1, [ids["bird"], ids["frog"]]) == ["other_animal"] * 2
    assert names_of(h, 1, [ids["automobile"], ids["truck"]]) == ["road_vehicle"] * 2
    assert names_of(h, 1, [ids["airplane"], ids["ship"]]) == ["other_vehicle"] * 2
    assert names_of(h, 0, [ids["ship"]]) == ["vehicle"]
    assert np.array_equal(h.path[:, -1], np.arange(10))
    assert h.sizes == (2, 4, 10)


def test_shipped_fashion_mnist():
    ds = synthetic("fashion_mnist", FASHION_MNIST_CLASSES)
    h = shipped_hierarchy(ds)
    assert h.level_names == ("category", "garment")
    got = {name: names_of(h, 0, [i])[0] for i, name in enumerate(ds.class_names)}
    assert got == {
        "T-shirt/top": "tops",
        "Pullover": "tops",
        "Coat": "tops",
        "Shirt": "tops",
        "Dress": "tops",
        "Trouser": "bottoms",
        "Sandal": "footwear",
        "Sneaker": "footwear",
        "Ankle boot": "footwear",
        "Bag": "bags",
    }


def test_shipped_hierarchy_that_does_not_fit_the_names():
    ds = synthetic("cifar10", [f"c{i}" for i in range(10)])
    with pytest.raises(OptionError) as err:
        shipped_hierarchy(ds)
    assert err.value.key == "hierarchy"
    assert "cifar10" in str(err.value)


@pytest.mark.parametrize(
    ("name", "levels"),
    [("cifar100", ("superclass", "class")), ("omniglot", ("alphabet", "character"))],
)
def test_shipped_from_coarse_labels(name, levels):
    coarse = [1, 0, 1, 2, 0, 2]  # coarse name 3 ("unused") has no class and is dropped
    ds = synthetic(
        name, [f"f{i}" for i in range(6)], coarse=coarse, coarse_names=["a", "b", "c", "unused"]
    )
    h = shipped_hierarchy(ds)
    assert h.level_names == levels
    assert h.class_names == (("a", "b", "c"), tuple(ds.class_names))
    assert h.path.tolist() == [[p, i] for i, p in enumerate(coarse)]
    # a dataset with another name but coarse labels still gets its two levels
    other = shipped_hierarchy(replace(ds, name="custom"))
    assert other.level_names == ("coarse", "class")
    assert np.array_equal(other.path, h.path)


def test_inconsistent_coarse_labels_are_a_data_error():
    ds = synthetic("cifar100", ["x", "y"], coarse=[0, 1], coarse_names=["a", "b"])
    bad = ds.coarse_train.clone()
    bad[0] = 1 - bad[0]
    with pytest.raises(DataError, match="more than one coarse label"):
        from_coarse_labels(replace(ds, coarse_train=bad))


def test_user_spec_by_names_and_by_ids(digits):
    by_ids = hierarchy_from_spec(PARITY, digits)
    by_names = hierarchy_from_spec(
        {
            "levels": ["parity", "digit"],
            "tree": {"even": ["0", "2", "4", "6", "8"], "odd": ["1", "3", "5", "7", "9"]},
        },
        digits,
    )
    assert np.array_equal(by_ids.path, by_names.path)
    assert by_ids.path[:, 0].tolist() == [0, 1] * 5
    assert by_ids.class_names == (("even", "odd"), digits.class_names)


def test_three_level_spec_and_label_space(digits):
    h = hierarchy_from_spec(THREE, digits)
    assert h.sizes == (2, 4, 10)
    assert h.path[:, 0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert h.path[:, 1].tolist() == [0, 1, 0, 1, 0, 3, 2, 3, 2, 3]
    space = h.label_space()
    assert space.masked and space.level_names == ("size", "parity", "digit")
    assert space.parents == ((), (0, 0, 1, 1), (0, 1, 0, 1, 0, 3, 2, 3, 2, 3))
    table = space.ancestors()
    for c in range(10):
        assert table[space.flat_id(2, c)].tolist() == [
            space.flat_id(lv, int(h.path[c, lv])) for lv in range(3)
        ]
    y = torch.tensor([9, 0, 6])
    assert h.ancestor(1, y).tolist() == [3, 0, 2]
    assert h.ancestor(0, np.array([9, 0])).tolist() == [1, 0]
    sub = h.select(["size", "digit"])
    assert sub.label_space().parents == ((), tuple(h.path[:, 0].tolist()))


def test_cifar10_spec_equals_shipped():
    ds = synthetic("cifar10", CIFAR10_CLASSES)
    assert np.array_equal(hierarchy_from_spec(CIFAR10_SPEC, ds).path, shipped_hierarchy(ds).path)


def spec_error(spec, ds) -> OptionError:
    with pytest.raises(OptionError) as err:
        hierarchy_from_spec(spec, ds)
    return err.value


def test_unknown_class_suggests_close_match():
    ds = synthetic("cifar10", CIFAR10_CLASSES)
    spec = json.loads(json.dumps(CIFAR10_SPEC))
    spec["tree"]["animal"]["mammal"][0] = "kat"
    err = spec_error(spec, ds)
    assert err.key == "hierarchy.tree.animal.mammal"
    assert "'kat'" in str(err) and "did you mean 'cat'" in str(err)


def test_bad_specs_name_the_key(digits):
    twice = {
        "levels": ["parity", "digit"],
        "tree": {"even": [0, 2, 4, 6, 8, 1], "odd": [1, 3, 5, 7, 9]},
    }
    err = spec_error(twice, digits)
    assert err.key == "hierarchy.tree.odd" and "listed twice" in str(err)
    missing = {"levels": ["parity", "digit"], "tree": {"even": [0, 2, 4], "odd": [1, 3, 5]}}
    err = spec_error(missing, digits)
    assert err.key == "hierarchy.tree" and "4 missing" in str(err) and "'6'" in str(err)
    err = spec_error({"levels": ["size", "parity", "digit"], "tree": PARITY["tree"]}, digits)
    assert err.key == "hierarchy.levels"
    err = spec_error({"levels": ["parity", "digit"], "tree": THREE["tree"]}, digits)
    assert err.key == "hierarchy.levels"
    err = spec_error({"levels": ["parity", "digit"], "tree": {"even": [], "odd": [1]}}, digits)
    assert err.key == "hierarchy.tree.even"
    err = spec_error(
        {
            "levels": ["parity", "digit"],
            "tree": {"even": [0, 2, 4, 6, 8, 10], "odd": [1, 3, 5, 7, 9]},
        },
        digits,
    )
    assert err.key == "hierarchy.tree.even" and "out of range" in str(err)
    dup_node = {
        "levels": ["size", "parity", "digit"],
        "tree": {
            "low": {"even": [0, 2, 4], "odd": [1, 3]},
            "high": {"even": [6, 8], "odd": [5, 7, 9]},
        },
    }
    err = spec_error(dup_node, digits)
    assert err.key == "hierarchy.tree.high.even" and "twice" in str(err)
    err = spec_error({"levels": ["parity", "digit"], "tree": PARITY["tree"], "extra": 1}, digits)
    assert err.key == "hierarchy.extra"
    err = spec_error({"levels": ["parity", "digit"]}, digits)
    assert err.key == "hierarchy.tree"


def test_select_rejects_unknown_and_misordered_levels(digits):
    h = hierarchy_from_spec(THREE, digits)
    for levels, text in [
        (["size", "parit", "digit"], "did you mean 'parity'"),
        (["parity", "size", "digit"], "coarse to fine"),
        (["size", "size", "digit"], "twice"),
        (["size", "parity"], "last level"),
    ]:
        with pytest.raises(OptionError, match=text) as err:
            h.select(levels)
        assert err.value.key == "levels"
    with pytest.raises(OptionError) as err:
        hierarchical(digits, seed=0, hierarchy=THREE, levels=["size", "sizes", "digit"])
    assert err.value.key == "levels" and "size, parity, digit" in str(err.value)


def test_hierarchy_files(tmp_path, digits):
    good = tmp_path / "parity.yaml"
    good.write_text(
        "levels: [parity, digit]\ntree:\n  even: [0, 2, 4, 6, 8]\n  odd: [1, 3, 5, 7, 9]\n",
        encoding="utf-8",
    )
    assert np.array_equal(
        load_hierarchy_file(str(good), digits).path, hierarchy_from_spec(PARITY, digits).path
    )
    assert np.array_equal(
        resolve_hierarchy(str(good), digits).path, hierarchy_from_spec(PARITY, digits).path
    )
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("levels: [parity, digit\ntree: {", encoding="utf-8")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"levels: [\xff\xfe]\n")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("levels: [parity, digit]\ntree: {even: [0, 2], odd: [1]}\n")
    for path, text in [
        (tmp_path / "missing.yaml", "does not exist"),
        (invalid, "invalid.yaml:2: invalid YAML"),
        (binary, "not UTF-8"),
        (wrong, "tree: every one"),
    ]:
        with pytest.raises(OptionError, match=text) as err:
            resolve_hierarchy(str(path), digits)
        assert err.value.key == "hierarchy" and str(path) in str(err.value)


def test_resolve_without_shipped_hierarchy(digits):
    with pytest.raises(OptionError, match="ships no hierarchy") as err:
        resolve_hierarchy(None, digits)
    assert err.value.key == "hierarchy"
    assert resolve_hierarchy(PARITY, digits).level_names == ("parity", "digit")


# ------------------------------------------------------------------ options


def test_options_validate_from_yaml_mapping():
    opts = build(
        HierarchicalOptions, {"mode": "dual_label", "hierarchy": PARITY, "tasks_per_level": [1, 2]}
    )
    assert opts.online and opts.boundaries == "visible" and opts.hierarchy == PARITY
    for bad, key in [
        ({"levels": ["a"]}, "levels"),
        ({"levels": ["a", "a"]}, "levels"),
        ({"tasks_per_level": [1, 2, 3]}, "tasks_per_level"),
        ({"levels": ["a", "b", "c"], "tasks_per_level": [1, 2]}, "tasks_per_level"),
    ]:
        with pytest.raises(OptionError) as err:
            HierarchicalOptions(**bad).check()
        assert err.value.key == key
    HierarchicalOptions(mode="multi_depth", levels=["a", "b"]).check()  # 2 levels allowed


# ------------------------------------------------------------------ streams


def train_index(exp) -> np.ndarray:
    return exp.train_x[:, 0].numpy()


def check_labels(stream, ds, h):
    """Train/test labels are the flat ids of each sample's ancestor at the exp's level."""
    space = stream.labels
    for exp in stream:
        lv = exp.level
        idx = train_index(exp)
        expect = space.flat_id(lv, h.ancestor(lv, ds.y_train.numpy()[idx]))
        assert exp.train_y.tolist() == expect.tolist()
        assert set(exp.train_y.tolist()) == set(exp.classes)
        assert all(space.level_of()[c] == lv for c in exp.classes)
        test_idx = exp.test_x[:, 0].numpy()
        anc = h.ancestor(lv, ds.y_test.numpy())
        want = np.flatnonzero(np.isin(space.flat_id(lv, anc), exp.classes))
        assert test_idx.tolist() == want.tolist()  # all of them, in dataset order
        assert exp.test_y.tolist() == space.flat_id(lv, anc[want]).tolist()


def test_single_label_cifar100_protocol_on_digits(digits):
    stream = hierarchical(digits, seed=3, hierarchy=PARITY)
    h = hierarchy_from_spec(PARITY, digits)
    assert stream.family == "hierarchical" and stream.ordered
    assert stream.n_classes == 12 == stream.labels.n_classes
    assert [e.level for e in stream] == [0, 1, 1, 1, 1, 1]
    assert [len(e.classes) for e in stream] == [2, 2, 2, 2, 2, 2]
    assert sorted(stream.class_order) == list(range(12))
    assert list(stream.class_order) == [c for e in stream for c in e.classes]
    check_labels(stream, digits, h)
    coarse = train_index(stream[0])
    fine = np.concatenate([train_index(e) for e in stream[1:]])
    assert not set(coarse) & set(fine)
    assert sorted(np.concatenate([coarse, fine]).tolist()) == list(range(len(digits.y_train)))
    y = digits.y_train.numpy()
    n_c, n_f = np.bincount(y[coarse], minlength=10), np.bincount(y[fine], minlength=10)
    assert np.abs(n_c - n_f).max() <= 1  # each class split near-equally
    desc = stream.description
    json.dumps(desc)
    assert desc["type"] == "hierarchical" and desc["mode"] == "single_label"
    assert desc["levels"] == ["parity", "digit"] and desc["tasks_per_level"] == [1, 5]
    assert desc["level_sizes"] == [2, 10]
    assert [t["n_train"] for t in desc["tasks"]] == [e.n_train for e in stream]


def test_dual_label_reuses_the_same_images(digits):
    stream = hierarchical(
        digits, seed=1, mode="dual_label", hierarchy=PARITY, tasks_per_level=[2, 2]
    )
    h = hierarchy_from_spec(PARITY, digits)
    assert [e.level for e in stream] == [0, 0, 1, 1]
    check_labels(stream, digits, h)
    coarse = np.concatenate([train_index(e) for e in stream if e.level == 0])
    fine = np.concatenate([train_index(e) for e in stream if e.level == 1])
    everything = list(range(len(digits.y_train)))
    assert sorted(coarse.tolist()) == everything == sorted(fine.tolist())


def test_multi_depth_uses_every_level(digits):
    stream = hierarchical(digits, seed=0, mode="multi_depth", hierarchy=THREE)
    h = hierarchy_from_spec(THREE, digits)
    assert [e.level for e in stream] == [0, 1, 2]
    assert [len(e.classes) for e in stream] == [2, 4, 10]
    check_labels(stream, digits, h)
    parts = [set(train_index(e).tolist()) for e in stream]
    assert sum(map(len, parts)) == len(set().union(*parts)) == len(digits.y_train)
    sizes = np.array([np.bincount(digits.y_train.numpy()[list(p)], minlength=10) for p in parts])
    assert (sizes.max(0) - sizes.min(0)).max() <= 1


def test_shipped_cifar10_stream_and_too_many_tasks():
    ds = synthetic("cifar10", CIFAR10_CLASSES, per_class=9)
    stream = hierarchical(ds, seed=0, mode="multi_depth", tasks_per_level=[1, 2, 5])
    assert [e.level for e in stream] == [0, 1, 1, 2, 2, 2, 2, 2]
    assert stream.n_classes == 16
    check_labels(stream, ds, shipped_hierarchy(ds))
    with pytest.raises(OptionError) as err:
        hierarchical(ds, seed=0, tasks_per_level=[3, 5])
    assert err.value.key == "tasks_per_level" and "2 classes" in str(err.value)
    few = synthetic("cifar10", CIFAR10_CLASSES, per_class=1)  # 1 sample cannot feed 3 levels
    with pytest.raises(OptionError) as err:
        hierarchical(few, seed=0, mode="multi_depth")
    assert err.value.key == "levels"



@pytest.mark.parametrize("mode", ["single_label", "dual_label", "multi_depth"])
def test_deterministic_and_seed_dependent(digits, mode):
    one = stream_hash(hierarchical(digits, seed=5, mode=mode, hierarchy=THREE))
    assert one == stream_hash(hierarchical(digits, seed=5, mode=mode, hierarchy=THREE))
    assert one != stream_hash(hierarchical(digits, seed=6, mode=mode, hierarchy=THREE))


def test_class_groups_do_not_depend_on_the_mode(digits):
    single = hierarchical(digits, seed=2, hierarchy=PARITY)
    dual = hierarchical(digits, seed=2, mode="dual_label", hierarchy=PARITY)
    assert single.class_order == dual.class_order
