"""The prototype baseline of few-shot class-incremental learning (METHODS.md section 8).

The decoupled cosine-classifier baseline (train on the base session, then use class-mean
prototypes) of

* Zhang, Song, Lin, Ye, Pan, Wu. "Few-Shot Incremental Learning with Continually Evolved
  Classifiers" (CEC), CVPR 2021;
* Zhou, Wang, Ye, Ma, Pu, Zhan. "Forward Compatible Few-Shot Class-Incremental Learning"
  (FACT), CVPR 2022;

on the protocol of Tao et al., "Few-Shot Class-Incremental Learning", CVPR 2020.

The method:

1. Base session (experience 0): the backbone trains with a cosine classifier,
   ``logits = 16 * cos(f(x), w_c)``, by the engine's standard loop (the scenario's
   ``training`` section: optimizer, epochs, batch size). The plugin replaces
   ``model.head`` by :class:`~clsim_plugins.prototypes.CosineHead` at setup, keeping the
   initial rows of the model's linear head; every base class's output is switched on
   when the base session starts and the others stay masked, as a head over the base
   classes only.
2. After the base session every parameter of the model is frozen (and held in eval
   mode, see :func:`~clsim_plugins.prototypes.freeze`) and each base class's weight
   becomes the normalised mean embedding of its training samples.
3. Each later session adds each new class as the normalised mean embedding of its shots.
   No gradient step is taken after the base session: its plan says ``train=False``
   (``clsim_plan_experience``), so the standard loop runs no batch for it.
4. Prediction is the model's own argmax: the largest cosine between the embedding and the
   class means of the classes seen so far.

Reference point quoted by METHODS.md for CIFAR-100 (60 base + 8 x 5-way 5-shot,
ResNet-20): last-session accuracy around 50 (CEC 49.1, FACT 52.3).

Memory: the model only. The cosine head replaces the linear one (class rows plus one
bool per output for the active mask, no bias), so the model held is slightly smaller
than the model as built. The ledger parts are ``model.parameters`` and ``model.buffers``.

Reconstructed or adapted (not fixed by the papers for this simulator):

* The base session is experience 0 of whatever stream is given (few-shot streams make
  it the base session by construction); on class-incremental streams the later
  experiences are treated as sessions with all their samples as shots.
* Embeddings for the means are computed in eval mode (BatchNorm uses its running
  statistics), in calls of exactly ``feature_batch`` rows (see
  :func:`~clsim_plugins.prototypes.fixed_chunk_features`), averaged in float64 and stored
  as float32 unit rows.
* A class met again in a later session keeps the prototype of the session that
  introduced it (the protocol never repeats a class; the old samples are not kept, so a
  merged mean cannot be formed).
* The scale 16 is fixed (not learned), as in CEC's released code.
* Task boundaries are needed (the base session must end); a stream with hidden
  boundaries is refused. Label spaces with several levels are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from clsim_plugins.prototypes import (
    CosineHead,
    class_prototypes,
    fixed_chunk_features,
    freeze,
    frozen,
    install_cosine_head,
    require_boundaries,
    require_flat_labels,
)

from clsim.context import RunContext
from clsim.loop_types import ExperiencePlan
from clsim.stream import Experience

NAME = "prototype_fscil"


@dataclass
class PrototypeFscilOptions:
    """Options of the prototype_fscil plugin; every default is the published one."""

    scale: float = field(
        default=16.0,
        metadata={
            "min": 0,
            "min_exclusive": True,
            "help": "cosine classifier scale (temperature) of the base training; 16 in CEC/FACT",
        },
    )
    feature_batch: int = field(
        default=256,
        metadata={
            "min": 1,
            "help": "rows per feature call (padded), so a class mean does not depend on "
            "how the data was batched",
        },
    )


class PrototypeFscilPlugin:
    """Cosine-classifier base training, then class means on a frozen encoder."""

    Options = PrototypeFscilOptions

    def __init__(self, options: PrototypeFscilOptions | None = None) -> None:
        self.options = options or PrototypeFscilOptions()

    def clsim_setup(self, ctx: RunContext) -> None:
        require_flat_labels(ctx, NAME)
        install_cosine_head(ctx, self.options.scale, NAME)

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        require_boundaries(experience, NAME, "the base session must end before the "
                           "encoder freezes")
        if not frozen(ctx.model):  # the base classifier covers its classes from batch one
            ctx.model.head.expose(experience.train_y)

    def clsim_plan_experience(self, ctx: RunContext, plan: ExperiencePlan
                              ) -> ExperiencePlan | None:
        if not frozen(ctx.model):
            return None  # the base session: the standard loop trains encoder and cosine head
        return replace(plan, train=False)  # a few-shot session: no gradient step

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        model = ctx.model
        head: CosineHead = model.head
        if not frozen(model):  # end of the base session: freeze, replace every class weight
            freeze(model)
            head.active.zero_()
        labels = experience.train_y.to(ctx.device)
        present = labels.unique()
        new = present[~head.active[present]]
        if len(new) == 0:
            return
        keep = torch.isin(labels, new)
        x = experience.train_x[keep.cpu()]
        features = fixed_chunk_features(ctx, x, self.options.feature_batch)
        head.set_rows(new, class_prototypes(features, labels[keep], new))
        ctx.log(
            "prototype_fscil_classes",
            experience=experience.index,
            classes=new.tolist(),
            samples=int(keep.sum()),
        )
