"""Fast and slow weights for few-shot continual learning (reconstructed).

Wang, Li, Zhong, Zhu. "Few-shot Continual Learning: a Brain-inspired Approach",
arXiv:2104.09034, 2021. METHODS.md section 8: fast weights start from the slow ones and
learn each session with a consolidation penalty toward the previous fast weights; then
the slow weights move toward the fast ones by a Reptile-style step (Nichol, Achiam and
Schulman, "On First-Order Meta-Learning Algorithms", 2018) with their own consolidation.

**The whole method here is a reconstruction**: the paper's code is not public and its
setting (a sequence of few-shot tasks) is not the FSCIL protocol. What is built, exactly:

*Base session* (experience 0): as the prototype baseline (``prototype_fscil``): the
model trains by the engine's standard loop with a cosine classifier (scale ``scale``,
16) that replaced ``model.head`` at setup; then every base class weight becomes the
normalised mean embedding of its samples, and every model parameter freezes. The
importance of each plastic weight is measured then (below).

*Which weights are fast and slow.* The *plastic* weights P are the cosine classifier's
class rows and, with ``adapt: last_block`` (the default), the encoder's last block that
holds parameters plus what follows it (pooling), as split by
:func:`~clsim_plugins.prototypes.split_last_block` (for ``small_cnn`` the last conv block,
for ``mlp`` the last hidden layer, for the ResNets ``stage3``); ``adapt: head`` makes only
the class rows plastic. Everything before the block (``shared``) stays frozen at its base
values. The **slow** weights are the model's own copy of P: evaluation and every feature
the engine reads use them. The **fast** weights are a second copy of P held by the plugin
(``<plugin>.fast``), kept between sessions because the next session's penalty refers to
them. The ledger charges both, and the importance (one float per plastic weight).

*Session t >= 1*, with shots (x, y) and new classes N_t:

1. each new class's row of the slow classifier is set to the normalised mean slow
   embedding of its shots (as the prototype baseline does);
2. the anchor A is the previous fast weights (the rows of N_t: their new prototypes);
   then the fast weights start from the slow ones, F <- S;
3. the fast weights learn the shots: ``fast_epochs`` epochs of mini-batches of
   ``training.batch_size`` (seeded order), SGD (lr ``fast_lr``, momentum
   ``fast_momentum``, a fresh optimizer per session) on
   ``CE(scale * cos(block_F(shared(x)), W_F)) + fast_consolidation / 2 * ||F - A||^2``,
   the cross-entropy over all classes seen so far;
4. the slow weights take one Reptile step toward the fast ones, per weight i::

       S_i <- S_i + slow_step / (1 + slow_consolidation * Omega_i) * (F_i - S_i)

   where Omega is the slow weights' own consolidation: the diagonal empirical Fisher
   information of the base session (mean over mini-batches of the squared gradient of
   the base cross-entropy, taken with the prototype classifier in eval mode), divided by
   its mean over all plastic weights so that ``slow_consolidation`` has no unit. Weights
   important to the base classes move less; rows of classes absent from the base have
   Omega = 0 and take the full step. It is computed as ``torch.lerp(S, F, step)``, the
   same value up to rounding and exact at both ends (step 0 keeps S, step 1 gives F).

Degenerate settings: ``slow_step: 0`` leaves the slow weights as the prototype baseline
leaves them (the model is then exactly ``prototype_fscil``'s); ``slow_step: 1`` with
``slow_consolidation: 0`` copies the fast weights into the slow ones.

Defaults (all reconstructed choices, not published values): ``adapt: last_block``,
``scale`` 16 (CEC / FACT's cosine classifier), ``fast_epochs`` 10, ``fast_lr`` 0.01,
``fast_momentum`` 0.9, ``fast_consolidation`` 1.0, ``slow_step`` 0.1 (the outer step size
of the Reptile authors' reference example, annealed there and fixed here), and
``slow_consolidation`` 1.0 (a weight of average importance takes half the step).
Measured on Omniglot (142 base + 10 x 10-way 5-shot, one shared 10-epoch base): with
``slow_step`` 0.5 the drift of the last block compounds over the sessions (last-session
accuracy 0.27 against 0.63 for the prototype baseline), with 0.1 it ends level with the
baseline (0.628), and without the Fisher weighting (``slow_consolidation: 0``) even 0.1
falls to 0.33: moving the encoder under frozen base prototypes is what costs accuracy in
this protocol.

Further reconstructed details: fast learning runs the plastic block in eval mode
(BatchNorm keeps the base statistics, which 5-shot batches cannot estimate; buffers are
never interpolated); the shared part's output is recomputed for each mini-batch (it
is frozen, so it is the same every epoch); the Fisher information is measured once,
after the base session, and not updated; a class met again in a later session keeps
its row. The paper's fast-weight consolidation may weight the penalty by importance;
METHODS.md names a plain penalty, built here as the unweighted L2. Task boundaries are
needed; hidden boundaries and multi-level label spaces are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from clsim_plugins.prototypes import (
    CosineHead,
    class_prototypes,
    fixed_chunk_features,
    freeze,
    frozen,
    install_cosine_head,
    require_boundaries,
    require_flat_labels,
    split_last_block,
)
from torch import nn

from clsim.context import RunContext
from clsim.stream import Experience

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
    fast_lr: float = field(
        default=0.01,
        metadata={"min": 0, "min_exclusive": True, "help": "SGD learning rate of the fast weights"},
    )
    fast_momentum: float = field(
        default=0.9, metadata={"min": 0, "max": 1, "help": "SGD momentum of the fast weights"}
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
    """Prototype base, then per session: fast weights learn, slow weights take a step."""

    Options = FastSlowOptions

    def __init__(self, options: FastSlowOptions | None = None) -> None:
        self.options = options or FastSlowOptions()
        # references into the model (no bytes of their own): the frozen shared part, and
        # the slow plastic weights {block, head}
        self.shared: nn.Sequential | None = None
        self.slow: nn.ModuleDict | None = None
        # held by the plugin and charged: the fast copy and the importance per weight
        self.fast: nn.ModuleDict | None = None
        self.importance: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None  # only while a session trains
        self._order: torch.Generator | None = None

    # -- setup ---------------------------------------------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        require_flat_labels(ctx, NAME)
        head = install_cosine_head(ctx, self.options.scale, NAME)
        features = ctx.model.features
        if self.options.adapt == "last_block":
            self.shared, block = split_last_block(features, NAME)
        else:
            self.shared, block = nn.Sequential(features), nn.Sequential()
        self.slow = nn.ModuleDict({"block": block, "head": head})
        self._order = ctx.torch_generator(NAME, "order")

    # -- the stream ----------------------------------------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        require_boundaries(experience, NAME, "the base session ends and each session "
                           "consolidates at a boundary")
        if not frozen(ctx.model):
            return  # the base session trains first
        head: CosineHead = self.slow["head"]
        labels = experience.train_y.to(ctx.device)
        present = labels.unique()
        new = present[~head.active[present]]
        rows = None
        if len(new):  # 1. prototypes of the new classes in the slow classifier
            keep = torch.isin(labels, new)
            features = fixed_chunk_features(ctx, experience.train_x[keep.cpu()],
                                            self.options.feature_batch)
            rows = class_prototypes(features, labels[keep], new)
            head.set_rows(new, rows)
        # 2. anchor = previous fast weights (new rows: their prototypes); then F <- S
        self.anchor = {name: p.detach().clone() for name, p in self.fast.named_parameters()}
        if rows is not None:
            self.anchor["head.weight"][new] = head.weight[new]
        with torch.no_grad():
            for fast, slow in zip(self._fast_state(), self._slow_state(), strict=True):
                fast.copy_(slow)

    def clsim_train_experience(self, ctx: RunContext, experience: Experience) -> Any | None:
        if not frozen(ctx.model):
            return None  # the base session: the engine trains encoder and cosine head
        self._learn_fast(ctx, experience.train_x, experience.train_y)
        return True

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if not frozen(ctx.model):
            self._end_base(ctx, experience)
            return
        self._slow_step()
        self.anchor = None

    # -- the base session's end ------------------------------------------------

    def _end_base(self, ctx: RunContext, experience: Experience) -> None:
        """Class means as weights, the base Fisher information, then freeze and copy."""
        head: CosineHead = self.slow["head"]
        labels = experience.train_y.to(ctx.device)
        classes = labels.unique()
        features = fixed_chunk_features(ctx, experience.train_x, self.options.feature_batch)
        head.active.zero_()
        head.set_rows(classes, class_prototypes(features, labels, classes))
        self.importance = self._fisher(ctx, experience.train_x, labels)
        freeze(ctx.model)
        self.fast = copy.deepcopy(self.slow)
        for p in self.fast.parameters():
            p.requires_grad_(True)
        ctx.log("fast_slow_base_done", experience=experience.index, classes=classes.tolist())

    def _fisher(self, ctx: RunContext, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the slow weights on the base data (mean over
        mini-batches of the squared gradient), divided by its mean over all weights."""
        params = dict(self.slow.named_parameters())
        fisher = {name: torch.zeros_like(p) for name, p in params.items()}
        n_batches = 0
        for start in range(0, len(y), ctx.batch_size):
            inner = self._inner(ctx, x[start : start + ctx.batch_size])
            with _eval_mode(ctx.model):
                logits = self._forward(self.slow, inner)
            loss = F.cross_entropy(logits, y[start : start + ctx.batch_size])
            grads = torch.autograd.grad(loss, list(params.values()))
            for name, grad in zip(params, grads, strict=True):
                fisher[name] += grad.detach() ** 2
            n_batches += 1
        fisher = {name: f / max(1, n_batches) for name, f in fisher.items()}
        mean = sum(float(f.sum()) for f in fisher.values()) / sum(
            f.numel() for f in fisher.values())
        return {name: f / mean if mean > 0 else f for name, f in fisher.items()}

    # -- a session -------------------------------------------------------------

    @staticmethod
    def _forward(weights: nn.ModuleDict, inner: torch.Tensor) -> torch.Tensor:
        return weights["head"](weights["block"](inner))

    @torch.no_grad()
    def _inner(self, ctx: RunContext, x: torch.Tensor) -> torch.Tensor:
        """The frozen shared part's output of raw samples ``x``, in eval mode."""
        with _eval_mode(ctx.model):
            return self.shared(ctx.to_input(x))

    def _learn_fast(self, ctx: RunContext, x: torch.Tensor, y: torch.Tensor) -> None:
        """Step 3: SGD on the shots' cross-entropy plus the penalty toward the anchor."""
        options = self.options
        if len(y) == 0 or options.fast_epochs == 0:
            return
        fast = self.fast
        params = list(fast.parameters())
        anchor = [self.anchor[name] for name, _ in fast.named_parameters()]
        optimizer = torch.optim.SGD(params, lr=options.fast_lr, momentum=options.fast_momentum)
        with _eval_mode(fast):  # BatchNorm keeps the base statistics; gradients still flow
            for _ in range(options.fast_epochs):
                order = torch.randperm(len(y), generator=self._order)
                for start in range(0, len(y), ctx.batch_size):
                    index = order[start : start + ctx.batch_size]
                    logits = self._forward(fast, self._inner(ctx, x[index]))
                    loss = F.cross_entropy(logits, y[index].to(ctx.device))
                    penalty = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor,
                                                                         strict=True))
                    loss = loss + options.fast_consolidation / 2 * penalty
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        fast.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _slow_step(self) -> None:
        """Step 4: S <- S + epsilon / (1 + mu * Omega) * (F - S), weight by weight."""
        epsilon, mu = self.options.slow_step, self.options.slow_consolidation
        fast = dict(self.fast.named_parameters())
        for name, slow in self.slow.named_parameters():
            step = epsilon / (1 + mu * self.importance[name])
            # lerp = slow + step * (fast - slow), exact at both ends (step 0 and 1)
            slow.copy_(torch.lerp(slow, fast[name], step))

    def _fast_state(self) -> list[torch.Tensor]:
        return [*self.fast.parameters(), *self.fast.buffers()]

    def _slow_state(self) -> list[torch.Tensor]:
        return [*self.slow.parameters(), *self.slow.buffers()]
