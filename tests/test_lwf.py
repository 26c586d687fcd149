"""LwF (Li and Hoiem 2016): the distillation term is exactly zero before the model moves
from its copy and matches its closed form after; the ledger charges the copy (the
model's bytes) while a later task trains and nothing between experiences; it runs end to
end on digits, alone and after replay."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from clsim_plugins.lwf import LwfOptions, LwfPlugin
from helpers import DIGITS_SCENARIO, bare_context, comparable_outcome

from clsim.assembly import build_stream, load_scenario_data
from clsim.checkpoint import Checkpointing, fingerprint, read_checkpoint
from clsim.config import OptimizerConfig, TrainingConfig, parse_scenario
from clsim.data import load_dataset
from clsim.engine import run_strategy
from clsim.errors import ConfigError
from clsim.loop_types import ForwardOutput
from clsim.models import build_model
from clsim.models.mlp import MLPOptions
from clsim.plugin_manager import HookRunner, build_plugin_manager
from clsim.runner import run_scenario
from clsim.stream import Batch
from clsim.streams import class_incremental
from clsim.training import Trainer

CLB_ALPHAS = [0, 0.5, 1.33333, 2.25, 3.2]  # CLB's split MNIST LwF, one per experience


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


# ------------------------------------------ per-experience alpha and the task-loss share


def test_with_task_loss_share_the_loop_computes_ce_over_n_plus_alpha_n_kd(digits) -> None:
    """van de Ven and Tolias's weighting (CLB's LwFCEPenalty): at experience n the total
    loss of a batch is CE / n + alpha_n * KD, as the loop itself adds it up."""
    stream = class_incremental(digits, seed=0, n_experiences=5)
    torch.manual_seed(0)
    model = build_model("mlp", digits.sample_shape, digits.n_classes, MLPOptions(hidden=[32]))
    ctx = bare_context(model, digits, labels=stream.labels)
    plugin = LwfPlugin(LwfOptions(alpha_per_experience=CLB_ALPHAS, task_loss_share=True))
    trainer = Trainer(ctx, HookRunner(build_plugin_manager([("lwf", plugin)])),
                      TrainingConfig(optimizer=OptimizerConfig(lr=0.1)),
                      torch.Generator().manual_seed(0))
    plugin.clsim_setup(ctx)
    noise = torch.Generator().manual_seed(1)
    for n, exp in enumerate(stream, start=1):
        ctx.experience = exp
        ctx.seen_classes.extend(exp.classes)
        plugin.clsim_before_experience(ctx, exp)
        assert plugin.experiences == n and plugin.alpha() == CLB_ALPHAS[n - 1]
        teacher_model = copy.deepcopy(ctx.model)
        with torch.no_grad():  # the model moves away from its copy: KD > 0 after the first
            for p in ctx.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=noise))
        batch = Batch(exp.train_x[:32], exp.train_y[:32])
        active = trainer._active_hooks()
        output = trainer.forward(batch, active)
        loss = trainer._total_loss(batch, output, active)
        expected = F.cross_entropy(output.logits, batch.y) / n
        if n > 1:
            old = [c for e in stream[:n - 1] for c in e.classes]
            with torch.no_grad():
                teacher = teacher_model(output.inputs)[:, old]
            q = F.softmax(teacher / 2.0, dim=1)
            log_p = F.log_softmax(output.logits[:, old] / 2.0, dim=1)
            kd = (q * (q.log() - log_p)).sum(1).mean()
            assert kd.item() > 0
            expected = expected + CLB_ALPHAS[n - 1] * kd
        torch.testing.assert_close(loss, expected)
        plugin.clsim_after_experience(ctx)


def test_alpha_per_experience_picks_each_experience_s_and_repeats_the_last(digits) -> None:
    stream = class_incremental(digits, seed=0, n_experiences=5)
    model = build_model("mlp", digits.sample_shape, digits.n_classes, MLPOptions(hidden=[8]))
    ctx = bare_context(model, digits, labels=stream.labels)
    plugin = LwfPlugin(LwfOptions(alpha=7.0, alpha_per_experience=[0.0, 0.5, 2.0]))
    plugin.clsim_setup(ctx)
    alphas = []
    for exp in stream:
        ctx.seen_classes.extend(exp.classes)
        plugin.clsim_before_experience(ctx, exp)
        alphas.append(plugin.alpha())
        plugin.clsim_after_experience(ctx)
    assert alphas == [0.0, 0.5, 2.0, 2.0, 2.0]  # overrides alpha = 7
    # without a schedule: the single alpha, no count kept (nothing more for the ledger),
    # and the loop's own task loss (so er_ace or der can still replace it)
    plain = LwfPlugin(LwfOptions(alpha=7.0))
    plain.clsim_setup(ctx)
    plain.clsim_before_experience(ctx, stream[0])
    assert plain.alpha() == 7.0 and plain.experiences is None
    assert plain.clsim_task_loss(ctx=ctx, batch=None, output=None) is None


def test_the_new_options_are_checked_naming_the_option() -> None:
    def error(options: str) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            scenario(f"[{{lwf: {options}}}]")
        return info.value

    err = error("{alpha_per_experience: [0, 0.5, -1]}")
    assert err.key_path == "strategies.s.plugins[0].lwf.alpha_per_experience[2]"
    assert "expected a number >= 0; got -1" in str(err)
    err = error("{alpha_per_experience: []}")
    assert err.key_path == "strategies.s.plugins[0].lwf.alpha_per_experience"
    assert "at least 1 item" in str(err)
    assert "expected a boolean" in str(error("{task_loss_share: 2}"))
    parsed = scenario(f"[{{lwf: {{alpha_per_experience: {CLB_ALPHAS}, task_loss_share: true}}}}]")
    options = parsed.strategies["s"].plugins[0].options
    assert options.alpha_per_experience == CLB_ALPHAS and options.task_loss_share


def test_the_task_loss_share_composes_only_where_one_plugin_replaces_the_task_loss() -> None:
    result = run_scenario(scenario("[{er_ace: {capacity: 50}}, lwf]"), None)
    assert result.summary["strategies"]["s"]["status"] == "ok"
    result = run_scenario(scenario("[{er_ace: {capacity: 50}}, {lwf: {task_loss_share: true}}]"),
                          None)
    strategy = result.summary["strategies"]["s"]
    assert strategy["status"] != "ok"
    assert "'er_ace' and 'lwf' both replaced the task loss" in strategy["error"]


def test_the_count_is_charged_and_survives_a_checkpoint_resume(tmp_path) -> None:
    """Resumed after experience 2, the run goes on at n = 3 (a fresh plugin would start
    at n = 1 and weight the task loss differently): the metrics equal the uninterrupted
    run's."""
    parsed = scenario(f"[{{lwf: {{alpha_per_experience: {CLB_ALPHAS}, task_loss_share: true}}}}]")
    dataset = load_scenario_data(parsed)
    stream = build_stream(parsed, dataset, 0)
    strategy = parsed.strategies["s"]
    key = fingerprint(parsed.to_dict(), 0, None, "s")
    path = tmp_path / "s.pt"

    class KeepSecond(Checkpointing):
        def save(self, loop, next_experience, wall_seconds):
            super().save(loop, next_experience, wall_seconds)
            if next_experience == 2:
                assert loop.plugins[0][1].experiences == 2
                path.with_suffix(".2.pt").write_bytes(path.read_bytes())

    keep = KeepSecond(path, key)
    full = run_strategy(parsed, strategy, dataset, stream, seed=0, device=torch.device("cpu"),
                        checkpoint=keep)
    assert full.error is None and keep.unavailable is None
    end = [r for r in full.to_dict()["ledger"] if r["point"] == "end"]
    assert all(r["parts"]["lwf.experiences"] == 8 for r in end)  # one Python int
    payload = read_checkpoint(path.with_suffix(".2.pt"), key)
    resumed = run_strategy(parsed, strategy, dataset, stream, seed=0, device=torch.device("cpu"),
                           checkpoint=Checkpointing(tmp_path / "again.pt", key,
                                                    resume_from=payload))

    assert comparable_outcome(resumed) == comparable_outcome(full)
