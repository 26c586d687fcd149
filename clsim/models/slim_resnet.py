"""The reduced ResNet-18 of GEM (Lopez-Paz and Ranzato 2017), Avalanche's ``SlimResNet18``.

The backbone of continual-learning-baselines' split CIFAR-10 experiments (ER-ACE, online
replay, MIR) and of much of the online continual-learning literature: ResNet-18's layout
at a fifth of its width. A 3x3 conv stem (stride 1) at ``width`` channels with BatchNorm
and ReLU, four stages of two basic blocks at ``width``, ``2 width``, ``4 width`` and
``8 width`` channels (strides 1, 2, 2, 2), average pooling to 1x1, ``8 width`` features
(160 at the default ``width = 20``), then the linear head. Convs carry no bias; a
BatchNorm follows each. Where a block changes the shape, its shortcut is a 1x1 conv (with
the block's stride) and a BatchNorm (He et al.'s option B, as GEM's code), not the
parameter-free option A of ``resnet``. Weights keep torch's default initialisation, as in
GEM's and Avalanche's code.

**Pooling**: GEM and Avalanche pool with ``avg_pool2d(out, 4)`` and read their input as
3x32x32, whose last stage is a 4x4 map. Here the pool is adaptive (average to 1x1), so
the features are ``8 width`` wide for any image size: the same as theirs on 32x32 inputs,
and on 1x28x28 MNIST (whose last map is 4x4 too); a 1-channel input has a 1-channel stem.

Parameter count of the features at ``width = 20`` on 3 channels: 1,093,140 (stem 580,
stages 14,560 / 51,600 / 205,600 / 820,800); the head adds ``160 n_classes + n_classes``
(1,094,750 in all for 10 classes, GEM's "1.09M").
"""

from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from clsim.models.base import MAX_WIDTH, ClassifierModel, ModelOptionError, require_image_shape
from clsim.models.resnet import BasicBlock
from clsim.text import short_repr

BLOCKS_PER_STAGE = (2, 2, 2, 2)
"""ResNet-18's layout: two basic blocks in each of the four stages."""

STAGE_STRIDES = (1, 2, 2, 2)
STAGE_MULTIPLIERS = (1, 2, 4, 8)
"""Channels of each stage, as multiples of ``width``."""


class ProjectionBlock(BasicBlock):
    """A :class:`BasicBlock` whose shortcut, where the shape changes, is a strided 1x1
    conv and a BatchNorm (option B) instead of the zero-padding option A."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride)
        if not isinstance(self.shortcut, nn.Identity):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )


def slim_resnet18_features(in_channels: int, width: int) -> nn.Sequential:
    """``stem``, ``stage1`` ... ``stage4`` and ``pool`` (average to 1x1, flattened), in
    order, as a named ``nn.Sequential`` (so MEMO can cut it: S = stage4 + pool)."""
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU()),
    )
    channels = width
    for index, (n_blocks, stride, multiplier) in enumerate(
            zip(BLOCKS_PER_STAGE, STAGE_STRIDES, STAGE_MULTIPLIERS, strict=True), start=1):
        out = multiplier * width
        blocks = [ProjectionBlock(channels, out, stride)]
        blocks += [ProjectionBlock(out, out) for _ in range(n_blocks - 1)]
        parts[f"stage{index}"] = nn.Sequential(*blocks)
        channels = out
    parts["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(parts)


@dataclass
class SlimResNetOptions:
    """Options of the ``slim_resnet18`` model."""

    width: int = field(
        default=20,
        metadata={"help": "channels of the stem and first stage (nf); the stages have 1, 2, "
                  "4 and 8 times as many, and the features 8 * width",
                  "min": 1, "max": MAX_WIDTH // 8},
    )


def build_slim_resnet18(
    input_shape: tuple[int, ...], n_classes: int, options: SlimResNetOptions
) -> ClassifierModel:
    """GEM's reduced ResNet-18 at ``options.width``; see the module docstring."""
    width = options.width
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH // 8:
        raise ModelOptionError(
            "The 'width' option of model 'slim_resnet18' must be an int from 1 to "
            f"{MAX_WIDTH // 8:,}. Got {short_repr(width)} instead.",
            key_path="width",
        )
    in_channels, _, _ = require_image_shape("slim_resnet18", input_shape, min_size=1)
    return ClassifierModel(slim_resnet18_features(in_channels, width), 8 * width, n_classes)
