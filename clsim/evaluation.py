"""Evaluation: correct predictions on every experience's test set, counted per label.

Counting hits per (experience, label) rather than one number per experience lets every
family's scores come from the same record: the accuracy matrix sums a row, few-shot
splits base from novel classes, hierarchical scenarios split by level, anytime accuracy
keeps the classes seen so far.
"""

from __future__ import annotations

import numpy as np
import torch

from clsim.context import RunContext
from clsim.labels import LabelSpace, correct_predictions
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
    logits = ctx.model(x)
    if labels.n_levels > 1:
        return level_predictions(logits, labels, active_outputs(ctx.model))
    if task_id is not None and classes is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[:, list(classes)] = 0.0
        logits = logits + mask
    return logits.argmax(dim=1)


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


@torch.no_grad()
def evaluate(ctx: RunContext, hooks: HookRunner, stream: Stream, batch_size: int) -> np.ndarray:
    """``(n_experiences, n_labels)`` correct predictions on each experience's test set."""
    was_training = ctx.model.training
    ctx.model.eval()
    n_labels = stream.labels.n_classes
    hits = np.zeros((len(stream), n_labels), dtype=np.int64)
    try:
        for j, exp in enumerate(stream):
            counts = torch.zeros(n_labels, dtype=torch.int64, device=ctx.device)
            for start in range(0, exp.n_test, batch_size):
                x = ctx.to_input(exp.test_x[start : start + batch_size])
                y = exp.test_y[start : start + batch_size].to(ctx.device, non_blocking=True)
                pred = predict(ctx, hooks, x, exp.task_id, exp.classes)
                right = correct_predictions(stream.labels, pred, y)
                counts.index_add_(0, y, right.long())  # counted on the device, read once
            hits[j] = counts.cpu().numpy()
    finally:
        ctx.model.train(was_training)
    return hits


def label_counts(stream: Stream) -> np.ndarray:
    """``(n_experiences, n_labels)`` test samples per experience and label."""
    n_labels = stream.labels.n_classes
    return np.stack([np.bincount(exp.test_y.numpy(), minlength=n_labels) for exp in stream])
