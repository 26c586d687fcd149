"""The event loop end to end: determinism, the accuracy matrix, owned training, the device."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DIGITS_SCENARIO

from clsim.assembly import resolve_device
from clsim.config import load_scenario, parse_scenario
from clsim.engine import StrategyOutcome
from clsim.errors import ConfigError
from clsim.runner import run_scenario

THREE_STRATEGIES = (
    DIGITS_SCENARIO
    + """\
  reservoir:
    budget: model + 100 exemplars
    plugins: [replay]
  herding_nme:
    budget: model + 100 exemplars
    plugins: [{replay: {selection: herding, nme: true}}]
"""
)


def metrics_json(summary: dict) -> str:
    """The summary without wall-clock fields, serialised exactly as summary.json is."""
    strategies = {
        name: StrategyOutcome.comparable(s)
        for name, s in summary["strategies"].items()
    }
    return json.dumps({**summary, "strategies": strategies}, indent=2)


def test_same_seed_gives_byte_identical_metrics(tmp_path):
    scenario = parse_scenario(THREE_STRATEGIES)
    first = run_scenario(scenario, tmp_path / "a")
    run_scenario(scenario, tmp_path / "b")
    assert all(o.error is None for o in first.outcomes), [o.error for o in first.outcomes]
    on_disk = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("a", "b")]
    assert metrics_json(on_disk[0]) == metrics_json(on_disk[1])
    assert metrics_json(first.summary) == metrics_json(on_disk[0])


def test_different_seed_changes_class_order_and_results():
    scenario = parse_scenario(DIGITS_SCENARIO)
    a = run_scenario(scenario, None, seed=1).summary
    b = run_scenario(scenario, None, seed=2).summary
    assert a["class_order"] != b["class_order"]
    assert (
        a["strategies"]["naive"]["accuracy_matrix"] != b["strategies"]["naive"]["accuracy_matrix"]
    )


def test_accuracy_matrix_is_consistent_with_the_summary_metrics():
    summary = run_scenario(parse_scenario(DIGITS_SCENARIO), None).summary
    naive = summary["strategies"]["naive"]
    matrix = naive["accuracy_matrix"]
    sizes = summary["stream"]["experience_test_sizes"]
    assert len(matrix) == len(sizes) == 5 and all(len(row) == 5 for row in matrix)
    # final accuracy is the sample-weighted last row: accuracy on the union of test sets
    weighted = sum(a * n for a, n in zip(matrix[-1], sizes, strict=True)) / sum(sizes)
    assert naive["final_accuracy"] == pytest.approx(weighted, abs=1e-12)
    # seen accuracy after experience i covers experiences 0..i only
    for i, seen in enumerate(naive["seen_accuracy"]):
        part = sum(matrix[i][j] * sizes[j] for j in range(i + 1)) / sum(sizes[: i + 1])
        assert seen == pytest.approx(part, abs=1e-12)
    assert naive["forgetting"] > 0.5  # naive forgets: the defining failure


def test_joint_is_charged_for_every_sample_it_keeps():
    text = DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: [joint]")
    summary = run_scenario(parse_scenario(text), None).summary
    # kept between experiences (the readings at each experience's end)
    ledger = [r for r in summary["strategies"]["naive"]["ledger"] if r["point"] == "end"]
    sizes = summary["stream"]["experience_classes"]
    assert len(sizes) == 5
    per_sample = summary["dataset"]["sample_bytes"]  # 64 uint8 values
    from clsim.data import load_dataset

    digits = load_dataset("digits")
    kept = 0
    for record, classes in zip(ledger, sizes, strict=True):
        n = int(torch.isin(digits.y_train, torch.tensor(classes)).sum())
        kept += n * per_sample + n * 8  # images at 1 byte per value, int64 labels
        assert record["parts"]["joint.seen_x"] + record["parts"]["joint.seen_y"] == kept


class OwnsTraining:
    """Trains nothing itself but claims the experience, so the standard loop must not run."""

    def __init__(self):
        self.batches = 0

    def clsim_train_experience(self, experience):
        return True

    def clsim_after_batch(self):
        self.batches += 1


class CountsPredictions:
    def clsim_predict(self, x):
        return torch.zeros(len(x), dtype=torch.long)  # always class 0


class NaNLoss:
    def clsim_loss(self, logits):
        return logits.sum() * float("nan")


@pytest.fixture
def local_plugins(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "engine_test_plugins", sys.modules[__name__])
    return "engine_test_plugins"


def test_a_plugin_that_owns_training_replaces_the_loop(local_plugins):
    text = DIGITS_SCENARIO.replace("plugins: [naive]", f"plugins: ['{local_plugins}:OwnsTraining']")
    result = run_scenario(parse_scenario(text), None)
    outcome = result.summary["strategies"]["naive"]
    assert outcome["status"] == "ok"
    # untrained model: the accuracy matrix rows are all equal to the initial evaluation
    assert all(row == outcome["initial_accuracy"] for row in outcome["accuracy_matrix"])


def test_predict_hook_replaces_the_argmax(local_plugins):
    text = DIGITS_SCENARIO.replace(
        "plugins: [naive]", f"plugins: ['{local_plugins}:CountsPredictions']"
    )
    summary = run_scenario(parse_scenario(text), None).summary
    rows = summary["strategies"]["naive"]["accuracy_matrix"]
    has_zero = [0 in classes for classes in summary["stream"]["experience_classes"]]
    for row in rows:  # class 0 is right exactly on the experience holding it, in proportion
        assert [value > 0 for value in row] == has_zero


def test_nan_loss_stops_the_strategy_with_a_clear_message(local_plugins):
    text = DIGITS_SCENARIO.replace("plugins: [naive]", f"plugins: ['{local_plugins}:NaNLoss']")
    error = run_scenario(parse_scenario(text), None).outcomes[0].error
    assert error.startswith("strategy 'naive': the loss became nan in epoch 1, batches 1-")


def test_task_labels_restrict_predictions_to_the_task():
    text = DIGITS_SCENARIO.replace("n_experiences: 5}", "n_experiences: 5, task_labels: true}")
    task_il = run_scenario(parse_scenario(text), None).summary["strategies"]["naive"]
    class_il = run_scenario(parse_scenario(DIGITS_SCENARIO), None).summary["strategies"]["naive"]
    # with the task known, a 2-way choice on old tasks beats the 10-way class-incremental one
    assert task_il["final_accuracy"] > class_il["final_accuracy"] + 0.2


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_split_mnist_naive_forgets_and_replay_remembers(shared_data_root, monkeypatch):
    """The foundation's headline: catastrophic forgetting, and replay's remedy (real MNIST)."""
    from helpers import REPO_ROOT

    monkeypatch.setenv("CLSIM_DATA", str(shared_data_root))
    scenario = load_scenario(REPO_ROOT / "scenarios" / "split_mnist.yaml")
    summary = run_scenario(scenario, None, only=["naive", "replay"]).summary["strategies"]
    naive, replay = summary["naive"], summary["replay"]
    # naive ends near the accuracy of the last task's two digits alone (~0.19)
    assert 0.15 < naive["final_accuracy"] < 0.23
    assert naive["accuracy_matrix"][-1][-1] > 0.95
    assert replay["final_accuracy"] > naive["final_accuracy"] + 0.4
    assert (
        not replay["over_budget"] and replay["ledger"][-1]["parts"]["replay.buffer.x"] == 500 * 784
    )


def test_to_input_never_changes_the_callers_tensor():
    """float32 data would otherwise be normalised in place on every evaluation."""
    from clsim.data.dataset import Dataset

    x = torch.full((4, 3), 51.0)
    data = Dataset("f", x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long),
                   ("a",), scale=0.5, mean=(1.0,), std=(2.0,))
    out = data.to_input(x)
    assert torch.equal(x, torch.full((4, 3), 51.0))
    assert torch.allclose(out, torch.full((4, 3), (51.0 * 0.5 - 1.0) / 2.0))


GRADS_AFTER_EXPERIENCE: list[bool] = []  # written by the plugin below, outside its state


class KeepsLookingAtGrads:
    """Records whether any gradient survives to the end of an experience."""

    def clsim_after_experience(self, ctx):
        GRADS_AFTER_EXPERIENCE.append(any(p.grad is not None for p in ctx.model.parameters()))


def test_gradients_are_not_held_between_experiences(local_plugins):
    GRADS_AFTER_EXPERIENCE.clear()
    text = DIGITS_SCENARIO.replace(
        "plugins: [naive]", f"plugins: ['{local_plugins}:KeepsLookingAtGrads']")
    assert run_scenario(parse_scenario(text), None).outcomes[0].error is None
    assert GRADS_AFTER_EXPERIENCE == [False] * 5


def test_an_experience_without_test_samples_is_a_config_error(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 4), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    test_x, test_y = x[y < 3], y[y < 3]  # class 3 has no test samples
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=test_x, y_test=test_y)
    text = DIGITS_SCENARIO.replace("{dataset: digits}", "{dataset: npz, path: d.npz}").replace(
        "n_experiences: 5", "n_experiences: 4, class_order: [0, 1, 2, 3]")
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"experience 3 \(classes \[3\]\) has no test"):
        run_scenario(load_scenario(tmp_path / "s.yaml"), None)
