"""The public API returns what a run built: ``run_strategy(..., keep=True)`` gives the final
model and the strategy's plugin objects (by their names in the YAML), so a plugin's state
can be checked after a run without a probe subclass; nothing of it reaches ``to_dict()``
(summary.json), and holding it does not keep the dataset or the stream alive."""

from __future__ import annotations

import gc
import json
import weakref
from dataclasses import replace

import torch
from clsim_plugins.analytic import AnalyticPlugin, ridge_solution
from clsim_plugins.prototypes import fixed_chunk_outputs
from clsim_plugins.replay import ReplayPlugin
from helpers import without_measurements

from clsim.assembly import build_stream, load_scenario_data, resolve_device
from clsim.config import parse_scenario
from clsim.engine import run_strategy

YAML = """\
name: inspect
seed: 0
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [32]}
training: {epochs: 1, batch_size: 32, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}
strategies:
  acil:
    plugins: [analytic: {buffer_size: 48, gamma: 0.2}]
  er:
    plugins: [replay: {capacity: 50}]
"""


def run_kept(name: str, *, experiences: int | None = None, keep: bool = True):
    """The strategy ``name`` of :data:`YAML`, run on the first ``experiences`` of its
    stream, with what it built kept; returns the outcome, the dataset and the stream."""
    scenario = parse_scenario(YAML)
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    if experiences is not None:
        stream = replace(stream, experiences=stream.experiences[:experiences])
    outcome = run_strategy(scenario, scenario.strategies[name], dataset, stream,
                           seed=scenario.seed, device=resolve_device(scenario.device), keep=keep)
    assert outcome.error is None, outcome.error
    return outcome, dataset, stream


def test_analytic_w_and_r_read_from_the_run_are_the_joint_ridge_solution() -> None:
    """ACIL on five experiences (the first by backprop, then frozen): the returned plugin's
    W and R equal the joint ridge solution on every training sample of the stream,
    computed in float64 from the returned model's features (fixed-height calls, eval
    mode) and the returned projection, to 1e-10."""
    outcome, dataset, stream = run_kept("acil")
    assert list(outcome.plugins) == ["analytic"]
    plugin = outcome.plugins["analytic"]
    assert isinstance(plugin, AnalyticPlugin)
    model = outcome.model.eval()
    x = torch.cat([exp.train_x for exp in stream])
    y = torch.cat([exp.train_y for exp in stream])
    inputs = dataset.info().to_input(x)  # raw samples -> the model's float input
    features = fixed_chunk_outputs(model.features, inputs, plugin.options.feature_batch)
    hidden = torch.relu(features.double() @ plugin.projection)
    W_joint, R_joint = ridge_solution(hidden, y, 0.2)
    assert plugin.main.W.shape == W_joint.shape == (48, 10)
    assert float(torch.linalg.norm(plugin.main.W - W_joint) / torch.linalg.norm(W_joint)) < 1e-10
    assert float(torch.linalg.norm(plugin.main.R - R_joint) / torch.linalg.norm(R_joint)) < 1e-10


def test_replay_buffer_read_from_the_run_holds_capacity_samples_of_the_seen_classes() -> None:
    """Reservoir replay, capacity 50, on the first two experiences of the stream: the
    returned buffer holds exactly 50 samples, each a training sample of those experiences
    with its own label, so only the four classes seen."""
    outcome, _, stream = run_kept("er", experiences=2)
    plugin = outcome.plugins["replay"]
    assert isinstance(plugin, ReplayPlugin)
    stored_x, stored_y = plugin.buffer.stored()
    assert len(plugin.buffer) == len(stored_y) == plugin.buffer.capacity == 50
    seen = {c for exp in stream for c in exp.classes}
    assert len(seen) == 4 and set(stored_y.tolist()) <= seen
    x = torch.cat([exp.train_x for exp in stream]).flatten(1)
    y = torch.cat([exp.train_y for exp in stream])
    for sample, label in zip(stored_x.flatten(1), stored_y.tolist(), strict=True):
        matches = (x == sample).all(dim=1)
        assert matches.any() and label in y[matches].tolist()


def test_keeping_changes_nothing_serialised_and_holds_no_data() -> None:
    """With and without ``keep``: the same ``to_dict()`` (but the wall time), no model or
    plugin in it; without ``keep`` the outcome holds neither. With it, once the caller drops
    the dataset and the stream, their tensors are freed while the model and plugins live."""
    kept = run_kept("er", experiences=2)[0]
    plain = run_kept("er", experiences=2, keep=False)[0]
    assert plain.model is None and plain.plugins == {}
    a, b = without_measurements(kept.to_dict()), without_measurements(plain.to_dict())
    assert a == b
    json.dumps(a, allow_nan=False)  # plain data, as summary.json writes it
    assert "model" not in a

    scenario = parse_scenario(YAML)
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    watched = [weakref.ref(t) for t in (dataset.x_train, dataset.x_test, dataset.y_test,
                                        stream.experiences[0].train_x,
                                        stream.experiences[-1].test_x)]
    outcome = run_strategy(scenario, scenario.strategies["er"], dataset, stream,
                           seed=0, device=torch.device("cpu"), keep=True)
    del dataset, stream
    gc.collect()
    assert all(ref() is None for ref in watched)
    assert len(outcome.plugins["replay"].buffer) == 50
    assert sum(p.numel() for p in outcome.model.parameters()) == 64 * 32 + 32 + 32 * 10 + 10
