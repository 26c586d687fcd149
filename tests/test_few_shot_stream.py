"""Few-shot continual streams: exact shot counts, disjoint sessions, seeded and file splits."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import stream_hash

from clsim.data import Dataset, load_dataset
from clsim.errors import ConfigError, OptionError
from clsim.streams.few_shot import FewShotOptions, few_shot, write_index_dir
from clsim.validation import build

DIGITS_ARGS = {"base_classes": 4, "ways": 2, "shots": 5, "sessions": 3}
SYN_ARGS = {"base_classes": 8, "ways": 3, "shots": 4, "sessions": 4}


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def synthetic(
    n_classes: int = 20, per_class: int = 12, n_test: int = 3, short: dict[int, int] | None = None
) -> Dataset:
    """Classes interleaved (sample i has class i % C) so dataset order is not class order;
    every row of x encodes its dataset index, so a stream's samples can be traced back.
    ``short`` gives some classes fewer training samples."""
    y = np.tile(np.arange(n_classes), per_class)
    for c, keep in (short or {}).items():
        drop = np.flatnonzero(y == c)[keep:]
        y = np.delete(y, drop)
    idx = np.arange(len(y))
    x = np.stack([idx % 256, idx // 256], axis=1).astype(np.uint8)
    y_test = np.tile(np.arange(n_classes), n_test)
    x_test = np.arange(len(y_test), dtype=np.uint8)[:, None].repeat(2, axis=1)
    return Dataset(
        name="synthetic",
        x_train=torch.from_numpy(x),
        y_train=torch.from_numpy(y).long(),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test).long(),
        class_names=tuple(f"c{c}" for c in range(n_classes)),
    )


def row_index(x: torch.Tensor) -> list[int]:
    return (x[:, 0].long() + 256 * x[:, 1].long()).tolist()



def test_session_shapes_on_digits(digits):
    stream = few_shot(digits, seed=0, **DIGITS_ARGS)
    assert stream.family == "few_shot" and len(stream) == 4
    assert [len(exp.classes) for exp in stream] == [4, 2, 2, 2]
    assert stream.class_order == tuple(range(10))  # index order by default
    assert stream.labels.names == digits.class_names and stream.n_classes == 10
    y_train, y_test = digits.y_train.numpy(), digits.y_test.numpy()
    base = stream[0]
    base_mask = np.isin(y_train, base.classes)
    assert base.n_train == int(base_mask.sum())
    assert torch.equal(base.train_y, digits.y_train[torch.from_numpy(base_mask)])  # dataset order
    for exp in stream:
        test_mask = torch.from_numpy(np.isin(y_test, exp.classes))
        assert torch.equal(exp.test_x, digits.x_test[test_mask])
        assert torch.equal(exp.test_y, digits.y_test[test_mask])
    for exp, shots in zip(stream[1:], stream.description["shot_indices"], strict=True):
        counts = torch.bincount(exp.train_y, minlength=10)
        assert counts[list(exp.classes)].tolist() == [5, 5]
        assert exp.n_train == 10
        assert torch.equal(exp.train_x, digits.x_train[shots])
        assert torch.equal(exp.train_y, digits.y_train[shots])


def test_shots_are_disjoint_from_base_and_each_other():
    data = synthetic()
    stream = few_shot(data, seed=3, **SYN_ARGS)
    classes = [set(exp.classes) for exp in stream]
    assert sum(len(c) for c in classes) == len(set().union(*classes)) == 8 + 3 * 4
    base = classes[0]
    for exp, own in zip(stream, classes, strict=True):
        assert set(exp.train_y.tolist()) == own == set(exp.test_y.tolist())
    novel_rows = [i for exp in stream[1:] for i in row_index(exp.train_x)]
    assert len(novel_rows) == len(set(novel_rows)) == 3 * 4 * 4
    assert not set(data.y_train[novel_rows].tolist()) & base
    base_rows = set(row_index(stream[0].train_x))
    assert base_rows == set(np.flatnonzero(np.isin(data.y_train.numpy(), list(base))).tolist())
    assert not base_rows & set(novel_rows)
    # within a session: classes in order, indices sorted within a class
    for exp, shots in zip(stream[1:], stream.description["shot_indices"], strict=True):
        assert row_index(exp.train_x) == shots
        labels = data.y_train[shots].tolist()
        assert labels == [c for c in exp.classes for _ in range(4)]
        for k in range(3):
            assert shots[4 * k : 4 * k + 4] == sorted(shots[4 * k : 4 * k + 4])


def test_description(digits):
    stream = few_shot(digits, seed=1, **DIGITS_ARGS)
    d = stream.description
    assert json.loads(json.dumps(d)) == d
    assert list(d)[0] == "type" and d["type"] == "few_shot"
    assert (d["base_classes"], d["ways"], d["shots"], d["sessions"]) == (4, 2, 5, 3)
    assert d["session_classes"] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert [len(s) for s in d["shot_indices"]] == [10, 10, 10]
    assert d["source"] == "seed"


def test_same_seed_same_stream_different_seed_different_shots(digits):
    a = few_shot(digits, seed=7, **DIGITS_ARGS)
    b = few_shot(digits, seed=7, **DIGITS_ARGS)
    assert stream_hash(a) == stream_hash(b)
    others = [few_shot(digits, seed=s, **DIGITS_ARGS) for s in (8, 9)]
    shots = {json.dumps(s.description["shot_indices"]) for s in [a, *others]}
    assert len(shots) == 3
    assert len({stream_hash(s) for s in [a, *others]}) == 3
    # the base session and the class order do not depend on the seed
    assert all(torch.equal(s[0].train_x, a[0].train_x) for s in others)


def test_shuffled_and_explicit_class_orders():
    data = synthetic()
    orders = {
        few_shot(data, seed=s, shuffle_classes=True, **SYN_ARGS).class_order for s in range(4)
    }
    assert len(orders) == 4 and all(sorted(o) != list(o) for o in orders)
    order = list(range(19, -1, -1))
    stream = few_shot(data, seed=0, class_order=order, shuffle_classes=True, **SYN_ARGS)
    assert stream.class_order == tuple(order)
    assert stream[0].classes == tuple(range(19, 11, -1)) and stream[1].classes == (11, 10, 9)


def test_default_options_are_the_cifar100_protocol():
    data = synthetic(n_classes=100, per_class=6, n_test=1)
    stream = few_shot(data, seed=0)
    assert [len(exp.classes) for exp in stream] == [60] + [5] * 8
    assert [exp.n_train for exp in stream] == [360] + [25] * 8
    opts = FewShotOptions()
    assert (opts.online, opts.boundaries, opts.eval_every) == (False, "visible", None)
    assert (opts.base_classes, opts.ways, opts.shots, opts.sessions) == (60, 5, 5, 8)
    assert (opts.class_order, opts.shuffle_classes, opts.index_dir) == (None, False, None)


def test_index_dir_round_trip(tmp_path, digits):
    seeded = few_shot(digits, seed=11, **DIGITS_ARGS)
    files = write_index_dir(seeded, tmp_path / "split")
    assert [f.name for f in files] == ["session_2.txt", "session_3.txt", "session_4.txt"]
    # any seed: the files decide the shots
    frozen = few_shot(digits, seed=99, index_dir=str(tmp_path / "split"), **DIGITS_ARGS)
    assert stream_hash(frozen) == stream_hash(seeded)
    assert frozen.description["shot_indices"] == seeded.description["shot_indices"]
    assert frozen.description["source"] == str(tmp_path / "split")
    # a plain list of indices, shuffled lines and blank lines read back the same
    rows = seeded.description["shot_indices"]
    write_index_dir([list(reversed(r)) for r in rows], tmp_path / "lists")
    path = tmp_path / "lists" / "session_3.txt"
    path.write_text("\n\n" + path.read_text().replace("\n", "\n  \n"))
    again = few_shot(digits, seed=0, index_dir=str(tmp_path / "lists"), **DIGITS_ARGS)
    assert stream_hash(again) == stream_hash(seeded)


@pytest.mark.parametrize(
    ("kwargs", "key", "message"),
    [
        ({"sessions": 5}, "sessions", "8 + 3 * 5 = 23 classes, but synthetic has 20"),
        ({"base_classes": 0}, "base_classes", ">= 1; got 0"),
        ({"ways": 0}, "ways", ">= 1; got 0"),
        ({"shots": 0}, "shots", ">= 1; got 0"),
        ({"sessions": -1}, "sessions", ">= 0; got -1"),
        ({"shots": 13}, "shots", "shots=13, but class 'c8' (id 8) has only 12 training"),
        ({"class_order": [0, 1, 2]}, "class_order", "missing"),
        ({"class_order": list(range(19)) + [0]}, "class_order", "repeated [0]"),
    ],
)
def test_bad_options(kwargs, key, message):
    with pytest.raises(OptionError, match=re.escape(message)) as exc:
        few_shot(synthetic(), seed=0, **{**SYN_ARGS, **kwargs})
    assert exc.value.key == key


def test_shots_larger_than_a_novel_class_is_rejected():
    data = synthetic(short={13: 3})  # class 13 is in session 2 (classes 11, 12, 13)
    with pytest.raises(OptionError, match=r"shots=4, but class 'c13' \(id 13\) has only 3") as exc:
        few_shot(data, seed=0, **SYN_ARGS)
    assert exc.value.key == "shots"
    # a short base class is fine: the base session takes whatever it has
    few_shot(synthetic(short={2: 1}), seed=0, **SYN_ARGS)


def test_zero_sessions_is_the_base_session_alone(digits):
    stream = few_shot(digits, seed=0, base_classes=10, ways=1, shots=1, sessions=0)
    assert len(stream) == 1 and stream[0].n_train == len(digits.y_train)
    assert stream.description["shot_indices"] == []


def _split(tmp_path: Path, data: Dataset) -> tuple[Path, list[list[int]]]:
    stream = few_shot(data, seed=5, **SYN_ARGS)
    folder = tmp_path / "split"
    write_index_dir(stream, folder)
    return folder, stream.description["shot_indices"]


def _edit(folder: Path, session: int, lines: list[str]) -> Path:
    path = folder / f"session_{session + 1}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_index_dir_problems(tmp_path):
    data = synthetic()
    y = data.y_train.numpy()

    def fails(folder: Path | str, match: str) -> None:
        with pytest.raises(OptionError, match=match) as exc:
            few_shot(data, seed=0, index_dir=str(folder), **SYN_ARGS)
        assert exc.value.key == "index_dir"

    fails(tmp_path / "nowhere", "is not a folder")
    folder, shots = _split(tmp_path, data)
    (folder / "session_5.txt").unlink()
    fails(folder, r"missing .*session_5\.txt")

    cases = []
    s2 = [str(i) for i in shots[1]]  # session 2 (classes 11, 12, 13)
    cases.append((s2[:3] + ["12x"] + s2[3:], 4, "expected one training-set index"))
    cases.append((s2[:5] + [str(len(y))] + s2[5:], 6, "outside the training set"))
    cases.append((s2[:1] + ["-1"] + s2[1:], 2, "outside the training set"))
    base_sample = int(np.flatnonzero(y == 0)[0])
    cases.append((s2[:2] + [str(base_sample)] + s2[2:], 3, r"class 'c0' \(id 0\), not one of"))
    other = str(shots[0][0])  # a session-1 shot in session 2
    cases.append((s2 + [other], 13, "not one of session 2's classes"))
    cases.append((s2[:7] + [s2[2]] + s2[7:], 8, f"index {s2[2]} repeats line 3"))
    spare = int(np.setdiff1d(np.flatnonzero(y == 12), shots[1])[0])
    cases.append((s2 + [str(spare)], 13, r"more than shots=4 indices of class 'c12'"))
    cases.append((s2[:4] + s2[5:], 5, r"expected shots=4 indices of class 'c12' \(id 12\); got 3"))
    cases.append((s2[4:], None, r"expected shots=4 indices of class 'c11' \(id 11\); got 0"))
    for lines, line, match in cases:
        folder, _ = _split(tmp_path, data)
        path = _edit(folder, 2, lines)
        where = f"{path}:{line}" if line else f"{path}: "
        with pytest.raises(OptionError, match=match) as exc:
            few_shot(data, seed=0, index_dir=str(folder), **SYN_ARGS)
        assert exc.value.key == "index_dir"
        assert str(exc.value).startswith(where), (str(exc.value), where)


def test_options_dataclass_bounds_and_check():
    opts = build(FewShotOptions, {"ways": 10, "shots": 5, "index_dir": "splits/cifar100"})
    assert (opts.ways, opts.index_dir) == (10, "splits/cifar100")
    for key, value in (("base_classes", 0), ("ways", 0), ("shots", 0), ("sessions", -1)):
        with pytest.raises(ConfigError, match=key):
            build(FewShotOptions, {key: value})
    with pytest.raises(ConfigError, match="online"):
        build(FewShotOptions, {"boundaries": "hidden"})


def test_an_index_file_that_is_not_utf8_or_not_a_file_is_named(tmp_path):
    """A session file saved in Latin-1 names its byte and line; a named pipe in its place
    is named as a pipe (and not opened: reading it would block), not called missing."""
    data = synthetic()
    folder, shots = _split(tmp_path, data)
    lines = [str(i) for i in shots[1]]
    path = folder / "session_2.txt"
    path.write_bytes(("\n".join(lines[:2]) + "\n# caf\xe9\n" + "\n".join(lines[2:])
                      ).encode("latin-1"))
    with pytest.raises(OptionError, match=r"session_2\.txt is not UTF-8 text: byte \d+ "
                       r"\(line 3\) is 0xe9") as exc:
        few_shot(data, seed=0, index_dir=str(folder), **SYN_ARGS)
    assert exc.value.key == "index_dir"
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(OptionError, match=r"session_2\.txt' is a named pipe") as exc:
        few_shot(data, seed=0, index_dir=str(folder), **SYN_ARGS)
    assert exc.value.key == "index_dir"
