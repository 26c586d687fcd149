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

**The algorithm as hooks over the standard loop**, in the order they run:

- ``clsim_before_experience``: take the teacher, add the new classes' prototypes;
- ``clsim_trainable``: the projector and the prototype bank, held on the plugin (so the
  ledger names them) and trained with the encoder by the scenario's optimizer
  (``training.optimizer``); the model's linear head enters no loss and gets no gradient.
  The published optimizer is SGD, lr 0.01, momentum 0.9, weight decay 1e-4, batch 128:
  what a scenario that runs PRD as published sets in its ``training`` section;
- ``clsim_inputs``: two augmented views of every sample (``2N`` rows; the loop repeats
  the labels), and the state of the global random generator the student's forward
  starts from;
- ``clsim_forward``: the teacher's scores on the very inputs the student saw, replaying
  the student's random draws (dropout masks), as the auxiliary output
  ``prd_teacher_scores``;
- ``clsim_task_loss``: SupCon, replacing cross-entropy;
- ``clsim_loss``: ``proto_weight * proto + distill_weight * distill``;
- ``clsim_after_batch``: the loss parts, for the events below.

A non-finite loss is the loop's business (``training.nonfinite_loss``: stop, or skip the
batch and count it). Listed with ``replay``, the memory samples replay mixes into a batch
(``clsim_before_batch``) enter SupCon and the distillation like the stream's; the
prototype loss takes the classes this experience introduced only.

**Memory**: kept between experiences, the model, the prototypes (one ``feature_dim``
float row and two int64 ids per seen class) and the projector. While a task trains, the
teacher too (the old encoder and prototype copies, the class ids of the old and new rows,
five floats of loss sums for the events): the ledger's peak, read after
``clsim_before_experience`` and at the end of training, charges it. It is dropped at the
task's end: between experiences it would be a copy of the model itself, retaken at the
next task's start, so keeping it would charge for nothing the method needs.

**Reconstructed** (not fixed by METHODS.md; the paper's own choices may differ):

- new prototypes start at the mean encoder feature of their class's training samples
  (eval mode) at the start of the task;
- the prototype loss uses both views of every sample whose label is a class first met in
  this experience; samples of older classes (blurry streams, replay) do not enter it;
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

**With a fixed-target head** (``language_head`` in the same strategy, LingoCL; any head
with frozen ``targets`` and ``embed``, read through
:func:`clsim.models.heads.target_head`) the frozen class targets are the prototypes, and
the prototype space is the one ``embed`` maps features into: no prototype is learned
(the bank records class ids only), the prototype loss is ``1 - cos(t_y,
embed(f(x).detach()))`` (so it trains the head's projection ``h``), the distillation
scores are the head's own logits over task t's classes (``eta * cos(h(f(x)), t_c)``),
the teacher's from frozen copies of the encoder *and* of the head (its targets shared,
not copied; still exactly 0.0 at a task's first batch), and prediction is the nearest
target by cosine, the argmax of the head's logits over the seen classes. Measured here
(README) this composition learns new classes poorly: ``h`` is shared by all classes, the
distillation holds it where the earlier tasks left it, and new targets cannot move to
their class's features as PRD's mean-initialised prototypes do.

With task ids visible at test, prediction is restricted to the prototypes created in the
task's experience. PRD needs task boundaries: a stream with hidden boundaries is refused.
Loss parts are reported as events: ``prd_first_batch`` (the exact values of the first
trained batch of each experience) and ``prd_experience`` (means over the experience's
trained batches); ``total`` is the batch's whole loss, every plugin's terms included.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clsim.augment import crop_flip, random_crop
from clsim.context import RunContext
from clsim.errors import ConfigError, OptionError, TrainingError
from clsim.hookspecs import hookimpl
from clsim.loop_types import ForwardOutput, Trainable
from clsim.models.base import has_feature_head
from clsim.models.heads import target_head
from clsim.seeding import derive_seed
from clsim.stream import Experience

LOSS_PARTS = ("supcon", "proto", "distill", "total")
TEACHER = "prd_teacher_scores"  # the auxiliary output clsim_forward adds


@dataclass
class PrdOptions:
    """Options of the prd plugin; every default is the published one (the optimizer is
    the scenario's ``training.optimizer``)."""

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
        frozen targets of a fixed-target head)."""
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
    """Prototype-sample relation distillation (Asadi et al., ICML 2023)."""

    Options = PrdOptions

    def __init__(self, options: PrdOptions | None = None) -> None:
        self.options = options or PrdOptions()
        self.projector: nn.Module | None = None
        self.prototypes: PrototypeBank | None = None
        self._augment: torch.Generator | None = None
        # the teacher lives while one experience trains
        self.old_encoder: nn.Module | None = None
        self.old_head: nn.Module | None = None  # a frozen copy of a fixed-target head
        self.old_prototypes: list[torch.Tensor] | None = None  # learned groups, per task
        self.old_classes: torch.Tensor | None = None  # the classes of the teacher's rows
        self.new_classes: torch.Tensor | None = None  # the classes this experience added
        # between the hooks of one batch: the random state the student's forward starts
        # from (clsim_inputs -> clsim_forward) and the loss parts (-> clsim_after_batch)
        self._rng: tuple | None = None
        self._parts: dict[str, torch.Tensor] = {}
        # over one experience: the sums of the loss parts of its trained batches, and
        # their count (kept as a tensor: no Python number the ledger could only estimate)
        self._sums: torch.Tensor | None = None

    # -- setup -------------------------------------------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        model = ctx.model
        if not has_feature_head(model) or not hasattr(model, "feature_dim"):
            raise ConfigError(
                "prd needs a model whose output is head(features(x)), with 'feature_dim', "
                "as every clsim backbone has"
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
        self._augment = ctx.torch_generator("prd", "augment", device=ctx.device)

    # -- experience boundaries ---------------------------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        """The teacher (frozen copies of the encoder and prototypes as they are), then one
        prototype per new class at the mean of its features."""
        if experience.n_train == 0:
            raise ConfigError(
                "prd needs task boundaries (it snapshots a teacher and adds prototypes at the "
                "start of each task); this stream hides them (boundaries: hidden)"
            )
        bank, head = self.prototypes, target_head(ctx.model)
        if len(bank):
            self.old_classes = bank.classes.clone()
            self.old_encoder = copy.deepcopy(ctx.model.features).requires_grad_(False)
            if head is None:
                self.old_prototypes = [group.detach().clone() for group in bank.groups]
            else:  # the targets are frozen: shared, not copied; h (and eta) are copied
                self.old_head = copy.deepcopy(head, {id(head.targets): head.targets})
                self.old_head.requires_grad_(False)
        labels = experience.train_y.unique()
        new = labels[~torch.isin(labels, bank.classes.cpu())]
        self.new_classes = new.to(bank.classes.device) if len(new) else None
        if len(new) and head is not None:
            bank.add_group(experience.index, new, None)
        elif len(new):
            features = ctx.features(experience.train_x)
            y = experience.train_y.to(features.device)
            means = torch.stack([features[y == c].mean(0) for c in new.tolist()])
            bank.add_group(experience.index, new, means)
        self._sums = None

    def clsim_trainable(self, ctx: RunContext) -> list[Trainable]:
        """The projector and every prototype group, beside the encoder."""
        return [Trainable(self.projector), Trainable(self.prototypes)]

    # -- one batch -------------------------------------------------------------

    @hookimpl(trylast=True)  # last: the random state taken here is the forward's own
    def clsim_inputs(self, ctx: RunContext, inputs: torch.Tensor) -> torch.Tensor:
        """Two augmented views of every sample; with a teacher, the random state the
        student's forward starts from, for the teacher to replay."""
        views = torch.cat([self._view(inputs), self._view(inputs)])
        if self.old_encoder is not None:
            self._rng = _rng_state(ctx.device)
        return views

    def clsim_forward(
        self, ctx: RunContext, output: ForwardOutput
    ) -> dict[str, torch.Tensor] | None:
        """The teacher's scores against the earlier tasks' prototypes, on the student's
        inputs, in its mode and with its random draws: the two differ by weights only."""
        if output.features is None:
            raise TrainingError("prd needs the model's features in the forward output")
        if self.old_encoder is None:
            return None
        rng, self._rng = self._rng, None
        after = _rng_state(ctx.device)
        _set_rng_state(ctx.device, rng)
        try:
            self.old_encoder.train(ctx.model.features.training)
            with torch.no_grad(), ctx.compute_part("teacher"):  # charged as prd.teacher
                features = self.old_encoder(output.inputs)
                if self.old_head is None:  # task by task, as the student's are computed
                    scores = torch.cat([features @ F.normalize(old, dim=1).T
                                        for old in self.old_prototypes], dim=1)
                else:
                    self.old_head.train(ctx.model.head.training)
                    scores = self.old_head(features)[:, self.old_classes]
        finally:
            _set_rng_state(ctx.device, after)
        return {TEACHER: scores}

    def clsim_task_loss(self, ctx: RunContext, output: ForwardOutput) -> torch.Tensor:
        """SupCon on the normalised projection of the features (every view)."""
        z = F.normalize(self.projector(output.features), dim=1)
        loss = supcon_loss(z, output.targets, self.options.temperature)
        self._parts["supcon"] = loss.detach()
        return loss

    def clsim_loss(self, ctx: RunContext, output: ForwardOutput) -> torch.Tensor | None:
        """``proto_weight * proto + distill_weight * distill``; a term of weight 0 stays
        out of the graph, so its parameters get no gradient (nor weight decay)."""
        o = self.options
        proto, distill = self.prototype_loss(ctx, output), self.distillation_loss(output)
        self._parts.update(proto=proto.detach(), distill=distill.detach())
        terms = [w * term for w, term in ((o.proto_weight, proto), (o.distill_weight, distill))
                 if w]
        return sum(terms[1:], terms[0]) if terms else None

    def clsim_after_batch(self, ctx: RunContext, loss: torch.Tensor) -> None:
        """Sum the loss parts of the trained batch; log the first one's exactly."""
        parts = torch.stack([*(self._parts[k] for k in LOSS_PARTS[:-1]), loss.reshape(()),
                             torch.ones_like(loss).reshape(())])  # the last: a batch count
        self._parts = {}
        if self._sums is None:  # the first trained batch: one device read per experience
            ctx.log("prd_first_batch", experience=ctx.experience.index,
                    **dict(zip(LOSS_PARTS, parts.tolist(), strict=False)))
            self._sums = parts
        else:
            self._sums = self._sums + parts

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if self._sums is not None:
            *sums, count = self._sums.tolist()
            ctx.log("prd_experience", experience=experience.index, batches=int(count),
                    **{k: total / count for k, total in zip(LOSS_PARTS, sums, strict=True)})
        self._release()

    def clsim_teardown(self, ctx: RunContext) -> None:
        self._release()

    def _release(self) -> None:
        """Drop what only one experience's training needs (the teacher, the sums)."""
        self.old_encoder = self.old_head = self.old_prototypes = None
        self.old_classes = self.new_classes = None
        self._rng, self._parts, self._sums = None, {}, None

    # -- the loss terms --------------------------------------------------------

    def prototype_loss(self, ctx: RunContext, output: ForwardOutput) -> torch.Tensor:
        """mean(1 - cos(p_y, f(x).detach())) over the samples of the classes this
        experience introduced (in the head's space with a fixed-target head)."""
        features, classes = output.features.detach(), self.new_classes
        if classes is None:
            return features.new_zeros(())
        bank, head = self.prototypes, target_head(ctx.model)
        if head is None:
            rows = bank.groups[-1]
        else:
            rows, features = head.targets[classes], head.embed(features)
        match = output.targets.unsqueeze(1) == classes.unsqueeze(0)
        inside = match.any(dim=1)
        own = rows[match.to(torch.uint8).argmax(dim=1)]  # row 0 outside: masked below
        cost = (1 - F.cosine_similarity(own, features, dim=1)) * inside
        return cost.sum() / inside.sum().clamp_min(1)  # no device read to test for none

    def distillation_loss(self, output: ForwardOutput) -> torch.Tensor:
        """KL(teacher || student) of the prototype-sample score distributions, averaged
        over the earlier tasks."""
        teacher = output.aux.get(TEACHER)
        if teacher is None:
            return output.features.new_zeros(())
        spans = [s for s in self.prototypes.spans() if s.stop <= len(self.old_classes)]
        if self.old_head is None:
            groups = list(self.prototypes.groups)[: len(spans)]
            students = [output.features @ F.normalize(group, dim=1).T for group in groups]
        else:
            students = [output.logits[:, self.old_classes[span]] for span in spans]
        terms = []
        for span, student in zip(spans, students, strict=True):
            log_q = F.log_softmax(student, dim=1)
            log_p = F.log_softmax(teacher[:, span], dim=1)
            terms.append((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())
        return torch.stack(terms).mean()

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

    # -- evaluation ------------------------------------------------------------

    def clsim_predict(
        self, ctx: RunContext, x: torch.Tensor, task_id: int | None
    ) -> torch.Tensor | None:
        """The class of the nearest prototype by cosine (over the task's own prototypes
        when task ids are visible)."""
        bank = self.prototypes
        if bank is None or not len(bank):
            return None  # before the first experience: the engine's argmax
        head = target_head(ctx.model)
        prototypes = bank.weights() if head is None else head.targets[bank.classes]
        classes = bank.classes
        if task_id is not None:
            own = bank.tasks == task_id
            if bool(own.any()):
                prototypes, classes = prototypes[own], classes[own]
        features = ctx.model.features(x)
        embedded = F.normalize(features, dim=1) if head is None else head.embed(features)
        similarity = embedded @ F.normalize(prototypes, dim=1).T
        return classes[similarity.argmax(dim=1)]


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) of unit-norm embeddings ``z``:
    for each anchor, the mean log-probability of its positives (same label, itself
    excluded) against every other embedding; averaged over anchors with a positive
    (0 when none has one)."""
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    count = positives.sum(dim=1)
    mean_positive = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / count.clamp_min(1)
    has = count > 0
    return -(mean_positive * has).sum() / has.sum().clamp_min(1)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
