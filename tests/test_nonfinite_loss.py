"""training.nonfinite_loss: stop naming the batch at fault, or skip the batch exactly.

``skip_batch`` discards a batch whose loss is NaN or infinite as if it had not been drawn
(no backward, no optimizer step, no after_* hooks), so a run with poisoned batches must
end with exactly the weights of a run on the same batch sequence without them.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from helpers import DIGITS_SCENARIO, bare_context

from clsim.assembly import build_stream
from clsim.config import OptimizerConfig, TrainingConfig, parse_scenario
from clsim.data import load_dataset
from clsim.errors import ConfigError
from clsim.loop_types import ExperiencePlan
from clsim.models import MLPOptions, build_model
from clsim.plugin_manager import HookRunner, build_plugin_manager
from clsim.runner import run_scenario
from clsim.training import Trainer

BATCH = 32


class Poison:
    """Adds ``value`` to the loss of every ``every``-th batch (1-based: every, 2*every, ...)
    and counts which hooks fired, so the skipped batches' after_* hooks can be checked."""

    value = float("nan")
    every = 3

    def __init__(self) -> None:
        self.losses = 0
        self.after = {"clsim_after_backward": 0, "clsim_after_update": 0, "clsim_after_batch": 0}

    def poisoned(self, number: int) -> bool:
        return number % self.every == 0

    def clsim_loss(self, logits):
        self.losses += 1
        if self.poisoned(self.losses):
            return torch.full((), self.value, device=logits.device)
        return None

    def clsim_after_backward(self):
        self.after["clsim_after_backward"] += 1

    def clsim_after_update(self):
        self.after["clsim_after_update"] += 1

    def clsim_after_batch(self):
        self.after["clsim_after_batch"] += 1


class PoisonInf(Poison):
    value = float("inf")


class PoisonAll(Poison):
    every = 1


@pytest.fixture
def this_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "nonfinite_test_plugins", sys.modules[__name__])
    return "nonfinite_test_plugins"


def _trainer(model, dataset, plugins, *, epochs, seed=7, momentum=0.9):
    config = TrainingConfig(epochs=epochs, batch_size=BATCH, nonfinite_loss="skip_batch",
                            optimizer=OptimizerConfig(lr=0.1, momentum=momentum))
    ctx = bare_context(model, dataset, batch_size=BATCH)
    hooks = HookRunner(build_plugin_manager(plugins))
    return Trainer(ctx, hooks, config, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("poison_class", [Poison, PoisonInf])
def test_skipped_batches_leave_exactly_the_weights_of_a_run_without_them(poison_class):
    """Two epochs of shuffled batches, every third poisoned; SGD with momentum, so a
    skipped batch that still stepped (even with zero gradients) would move the weights.
    The reference replays the same permutations with the poisoned batches removed."""
    dataset = load_dataset("digits")
    n = 10 * BATCH  # whole batches only, so the kept ones chunk identically
    x, y = dataset.x_train[:n], dataset.y_train[:n]
    torch.manual_seed(0)
    model = build_model("mlp", dataset.sample_shape, dataset.n_classes, MLPOptions(hidden=[32]))
    reference_model = copy.deepcopy(model)

    poison = poison_class()
    trainer = _trainer(model, dataset, [("poison", poison)], epochs=2)
    trainer.fit(ExperiencePlan(x, y, None, epochs=2))
    trainer.end_experience()  # batches were trained: no error

    orders = torch.Generator().manual_seed(7)
    kept = []
    for epoch in range(2):
        order = torch.randperm(n, generator=orders)
        for b in range(n // BATCH):
            if not poison.poisoned(epoch * (n // BATCH) + b + 1):
                kept.append(order[b * BATCH : (b + 1) * BATCH])
    kept = torch.cat(kept)
    reference = _trainer(reference_model, dataset, [], epochs=1)
    reference.fit(ExperiencePlan(x[kept], y[kept], None, epochs=1), shuffle=False)

    poisoned = 2 * (n // BATCH) // 3  # batches 3, 6, ..., 18 of 20
    assert trainer.skipped_batches == poisoned == 6
    assert poison.after == dict.fromkeys(poison.after, 20 - poisoned)
    state, expected = model.state_dict(), reference_model.state_dict()
    assert all(torch.isfinite(t).all() for t in state.values())
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_skip_batch_counts_logs_and_reports_through_the_engine(this_module, tmp_path):
    text = DIGITS_SCENARIO.replace("optimizer:", "nonfinite_loss: skip_batch, optimizer:").replace(
        "plugins: [naive]", f"plugins: [naive, '{this_module}:Poison']")
    scenario = parse_scenario(text)
    result = run_scenario(scenario, tmp_path / "out")
    outcome = result.outcomes[0]
    assert outcome.error is None
    stream = build_stream(scenario, load_dataset("digits"), scenario.seed)
    per_experience = [math.ceil(e.n_train / 64) for e in stream]  # batch_size 64, 1 epoch
    expected = sum(per_experience) // 3  # every third clsim_loss call, counted over the run
    assert outcome.metrics["skipped_batches"] == expected > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["strategies"]["naive"]["skipped_batches"] == expected
    assert summary["config"]["training"]["nonfinite_loss"] == "skip_batch"
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").open()]
    skipped = [e for e in events if e["event"] == "batch_skipped"]
    assert len(skipped) == expected
    # each names the experience, epoch and batch (numbered within the experience's fit)
    poisoned, calls = [], 0
    for experience, n_batches in enumerate(per_experience):
        for batch in range(1, n_batches + 1):
            calls += 1
            if calls % 3 == 0:
                poisoned.append((experience, 1, batch))
    assert [(e["experience"], e["epoch"], e["batch"]) for e in skipped] == poisoned
    assert {e["loss"] for e in skipped} == {"nan"} and {e["strategy"] for e in skipped} == {
        "naive"}


@pytest.mark.parametrize(("plugin", "shown"), [("Poison", "nan"), ("PoisonInf", "inf")])
def test_stop_names_the_first_non_finite_batch(this_module, plugin, shown):
    text = DIGITS_SCENARIO.replace("plugins: [naive]",
                                   f"plugins: [naive, '{this_module}:{plugin}']")
    scenario = parse_scenario(text)
    assert scenario.training.nonfinite_loss == "stop"  # the default
    outcome = run_scenario(scenario, None).outcomes[0]
    n_batches = math.ceil(next(iter(build_stream(scenario, load_dataset("digits"), 0))).n_train
                          / 64)
    assert outcome.error == (
        f"strategy 'naive': the loss became {shown} in epoch 1, batches 1-{n_batches} of "
        "experience 0 (first at batch 3); lower the learning rate, check the plugins' loss "
        "terms, or set training.nonfinite_loss: skip_batch"
    )
    assert "skipped_batches" not in outcome.metrics


def test_an_experience_with_every_batch_skipped_is_an_error(this_module):
    text = DIGITS_SCENARIO.replace("optimizer:", "nonfinite_loss: skip_batch, optimizer:").replace(
        "plugins: [naive]", f"plugins: [naive, '{this_module}:PoisonAll']")
    scenario = parse_scenario(text)
    n_batches = math.ceil(next(iter(build_stream(scenario, load_dataset("digits"), 0))).n_train
                          / 64)
    outcome = run_scenario(scenario, None).outcomes[0]
    assert outcome.error == (
        f"strategy 'naive': every batch of experience 0 had a non-finite loss ({n_batches} "
        "skipped, none trained), so nothing was learned; lower the learning rate or check the "
        "plugins' loss terms"
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("nonfinite_loss: skip_batches", "s.yaml:6: training.nonfinite_loss: expected one of "
         "'stop', 'skip_batch'; got 'skip_batches' (string) (did you mean 'skip_batch'?)"),
        ("nonfinite_los: stop", "s.yaml:6: training.nonfinite_los: unknown key 'nonfinite_los' "
         "(known keys: epochs, batch_size, eval_batch_size, optimizer, nonfinite_loss, "
         "memory_format); did you mean 'nonfinite_loss'?"),
        ("nonfinite_loss: true", "s.yaml:6: training.nonfinite_loss: expected one of 'stop', "
         "'skip_batch'; got True (boolean)"),
    ],
)
def test_a_mistyped_option_is_a_config_error_with_a_suggestion(entry, message):
    text = DIGITS_SCENARIO.replace("optimizer:", f"{entry}, optimizer:")
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, source="s.yaml")
    assert str(info.value) == message
