"""Heads that grow with the stream: an output counts once its class has been seen.

Online protocols (hierarchical label expansion, Si-Blurry) train a classifier whose
outputs appear as classes appear; a softmax over classes nobody has met would push
every new class down before its first sample. :class:`ActiveHead` keeps one output per
label id of the stream and masks the ones not yet exposed, which is what a head grown
output by output computes, without rebuilding the optimizer at every new class (one
difference: weight decay shrinks a masked row before its class appears, where a grown
head would initialise it then). The outputs of unseen classes are held from the start,
so the memory ledger charges the full head (an honest upper bound of a grown one).
"""

from __future__ import annotations

import torch
from torch import nn

# Logit of an output whose class has not been seen: far below any real logit, yet finite,
# so log-softmax and KL terms a plugin computes on the logits stay finite.
MASK_VALUE = -1000.0


class ActiveHead(nn.Linear):
    """A linear head whose outputs switch on as their classes are exposed.

    ``active`` is a registered bool buffer (saved, moved and charged with the model).
    """

    active: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("active", torch.zeros(out_features, dtype=torch.bool))

    @classmethod
    def replacing(cls, linear: nn.Linear) -> ActiveHead:
        """An active head with ``linear``'s weights (same initialisation, same device)."""
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        head.to(linear.weight.device)
        with torch.no_grad():
            head.weight.copy_(linear.weight)
            if linear.bias is not None:
                head.bias.copy_(linear.bias)
        return head

    @torch.no_grad()
    def expose(self, labels: torch.Tensor) -> None:
        """Switch on the outputs of ``labels`` (no device synchronisation)."""
        self.active[labels.to(self.active.device, torch.long)] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).masked_fill(~self.active, MASK_VALUE)


def expose_labels(model: nn.Module, labels: torch.Tensor) -> None:
    """Tell ``model``'s head which classes have appeared (a no-op for a plain head)."""
    expose = getattr(getattr(model, "head", None), "expose", None)
    if expose is not None:
        expose(labels)


def active_outputs(model: nn.Module) -> torch.Tensor | None:
    """The bool mask of outputs in use, or None when every output always counts."""
    active = getattr(getattr(model, "head", None), "active", None)
    return active if isinstance(active, torch.Tensor) else None
