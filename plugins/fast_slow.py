"""Fast and slow weights for few-shot continual learning (reconstructed).

Wang, Li, Zhong, Zhu. "Few-shot Continual Learning: a Brain-inspired Approach",
arXiv:2104.09034, 2021. METHODS.md section 8: fast weights start from the slow ones and
learn each session with a consolidation penalty toward the previous fast weights; then
the slow weights move toward the fast ones by a Reptile-style step (Nichol, Achiam and
Schulman, "On First-Order Meta-Learning Algorithms", 2018) with their own consolidation.

**The whole method here is a reconstruction**: the paper's code is not public and its
setting (a sequence of few-shot tasks) is not the FSCIL protocol. What is built, exactly:

*Base session* (experience 0): as the prototype baseline (``prototype_fscil``): the
model trains in the standard loop (the scenario's ``training`` section) with a cosine
classifier (scale ``scale``, 16) that replaced ``model.head`` at setup; then every base
class weight becomes the normalised mean embedding of its samples, the importance of
each plastic weight is measured (below), and the model freezes.

*Which weights are fast and slow.* The *plastic* weights P are the cosine classifier's
class rows and, with ``adapt: last_block`` (the default), the encoder's last block that
holds parameters plus what follows it (pooling), as split by
:func:`~clsim_plugins.prototypes.split_last_block` (for ``small_cnn`` the last conv block,
for ``mlp`` the last hidden layer, for the ResNets ``stage3``); ``adapt: head`` makes only
the class rows plastic. Everything before the block stays frozen at its base values.
Between sessions the model's P are the **slow** weights S (evaluation uses them) and the
plugin holds the last **fast** weights F (``<plugin>.fast``), which the next session's
penalty refers to. During a session the model's P *are* the fast weights, trained by the
standard loop, and the plugin holds a copy of S (``<plugin>.slow``) until the slow step.
The ledger charges what the plugin holds: F, the importance (one float per plastic
weight), and S while a session is under way.

*Session t >= 1*, with shots (x, y) and new classes N_t (one hook per step):

1. ``clsim_before_experience``: each new class's row of the slow classifier is set to
   the normalised mean slow embedding of its shots (as the prototype baseline does); the
   anchor A is the previous fast weights with those rows set the same way; the plugin
   copies S, and the model's P, which hold S, become the fast weights (F <- S) by
   letting them train;
2. ``clsim_plan_experience`` / ``clsim_trainable`` / ``clsim_loss``: the standard loop
   trains F on the shots for ``fast_epochs`` epochs of ``training.batch_size``
   mini-batches under the scenario's optimizer (a fresh one per session) and non-finite
   policy, at ``fast_lr_scale`` times its learning rate, on
   ``CE(scale * cos(block_F(shared(x)), W_F)) + fast_consolidation / 2 * ||F - A||^2``,
   the cross-entropy over all classes seen so far (the loop's task loss; the penalty is
   this plugin's ``clsim_loss``);
3. ``clsim_after_experience``: the slow weights take one Reptile step toward the fast
   ones, per weight i::

       S_i <- S_i + slow_step / (1 + slow_consolidation * Omega_i) * (F_i - S_i)

   the plugin keeps F (the next anchor) and the model gets the new S back. Omega is the
   slow weights' own consolidation: the diagonal empirical Fisher information of the base
   session (mean over mini-batches of the squared gradient of the base cross-entropy,
   taken with the prototype classifier in eval mode), divided by its mean over all
   plastic weights so that ``slow_consolidation`` has no unit. Weights important to the
   base classes move less; rows of classes absent from the base have Omega = 0 and take
   the full step. It is computed as ``torch.lerp(S, F, step)``, the same value up to
   rounding and exact at both ends (step 0 keeps S, step 1 gives F).

Degenerate settings: ``slow_step: 0`` leaves the slow weights as the prototype baseline
leaves them (the model is then exactly ``prototype_fscil``'s); ``slow_step: 1`` with
``slow_consolidation: 0`` copies the fast weights into the slow ones.

Defaults (all reconstructed choices, not published values): ``adapt: last_block``,
``scale`` 16 (CEC / FACT's cosine classifier), ``fast_epochs`` 10, ``fast_lr_scale`` 0.2
(with the shipped scenarios' SGD at lr 0.05 and momentum 0.9: lr 0.01, the fixed SGD of
this plugin's earlier private loop), ``fast_consolidation`` 1.0, ``slow_step`` 0.1 (the
outer step size of the Reptile authors' reference example, annealed there and fixed
here), and ``slow_consolidation`` 1.0 (a weight of average importance takes half the
step). Measured on Omniglot (142 base + 10 x 10-way 5-shot, one shared 10-epoch base):
with ``slow_step`` 0.5 the drift of the last block compounds over the sessions
(last-session accuracy 0.27 against 0.63 for the prototype baseline), with 0.1 it ends
level with the baseline (0.628), and without the Fisher weighting
(``slow_consolidation: 0``) even 0.1 falls to 0.33: moving the encoder under frozen base
prototypes is what costs accuracy in this protocol.

Further reconstructed details: fast learning runs the whole model in eval mode (the
session's plan asks the loop for ``eval_mode``: BatchNorm keeps the base statistics,
which 5-shot batches cannot estimate; buffers are never interpolated); the Fisher information is
measured once, after the base session, and not updated; a class met again in a later
session keeps its row. The paper's fast-weight consolidation may weight the penalty by
importance; METHODS.md names a plain penalty, built here as the unweighted L2. Task
boundaries are needed; hidden boundaries and multi-level label spaces are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from clsim_plugins.prototypes import (
    CosineHead,
    class_prototypes,
    fixed_chunk_features,
    freeze,
    install_cosine_head,
    require_boundaries,
    require_flat_labels,
    split_last_block,
)
from torch import nn

from clsim.context import RunContext
from clsim.loop_types import ExperiencePlan, Trainable
from clsim.stream import Batch, Experience

NAME = "fast_slow"


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class FastSlowOptions:
    """Options of the fast_slow plugin (reconstructed defaults; see the module docstring)."""

    adapt: Literal["last_block", "head"] = field(
        default="last_block",
        metadata={"help": "plastic weights: classifier + last encoder block, or classifier"},
    )
    scale: float = field(
        default=16.0,
        metadata={"min": 0, "min_exclusive": True, "help": "cosine classifier scale (16: CEC)"},
    )
    fast_epochs: int = field(
        default=10, metadata={"min": 0, "help": "epochs of fast learning on each session's shots"}
    )
    fast_lr_scale: float = field(
        default=0.2,
        metadata={"min": 0, "min_exclusive": True, "help": "the sessions' learning rate as a "
                  "factor of training.optimizer.lr (the base session trains at 1)"},
    )
    fast_consolidation: float = field(
        default=1.0,
        metadata={"min": 0, "help": "lambda: L2 penalty of the fast weights toward their "
                  "previous values"},
    )
    slow_step: float = field(
        default=0.1,
        metadata={"min": 0, "max": 1, "help": "epsilon: Reptile step of the slow weights "
                  "toward the fast ones"},
    )
    slow_consolidation: float = field(
        default=1.0,
        metadata={"min": 0, "help": "mu: the step of weight i is epsilon / (1 + mu * Fisher_i), "
                  "Fisher normalised to mean 1"},
    )
    feature_batch: int = field(
        default=256,
        metadata={"min": 1, "help": "rows per feature call (padded) for prototypes"},
    )


class FastSlowPlugin:
    """Prototype base, then per session: fast weights learn in the standard loop, slow
    weights take a step."""

    Options = FastSlowOptions

    def __init__(self, options: FastSlowOptions | None = None) -> None:
        self.options = options or FastSlowOptions()
        # references into the model (no bytes of their own): the frozen shared part, and
        # the plastic weights {block, head}: slow between sessions, fast during one
        self.shared: nn.Sequential | None = None
        self.plastic: nn.ModuleDict | None = None
        # held by the plugin and charged: the last fast weights (the next anchor), the
        # importance per plastic weight, and the slow weights while a session trains
        self.fast: nn.ModuleDict | None = None
        self.importance: dict[str, torch.Tensor] | None = None
        self.slow: dict[str, torch.Tensor] | None = None

    # -- setup ---------------------------------------------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        require_flat_labels(ctx, NAME)
        head = install_cosine_head(ctx, self.options.scale, NAME)
        features = ctx.model.features
        if self.options.adapt == "last_block":
            self.shared, block = split_last_block(features, NAME)
        else:
            self.shared, block = nn.Sequential(features), nn.Sequential()
        self.plastic = nn.ModuleDict({"block": block, "head": head})

    # -- a session: 1. prototypes, anchor, F <- S ------------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        require_boundaries(experience, NAME, "the base session ends and each session "
                           "consolidates at a boundary")
        if self.importance is None:  # the base session trains first, in the standard loop,
            self.plastic["head"].expose(experience.train_y)  # over all its classes at once
            return
        head: CosineHead = self.plastic["head"]
        labels = experience.train_y.to(ctx.device)
        present = labels.unique()
        new = present[~head.active[present]]
        if len(new):  # prototypes of the new classes in the slow classifier
            keep = torch.isin(labels, new)
            features = fixed_chunk_features(ctx, experience.train_x[keep.cpu()],
                                            self.options.feature_batch)
            rows = class_prototypes(features, labels[keep], new)
            head.set_rows(new, rows)
            with torch.no_grad():  # the anchor's new rows: the same prototypes
                self.fast["head"].weight[new] = head.weight[new]
        self.slow = {name: p.detach().clone() for name, p in self.plastic.named_parameters()}
        for p in self.plastic.parameters():  # the model's plastic weights are now F = S
            p.requires_grad_(True)

    # -- 2. the fast weights learn in the standard loop ------------------------

    def clsim_plan_experience(self, ctx: RunContext, plan: ExperiencePlan
                              ) -> ExperiencePlan | None:
        if self.slow is None:
            return None  # the base session: the scenario's epochs
        epochs = self.options.fast_epochs
        # eval mode: BatchNorm keeps the base statistics, which 5-shot batches cannot estimate
        return replace(plan, epochs=epochs, train=epochs > 0 and plan.n_samples > 0,
                       eval_mode=True)

    def clsim_trainable(self, ctx: RunContext) -> Trainable | None:
        if self.slow is None:
            return None  # the base session: the scenario's learning rate
        return Trainable(self.plastic, lr_scale=self.options.fast_lr_scale)

    def clsim_loss(self, ctx: RunContext, batch: Batch) -> torch.Tensor | None:
        """The consolidation penalty of the fast weights toward the anchor A."""
        if self.slow is None or self.options.fast_consolidation == 0:
            return None
        anchor = dict(self.fast.named_parameters())
        penalty = sum(((p - anchor[name]) ** 2).sum()
                      for name, p in self.plastic.named_parameters())
        return self.options.fast_consolidation / 2 * penalty

    # -- 3. the slow step (or, after the base, prototypes and importance) ------

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if self.importance is None:
            self._end_base(ctx, experience)
            return
        self._slow_step()

    @torch.no_grad()
    def _slow_step(self) -> None:
        """S <- S + epsilon / (1 + mu * Omega) * (F - S), weight by weight; the plugin
        keeps F (the next anchor), the model gets S back and freezes again."""
        epsilon, mu = self.options.slow_step, self.options.slow_consolidation
        fast = dict(self.fast.named_parameters())
        for name, p in self.plastic.named_parameters():
            step = epsilon / (1 + mu * self.importance[name])
            fast[name].copy_(p)
            # lerp = slow + step * (fast - slow), exact at both ends (step 0 and 1)
            p.copy_(torch.lerp(self.slow[name], fast[name], step))
            p.requires_grad_(False)
        for kept, buffer in zip(self.fast.buffers(), self.plastic.buffers(), strict=True):
            kept.copy_(buffer)  # the active mask (BatchNorm statistics never change here)
        self.slow = None

    def _end_base(self, ctx: RunContext, experience: Experience) -> None:
        """Class means as weights, the base Fisher information, then freeze and copy."""
        head: CosineHead = self.plastic["head"]
        labels = experience.train_y.to(ctx.device)
        classes = labels.unique()
        features = fixed_chunk_features(ctx, experience.train_x, self.options.feature_batch)
        head.active.zero_()
        head.set_rows(classes, class_prototypes(features, labels, classes))
        self.importance = self._fisher(ctx, experience.train_x, labels)
        self.fast = copy.deepcopy(self.plastic)
        for p in self.fast.parameters():
            p.requires_grad_(False)  # storage: the anchor, never trained itself
        freeze(ctx.model)
        ctx.log("fast_slow_base_done", experience=experience.index, classes=classes.tolist())

    def _fisher(self, ctx: RunContext, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the plastic weights on the base data (mean over
        mini-batches of the squared gradient), divided by its mean over all weights."""
        params = dict(self.plastic.named_parameters())
        fisher = {name: torch.zeros_like(p) for name, p in params.items()}
        n_batches = 0
        with _eval_mode(ctx.model):
            for start in range(0, len(y), ctx.batch_size):
                with torch.no_grad():
                    inner = self.shared(ctx.to_input(x[start : start + ctx.batch_size]))
                logits = self.plastic["head"](self.plastic["block"](inner))
                loss = F.cross_entropy(logits, y[start : start + ctx.batch_size])
                grads = torch.autograd.grad(loss, list(params.values()))
                for name, grad in zip(params, grads, strict=True):
                    fisher[name] += grad.detach() ** 2
                n_batches += 1
        fisher = {name: f / max(1, n_batches) for name, f in fisher.items()}
        mean = sum(float(f.sum()) for f in fisher.values()) / sum(
            f.numel() for f in fisher.values())
        return {name: f / mean if mean > 0 else f for name, f in fisher.items()}
