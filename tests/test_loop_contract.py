"""The one loop's contract: plans, trainables, views, aux outputs, a replaced task loss,
the services an owner gets, and no test data while a plugin trains."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import DIGITS_SCENARIO
from torch import nn

from clsim.config import parse_scenario
from clsim.loop_types import ExperiencePlan, Trainable, as_trainables, trainable_parameters
from clsim.runner import run_scenario

DIGITS_SAMPLES = 1346  # the digits training split (75% of 1797), over 5 experiences


def run(plugins: str, *, training: str | None = None):
    text = DIGITS_SCENARIO.replace("plugins: [naive]", f"plugins: [{plugins}]")
    if training is not None:
        text = text.replace("training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, "
                            "lr: 0.1}}", f"training: {training}")
    return run_scenario(parse_scenario(text), None).outcomes[0]


@pytest.fixture
def mod(monkeypatch):
    monkeypatch.setitem(sys.modules, "loop_contract_plugins", sys.modules[__name__])
    for cls in (Peeker, Scaled, TwoViews, Planner, EvalPlanner, Owner, AuxMaker, AuxReader):
        cls.seen = []
    return "loop_contract_plugins"


class Peeker:
    """Records, in every training hook, whether any test data or the dataset is in reach."""

    seen: list = []

    def _look(self, hook, ctx, experience=None):
        # not even a view: an empty slice would still share the test set's storage
        test_bytes = None if experience is None else (
            experience.test_x.untyped_storage().nbytes()
            + experience.test_y.untyped_storage().nbytes())
        type(self).seen.append((hook, hasattr(ctx, "dataset"), test_bytes))

    def clsim_before_experience(self, ctx, experience):
        self._look("before_experience", ctx, experience)

    def clsim_plan_experience(self, ctx, experience):
        self._look("plan_experience", ctx, experience)
        self._look("ctx.experience", ctx, ctx.experience)

    def clsim_after_batch(self, ctx):
        self._look("after_batch", ctx, ctx.experience)

    def clsim_after_experience(self, ctx, experience):
        self._look("after_experience", ctx, experience)

    def clsim_report(self, stream):
        return {"test_samples": sum(exp.n_test for exp in stream)}


def test_training_hooks_see_no_test_data_and_the_report_does(mod):
    outcome = run(f"'{mod}:Peeker'")
    assert outcome.error is None
    hooks = {hook for hook, _, _ in Peeker.seen}
    assert hooks == {"before_experience", "plan_experience", "ctx.experience", "after_batch",
                     "after_experience"}
    assert all(has_dataset is False and test_bytes == 0
               for _, has_dataset, test_bytes in Peeker.seen)
    assert outcome.metrics["plugins"]["Peeker"]["test_samples"] == 1797 - DIGITS_SAMPLES


class Scaled:
    """A plugin parameter trained at half the scenario's learning rate."""

    seen: list = []

    def __init__(self):
        self.offset = nn.Parameter(torch.zeros(10))

    def clsim_trainable(self):
        return Trainable(self.offset, lr_scale=0.5)

    def clsim_loss(self, logits):
        return (self.offset - logits.mean(0).detach()).square().sum()

    def clsim_after_backward(self, ctx):
        groups = [(g["lr"], [id(p) for p in g["params"]]) for g in ctx.optimizer.param_groups]
        type(self).seen.append((type(ctx.optimizer).__name__, groups, id(self.offset),
                                self.offset.detach().clone(), self.offset.grad.clone()))

    def clsim_after_update(self):
        type(self).seen[-1] += (self.offset.detach().clone(),)


def test_a_plugin_parameter_trains_under_the_scenarios_optimizer_at_its_lr_factor(mod):
    outcome = run(f"naive, '{mod}:Scaled'")
    assert outcome.error is None and Scaled.seen
    for name, groups, offset_id, before, grad, after in Scaled.seen:
        assert name == "SGD"
        lrs = {lr for lr, ids in groups if offset_id in ids}
        assert lrs == {0.05}  # 0.5 x the scenario's 0.1, in its own group only
        assert [lr for lr, ids in groups if offset_id not in ids] == [0.1]  # the model's
        assert torch.equal(after, torch.add(before, grad, alpha=-0.05))  # plain SGD, exactly
    assert outcome.ledger.records[-1].measurement.parts.get("Scaled.offset") == 40


class BareParameter:
    """Returns one bare parameter from clsim_trainable (scale 1)."""

    def __init__(self):
        self.offset = nn.Parameter(torch.zeros(10))

    def clsim_trainable(self):
        return self.offset

    def clsim_loss(self, logits):
        return (self.offset - logits.mean(0).detach()).square().sum()

    def clsim_after_update(self, ctx):
        lrs = [g["lr"] for g in ctx.optimizer.param_groups
               if any(p is self.offset for p in g["params"])]
        assert lrs == [0.1]


def test_a_bare_parameter_is_trainable_too(mod):
    assert run(f"'{mod}:BareParameter'").error is None


class TwoViews:
    """Two views of every sample: the clean one and the negated one."""

    seen: list = []

    def clsim_inputs(self, inputs):
        return torch.cat([inputs, -inputs])

    def clsim_loss(self, batch, output):
        type(self).seen.append((len(batch), output.views, output.logits.shape[0],
                                torch.equal(output.targets, batch.y.repeat(2)),
                                torch.equal(output.view(output.inputs, 1),
                                            -output.view(output.inputs, 0))))


def test_views_are_stacked_and_targets_repeated(mod):
    outcome = run(f"'{mod}:TwoViews'")
    assert outcome.error is None
    assert all(views == 2 and rows == 2 * n and same_targets and negated
               for n, views, rows, same_targets, negated in TwoViews.seen)


class Planner:
    """Trains experience 1 on itself twice over, for 2 epochs; skips experience 2."""

    seen: list = []

    def clsim_plan_experience(self, experience, plan):
        type(self).seen.append(("plan", experience.index, experience.n_train))
        if experience.index == 1:
            return replace(plan.extended(plan.x, plan.y), epochs=2)
        if experience.index == 2:
            return replace(plan, train=False)
        return None

    def clsim_after_batch(self, ctx, batch):
        type(self).seen.append(("batch", ctx.experience.index, len(batch)))


def test_a_plan_extends_the_data_sets_the_epochs_or_takes_no_step(mod):
    outcome = run(f"'{mod}:Planner'")
    assert outcome.error is None
    n_train = {index: n for kind, index, n in Planner.seen if kind == "plan"}
    trained = dict.fromkeys(n_train, 0)
    for kind, index, n in Planner.seen:
        if kind == "batch":
            trained[index] += n
    assert len(n_train) == 5 and sum(n_train.values()) == DIGITS_SAMPLES
    assert trained[0] == n_train[0] and trained[3] == n_train[3]
    assert trained[1] == 2 * 2 * n_train[1]  # doubled data, two epochs
    assert trained[2] == 0  # no batch hook in a session without gradient steps


class EvalPlanner:
    """Asks for eval mode on experience 1: the loop then trains without BatchNorm updates
    or dropout; the other experiences train in train mode."""

    seen: list = []

    def clsim_plan_experience(self, experience, plan):
        return replace(plan, eval_mode=experience.index == 1)

    def clsim_after_batch(self, ctx):
        type(self).seen.append((ctx.experience.index, ctx.model.training,
                                ctx.model.features[0].training))


def test_a_plan_in_eval_mode_trains_the_model_in_eval_mode(mod):
    outcome = run(f"'{mod}:EvalPlanner'")
    assert outcome.error is None
    modes = {index: {training, inner} for index, training, inner in EvalPlanner.seen}
    assert modes == {0: {True}, 1: {False}, 2: {True}, 3: {True}, 4: {True}}


class AuxMaker:
    seen: list = []

    def clsim_forward(self, output):
        return {"norms": output.features.norm(dim=1)}


class AuxReader:
    seen: list = []

    def clsim_task_loss(self, ctx, output):
        type(self).seen.append(torch.equal(output.aux["norms"], output.features.norm(dim=1)))
        return 0.5 * ctx.task_loss(output.logits, output.targets)


def test_aux_outputs_reach_later_hooks_and_the_task_loss_can_be_weighted(mod):
    outcome = run(f"'{mod}:AuxMaker', '{mod}:AuxReader'")
    assert outcome.error is None and AuxReader.seen and all(AuxReader.seen)
    twice = run(f"'{mod}:AuxMaker', '{mod}:AuxMaker'")
    assert "output names ['norms'] are already taken" in twice.error


class Owner:
    """Learns each experience in a loop of its own, through the loop's services."""

    seen: list = []
    poison = False

    def clsim_train_experience(self, ctx, experience):
        optimizer = ctx.new_optimizer(ctx.model)
        type(self).seen.append((type(optimizer).__name__, optimizer.param_groups[0]["lr"]))
        for start in range(0, experience.n_train, 64):
            x = ctx.to_input(experience.train_x[start : start + 64])
            loss = F.cross_entropy(ctx.model(x), experience.train_y[start : start + 64])
            if type(self).poison and start == 64:
                loss = loss * float("nan")
            ctx.backward_step(optimizer, loss)
        return True


def test_an_owner_steps_under_the_scenarios_optimizer_and_nonfinite_policy(mod):
    adam = "{epochs: 1, batch_size: 64, optimizer: {name: adam, lr: 0.003}}"
    assert run(f"'{mod}:Owner'", training=adam).error is None
    assert set(Owner.seen) == {("Adam", 0.003)}
    Owner.poison = True
    try:
        stopped = run(f"'{mod}:Owner'")
        assert "the loss became nan" in stopped.error and "experience 0" in stopped.error
        skipping = run(f"'{mod}:Owner'", training="{epochs: 1, batch_size: 64, "
                       "nonfinite_loss: skip_batch}")
    finally:
        Owner.poison = False
    assert skipping.error is None and skipping.metrics["skipped_batches"] == 5


class TwoEpochs:
    seen: list = []

    def clsim_plan_experience(self, plan):
        return replace(plan, epochs=2)


def test_an_online_stream_refuses_a_plan_of_several_epochs(mod):
    text = DIGITS_SCENARIO.replace("plugins: [naive]", f"plugins: ['{mod}:TwoEpochs']")
    text = text.replace("n_experiences: 5}", "n_experiences: 5, online: true}")
    error = run_scenario(parse_scenario(text), None).outcomes[0].error
    assert error == ("strategy 'naive': a plan asks for 2 epochs on an online stream, which "
                     "shows each sample once (plugins with clsim_plan_experience: TwoEpochs)")


def test_plan_extended_keeps_task_ids_aligned():
    plan = ExperiencePlan(torch.zeros(3, 2), torch.tensor([0, 1, 0]), torch.tensor([4, 4, 4]),
                          epochs=1)
    grown = plan.extended(torch.ones(2, 2), torch.tensor([5, 6]))
    assert grown.n_samples == 5 and grown.task_ids.tolist() == [4, 4, 4, -1, -1]
    assert grown.y.tolist() == [0, 1, 0, 5, 6] and grown.epochs == 1 and grown.train


def test_trainables_group_bare_parameters_and_name_a_wrong_kind():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    head = nn.Linear(2, 2)
    items = as_trainables([a, head, b, Trainable(head.bias, lr_scale=0.5)])
    groups = trainable_parameters(None, items)
    assert [(len(params), scale) for params, scale in groups] == [(2, 1.0), (2, 1.0)]
    assert groups[0][0][0] is a and groups[0][0][1] is b  # one group for the bare ones
    with pytest.raises(TypeError, match="got a int; expected modules, parameters"):
        as_trainables([a, 3])
