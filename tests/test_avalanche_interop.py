"""Avalanche interop, against the real avalanche-lib (run in .venv-avalanche by `make test`):
streams both ways, the `avalanche` stream type, agreement of clsim's strategies with
Avalanche's on split MNIST, and clsim's metrics against Avalanche's metric classes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import DIGITS_SCENARIO, SPLIT_MNIST_PROTOCOL, run_cli, without_measurements

from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.errors import ConfigError
from clsim.interop.avalanche import (
    avalanche_datasets,
    avalanche_strategy,
    benchmark_from_stream,
    dataset_from_stream,
    run_avalanche,
    stream_from_avalanche,
)
from clsim.metrics import (
    AccuracyMatrix,
    backward_transfer,
    final_accuracy,
    forgetting,
    from_predictions,
    per_experience_forgetting,
)
from clsim.models import MLPOptions, build_model
from clsim.runner import run_scenario
from clsim.seeding import derive_seed
from clsim.streams import class_incremental


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_importing_the_core_imports_no_avalanche() -> None:
    """Guard for the split environments: avalanche is installed here, yet importing the
    core, its engine and its stream types pulls in no avalanche module."""
    import subprocess
    import sys

    code = "import sys, clsim, clsim.engine, clsim.streams; print('avalanche' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------
# streams, both ways
# ---------------------------------------------------------------------------


def test_a_clsim_stream_survives_a_round_trip_through_avalanche(digits) -> None:
    """clsim stream -> Avalanche benchmark (raw samples) -> clsim stream read through
    Avalanche's data loading: every tensor identical, in order (an experience's classes
    come back in order of first appearance: Avalanche keeps them as a set)."""
    stream = class_incremental(digits, seed=3, n_experiences=5)
    back = stream_from_avalanche(benchmark_from_stream(stream, digits, as_input=False))
    assert len(back) == len(stream)
    for a, b in zip(stream, back, strict=True):
        assert set(a.classes) == set(b.classes) and b.task_id is None
        for name in ("train_x", "train_y", "test_x", "test_y"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    data = dataset_from_stream(back)
    assert data.x_train.dtype == torch.uint8 and len(data.y_train) == len(digits.y_train)


def test_class_incremental_benchmark_over_clsim_data_matches_clsim_split(digits) -> None:
    """Avalanche's class_incremental_benchmark over clsim's dataset, with clsim's class
    order, holds the same samples per experience as clsim's own split (Avalanche orders
    them by class, clsim by dataset index), taken raw from the dataset by index."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

    ours = class_incremental(digits, seed=0, n_experiences=5)
    benchmark = class_incremental_benchmark(
        avalanche_datasets(digits), class_order=list(ours.class_order), num_experiences=5
    )
    theirs = stream_from_avalanche(benchmark, digits)
    for a, b in zip(ours, theirs, strict=True):
        assert set(a.classes) == set(b.classes)
        for x, y in (("train_x", "train_y"), ("test_x", "test_y")):
            xa, xb = getattr(a, x), getattr(b, x)
            assert xb.dtype == torch.uint8 and xa.shape == xb.shape
            assert sorted(map(bytes, xa.flatten(1).numpy())) == sorted(
                map(bytes, xb.flatten(1).numpy()))
            assert torch.equal(getattr(a, y).sort().values, getattr(b, y).sort().values)


AVALANCHE_STREAM = DIGITS_SCENARIO.replace(
    "stream: {type: class_incremental, n_experiences: 5}",
    "stream: {type: avalanche, benchmark: class_incremental_benchmark, "
    "args: {num_experiences: 5}}",
).replace(
    "plugins: [naive]", "plugins: [naive]\n  replay:\n    plugins: [{replay: {capacity: 100}}]"
)


def test_the_avalanche_stream_type_runs_repeatably_and_seeds_the_class_order() -> None:
    def run(seed: int) -> dict:
        summary = run_scenario(parse_scenario(AVALANCHE_STREAM), None, seed=seed).summary
        for name, s in summary["strategies"].items():
            assert s["status"] == "ok", s["error"]
            summary["strategies"][name] = without_measurements(s)
        return summary

    first, again, other = run(0), run(0), run(1)
    assert first["strategies"] == again["strategies"]
    assert first["class_order"] == again["class_order"] != other["class_order"]
    assert first["stream"]["source"] == "avalanche"
    naive, replay = (first["strategies"][k]["final_accuracy"] for k in ("naive", "replay"))
    assert replay > naive + 0.2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("{num_experiencs: 5}", "stream.args: class_incremental_benchmark rejected its "
                                "arguments"),
        ("{num_experiences: 5, num_classes_per_exp: [5, 5]}",
         "stream.args: class_incremental_benchmark: Only one"),
    ],
)
def test_bad_generator_arguments_name_the_key(tmp_path, args: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(AVALANCHE_STREAM.replace("args: {num_experiences: 5}", f"args: {args}"))
    result = run_cli("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:4: {message}" in result.stderr, result.stderr
    with pytest.raises(ConfigError):
        from clsim.assembly import build_stream

        scenario = parse_scenario(path.read_text(), source=str(path))
        build_stream(scenario, load_dataset("digits"), 0)


# ---------------------------------------------------------------------------
# agreement with Avalanche's strategies on split MNIST
# ---------------------------------------------------------------------------

SPLIT_MNIST = SPLIT_MNIST_PROTOCOL + """\
  naive: {plugins: [naive]}
  replay: {plugins: [{replay: {selection: class_balanced, capacity: 500}}]}
  replay_late:
    plugins: [{replay: {selection: class_balanced, capacity: 500, update: experience_end}}]
"""


@pytest.fixture(scope="module")
def split_mnist(shared_data_root):
    """clsim's runs, and Avalanche's Naive and Replay (mem_size 500) run directly on the
    same stream (same class order), from the same initial model, SGD lr 0.01, batch 128,
    one epoch."""
    scenario = parse_scenario(SPLIT_MNIST)
    summary = run_scenario(scenario, None).summary
    dataset = load_dataset("mnist")
    stream = class_incremental(dataset, seed=0, n_experiences=5)
    assert list(stream.class_order) == summary["class_order"]
    torch.manual_seed(derive_seed(0, "model"))  # the engine's model initialisation
    initial = build_model("mlp", dataset.sample_shape, 10, MLPOptions(hidden=[400, 400]))
    peers = {}
    for name, options in (("Naive", {}), ("Replay", {"mem_size": 500})):
        model = copy.deepcopy(initial)
        strategy = avalanche_strategy(
            name, model, torch.optim.SGD(model.parameters(), lr=0.01),
            batch_size=128, epochs=1, **options)
        peers[name] = run_avalanche(strategy, stream, dataset, seed=0)
    return summary["strategies"], peers


def test_naive_agrees_with_avalanche_naive(split_mnist) -> None:
    ours, peers = split_mnist
    theirs = final_accuracy(peers["Naive"])
    assert abs(ours["naive"]["final_accuracy"] - theirs) <= 0.02, (ours["naive"], theirs)


def test_replay_agrees_with_avalanche_replay(split_mnist) -> None:
    ours, peers = split_mnist
    theirs = final_accuracy(peers["Replay"])
    assert abs(ours["replay"]["final_accuracy"] - theirs) <= 0.05, (ours["replay"], theirs)


def test_replay_on_avalanches_schedule_agrees_closer(split_mnist) -> None:
    """With the memory updated at each experience's end, as Replay does, the two differ
    only in which samples the memory keeps (class- vs experience-balanced)."""
    ours, peers = split_mnist
    theirs = final_accuracy(peers["Replay"])
    gap = abs(ours["replay_late"]["final_accuracy"] - theirs)
    assert gap <= 0.02, (ours["replay_late"], theirs)


# ---------------------------------------------------------------------------
# clsim's metrics against Avalanche's metric classes, on one prediction log
# ---------------------------------------------------------------------------


def prediction_log(seed: int):
    """A random (T x T) prediction log over 4 experiences of unequal test sizes."""
    rng = np.random.default_rng(seed)
    sizes = [30, 45, 20, 60]
    targets = [rng.integers(0, 8, n) for n in sizes]
    preds = [[np.where(rng.random(n) < rng.random(), y, rng.integers(0, 8, n))
              for n, y in zip(sizes, targets, strict=True)] for _ in sizes]
    return preds, targets


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_forgetting_equal_avalanches_metric_classes(seed: int) -> None:
    """Accuracy: Avalanche's Accuracy over the union of test sets after the last
    experience is clsim's final accuracy. Forgetting: Avalanche's (the accuracy right
    after training on j minus the final one) is clsim's negative backward transfer; clsim's
    forgetting is Chaudhry's (from the best accuracy before the last experience), so it
    is never smaller, and equal for each experience exactly when R[j, j] is that best."""
    from avalanche.evaluation.metrics import Accuracy
    from avalanche.evaluation.metrics.forgetting_bwt import Forgetting

    preds, targets = prediction_log(seed)
    matrix: AccuracyMatrix = from_predictions(preds, targets)
    t = len(targets)
    stream = Accuracy()
    for j in range(t):
        stream.update(torch.as_tensor(preds[-1][j]), torch.as_tensor(targets[j]))
    assert stream.result() == pytest.approx(final_accuracy(matrix), abs=1e-12)

    theirs = Forgetting()
    for i in range(t):
        for j in range(i + 1):
            accuracy = Accuracy()
            accuracy.update(torch.as_tensor(preds[i][j]), torch.as_tensor(targets[j]))
            theirs.update(j, accuracy.result(), initial=(i == j))
    per_experience = theirs.result()
    avalanche_forgetting = np.mean([per_experience[j] for j in range(t - 1)])
    assert avalanche_forgetting == pytest.approx(-backward_transfer(matrix), abs=1e-12)
    ours = per_experience_forgetting(matrix)
    r = matrix.accuracy()
    for j in range(t - 1):
        assert ours[j] >= per_experience[j] - 1e-12
        best_is_diagonal = r[j, j] >= r[j : t - 1, j].max()
        assert (abs(ours[j] - per_experience[j]) < 1e-12) == bool(best_is_diagonal)
    assert forgetting(matrix) >= avalanche_forgetting - 1e-12
