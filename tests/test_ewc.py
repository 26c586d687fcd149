"""EWC (Kirkpatrick et al. 2017; online, Schwarz et al. 2018): the penalty equals its
closed form on hand-set F and theta*, both Fisher estimates equal a plain loop over
mini-batches or samples, the online Fisher is gamma * F_old + F_new, and the ledger
charges exactly F and theta* (one pair per past experience, or one in all online)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from clsim_plugins.ewc import EwcOptions, EwcPlugin, batch_fisher, sample_fisher
from helpers import DIGITS_SCENARIO, bare_context

from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.models import build_model
from clsim.models.mlp import MLPOptions
from clsim.runner import run_scenario
from clsim.streams import class_incremental


def scenario(plugins: str):
    """helpers' digits scenario (5 experiences, MLP [32], SGD lr 0.1) with strategy 's'."""
    return parse_scenario(DIGITS_SCENARIO.replace("naive:\n    plugins: [naive]",
                                                  f"s:\n    plugins: {plugins}"))
MODEL_BYTES = 4 * ((64 * 32 + 32) + (32 * 10 + 10))  # the MLP's float32 parameters


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def setting(digits):
    stream = class_incremental(digits, seed=0, n_experiences=5)
    torch.manual_seed(0)
    model = build_model("mlp", digits.sample_shape, digits.n_classes, MLPOptions(hidden=[32]))
    return bare_context(model, digits, labels=stream.labels, batch_size=50), stream


def test_penalty_is_its_closed_form_over_two_past_experiences() -> None:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    plugin = EwcPlugin(EwcOptions(ewc_lambda=4.0))
    plugin.fishers = [{"weight": torch.tensor([[1.0, 3.0]]), "bias": torch.tensor([2.0])},
                      {"weight": torch.tensor([[0.5, 0.0]]), "bias": torch.tensor([4.0])}]
    plugin.anchors = [{"weight": torch.tensor([[0.0, 0.0]]), "bias": torch.tensor([0.0])},
                      {"weight": torch.tensor([[1.0, 1.0]]), "bias": torch.tensor([1.0])}]
    # first: 1*1^2 + 3*2^2 + 2*0.5^2 = 13.5; second: 0.5*0 + 0*1 + 4*0.5^2 = 1; x lambda/2
    assert plugin.penalty(model).item() == 4.0 / 2 * (13.5 + 1.0)
    assert plugin.clsim_loss(ctx=SimpleNamespace(model=model)).item() == 29.0
    assert EwcPlugin(EwcOptions()).clsim_loss(ctx=SimpleNamespace(model=model)) is None


def test_fisher_estimates_equal_a_plain_loop(setting) -> None:
    ctx, stream = setting
    x, y = stream[0].train_x, stream[0].train_y
    params = list(ctx.model.parameters())
    ctx.model.eval()

    def squared_grads(rows: slice) -> list[torch.Tensor]:
        loss = ctx.task_loss(ctx.model(ctx.to_input(x[rows])), y[rows])
        return [g**2 for g in torch.autograd.grad(loss, params)]

    batches = [squared_grads(slice(i, i + 50)) for i in range(0, len(y), 50)]
    samples = [squared_grads(slice(i, i + 1)) for i in range(len(y))]
    ctx.model.train()
    by_batch, by_sample = batch_fisher(ctx, x, y), sample_fisher(ctx, x, y)
    assert ctx.model.training  # the mode is restored
    for k, name in enumerate(n for n, _ in ctx.model.named_parameters()):
        torch.testing.assert_close(by_batch[name], sum(b[k] for b in batches) / len(batches))
        torch.testing.assert_close(by_sample[name], sum(s[k] for s in samples) / len(y))
        assert by_sample[name].sum() > by_batch[name].sum()  # averaging shrinks gradients


def test_online_fisher_is_gamma_times_the_old_plus_the_new(setting) -> None:
    ctx, stream = setting
    plugin = EwcPlugin(EwcOptions(mode="online", gamma=0.3))
    plugin.clsim_after_experience(ctx, stream[0])
    f_old = {k: v.clone() for k, v in plugin.fishers[0].items()}
    with torch.no_grad():  # training moved the model
        for p in ctx.model.parameters():
            p.mul_(1.1)
    f_new = batch_fisher(ctx, stream[1].train_x, stream[1].train_y)
    plugin.clsim_after_experience(ctx, stream[1])
    assert len(plugin.fishers) == len(plugin.anchors) == 1
    for name, p in ctx.model.named_parameters():
        torch.testing.assert_close(plugin.fishers[0][name], 0.3 * f_old[name] + f_new[name])
        assert torch.equal(plugin.anchors[0][name], p.detach())
    separate = EwcPlugin(EwcOptions())
    separate.clsim_after_experience(ctx, stream[0])
    separate.clsim_after_experience(ctx, stream[1])
    assert len(separate.fishers) == len(separate.anchors) == 2


@pytest.mark.parametrize("options, pairs", [
    ("{}", lambda k: k + 1),  # separate: one pair per past experience
    ("{mode: online, fisher: sample}", lambda k: 1),  # online: one pair in all
])
def test_ledger_charges_exactly_f_and_theta_star(options, pairs) -> None:
    result = run_scenario(scenario(f"[ewc: {options}]"), None)
    strategy = result.summary["strategies"]["s"]
    assert strategy["status"] == "ok", strategy["error"]
    assert strategy["final_accuracy"] > 0.1
    for record in strategy["ledger"]:
        # what is held at a point: the pairs of the experiences ended before it
        ended = record["experience"] + (record["point"] == "end")
        held = {} if ended == 0 else {"ewc.fishers": pairs(ended - 1) * MODEL_BYTES,
                                      "ewc.anchors": pairs(ended - 1) * MODEL_BYTES}
        assert record["parts"] == {"model.parameters": MODEL_BYTES, **held}, record
