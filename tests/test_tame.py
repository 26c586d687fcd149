"""TAME (METHODS.md section 4): loss-jump shift detection, experts, selector, buffer, ledger.

The synthetic stream is A, B, A of two separable two-class tasks (Gaussian blobs on their
own axes), delivered by the ``recurring`` stream type with hidden boundaries; the real one
is task-agnostic split MNIST (scenarios/tame_split_mnist.yaml) on a subset that keeps its
five-task structure. A two-batch stream checks that every expert step runs under the
scenario's ``training.optimizer`` and ``training.nonfinite_loss``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clsim_plugins.tame import (
    PriorityBuffer,
    TameOptions,
    magnitude_prune,
    score_detections,
    threshold,
)
from helpers import without_measurements
from torch import nn

from clsim.config import parse_scenario
from clsim.errors import ConfigError
from clsim.runner import run_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
BATCH = 8
PER_OCCURRENCE = 1000  # training samples of each of A, B, A: 125 batches, > W = 100
# the scenario's SGD lr is 0.05 here (default 0.01): on 125 batches the 16-32-4 MLP must
# converge before its window can describe it (a window still holding the learning curve
# gives a threshold too high to flag the next task on its first batches); the selector
# at 10 x 0.05 = 0.5


def write_blobs(path: Path, per_class: list[int]) -> Path:
    """Four classes of ``per_class`` training samples, each a unit Gaussian around 6 on
    its own axis of 16 (no test sample is nearer another class's mean), 100 test each."""
    rng = np.random.default_rng(0)
    means = 6.0 * np.eye(4, 16)
    x = np.concatenate([means[c] + rng.normal(size=(n, 16)) for c, n in enumerate(per_class)])
    y = np.repeat(np.arange(4), per_class)
    x_test = np.concatenate([means[c] + rng.normal(size=(100, 16)) for c in range(4)])
    np.savez(path, x=x.astype(np.float32), y=y, x_test=x_test.astype(np.float32),
             y_test=np.repeat(np.arange(4), 100))
    return path


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> Path:
    """A = {0, 1} has two occurrences' worth of samples, B = {2, 3} one."""
    per_class = [PER_OCCURRENCE, PER_OCCURRENCE, PER_OCCURRENCE // 2, PER_OCCURRENCE // 2]
    return write_blobs(tmp_path_factory.mktemp("tame") / "blobs.npz", per_class)


def recurring_yaml(path: Path, options: str = "{selector_lr_scale: 10}", *,
                   budget: str = "4 models + 300 exemplars", boundaries: str = "hidden",
                   seed: int = 0) -> str:
    return f"""\
name: tame_synthetic
seed: {seed}
data: {{dataset: npz, path: {path}}}
stream:
  type: recurring
  n_tasks: 2
  sequence: [0, 1, 0]
  class_order: [0, 1, 2, 3]
  eval_every: 400
  boundaries: {boundaries}
model: {{name: mlp, hidden: [32]}}
training: {{batch_size: {BATCH}, optimizer: {{name: sgd, lr: 0.05}}}}
threads: 1
strategies:
  tame:
    budget: {budget}
    plugins: [{{tame: {options}}}]
"""


def run(text: str, **kw) -> dict:
    return run_scenario(parse_scenario(text), None, **kw).summary


@pytest.fixture(scope="module")
def recurring(blobs) -> dict:
    return run(recurring_yaml(blobs))


# ---------------------------------------------------------------------------
# A, B, A: two experts, back to the first
# ---------------------------------------------------------------------------


def test_recurring_stream_creates_two_experts_and_returns_to_the_first(recurring) -> None:
    """Boundaries at 1000 and 2000 samples (multiples of the batch of 8): each shift is
    declared on the first batch of the new task (delay 8 samples, 1 batch); B gets a new
    expert, the second A goes back to expert 0, and nothing else is detected."""
    result = recurring["strategies"]["tame"]
    assert result["status"] == "ok", result["error"]
    report = result["plugins"]["tame"]
    assert recurring["stream"]["true_boundaries"] == [0, 1000, 2000]
    assert report["true_boundaries"] == [0, 1000, 2000]
    assert report["n_experts"] == 2
    assert report["expert_sequence"] == [0, 1, 0]
    assert report["expert_per_task"] == [0, 1, 0]
    assert [s["created"] for s in report["switches"]] == [True, False]
    assert report["detections"] == [1008, 2008]
    assert [b["delay_batches"] for b in report["boundary_detection"]] == [1, 1]
    assert report["missed_boundaries"] == [] and report["false_alarms"] == []
    # every training sample of a task went to its expert (detection on its first batch)
    assert report["expert_samples_per_task"] == [[1000, 0], [0, 1000], [1000, 0]]
    # the oracle route on separable blobs, and pruning as configured by default
    assert report["within_expert_accuracy"] == 1.0
    assert report["expert_sparsity"] == [pytest.approx(0.9, abs=1e-3)] * 2
    assert report["selector_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert json.loads(json.dumps(report)) == report


# (r, s): A's occurrences 1000 + r samples each, B 1000 + s: the boundaries fall r and
# r + s (mod 8) samples into a batch of 8, five different non-zero offsets each
INSIDE_A_BATCH = [(1, 2), (2, 2), (3, 2), (5, 2), (7, 2)]


def test_boundaries_inside_a_batch_still_return_to_the_first_expert(tmp_path) -> None:
    """A, B, A with both boundaries inside a batch, at five offsets each: the batch that
    declares a shift often mixes the two tasks (its end lies within a batch of the
    boundary), and judged on it expert 0 fails its threshold on the second A (a third
    expert in 4 of these 5 streams before the choice moved to the next batch). Every
    offset: exactly 2 experts, sequence 0 1 0, each boundary detected within 2 batches,
    no false alarm, every test sample routed to its task's expert."""
    mixed = 0
    for r, s in INSIDE_A_BATCH:
        per_class = [1000 + r, 1000 + r, 500 + (s + 1) // 2, 500 + s // 2]
        path = write_blobs(tmp_path / f"blobs_{r}_{s}.npz", per_class)
        result = run(recurring_yaml(path))["strategies"]["tame"]
        assert result["status"] == "ok", result["error"]
        report = result["plugins"]["tame"]
        b1, b2 = 1000 + r, 2000 + r + s
        assert report["true_boundaries"] == [0, b1, b2]
        assert (b1 % BATCH, b2 % BATCH) == (r, (r + s) % BATCH) and 0 not in (r, r + s)
        assert report["n_experts"] == 2, (r, s)
        assert report["expert_sequence"] == [0, 1, 0], (r, s)
        assert report["expert_per_task"] == [0, 1, 0]
        assert [sw["created"] for sw in report["switches"]] == [True, False]
        assert report["missed_boundaries"] == [] and report["false_alarms"] == []
        assert all(b["delay_batches"] <= 2 for b in report["boundary_detection"])
        assert report["routing_accuracy"] == 1.0 and report["within_expert_accuracy"] == 1.0
        mixed += sum(d - BATCH < b < d for d, b in zip(report["detections"], (b1, b2),
                                                      strict=True))
    assert mixed >= len(INSIDE_A_BATCH)  # triggering batches holding both tasks: covered


def test_ledger_charges_every_part_exactly(recurring) -> None:
    """mlp [32] on 16 floats, 4 outputs: 676 parameters = 2704 bytes per expert. Expert 0
    is the model; expert 1 is charged to tame.experts; the selector is 16x100 + 100 +
    100x2 + 2 floats; windows 2 x 100 floats; the buffer holds 64-byte samples."""
    result = recurring["strategies"]["tame"]
    parts = result["ledger"][-1]["parts"]
    model = (16 * 32 + 32 + 32 * 4 + 4) * 4
    assert parts["model.parameters"] == model
    assert parts["tame.experts.parameters"] == model
    assert parts["tame.selector.parameters"] == (16 * 100 + 100 + 100 * 2 + 2) * 4
    assert parts["tame.loss_windows"] == 2 * 100 * 4
    assert parts["tame.smoothed_losses"] == parts["tame.thresholds"] == 2 * 4
    assert parts["tame.window_fill"] == 2 * 8
    assert parts["tame.expert_classes"] == 2 * 4
    assert parts["tame.switches"] == 2 * 5 * 8
    capacity = result["plugins"]["tame"]["buffer"]["capacity"]
    assert parts["tame.buffer.x"] == capacity * 64
    assert parts["tame.buffer.priorities"] == capacity * 4
    assert parts["tame.buffer.experts"] == capacity * 2
    assert parts["tame.buffer.labels"] == parts["tame.buffer.filled"] == capacity
    assert not result["memory_estimated"] and not result["over_budget"]
    # the buffer fills what the budget leaves but the log reserve (64 switches of 40
    # bytes, 2 of them used now) and less than one slot
    slot, reserve = 64 + 1 + 2 + 4 + 1, 64 * 5 * 8
    assert reserve - 2 * 40 <= result["budget_bytes"] - result["peak_bytes"] < reserve + slot


def test_visible_boundaries_are_ignored(blobs, recurring) -> None:
    """With visible boundaries (before/after_experience at each true task, with data) the
    detector does the same thing from the same batches: the same switches, experts and
    accuracy."""
    visible = run(recurring_yaml(blobs, boundaries="visible"))["strategies"]["tame"]
    assert visible["status"] == "ok", visible["error"]
    hidden = recurring["strategies"]["tame"]["plugins"]["tame"]
    report = visible["plugins"]["tame"]
    for key in ("switches", "n_experts", "expert_per_task", "within_expert_accuracy",
                "routing_accuracy", "expert_sparsity"):
        assert report[key] == hidden[key], key


def test_pruning_can_be_disabled(blobs) -> None:
    """prune: false keeps every weight (experts and selector dense) and the same A, B, A."""
    dense = run(recurring_yaml(blobs, "{selector_lr_scale: 10, prune: false}"))
    dense = dense["strategies"]["tame"]
    assert dense["status"] == "ok", dense["error"]
    report = dense["plugins"]["tame"]
    assert report["pruning"] is False
    assert report["expert_sparsity"] == [0.0, 0.0] and report["selector_sparsity"] == 0.0
    assert report["expert_sequence"] == [0, 1, 0]


def test_same_seed_same_results(blobs, recurring) -> None:
    again = run(recurring_yaml(blobs))["strategies"]["tame"]
    assert without_measurements(again) == without_measurements(recurring["strategies"]["tame"])


def test_budget_too_small_for_a_second_expert_names_the_minimum(blobs) -> None:
    """One model and 100 samples' bytes fit the first expert; the shift to B needs a
    second: the run fails naming the minimum budget, and with exactly that budget it
    goes through, keeping one sample per class."""
    small = run(recurring_yaml(blobs, budget="1 model + 100 exemplars"))["strategies"]["tame"]
    assert small["status"] == "failed"
    assert "2 expert(s) with their optimizer state, the selector" in small["error"]
    minimum = int(small["error"].split("the minimum budget is ")[1].split()[0])
    exact = run(recurring_yaml(blobs, budget=str(minimum)))["strategies"]["tame"]
    assert exact["status"] == "ok", exact["error"]
    assert exact["plugins"]["tame"]["n_experts"] == 2
    assert exact["plugins"]["tame"]["buffer"]["per_class"] == 1
    assert not exact["over_budget"]


# ---------------------------------------------------------------------------
# task-agnostic split MNIST
# ---------------------------------------------------------------------------


def test_split_mnist_every_boundary_detected_without_false_alarm(
    shared_data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scenarios/tame_split_mnist.yaml, first 3000 training images of each task (187
    batches of 16 and one of 8 each): 5 experts, one per task, each boundary detected
    within 2 batches, no false alarm, at the published detector (W = 100, a = 0.2, 3 std).
    The full stream is measured in the report (same figures, tasks of ~12,000 images)."""
    monkeypatch.setenv("CLSIM_DATA", str(shared_data_root))
    scenario = parse_scenario((SCENARIOS / "tame_split_mnist.yaml").read_text())
    result = run_scenario(scenario, None, only=["tame"], limit=3000).summary
    tame = result["strategies"]["tame"]
    assert tame["status"] == "ok", tame["error"]
    report = tame["plugins"]["tame"]
    assert report["true_boundaries"] == [0, 3000, 6000, 9000, 12000]
    assert report["n_experts"] == 5
    assert report["expert_sequence"] == [0, 1, 2, 3, 4]
    assert report["expert_per_task"] == [0, 1, 2, 3, 4]
    assert report["missed_boundaries"] == [] and report["false_alarms"] == []
    assert all(b["delay_batches"] <= 2 for b in report["boundary_detection"])
    assert not tame["over_budget"]


# ---------------------------------------------------------------------------
# the parts, exactly
# ---------------------------------------------------------------------------


def test_buffer_keeps_the_top_priorities_of_each_class_in_any_arrival_order() -> None:
    """After every batch, each class holds exactly its min(k, offered) highest
    priorities (k = capacity // classes seen), whatever the order of arrival: the stored
    set is a function of the i.i.d. priorities alone, so it is a uniform sample."""
    g = torch.Generator().manual_seed(3)
    n = 400
    labels = torch.randint(0, 6, (n,), generator=g)
    labels[:40] = labels[:40] % 2  # classes 2..5 appear later, so k shrinks
    priorities = torch.rand(n, generator=g)
    ids = torch.arange(n).unsqueeze(1)  # each sample is its own id

    def fill(order: torch.Tensor) -> PriorityBuffer:
        buffer = PriorityBuffer(50, (1,), torch.int64, 6)
        for start in range(0, n, 16):
            index = order[start : start + 16]
            buffer.offer(ids[index], labels[index], 0, priorities[index])
            offered = order[: start + 16]
            k = 50 // len(labels[offered].unique())
            assert buffer.per_class() == k
            x, y, _ = buffer.stored()
            for c in labels[offered].unique().tolist():
                mine = offered[labels[offered] == c]
                top = mine[torch.argsort(priorities[mine], descending=True)[:k]]
                assert set(x[y == c, 0].tolist()) == set(top.tolist())
        return buffer

    a = fill(torch.arange(n))
    b = fill(torch.cat([torch.arange(40), 40 + torch.randperm(n - 40, generator=g)]))
    assert set(a.stored()[0][:, 0].tolist()) == set(b.stored()[0][:, 0].tolist())
    # shrinking keeps the highest priorities per class too
    small = a.resized(24)
    x, y, _ = small.stored()
    for c in range(6):
        mine = torch.arange(n)[labels == c]
        top = mine[torch.argsort(priorities[mine], descending=True)[:4]]
        assert set(x[y == c, 0].tolist()) == set(top.tolist())


def test_threshold_pruning_and_detection_scoring() -> None:
    window = torch.tensor([0.1, 0.3, 0.2, 0.4])
    std = float(window.std(unbiased=False))
    assert float(threshold(window, 3.0, 0.005)) == pytest.approx(0.25 + 3 * std)
    assert float(threshold(torch.full((100,), 0.2), 3.0, 0.005)) == pytest.approx(0.215)
    # global magnitude pruning: the smallest |w| over both layers, not per layer
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]]))
        net[1].weight.copy_(torch.tensor([[0.5, -7.0], [8.0, 0.25]]))
    magnitude_prune(net, 0.4)  # 4 of 10 weights: |0.25|, |0.5|, |1|, |2|
    assert net[0].weight.tolist() == [[0.0, 0.0, 3.0], [-4.0, 5.0, -6.0]]
    assert net[1].weight.tolist() == [[0.0, -7.0], [8.0, 0.0]]
    # scoring: first detection in (b, b + window] and before the next boundary
    scores = score_detections([105, 120, 330, 700], [0, 100, 300, 600], window=50)
    assert [p["detection"] for p in scores["boundaries"]] == [105, 330, None]
    assert [p["delay_samples"] for p in scores["boundaries"]] == [5, 30, None]
    assert scores["missed_boundaries"] == [600]
    assert scores["false_alarms"] == [120, 700]


def test_published_defaults_and_bad_options(blobs) -> None:
    o = TameOptions()
    assert (o.window, o.smoothing, o.n_std, o.min_std) == (100, 0.2, 3.0, 0.005)
    assert o.prune and o.expert_sparsity == 0.9
    # the experts' lr is the scenario's (training.optimizer), no longer an option
    for options, key in (("{smoothing: 1.5}", "smoothing"), ("{windw: 50}", "windw"),
                         ("{lr: 0.05}", "lr"), ("{selector_lr_scale: 0}", "selector_lr_scale"),
                         ("{expert_sparsity: 1.0}", "expert_sparsity"), ("{window: 1}", "window")):
        with pytest.raises(ConfigError, match=key):
            parse_scenario(recurring_yaml(blobs, options))
    # no budget and no capacity: refused, naming the option
    text = recurring_yaml(blobs).replace("    budget: 4 models + 300 exemplars\n", "")
    failed = run(text)["strategies"]["tame"]
    assert failed["status"] == "failed" and "capacity" in failed["error"]
    # an offline stream with several epochs: refused (each sample is seen once)
    offline = """\
name: t
seed: 0
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [16]}
training: {epochs: 2, batch_size: 32}
strategies:
  tame:
    plugins: [{tame: {capacity: 100}}]
"""
    failed = run(offline)["strategies"]["tame"]
    assert failed["status"] == "failed" and "training.epochs" in failed["error"]


# ---------------------------------------------------------------------------
# every step under the scenario's training settings
# ---------------------------------------------------------------------------

TWO_BATCHES = 16  # training samples of the one-experience stream: two batches of 8
SEEN: dict[str, object] = {}  # what Probe saw, outside any plugin the ledger walks


class Probe:
    """Listed after tame: keeps the model as tame's setup left it (expert 0, its whole
    label space switched on), the stream's training inputs in order, and the model after."""

    def clsim_setup(self, ctx) -> None:
        SEEN["before"] = copy.deepcopy(ctx.model)

    def clsim_after_experience(self, ctx, experience) -> None:
        SEEN["inputs"] = ctx.to_input(experience.train_x)
        SEEN["labels"] = experience.train_y.long()
        SEEN["after"] = copy.deepcopy(ctx.model)


class PoisonFirstStep:
    """Listed after tame: puts a NaN into the first batch a gradient step is taken on
    (a forward pre-hook on expert 0), as a corrupt sample would; clsim refuses data files
    holding NaN, so the poison comes in past the loader."""

    def clsim_setup(self, ctx) -> None:
        def poison(module, args):
            if not (module.training and torch.is_grad_enabled()) or SEEN.get("poisoned"):
                return None
            SEEN["poisoned"] = True
            inputs = args[0].clone()
            inputs[3, 5] = float("nan")
            return (inputs, *args[1:])

        ctx.model.register_forward_pre_hook(poison)


@pytest.fixture
def probe(monkeypatch) -> str:
    monkeypatch.setitem(sys.modules, "tame_test_plugins", sys.modules[__name__])
    SEEN.clear()
    return "tame_test_plugins:Probe"


def two_batch_yaml(tmp_path: Path, probe: str, *, poison: bool = False,
                   nonfinite: str = "stop") -> str:
    """One experience of two classes, 16 training samples (a NaN put into the first
    batch with ``poison``), boundaries visible so that after_experience carries them."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(TWO_BATCHES + 8, 16)).astype(np.float32)
    y = np.arange(TWO_BATCHES + 8) % 2
    plugins = f"[{{tame: {{capacity: 20}}}}, '{probe}'"
    plugins += ", 'tame_test_plugins:PoisonFirstStep']" if poison else "]"
    path = tmp_path / "two.npz"
    np.savez(path, x=x[:TWO_BATCHES], y=y[:TWO_BATCHES], x_test=x[TWO_BATCHES:],
             y_test=y[TWO_BATCHES:])
    return f"""\
name: tame_two_batches
seed: 0
data: {{dataset: npz, path: {path}}}
stream: {{type: class_incremental, n_experiences: 1, online: true, eval_every: 100}}
model: {{name: mlp, hidden: [8]}}
training:
  batch_size: {BATCH}
  optimizer: {{name: adam, lr: 0.01}}
  nonfinite_loss: {nonfinite}
threads: 1
strategies:
  tame:
    plugins: {plugins}
"""


def adam_reference(steps: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Expert 0 as it was after setup, stepped by one Adam (lr 0.01) over ``steps``."""
    model = copy.deepcopy(SEEN["before"])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for inputs, labels in steps:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model


def assert_same_weights(model: nn.Module, expected: nn.Module) -> None:
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values(),
                                 strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def test_expert_steps_are_the_scenarios_optimizer_with_state_kept(tmp_path, probe) -> None:
    """training.optimizer is Adam, lr 0.01: expert 0 ends exactly where one Adam carried
    over both batches puts it (not two fresh Adams, whose every step moves each weight by
    lr, nor SGD), and the ledger charges the state kept between batches: two moments per
    parameter and a float32 step count per tensor."""
    result = run(two_batch_yaml(tmp_path, probe))["strategies"]["tame"]
    assert result["status"] == "ok", result["error"]
    inputs, labels = SEEN["inputs"], SEEN["labels"]
    batches = [(inputs[i : i + BATCH], labels[i : i + BATCH]) for i in (0, BATCH)]
    assert_same_weights(SEEN["after"], adam_reference(batches))
    fresh = adam_reference(batches[1:])  # the second batch with a fresh Adam state
    assert not torch.allclose(SEEN["after"].state_dict()["head.weight"] -
                              SEEN["before"].state_dict()["head.weight"],
                              fresh.state_dict()["head.weight"] -
                              SEEN["before"].state_dict()["head.weight"])
    params = list(SEEN["before"].parameters())
    parts = result["ledger"][-1]["parts"]
    assert parts["tame.optimizer_state"] == 2 * sum(p.numel() * 4 for p in params) + \
        4 * len(params)
    assert not result["memory_estimated"]


def test_a_nan_batch_is_skipped_as_if_never_drawn(tmp_path, probe) -> None:
    """nonfinite_loss: skip_batch: the batch holding the NaN sample is counted, takes no
    step and is not buffered; expert 0 is exactly one Adam step on the other batch."""
    result = run(two_batch_yaml(tmp_path, probe, poison=True, nonfinite="skip_batch"))
    result = result["strategies"]["tame"]
    assert result["status"] == "ok", result["error"]
    assert result["skipped_batches"] == 1
    assert SEEN["poisoned"]
    inputs, labels = SEEN["inputs"], SEEN["labels"]
    clean = [(inputs[BATCH:], labels[BATCH:])]  # the first batch was poisoned
    assert_same_weights(SEEN["after"], adam_reference(clean))
    assert result["plugins"]["tame"]["buffer"]["stored"] == BATCH


def test_a_nan_batch_stops_the_run_by_default(tmp_path, probe) -> None:
    """nonfinite_loss: stop: the loop's error, naming the loss and the remedy."""
    result = run(two_batch_yaml(tmp_path, probe, poison=True))["strategies"]["tame"]
    assert result["status"] == "failed"
    assert "the loss became nan" in result["error"]
    assert "training.nonfinite_loss: skip_batch" in result["error"]
