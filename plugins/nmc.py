"""Nearest class mean on frozen features: SimpleCIL-style, task-free, exemplar-free.

* Zhou, Cai, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained
  Models: Generalizability and Adaptivity are All You Need" (SimpleCIL), IJCV 2024
  (arXiv:2303.07338): a frozen pre-trained backbone; each class weight is the mean
  embedding of its training samples; prediction by cosine against those prototypes.
* Mensink, Verbeek, Perronnin, Csurka. "Distance-Based Image Classification:
  Generalizing to New Classes at Near-Zero Cost", TPAMI 2013 (the nearest class mean
  classifier); Rebuffi et al., iCaRL, CVPR 2017 (nearest-mean-of-exemplars).

METHODS.md section 8: running class means of frozen features; order-invariant,
task-free, no exemplars.

The plugin owns training (``clsim_train_experience``) because learning here is not
gradient descent on mini-batches: a class mean is a sum and a count, accumulated once per
sample, with no loss, no optimizer and no epochs (only the optional base session trains,
in the standard loop). Every part of the stream it receives, whatever the boundaries (an
online stream's parts of ``eval_every`` samples, a hidden-boundary stream's single
experience), adds its samples' frozen features to per-class running sums (float64) and
counts (int64). Nothing else is kept: no exemplar, no boundary, no task id. A class mean
is ``sum / count``, so after the same samples in any order and any batching the means
agree to float64 rounding (about 1e-16 relative) and the predictions are the same. For
that the features themselves must not depend on the batching: they are computed in eval
mode in calls of exactly ``feature_batch`` rows, the last one zero-padded (a CPU matrix
product may round a row differently when the call has another height). Predictions read
the test batch's features in one call of its own height, through the simulator's feature
cache (an image is computed once for all evaluation points, and its call height does not
change between them).

Prediction: among the classes with at least one sample, the nearest mean, by cosine
(``metric: cosine``, the default) or by Euclidean distance (``metric: euclidean``).
Cosine is the default because it is SimpleCIL's published classifier (a cosine classifier
whose weights are the prototypes) and because it ignores the norm of a feature vector,
which with ReLU features varies from class to class and would otherwise pull Euclidean
decisions towards classes with small-norm means.

The frozen encoder is, in this order of preference for accuracy:

* a backbone loaded from ``backbone_checkpoint`` (a local ``torch.save`` file holding
  ``model.features``' state_dict, or the whole model's with ``features.`` keys; ``head.``
  keys are ignored), the SimpleCIL setting;
* ``base_training: true``: experience 0 trains the model by the engine's standard loop
  (cross-entropy, the scenario's ``training`` section), then everything freezes and the
  base session's samples are added; this is the few-shot protocol's base session
  (needs visible boundaries);
* by default the model as built (random initialisation, seeded), frozen from the start.

Memory: the model (its linear head stays, unused after any base training) plus ``sums``
(n_classes x feature_dim float64) and ``counts`` (n_classes int64), allocated for every
label id at setup; ledger parts ``<plugin>.class_stats.sums`` and
``<plugin>.class_stats.counts``.

Reconstructed or adapted:

* SimpleCIL uses ViT / ResNet backbones pre-trained on ImageNet; no such weights ship
  with clsim, so the checkpoint is the user's, and the two other sources stand in.
* With a checkpoint and ``base_training`` together the checkpoint is loaded, then
  fine-tuned on experience 0 before freezing (as APER adapts on the first stage).
* A relative ``backbone_checkpoint`` is read from the current working directory.
* Task ids, when visible at test, are not used (class-incremental prediction). A label
  space with several levels is treated as one flat range of ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from clsim_plugins.prototypes import (
    ClassMeans,
    fixed_chunk_features,
    freeze,
    frozen,
    frozen_outputs,
    require_backbone,
)

from clsim.context import RunContext
from clsim.errors import ConfigError, OptionError
from clsim.stream import Experience

NAME = "nmc"


@dataclass
class NmcOptions:
    """Options of the nmc plugin; the default metric is SimpleCIL's (cosine)."""

    metric: Literal["cosine", "euclidean"] = field(
        default="cosine",
        metadata={"help": "nearest mean by cosine (SimpleCIL) or by Euclidean distance"},
    )
    base_training: bool = field(
        default=False,
        metadata={
            "help": "train the model on experience 0 by the standard loop, then freeze it "
            "(the few-shot base session; needs visible boundaries)"
        },
    )
    backbone_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "a local torch.save file with the encoder's state_dict (or the whole "
            "model's); loaded at setup and frozen"
        },
    )
    feature_batch: int = field(
        default=256,
        metadata={
            "min": 1,
            "help": "rows per feature call (padded), so features do not depend on batching",
        },
    )

    def check(self) -> None:
        path = self.backbone_checkpoint
        if path is not None and not Path(path).expanduser().is_file():
            raise OptionError(
                "backbone_checkpoint",
                f"expected a file holding a state_dict (torch.save); {path!r} "
                + ("is a folder" if Path(path).expanduser().is_dir() else "does not exist")
                + f" (relative paths are read from {str(Path.cwd())!r})",
            )


class NmcPlugin:
    """Running class means of a frozen encoder's features; nearest mean predicts."""

    Options = NmcOptions

    def __init__(self, options: NmcOptions | None = None) -> None:
        self.options = options or NmcOptions()
        self.class_stats: ClassMeans | None = None

    # -- setup: the frozen encoder and the statistics ----------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        require_backbone(ctx, NAME)
        if self.options.backbone_checkpoint is not None:
            load_backbone(ctx.model.features, self.options.backbone_checkpoint, ctx.device)
        if not self.options.base_training:
            freeze(ctx.model)
        self.class_stats = ClassMeans(ctx.n_classes, ctx.model.feature_dim, ctx.device)

    # -- the stream ----------------------------------------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        if experience.n_train == 0 and not frozen(ctx.model):
            raise ConfigError(
                "nmc: base_training needs task boundaries (experience 0 trains the encoder, "
                "which then freezes); this stream hides them (boundaries: hidden); set "
                "base_training: false or load a backbone_checkpoint",
                key_path="base_training",
            )

    def clsim_train_experience(self, ctx: RunContext, experience: Experience) -> Any | None:
        if not frozen(ctx.model):
            return None  # base training: the engine's standard loop on experience 0
        self._add(ctx, experience.train_x, experience.train_y)
        return True

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if frozen(ctx.model):
            return
        freeze(ctx.model)  # the base experience is trained: its samples count from now
        self._add(ctx, experience.train_x, experience.train_y)
        ctx.log("nmc_frozen", experience=experience.index, base_samples=experience.n_train)

    def _add(self, ctx: RunContext, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(y):
            self.class_stats.add(fixed_chunk_features(ctx, x, self.options.feature_batch), y)

    # -- evaluation ------------------------------------------------------------

    @torch.no_grad()
    def clsim_predict(self, ctx: RunContext, x: torch.Tensor) -> torch.Tensor | None:
        stats = self.class_stats
        if stats is None or not bool(stats.seen.any()):
            return None  # nothing learned yet: the model's own argmax
        features = frozen_outputs(ctx.model.features, x)
        classes = stats.seen.nonzero().squeeze(1)
        return classes[nearest_mean(features, stats.means()[classes], self.options.metric)]


def nearest_mean(features: torch.Tensor, means: torch.Tensor, metric: str) -> torch.Tensor:
    """Index (into ``means``) of the nearest mean of each feature row, in float64."""
    f = features.to(torch.float64)
    if metric == "cosine":
        scores = F.normalize(f, dim=1) @ F.normalize(means, dim=1).T
    else:  # -||f - m||^2 without the ||f||^2 term, which is the same for every class
        scores = 2 * f @ means.T - (means * means).sum(1)
    return scores.argmax(dim=1)


def load_backbone(features: torch.nn.Module, path: str, device: torch.device) -> None:
    """Load a state_dict into ``features``; any mismatch is a ConfigError naming the key."""
    where = f"nmc: backbone_checkpoint {path!r}"
    try:
        state = torch.load(Path(path).expanduser(), map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist", key_path="backbone_checkpoint") from None
    except Exception as exc:  # not a torch file, or pickled objects weights_only refuses
        raise ConfigError(
            f"{where} could not be read as a state_dict ({type(exc).__name__}: {exc})",
            key_path="backbone_checkpoint",
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ConfigError(
            f"{where} holds a {type(state).__name__}; expected a state_dict (a dict of "
            "tensors by parameter name)",
            key_path="backbone_checkpoint",
        )
    if any(k.startswith("features.") for k in state):  # a whole model's state_dict
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    expected = features.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches {_few(shapes)}")
        raise ConfigError(
            f"{where} does not fit the scenario's model.features: " + "; ".join(problems),
            key_path="backbone_checkpoint",
        )
    features.load_state_dict(state)


def _few(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})"
