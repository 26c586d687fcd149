"""Small convolutional backbones: a configurable conv net and MEMO's 2-layer ConvNet."""

from collections import OrderedDict
from dataclasses import dataclass, field

from torch import nn

from clsim.models.base import (
    MAX_LAYERS,
    MAX_WIDTH,
    ClassifierModel,
    ModelOptionError,
    require_image_shape,
    require_positive_ints,
)
from clsim.text import short_repr


def _global_pool() -> nn.Sequential:
    """Average over all spatial positions, then flatten to ``(N, C)``."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ---------------------------------------------------------------------------- small_cnn


@dataclass
class SmallCNNOptions:
    """Options of the ``small_cnn`` model."""

    channels: list[int] = field(
        default_factory=lambda: [32, 64],
        metadata={"help": "output channels of each conv block (one block per entry; at most "
                  f"{MAX_LAYERS:,} blocks of 1 to {MAX_WIDTH:,} channels)",
                  "min": 1, "max": MAX_WIDTH, "min_items": 1, "max_items": MAX_LAYERS},
    )
    batch_norm: bool = field(
        default=True,
        metadata={"help": "BatchNorm after each conv (the conv then has no bias)"},
    )


def build_small_cnn(
    input_shape: tuple[int, ...], n_classes: int, options: SmallCNNOptions
) -> ClassifierModel:
    """One ``conv3x3 [-> BN] -> ReLU -> maxpool2`` block per entry of ``channels``.

    Global average pooling ends the features, so ``feature_dim = channels[-1]`` whatever
    the image size. A block whose input map is already 1 pixel high or wide skips its
    pooling, so deep settings still run on 8x8 digits.
    """
    require_positive_ints("small_cnn", "channels", options.channels, empty_ok=False)
    in_channels, height, width = require_image_shape("small_cnn", input_shape, min_size=1)

    blocks: list[nn.Module] = []
    for out_channels in options.channels:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not options.batch_norm)
        ]
        if options.batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        blocks.append(nn.Sequential(*layers))
        in_channels = out_channels
    features = nn.Sequential(*blocks, _global_pool())
    return ClassifierModel(features, options.channels[-1], n_classes)


# ----------------------------------------------------------------------------- convnet2


@dataclass
class ConvNet2Options:
    """Options of the ``convnet2`` model."""

    channels: int = field(
        default=64,
        metadata={"help": "channels of both conv blocks (64 in MEMO / PyCIL)", "min": 1,
                  "max": MAX_WIDTH},
    )


def _conv_bn_relu_pool(in_channels: int, out_channels: int) -> nn.Sequential:
    """MEMO's conv block: conv3x3 (with bias) -> BN -> ReLU -> maxpool2."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def build_convnet2(
    input_shape: tuple[int, ...], n_classes: int, options: ConvNet2Options
) -> ClassifierModel:
    """The 2-layer ConvNet MEMO uses for its lowest memory points on CIFAR.

    Two blocks of ``conv3x3(bias) -> BN -> ReLU -> maxpool2`` at ``channels`` channels,
    then global average pooling (MEMO/PyCIL ``conv2``: ``AvgPool2d(8)`` on the 8x8 map of
    a 32x32 image, which is the same thing there). ``features`` exposes ``block1``,
    ``block2`` and ``pool``, applied in that order; MEMO shares ``block1`` and gives each
    task its own ``block2 + pool``. On 3x32x32 inputs with 64 channels the features hold
    38,976 parameters.
    """
    if (
        isinstance(options.channels, bool)
        or not isinstance(options.channels, int)
        or not 1 <= options.channels <= MAX_WIDTH
    ):
        raise ModelOptionError(
            f"The 'channels' option of model 'convnet2' must be an int from 1 to {MAX_WIDTH:,}. "
            f"Got {short_repr(options.channels)} instead.",
            key_path="channels",
        )
    in_channels, _, _ = require_image_shape("convnet2", input_shape, min_size=4)
    width = options.channels
    features = nn.Sequential(
        OrderedDict(
            block1=_conv_bn_relu_pool(in_channels, width),
            block2=_conv_bn_relu_pool(width, width),
            pool=_global_pool(),
        )
    )
    return ClassifierModel(features, width, n_classes)
