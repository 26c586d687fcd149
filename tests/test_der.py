"""DER and DER++ (plugins/der.py): the logits stored are those the model produced,
the dark-knowledge term and DER++'s cross-entropy, the ledger charge of samples, labels
and float32 logits, the budget-sized capacity, and end-to-end runs against naive."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clsim_plugins.der import DerPlugin, logit_distance
from helpers import bare_context, digits_scenario

from clsim.assembly import build_stream, load_scenario_data
from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.engine import run_strategy
from clsim.runner import run_scenario
from clsim.stream import Batch


def scenario_text(strategies: str, epochs: int = 3) -> str:
    return digits_scenario(strategies, hidden=64, epochs=epochs, batch_size=32,
                           lr=0.05, name="der")




ITEM_BYTES = 64 + 1 + 10 * 4  # an 8x8 uint8 digit, its uint8 label, 10 float32 logits


class RecordingDer(DerPlugin):
    """DER that keeps a copy of the model and the stream's samples of every batch, taken
    before its forward pass (plain lists, outside any budget)."""

    def clsim_setup(self, ctx) -> None:
        super().clsim_setup(ctx)
        self.records: list[tuple[torch.nn.Module, torch.Tensor]] = []

    def clsim_before_batch(self, ctx, batch) -> None:
        self.records.append((copy.deepcopy(ctx.model), batch.x.clone()))


def test_the_buffer_holds_the_logits_the_model_produced_when_storing(monkeypatch) -> None:
    """A memory larger than every sample offered keeps them in the order offered; each
    row's logits equal a forward of the model as it was at that batch (a saved copy)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    scenario = parse_scenario(scenario_text(epochs=1, strategies=(
        f"  der: {{plugins: [{{'{__name__}:RecordingDer': {{capacity: 5000, beta: 0.5}}}}]}}\n")))
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    outcome = run_strategy(scenario, scenario.strategies["der"], dataset, stream, seed=0,
                           device=torch.device("cpu"), keep=True)
    assert outcome.error is None
    plugin = next(iter(outcome.plugins.values()))
    info, offset = dataset.info(), 0
    with torch.no_grad():
        for model, x in plugin.records:
            expected = model(info.to_input(x))
            stored = plugin.buffer.logits[offset : offset + len(x)]
            assert torch.equal(plugin.buffer.x[offset : offset + len(x)], x)
            assert torch.allclose(stored, expected, rtol=0, atol=1e-6)
            offset += len(x)
    assert offset == plugin.buffer.size == sum(exp.n_train for exp in stream)
    first = next(plugin.records[0][0].parameters())
    assert not torch.equal(first, next(outcome.model.parameters()))  # the model did move


def filled(beta: float, alpha: float = 0.3):
    """A DER plugin driven by hand, its memory holding 40 digits with the logits of a
    small linear model."""
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    ctx = bare_context(model, dataset)
    plugin = DerPlugin(DerPlugin.Options(alpha=alpha, beta=beta, capacity=40))
    plugin.clsim_setup(ctx)
    x, y = dataset.x_train[:40], dataset.y_train[:40]
    with torch.no_grad():
        plugin.clsim_after_batch(ctx, Batch(x, y), model(ctx.to_input(x)))
    return plugin, ctx, model, x, y


def test_the_der_term_is_zero_for_an_unchanged_model_and_mse_once_it_moves() -> None:
    """Memory batches of 64 >= 40 stored: every sample, in some order. Unchanged model:
    0. After a change: alpha x the mean squared distance to the stored logits."""
    plugin, ctx, model, x, _ = filled(beta=0.0)
    batch = Batch(torch.zeros(64, 1, 8, 8, dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    assert float(plugin.clsim_loss(ctx, batch).detach()) == pytest.approx(0, abs=1e-12)
    stored = model(ctx.to_input(x)).detach()
    with torch.no_grad():
        model[1].weight.add_(0.1)
    expected = 0.3 * F.mse_loss(model(ctx.to_input(x)), stored)
    assert float(plugin.clsim_loss(ctx, batch).detach()) == pytest.approx(float(expected.detach()),
                                                                          rel=1e-5)


def test_der_plus_plus_adds_beta_times_the_memory_cross_entropy() -> None:
    plugin, ctx, model, x, y = filled(beta=0.5)
    batch = Batch(torch.zeros(64, 1, 8, 8, dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    expected = 0.5 * F.cross_entropy(model(ctx.to_input(x)), y)
    assert float(plugin.clsim_loss(ctx, batch).detach()) == pytest.approx(float(expected.detach()),
                                                                          rel=1e-5)


def test_logits_the_head_did_not_produce_are_left_out_of_the_distance() -> None:
    """NaN columns (a narrower head when stored, a switched-off output) do not count; a
    head wider than the stored vector is compared on the stored columns."""
    current = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    stored = torch.tensor([[0.0, 2.0, float("nan")], [0.0, 1.0, float("nan")]])
    assert float(logit_distance(current, stored)) == pytest.approx((1 + 0 + 0 + 4) / 4)
    assert float(logit_distance(current, stored[:, :2])) == pytest.approx(5 / 4)


def test_a_fixed_memory_is_charged_samples_labels_and_float32_logits(tmp_path: Path) -> None:
    scenario = parse_scenario(scenario_text(
        epochs=1, strategies="  fixed: {plugins: [{der: {capacity: 100}}]}\n"))
    (s,) = run_scenario(scenario, tmp_path).summary["strategies"].values()
    assert s["status"] == "ok", s["error"]
    parts = s["ledger"][-1]["parts"]
    assert (parts["der.buffer.x"], parts["der.buffer.y"], parts["der.buffer.logits"]) == \
        (100 * 64, 100 * 1, 100 * 10 * 4)
    assert sum(parts[f"der.buffer.{a}"] for a in ("x", "y", "logits")) == 100 * ITEM_BYTES


def test_budget_sized_der_and_der_plus_plus_fit_and_beat_naive(tmp_path: Path) -> None:
    """Sized from 'model + 300 exemplars': within the budget at the peak with no room for
    one more item (105 bytes); DER and DER++ both end above naive."""
    scenario = parse_scenario(scenario_text(epochs=3, strategies=(
        "  naive: {plugins: [naive]}\n"
        "  der: {budget: 'model + 300 exemplars', plugins: [der]}\n"
        "  derpp: {budget: 'model + 300 exemplars', plugins: [{der: {alpha: 0.2, beta: 0.5}}]}\n"
    )))
    runs = run_scenario(scenario, tmp_path).summary["strategies"]
    for name, margin in (("der", 0.1), ("derpp", 0.3)):
        s = runs[name]
        assert s["status"] == "ok", s["error"]
        assert s["peak_bytes"] <= s["budget_bytes"] < s["peak_bytes"] + ITEM_BYTES
        assert s["final_accuracy"] > runs["naive"]["final_accuracy"] + margin
