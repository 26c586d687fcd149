"""Class-incremental streams: group arithmetic, seeded class order, byte-for-byte replay."""

from __future__ import annotations

import pytest
import torch
from helpers import stream_hash

from clsim.assembly import build_stream, load_scenario_data
from clsim.config import load_scenario
from clsim.data import load_dataset
from clsim.errors import ConfigError, OptionError
from clsim.stream import Stream
from clsim.streams.class_incremental import class_groups, class_incremental


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")



@pytest.mark.parametrize(
    ("kwargs", "sizes"),
    [
        ({"n_experiences": 5}, [2, 2, 2, 2, 2]),
        ({"increment": 5}, [5, 5]),
        ({"initial_increment": 4, "increment": 2}, [4, 2, 2, 2]),
        ({"initial_increment": 4, "n_experiences": 4}, [4, 2, 2, 2]),
        ({"n_experiences": 1}, [10]),
        ({"initial_increment": 10, "n_experiences": 1}, [10]),
    ],
)
def test_class_groups(kwargs, sizes):
    assert class_groups(10, **kwargs) == sizes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_experiences": 3}, "do not split evenly"),
        ({"increment": 3}, "do not divide by increment=3"),
        ({"increment": 2, "n_experiences": 4}, "gives 5 experiences"),
        ({"initial_increment": 12, "increment": 1}, "exceeds the 10 classes"),
        ({}, "give either"),
    ],
)
def test_class_groups_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        class_groups(10, **kwargs)


def test_same_seed_same_stream_byte_for_byte(digits):
    a = class_incremental(digits, seed=7, n_experiences=5)
    b = class_incremental(digits, seed=7, n_experiences=5)
    assert stream_hash(a) == stream_hash(b)


def test_different_seeds_give_different_class_orders(digits):
    orders = {class_incremental(digits, seed=s, n_experiences=5).class_order for s in range(5)}
    assert len(orders) == 5


def test_experiences_partition_the_data(digits):
    stream = class_incremental(digits, seed=0, n_experiences=5)
    assert sorted(c for exp in stream for c in exp.classes) == list(range(10))
    assert sum(exp.n_train for exp in stream) == len(digits.y_train)
    assert sum(exp.n_test for exp in stream) == len(digits.y_test)
    for exp in stream:
        assert set(exp.train_y.tolist()) == set(exp.classes) == set(exp.test_y.tolist())
        assert exp.train_x.dtype == torch.uint8 and exp.task_id is None


def test_explicit_class_order_and_task_labels(digits):
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    stream = class_incremental(digits, seed=0, increment=2, class_order=order, task_labels=True)
    assert stream.class_order == tuple(order)
    assert [exp.classes for exp in stream][0] == (9, 8)
    assert [exp.task_id for exp in stream] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([0, 1, 2], "missing"),
        ([0, 0, 1, 2, 3, 4, 5, 6, 7, 8], "repeated"),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], "unknown"),
    ],
)
def test_bad_class_orders(digits, order, message):
    with pytest.raises(ValueError, match=message):
        class_incremental(digits, seed=0, n_experiences=5, class_order=order)


def test_stream_is_a_sequence(digits):
    stream = class_incremental(digits, seed=0, n_experiences=5)
    assert len(stream) == 5
    assert stream[-1] is stream.experiences[4]
    assert isinstance(stream[1:3], Stream) and len(stream[1:3]) == 2
    assert [e.index for e in stream] == [e.index for e in stream] == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------
# a classic Avalanche benchmark, assembled from a scenario (avalanche-lib stood in for:
# the real one is tested in .venv-avalanche by tests/test_avalanche_benchmarks.py)
# ---------------------------------------------------------------------------

SPLIT_MNIST = """\
name: split
seed: 3
data: {dataset: mnist}
stream: {type: avalanche, benchmark: SplitMNIST, args: {n_experiences: 5}, dataset_root: tv}
model: {name: mlp, hidden: [8]}
strategies:
  naive: {plugins: [naive]}
"""


@pytest.fixture
def fake_classic(monkeypatch, digits):
    """read_classic over digits, recording what it was asked to read."""
    import clsim.interop.avalanche as bridge
    import clsim.interop.avalanche_classic as classic

    calls = []

    def read(benchmark, args, root, seed):
        calls.append((benchmark, args, root, seed))
        if "bad" in args:
            raise OptionError("args", f"{benchmark} rejected its arguments")
        return digits, class_incremental(digits, seed=seed, n_experiences=5)

    monkeypatch.setattr(bridge, "import_avalanche", lambda: None)
    monkeypatch.setattr(classic, "read_classic", read)
    return calls


def test_a_classic_benchmark_is_read_with_the_scenario_and_its_stream_kept(
        tmp_path, fake_classic, shared_data_root):
    path = tmp_path / "s.yaml"
    path.write_text(SPLIT_MNIST)
    scenario = load_scenario(path)
    dataset = load_scenario_data(scenario)
    # dataset_root relative to the YAML, the run seed
    assert fake_classic == [("SplitMNIST", {"n_experiences": 5}, tmp_path / "tv", 3)]
    stream = build_stream(scenario, dataset, 3)
    assert stream.experiences is build_stream(scenario, dataset, 3).experiences
    assert len(fake_classic) == 1  # the stream read with the data, not read again


@pytest.mark.parametrize(
    ("edit", "key", "message"),
    [
        (("data: {dataset: mnist}", "data: {dataset: digits}"), "data.dataset",
         "stream.benchmark SplitMNIST reads mnist; data.dataset says 'digits' (set it to mnist)"),
        (("args: {n_experiences: 5}", "args: {bad: 1}"), "stream.args",
         "SplitMNIST rejected its arguments"),
    ],
)
def test_a_classic_benchmark_error_names_the_scenario_key(
        tmp_path, fake_classic, shared_data_root, edit, key, message):
    path = tmp_path / "s.yaml"
    path.write_text(SPLIT_MNIST.replace(*edit))
    with pytest.raises(ConfigError) as caught:
        load_scenario_data(load_scenario(path))
    assert caught.value.key_path == key
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
