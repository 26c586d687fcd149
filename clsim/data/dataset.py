"""The in-memory dataset every loader returns.

Samples stay at their raw storage dtype (uint8 pixels, one byte per value) so that the
memory ledger charges exemplars what they really cost; :meth:`Dataset.to_input` turns a
batch of raw samples into the float tensor a model reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test tensors plus what is needed to read them.

    ``x_*`` hold raw samples: ``(N, C, H, W)`` for images, ``(N, D)`` for vectors.
    ``y_*`` hold int64 class ids in ``[0, len(class_names))``. ``coarse_*`` hold the
    parent class id of every sample when the dataset has a two-level hierarchy.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    # raw value -> float input: (x * scale - mean[c]) / std[c], per channel for images
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    coarse_train: torch.Tensor | None = None
    coarse_test: torch.Tensor | None = None
    coarse_names: tuple[str, ...] | None = None
    source: str = field(default="")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def sample_bytes(self) -> int:
        """Bytes one stored sample takes at its raw dtype (the 'exemplar' unit)."""
        return self.x_train[0].numel() * self.x_train.element_size()

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw samples -> normalised float32 model input, on x's device."""
        return normalise(x, self.scale, self.mean, self.std)

    def info(self) -> DataInfo:
        """What a plugin may know of this dataset: its shape and names, no sample."""
        return DataInfo(self.name, self.class_names, self.sample_shape, self.x_train.dtype,
                        self.scale, self.mean, self.std, self.coarse_names)


@dataclass(frozen=True, eq=False)
class DataInfo:
    """A dataset described without its tensors: what a training plugin sees
    (``ctx.data``), so no test sample can reach a strategy while it learns."""

    name: str
    class_names: tuple[str, ...]
    sample_shape: tuple[int, ...]
    sample_dtype: torch.dtype
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    coarse_names: tuple[str, ...] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_bytes(self) -> int:
        """Bytes one stored sample takes at its raw dtype (the 'exemplar' unit)."""
        return math.prod(self.sample_shape) * torch.empty((), dtype=self.sample_dtype
                                                          ).element_size()

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw samples -> normalised float32 model input, on x's device."""
        return normalise(x, self.scale, self.mean, self.std)


def normalise(x: torch.Tensor, scale: float, mean: tuple[float, ...],
              std: tuple[float, ...]) -> torch.Tensor:
    """``(x * scale - mean[c]) / std[c]`` as float32, per channel for images.

    Computed as ``x * (scale / std) - mean / std`` in one multiply and one add, in place
    on the fresh float copy (this runs for every batch).
    """
    gain = [scale / s for s in std]
    shift = [-m / s for m, s in zip(mean, std, strict=True)]
    out = x.to(torch.float32, copy=True)  # float32 input would otherwise be the same tensor
    if len(gain) == 1:
        return out.mul_(gain[0]).add_(shift[0])
    shape = (1, len(gain)) + (1,) * (out.dim() - 2)
    gain_t = torch.tensor(gain, dtype=out.dtype, device=out.device).view(shape)
    shift_t = torch.tensor(shift, dtype=out.dtype, device=out.device).view(shape)
    return out.mul_(gain_t).add_(shift_t)
