"""The model zoo: every backbone by name, with its options as a typed dataclass.

Every model is a :class:`ClassifierModel` (``features`` then a linear ``head``). The
config layer validates a scenario's ``model.options`` against ``ModelSpec.options`` (its
fields carry ``metadata={"help": ..., "min": ...}``) and calls :func:`build_model`.
Construction draws initial weights from torch's default generator, so the caller seeds
around it; nothing here seeds anything.
"""

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clsim.errors import ConfigError
from clsim.models.base import ClassifierModel, ModelOptionError, parameter_count
from clsim.models.cnn import ConvNet2Options, SmallCNNOptions, build_convnet2, build_small_cnn
from clsim.models.mlp import MLPOptions, build_mlp
from clsim.models.resnet import (
    FixedResNetOptions,
    ResNetFeatures,
    ResNetOptions,
    build_resnet,
    fixed_depth_builder,
)
from clsim.models.slim_resnet import SlimResNetOptions, build_slim_resnet18

__all__ = [
    "MODELS",
    "ClassifierModel",
    "ConvNet2Options",
    "FixedResNetOptions",
    "MLPOptions",
    "ModelOptionError",
    "ModelSpec",
    "ResNetFeatures",
    "ResNetOptions",
    "SlimResNetOptions",
    "SmallCNNOptions",
    "build_model",
    "model_names",
    "parameter_count",
]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model.

    :param build: ``build(input_shape, n_classes, options) -> ClassifierModel``.
    :param options: the dataclass of this model's options (all fields have defaults).
    :param help: one line for ``clsim list``.
    :param eval_batch: test samples per forward pass when a scenario's
        ``training.eval_batch_size`` is ``auto`` on the CPU: the batch measured fastest
        for this kind (table below); an evaluation's results do not depend on it beyond
        float rounding.
    """

    build: Callable[[tuple[int, ...], int, Any], ClassifierModel]
    options: type
    help: str = ""
    eval_batch: int = 256


# Seconds for one evaluation pass over 10,000 test images (random uint8, normalised batch
# by batch, forward + argmax under no_grad), one thread, CPU, torch 2.13, each model in the
# layout ``training.memory_format: auto`` gives it (channels_last for the conv nets, on
# CIFAR-10 shapes 3x32x32; the mlp contiguous on MNIST shapes 1x28x28, hidden [400, 400]).
# Measured on a 2-core machine shared with other jobs: differences under ~10% are noise,
# the drop from the old default of 1024 is not. Small batches win because a conv
# layer's activations then stay in cache.
#
#   batch                     32     64    128    256    512   1024   (NCHW: 64 / 1024)
#   convnet2 (channels 32)  1.27   1.37   2.84   3.33   3.76   4.54   (3.4-4.1 / 7.6-8.4)
#   small_cnn ([32, 64])    1.97   2.03   3.65   5.33   8.54   6.39   (4.73 / 9.86)
#   resnet20                10.9   12.0   14.7   15.0   20.2   27.9   (12.5 / 32.9)
#   slim_resnet18           32.2   27.2   29.1   29.9   47.6   51.0   (41.3 / 83.3)
#   mlp                     0.14   0.13   0.12   0.12   0.12   0.12
#
# Repeats of convnet2 at 32 / 64 gave 1.40 / 1.57 and 1.62 / 1.65, of small_cnn 2.08 /
# 2.14. The mlp is flat from 128 to 1024 and keeps 1024, the earlier default: its
# results stay bit-identical to before. The resnet aliases (resnet14 ... resnet56) take
# resnet20's batch. CUDA was not measured: there ``auto`` keeps 1024
# (clsim.assembly.evaluation_batch).


RESNET_ALIAS_DEPTHS = (14, 20, 26, 32, 44, 56)

MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(build_mlp, MLPOptions, "fully connected net on flattened inputs",
                     eval_batch=1024),
    "small_cnn": ModelSpec(
        build_small_cnn, SmallCNNOptions, "conv-BN-ReLU-maxpool blocks + global average pool",
        eval_batch=32,
    ),
    "convnet2": ModelSpec(
        build_convnet2, ConvNet2Options, "MEMO's 2-block ConvNet (64 channels) for low memory",
        eval_batch=32,
    ),
    "resnet": ModelSpec(
        build_resnet, ResNetOptions, "CIFAR ResNet (He et al. 2016), depth 6n+2, option-A",
        eval_batch=32,
    ),
    "slim_resnet18": ModelSpec(
        build_slim_resnet18, SlimResNetOptions,
        "GEM's reduced ResNet-18 (Avalanche's SlimResNet18), width 20, 160-d features",
        eval_batch=64,
    ),
}
for _depth in RESNET_ALIAS_DEPTHS:
    MODELS[f"resnet{_depth}"] = ModelSpec(
        fixed_depth_builder(_depth), FixedResNetOptions, f"CIFAR ResNet-{_depth} (no options)",
        eval_batch=MODELS["resnet"].eval_batch,
    )
del _depth


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    options: Any = None,
) -> ClassifierModel:
    """Build model ``name`` for per-sample ``input_shape`` and ``n_classes`` outputs.

    :param options: ``None`` for the defaults, else an instance of
        ``MODELS[name].options``.
    :raises ConfigError: unknown name, ``n_classes < 1``, or options/input shape the
        model cannot be built with (:class:`ModelOptionError`, also a ``ValueError``).
    :raises TypeError: ``options`` is not the model's options dataclass (a caller bug).
    """
    spec = MODELS.get(name)
    if spec is None:
        close = difflib.get_close_matches(str(name), MODELS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(model_names())}.{hint}"
        )
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ConfigError(f"model '{name}' needs n_classes >= 1; got {n_classes!r}.")
    if options is None:
        options = spec.options()
    elif not isinstance(options, spec.options):
        raise TypeError(
            f"options for model '{name}' must be a {spec.options.__name__}; "
            f"got {type(options).__name__}"
        )
    return spec.build(tuple(int(s) for s in input_shape), n_classes, options)
