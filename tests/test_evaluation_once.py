"""Each distinct test input is predicted once per evaluation point (clsim/evaluation.py).

A hierarchy's levels and a recurring task's returns test the same images again; their
hits must be counted from one prediction per image, and must equal what predicting every
experience's test set on its own gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, bare_context

from clsim.assembly import build_scenario_model, build_stream, load_scenario_data
from clsim.config import load_scenario, parse_scenario
from clsim.digests import row_digests
from clsim.evaluation import EvaluationPlan, evaluate, plan_of, predict
from clsim.labels import correct_predictions
from clsim.plugin_manager import HookRunner, build_plugin_manager


class CountingPredictor:
    """Counts the rows it is asked to predict; answers with the model's argmax."""

    def __init__(self) -> None:
        self.rows = 0

    def clsim_predict(self, ctx, x):
        self.rows += len(x)
        return None


def setup(scenario_text_or_name: str):
    scenario = (load_scenario(REPO_ROOT / "scenarios" / f"{scenario_text_or_name}.yaml")
                if "\n" not in scenario_text_or_name else parse_scenario(scenario_text_or_name))
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    torch.manual_seed(0)
    model = build_scenario_model(scenario, dataset, stream)
    ctx = bare_context(model, dataset, labels=stream.labels)
    counter = CountingPredictor()
    hooks = HookRunner(build_plugin_manager([("counter", counter)]))
    return stream, ctx, hooks, counter


@torch.no_grad()
def every_row_hits(ctx, hooks, stream, batch_size: int) -> np.ndarray:
    """The evaluation before plans: every experience's test set predicted on its own."""
    ctx.model.eval()
    hits = np.zeros((len(stream), stream.labels.n_classes), dtype=np.int64)
    for j, exp in enumerate(stream):
        for start in range(0, exp.n_test, batch_size):
            x = ctx.to_input(exp.test_x[start : start + batch_size])
            y = exp.test_y[start : start + batch_size]
            right = correct_predictions(stream.labels, predict(ctx, hooks, x, exp.task_id,
                                                               exp.classes), y)
            hits[j] += np.bincount(y[right].numpy(), minlength=hits.shape[1])
    return hits


def distinct(stream, by_task: bool = False) -> int:
    keys = set()
    for exp in stream:
        task = (exp.task_id, exp.classes) if by_task and exp.task_id is not None else None
        keys.update((task, d) for d in row_digests(exp.test_x))
    return len(keys)


@pytest.mark.parametrize("name, shared", [("hle_quick", True), ("recurring_quick", True),
                                          ("fscil_quick", False)])
def test_each_distinct_image_is_predicted_once_with_the_same_hits(name, shared):
    stream, ctx, hooks, counter = setup(name)
    plan = EvaluationPlan.of(stream)
    assert plan.n_rows == sum(exp.n_test for exp in stream)
    assert plan.n_predicted == distinct(stream, by_task=True)
    assert (plan.n_predicted < plan.n_rows) == shared  # an image tested more than once
    reference = every_row_hits(ctx, hooks, stream, batch_size=64)
    counter.rows = 0
    np.testing.assert_array_equal(
        evaluate(ctx, hooks, stream, 64, plan=EvaluationPlan.every_row(stream)), reference)
    assert counter.rows == plan.n_rows  # the plan of the old path predicts every row
    counter.rows = 0
    hits = evaluate(ctx, hooks, stream, batch_size=64, plan=plan)
    assert counter.rows == plan.n_predicted
    np.testing.assert_array_equal(hits, reference)


def test_hierarchy_levels_share_their_images():
    """hle_quick's two levels test the same digits test images (parity, then digit)."""
    stream, *_ = setup("hle_quick")
    plan = EvaluationPlan.of(stream)
    levels = {exp.level for exp in stream}
    assert len(levels) == 2
    assert plan.n_predicted == distinct(stream) == plan.n_rows // 2


def test_disjoint_test_sets_keep_their_batches():
    """Class-incremental test sets share no image: each is predicted whole, in the batches
    it always was, so results are bit-identical to the evaluation before plans."""
    text = """\
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [16]}
strategies: {naive: {plugins: [naive]}}
"""
    stream, ctx, hooks, counter = setup(text)
    plan = plan_of(stream)
    assert plan is plan_of(stream)  # built once per stream
    assert all(step.new_rows is None for step in plan.steps)
    assert plan.n_predicted == plan.n_rows
    np.testing.assert_array_equal(evaluate(ctx, hooks, stream, 100),
                                  every_row_hits(ctx, hooks, stream, 100))


def test_task_ids_keep_a_prediction_per_task():
    """With task ids the argmax is masked to the task's classes: the same image tested in
    two tasks is predicted once per task, never shared across them."""
    text = """\
data: {dataset: digits}
stream: {type: rotated, n_experiences: 2, scenario: task, angles: [0, 0]}
model: {name: mlp, hidden: [16]}
strategies: {naive: {plugins: [naive]}}
"""
    stream, ctx, hooks, counter = setup(text)
    assert stream[0].task_id != stream[1].task_id
    assert torch.equal(stream[0].test_x, stream[1].test_x)  # angle 0 twice: same images
    plan = EvaluationPlan.of(stream)
    assert plan.n_groups == 2
    assert plan.n_predicted == plan.n_rows
    counter.rows = 0
    hits = evaluate(ctx, hooks, stream, 64, plan=plan)
    assert counter.rows == plan.n_rows
    np.testing.assert_array_equal(hits, every_row_hits(ctx, hooks, stream, 64))


def test_row_digests_tell_rows_apart_by_bytes_dtype_and_shape():
    x = torch.arange(24, dtype=torch.uint8).reshape(4, 6)
    assert len(set(row_digests(torch.cat([x, x.clone()])))) == 4
    assert row_digests(x)[0] != row_digests(x.to(torch.int16))[0]
    assert row_digests(x)[0] != row_digests(x.reshape(4, 2, 3))[0]
    assert row_digests(x[:0]) == []
