"""LwF (Li and Hoiem 2016): the distillation term is exactly zero before the model moves
from its copy and matches its closed form after; the ledger charges the copy (the
model's bytes) while a later task trains and nothing between experiences; it runs end to
end on digits, alone and after replay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clsim_plugins.lwf import LwfOptions, LwfPlugin
from helpers import DIGITS_SCENARIO, bare_context

from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.loop_types import ForwardOutput
from clsim.models import build_model
from clsim.models.mlp import MLPOptions
from clsim.runner import run_scenario
from clsim.streams import class_incremental


def scenario(plugins: str):
    """helpers' digits scenario (5 experiences, MLP [32], SGD lr 0.1) with strategy 's'."""
    return parse_scenario(DIGITS_SCENARIO.replace("naive:\n    plugins: [naive]",
                                                  f"s:\n    plugins: {plugins}"))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def second_experience(digits, options: LwfOptions):
    """The plugin, its context and a batch of the second experience, the copy just taken."""
    stream = class_incremental(digits, seed=0, n_experiences=5)
    torch.manual_seed(0)
    model = build_model("mlp", digits.sample_shape, digits.n_classes, MLPOptions(hidden=[32]))
    ctx = bare_context(model, digits, labels=stream.labels)
    plugin = LwfPlugin(options)
    plugin.clsim_setup(ctx)
    for exp in stream[:2]:
        ctx.experience = exp
        ctx.seen_classes.extend(exp.classes)
        plugin.clsim_before_experience(ctx, exp)
        if exp.index == 0:
            plugin.clsim_after_experience(ctx)  # the first task's classes become old ones
    inputs = ctx.to_input(stream[1].train_x[:32])
    return plugin, ctx, inputs, stream[1].train_y[:32], list(stream[0].classes)


def loss_of(plugin: LwfPlugin, ctx, inputs, targets) -> torch.Tensor:
    logits = ctx.model(inputs)
    output = ForwardOutput(inputs=inputs, features=None, logits=logits, targets=targets)
    return plugin.clsim_loss(ctx=ctx, logits=logits, output=output)


def test_the_term_is_zero_until_the_model_moves_then_its_closed_form(digits) -> None:
    options = LwfOptions(alpha=0.7, temperature=3.0)
    plugin, ctx, inputs, targets, old = second_experience(digits, options)
    assert sorted(plugin.old_classes.tolist()) == sorted(old)
    assert loss_of(plugin, ctx, inputs, targets).item() == 0.0  # the copy is the model
    teacher = ctx.model(inputs).detach()
    with torch.no_grad():  # the model moves away from its copy
        for p in ctx.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    student = ctx.model(inputs)
    loss = loss_of(plugin, ctx, inputs, targets)
    assert loss.item() > 0
    # KL(softmax(teacher / T) || softmax(student / T)) on the old classes, mean over rows
    q = F.softmax(teacher[:, old] / 3.0, dim=1)
    log_p = F.log_softmax(student[:, old] / 3.0, dim=1)
    expected = 0.7 * (q * (q.log() - log_p)).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # the gradient reaches the model, not the frozen copy
    assert all(p.grad is not None for p in ctx.model.parameters())
    assert all(p.grad is None for p in plugin.old_model.parameters())


def test_no_term_on_the_first_experience_and_the_copy_dropped_at_its_end(digits) -> None:
    plugin = LwfPlugin(LwfOptions())
    stream = class_incremental(digits, seed=0, n_experiences=5)
    model = build_model("mlp", digits.sample_shape, digits.n_classes, MLPOptions(hidden=[32]))
    ctx = bare_context(model, digits, labels=stream.labels)
    plugin.clsim_setup(ctx)
    ctx.seen_classes.extend(stream[0].classes)
    plugin.clsim_before_experience(ctx, stream[0])
    assert plugin.old_model is None
    assert plugin.clsim_loss(ctx=ctx, logits=None, output=None) is None
    plugin, ctx, *_ = second_experience(digits, LwfOptions())
    plugin.clsim_after_experience(ctx)
    assert plugin.old_model is None and plugin.old_classes is None
    assert plugin.known.nonzero().squeeze(1).tolist() == sorted(ctx.seen_classes)


def test_ledger_charges_the_copy_while_a_later_task_trains_and_the_class_ids_between() -> None:
    result = run_scenario(scenario("[lwf]"), None)
    strategy = result.summary["strategies"]["s"]
    assert strategy["status"] == "ok", strategy["error"]
    model = 4 * ((64 * 32 + 32) + (32 * 10 + 10))  # the MLP's float32 parameters
    for record in strategy["ledger"]:
        parts = record["parts"]
        assert parts["model.parameters"] == model
        flags = {"lwf.known": 10}  # one bool per class, from setup
        if record["experience"] > 0 and record["point"] != "end":
            n_old = 2 * record["experience"]  # two classes per experience
            assert parts == {"model.parameters": model, "lwf.old_model.parameters": model,
                             "lwf.old_classes": 8 * n_old, **flags}, record
        else:
            assert parts == {"model.parameters": model, **flags}, record
    assert strategy["peak_bytes"] == 2 * model + 8 * 8 + 10  # the last task: 8 old classes
    assert strategy["kept_bytes"] == model + 10
    assert not strategy.get("over_budget")


def test_replay_then_lwf_compose() -> None:
    plugins = "[{replay: {capacity: 100}}, lwf]"
    result = run_scenario(scenario(plugins), None)
    strategy = result.summary["strategies"]["s"]
    assert strategy["status"] == "ok", strategy["error"]
    during = next(r["parts"] for r in strategy["ledger"]
                  if r["experience"] == 1 and r["point"] == "trained")
    assert during["replay.buffer.x"] == 100 * 64
    assert during["lwf.old_model.parameters"] == during["model.parameters"]


def test_a_class_that_comes_back_is_distilled() -> None:
    """On A, A, A with visible boundaries every class is an old one in the second task:
    the copy is taken and distils all of them (it used to skip classes that recur)."""
    text = DIGITS_SCENARIO.replace(
        "stream: {type: class_incremental, n_experiences: 5}",
        "stream: {type: recurring, n_tasks: 1, sequence: [0, 0, 0], boundaries: visible}")
    text = text.replace("plugins: [naive]", "plugins: [lwf]")
    result = run_scenario(parse_scenario(text), None, limit=60)
    strategy = result.summary["strategies"]["naive"]
    assert strategy["status"] == "ok", strategy["error"]
    trained = [r["parts"] for r in strategy["ledger"] if r["point"] == "trained"]
    assert "lwf.old_model.parameters" not in trained[0]
    assert all(parts["lwf.old_classes"] == 8 * 10 for parts in trained[1:])  # all of them
