"""iCaRL: incremental classifier and representation learning.

Rebuffi, Kolesnikov, Sperl and Lampert, "iCaRL: Incremental Classifier and Representation
Learning", CVPR 2017. METHODS.md section 1 (herding, NME readout, budget conventions).

**The algorithm as hooks over the standard loop**, in the order of the paper's
Algorithms 2-5 (UPDATEREPRESENTATION, then REDUCE- and CONSTRUCTEXEMPLARSET; Algorithm 1,
CLASSIFY, at test time):

- ``clsim_before_experience``: keep the previous model (a frozen copy, ``previous``); the
  classes it knew are the first ``n_old`` of ``ctx.seen_classes`` (``n_old`` is set at
  each experience's end);
- ``clsim_plan_experience``: train on the new data plus every exemplar (``plan.extended``);
- ``clsim_task_loss``: the classification part of the paper's loss, a sigmoid binary
  cross-entropy on the new classes' outputs with one-hot targets;
- ``clsim_loss``: the distillation part, a sigmoid binary cross-entropy on the old
  classes' outputs against ``q = sigmoid(previous(x))``. The paper's single loss is the sum
  of the two over the seen classes; both are divided by ``N x |seen classes|`` (the mean
  over the batch's output entries, as the authors' code). The distillation is reported
  minus the teacher's own entropy ``BCE(q, q)``, a constant in the student: the gradient is
  the paper's, and the term is exactly 0 when the model equals the previous one;
- ``clsim_after_experience``: drop the previous model; with ``m = K // classes seen``,
  shrink every old class's exemplars to their first ``m`` (herding order is prefix-stable)
  and pick ``m`` herding exemplars for each new class from its training samples, with the
  updated model's features; then recompute the class means of the exemplars' normalised
  features (re-normalised);
- ``clsim_predict``: the nearest mean of exemplars (``nme: false``: the network's own
  outputs, iCaRL's "hybrid1" ablation).

**Reused, not rewritten**: the exemplar memory, herding and the NME readout are replay's
(``replay: {selection: herding, nme: true}``), held here as ``memory``, a
:class:`clsim_plugins.replay.ReplayPlugin` that is not registered as a plugin (none of its
own hooks fire; iCaRL calls its herding, class-mean and prediction steps at the points
above: :meth:`ReplayPlugin.herd`, :meth:`ReplayPlugin.update_class_means` and its
``clsim_predict``).

**Defaults** (the paper, CIFAR-100): ``K = 2000`` exemplars, sigmoid outputs, 70 epochs,
batch 128, SGD lr 2.0 divided by 5 at epochs 49 and 63, weight decay 1e-5. Epochs,
optimizer and batch size are the scenario's ``training`` section; ``capacity`` (K)
defaults to what the budget leaves, the clsim convention for stores.

**Reconstructed**: the paper's data augmentation of exemplars (flipped copies in the class
means) is not done; the loss covers the seen classes' outputs only (the authors' code
took all 100, unseen ones with target 0); the teacher runs in eval mode.

**Memory**: between experiences ``memory`` (K exemplars at their raw dtype and their
labels, per-class counters, and a ``n_classes x feature_dim`` float32 table of class
means). While an experience trains, ``previous`` as well (one model's parameters and
buffers), which the ledger charges at the peak (after ``clsim_before_experience`` and at
the end of training) and which a budget-sized memory reserves room for.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from clsim_plugins.buffers import require_capacity_or_budget, stored_sample_bytes
from clsim_plugins.prototypes import require_boundaries, require_flat_labels
from clsim_plugins.replay import ReplayOptions, ReplayPlugin

from clsim.capacity import size_store
from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.loop_types import ExperiencePlan, ForwardOutput
from clsim.stream import Experience

PREVIOUS = "the previous model (held while an experience trains)"


@dataclass
class IcarlOptions:
    """Options of the icarl plugin (the paper's ``K`` is ``capacity``)."""

    capacity: int | None = field(
        default=None,
        metadata={"min": 1, "help": "exemplars kept over all classes (the paper's K, 2000 on "
                                    "CIFAR-100); default: what the budget leaves"},
    )
    nme: bool = field(
        default=True,
        metadata={"help": "predict with the nearest mean of exemplars (false: the network)"},
    )


class IcarlPlugin:
    """iCaRL: herding exemplars, sigmoid distillation, nearest-mean-of-exemplars."""

    Options = IcarlOptions

    def __init__(self, options: IcarlOptions | None = None) -> None:
        self.options = options or IcarlOptions()
        self.memory: ReplayPlugin | None = None
        self.previous: torch.nn.Module | None = None  # only while an experience trains
        self.n_old = 0  # classes seen before the experience that trains

    # -- setup: a fixed memory now, one sized from the budget once all have set up --

    def clsim_setup(self, ctx: RunContext) -> None:
        require_flat_labels(ctx, "icarl")
        require_capacity_or_budget("icarl", self.options.capacity, ctx,
                                   "model + 2000 exemplars")
        self.memory = self._memory(ctx, self.options.capacity or 0)

    def clsim_size_stores(self, ctx: RunContext) -> None:
        """The exemplars fill what the budget leaves beside the whole strategy and the
        previous model it holds while training."""
        if self.options.capacity is not None:
            return
        self.memory = self._memory(ctx, self._budget_capacity(ctx, at_least=1))

    def _budget_capacity(self, ctx: RunContext, at_least: int) -> int:
        """Exemplars the budget leaves; a ConfigError naming the minimum budget when fewer
        than ``at_least`` fit."""
        return size_store(ctx, "icarl", self, "memory", self._memory(ctx, 0),
                          stored_sample_bytes(ctx), loop_state=ctx.loop_state_bytes(),
                          items="exemplars (one per seen class)" if at_least > 1
                          else "exemplar", stored="exemplars", at_least=at_least,
                          reserved={PREVIOUS: ctx.model_bytes()})

    def _memory(self, ctx: RunContext, capacity: int) -> ReplayPlugin:
        """Replay's herding memory with its NME class means, ``capacity`` exemplars."""
        memory = ReplayPlugin(ReplayOptions(selection="herding", nme=True, capacity=capacity))
        memory.clsim_setup(ctx)
        return memory

    # -- UPDATEREPRESENTATION: previous model, new data + exemplars, BCE + distillation --

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        require_boundaries(experience, "icarl", "it keeps the previous model and herds "
                                                "exemplars at each experience's end")
        if self.memory.buffer:
            self.previous = copy.deepcopy(ctx.model).eval().requires_grad_(False)

    def clsim_plan_experience(self, plan: ExperiencePlan) -> ExperiencePlan | None:
        if not self.memory.buffer:
            return None
        x, y = self.memory.buffer.stored()
        return plan.extended(x, y)

    def clsim_task_loss(self, ctx: RunContext, output: ForwardOutput) -> torch.Tensor:
        """Sigmoid BCE of the new classes' outputs against one-hot targets."""
        seen = torch.tensor(ctx.seen_classes, device=output.logits.device)
        new = seen[self.n_old:]
        targets = (output.targets[:, None] == new[None, :]).to(output.logits.dtype)
        total = F.binary_cross_entropy_with_logits(output.logits[:, new], targets,
                                                   reduction="sum")
        return total / (output.logits.shape[0] * len(seen))

    def clsim_loss(self, ctx: RunContext, output: ForwardOutput) -> torch.Tensor | None:
        """Sigmoid BCE of the old classes' outputs against the previous model's."""
        if self.previous is None or self.n_old == 0:
            return None
        old = torch.tensor(ctx.seen_classes[: self.n_old], device=output.logits.device)
        with torch.no_grad(), ctx.compute_part("teacher"):  # charged as icarl.teacher
            teacher = self.previous(output.inputs)[:, old]
        return self.distillation(output.logits[:, old], teacher) / (
            output.logits.shape[0] * len(ctx.seen_classes))

    @staticmethod
    def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Sum of BCE(sigmoid(student), q) - BCE(q, q), q = sigmoid(teacher): the paper's
        term less the teacher's entropy (a constant), 0 when the two are equal."""
        q = torch.sigmoid(teacher)
        return (F.binary_cross_entropy_with_logits(student, q, reduction="sum")
                - F.binary_cross_entropy_with_logits(teacher, q, reduction="sum"))

    # -- REDUCE- and CONSTRUCTEXEMPLARSET, then the class means -------------------

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        self.previous = None
        self.n_old = len(ctx.seen_classes)  # the next experience's old classes
        self._require_one_per_class(ctx)
        self.memory.herd(ctx, experience)
        self.memory.update_class_means(ctx)

    def _require_one_per_class(self, ctx: RunContext) -> None:
        """Herding keeps at least one exemplar per seen class: refuse a memory too small,
        naming the capacity or the budget that would do."""
        seen, capacity = len(ctx.seen_classes), self.memory.buffer.capacity
        if capacity >= seen:
            return
        if self.options.capacity is not None or ctx.budget_bytes is None:
            raise ConfigError(f"icarl: a capacity of {capacity} exemplars cannot give each "
                              f"of the {seen} seen classes one; raise 'capacity'")
        self._budget_capacity(ctx, at_least=seen)  # raises, naming the minimum budget

    # -- CLASSIFY: nearest mean of exemplars ----------------------------------------

    def clsim_predict(self, ctx: RunContext, x: torch.Tensor) -> torch.Tensor | None:
        if not self.options.nme:
            return None
        return self.memory.clsim_predict(ctx, x)

    def clsim_teardown(self) -> None:
        self.previous = None
