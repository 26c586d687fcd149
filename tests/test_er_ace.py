"""ER-ACE (plugins/er_ace.py): the asymmetric loss in closed form, the memory's ledger
charge, its budget-sized capacity, and an end-to-end run on digits against naive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clsim_plugins.er_ace import ErAcePlugin
from helpers import bare_context, digits_scenario

from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.loop_types import ForwardOutput
from clsim.runner import run_scenario
from clsim.stream import Batch


def scenario_text(strategies: str, epochs: int = 3) -> str:
    return digits_scenario(strategies, hidden=64, epochs=epochs, batch_size=32,
                           lr=0.05, name="er_ace")





def closed_form_ce(logits: torch.Tensor, y: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """mean_i [ logsumexp_{c in classes} z_ic - z_{i, y_i} ]."""
    return (torch.logsumexp(logits[:, classes], dim=1) - logits[torch.arange(len(y)), y]).mean()


@pytest.fixture
def plugin_and_ctx():
    dataset = load_dataset("digits")
    ctx = bare_context(torch.nn.Linear(64, 10), dataset, seen_classes=[3, 0, 7, 2, 5])
    plugin = ErAcePlugin(ErAcePlugin.Options(capacity=50))
    plugin.clsim_setup(ctx)
    return plugin, ctx


def forward(y_stream: list[int], y_memory: list[int], views: int = 1, seed: int = 0):
    y = torch.tensor(y_stream + y_memory)
    batch = Batch(torch.zeros(len(y), 1, 8, 8, dtype=torch.uint8), y, n_stream=len(y_stream))
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(views * len(y), 10, generator=generator, dtype=torch.float64)
              ).requires_grad_()
    return batch, ForwardOutput(torch.zeros(views * len(y), 64), None, logits,
                                y.repeat(views), views)


def test_incoming_loss_spans_the_batch_classes_and_replay_every_seen_class(plugin_and_ctx):
    """Stream labels {2, 5} (a subset of the seen {0, 2, 3, 5, 7}), memory labels
    {0, 3, 7, 2}: the loss is CE over outputs 2 and 5 for the stream rows plus CE over the
    five seen classes for the memory rows, each in closed form."""
    plugin, ctx = plugin_and_ctx
    stream, memory = [2, 5, 5, 2, 2, 5], [0, 3, 7, 2]
    batch, output = forward(stream, memory)
    loss = plugin.clsim_task_loss(ctx, batch, output)
    z = output.logits.detach()
    incoming = closed_form_ce(z[:6], torch.tensor(stream), [2, 5])
    replay = closed_form_ce(z[6:], torch.tensor(memory), [0, 2, 3, 5, 7])
    assert float(loss.detach()) == pytest.approx(float(incoming + replay), rel=1e-12)
    # the incoming rows' other outputs are out of their softmax: no gradient reaches them
    loss.backward()
    grad = output.logits.grad
    absent = [c for c in range(10) if c not in (2, 5)]
    assert torch.count_nonzero(grad[:6, absent]) == 0
    assert torch.count_nonzero(grad[6:, [1, 4, 6, 8, 9]]) == 0  # never seen: out of replay too
    assert torch.count_nonzero(grad[6:, [0, 3, 7]]) == 12


def test_without_memory_rows_only_the_incoming_term_and_views_count_each(plugin_and_ctx):
    """No replay yet: the loss is the incoming CE alone; with two views, the rows of both
    views enter each term."""
    plugin, ctx = plugin_and_ctx
    batch, output = forward([7, 3, 3], [])
    z = output.logits.detach()
    assert float(plugin.clsim_task_loss(ctx, batch, output).detach()) == pytest.approx(
        float(closed_form_ce(z, torch.tensor([7, 3, 3]), [3, 7])), rel=1e-12)
    batch, output = forward([7, 3], [5], views=2)
    z, y = output.logits.detach(), output.targets
    stream_rows, memory_rows = [0, 1, 3, 4], [2, 5]
    expected = closed_form_ce(z[stream_rows], y[stream_rows], [3, 7]) + \
        closed_form_ce(z[memory_rows], y[memory_rows], [0, 2, 3, 5, 7])
    assert float(plugin.clsim_task_loss(ctx, batch, output).detach()) == pytest.approx(
        float(expected), rel=1e-12)


def test_memory_rows_follow_the_stream_and_the_reservoir_takes_the_stream_only(plugin_and_ctx):
    """clsim_before_batch appends memory rows after the stream's own; clsim_after_batch
    offers the reservoir the stream part only."""
    plugin, _ = plugin_and_ctx
    x = torch.arange(4 * 64, dtype=torch.uint8).reshape(4, 1, 8, 8)
    first = Batch(x, torch.tensor([1, 2, 1, 2]))
    assert plugin.clsim_before_batch(first) is None  # empty memory: nothing to replay
    plugin.clsim_after_batch(first)
    mixed = plugin.clsim_before_batch(Batch(x[:2], torch.tensor([4, 4])))
    assert len(mixed) == 4 and mixed.n_stream == 2 and mixed.y[:2].tolist() == [4, 4]
    plugin.clsim_after_batch(mixed)
    assert plugin.buffer.n_seen == 6 and sorted(plugin.buffer.stored()[1].tolist()) == \
        [1, 1, 2, 2, 4, 4]


def test_a_fixed_memory_is_charged_its_samples_and_labels(tmp_path: Path) -> None:
    scenario = parse_scenario(scenario_text(
        strategies="  fixed: {plugins: [{er_ace: {capacity: 120}}]}\n"))
    (s,) = run_scenario(scenario, tmp_path).summary["strategies"].values()
    assert s["status"] == "ok", s["error"]
    parts = s["ledger"][-1]["parts"]
    assert (parts["er_ace.buffer.x"], parts["er_ace.buffer.y"]) == (120 * 64, 120 * 1)


def test_budget_sized_er_ace_fits_and_beats_naive(tmp_path: Path) -> None:
    """Sized from 'model + 300 exemplars': within the budget at the peak with no room for
    one more sample (65 bytes), and a final accuracy well above naive's."""
    scenario = parse_scenario(scenario_text(
        strategies="  naive: {plugins: [naive]}\n"
                   "  er_ace: {budget: 'model + 300 exemplars', plugins: [er_ace]}\n"))
    runs = run_scenario(scenario, tmp_path).summary["strategies"]
    s = runs["er_ace"]
    assert s["status"] == "ok", s["error"]
    assert s["peak_bytes"] <= s["budget_bytes"] < s["peak_bytes"] + 65
    assert s["final_accuracy"] > runs["naive"]["final_accuracy"] + 0.2


def test_er_ace_runs_on_a_task_agnostic_stream_with_hidden_boundaries(tmp_path: Path) -> None:
    """Its home setting: the engine adds a part's classes to ctx.seen_classes only after
    that part trains, so the replayed rows' classes come from the stored labels too (the
    second batch used to fail indexing with an empty class list)."""
    text = scenario_text(strategies="  ace: {plugins: [{er_ace: {capacity: 100}}]}\n")
    text = text.replace("{type: class_incremental, n_experiences: 5}",
                        "{type: recurring, n_tasks: 2, sequence: [0, 1, 0]}")
    text = text.replace("epochs: 3", "epochs: 1")  # online: each sample seen once
    (s,) = run_scenario(parse_scenario(text), tmp_path).summary["strategies"].values()
    assert s["status"] == "ok", s["error"]
    assert s["final_accuracy"] > 0.5
