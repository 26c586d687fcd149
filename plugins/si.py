"""SI: Synaptic Intelligence, importance from each parameter's path integral.

Zenke, Poole and Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017
(arXiv:1703.04200). The algorithm box, as hooks over the standard loop::

    before task n:        theta* = theta (the first time), w = 0       clsim_before_experience
    for each batch:       total = task loss + c * sum_i Omega_i (theta_i - theta*_i)^2
                                                                       clsim_loss
                          g = the gradient, theta_before = theta       clsim_after_backward
                          (the optimizer steps)
                          w += -g * (theta - theta_before)             clsim_after_update
    after task n:         Omega += w / ((theta - theta*)^2 + xi)        clsim_after_experience
                          theta* = theta, w dropped

``theta - theta*`` at a task's end is the task's total displacement ``Delta_i``, since
theta* is where the task started (the model at the previous task's end, or at the first
task's start).

**Reconstructed**:

- ``g`` is the gradient the loop back-propagated (the total loss: task loss, this
  penalty and any other plugin's terms), as in Avalanche's ``SynapticIntelligencePlugin``;
  the authors' code integrates the unregularised loss's gradient;
- ``theta - theta_before`` is the optimizer's actual step (momentum, Adam and weight
  decay included), read after ``step``; a batch the loop skips (non-finite loss) adds
  nothing;
- the regularised parameters are the model's trainable ones (``requires_grad``) when the
  first task starts; a parameter without a gradient in a step counts ``g = 0``.

**Defaults**: ``c = 1``, ``xi = 0.001``: the paper's split MNIST values. Avalanche's
``SynapticIntelligencePlugin`` adds ``(si_lambda / 2) * sum Omega (theta - theta*)^2``, so
its ``si_lambda`` is ``2c`` here: continual-learning-baselines' split MNIST
(``si_lambda = 1``, ``eps = 0.1``) is ``c = 0.5, xi = 0.1``, its permuted MNIST
(``si_lambda = 10``) ``c = 5`` (scenarios/reproduce/).

**Memory**: between experiences Omega and theta* (one float tensor each per regularised
parameter: 2 x the trainable parameters' bytes); while a task trains also ``w`` (one
more). ``g`` and ``theta_before`` live from ``clsim_after_backward`` to
``clsim_after_update`` of one step and are dropped before any ledger reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clsim.context import RunContext


@dataclass
class SiOptions:
    c: float = field(
        default=1.0,
        metadata={"min": 0, "help": "strength: penalty = c * sum Omega (theta - theta*)^2"},
    )
    xi: float = field(
        default=0.001,
        metadata={"min": 0, "min_exclusive": True,
                  "help": "damping: Omega += w / (Delta^2 + xi)"},
    )


class SiPlugin:
    """Synaptic Intelligence: a quadratic pull weighted by the path-integral importance."""

    Options = SiOptions

    def __init__(self, options: SiOptions) -> None:
        self.options = options
        # {parameter name: tensor}; all charged exactly by the ledger
        self.anchor: dict[str, torch.Tensor] | None = None  # theta*: where the task began
        self.omega: dict[str, torch.Tensor] | None = None  # importance, None before task 1 ends
        self.w: dict[str, torch.Tensor] | None = None  # this task's path integral
        self._step: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    # -- before task n: where it starts, and an empty path integral ----------

    def clsim_before_experience(self, ctx: RunContext) -> None:
        if self.anchor is None:
            self.anchor = {name: p.detach().clone() for name, p in trainable(ctx.model)}
        self.w = {name: torch.zeros_like(a) for name, a in self.anchor.items()}

    # -- every batch: the surrogate loss ---------------------------------------

    def clsim_loss(self, ctx: RunContext) -> torch.Tensor | None:
        if self.omega is None:
            return None
        return self.penalty(ctx.model)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``c * sum_i Omega_i (theta_i - theta*_i)^2``."""
        params = dict(model.named_parameters())
        terms = [(o * (params[name] - self.anchor[name]) ** 2).sum()
                 for name, o in self.omega.items()]
        return self.options.c * torch.stack(terms).sum()

    # -- every step: w += -g * delta theta -------------------------------------

    def clsim_after_backward(self, ctx: RunContext) -> None:
        if self.w is None:
            return
        params = dict(ctx.model.named_parameters())
        grads, before = {}, {}
        for name in self.w:
            p = params[name]
            grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            before[name] = p.detach().clone()
        self._step = (grads, before)

    def clsim_after_update(self, ctx: RunContext) -> None:
        if self._step is None:
            return
        grads, before = self._step
        params = dict(ctx.model.named_parameters())
        for name, w in self.w.items():
            w.sub_(grads[name] * (params[name].detach() - before[name]))
        self._step = None

    # -- after task n: Omega += w / (Delta^2 + xi), theta* = theta --------------

    def clsim_after_experience(self, ctx: RunContext) -> None:
        params = dict(ctx.model.named_parameters())
        if self.omega is None:
            self.omega = {name: torch.zeros_like(a) for name, a in self.anchor.items()}
        for name, omega in self.omega.items():
            delta = params[name].detach() - self.anchor[name]
            omega.add_(self.w[name] / (delta**2 + self.options.xi))
            self.anchor[name] = params[name].detach().clone()
        self.w = None
        self._step = None


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
