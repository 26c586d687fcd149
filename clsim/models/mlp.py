"""Multi-layer perceptron: the SplitMNIST workhorse (Avalanche's baselines use 400x2)."""

import math
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from clsim.models.base import (
    MAX_LAYERS,
    MAX_WIDTH,
    ClassifierModel,
    ModelOptionError,
    require_positive_ints,
)


@dataclass
class MLPOptions:
    """Options of the ``mlp`` model."""

    hidden: list[int] = field(
        default_factory=lambda: [400, 400],
        metadata={"help": f"widths of the hidden layers (at most {MAX_LAYERS:,} layers of "
                  f"1 to {MAX_WIDTH:,} units); [] gives a linear model",
                  "min": 1, "max": MAX_WIDTH, "max_items": MAX_LAYERS},
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "dropout probability after each hidden activation, in [0, 1)",
                  "min": 0.0, "max": 1.0, "max_exclusive": True},
    )
    activation: Literal["relu", "tanh"] = field(
        default="relu",
        metadata={"help": "nonlinearity of the hidden layers (continual-learning-baselines' "
                  "LwF on split MNIST uses tanh)"},
    )


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def build_mlp(input_shape: tuple[int, ...], n_classes: int, options: MLPOptions) -> ClassifierModel:
    """Flatten, then ``Linear -> activation [-> Dropout]`` per hidden width, then the head.

    ``features`` is everything before the last Linear, so ``feature_dim`` is the last
    hidden width (or the flattened input size when ``hidden`` is empty).
    """
    require_positive_ints("mlp", "hidden", options.hidden, empty_ok=True)
    if not 0.0 <= options.dropout < 1.0:
        raise ModelOptionError(
            "The 'dropout' option of model 'mlp' must be a float in [0, 1). "
            f"Got {options.dropout!r} instead.",
            key_path="dropout",
        )
    activation = ACTIVATIONS.get(options.activation)
    if activation is None:
        raise ModelOptionError(
            f"The 'activation' option of model 'mlp' must be one of {', '.join(ACTIVATIONS)}. "
            f"Got {options.activation!r} instead.",
            key_path="activation",
        )
    in_features = math.prod(int(s) for s in input_shape)
    if in_features < 1:
        raise ModelOptionError(f"model 'mlp' got an empty input shape {tuple(input_shape)}.")

    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for hidden in options.hidden:
        layers += [nn.Linear(width, hidden), activation()]
        if options.dropout > 0.0:
            layers.append(nn.Dropout(options.dropout))
        width = hidden
    return ClassifierModel(nn.Sequential(*layers), width, n_classes)
