"""SI (Zenke et al. 2017): on a two-parameter model with known gradients and SGD steps,
the path integral, Omega and the penalty equal their closed forms; the standard loop
drives the hooks (w is the optimizer's actual steps); the ledger charges exactly Omega,
theta* and, while a task trains, w."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from clsim_plugins.si import SiOptions, SiPlugin
from helpers import DIGITS_SCENARIO

from clsim.assembly import build_stream, load_scenario_data, resolve_device
from clsim.config import parse_scenario
from clsim.engine import run_strategy
from clsim.runner import run_scenario


def scenario(plugins: str):
    """helpers' digits scenario (5 experiences, MLP [32], SGD lr 0.1) with strategy 's'."""
    return parse_scenario(DIGITS_SCENARIO.replace("naive:\n    plugins: [naive]",
                                                  f"s:\n    plugins: {plugins}"))
MODEL_BYTES = 4 * ((64 * 32 + 32) + (32 * 10 + 10))  # the MLP's float32 parameters


class TwoWeights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))


def sgd_task(plugin: SiPlugin, ctx, grads: list[list[float]], lr: float) -> None:
    """One experience of plain SGD steps with the given gradients, through SI's hooks."""
    plugin.clsim_before_experience(ctx=ctx)
    for g in grads:
        ctx.model.theta.grad = torch.tensor(g, dtype=torch.float64)
        plugin.clsim_after_backward(ctx=ctx)
        with torch.no_grad():
            ctx.model.theta -= lr * ctx.model.theta.grad
        plugin.clsim_after_update(ctx=ctx)
    plugin.clsim_after_experience(ctx=ctx)


def test_omega_and_the_penalty_are_their_closed_forms() -> None:
    ctx = SimpleNamespace(model=TwoWeights())
    plugin = SiPlugin(SiOptions(c=0.5, xi=0.1))
    start = ctx.model.theta.detach().clone()
    first, lr = [[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0]], 0.1
    sgd_task(plugin, ctx, first, lr)
    g = torch.tensor(first, dtype=torch.float64)
    # w = sum_k -g_k * (-lr g_k) = lr sum g^2; Delta = -lr sum g
    w1, delta1 = lr * (g**2).sum(0), -lr * g.sum(0)
    omega1 = w1 / (delta1**2 + 0.1)
    torch.testing.assert_close(plugin.omega["theta"], omega1)
    torch.testing.assert_close(plugin.anchor["theta"], start + delta1)
    assert plugin.w is None
    # a second task: Omega accumulates, theta* moves to its end
    second = [[0.5, 0.5], [2.0, -1.0]]
    sgd_task(plugin, ctx, second, lr)
    g2 = torch.tensor(second, dtype=torch.float64)
    omega2 = omega1 + lr * (g2**2).sum(0) / ((lr * g2.sum(0)) ** 2 + 0.1)
    torch.testing.assert_close(plugin.omega["theta"], omega2)
    torch.testing.assert_close(plugin.anchor["theta"], ctx.model.theta.detach())
    # penalty: c * sum Omega (theta - theta*)^2 with theta moved by (0.3, -0.4)
    with torch.no_grad():
        ctx.model.theta += torch.tensor([0.3, -0.4], dtype=torch.float64)
    expected = 0.5 * (omega2[0] * 0.3**2 + omega2[1] * 0.4**2)
    torch.testing.assert_close(plugin.clsim_loss(ctx=ctx), expected)


def test_no_penalty_before_the_first_task_ends() -> None:
    ctx = SimpleNamespace(model=TwoWeights())
    plugin = SiPlugin(SiOptions())
    plugin.clsim_before_experience(ctx=ctx)
    assert plugin.clsim_loss(ctx=ctx) is None


class StepRecorder:
    """Listed after si: the parameters at the experience's start, and the sum over steps
    of -g * (the optimizer's step), read by hand."""

    def __init__(self) -> None:
        self.start = self.path = self._before = None

    def clsim_before_experience(self, ctx) -> None:
        self.start = [p.detach().clone() for p in ctx.model.parameters()]
        self.path = [torch.zeros_like(p) for p in ctx.model.parameters()]

    def clsim_after_backward(self, ctx) -> None:
        self._before = [(p.grad.clone(), p.detach().clone()) for p in ctx.model.parameters()]

    def clsim_after_update(self, ctx) -> None:
        params = ctx.model.parameters()
        for path, (g, before), p in zip(self.path, self._before, params, strict=True):
            path -= g * (p.detach() - before)
        self._before = None


@pytest.fixture
def this_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "si_test_plugins", sys.modules[__name__])
    return "si_test_plugins"


def test_the_loop_drives_the_path_integral(this_module) -> None:
    """One experience of the standard loop with SGD and momentum: Omega is the recorded
    path integral over (the experience's total displacement squared + xi)."""
    text = DIGITS_SCENARIO.replace("naive:\n    plugins: [naive]",
                                   f"s:\n    plugins: [si, {this_module}:StepRecorder]")
    config = parse_scenario(text.replace("lr: 0.1}", "lr: 0.1, momentum: 0.9}")
                            .replace("n_experiences: 5", "n_experiences: 1"))
    dataset = load_scenario_data(config)
    stream = build_stream(config, dataset, config.seed)
    outcome = run_strategy(config, config.strategies["s"], dataset, stream,
                           seed=config.seed, device=resolve_device("cpu"), keep=True)
    assert outcome.error is None, outcome.error
    si = outcome.plugins["si"]
    (recorder,) = (p for p in outcome.plugins.values() if isinstance(p, StepRecorder))
    named = list(outcome.model.named_parameters())
    for (name, p), start, path in zip(named, recorder.start, recorder.path, strict=True):
        assert path.abs().sum() > 0
        delta = p.detach() - start
        torch.testing.assert_close(si.omega[name], path / (delta**2 + 0.001))
        assert torch.equal(si.anchor[name], p.detach())


def test_the_ledger_charges_exactly_omega_theta_star_and_w() -> None:
    result = run_scenario(scenario("[si]"), None)
    strategy = result.summary["strategies"]["s"]
    assert strategy["status"] == "ok", strategy["error"]
    assert strategy["final_accuracy"] > 0.1
    for record in strategy["ledger"]:
        held = {"model.parameters": MODEL_BYTES, "si.anchor": MODEL_BYTES}
        if record["point"] != "end":
            held["si.w"] = MODEL_BYTES  # this task's path integral
        if record["experience"] > 0 or record["point"] == "end":
            held["si.omega"] = MODEL_BYTES
        assert record["parts"] == held, record
    assert strategy["peak_bytes"] == 4 * MODEL_BYTES
    assert strategy["kept_bytes"] == 3 * MODEL_BYTES
