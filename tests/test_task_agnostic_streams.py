"""Task-agnostic streams: blurry splits, gradual shifts and recurring tasks, checked exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import stream_hash

from clsim.data import load_dataset
from clsim.data.dataset import Dataset
from clsim.errors import ConfigError, OptionError
from clsim.stream import Stream
from clsim.streams.common import TimingOptions
from clsim.streams.task_agnostic import (
    TASK_AGNOSTIC_TYPES,
    BlurryOptions,
    GradualOptions,
    IBlurryOptions,
    RecurringOptions,
    SiBlurryOptions,
    blend_mask,
    blurry,
    blurry_m,
    gradual,
    i_blurry,
    percent_of,
    recurring,
    si_blurry,
)
from clsim.validation import build

SEEDS = range(20)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def synthetic(n_classes: int, n_train: int, n_test: int = 2) -> Dataset:
    """``x`` holds each sample's own dataset index, so a stream shows which samples it took.

    Samples of different classes are interleaved (a fixed shuffle), as in a real dataset.
    """
    gen = torch.Generator().manual_seed(1234)
    y_train = torch.arange(n_classes).repeat_interleave(n_train)[
        torch.randperm(n_classes * n_train, generator=gen)
    ]
    y_test = torch.arange(n_classes).repeat_interleave(n_test)
    return Dataset(
        name=f"synthetic{n_classes}",
        x_train=torch.arange(len(y_train)).unsqueeze(1),
        y_train=y_train,
        x_test=torch.arange(len(y_test)).unsqueeze(1),
        y_test=y_test,
        class_names=tuple(f"c{i}" for i in range(n_classes)),
    )


@pytest.fixture(scope="module")
def hundred() -> Dataset:
    return synthetic(100, 50)



def stream_indices(stream: Stream) -> np.ndarray:
    """Dataset indices of the training samples in delivery order (synthetic data)."""
    return torch.cat([e.train_x[:, 0] for e in stream]).numpy()


def check_common(stream: Stream, data: Dataset) -> None:
    """What every task-agnostic stream promises, whatever its type."""
    class_of_label = np.asarray(stream.description["dataset_class_of_label"])
    assert stream.family == "task_agnostic" and stream.ordered
    assert stream.class_order == tuple(class_of_label)
    assert sorted(class_of_label) == list(range(data.n_classes))
    assert stream.n_classes == stream.labels.n_classes == data.n_classes
    assert stream.labels.names == tuple(data.class_names[c] for c in class_of_label)
    assert stream.description["boundaries"] == list(stream.boundaries())
    assert json.loads(json.dumps(stream.description)) == stream.description
    assert stream.description["task_sizes"] == [e.n_train for e in stream]
    # labels in order of first appearance: label k first shows up after label k - 1
    y = torch.cat([e.train_y for e in stream]).numpy()
    labels, first = np.unique(y, return_index=True)
    assert list(labels) == list(range(len(labels)))
    assert np.all(np.diff(first) > 0) and first[0] == 0
    for exp in stream:
        assert exp.n_train > 0 and exp.n_test > 0 and exp.task_id is None
        # tests exactly its classes' test samples, labelled with stream ids
        wanted = torch.as_tensor(class_of_label[list(exp.classes)])
        expected = torch.isin(data.y_test, wanted).nonzero().squeeze(1)
        assert torch.equal(exp.test_x, data.x_test[expected])
        assert torch.equal(torch.as_tensor(class_of_label)[exp.test_y], data.y_test[expected])


def check_train_labels(stream: Stream, data: Dataset) -> None:
    """Training labels are the dataset labels of the samples taken, renumbered."""
    class_of_label = torch.as_tensor(stream.description["dataset_class_of_label"])
    idx = torch.as_tensor(stream_indices(stream))
    y = torch.cat([e.train_y for e in stream])
    assert torch.equal(class_of_label[y], data.y_train[idx])


# ----------------------------------------------------------------------------- blurry


def test_percent_of_rounds_half_up_exactly():
    assert percent_of(50, 5) == 3  # 2.5 -> 3
    assert percent_of(10, 45) == 5  # 4.5 -> 5
    assert percent_of(10, 44) == 4
    assert percent_of(33, 100) == 33
    assert percent_of(0, 7) == 0 and percent_of(100, 7) == 7


@pytest.mark.parametrize(("n_percent", "m_percent"), [(50, 10), (35, 30)])
def test_si_blurry_statistics_over_seeds(hundred, n_percent, m_percent):
    data = hundred
    y_train = data.y_train.numpy()
    n_per_class = np.bincount(y_train)
    sizes = set()
    moved_total = 0
    for seed in SEEDS:
        s = si_blurry(data, seed=seed, disjoint_percent=n_percent, blurry_percent=m_percent)
        check_common(s, data)
        check_train_labels(s, data)
        idx = stream_indices(s)
        assert np.array_equal(np.sort(idx), np.arange(len(y_train)))  # each sample once
        desc = s.description
        assert desc["type"] == "si_blurry" and len(s) == 5
        assert len(desc["disjoint_dataset_classes"]) == n_percent  # 100 classes: N% = N
        assert sum(desc["task_disjoint_counts"]) == n_percent
        class_of_label = np.asarray(desc["dataset_class_of_label"])
        # the task that introduces each dataset class, and the task of each sample
        own_task = np.empty(data.n_classes, dtype=np.int64)
        for t, exp in enumerate(s):
            own_task[class_of_label[list(exp.classes)]] = t
        sample_task = np.repeat(np.arange(len(s)), [e.n_train for e in s])
        away = np.zeros(data.n_classes, dtype=np.int64)
        np.add.at(away, y_train[idx], sample_task != own_task[y_train[idx]])
        disjoint = np.asarray(desc["disjoint_dataset_classes"])
        blurry_classes = np.setdiff1d(np.arange(data.n_classes), disjoint)
        assert np.all(away[disjoint] == 0)  # disjoint classes never leave their task
        expected = np.asarray([percent_of(m_percent, n) for n in n_per_class[blurry_classes]])
        assert np.array_equal(away[blurry_classes], expected)  # exactly M% (rounded) moved
        assert desc["n_moved"] == expected.sum() == sum(desc["moved_in"])
        assert desc["moved_out"] == [
            int(expected[own_task[blurry_classes] == t].sum()) for t in range(len(s))
        ]
        assert sorted(desc["disjoint_classes"]) == sorted(
            int(np.flatnonzero(class_of_label == c)[0]) for c in disjoint
        )
        assert [len(e.classes) for e in s] == desc["task_class_counts"]
        assert min(desc["task_class_counts"]) >= 1
        sizes.add(tuple(desc["task_class_counts"]))
        moved_total += desc["n_moved"]
    assert len(sizes) > 5  # random cut points: task sizes change with the seed
    blurry_samples = len(SEEDS) * (100 - n_percent) * 50
    assert abs(moved_total / blurry_samples - m_percent / 100) < 1e-9


def test_i_blurry_and_blurry_m_split_evenly(hundred):
    for seed in range(5):
        s = i_blurry(hundred, seed=seed)
        assert s.description["type"] == "i_blurry"
        assert s.description["task_class_counts"] == [20] * 5
        assert s.description["task_disjoint_counts"] == [10] * 5
        m = blurry_m(hundred, seed=seed)
        assert m.description["type"] == "blurry"
        assert m.description["task_disjoint_counts"] == [0] * 5
        assert m.description["n_moved"] == 100 * percent_of(10, 50)
        check_common(m, hundred)


@pytest.mark.parametrize("n_classes", [5, 7, 13])
@pytest.mark.parametrize("n_tasks", [1, 2, 3, 5])
@pytest.mark.parametrize("n_percent", [0, 30, 50, 100])
def test_every_task_gets_a_class(n_classes, n_tasks, n_percent):
    data = synthetic(n_classes, 10, 1)
    options = {"n_tasks": n_tasks, "disjoint_percent": n_percent}
    if n_tasks == 1:
        options["blurry_percent"] = 0
    even = blurry(data, seed=3, random_split=False, **options).description
    counts = even["task_class_counts"]
    assert sum(counts) == n_classes and max(counts) - min(counts) <= 1
    assert sum(even["task_disjoint_counts"]) == percent_of(n_percent, n_classes)
    for seed in range(5):
        rand = blurry(data, seed=seed, random_split=True, **options).description
        assert sum(rand["task_class_counts"]) == n_classes
        assert min(rand["task_class_counts"]) >= 1


def test_as_many_tasks_as_classes():
    data = synthetic(6, 10, 1)
    for seed in range(5):
        s = si_blurry(data, seed=seed, n_tasks=6)
        assert [len(e.classes) for e in s] == [1] * 6


def test_explicit_class_order_picks_the_disjoint_classes(digits):
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    s = i_blurry(digits, seed=0, class_order=order, disjoint_percent=20)
    assert s.description["disjoint_dataset_classes"] == [9, 8]
    check_common(s, digits)


# ----------------------------------------------------------------------------- gradual


def test_blend_mask_counts_and_linear_trend():
    rng = np.random.default_rng(0)
    draws = np.stack([blend_mask(10, rng) for _ in range(4000)])
    assert np.all(draws.sum(axis=1) == 10)  # exactly half from each side
    expected = (2 * np.arange(20) + 1) / 40
    assert np.abs(draws.mean(axis=0) - expected).max() < 0.04
    assert blend_mask(0, rng).shape == (0,)


def test_gradual_windows_exact():
    data = synthetic(10, 40)  # 5 tasks of 80 samples
    half = 20
    first_half = second_half = 0
    for seed in SEEDS:
        s = gradual(data, seed=seed, n_tasks=5, window=2 * half)
        check_common(s, data)
        check_train_labels(s, data)
        assert [e.n_train for e in s] == [80] * 5  # experiences: contiguous, task-sized
        assert s.boundaries() == (0, 80, 160, 240, 320)
        class_of_label = np.asarray(s.description["dataset_class_of_label"])
        group = np.empty(10, dtype=np.int64)
        for t, exp in enumerate(s):
            assert len(exp.classes) == 2
            group[class_of_label[list(exp.classes)]] = t
        idx = stream_indices(s)
        task = group[data.y_train.numpy()[idx]]
        assert np.array_equal(np.sort(idx), np.arange(400))
        # each task's samples in the order the unblended stream has them
        plain = stream_indices(gradual(data, seed=seed, n_tasks=5, window=0))
        plain_task = group[data.y_train.numpy()[plain]]
        assert np.array_equal(plain_task, np.repeat(np.arange(5), 80))
        for t in range(5):
            assert np.array_equal(idx[task == t], plain[plain_task == t])
        expected = np.repeat(np.arange(5), 80)
        for b in s.boundaries()[1:]:
            window = task[b - half : b + half]
            assert set(window) == {task[b - half - 1], task[b + half]}
            after = window == task[b + half]
            assert after.sum() == half and (~after).sum() == half
            first_half += after[:half].sum()
            second_half += after[half:].sum()
            expected[b - half : b + half] = task[b - half : b + half]
        assert np.array_equal(task, expected)  # outside the windows: pure tasks
    n = len(SEEDS) * 4 * half
    assert first_half / n < 0.35 and second_half / n > 0.65  # expectation 0.25 and 0.75


def test_gradual_defaults_on_digits(digits):
    s = gradual(digits, seed=0)
    assert len(s) == 5 and s.description["window"] == 200
    check_common(s, digits)


# ----------------------------------------------------------------------------- recurring


def test_recurring_a_b_a():
    data = synthetic(10, 31)  # 155 samples per group: the two A's split 78 / 77
    for seed in range(5):
        s = recurring(data, seed=seed)
        check_common(s, data)
        check_train_labels(s, data)
        assert s.description["sequence"] == [0, 1, 0] and len(s) == 3
        first, second, third = s
        assert first.classes == third.classes and set(first.classes).isdisjoint(second.classes)
        assert torch.equal(first.test_x, third.test_x)
        a, b, c = (e.train_x[:, 0].numpy() for e in s)
        assert len(np.intersect1d(a, c)) == 0
        assert sorted([len(a), len(c)]) == [77, 78]
        class_of_label = np.asarray(s.description["dataset_class_of_label"])
        group_a = class_of_label[list(first.classes)]
        wanted = np.flatnonzero(np.isin(data.y_train.numpy(), group_a))
        assert np.array_equal(np.sort(np.concatenate([a, c])), wanted)
        assert len(b) == 155


def test_recurring_longer_sequence(digits):
    s = recurring(digits, seed=1, n_tasks=5, sequence=[0, 1, 2, 1, 3, 4, 1])
    check_common(s, digits)
    assert len(s) == 7 and s[1].classes == s[3].classes == s[6].classes
    assert len({s[i].classes for i in (0, 1, 2, 4, 5)}) == 5
    assert s.description["class_groups"] == [2] * 5


# ----------------------------------------------------------------------------- shared


BUILDERS = [si_blurry, i_blurry, blurry_m, gradual, recurring]


@pytest.mark.parametrize("builder", BUILDERS)
def test_same_seed_same_stream_different_seed_different(digits, builder):
    a, b, c = (builder(digits, seed=s) for s in (4, 4, 5))
    assert stream_hash(a) == stream_hash(b)
    assert stream_hash(a) != stream_hash(c)
    assert a.description == b.description


@pytest.mark.parametrize(
    ("builder", "options", "key"),
    [
        (si_blurry, {"n_tasks": 0}, "n_tasks"),
        (si_blurry, {"n_tasks": 11}, "n_tasks"),
        (si_blurry, {"disjoint_percent": 101}, "disjoint_percent"),
        (si_blurry, {"blurry_percent": -1}, "blurry_percent"),
        (si_blurry, {"n_tasks": 1}, "blurry_percent"),  # nowhere to move samples to
        (i_blurry, {"class_order": [0, 1, 2]}, "class_order"),
        (gradual, {"window": 3}, "window"),
        (gradual, {"window": 400}, "window"),  # above the smallest task
        (gradual, {"n_tasks": 3}, "n_tasks"),  # 10 classes do not split in 3
        (gradual, {"n_tasks": 20}, "n_tasks"),
        (recurring, {"sequence": [0, 2]}, "sequence"),
        (recurring, {"sequence": [0, 0]}, "sequence"),
        (recurring, {"sequence": []}, "sequence"),
        (recurring, {"n_tasks": 3, "sequence": [0, 1, 2]}, "n_tasks"),
    ],
)
def test_bad_options_name_their_key(digits, builder, options, key):
    with pytest.raises(OptionError) as info:
        builder(digits, seed=0, **options)
    assert info.value.key == key


def test_one_task_without_moves(digits):
    s = si_blurry(digits, seed=0, n_tasks=1, blurry_percent=0)
    assert len(s) == 1 and s[0].n_train == len(digits.y_train)


def test_options_defaults_and_validation():
    for cls in (SiBlurryOptions, IBlurryOptions, BlurryOptions, GradualOptions, RecurringOptions):
        opts = build(cls, {})
        assert isinstance(opts, TimingOptions)
        assert opts.online is True and opts.boundaries == "hidden" and opts.eval_every is None
    si, ib, bm = build(SiBlurryOptions, {}), build(IBlurryOptions, {}), build(BlurryOptions, {})
    assert (si.n_tasks, si.disjoint_percent, si.blurry_percent, si.random_split) == (
        5,
        50,
        10,
        True,
    )
    assert (ib.disjoint_percent, ib.blurry_percent, ib.random_split) == (50, 10, False)
    assert (bm.disjoint_percent, bm.blurry_percent, bm.random_split) == (0, 10, False)
    assert build(GradualOptions, {}).window == 200 and build(GradualOptions, {}).n_tasks == 5
    rec = build(RecurringOptions, {})
    assert rec.n_tasks == 2 and rec.sequence == [0, 1, 0]
    for cls, raw, key in [
        (SiBlurryOptions, {"disjoint_percent": 150}, "disjoint_percent"),
        (IBlurryOptions, {"blurry_percent": -5}, "blurry_percent"),
        (GradualOptions, {"window": 7}, "window"),
        (RecurringOptions, {"sequence": [0, 0]}, "sequence"),
        (RecurringOptions, {"n_tasks": 3, "sequence": [0, 1, 3]}, "sequence"),
        (SiBlurryOptions, {"boundaries": "hidden", "online": False}, "online"),
    ]:
        with pytest.raises(ConfigError) as info:
            build(cls, raw, ("stream",))
        assert info.value.key_path == f"stream.{key}"


def test_registry_entries_build_from_their_options(digits):
    timing = {"online", "eval_every", "boundaries"}
    for name, kind in TASK_AGNOSTIC_TYPES.items():
        opts = vars(build(kind.options, {}))
        s = kind.build(digits, seed=0, **{k: v for k, v in opts.items() if k not in timing})
        assert s.description["type"] == name
