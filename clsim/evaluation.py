"""Evaluation after each experience: correct predictions on every experience's test set."""

from __future__ import annotations

import numpy as np
import torch

from clsim.context import RunContext
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
    """
    plugin, predicted = hooks.first("clsim_predict", ctx=ctx, x=x, task_id=task_id)
    if plugin is not None:
        ok = (isinstance(predicted, torch.Tensor) and predicted.shape == (len(x),)
              and not predicted.is_floating_point() and not predicted.is_complex())
        if not ok:
            got = (f"{predicted.dtype} of shape {tuple(predicted.shape)}"
                   if isinstance(predicted, torch.Tensor) else type(predicted).__name__)
            raise hooks.fault(plugin, "clsim_predict", f"returned {got}; expected integer "
                              f"class ids of shape ({len(x)},)")
        return predicted.to(x.device)
    logits = ctx.model(x)
    if task_id is not None and classes is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[:, list(classes)] = 0.0
        logits = logits + mask
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate(ctx: RunContext, hooks: HookRunner, stream: Stream, batch_size: int) -> np.ndarray:
    """Correct predictions on each experience's test set, in stream order."""
    was_training = ctx.model.training
    ctx.model.eval()
    correct = np.zeros(len(stream), dtype=np.int64)
    try:
        for j, exp in enumerate(stream):
            hits = torch.zeros((), dtype=torch.int64, device=ctx.device)
            for start in range(0, exp.n_test, batch_size):
                x = ctx.to_input(exp.test_x[start : start + batch_size])
                y = exp.test_y[start : start + batch_size].to(ctx.device, non_blocking=True)
                pred = predict(ctx, hooks, x, exp.task_id, exp.classes)
                hits += (pred == y).sum()  # counted on the device, read once per test set
            correct[j] = int(hits)
    finally:
        ctx.model.train(was_training)
    return correct
