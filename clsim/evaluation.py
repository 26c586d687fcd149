"""Evaluation: correct predictions on every experience's test set, counted per label.

Counting hits per (experience, label) rather than one number per experience lets every
family's scores come from the same record: the accuracy matrix sums a row, few-shot
splits base from novel classes, hierarchical scenarios split by level, anytime accuracy
keeps the classes seen so far.

Each distinct test input is predicted once per evaluation point (:class:`EvaluationPlan`):
a hierarchy's levels, a few-shot stream's sessions and a recurring task's returns test the
same images under other labels, and all their hits are counted from the same predictions.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from clsim.compute import current
from clsim.context import RunContext
from clsim.digests import row_digests
from clsim.feature_cache import feature_cache, is_frozen
from clsim.labels import LabelSpace, correct_predictions
from clsim.models.base import has_feature_head
from clsim.models.heads import active_outputs
from clsim.plugin_manager import HookRunner
from clsim.stream import Stream


@torch.no_grad()
def predict(
    ctx: RunContext,
    hooks: HookRunner,
    x: torch.Tensor,
    task_id: int | None,
    classes: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Class ids for model inputs ``x``: a plugin's ``clsim_predict`` or the logits' argmax.

    A model whose encoder is frozen reads its features from the simulator's feature cache
    (:mod:`clsim.feature_cache`), so an image's features are computed once however often
    it is evaluated.

    With task ids visible, the argmax is taken over ``classes`` (the task's own) only.
    With several label levels the result is ``(N, n_levels)``: each head's own argmax,
    -1 for a head with no class seen yet; a plugin may answer ``(N,)`` or that shape.
    """
    labels = ctx.labels
    plugin, predicted = hooks.first("clsim_predict", ctx=ctx, x=x, task_id=task_id)
    if plugin is not None:
        shapes = [(len(x),)] + ([(len(x), labels.n_levels)] if labels.n_levels > 1 else [])
        ok = (isinstance(predicted, torch.Tensor) and tuple(predicted.shape) in shapes
              and not predicted.is_floating_point() and not predicted.is_complex())
        if not ok:
            got = (f"{predicted.dtype} of shape {tuple(predicted.shape)}"
                   if isinstance(predicted, torch.Tensor) else type(predicted).__name__)
            expected = " or ".join(str(s) for s in shapes)
            raise hooks.fault(plugin, "clsim_predict", f"returned {got}; expected integer "
                              f"class ids of shape {expected}")
        return predicted.to(x.device)
    logits = model_logits(ctx.model, x)
    if labels.n_levels > 1:
        return level_predictions(logits, labels, active_outputs(ctx.model))
    if task_id is not None and classes is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[:, list(classes)] = 0.0
        logits = logits + mask
    return logits.argmax(dim=1)


def model_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``; ``head(features)`` from the feature cache when the features are
    frozen, computed in a call of ``len(x)`` rows: the call ``model(x)`` makes, so the
    logits are bit-identical to it."""
    if len(x) and has_feature_head(model) and is_frozen(model.features):
        return model.head(feature_cache().features(model.features, x, len(x)))
    return model(x)


def level_predictions(
    logits: torch.Tensor, labels: LabelSpace, active: torch.Tensor | None
) -> torch.Tensor:
    """``(N, n_levels)`` flat ids: every head's argmax, -1 where a head has no output in use."""
    columns = []
    for level in range(labels.n_levels):
        part = labels.level_slice(level)
        best = logits[:, part].argmax(dim=1) + part.start
        if active is not None and not bool(active[part].any()):
            best = torch.full_like(best, -1)
        columns.append(best)
    return torch.stack(columns, dim=1)


@dataclass(frozen=True)
class _Step:
    """One experience's test set in an :class:`EvaluationPlan`: ``new_rows``, the rows not
    predicted before it in its group (None: all of them, in order, the set itself), and
    ``positions``, where each of its rows' prediction sits in the group's predictions."""

    group: int
    new_rows: torch.Tensor | None
    positions: torch.Tensor


@dataclass(frozen=True)
class EvaluationPlan:
    """Which test inputs of a stream to predict, each once per evaluation point.

    A prediction depends on the input and, with task ids, on the task (its classes mask
    the argmax), so inputs are grouped by ``(task_id, classes)`` (all in one group when
    task ids are hidden) and identified by their bytes within a group. The experiences
    are walked in order and each one predicts only its inputs its group has not met, in
    batches cut as before: a stream whose test sets repeat no image (class-incremental) is
    predicted in exactly the batches it always was. Rows of a later experience that are
    partly new go in shorter batches, which a CPU may round differently (about 1e-7 of a
    logit): a tie that close can flip an argmax.
    """

    steps: tuple[_Step, ...]
    n_groups: int
    n_rows: int  # test rows scored per evaluation point
    n_predicted: int  # distinct inputs predicted per evaluation point

    @classmethod
    def of(cls, stream: Stream) -> EvaluationPlan:
        groups: dict[object, dict[bytes, int]] = {}
        steps, predicted = [], 0
        for exp in stream:
            key = None if exp.task_id is None else (exp.task_id, tuple(exp.classes))
            group = groups.setdefault(key, {})
            positions, new_rows = [], []
            for row, digest in enumerate(row_digests(exp.test_x)):
                position = group.get(digest)
                if position is None:
                    position = group[digest] = len(group)
                    new_rows.append(row)
                positions.append(position)
            predicted += len(new_rows)
            whole = new_rows == list(range(exp.n_test))
            steps.append(_Step(list(groups).index(key),
                               None if whole else torch.tensor(new_rows, dtype=torch.long),
                               torch.tensor(positions, dtype=torch.long)))
        return cls(tuple(steps), len(groups), sum(exp.n_test for exp in stream), predicted)

    @classmethod
    def every_row(cls, stream: Stream) -> EvaluationPlan:
        """The evaluation before plans: every experience's test set predicted whole, a
        repeated image as often as it is tested (the reference of benchmarks/speed.py)."""
        steps, offset = [], 0
        for exp in stream:
            steps.append(_Step(0, None, torch.arange(offset, offset + exp.n_test)))
            offset += exp.n_test
        n_rows = sum(exp.n_test for exp in stream)
        return cls(tuple(steps), 1, n_rows, n_rows)


_PLANS: weakref.WeakKeyDictionary[Stream, EvaluationPlan] = weakref.WeakKeyDictionary()


def plan_of(stream: Stream) -> EvaluationPlan:
    """``stream``'s evaluation plan, built once per stream object (a stream is immutable)."""
    plan = _PLANS.get(stream)
    if plan is None:
        plan = _PLANS[stream] = EvaluationPlan.of(stream)
    return plan


@torch.no_grad()
def evaluate(
    ctx: RunContext,
    hooks: HookRunner,
    stream: Stream,
    batch_size: int,
    plan: EvaluationPlan | None = None,
    layout: torch.memory_format = torch.contiguous_format,
) -> np.ndarray:
    """``(n_experiences, n_labels)`` correct predictions on each experience's test set,
    each distinct input predicted once (``plan``: by default the stream's, built at its
    first evaluation); image batches in ``layout`` (channels_last: a convolution computes
    in it faster on the CPU, whatever the weights' layout)."""
    plan = plan or plan_of(stream)
    was_training = ctx.model.training
    ctx.model.eval()
    n_labels = stream.labels.n_classes
    hits = np.zeros((len(stream), n_labels), dtype=np.int64)
    predictions: list[list[torch.Tensor]] = [[] for _ in range(plan.n_groups)]
    # the strategy's inference FLOPs (clsim.compute): a batch's follow from its shape
    meter = current()
    memo = None if meter is None else meter.prediction_memo()
    try:
        for j, (exp, step) in enumerate(zip(stream, plan.steps, strict=True)):
            x_new = exp.test_x if step.new_rows is None else exp.test_x[step.new_rows]
            for start in range(0, len(x_new), batch_size):
                x = ctx.to_input(x_new[start : start + batch_size])
                if x.dim() == 4:
                    x = x.contiguous(memory_format=layout)
                with nullcontext() if memo is None else memo.region(
                        (tuple(x.shape), exp.task_id)):
                    predictions[step.group].append(
                        predict(ctx, hooks, x, exp.task_id, exp.classes))
            if exp.n_test == 0:
                continue
            known = torch.cat(predictions[step.group])
            predictions[step.group] = [known]
            y = exp.test_y.to(ctx.device, non_blocking=True)
            pred = known[step.positions.to(known.device)]
            right = correct_predictions(stream.labels, pred, y)
            counts = torch.zeros(n_labels, dtype=torch.int64, device=ctx.device)
            counts.index_add_(0, y, right.long())  # counted on the device, read once
            hits[j] = counts.cpu().numpy()
    finally:
        ctx.model.train(was_training)
    return hits


def label_counts(stream: Stream) -> np.ndarray:
    """``(n_experiences, n_labels)`` test samples per experience and label."""
    n_labels = stream.labels.n_classes
    return np.stack([np.bincount(exp.test_y.numpy(), minlength=n_labels) for exp in stream])
