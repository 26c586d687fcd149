"""Shared parts of the prototype strategies: ``prototype_fscil``, ``fast_slow`` and ``nmc``
(``analytic`` uses the batch-invariant features too).

* :class:`CosineHead` - the cosine classifier of the few-shot baselines (CEC, FACT):
  ``scale * cos(f(x), w_c)``, with outputs switched on class by class like
  :class:`clsim.models.heads.ActiveHead`. Once its weight is frozen it grows only through
  :meth:`CosineHead.set_rows` (a prototype per class), never through ``expose``.
* :func:`fixed_chunk_features` - features computed in chunks of exactly the same number
  of rows (the last one zero-padded). A CPU matrix product may round a row differently
  when the batch has another height (a 1-row call differs from a 500-row one by about
  7e-7 here); with every call the same height a sample's features are bit-identical
  however the stream was cut, which is what makes class means order- and batch-invariant.
* :class:`ClassMeans` - running per-class feature sums (float64) and counts (int64).
* :func:`class_prototypes` - normalised class means of a batch of features.
* :func:`freeze` - no gradient, and eval mode held through the standard loop's
  ``model.train()``.
* small checks shared by the three plugins (a ``features`` / ``head`` model, a flat label
  space, visible boundaries).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.feature_cache import computed_features, feature_cache
from clsim.feature_cache import fixed_chunk_outputs as fixed_chunk_outputs  # re-exported
from clsim.models.heads import MASK_VALUE
from clsim.stream import Experience

# ---------------------------------------------------------------------------
# the cosine classifier
# ---------------------------------------------------------------------------


class CosineHead(nn.Module):
    """``logits = scale * normalise(x) @ normalise(W)^T``; outputs of unseen classes masked.

    ``weight`` is ``(n_classes, in_features)``; ``active`` a registered bool buffer (one
    per output), so the ledger charges both with the model. ``scale`` is a fixed setting
    (16 in CEC and FACT), not a learned value.
    """

    active: torch.Tensor

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation
        self.register_buffer("active", torch.zeros(self.out_features, dtype=torch.bool))

    @classmethod
    def replacing(cls, head: nn.Module, scale: float) -> CosineHead:
        """A cosine head with ``head``'s weight rows (same initialisation, same device) and
        its active outputs when it has them; a bias is dropped (a cosine head has none)."""
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ConfigError(
                "the model's head must be a linear layer (a 2-D 'weight', one row per class) "
                f"to be turned into a cosine classifier; got {type(head).__name__}"
            )
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, scale).to(weight.device)
        with torch.no_grad():
            new.weight.copy_(weight)
            active = getattr(head, "active", None)
            if isinstance(active, torch.Tensor) and active.shape == new.active.shape:
                new.active.copy_(active)
        return new

    @torch.no_grad()
    def expose(self, labels: torch.Tensor) -> None:
        """Switch on ``labels`` while the head trains; a frozen head grows by set_rows only."""
        if self.weight.requires_grad:
            self.active[labels.to(self.active.device, torch.long)] = True

    @torch.no_grad()
    def set_rows(self, classes: torch.Tensor, rows: torch.Tensor) -> None:
        """Class weights ``rows`` (normalised here) for ``classes``, switched on."""
        classes = classes.to(self.weight.device, torch.long)
        self.weight[classes] = F.normalize(rows.to(self.weight), dim=1)
        self.active[classes] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T
        return (self.scale * cosine).masked_fill(~self.active, MASK_VALUE)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
            f"scale={self.scale}"


def install_cosine_head(ctx: RunContext, scale: float, plugin: str) -> CosineHead:
    """Replace ``ctx.model.head`` by a cosine head with the same initial rows."""
    require_backbone(ctx, plugin)
    try:
        head = CosineHead.replacing(ctx.model.head, scale)
    except ConfigError as exc:
        raise ConfigError(f"{plugin}: {exc.detail}") from None
    ctx.model.head = head
    return head


# ---------------------------------------------------------------------------
# batch-invariant features
# ---------------------------------------------------------------------------


def fixed_chunk_features(
    ctx: RunContext,
    x: torch.Tensor,
    chunk: int,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``forward`` (default ``ctx.model.features``) of raw samples ``x`` in eval mode, in
    calls of exactly ``chunk`` rows (see :func:`fixed_chunk_outputs`); the mode is restored.
    A frozen encoder module's features come from the simulator's feature cache
    (:mod:`clsim.feature_cache`): each distinct sample through it once."""
    model = ctx.model
    forward = forward or model.features
    if len(x) == 0:
        return torch.zeros(0, int(getattr(model, "feature_dim", 0)), device=ctx.device)
    was_training = model.training
    model.eval()
    try:
        if isinstance(forward, nn.Module):
            return feature_cache().features(forward, x, chunk, ctx.to_input, ctx.input_key())
        return computed_features(forward, x, chunk, ctx.to_input)
    finally:
        model.train(was_training)


def frozen_outputs(encoder: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``encoder`` of a batch of model inputs (an evaluation's), through the feature cache
    when it is frozen: every evaluation point asks for the same test images again. One
    call of ``len(inputs)`` rows, the call the evaluation batch makes anyway, so the
    evaluation's batches are not padded to ``feature_batch`` (8 times the work at a conv
    net's evaluation batch of 32); an image keeps its call height at every evaluation
    point, so its features do not change. The caller sets eval mode."""
    return feature_cache().features(encoder, inputs, len(inputs)) if len(inputs) \
        else fixed_chunk_outputs(encoder, inputs, 1)


# ---------------------------------------------------------------------------
# class means
# ---------------------------------------------------------------------------


class ClassMeans:
    """Running per-class sums of feature vectors (float64) and sample counts (int64).

    The mean of a class is ``sums[c] / counts[c]``: it depends on the set of samples
    added, not on their order or grouping, up to float64 rounding of the sums (about
    1e-16 relative). Both tensors are allocated for every label id at once, so the ledger
    sees the full, constant cost.
    """

    def __init__(self, n_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(n_classes, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``features`` (n, dim) of samples with class ids ``labels`` (n,)."""
        if len(labels) == 0:
            return
        labels = labels.to(self.sums.device, torch.long)
        self.sums.index_add_(0, labels, features.to(self.sums.device, torch.float64))
        self.counts.index_add_(0, labels, torch.ones_like(labels))

    @property
    def seen(self) -> torch.Tensor:
        """Bool per label id: at least one sample added."""
        return self.counts > 0

    def means(self) -> torch.Tensor:
        """``(n_classes, dim)`` float64 means; rows of unseen classes are zero."""
        return self.sums / self.counts.clamp(min=1).unsqueeze(1).to(self.sums.dtype)


def class_prototypes(
    features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """``(len(classes), dim)`` float64: the normalised mean feature of each class's samples."""
    labels = labels.to(features.device)
    rows = [features[labels == c].to(torch.float64).mean(0) for c in classes.tolist()]
    return F.normalize(torch.stack(rows), dim=1)


# ---------------------------------------------------------------------------
# shared checks and small helpers
# ---------------------------------------------------------------------------


def require_backbone(ctx: RunContext, plugin: str) -> None:
    """The model must split into ``features`` (an nn.Module) and ``feature_dim``."""
    model = ctx.model
    if not isinstance(getattr(model, "features", None), nn.Module) or not isinstance(
        getattr(model, "feature_dim", None), int
    ):
        raise ConfigError(
            f"{plugin} needs a model with 'features' (the encoder) and 'feature_dim', as "
            "every clsim backbone has"
        )


def require_flat_labels(ctx: RunContext, plugin: str) -> None:
    labels = ctx.labels
    if labels is not None and labels.n_levels > 1:
        raise ConfigError(
            f"{plugin} keeps one prototype per class of a flat label space; this stream has "
            f"{labels.n_levels} label levels ({', '.join(labels.level_names)})"
        )


def require_boundaries(experience: Experience, plugin: str, why: str) -> None:
    """Refuse a hidden-boundary stream (its experience is shown without data)."""
    if experience.n_train == 0:
        raise ConfigError(
            f"{plugin} needs task boundaries ({why}); this stream hides them "
            "(boundaries: hidden)"
        )


def frozen(model: nn.Module) -> bool:
    """True once no parameter of ``model`` trains: the strategies' "base is over" flag,
    read off the model instead of kept as a Python bool the ledger would estimate."""
    return not any(p.requires_grad for p in model.parameters())


def freeze(module: nn.Module) -> None:
    """No parameter of ``module`` trains from now on (a plugin may let some train again
    with ``requires_grad_``; a session that must keep BatchNorm statistics asks the loop
    for ``eval_mode`` in its plan)."""
    for p in module.parameters():
        p.requires_grad_(False)


def split_last_block(features: nn.Module, plugin: str) -> tuple[nn.Sequential, nn.Sequential]:
    """``(shared, block)``: ``block`` is the last child of ``features`` holding parameters
    and every child after it (pooling); ``shared`` the children before. Modules are
    shared with the model, not copied (wrappers hold references only)."""
    if not isinstance(features, nn.Sequential):
        raise ConfigError(
            f"{plugin}: adapting the last block needs model.features to be an nn.Sequential "
            f"of layers; got {type(features).__name__} (use adapt: head)"
        )
    children = list(features.named_children())
    weighted = [i for i, (_, m) in enumerate(children) if any(True for _ in m.parameters())]
    if not weighted:
        raise ConfigError(
            f"{plugin}: model.features has no layer with parameters to adapt (an mlp needs a "
            "hidden layer); use adapt: head"
        )
    cut = weighted[-1]
    return nn.Sequential(OrderedDict(children[:cut])), nn.Sequential(OrderedDict(children[cut:]))
