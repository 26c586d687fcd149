"""The CIFAR ResNet of He et al. (2016, section 4.2), the backbone of most CIL papers.

Depth ``6n + 2``: a 3x3 conv stem at 16 channels, three stages of ``n`` basic blocks at
16 / 32 / 64 channels (the first block of stages 2 and 3 has stride 2), global average
pooling, 64-d features. Shortcuts are the paper's option A: parameter-free, a stride-2
subsample with the new channels zero-padded (after the old ones, as in PyCIL / MEMO), so
every parameter sits in a conv or a BatchNorm. Convs carry no bias; a BN follows each.

Parameter counts of the features (no classifier), 3-channel input: ResNet-14 171,856;
ResNet-20 269,072; ResNet-26 366,288; ResNet-32 463,504 (stem + stage1 + stage2 = 112,016
and stage3 = 351,488, the split MEMO uses); ResNet-44 657,936; ResNet-56 852,368. Each
6 layers more add 97,216. A 1-channel input saves 288 (the stem conv).
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clsim.models.base import ClassifierModel, ModelOptionError, require_image_shape
from clsim.text import short_repr

MAX_DEPTH = 2_000
"""Weighted layers of a ``resnet``: room for the paper's ResNet-1202, no more."""

STAGE_CHANNELS = (16, 32, 64)
"""Channels of the stem / stage 1, stage 2 and stage 3."""


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` with zero channels appended.

    Holds no parameters and no buffers, so expansion methods pay nothing for it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"cannot pad {in_channels} channels down to {out_channels}")
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            # F.pad pads from the last dim backwards: (W, W, H, H, C_front, C_back).
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = (
            ShortcutA(in_channels, out_channels, stride) if needs_projection else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetFeatures(nn.Sequential):
    """The backbone without its classifier, as named, ordered parts.

    ``stem`` (conv + BN + ReLU), ``stage1``, ``stage2``, ``stage3`` (each an
    ``nn.Sequential`` of :class:`BasicBlock`), ``pool`` (global average pool + flatten),
    applied in that order. Being a ``Sequential``, it can be sliced: ``features[:3]`` is
    MEMO's shared part G and ``features[3:]`` its per-task part S.
    """

    stem: nn.Sequential
    stage1: nn.Sequential
    stage2: nn.Sequential
    stage3: nn.Sequential
    pool: nn.Sequential

    def __init__(self, in_channels: int, blocks_per_stage: int) -> None:
        c1, c2, c3 = STAGE_CHANNELS
        super().__init__(
            OrderedDict(
                stem=nn.Sequential(_conv3x3(in_channels, c1), nn.BatchNorm2d(c1), nn.ReLU()),
                stage1=_stage(c1, c1, blocks_per_stage, stride=1),
                stage2=_stage(c1, c2, blocks_per_stage, stride=2),
                stage3=_stage(c2, c3, blocks_per_stage, stride=2),
                pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            )
        )
        self.out_dim = c3
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He et al. initialisation; draws from torch's default generator.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def __getitem__(self, idx: int | slice) -> nn.Module:  # type: ignore[override]
        # A slice is a plain Sequential sharing these modules (names kept: ``[3:].stage3``).
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self.named_children())[idx]))
        return super().__getitem__(idx)


def _stage(in_channels: int, out_channels: int, n_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_channels, out_channels, stride)]
    blocks += [BasicBlock(out_channels, out_channels) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


# ------------------------------------------------------------------------------ options


@dataclass
class ResNetOptions:
    """Options of the ``resnet`` model."""

    depth: int = field(
        default=32,
        metadata={"help": "number of weighted layers, 6n+2 (20, 32, 44, 56, 110, ...), at "
                  f"most {MAX_DEPTH:,}", "min": 8, "max": MAX_DEPTH},
    )


@dataclass
class FixedResNetOptions:
    """The ``resnet14`` ... ``resnet56`` aliases take no options: the depth is the name."""


def blocks_per_stage(depth: int, model: str = "resnet") -> int:
    """``n`` for ``depth = 6n + 2``; a clear error for any other depth."""
    if (isinstance(depth, bool) or not isinstance(depth, int) or not 8 <= depth <= MAX_DEPTH
            or (depth - 2) % 6):
        raise ModelOptionError(
            f"The 'depth' option of model '{model}' must be an int of the form 6n+2 from 8 "
            f"to {MAX_DEPTH:,} (8, 14, 20, 26, 32, 44, 56, 110, ...). Got {short_repr(depth)} "
            "instead.",
            key_path="depth",
        )
    return (depth - 2) // 6


def _build(input_shape: tuple[int, ...], n_classes: int, depth: int, model: str) -> ClassifierModel:
    n = blocks_per_stage(depth, model)
    in_channels, _, _ = require_image_shape(model, input_shape, min_size=1)
    features = ResNetFeatures(in_channels, n)
    return ClassifierModel(features, features.out_dim, n_classes)


def build_resnet(
    input_shape: tuple[int, ...], n_classes: int, options: ResNetOptions
) -> ClassifierModel:
    """CIFAR ResNet of ``options.depth`` layers; see the module docstring."""
    return _build(input_shape, n_classes, options.depth, "resnet")


def fixed_depth_builder(
    depth: int,
) -> Callable[[tuple[int, ...], int, FixedResNetOptions], ClassifierModel]:
    """A builder for the alias ``resnet{depth}`` (options ignored: there are none)."""
    blocks_per_stage(depth)  # fail at registration, not at first use

    def build(
        input_shape: tuple[int, ...], n_classes: int, options: FixedResNetOptions
    ) -> ClassifierModel:
        return _build(input_shape, n_classes, depth, f"resnet{depth}")

    build.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} blocks per stage)."
    return build
