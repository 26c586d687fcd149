"""iCaRL (plugins/icarl.py): replay's herding and NME on one shared model, the sigmoid
distillation, the previous model charged at the peak, and a digits run end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from clsim_plugins.buffers import herding_order
from clsim_plugins.icarl import IcarlOptions, IcarlPlugin
from clsim_plugins.replay import ReplayOptions, ReplayPlugin
from helpers import bare_context, digits_scenario

from clsim.assembly import build_scenario_model, build_stream, load_scenario_data
from clsim.config import parse_scenario
from clsim.loop_types import ForwardOutput
from clsim.models.heads import expose_labels
from clsim.runner import run_scenario

HEAD = digits_scenario("", hidden=32, epochs=3, batch_size=16, lr=0.1)
MODEL_BYTES = 9640  # the 64-32-10 MLP, float32


@pytest.fixture(scope="module")
def shared():
    """One model, one stream: iCaRL's and replay's memories driven by hand side by side."""
    torch.manual_seed(0)
    scenario = parse_scenario(HEAD + "  naive:\n    plugins: [naive]\n")
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, 0)
    model = build_scenario_model(scenario, dataset, stream)
    ctx = bare_context(model, dataset)
    icarl = IcarlPlugin(IcarlOptions(capacity=60))
    replay = ReplayPlugin(ReplayOptions(selection="herding", nme=True, capacity=60))
    icarl.clsim_setup(ctx)
    replay.clsim_setup(ctx)
    return ctx, stream, icarl, replay


def test_herding_and_nme_equal_replays_on_one_model(shared) -> None:
    """After each of three experiences on one model, iCaRL keeps exactly replay's herding
    exemplars (each class's first m = 60 // seen of herding_order), the same class means,
    and predicts the same classes on the test set."""
    ctx, stream, icarl, replay = shared
    for exp in list(stream)[:3]:
        ctx.seen_classes.extend(exp.classes)
        icarl.clsim_after_experience(ctx, exp)
        replay.clsim_after_experience(ctx, exp)
        x, y = icarl.memory.buffer.stored()
        rx, ry = replay.buffer.stored()
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert torch.equal(icarl.memory.class_means, replay.class_means)
        m = 60 // len(ctx.seen_classes)
        for c in exp.classes:  # the classes just herded: herding_order's first m picks
            samples = exp.train_x[exp.train_y == c]
            order = herding_order(ctx.features(samples), m)
            assert torch.equal(x[y == c], samples[order])
        # the means are the re-normalised means of normalised exemplar features
        features = F.normalize(ctx.features(x), dim=1)
        for c in ctx.seen_classes:
            mean = F.normalize(features[y == c].mean(0), dim=0)
            assert torch.allclose(icarl.memory.class_means[c], mean, atol=1e-6)
        with torch.no_grad():
            test_x = ctx.to_input(exp.test_x)
            assert torch.equal(icarl.clsim_predict(ctx, test_x), replay.clsim_predict(ctx, test_x))


def test_distillation_is_zero_when_the_model_equals_the_previous_one(shared) -> None:
    """With previous = a copy of the model the distillation term is exactly 0.0; its
    gradient is the paper's BCE gradient (sigmoid(s) - q) / (N x seen), and after the model
    moves the term is positive."""
    ctx, stream, _, _ = shared
    plugin = IcarlPlugin(IcarlOptions(capacity=10))
    model = ctx.model
    expose_labels(model, torch.arange(10))
    ctx.seen_classes[:] = list(range(6))
    plugin.n_old = 4
    plugin.previous = copy.deepcopy(model).eval().requires_grad_(False)
    x = ctx.to_input(stream[0].train_x[:16])
    logits = model(x)
    output = ForwardOutput(x, None, logits, stream[0].train_y[:16])
    term = plugin.clsim_loss(ctx, output)
    assert term.item() == 0.0
    old = torch.tensor([0, 1, 2, 3])
    q = torch.sigmoid(plugin.previous(x)[:, old])
    with torch.no_grad():
        model.head.bias += 0.5  # the model moves: the term and its gradient are not 0
    logits = model(x)
    logits.retain_grad()
    term = plugin.clsim_loss(ctx, ForwardOutput(x, None, logits, output.targets))
    assert term.item() > 0
    term.backward()
    # the paper's BCE gradient on the old outputs, over N x seen output entries
    expected = (torch.sigmoid(logits[:, old].detach()) - q) / (16 * 6)
    assert expected.abs().max() > 1e-4  # not trivially 0
    assert torch.allclose(logits.grad[:, old], expected, atol=1e-7)
    assert torch.all(logits.grad[:, 4:] == 0)  # new and unseen outputs are not distilled


@pytest.fixture(scope="module")
def e2e():
    budget = "'model + 200 exemplars'"
    result = run_scenario(parse_scenario(
        HEAD + "  naive:\n    plugins: [naive]\n"
        "  icarl:\n    plugins:\n      - icarl: {capacity: 200}\n"
        f"  icarl_budget:\n    budget: {budget}\n    plugins: [icarl]\n"), None)
    return result.summary["strategies"]


def test_end_to_end_beats_naive(e2e) -> None:
    """Five class-incremental experiences on digits finish, above naive's final accuracy."""
    for name in ("icarl", "icarl_budget"):
        assert e2e[name]["status"] == "ok", e2e[name]["error"]
        assert e2e[name]["final_accuracy"] > e2e["naive"]["final_accuracy"] + 0.2


def test_ledger_charges_the_previous_model_at_the_peak(e2e) -> None:
    """From experience 1 on, the previous model (one MLP's bytes) is charged at the start
    of the experience and at the end of its training, and gone at its end; the peak is the
    memory plus two models; a budget-sized memory reserves it, so the peak fits."""
    s = e2e["icarl"]
    for record in s["ledger"]:
        previous = sum(v for k, v in record["parts"].items() if k.startswith("icarl.previous"))
        held = record["point"] in ("start", "trained") and record["experience"] > 0
        assert previous == (MODEL_BYTES if held else 0), record
        assert record["parts"]["icarl.memory.buffer.x"] == 200 * 64
        assert record["total_bytes"] == sum(record["parts"].values())
    assert s["peak_bytes"] == max(r["total_bytes"] for r in s["ledger"])
    ends = [r["total_bytes"] for r in s["ledger"] if r["point"] == "end"]
    assert s["peak_bytes"] == max(ends) + MODEL_BYTES
    b = e2e["icarl_budget"]
    assert not any(r["over_budget"] for r in b["ledger"])
    assert b["peak_bytes"] <= b["budget_bytes"] < b["peak_bytes"] + 65  # one exemplar more
