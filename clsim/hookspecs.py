"""The contract between the engine and strategy plugins: every hook clsim fires.

Hooks are called with keyword arguments only, and an implementation may accept any
subset of a spec's arguments, so a spec can grow without breaking plugins. A plugin
*returns* what it contributes (a batch, loss terms, predictions) instead of mutating
engine state; what it may read is on the run context ``ctx`` (see
:class:`clsim.context.RunContext`).

Call order within one hook is the order of the plugins in the strategy's YAML list,
first listed first; ``tryfirst=True`` / ``trylast=True`` on a ``@hookimpl`` move an
implementation to the front or back. ``clsim list --order HOOK`` prints the resolved
order for a strategy.

Per experience the engine fires, in this order::

    clsim_before_experience
    clsim_train_experience            (first result; None -> the engine trains)
        for each batch: clsim_before_batch (chained) -> forward -> clsim_loss
                        -> backward -> clsim_after_backward -> step
                        -> clsim_after_update -> clsim_after_batch
    clsim_after_experience
    (ledger measures the bytes held; evaluation uses clsim_predict)

After the last experience ``clsim_report`` collects each plugin's own scores.

``clsim_setup`` fires once before the first experience and ``clsim_teardown`` once
after the last (also when the run fails).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from clsim.context import RunContext
    from clsim.stream import Batch, Experience, Stream

PROJECT_NAME = "clsim"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ---------------------------------------------------------------------------
# run lifecycle
# ---------------------------------------------------------------------------


@hookspec
def clsim_setup(ctx: RunContext) -> None:
    """Prepare the plugin before the first experience.

    The model is built and ``ctx.budget_bytes`` is known here: a plugin that sizes its
    memory from the budget (replay capacity, expansion) does so now, and raises
    :class:`clsim.errors.ConfigError` if the budget cannot hold its minimum.

    :param ctx: the run context.
    """


@hookspec
def clsim_teardown(ctx: RunContext) -> None:
    """Release resources after the last experience, or after a failed run.

    :param ctx: the run context.
    """


# ---------------------------------------------------------------------------
# experience boundaries
# ---------------------------------------------------------------------------


@hookspec
def clsim_before_experience(ctx: RunContext, experience: Experience) -> None:
    """An experience is about to be trained on (grow heads, snapshot old models).

    :param ctx: the run context; ``ctx.experience`` is ``experience``.
    :param experience: the experience's training data and metadata.
    """


@hookspec(firstresult=True)
def clsim_train_experience(ctx: RunContext, experience: Experience) -> Any | None:
    """Own the training of one experience.

    Stops at the first non-None result. Return None to let the engine run its standard
    loop (epochs x mini-batches with the batch hooks below); return anything else to
    say the plugin trained the experience itself (it may call ``ctx.fit(x, y)`` to
    reuse the standard loop on data of its choosing).

    :param ctx: the run context.
    :param experience: the experience to train on.
    """


@hookspec
def clsim_after_experience(ctx: RunContext, experience: Experience) -> None:
    """The experience is trained: select exemplars, compute prototypes, prune, expand.

    What a plugin still holds after this hook is what the ledger charges it.

    :param ctx: the run context.
    :param experience: the experience just trained on.
    """


# ---------------------------------------------------------------------------
# mini-batch training (standard loop and ctx.fit)
# ---------------------------------------------------------------------------


@hookspec
def clsim_before_batch(ctx: RunContext, batch: Batch) -> Batch | None:
    """Transform the batch before the forward pass (for example, mix in replay samples).

    Chained, not collected: implementations run in plugin order, each receiving the
    batch as left by the previous one; return a new :class:`clsim.stream.Batch` to
    replace it, or None to keep it. Keep the stream's own samples first so that
    ``batch.stream_part()`` still returns them.

    :param ctx: the run context.
    :param batch: raw samples (storage dtype), labels and task ids.
    """


@hookspec
def clsim_loss(ctx: RunContext, batch: Batch, logits: torch.Tensor) -> torch.Tensor | None:
    """Contribute an extra loss term (distillation, auxiliary heads, regularisers).

    Collected: every non-None scalar tensor is added to the task loss (cross-entropy of
    ``logits`` against ``batch.y``). With ``training.nonfinite_loss: skip_batch``, a batch
    whose total loss is NaN or infinite ends here: no backward, no optimizer step and no
    ``clsim_after_*`` hook for it.

    :param ctx: the run context.
    :param batch: the batch after ``clsim_before_batch``.
    :param logits: the model's output on ``batch``.
    """


@hookspec
def clsim_after_backward(ctx: RunContext, batch: Batch, loss: torch.Tensor) -> None:
    """Gradients are computed and the optimizer has not stepped (clip, project, mask).

    :param ctx: the run context.
    :param batch: the batch trained on.
    :param loss: the total loss that was back-propagated.
    """


@hookspec
def clsim_after_update(ctx: RunContext, batch: Batch) -> None:
    """The optimizer has stepped (weight averaging, constraints on weights).

    :param ctx: the run context.
    :param batch: the batch trained on.
    """


@hookspec
def clsim_after_batch(
    ctx: RunContext, batch: Batch, logits: torch.Tensor, loss: torch.Tensor
) -> None:
    """The batch is done (update a replay buffer, detect a distribution shift).

    :param ctx: the run context.
    :param batch: the batch trained on; ``batch.stream_part()`` holds its stream samples.
    :param logits: the model's output on ``batch`` (computed before the update).
    :param loss: the total loss of the batch (detached).
    """


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def clsim_predict(ctx: RunContext, x: torch.Tensor, task_id: int | None) -> torch.Tensor | None:
    """Predict class ids for a batch of test inputs (nearest-mean, expert routing).

    Stops at the first non-None result. Return an int64 tensor of class ids, shape (N,),
    or None to let the engine take the argmax of the model's logits.

    :param ctx: the run context; the model is in eval mode and gradients are off.
    :param x: model input (already converted from raw samples), on ``ctx.device``.
    :param task_id: the experience's task id when task ids are visible at test, else None.
    """


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------


@hookspec
def clsim_report(ctx: RunContext, stream: Stream) -> dict[str, Any] | None:
    """Contribute the plugin's own scores to ``summary.json`` after the last experience.

    Training is over, so the whole stream may be read now: its test sets (to score a
    routing strategy's within-expert accuracy, say) and ``stream.boundaries()``, the true
    experience starts in training samples (to score a shift detector against). Return a
    dict of JSON-ready plain data (str keys; numbers, strings, bools, None, lists, dicts)
    or None; it is stored under ``metrics.plugins.<plugin name>`` of the strategy.

    :param ctx: the run context; the model is as training left it.
    :param stream: the stream the strategy was trained on (with hidden boundaries too).
    """
