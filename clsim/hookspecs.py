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
    clsim_train_experience            (first result; None -> the standard loop trains)
    clsim_plan_experience             (chained: data, epochs, whether to step at all)
    clsim_trainable                   (collected: parameters the optimizer adds)
        for each batch: clsim_before_batch (chained) -> clsim_inputs (chained)
                        -> forward -> clsim_forward (collected: named aux outputs)
                        -> clsim_task_loss (one replacement at most) + clsim_loss
                        -> backward -> clsim_after_backward -> step
                        -> clsim_after_update -> clsim_after_batch
    clsim_after_experience
    (ledger measures the bytes held; evaluation uses clsim_predict)

After the last experience ``clsim_report`` collects each plugin's own scores.

``clsim_setup`` fires once before the first experience, then ``clsim_size_stores``
once every plugin has set up, and ``clsim_teardown`` once after the last (also when the
run fails).

**One loop.** A strategy is hooks over the standard loop, which trains every strategy
under the scenario's optimizer, non-finite policy and accounting. Only a method whose
learning is not gradient descent on mini-batches (a closed-form solve, class means, an
external library's strategy) implements ``clsim_train_experience``, and a strategy may
hold one such plugin, with no other plugin implementing the loop's hooks
(:data:`LOOP_HOOKS`): those would never fire, so the pair is refused at start-up.

**Compute is counted where it happens.** FLOPs a plugin computes inside a hook are
charged to ``<plugin>.<hook>`` in the strategy's compute (``clsim.compute``), or to
``<plugin>.<label>`` inside ``with ctx.compute_part(label)``.

**No test data while training.** Training hooks receive experiences without their test
samples (not even a view of them), and ``ctx.data`` describes the dataset without holding
it; test inputs reach a plugin only in ``clsim_predict``, and ``clsim_report`` reads the
stream's test sets once training is over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from clsim.context import RunContext
    from clsim.loop_types import ExperiencePlan, ForwardOutput
    from clsim.stream import Batch, Experience, Stream

PROJECT_NAME = "clsim"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

LOOP_HOOKS = (
    "clsim_plan_experience",
    "clsim_trainable",
    "clsim_before_batch",
    "clsim_inputs",
    "clsim_forward",
    "clsim_task_loss",
    "clsim_loss",
    "clsim_after_backward",
    "clsim_after_update",
    "clsim_after_batch",
)
"""The hooks only the standard loop fires: a plugin owning an experience silences them."""

RUN_ORDER = (
    "clsim_setup",
    "clsim_size_stores",
    "clsim_before_experience",
    "clsim_train_experience",
    *LOOP_HOOKS,
    "clsim_after_experience",
    "clsim_predict",
    "clsim_report",
    "clsim_teardown",
)
"""Every hook, in the order one run fires it (``clsim list --order all`` prints so)."""


# ---------------------------------------------------------------------------
# run lifecycle
# ---------------------------------------------------------------------------


@hookspec
def clsim_setup(ctx: RunContext) -> None:
    """Prepare the plugin before the first experience.

    The model is built and ``ctx.budget_bytes`` is known here. Build the plugin's
    state (rewire the model, allocate what it always holds) and refuse a configuration
    the plugin cannot run with (:class:`clsim.errors.ConfigError`). A store sized from
    what the budget leaves waits for ``clsim_size_stores``: the plugins after this one
    have not set up yet.

    :param ctx: the run context.
    """


@hookspec
def clsim_size_stores(ctx: RunContext) -> None:
    """Size the stores that fill what the budget leaves (a replay buffer, exemplars).

    Fires once, after ``clsim_setup`` of every plugin and before the first experience
    (before a checkpoint is restored, when resuming), in plugin order. Every plugin's
    state of setup is in place, so a store sized here fills what the budget leaves after
    the whole strategy, whatever the order of its plugins: the model, every plugin as the
    ledger measures it (this one with the store emptied) and the optimizer state the loop
    carries at the peak. :func:`clsim.capacity.size_store` measures that, logs it (event
    ``store_sized``, naming the bytes of every holder) and raises
    :class:`clsim.errors.ConfigError`, naming the minimum budget, if not even the
    plugin's minimum fits. State a plugin builds later (in ``clsim_before_experience`` or
    while training) is not known here: the ledger charges it where it appears.

    Two stores sized from one budget share it first come, first served: the first in
    plugin order fills what is left, and a later one sees that store full (usually
    leaving it no room: the ConfigError above). Give all but one a fixed capacity to
    split a budget. A plugin that re-sizes a store later (MEMO after each new block)
    measures the same way and sees the other stores as they are then.

    :param ctx: the run context; ``ctx.budget_bytes`` is None without a budget.
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
    """Own the training of one experience instead of the standard loop.

    Stops at the first non-None result. Return None to let the standard loop train
    (every hook below then fires); return anything else to say the plugin learned the
    experience itself. Only for methods that are not gradient descent on mini-batches:
    a closed-form solve, class means, an external library's strategy. Such a plugin
    says why in its docstring; a gradient step it still takes goes through
    ``ctx.new_optimizer`` and ``ctx.backward_step`` (the scenario's optimizer and
    non-finite policy). A strategy holds at most one implementation, and no other plugin
    of it may implement a hook of :data:`LOOP_HOOKS` (checked at start-up).

    :param ctx: the run context.
    :param experience: the experience to learn (training data only).
    """


@hookspec
def clsim_plan_experience(
    ctx: RunContext, experience: Experience, plan: ExperiencePlan
) -> ExperiencePlan | None:
    """Decide what the standard loop trains on for this experience.

    Chained, not collected: implementations run in plugin order, each receiving the plan
    as left by the previous one; return a changed copy to replace it (MEMO and iCaRL
    append exemplars with ``plan.extended(x, y)``, MEMO sets its first and later tasks'
    ``epochs``, a few-shot prototype session returns ``replace(plan, train=False)``), or
    None to keep it. The first plan holds the experience's training samples (on an
    online stream, the part delivered now) and the scenario's epochs.

    :param ctx: the run context.
    :param experience: the experience (or online part) about to be trained.
    :param plan: :class:`clsim.loop_types.ExperiencePlan`.
    """


@hookspec
def clsim_trainable(ctx: RunContext) -> Any | None:
    """Parameters the scenario's optimizer trains besides the model's own.

    Collected whenever the loop starts training a plan (each experience; each part of an
    online one, where the optimizer carries over while the parameters stay the same). Return a
    module, a parameter, a :class:`clsim.loop_types.Trainable` (with an ``lr_scale``
    factor on the scenario's learning rate) or a list of them; None adds nothing. Keep
    them on the plugin, where the ledger charges them by attribute name. The model's
    parameters with ``requires_grad`` are always trained; naming one here sets its
    factor.

    :param ctx: the run context.
    """


@hookspec
def clsim_after_experience(ctx: RunContext, experience: Experience) -> None:
    """The experience is trained: select exemplars, compute prototypes, prune, expand.

    What a plugin still holds after this hook is what the ledger charges it.

    :param ctx: the run context.
    :param experience: the experience just trained on.
    """


# ---------------------------------------------------------------------------
# mini-batch training (the standard loop)
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
def clsim_inputs(ctx: RunContext, batch: Batch, inputs: torch.Tensor) -> torch.Tensor | None:
    """Transform the model inputs of a batch (augmentation, several views).

    Chained like ``clsim_before_batch``: each implementation receives the inputs as
    left by the previous one. ``inputs`` starts as ``ctx.to_input(batch.x)``, N rows;
    return V x N rows to train on V views (view after view, each in the batch's order);
    the loop repeats the labels per view (``output.targets``).

    :param ctx: the run context.
    :param batch: the batch after ``clsim_before_batch``.
    :param inputs: float model inputs on ``ctx.device``.
    """


@hookspec
def clsim_forward(
    ctx: RunContext, batch: Batch, output: ForwardOutput
) -> dict[str, torch.Tensor] | None:
    """Add named auxiliary outputs to the forward pass (a projector's embedding, an
    auxiliary head's logits), computed once for every later loss hook to read.

    Collected: each returned dict is merged into ``output.aux``; a name another plugin
    already gave is an error.

    :param ctx: the run context.
    :param batch: the batch after ``clsim_before_batch``.
    :param output: :class:`clsim.loop_types.ForwardOutput`: inputs, features, logits,
        targets and views of the batch.
    """


@hookspec
def clsim_task_loss(ctx: RunContext, batch: Batch, output: ForwardOutput
                    ) -> torch.Tensor | None:
    """Replace the task loss (default: ``ctx.task_loss(output.logits, output.targets)``,
    cross-entropy over the label space).

    At most one plugin may return a loss for a batch (two are an error naming both);
    None keeps the default. To weight the task loss, return ``w * ctx.task_loss(...)``.
    PRD returns its supervised contrastive loss here.

    :param ctx: the run context.
    :param batch: the batch after ``clsim_before_batch``.
    :param output: the forward pass, as in ``clsim_forward`` (with ``aux`` filled).
    """


@hookspec
def clsim_loss(
    ctx: RunContext, batch: Batch, logits: torch.Tensor, output: ForwardOutput
) -> torch.Tensor | None:
    """Contribute an extra loss term (distillation, auxiliary heads, regularisers).

    Collected: every non-None scalar tensor is added to the task loss. With
    ``training.nonfinite_loss: skip_batch``, a batch whose total loss is NaN or infinite
    ends here: no backward, no optimizer step and no ``clsim_after_*`` hook for it.

    :param ctx: the run context.
    :param batch: the batch after ``clsim_before_batch``.
    :param logits: ``output.logits``, the model's output on the batch (every view).
    :param output: the forward pass: features, targets, views and ``aux`` outputs.
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
    ctx: RunContext, batch: Batch, logits: torch.Tensor, loss: torch.Tensor,
    output: ForwardOutput,
) -> None:
    """The batch is done (update a replay buffer, detect a distribution shift).

    :param ctx: the run context.
    :param batch: the batch trained on; ``batch.stream_part()`` holds its stream samples.
    :param logits: the model's output on ``batch`` (computed before the update).
    :param loss: the total loss of the batch (detached).
    :param output: the forward pass of the batch (read it now; keeping it would keep
        its activations alive).
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
    or None; ``summary.json`` stores it under ``strategies.<strategy>.plugins.<plugin>``.

    :param ctx: the run context; the model is as training left it.
    :param stream: the stream the strategy was trained on (with hidden boundaries too).
    """
