"""LwF: Learning without Forgetting, a distillation regulariser without stored samples.

Li and Hoiem, "Learning without Forgetting", ECCV 2016; TPAMI 40(12), 2017
(arXiv:1606.09282). The algorithm box, as hooks over the standard loop::

    before task n (n > 1):   theta_o <- a frozen copy of the model          clsim_before_experience
    for each batch x:        total = s_n * CE(y, targets)                   clsim_task_loss
                                     + alpha_n * KD(y_o, y)                 clsim_loss
                             y_o = copy(x), y = model(x) on the old classes' logits
                             KD  = KL(softmax(y_o / T) || softmax(y / T)), mean over rows
    after task n:            drop the copy (the next task takes a fresh one) clsim_after_experience

with tasks counted from 1 (n is the number of experiences begun so far, the current one
included), ``alpha_n = alpha`` and ``s_n = 1`` (the loop's own task loss) unless:

- ``alpha_per_experience`` lists ``alpha_1, alpha_2, ...`` (the last one repeats for later
  experiences; it overrides ``alpha``);
- ``task_loss_share`` is true: ``s_n = 1 / n``, the task loss of the n-th task weighted as
  one task among the n seen. This is the weighting of van de Ven and Tolias, "Three
  scenarios for continual learning" (arXiv:1904.07734, 2019), which continual-learning-
  baselines reproduces for split MNIST (``experiments/split_mnist/lwf.py``, class
  ``LwFCEPenalty``: ``(1/n) * CE + alpha[n-1] * KD`` with ``alpha = [0, 0.5, 1.33333,
  2.25, 3.2]`` and ``T = 2``, i.e. ``alpha_n = (n-1)^2 / n``), there with tanh hidden units
  (``model: {name: mlp, activation: tanh}``). The task loss is then this plugin's
  replacement (``clsim_task_loss``): with another plugin that replaces it (``er_ace``,
  ``der``) the loop refuses the pair; with the option off the hook returns None and they
  compose as before.

**Reconstructed** (the paper trains a multi-head network with warm-up; this is LwF as
the class-incremental literature and Avalanche run it, one shared head):

- the "old task outputs" are the logits of the classes seen before the current
  experience (``ctx.seen_classes`` at its start), as Avalanche's ``LwFPlugin`` restricts
  the distillation to the previously active units; with no old class the term is absent;
- KD is the KL divergence between the softened distributions, ``batchmean``, without
  the ``T^2`` factor (Avalanche's ``LearningWithoutForgetting._distillation_loss``; the
  paper's cross-entropy form differs from it by the teacher's entropy, a constant);
- it is computed on every row the loss sees: the stream's samples, and, listed after
  ``replay``, the memory samples mixed into the batch (Avalanche's ``ReplayPlugin`` with
  ``LwFPlugin`` distils the mixed mini-batch too), and every view a ``clsim_inputs``
  stacked (the copy sees exactly ``output.inputs``);
- the copy runs in the student's mode (batch statistics for BatchNorm when the student
  trains) without gradients, so on a task's first batch, before any step, the term is
  exactly 0.0 for a model without dropout (dropout masks are not replayed).

**Defaults**: ``alpha = 1``, ``temperature = 2``, the defaults of Avalanche's
``LwFPlugin`` (``avalanche.training.plugins.LwFPlugin(alpha=1, temperature=2)``) and the
temperature continual-learning-baselines uses for split MNIST (its ``experiments/
split_mnist/lwf.py``, which also schedules alpha per experience: ``alpha_per_experience``
and ``task_loss_share``, both off by default).

**Memory**: one flag per class (bool), the classes known before the current task (so a
class that comes back is distilled too), made at setup; while a task after the first
trains, the copy of the model (its parameters and buffers, exactly the model's bytes) and
the old class ids (int64), which the ledger's ``start`` and ``trained`` readings charge.
The copy is dropped at the task's end:
kept between experiences it would equal the model, retaken at the next start, so holding
it would charge for nothing the method uses. With ``alpha_per_experience`` or
``task_loss_share`` the plugin also keeps the count n (a Python int, 8 bytes estimated;
saved in checkpoints with the rest of its state). LwF needs task boundaries: with hidden
boundaries (one experience) it never distils, and n stays 1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clsim.context import RunContext
from clsim.loop_types import ForwardOutput
from clsim.stream import Batch, Experience


@dataclass
class LwfOptions:
    alpha: float = field(
        default=1.0, metadata={"min": 0, "help": "weight of the distillation term"}
    )
    temperature: float = field(
        default=2.0,
        metadata={"min": 0, "min_exclusive": True, "help": "softens both distributions"},
    )
    alpha_per_experience: list[float] | None = field(
        default=None,
        metadata={"min": 0, "min_items": 1,
                  "help": "alpha of each experience in order (the last repeats); overrides "
                  "alpha (CLB's split MNIST: [0, 0.5, 1.33333, 2.25, 3.2])"},
    )
    task_loss_share: bool = field(
        default=False,
        metadata={"help": "scale the task loss of the n-th experience by 1/n (van de Ven "
                  "and Tolias 2019; CLB's LwFCEPenalty)"},
    )


class LwfPlugin:
    """Learning without Forgetting: distil a frozen copy's outputs on the old classes."""

    Options = LwfOptions

    def __init__(self, options: LwfOptions) -> None:
        self.options = options
        self.known: torch.Tensor | None = None  # bool per class: known before this task
        self.old_model: nn.Module | None = None  # charged in full while a task trains
        self.old_classes: torch.Tensor | None = None  # int64 ids of the distilled logits
        # experiences begun, the current one included: kept only when a schedule reads it
        scheduled = options.alpha_per_experience is not None or options.task_loss_share
        self.experiences: int | None = 0 if scheduled else None

    def clsim_setup(self, ctx: RunContext) -> None:
        """One flag per class, made now so a store sized from the budget counts it."""
        self.known = torch.zeros(ctx.n_classes, dtype=torch.bool, device=ctx.device)

    # -- before task n: freeze a copy of the model ----------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        """The classes to distil are those known before this task (``ctx.seen_classes``
        already holds this one's; a class that comes back is still an old one)."""
        if self.experiences is not None:
            self.experiences += 1
        if not bool(self.known.any()):
            return
        self.old_model = copy.deepcopy(ctx.model).requires_grad_(False)
        for p in self.old_model.parameters():
            p.grad = None  # a deep copy keeps the gradients too; they are no state
        self.old_classes = self.known.nonzero().squeeze(1)

    def alpha(self) -> float:
        """alpha_n: ``alpha``, or the current experience's entry of ``alpha_per_experience``
        (its last entry past its end)."""
        schedule = self.options.alpha_per_experience
        if schedule is None:
            return self.options.alpha
        return schedule[min(max(self.experiences, 1), len(schedule)) - 1]

    # -- every batch: s_n * task loss (only with task_loss_share) ---------------

    def clsim_task_loss(self, ctx: RunContext, batch: Batch,
                        output: ForwardOutput) -> torch.Tensor | None:
        if not self.options.task_loss_share:
            return None  # the loop's own task loss, or another plugin's replacement
        return ctx.task_loss(output.logits, output.targets) / max(self.experiences, 1)

    # -- every batch: alpha_n * KD(copy's outputs, model's outputs) on the old classes --

    def clsim_loss(self, ctx: RunContext, logits: torch.Tensor,
                   output: ForwardOutput) -> torch.Tensor | None:
        if self.old_model is None:
            return None
        self.old_model.train(ctx.model.training)
        with torch.no_grad(), ctx.compute_part("teacher"):  # charged as lwf.teacher
            teacher = self.old_model(output.inputs)
        return self.alpha() * distillation(
            logits[:, self.old_classes], teacher[:, self.old_classes], self.options.temperature
        )

    # -- after task n: the copy has served ------------------------------------

    def clsim_after_experience(self, ctx: RunContext) -> None:
        self.old_model = None
        self.old_classes = None
        self.known[torch.tensor(ctx.seen_classes, dtype=torch.long)] = True


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), averaged over rows."""
    # both sides as log-probabilities: identical logits give exactly 0.0
    return F.kl_div(F.log_softmax(student / temperature, dim=1),
                    F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True)
