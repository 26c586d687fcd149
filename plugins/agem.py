"""A-GEM: Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach and Elhoseiny,
"Efficient Lifelong Learning with A-GEM", ICLR 2019), as hooks over the standard loop.

The paper's Algorithm 2 (training), in the order the hooks below run::

    for each experience t:
        for each batch (x, y) of t:
            g     <- grad of the loss on (x, y)                   the loop's backward
            g_ref <- grad of the loss on S samples of memory M    clsim_after_backward
            if g . g_ref < 0:
                g <- g - (g . g_ref / g_ref . g_ref) g_ref        (same hook)
            step with g                                           the loop's step
        M <- M + samples of t                                     clsim_after_experience

Reconstructed: the episodic memory M takes ``patterns_per_experience`` samples drawn at
random from each experience at its end (the paper's per-task memory, and Avalanche's
``AGEMPlugin``); the memory is a reservoir over those offers
(:class:`clsim_plugins.buffers.ExemplarBuffer`), so while it has room it holds exactly
the samples of every experience, and once full each offered sample stays with equal
probability. ``g`` and ``g_ref`` are the flattened gradients of every trainable
parameter of the model; ``g_ref`` is the gradient of the loop's task loss
(``ctx.task_loss``) on a batch of ``sample_size`` memory samples, taken with
``torch.autograd.grad`` so the batch's own gradients (in ``.grad``) are left as they
are until the projection overwrites them. No task descriptor is appended to the input
(as in continual-learning-baselines).

Defaults are those of continual-learning-baselines' A-GEM on permuted MNIST
(``experiments/permuted_mnist/agem.py``, run with Avalanche's ``AGEMPlugin``):
``patterns_per_experience=250``, ``sample_size=256``. Unless ``capacity`` is given, the
memory holds what the budget leaves beside the whole strategy (:mod:`clsim.capacity`);
the ledger charges its samples at their raw dtype and their labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from clsim_plugins.buffers import ExemplarBuffer, require_capacity_or_budget, stored_sample_bytes
from clsim_plugins.prototypes import require_boundaries

from clsim.capacity import size_store
from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.stream import Batch, Experience


@dataclass
class AgemOptions:
    patterns_per_experience: int = field(
        default=250, metadata={"min": 1, "help": "samples of each experience the memory "
                                                 "is offered at its end"})
    sample_size: int = field(
        default=256, metadata={"min": 1, "help": "memory samples of the reference gradient"})
    capacity: int | None = field(
        default=None, metadata={"min": 1, "help": "samples stored; default: what the "
                                                  "budget leaves after the strategy"})


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's update direction: ``g`` itself when ``g . g_ref >= 0``, else ``g`` minus
    its component along ``g_ref`` (eq. 11 of the paper)."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - (dot / torch.dot(g_ref, g_ref)) * g_ref


class AgemPlugin:
    """A-GEM: project each update so the loss on the episodic memory does not increase."""

    Options = AgemOptions

    def __init__(self, options: AgemOptions) -> None:
        self.options = options
        self.memory: ExemplarBuffer | None = None

    # -- the episodic memory: a fixed capacity now, or what the budget leaves --------

    def clsim_setup(self, ctx: RunContext) -> None:
        require_capacity_or_budget("agem", self.options.capacity, ctx)
        if self.options.capacity is not None:
            self.memory = self._memory(ctx, self.options.capacity)

    def clsim_size_stores(self, ctx: RunContext) -> None:
        if self.options.capacity is not None:
            return
        capacity = size_store(ctx, "agem", self, "memory", self._memory(ctx, 0),
                              stored_sample_bytes(ctx),
                              loop_state=ctx.loop_state_bytes(), items="memory sample",
                              stored="memory samples")
        self.memory = self._memory(ctx, capacity)

    @staticmethod
    def _memory(ctx: RunContext, capacity: int) -> ExemplarBuffer:
        return ExemplarBuffer(capacity, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes,
                              ctx.torch_generator("agem"))

    def clsim_before_experience(self, experience: Experience) -> None:
        """Refused before any training, not after a whole hidden-boundary stream."""
        require_boundaries(experience, "agem", "it stores samples of each experience at "
                                               "its end")

    # -- every update: g_ref on memory, then project g before the step -------------

    def clsim_after_backward(self, ctx: RunContext, batch: Batch) -> None:
        if not self.memory:
            return
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        g_ref = self._reference_gradient(ctx, params)
        g = torch.cat([p.grad.reshape(-1) if p.grad is not None
                       else torch.zeros(p.numel(), device=p.device) for p in params])
        projected = project(g, g_ref)
        if projected is g:
            return  # no interference: the gradient is left exactly as it was
        offset = 0
        for p in params:
            part = projected[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)

    def _reference_gradient(self, ctx: RunContext, params: list[torch.Tensor]) -> torch.Tensor:
        """The flattened gradient of the task loss on ``sample_size`` memory samples."""
        x, y = self.memory.sample(self.options.sample_size)
        loss = ctx.task_loss(ctx.model(ctx.to_input(x)), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([torch.zeros(p.numel(), device=p.device) if grad is None
                          else grad.reshape(-1) for p, grad in zip(params, grads, strict=True)])

    # -- each experience's end: offer the memory its samples ------------------------

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if not experience.classes:
            raise ConfigError("agem stores samples of each experience at its end, and with "
                              "hidden boundaries there is no such end")
        n = min(self.options.patterns_per_experience, experience.n_train)
        pick = torch.randperm(experience.n_train, generator=self.memory.generator)[:n]
        self.memory.add_reservoir(experience.train_x[pick], experience.train_y[pick])
