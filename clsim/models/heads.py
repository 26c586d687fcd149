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

import math

import torch
import torch.nn.functional as F
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


def target_head(model: nn.Module) -> nn.Module | None:
    """The model's head when it scores features against fixed class targets, else None.

    The protocol (LingoCL's :class:`SemanticHead` follows it, and any head may): a buffer
    ``targets`` with one frozen row per label id, ``embed(features)`` mapping features
    into the targets' space, and ``widened(in_features, generator=..., active=...)``
    returning a copy that reads wider features (``active``, optional: a bool mask of the
    outputs in use; a masked head switches outputs on with ``expose(labels)``, and
    :func:`active_outputs` reads its mask). A host strategy reads these instead of asking
    which plugin installed the head, so a head plugin composes with any host.
    """
    head = getattr(model, "head", None)
    if isinstance(getattr(head, "targets", None), torch.Tensor) and callable(
        getattr(head, "embed", None)
    ):
        return head
    return None


class SemanticHead(nn.Module):
    """``logits = eta * cos(h(features), T)`` against frozen targets ``T`` (a buffer).

    The language-guided head of LingoCL (``plugins/language_head.py``): ``T`` holds one
    unit row per class (a class name's text embedding), ``h`` is a learnable projection
    into the text space (the identity when the widths agree) and ``eta`` a scale.
    ``in_features`` / ``out_features`` mirror a linear head's, so code that reads a
    model's number of outputs keeps working. With ``active`` (a bool mask, copied),
    outputs of classes not yet exposed are masked as :class:`ActiveHead` does.
    """

    targets: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        targets: torch.Tensor,
        *,
        init_scale: float,
        learn_scale: bool,
        generator: torch.Generator | None = None,
        active: torch.Tensor | None = None,
        encoder: str = "minilm",
        prompt: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features, self.text_dim = (int(n) for n in targets.shape)
        self.encoder = encoder  # strings on a module are configuration: not charged
        self.prompt = prompt
        self.register_buffer("targets", targets.detach().to(torch.float32).clone())
        self.projection: nn.Module = (
            nn.Identity()
            if self.in_features == self.text_dim
            else seeded_linear(self.in_features, self.text_dim, generator, targets.device)
        )
        scale = torch.tensor(float(init_scale), device=targets.device)
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if active is not None:
            self.register_buffer("active", active.detach().to(torch.bool).clone())

    @property
    def masked(self) -> bool:
        return "active" in self._buffers

    @torch.no_grad()
    def expose(self, labels: torch.Tensor) -> None:
        """Switch on the outputs of ``labels`` (a no-op for an unmasked head)."""
        if self.masked:
            self.active[labels.to(self.active.device, torch.long)] = True

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Features projected into the text space and normalised: ``h(f) / ||h(f)||``."""
        return F.normalize(self.projection(features), dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.scale * (self.embed(features) @ self.targets.t())
        return logits.masked_fill(~self.active, MASK_VALUE) if self.masked else logits

    @torch.no_grad()
    def widened(
        self,
        in_features: int,
        *,
        generator: torch.Generator | None = None,
        active: torch.Tensor | None = None,
    ) -> SemanticHead:
        """The same head over ``in_features >= self.in_features`` inputs (an expanding
        backbone, as MEMO's): the old projection is copied into the old input columns
        (an identity projection becomes ``[I 0]`` with zero bias), the new columns are a
        fresh initialisation; targets, scale and mask are kept (``active`` replaces the
        mask, masking an unmasked head)."""
        if in_features < self.in_features:
            raise ValueError(f"a widened head needs >= {self.in_features} inputs, got "
                             f"{in_features}")
        kept = self.active if self.masked else None
        head = SemanticHead(
            in_features,
            self.targets,
            init_scale=float(self.scale.detach()),
            learn_scale=isinstance(self.scale, nn.Parameter),
            generator=generator,
            active=kept if active is None else active,
            encoder=self.encoder,
            prompt=self.prompt,
        )
        if isinstance(self.projection, nn.Linear) and isinstance(head.projection, nn.Identity):
            # widths that now match the text space: keep a trained projection all the same
            head.projection = seeded_linear(in_features, self.text_dim, generator,
                                            self.targets.device)
        if isinstance(head.projection, nn.Linear):
            d_old = self.in_features
            old = self.projection
            if isinstance(old, nn.Linear):
                head.projection.weight[:, :d_old] = old.weight
                head.projection.bias.copy_(old.bias)
            else:  # the identity
                head.projection.weight[:, :d_old] = torch.eye(d_old, device=self.targets.device)
                head.projection.bias.zero_()
        return head

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"text_dim={self.text_dim}, encoder={self.encoder!r}"
        )


def seeded_linear(
    n_in: int, n_out: int, generator: torch.Generator | None, device: torch.device
) -> nn.Linear:
    """``nn.Linear``'s own initialisation, drawn from ``generator``, so a plugin's layer
    does not depend on other plugins' random draws. (Constructing the layer still
    advances the global generator once, as before: results stay comparable.) The layer
    is initialised on the CPU, where the generator lives, then moved to ``device``."""
    layer = nn.Linear(n_in, n_out)  # on the CPU, where the generator lives
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(n_in)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer.to(device)
