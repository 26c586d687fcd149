"""PRD: prototype-sample relation distillation, a replay-free class-incremental learner.

Asadi, Davari, Mudur, Aljundi and Belilovsky, "Prototype-Sample Relation Distillation:
Towards Replay-Free Continual Learning", ICML 2023 (arXiv:2303.14771). METHODS.md section 6.

The encoder ``f`` (``ctx.model.features``) learns with a supervised contrastive loss on
the normalised output of a projector ``g`` (a 2-layer MLP); one prototype per class lives
in ``f``'s space and is pulled towards its class's (detached) features; old prototypes
follow the drifting encoder through a distillation of their relation to the current
task's samples. No sample of an earlier task is kept, and the model's linear head is not
used: prediction is the nearest prototype by cosine.

Per batch, with two augmented views of every sample (``2N`` inputs)::

    total = SupCon(normalise(g(f(x))), tau) + proto_weight * proto + distill_weight * distill
    proto   = mean over samples of the current task's classes of 1 - cos(p_y, f(x).detach())
    distill = mean over earlier tasks t of KL(softmax(s_old) || softmax(s_new)),
              s_c(x) = <f(x), p_c> / ||p_c|| over task t's prototypes

The teacher (``s_old``) is a frozen copy of the encoder and the prototypes taken at the
start of the task; the student (``s_new``) is the current encoder and prototypes, so old
prototypes move through the distillation only, never through the prototype loss.

**Training is owned by the plugin** (``clsim_train_experience``): ``ctx.epochs`` epochs
of shuffled mini-batches of ``ctx.batch_size`` over the experience, with the plugin's own
SGD over the encoder, the projector and all prototypes. The model's head gets no
gradient. A plugin that owns training cannot read the scenario's optimizer section (the
run context exposes epochs and batch size only), so the optimizer's settings are options
here, defaulting to the published SGD lr 0.01, momentum 0.9, weight decay 1e-4; the
published batch size, 128, is the scenario's ``training.batch_size``. The projector and
prototypes are held by the plugin (not attached to the model), so the ledger names them.

**Memory** (what the ledger charges after each experience): the model, the prototypes
(one ``feature_dim`` float row and two int64 ids per seen class) and the projector. The
teacher (old encoder and prototype copies) exists only while a task trains, and is
charged if the ledger measures then (an online stream's anytime check); it is dropped at
the task's end: between experiences it would be a copy of the model itself, retaken at
the next task's start, so keeping it would charge for nothing the method needs. Like the
engine's, the optimizer is not kept between calls: it is built for each training call
(an online stream's parts each restart momentum).

**Reconstructed** (not fixed by METHODS.md; the paper's own choices may differ):

- new prototypes start at the mean encoder feature of their class's training samples
  (eval mode) at the start of the task;
- the prototype loss uses both views of every sample whose label is a class first met in
  this experience; samples of older classes (blurry streams) do not enter it;
- the distillation is averaged over earlier tasks (not summed), per sample over both
  views, with no temperature on the scores;
- the teacher runs in the student's mode (batch statistics for BatchNorm) and replays
  the student's random draws (dropout masks) on the same views, so the KL measures
  weight drift only and is exactly 0.0 on the first batch of a task;
- SupCon follows Khosla et al. (2020) without the ``tau / tau_base`` rescaling;
- the projector's hidden width defaults to the encoder's feature width;
- for inputs that are not ``(N, C, H, W)`` images (flat vectors), a view zeroes each
  normalised input value with probability ``drop_prob`` and adds Gaussian noise of std
  ``noise_std``; images get a random crop (``crop_padding``) and a horizontal flip.

**With the language-guided head** (``language_head`` in the same strategy, LingoCL) the
frozen class-name targets of its :class:`clsim.models.heads.SemanticHead` are the
prototypes, and the prototype space is the text space the head's projection ``h`` maps
features into: no prototype is learned (the bank records class ids only), the prototype
loss is ``1 - cos(t_y, h(f(x).detach()))`` (so it trains ``h``), the distillation scores
are ``<h(f(x)), t_c>`` against the teacher's frozen copies of the encoder *and* of ``h``
(still exactly 0.0 at a task's first batch), and prediction is the nearest target by
cosine, the argmax of the head's logits over the seen classes. Measured here (README) this
composition learns new classes poorly: ``h`` is shared by all classes, the distillation
holds it where the earlier tasks left it, and new targets cannot move to their class's
features as PRD's mean-initialised prototypes do.

With task ids visible at test, prediction is restricted to the prototypes created in the
task's experience. PRD needs task boundaries: a stream with hidden boundaries is refused.
Per-batch loss parts are reported as events: ``prd_first_batch`` (exact values of the
first batch of each experience) and ``prd_epoch`` (means per epoch).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clsim.augment import crop_flip, random_crop
from clsim.context import RunContext
from clsim.errors import ConfigError, OptionError, TrainingError
from clsim.models.heads import SemanticHead
from clsim.seeding import derive_seed
from clsim.stream import Experience

LOSS_PARTS = ("supcon", "proto", "distill", "total")


@dataclass
class PrdOptions:
    """Options of the prd plugin; every default is the published one."""

    temperature: float = field(
        default=0.1,
        metadata={"min": 0, "min_exclusive": True, "help": "SupCon temperature"},
    )
    proto_weight: float = field(
        default=2.0, metadata={"min": 0, "help": "weight of the prototype loss"}
    )
    distill_weight: float = field(
        default=4.0, metadata={"min": 0, "help": "weight of the relation distillation"}
    )
    projector_hidden: int | None = field(
        default=None,
        metadata={"min": 1, "help": "hidden width of the projector; default: the feature width"},
    )
    projector_dim: int = field(
        default=128, metadata={"min": 1, "help": "output width of the projector"}
    )
    augment: bool = field(
        default=True, metadata={"help": "two augmented views per sample (else two copies)"}
    )
    crop_padding: int = field(
        default=4, metadata={"min": 0, "help": "random-crop padding for image inputs (pixels)"}
    )
    flip: bool = field(default=True, metadata={"help": "random horizontal flip for image inputs"})
    noise_std: float = field(
        default=0.1,
        metadata={"min": 0, "help": "flat inputs: Gaussian noise std (normalised units)"},
    )
    drop_prob: float = field(
        default=0.1,
        metadata={"min": 0, "help": "flat inputs: probability of zeroing an input value"},
    )
    lr: float = field(
        default=0.01,
        metadata={"min": 0, "min_exclusive": True, "help": "SGD learning rate (published 0.01)"},
    )
    momentum: float = field(
        default=0.9, metadata={"min": 0, "max": 1, "help": "SGD momentum (published 0.9)"}
    )
    weight_decay: float = field(
        default=1e-4, metadata={"min": 0, "help": "SGD weight decay (published 1e-4)"}
    )

    def check(self) -> None:
        if not self.drop_prob < 1:
            raise OptionError("drop_prob", f"drop_prob must be below 1; got {self.drop_prob}")


class PrototypeBank(nn.Module):
    """One prototype row per class, grouped by the experience that introduced the class.

    Each group is its own parameter, so a group outside every loss term of a step gets
    no gradient at all (and the optimizer, weight decay included, leaves it untouched).
    ``classes`` and ``tasks`` give the class id and the experience index of every row,
    in the order of the groups.
    """

    classes: torch.Tensor
    tasks: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.groups = nn.ParameterList()
        self.register_buffer("classes", torch.empty(0, dtype=torch.long))
        self.register_buffer("tasks", torch.empty(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.classes.numel())

    def add_group(self, task: int, classes: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Prototypes ``rows`` (k, dim) for ``classes`` (k,), introduced by ``task``;
        ``rows=None`` records the classes only (their prototypes live elsewhere: the
        frozen targets of a semantic head)."""
        device = self.classes.device
        if rows is not None:
            self.groups.append(nn.Parameter(rows.detach().clone().to(device)))
        self.classes = torch.cat([self.classes, classes.to(device, torch.long)])
        self.tasks = torch.cat([self.tasks, torch.full_like(classes, task).to(device)])

    def spans(self) -> list[slice]:
        """The rows of each group, in order (one group per introducing task)."""
        tasks = self.tasks.tolist()
        starts = [i for i, t in enumerate(tasks) if i == 0 or t != tasks[i - 1]]
        return [slice(a, b) for a, b in zip(starts, [*starts[1:], len(tasks)], strict=True)]

    def weights(self) -> torch.Tensor:
        """All prototypes, ``(n_rows, dim)``."""
        if not len(self.groups):
            return torch.empty(0, self.dim, device=self.classes.device)
        return torch.cat(list(self.groups))


class PrdPlugin:
    """Prototype-sample relation distillation (Asadi et al., ICML 2023); owns training."""

    Options = PrdOptions

    def __init__(self, options: PrdOptions | None = None) -> None:
        self.options = options or PrdOptions()
        self.projector: nn.Module | None = None
        self.prototypes: PrototypeBank | None = None
        # the teacher lives while one experience trains
        self.old_encoder: nn.Module | None = None
        self.old_projection: nn.Module | None = None  # with a semantic head
        self.old_prototypes: list[torch.Tensor] | None = None
        self._first_batch_due: bool | None = None  # None once logged: nothing to charge
        self._order: torch.Generator | None = None
        self._augment: torch.Generator | None = None

    # -- setup -------------------------------------------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        model = ctx.model
        if not isinstance(getattr(model, "features", None), nn.Module) or not hasattr(
            model, "feature_dim"
        ):
            raise ConfigError(
                "prd needs a model with 'features' (the encoder) and 'feature_dim', as every "
                "clsim backbone has"
            )
        dim = int(model.feature_dim)
        hidden = self.options.projector_hidden or dim
        # the projector's initialisation comes from the run's seed, not from the global
        # stream of random numbers that other plugins may also draw from
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(ctx.seed, ctx.strategy, "prd", "projector"))
            projector = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, self.options.projector_dim)
            )
        self.projector = projector.to(ctx.device)
        self.prototypes = PrototypeBank(dim).to(ctx.device)
        self._order = ctx.torch_generator("prd", "order")
        self._augment = ctx.torch_generator("prd", "augment", device=ctx.device)

    # -- experience boundaries ---------------------------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        if experience.n_train == 0:
            raise ConfigError(
                "prd needs task boundaries (it snapshots a teacher and adds prototypes at the "
                "start of each task); this stream hides them (boundaries: hidden)"
            )
        bank, semantic = self.prototypes, semantic_head(ctx)
        if len(bank):  # the teacher: frozen copies of the encoder and prototypes as they are
            self.old_encoder = copy.deepcopy(ctx.model.features).requires_grad_(False)
            if semantic is None:
                self.old_prototypes = [group.detach().clone() for group in bank.groups]
            else:  # the targets are frozen: the teacher differs by its projection only
                self.old_projection = copy.deepcopy(semantic.projection).requires_grad_(False)
                self.old_prototypes = self.prototype_groups(ctx)
        labels = experience.train_y.unique()
        new = labels[~torch.isin(labels, bank.classes.cpu())]
        if len(new) and semantic is not None:
            bank.add_group(experience.index, new, None)
        elif len(new):
            features = ctx.features(experience.train_x)
            y = experience.train_y.to(features.device)
            means = torch.stack([features[y == c].mean(0) for c in new.tolist()])
            bank.add_group(experience.index, new, means)
        self._first_batch_due = True

    def clsim_train_experience(self, ctx: RunContext, experience: Experience) -> Any:
        """Epochs of mini-batches with the PRD loss, under a fresh SGD per call (an online
        stream delivers an experience in parts: momentum restarts with each part)."""
        semantic = semantic_head(ctx)
        params = itertools.chain(
            ctx.model.features.parameters(),
            self.projector.parameters(),
            self.prototypes.parameters(),
            () if semantic is None else semantic.projection.parameters(),
        )
        optimizer = torch.optim.SGD(
            [p for p in params if p.requires_grad],
            lr=self.options.lr,
            momentum=self.options.momentum,
            weight_decay=self.options.weight_decay,
        )
        ctx.model.train()
        self.projector.train()
        n, batch_size = experience.n_train, ctx.batch_size
        for epoch in range(ctx.epochs):
            order = torch.randperm(n, generator=self._order)
            sums = torch.zeros(len(LOSS_PARTS), device=ctx.device)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                losses = self.batch_losses(
                    ctx, experience.train_x[index], experience.train_y[index]
                )
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                values = torch.stack([losses[k].detach() for k in LOSS_PARTS])
                if self._first_batch_due:
                    ctx.log(
                        "prd_first_batch",
                        experience=experience.index,
                        **dict(zip(LOSS_PARTS, values.tolist(), strict=True)),
                    )
                    self._first_batch_due = None
                sums += values
            means = dict(
                zip(LOSS_PARTS, (sums / max(1, -(-n // batch_size))).tolist(), strict=True)
            )
            if not all(math.isfinite(v) for v in means.values()):
                raise TrainingError(
                    f"strategy {ctx.strategy!r}: the PRD loss became non-finite in epoch "
                    f"{epoch + 1} of experience {experience.index} ({means}); lower the "
                    "prd plugin's lr"
                )
            ctx.log("prd_epoch", experience=experience.index, epoch=epoch, **means)
        return True

    def clsim_after_experience(self, ctx: RunContext) -> None:
        self._release(ctx)

    def clsim_teardown(self, ctx: RunContext) -> None:
        self._release(ctx)

    def _release(self, ctx: RunContext) -> None:
        """Drop what only one experience's training needs (teacher, gradients)."""
        self.old_encoder = None
        self.old_projection = None
        self.old_prototypes = None
        self._first_batch_due = None
        for module in (ctx.model, self.projector, self.prototypes):
            if module is not None:
                module.zero_grad(set_to_none=True)

    # -- the loss ------------------------------------------------------------

    def batch_losses(
        self, ctx: RunContext, x: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The PRD loss parts of a batch of raw samples: ``supcon``, ``proto``,
        ``distill`` and their weighted ``total`` (the only one with a graph to backward)."""
        o = self.options
        inputs = ctx.to_input(x)
        views = torch.cat([self._view(inputs), self._view(inputs)])
        labels = y.to(ctx.device).repeat(2)
        rng = _rng_state(ctx.device)
        features = ctx.model.features(views)
        old_features = self._teacher_features(views, rng, ctx)
        z = F.normalize(self.projector(features), dim=1)
        # prototype space: f's own, or the text space of a semantic head, h(f)
        semantic = semantic_head(ctx)
        to_space = nn.Identity() if semantic is None else semantic.projection
        if old_features is not None and self.old_projection is not None:
            old_features = self.old_projection(old_features)
        parts = {
            "supcon": supcon_loss(z, labels, o.temperature),
            "proto": self._proto_loss(ctx, to_space(features.detach()), labels),
            "distill": self._distill_loss(ctx, to_space(features), old_features),
        }
        total = parts["supcon"]
        # a term of weight 0 stays out of the graph: its parameters then get no gradient
        if o.proto_weight:
            total = total + o.proto_weight * parts["proto"]
        if o.distill_weight:
            total = total + o.distill_weight * parts["distill"]
        parts["total"] = total
        return parts

    def _view(self, inputs: torch.Tensor) -> torch.Tensor:
        """One augmented view of normalised model inputs."""
        o, generator = self.options, self._augment
        if not o.augment:
            return inputs
        if inputs.dim() == 4:
            if o.flip:
                return crop_flip(inputs, generator, padding=o.crop_padding)
            return random_crop(inputs, o.crop_padding, generator)
        keep = torch.rand(inputs.shape, generator=generator, device=generator.device)
        noise = torch.randn(inputs.shape, generator=generator, device=generator.device)
        keep = (keep >= o.drop_prob).to(inputs.device, inputs.dtype)
        return inputs * keep + o.noise_std * noise.to(inputs.device, inputs.dtype)

    def _teacher_features(
        self, views: torch.Tensor, rng: tuple, ctx: RunContext
    ) -> torch.Tensor | None:
        """The frozen encoder on the same views, in the student's mode and with the
        student's random draws (dropout), so the two differ by their weights only."""
        if self.old_encoder is None:
            return None
        after = _rng_state(ctx.device)
        _set_rng_state(ctx.device, rng)
        try:
            self.old_encoder.train(ctx.model.features.training)
            with torch.no_grad():
                return self.old_encoder(views)
        finally:
            _set_rng_state(ctx.device, after)

    def _proto_loss(
        self, ctx: RunContext, features: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """mean(1 - cos(p_y, f(x))) over samples of the classes this experience introduced."""
        bank = self.prototypes
        zero = features.new_zeros(())
        if not len(bank) or int(bank.tasks[-1]) != ctx.experience.index:
            return zero
        current = self.prototype_groups(ctx)[-1]
        classes = bank.classes[-len(current) :]
        match = labels.unsqueeze(1) == classes.unsqueeze(0)
        inside = match.any(dim=1)
        if not bool(inside.any()):
            return zero
        rows = current[match[inside].to(torch.uint8).argmax(dim=1)]
        return (1 - F.cosine_similarity(rows, features[inside], dim=1)).mean()

    def _distill_loss(
        self, ctx: RunContext, features: torch.Tensor, old_features: torch.Tensor | None
    ) -> torch.Tensor:
        """KL(teacher || student) of the prototype-sample score distributions, averaged
        over the earlier tasks."""
        if old_features is None or not self.old_prototypes:
            return features.new_zeros(())
        terms = []
        for new, old in zip(self.prototype_groups(ctx), self.old_prototypes, strict=False):
            log_q = F.log_softmax(features @ F.normalize(new, dim=1).T, dim=1)
            log_p = F.log_softmax(old_features @ F.normalize(old, dim=1).T, dim=1)
            terms.append((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())
        return torch.stack(terms).mean()

    # -- evaluation ------------------------------------------------------------

    def clsim_predict(
        self, ctx: RunContext, x: torch.Tensor, task_id: int | None
    ) -> torch.Tensor | None:
        """The class of the nearest prototype by cosine (over the task's own prototypes
        when task ids are visible)."""
        bank = self.prototypes
        if bank is None or not len(bank):
            return None  # before the first experience: the engine's argmax
        prototypes, classes = torch.cat(self.prototype_groups(ctx)), bank.classes
        if task_id is not None:
            own = bank.tasks == task_id
            if bool(own.any()):
                prototypes, classes = prototypes[own], classes[own]
        semantic = semantic_head(ctx)
        features = ctx.model.features(x)
        embedded = F.normalize(features, dim=1) if semantic is None else semantic.embed(features)
        similarity = embedded @ F.normalize(prototypes, dim=1).T
        return classes[similarity.argmax(dim=1)]

    def prototype_groups(self, ctx: RunContext) -> list[torch.Tensor]:
        """The current prototypes, one tensor per task: the learned rows, or with a
        semantic head the frozen targets of each task's classes."""
        semantic = semantic_head(ctx)
        if semantic is None:
            return list(self.prototypes.groups)
        classes = self.prototypes.classes.to(semantic.targets.device)
        return [semantic.targets[classes[span]] for span in self.prototypes.spans()]


def semantic_head(ctx: RunContext) -> SemanticHead | None:
    """The language_head's head when the strategy has one: its frozen class-name targets
    are then the prototypes, in the text space its projection maps features into."""
    head = getattr(ctx.model, "head", None)
    return head if isinstance(head, SemanticHead) else None


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) of unit-norm embeddings ``z``:
    for each anchor, the mean log-probability of its positives (same label, itself
    excluded) against every other embedding; averaged over anchors with a positive."""
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    count = positives.sum(dim=1)
    mean_positive = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / count.clamp_min(1)
    has = count > 0
    if not bool(has.any()):
        return z.new_zeros(())
    return -mean_positive[has].mean()


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
