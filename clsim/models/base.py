"""The one shape every clsim model has: a feature extractor followed by a linear head.

Plugins depend on this split: herding and nearest-mean readout read ``model.features``,
growing-head strategies replace ``model.head``, and expansion methods (MEMO) cut
``model.features`` into a shared and a per-task part. Keeping the names fixed here is
what lets a plugin work with every backbone in the zoo.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clsim.errors import ConfigError
from clsim.text import short_repr

MAX_LAYERS = 1_000
"""Layers (or conv blocks) a model option may list: deeper is a slip, never a plan."""
MAX_WIDTH = 1_000_000
"""Units or channels of one layer. Wider layers are refused here; narrower ones that still
do not fit the machine are refused by the memory estimate (clsim/resources.py)."""


class ClassifierModel(nn.Module):
    """``forward(x) = head(features(x))``.

    :param features: maps a batch of model inputs to a ``(N, feature_dim)`` float tensor.
    :param feature_dim: width of the feature vector, the head's input size.
    :param n_classes: number of outputs of the head.
    """

    features: nn.Module
    head: nn.Linear
    feature_dim: int

    def __init__(self, features: nn.Module, feature_dim: int, n_classes: int) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = int(feature_dim)
        self.head = nn.Linear(self.feature_dim, n_classes)

    @property
    def n_classes(self) -> int:
        """Current number of outputs (follows the head if a plugin replaces it)."""
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def has_feature_head(model: nn.Module) -> bool:
    """Whether ``model(x)`` is exactly ``model.head(model.features(x))``, so the training
    loop can hand the features to plugins without a second forward pass (not when hooks
    on the model itself would then be skipped)."""
    return (
        isinstance(model, ClassifierModel)
        and type(model).forward is ClassifierModel.forward
        and not (model._forward_hooks or model._forward_pre_hooks)
    )


class ModelOptionError(ConfigError, ValueError):
    """A model option or input shape a model cannot be built with.

    A :class:`ConfigError` (so the CLI prints it as one paragraph) that is also a
    ``ValueError`` (so plain-Python callers can catch what they expect). ``key_path`` is
    the option name alone; the config layer can re-raise with the full path using
    ``detail`` and ``key_path``.
    """


def parameter_count(module: nn.Module) -> int:
    """Number of scalar parameters (trainable or not) held by ``module``."""
    return sum(p.numel() for p in module.parameters())


def require_image_shape(
    model: str, input_shape: Sequence[int], min_size: int
) -> tuple[int, int, int]:
    """Check that ``input_shape`` is ``(C, H, W)`` with ``H, W >= min_size``.

    Convolutional models cannot take flat vectors; saying so at build time beats a
    shape error deep inside the first forward pass.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ModelOptionError(
            f"model '{model}' needs image inputs shaped (channels, height, width); "
            f"got input shape {shape}. Use 'mlp' for flat feature vectors."
        )
    channels, height, width = shape
    if height < min_size or width < min_size:
        raise ModelOptionError(
            f"model '{model}' needs images of at least {min_size}x{min_size} pixels; "
            f"got {height}x{width}."
        )
    return channels, height, width


def require_positive_ints(
    model: str, option: str, values: Sequence[int], *, empty_ok: bool
) -> None:
    """Reject layer widths outside 1..MAX_WIDTH, more than MAX_LAYERS layers, and an
    empty list where a model needs a layer (for callers that skip the config layer)."""
    if not values and not empty_ok:
        raise ModelOptionError(
            f"The '{option}' option of model '{model}' must list at least one width. "
            "Got [] instead.",
            key_path=option,
        )
    if len(values) > MAX_LAYERS:
        raise ModelOptionError(
            f"The '{option}' option of model '{model}' lists at most {MAX_LAYERS:,} layers. "
            f"Got {len(values):,} instead.",
            key_path=option,
        )
    bad = [v for v in values
           if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_WIDTH]
    if bad:
        raise ModelOptionError(
            f"The '{option}' option of model '{model}' must be a list of ints from 1 to "
            f"{MAX_WIDTH:,}. Got {short_repr(list(values))} instead.",
            key_path=option,
        )
