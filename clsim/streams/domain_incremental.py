"""Domain-incremental streams: the same classes under a new input transform per experience.

Permuted inputs (Goodfellow et al. 2013; Kirkpatrick et al. 2017) shuffle the pixel
positions of every image with one fixed permutation per experience; rotated inputs
(Lopez-Paz and Ranzato 2017) turn every image by one fixed angle per experience. Both
are drawn from the run's seed, so a stream repeats exactly.

The three scenarios of van de Ven, Tuytelaars and Tolias ("Three types of incremental
learning", Nature Machine Intelligence 2022) differ only in the labels and task ids:

- ``domain``: every experience keeps the dataset's labels (one head of C outputs); the
  strategy is never told which transform a sample came from;
- ``class``: experience t's labels are shifted to ``t*C + y`` (C*T outputs), no task id:
  the model must also tell the transforms apart;
- ``task``: labels as in ``class``, and the task id is given in training and at test,
  where the prediction is the argmax over the task's own C outputs (a multi-headed
  output layer: the loop's loss too is taken over the task's outputs only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from clsim.data.dataset import Dataset
from clsim.errors import OptionError
from clsim.labels import LabelSpace
from clsim.seeding import numpy_generator
from clsim.stream import Experience, Stream
from clsim.streams.common import StreamType, TimingOptions

Scenario = Literal["domain", "class", "task"]

# images rotated per chunk: bounds the float copy grid_sample needs (MNIST: ~100 MB)
_ROTATE_CHUNK = 8192


@dataclass
class DomainOptions(TimingOptions):
    """What every domain-incremental stream shares; each type adds its transform's options."""

    n_experiences: int = field(default=10, metadata={"min": 1, "help": "transforms, one per "
                                                     "experience"})
    scenario: Scenario = field(
        default="domain",
        metadata={"help": "domain: shared labels, no task id; class: labels t*C+y, no task id; "
                  "task: labels t*C+y with the task id given (van de Ven et al. 2022)"},
    )
    keep_first: bool = field(
        default=False, metadata={"help": "the first experience sees the untransformed inputs"}
    )

    def check(self) -> None:
        super().check()
        if self.scenario == "task" and self.boundaries == "hidden":
            raise OptionError("scenario", "task ids cannot be given when boundaries are "
                              "hidden; use scenario: domain or class")


@dataclass
class RotatedOptions(DomainOptions):
    """The angle of each experience: given, or drawn from the seed in a range."""

    angles: list[float] | None = field(
        default=None,
        metadata={"help": "one angle in degrees per experience; default: drawn uniformly "
                  "from [min_angle, max_angle) with the seed"},
    )
    min_angle: float = field(default=0.0, metadata={"help": "smallest angle drawn (degrees)"})
    max_angle: float = field(default=180.0, metadata={"help": "largest angle drawn (degrees)"})

    def check(self) -> None:
        super().check()
        if self.angles is not None and self.keep_first:
            raise OptionError("keep_first", "keep_first turns the first experience by 0 "
                              "degrees; with 'angles' given, make the first angle 0 instead")
        if self.angles is not None and len(self.angles) != self.n_experiences:
            raise OptionError("angles", f"{len(self.angles)} angles given for "
                              f"{self.n_experiences} experiences; give one per experience")
        if self.angles is None and not self.min_angle < self.max_angle:
            raise OptionError("max_angle", f"max_angle ({self.max_angle}) must exceed "
                              f"min_angle ({self.min_angle})")


def permutations(dataset: Dataset, n_experiences: int, seed: int,
                 keep_first: bool) -> list[torch.Tensor]:
    """One permutation of a sample's positions per experience (the identity first when
    ``keep_first``): of its pixels for images, shared by every channel, else of its
    features."""
    n_positions = _positions(dataset)
    rng = numpy_generator(seed, "permuted-stream")
    perms = [torch.from_numpy(rng.permutation(n_positions)) for _ in range(n_experiences)]
    if keep_first:
        perms[0] = torch.arange(n_positions)
    return perms


def permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x`` with each sample's positions reordered by ``perm``: the pixels of images
    ``(N, C, H, W)``, the same for every channel; every value of other samples."""
    if x.dim() == 4:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return flat[:, :, perm].reshape(x.shape)
    return x.reshape(x.shape[0], -1)[:, perm].reshape(x.shape)


def rotation_angles(n_experiences: int, seed: int, *, keep_first: bool = False,
                    angles: list[float] | None = None, min_angle: float = 0.0,
                    max_angle: float = 180.0) -> list[float]:
    """The angle of every experience: the given ones, or drawn uniformly from
    ``[min_angle, max_angle)`` with the seed (0 first when ``keep_first``)."""
    if angles is not None:
        turns = [float(a) for a in angles]
    else:
        rng = numpy_generator(seed, "rotated-stream")
        turns = [float(a) for a in rng.uniform(min_angle, max_angle, n_experiences)]
    if keep_first:
        turns[0] = 0.0
    return turns


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Images ``(N, C, H, W)`` turned counter-clockwise by ``degrees`` about their centre,
    bilinear, zeros outside, returned at their storage dtype (integers rounded)."""
    if degrees % 360 == 0:
        return x.clone()
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    height, width = x.shape[-2], x.shape[-1]
    # grid_sample reads output (u, v) from input A @ (u, v): the inverse rotation, in
    # coordinates normalised per axis, hence the aspect ratios on a non-square image
    affine = torch.tensor([[cos, -sin * height / width, 0.0],
                           [sin * width / height, cos, 0.0]], dtype=torch.float32)
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], _ROTATE_CHUNK):
        chunk = x[start:start + _ROTATE_CHUNK].float()
        grid = F.affine_grid(affine.expand(chunk.shape[0], 2, 3), list(chunk.shape),
                             align_corners=False)
        turned = F.grid_sample(chunk, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        if not x.is_floating_point():
            info = torch.iinfo(x.dtype)
            turned = turned.round_().clamp_(info.min, info.max)
        out[start:start + _ROTATE_CHUNK] = turned.to(x.dtype)
    return out


def permuted(dataset: Dataset, *, seed: int, n_experiences: int = 10,
             scenario: Scenario = "domain", keep_first: bool = False) -> Stream:
    """Every experience holds the whole dataset under its own pixel permutation."""
    perms = permutations(dataset, n_experiences, seed, keep_first)
    names = [f"permutation {t}" for t in range(n_experiences)]
    return _assemble(dataset, "permuted", [lambda x, p=p: permute(x, p) for p in perms],
                     names, scenario, {"keep_first": keep_first})


def rotated(dataset: Dataset, *, seed: int, n_experiences: int = 10,
            scenario: Scenario = "domain", keep_first: bool = False,
            angles: list[float] | None = None, min_angle: float = 0.0,
            max_angle: float = 180.0) -> Stream:
    """Every experience holds the whole dataset turned by its own angle."""
    if len(dataset.sample_shape) != 3:
        raise OptionError("type", f"rotated streams turn images (C, H, W); dataset "
                          f"{dataset.name!r} holds samples of shape {dataset.sample_shape} "
                          "(use type: permuted)")
    turns = rotation_angles(n_experiences, seed, keep_first=keep_first, angles=angles,
                            min_angle=min_angle, max_angle=max_angle)
    names = [f"{a:g} degrees" for a in turns]
    return _assemble(dataset, "rotated", [lambda x, a=a: rotate(x, a) for a in turns],
                     names, scenario, {"angles": turns, "keep_first": keep_first})


def _positions(dataset: Dataset) -> int:
    """Positions a permutation reorders: pixels of (C, H, W) images, else every value."""
    shape = dataset.sample_shape
    return int(np.prod(shape[1:])) if len(shape) == 3 else int(np.prod(shape))


def _assemble(dataset: Dataset, kind: str, transforms: list, domain_names: list[str],
              scenario: Scenario, description: dict) -> Stream:
    """Experience t: the whole dataset through ``transforms[t]``, labelled per ``scenario``."""
    n_classes = dataset.n_classes
    shifted = scenario != "domain"
    experiences = []
    for t, transform in enumerate(transforms):
        offset = t * n_classes if shifted else 0
        experiences.append(Experience(
            index=t,
            classes=tuple(range(offset, offset + n_classes)),
            train_x=transform(dataset.x_train),
            train_y=dataset.y_train + offset,
            test_x=transform(dataset.x_test),
            test_y=dataset.y_test + offset,
            task_id=t if scenario == "task" else None,
        ))
    if shifted:
        names = tuple(f"{name} ({domain})" for domain in domain_names
                      for name in dataset.class_names)
    else:
        names = dataset.class_names
    return Stream(
        experiences=tuple(experiences),
        n_classes=len(names),
        class_order=tuple(range(len(names))),
        task_labels=scenario == "task",
        description={"type": kind, "scenario": scenario, "domains": domain_names,
                     **description},
        labels=LabelSpace.flat(names),
    )


def stream_copies(options: DomainOptions) -> int:
    """Copies of the dataset the stream holds: one per experience."""
    return options.n_experiences


def stream_outputs(options: DomainOptions, n_classes: int) -> int:
    """Size of the label space: C shared, or C per experience (class and task scenarios)."""
    return n_classes if options.scenario == "domain" else n_classes * options.n_experiences


DOMAIN_INCREMENTAL_TYPES: dict[str, StreamType] = {
    "permuted": StreamType(permuted, DomainOptions,
                           "the whole dataset under a new pixel permutation per experience",
                           copies=stream_copies, outputs=stream_outputs),
    "rotated": StreamType(rotated, RotatedOptions,
                          "the whole dataset turned by a new angle per experience",
                          copies=stream_copies, outputs=stream_outputs),
}
