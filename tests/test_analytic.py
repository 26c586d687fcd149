"""Analytic learning: ACIL / G-ACIL's recursive least squares and the analytic plugin
(METHODS.md section 3): weight invariance, the ledger's charge for R, the budget check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clsim_plugins.analytic import (
    AnalyticOptions,
    AnalyticPlugin,
    RecursiveLeastSquares,
    ridge_solution,
)
from clsim_plugins.prototypes import fixed_chunk_features
from helpers import bare_context

from clsim import training
from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.models import MLPOptions, build_model
from clsim.runner import run_scenario
from clsim.stream import Experience
from clsim.training import Trainer

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
PLUGIN = "clsim_plugins.analytic:AnalyticPlugin"
TOL = 1e-8  # METHODS.md: float64 matches to about 1e-12


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def between_experiences(result: dict) -> list[dict]:
    """The ledger's readings at experience ends (what is kept between experiences)."""
    return [record for record in result["ledger"] if record.get("point", "end") == "end"]


# ---------------------------------------------------------------------------
# the recursion: weight invariance
# ---------------------------------------------------------------------------

D, GAMMA = 12, 0.5


def generalized_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of a generalized stream: classes 5, 2, 8 first, 0 and 3 later,
    5 coming back at the end, in stream order (so most cuts mix seen and new classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat(
        [
            torch.tensor([5, 2, 8]).repeat_interleave(20)[torch.randperm(60, generator=g)],
            torch.tensor([0, 3, 2]).repeat_interleave(15)[torch.randperm(45, generator=g)],
            torch.tensor([5, 8]).repeat_interleave(10),
        ]
    )
    centres = torch.randn(9, D, generator=g, dtype=torch.float64)
    X = centres[labels] + 0.7 * torch.randn(len(labels), D, generator=g, dtype=torch.float64)
    return torch.relu(X), labels


def fit_in_batches(X: torch.Tensor, y: torch.Tensor, cuts: list[int]) -> RecursiveLeastSquares:
    rls = RecursiveLeastSquares(D, GAMMA)
    bounds = [0, *cuts, len(y)]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        rls.fit(X[start:stop], y[start:stop])
    return rls


def random_cuts(n: int, g: torch.Generator) -> list[int]:
    k = int(torch.randint(1, 25, (1,), generator=g))
    return sorted(set(torch.randint(1, n, (k,), generator=g).tolist()))


def test_any_order_and_batching_gives_the_joint_ridge_solution() -> None:
    """Stream order, shuffled orders; batches of 1, of more than d, random cuts: W and R
    always equal (X^T X + gamma I)^-1 X^T Y and (X^T X + gamma I)^-1."""
    X, y = generalized_data()
    W_joint, R_joint = ridge_solution(X, y, GAMMA)
    g = torch.Generator().manual_seed(1)
    orders = [torch.arange(len(y))] + [torch.randperm(len(y), generator=g) for _ in range(4)]
    for order in orders:
        for cuts in ([], list(range(1, len(y))), [40, 90], random_cuts(len(y), g)):
            rls = fit_in_batches(X[order], y[order], cuts)
            assert rls.W.shape == W_joint.shape == (D, 9)
            assert relative_error(rls.W, W_joint) < TOL
            assert relative_error(rls.R, R_joint) < TOL


def test_labels_pad_w_with_zero_columns() -> None:
    """W grows to the largest label seen plus one; a label not seen keeps a zero column."""
    X, y = generalized_data()
    rls = RecursiveLeastSquares(D, GAMMA)
    assert rls.W.shape == (D, 0)
    first = y[:60]  # classes 2, 5, 8
    rls.fit(X[:60], first)
    assert rls.n_outputs == 9
    assert not rls.W[:, [0, 1, 3, 4, 6, 7]].any()
    assert rls.W[:, [2, 5, 8]].abs().sum(0).gt(0).all()


def test_fitting_a_batch_twice_breaks_invariance() -> None:
    """The invariance test can fail: a repeated batch acts like a smaller gamma."""
    X, y = generalized_data()
    W_joint, R_joint = ridge_solution(X, y, GAMMA)
    rls = fit_in_batches(X, y, [40, 90])
    rls.fit(X[40:90], y[40:90])
    assert relative_error(rls.W, W_joint) > 1e-3
    assert relative_error(rls.R, R_joint) > 1e-3


def test_published_defaults() -> None:
    options = AnalyticOptions()
    assert options.buffer_size == 8192 and options.gamma == 0.1
    assert options.base_experiences == 1 and options.compensation_ratio == 0.6
    assert not options.compensation and not options.freeze_backbone_from_start


# ---------------------------------------------------------------------------
# the plugin on a generalized stream: W is the joint solution on buffered features
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compensation", [False, True])
def test_plugin_weights_are_the_joint_solution_on_a_generalized_stream(
    compensation: bool,
) -> None:
    """Parts that mix seen and new classes, with a class coming back, delivered as a
    hidden-boundary stream delivers them: the main stream's W equals the joint ridge
    solution on relu(f(x) P) of everything delivered (DS-AL's stream does not disturb it)."""
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", dataset.sample_shape, dataset.n_classes, MLPOptions(hidden=[24]))
    ctx = bare_context(
        model,
        dataset,
        strategy="a",
        batch_size=16,
    )
    options = AnalyticOptions(
        buffer_size=40,
        gamma=0.3,
        freeze_backbone_from_start=True,
        compensation=compensation,
        batch_size=7,
    )
    plugin = AnalyticPlugin(options)
    plugin.clsim_setup(ctx)
    x, y = dataset.x_train, dataset.y_train
    keep = (y == 4) | (y == 1) | (y == 7) | (y == 0)
    x, y = x[keep][:300], y[keep][:300]
    parts = [slice(0, 50), slice(50, 51), slice(51, 180), slice(180, 300), slice(0, 0)]
    for part in parts:
        exp = Experience(0, (), x[part], y[part], x[:0], y[:0])
        assert plugin.clsim_train_experience(ctx=ctx, experience=exp) is True
    features = fixed_chunk_features(ctx, x, options.feature_batch)
    hidden = torch.relu(features.double() @ plugin.projection)
    W_joint, R_joint = ridge_solution(hidden, y, 0.3)
    assert plugin.main.W.shape == (40, 8)
    assert relative_error(plugin.main.W, W_joint) < TOL
    assert relative_error(plugin.main.R, R_joint) < TOL
    assert plugin.seen.tolist() == [True, True, False, False, True, False, False, True]
    predicted = plugin.clsim_predict(ctx=ctx, x=ctx.to_input(x))
    assert set(predicted.unique().tolist()) <= {0, 1, 4, 7}
    if compensation:
        assert plugin.compensation.W.shape == (40, 8) and plugin.compensation.W.any()
    else:
        scores = (hidden @ W_joint)[:, [0, 1, 4, 7]]
        expected = torch.tensor([0, 1, 4, 7])[scores.argmax(1)]
        assert torch.equal(predicted, expected)
    for p in model.features.parameters():
        assert not p.requires_grad


@pytest.mark.parametrize("part", [1, 37])
def test_plugin_weights_are_the_joint_solution_to_1e10_for_small_parts(part: int) -> None:
    """Online parts of 1 sample and of 37 (the plugin's own batch 16 cuts the 37 into
    16, 16, 5): W and R equal the joint ridge solution, computed in float64 from the same
    fixed-height features, to 1e-10 (observed about 2e-14 for both). Features computed with
    the height of each call, as before, gave 2.5e-7 with 1-sample parts: a 1-row float32
    product rounds differently."""
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", dataset.sample_shape, dataset.n_classes, MLPOptions(hidden=[24]))
    ctx = bare_context(model, dataset, strategy="a", batch_size=16)
    options = AnalyticOptions(buffer_size=40, gamma=0.3, freeze_backbone_from_start=True)
    plugin = AnalyticPlugin(options)
    plugin.clsim_setup(ctx)
    x, y = dataset.x_train[:300], dataset.y_train[:300]
    for start in range(0, len(y), part):
        stop = start + part
        exp = Experience(0, (), x[start:stop], y[start:stop], x[:0], y[:0])
        assert plugin.clsim_train_experience(ctx=ctx, experience=exp) is True
    features = fixed_chunk_features(ctx, x, options.feature_batch)
    W_joint, R_joint = ridge_solution(torch.relu(features.double() @ plugin.projection), y, 0.3)
    assert plugin.main.W.shape == W_joint.shape == (40, 10)
    assert relative_error(plugin.main.W, W_joint) < 1e-10
    assert relative_error(plugin.main.R, R_joint) < 1e-10


# ---------------------------------------------------------------------------
# through the engine: ledger, accuracy, budget, hidden boundaries
# ---------------------------------------------------------------------------


def digits_yaml(strategies: str, *, hidden: int = 32, epochs: int = 1, extra: str = "") -> str:
    return f"""\
name: t
seed: 0
data: {{dataset: digits}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {{name: mlp, hidden: [{hidden}]}}
training: {{epochs: {epochs}, batch_size: 32, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}
{extra}strategies:
{strategies}"""


def test_ledger_charges_r_w_and_the_projection_exactly() -> None:
    """d_b = 64: R is 64^2 x 8 bytes at every experience end (the base phase ends
    with experience 0); W is 64 x (largest label + 1) x 8; DS-AL holds a second R and W."""
    yaml_text = digits_yaml(f"""\
  acil:
    plugins: [{{{PLUGIN}: {{buffer_size: 64}}}}]
  dsal:
    plugins: [{{{PLUGIN}: {{buffer_size: 64, compensation: true}}}}]
""")
    summary = run_scenario(parse_scenario(yaml_text), None).summary
    for name, streams in (("acil", ("main",)), ("dsal", ("main", "compensation"))):
        result = summary["strategies"][name]
        assert result["status"] == "ok", result["error"]
        assert not result["memory_estimated"]
        for record in between_experiences(result):
            parts = record["parts"]
            width = parts["AnalyticPlugin.seen"]  # one bool per column of W
            for stream in streams:
                assert parts[f"AnalyticPlugin.{stream}.R"] == 64 * 64 * 8
                assert parts[f"AnalyticPlugin.{stream}.W"] == 64 * width * 8
            assert parts["AnalyticPlugin.projection"] == 32 * 64 * 8
            assert record["total_bytes"] == sum(parts.values())
        assert between_experiences(result)[-1]["parts"]["AnalyticPlugin.seen"] == 10
        if name == "acil":
            assert set(between_experiences(result)[-1]["parts"]) == {
                "model.parameters",
                "AnalyticPlugin.projection",
                "AnalyticPlugin.main.R",
                "AnalyticPlugin.main.W",
                "AnalyticPlugin.seen",
            }


def test_base_phase_trains_in_the_standard_loop_for_base_epochs(monkeypatch) -> None:
    """The base experience goes through the standard loop (``Trainer.fit``) on its own
    samples, for ``base_epochs`` when set and ``training.epochs`` otherwise, under the
    scenario's optimizer (Adam at lr 0.003 over the whole model: 2,410 parameters of mlp
    [32]); the four analytic experiences after it take no step of the loop."""
    fits, optimizers = [], []
    fit, make_optimizer = Trainer.fit, training.make_optimizer

    def recording_fit(self, plan, **kwargs):
        experience = self.ctx.experience
        fits.append((self.ctx.strategy, experience.index, plan.epochs,
                     plan.n_samples == experience.n_train))
        return fit(self, plan, **kwargs)

    def recording_optimizer(groups, config):
        optimizers.append(make_optimizer(groups, config))
        return optimizers[-1]

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    monkeypatch.setattr(training, "make_optimizer", recording_optimizer)
    yaml_text = digits_yaml(f"""\
  three:
    plugins: [{{{PLUGIN}: {{buffer_size: 32, base_epochs: 3}}}}]
  scenario:
    plugins: [{{{PLUGIN}: {{buffer_size: 32}}}}]
""", epochs=2).replace("{name: sgd, lr: 0.05, momentum: 0.9}", "{name: adam, lr: 0.003}")
    summary = run_scenario(parse_scenario(yaml_text), None).summary["strategies"]
    assert all(s["status"] == "ok" for s in summary.values()), summary
    assert fits == [("three", 0, 3, True), ("scenario", 0, 2, True)]
    assert len(optimizers) == 2
    for optimizer in optimizers:
        assert type(optimizer) is torch.optim.Adam
        assert [group["lr"] for group in optimizer.param_groups] == [0.003]
        assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == 9640 // 4
    assert summary["three"]["final_accuracy"] > 0.5


def test_longer_base_phase_holds_its_data_until_freezing_and_is_charged_for_it() -> None:
    """base_experiences 2 (with base_epochs 2): after experience 0 the plugin holds that
    experience's raw samples (64 uint8 bytes each) and labels (int64), charged by the
    ledger; after experience 1 they are gone and R, W and the projection are held."""
    yaml_text = digits_yaml(f"""\
  acil:
    plugins: [{{{PLUGIN}: {{buffer_size: 32, base_experiences: 2, base_epochs: 2}}}}]
""")
    result = run_scenario(parse_scenario(yaml_text), None).summary["strategies"]["acil"]
    assert result["status"] == "ok", result["error"]
    first, second = (record["parts"] for record in between_experiences(result)[:2])
    assert first["AnalyticPlugin.base_x"] == 8 * first["AnalyticPlugin.base_y"] > 0
    assert "AnalyticPlugin.main.R" not in first
    assert not any(name.startswith("AnalyticPlugin.base") for name in second)
    assert second["AnalyticPlugin.main.R"] == 32 * 32 * 8
    assert result["final_accuracy"] > 0.5


def test_quick_scenario_beats_naive_by_far() -> None:
    """scenarios/analytic_quick.yaml: one base experience by backprop, four analytic ones.
    Observed (seed 0): analytic 0.958, naive 0.202 final accuracy."""
    scenario = parse_scenario((SCENARIOS / "analytic_quick.yaml").read_text())
    summary = run_scenario(scenario, None).summary["strategies"]
    naive, analytic = summary["naive"], summary["analytic"]
    assert naive["status"] == analytic["status"] == "ok", analytic["error"]
    assert analytic["final_accuracy"] > 0.9
    assert analytic["final_accuracy"] > naive["final_accuracy"] + 0.5


def test_too_small_budget_is_refused_naming_the_minimum_and_a_buffer_that_fits() -> None:
    """mlp [32] on digits: the model is 9,640 bytes; the state for d_b is
    8 (32 d_b + d_b^2 + 10 d_b) + 10 bytes: 54,282 at d_b = 64, so the minimum budget is
    63,922 bytes. A budget of model + 100 exemplars (6,400 bytes of room) fits d_b = 14
    (6,282 bytes) but not 15 (6,850); with 14 the run stays within that budget."""
    refused = digits_yaml(
        f"""\
  acil:
    plugins: [{{{PLUGIN}: {{buffer_size: 64}}}}]
""",
        extra="budget: model + 100 exemplars\n",
    )
    result = run_scenario(parse_scenario(refused), None).summary["strategies"]["acil"]
    assert result["status"] == "failed"
    assert "the minimum budget is 63922 bytes" in result["error"]
    assert "buffer_size 14 is the largest that fits" in result["error"]
    fits = refused.replace("buffer_size: 64", "buffer_size: 14")
    result = run_scenario(parse_scenario(fits), None).summary["strategies"]["acil"]
    assert result["status"] == "ok", result["error"]
    assert not result["over_budget"]
    assert result["budget_bytes"] - 6400 < result["peak_bytes"] <= result["budget_bytes"]


def test_hidden_boundaries_need_a_frozen_backbone_and_then_learn() -> None:
    """Si-Blurry (online, hidden boundaries, batches mixing seen and new classes): refused
    without freeze_backbone_from_start; with it, G-ACIL learns far beyond naive."""
    yaml_text = f"""\
name: t
seed: 0
data: {{dataset: digits}}
stream: {{type: si_blurry, n_tasks: 5, eval_every: 200}}
model: {{name: mlp, hidden: [32]}}
training: {{batch_size: 16, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}
strategies:
  naive:
    plugins: [naive]
  gacil:
    plugins: [{{{PLUGIN}: {{buffer_size: 256, freeze_backbone_from_start: true}}}}]
  refused:
    plugins: [{{{PLUGIN}: {{buffer_size: 256}}}}]
"""
    summary = run_scenario(parse_scenario(yaml_text), None).summary["strategies"]
    assert summary["refused"]["status"] == "failed"
    assert "freeze_backbone_from_start" in summary["refused"]["error"]
    assert summary["gacil"]["status"] == "ok", summary["gacil"]["error"]
    assert summary["gacil"]["final_accuracy"] > summary["naive"]["final_accuracy"] + 0.5
