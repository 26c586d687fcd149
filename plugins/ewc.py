"""EWC: Elastic Weight Consolidation, a quadratic pull weighted by the Fisher information.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS
114(13), 2017; the online variant of Schwarz et al., "Progress & Compress: A scalable
framework for continual learning", ICML 2018. The algorithm box, as hooks over the
standard loop::

    for each batch of task n:                                          clsim_loss
        total = task loss + penalty
        separate: penalty = (lambda / 2) * sum_k<n sum_i F_k,i (theta_i - theta*_k,i)^2
        online:   penalty = (lambda / 2) * sum_i F*_i (theta_i - theta*_i)^2
    after task n:                                                      clsim_after_experience
        F_n = the diagonal empirical Fisher on task n's training data, theta*_n = theta
        separate: keep (F_n, theta*_n) beside every earlier pair
        online:   F* <- gamma * F* + F_n, theta* <- theta_n (one pair in all)

The empirical Fisher is the mean of squared gradients of the task loss
(``ctx.task_loss``, the log-likelihood of the true labels) with respect to every
trainable parameter of the model, over the experience's training samples
(``experience.train_x`` / ``train_y``, no test data), in the stream's order, with the
model in eval mode (no dropout, BatchNorm's running statistics):

- ``fisher: batch`` (default, as Avalanche's ``EWCPlugin.compute_importances``): the
  mean over mini-batches of ``ctx.batch_size`` samples of the squared gradient of each
  mini-batch's mean loss;
- ``fisher: sample``: the mean over samples of the squared per-sample gradient of the
  loss at the true label (``torch.func``, ``ctx.batch_size`` samples per vectorised call):
  the empirical Fisher, as most implementations compute it; the paper's Fisher takes the
  expectation over labels drawn from the model's own output distribution, which is not
  built (once a task is learnt the empirical one shrinks towards 0).

**Defaults**: ``ewc_lambda = 2``: continual-learning-baselines runs permuted MNIST with
Avalanche's ``ewc_lambda = 1`` (``experiments/permuted_mnist/ewc.py``), and Avalanche's
penalty is ``lambda * sum F (theta - theta*)^2``, without the paper's ``1/2``; 2 here is the
same penalty. ``mode = separate`` as there; ``gamma = 1`` for the online mode (Avalanche
has no default; 1 is van de Ven et al.'s "Three scenarios" setting).

**Reconstructed**: the parameters regularised are the model's trainable ones
(``requires_grad``) as named by ``named_parameters`` when the Fisher is taken; one that
appears later (a grown head) is not penalised, and one whose shape changed is an error.
Gradients of parameters the loss does not reach count as zero.

**Memory**: ``separate`` keeps, per past experience, one float tensor per regularised
parameter for F and one for theta* (2 x the trainable parameters' bytes per experience);
``online`` keeps one pair in all. Nothing else: the ledger charges exactly these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.stream import Experience


@dataclass
class EwcOptions:
    ewc_lambda: float = field(
        default=2.0,
        metadata={"min": 0, "help": "strength: penalty = lambda/2 * sum F (theta - theta*)^2"},
    )
    mode: Literal["separate", "online"] = field(
        default="separate",
        metadata={"help": "one (F, theta*) pair per past experience, or one running pair "
                          "(online EWC, Schwarz et al. 2018)"},
    )
    gamma: float = field(
        default=1.0,
        metadata={"min": 0, "max": 1, "help": "online mode: F* <- gamma * F* + F_new"},
    )
    fisher: Literal["batch", "sample"] = field(
        default="batch",
        metadata={"help": "squared gradients of each mini-batch's mean loss (Avalanche), "
                          "or of each sample's loss (the empirical Fisher per sample)"},
    )


class EwcPlugin:
    """Elastic Weight Consolidation (separate or online), over the standard loop."""

    Options = EwcOptions

    def __init__(self, options: EwcOptions) -> None:
        self.options = options
        # per past experience (one entry online): {parameter name: tensor}, charged exactly
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []

    # -- every batch: the quadratic penalty -----------------------------------

    def clsim_loss(self, ctx: RunContext) -> torch.Tensor | None:
        if not self.fishers:
            return None
        return self.penalty(ctx.model)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``(lambda / 2) * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2``."""
        params = dict(model.named_parameters())
        total = torch.zeros((), device=next(iter(params.values())).device)
        for fisher, anchor in zip(self.fishers, self.anchors, strict=True):
            for name, f in fisher.items():
                p = params[name]
                if p.shape != f.shape:
                    raise ConfigError(
                        f"ewc: parameter {name!r} changed shape from {tuple(f.shape)} to "
                        f"{tuple(p.shape)} since its Fisher was taken; EWC needs a model "
                        "of fixed shape"
                    )
                total = total + (f * (p - anchor[name]) ** 2).sum()
        return self.options.ewc_lambda / 2 * total

    # -- after task n: the Fisher of its training data, and theta* -----------

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        compute = sample_fisher if self.options.fisher == "sample" else batch_fisher
        fisher = compute(ctx, experience.train_x, experience.train_y)
        anchor = {name: p.detach().clone() for name, p in trainable(ctx.model)}
        if self.options.mode == "separate" or not self.fishers:
            self.fishers.append(fisher)
            self.anchors.append(anchor)
            return
        old = self.fishers[0]
        self.fishers[0] = {name: self.options.gamma * old[name] + f if name in old else f
                           for name, f in fisher.items()}
        self.anchors[0] = anchor


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@contextmanager
def _in_eval(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the Fisher pass; its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def batch_fisher(ctx: RunContext, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean over mini-batches of the squared gradient of each mini-batch's mean task loss."""
    named = trainable(ctx.model)
    fisher = {name: torch.zeros_like(p, memory_format=torch.contiguous_format)
              for name, p in named}
    n_batches = 0
    with _in_eval(ctx.model):
        for i in range(0, len(y), ctx.batch_size):
            loss = ctx.task_loss(ctx.model(ctx.to_input(x[i : i + ctx.batch_size])),
                                 y[i : i + ctx.batch_size])
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (name, _), g in zip(named, grads, strict=True):
                if g is not None:
                    fisher[name] += g.detach() ** 2
            n_batches += 1
    return {name: f / max(n_batches, 1) for name, f in fisher.items()}


def sample_fisher(ctx: RunContext, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean over samples of the squared gradient of each sample's task loss."""
    from torch.func import functional_call, grad, vmap

    named = trainable(ctx.model)
    params = {name: p.detach() for name, p in named}
    frozen = {name: t.detach() for name, t in ctx.model.named_parameters() if name not in params}
    frozen.update(dict(ctx.model.named_buffers()))

    def loss_of(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(ctx.model, {**p, **frozen}, (xi.unsqueeze(0),))
        return ctx.task_loss(logits, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))
    fisher = {name: torch.zeros_like(p, memory_format=torch.contiguous_format)
              for name, p in named}
    with _in_eval(ctx.model):
        for i in range(0, len(y), ctx.batch_size):
            inputs = ctx.to_input(x[i : i + ctx.batch_size])
            targets = y[i : i + ctx.batch_size].to(inputs.device)
            for name, g in per_sample(params, inputs, targets).items():
                fisher[name] += (g**2).sum(0)
    return {name: f / max(len(y), 1) for name, f in fisher.items()}
