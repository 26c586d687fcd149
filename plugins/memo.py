"""MEMO: a memory-efficient expandable model for class-incremental learning.

Zhou, Wang, Ye and Zhan, "A Model or 603 Exemplars: Towards Memory-Efficient
Class-Incremental Learning", ICLR 2023 (METHODS.md section 2). Shallow layers change
little between tasks and deep ones specialise, so MEMO shares a *generalized* part G and
gives each task t only a new *specialized* deep block S_t; the memory an expanding method
saves by not copying G goes to exemplars. Models and exemplars are counted in one unit.

The algorithm, as hooks over clsim's standard loop (in the order they run):

* Setup: ``model.features`` becomes :class:`MemoFeatures`: G, then
  ``[S_1(G(x)); ...; S_t(G(x))]`` (the newest block is the last ``block_dim`` columns);
  ``model.head`` becomes :class:`MemoHead`, one linear layer over the seen classes and
  all blocks' features, returning one logit per label id (unseen classes get
  :data:`clsim.models.heads.MASK_VALUE`). The engine's evaluation and ``ctx.features``
  keep working on the rewired model.
* Before task t >= 1 (``clsim_before_experience``): S_t starts as a copy of S_{t-1};
  every older S_i is frozen (``requires_grad`` off and kept in eval mode, so its
  BatchNorm statistics stay put even while the model trains). G keeps training, as in
  the published runs; the gradient of the old blocks' features reaches G through the
  frozen blocks, as in the published code. The head grows: old weights are copied into
  the old-class x old-feature block, the rest is a fresh ``nn.Linear`` initialisation.
  A new auxiliary head on S_t alone, (new classes + 1) outputs with the old classes
  collapsed to label 0, is held by the plugin (``aux_head``).
* Training (the standard loop, under the scenario's optimizer and non-finite policy):
  ``clsim_plan_experience`` appends the stored exemplars to the task's samples (the
  union, as in iCaRL / PyCIL) and sets ``first_epochs`` / ``later_epochs``;
  ``clsim_trainable`` hands the aux head to the optimizer; ``clsim_inputs`` augments;
  ``clsim_loss`` adds ``aux_weight`` x CE(aux head on the newest block's slice of the
  forward's features) to the loop's CE(head).
* After task t (``clsim_after_experience``): for t >= 1 weight alignment scales the
  new-class rows of the head by mean norm of old rows / mean norm of new rows; then
  exemplars are chosen by herding (iCaRL) on the concatenated features, an even share
  per seen class.

A head that scores fixed class targets (:func:`clsim.models.heads.target_head`; for
example ``language_head``'s, LingoCL, listed in the same strategy, whose setup runs
first) is grown through that protocol instead of being replaced by a ``MemoHead``: each
task widens it to the new feature width (``widened``: the trained map copied into the old
input columns) and switches on the task's classes (unseen ones stay masked). Its rows are
fixed targets, so weight alignment has nothing to rescale and is skipped (logged as such).

How backbones are split (:func:`split_backbone`): S is the last child of the
``features`` Sequential that holds parameters, and everything after it; G is everything
before. That gives the paper's split for the CIFAR ResNets (G = stem + stage 1 + stage 2,
S = stage 3 + pooling: 112,016 + 351,488 parameters for ResNet-32) and for MEMO's
``convnet2`` (G = ``block1``, S = ``block2`` + pooling); for ``small_cnn`` S is the last
conv block, for ``mlp`` the last hidden layer (the only one with ``hidden: [h]``: G is then
the flattening, and MEMO degenerates to one small network per task).

Memory. Unless ``capacity`` is given, the exemplar capacity is what the budget leaves
after the model as it is for the current task (G, every S_i, the grown head), the aux
head, the plugin's bookkeeping and every other plugin's state, divided by the bytes of one
stored sample and its label (:mod:`clsim.capacity`, the rule every store sized from the
budget follows); it is computed once every plugin has set up (``clsim_size_stores``) and
again after every expansion, and the stored exemplars shrink to it
(old classes keep a prefix of their herding order). A budget that cannot hold one
exemplar per seen class next to the blocks is a ConfigError naming the minimum.

The paper counts differently: float32 parameters of the backbone only (no BatchNorm
statistics, no classifier, no labels). ``parameters_only: true`` sizes the memory that
way, to reproduce its arithmetic; the ledger still measures everything, so such a run
can be reported over budget by those few bytes. The arithmetic, exactly
(:func:`model_as_exemplars`, :func:`memo_exemplar_arithmetic`): one ResNet-32 = 463,504 x
4 // 3072 = 603 CIFAR exemplars; the budget of ten ResNet-32s + 2000 exemplars
(24,684,160 bytes, clsim budget ``"18540160 + 2000 exemplars"``) leaves MEMO with G + 10
blocks 3312 exemplars and a single ResNet-32 7431. Counted as the ledger does (BatchNorm
buffers, the 100-class head over 640 features, the aux head, one label byte per
exemplar, the plugin's bookkeeping), MEMO keeps 3207 and a single-backbone replay 7417
(its ResNet-32 with a 100-class head).

Reconstructions (choices the paper leaves open, or that clsim's engine imposes):

* Training uses the scenario's ``training`` section (optimizer, lr, batch size, epochs,
  non-finite policy); the aux head trains at the scenario's learning rate. The published
  schedule (:data:`PUBLISHED_SCHEDULE`: SGD, first task 200 epochs, lr 0.1, milestones
  60/120/170, wd 5e-4; later 170 epochs, 80/120/150, wd 2e-4) is documented, not
  applied; ``first_epochs`` / ``later_epochs`` can set the epochs.
* Augmentation (``augment``) is a batched random crop + horizontal flip of each training
  batch of images, on the normalised input, zero padded by ``max(1, round(4 * H / 32))``
  pixels (the CIFAR 4 at 32 px, 1 on 8x8 digits), drawn from the plugin's own generator.
* The aux head stays on the plugin (charged there, as ``memo.aux_head``) until the next
  task replaces it.
* Weight alignment scales weights only, not biases (as the published code).
* The head keeps rows for seen classes only; other label ids are masked logits.
* The budget counts every plugin of the strategy, except with ``parameters_only`` (the
  paper's arithmetic: G and S only).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from clsim_plugins.buffers import ExemplarBuffer, herding_order, label_dtype
from torch import nn

from clsim.augment import crop_flip
from clsim.capacity import Beside, announce, held_beside, items_that_fit
from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.loop_types import ExperiencePlan, ForwardOutput
from clsim.memory import measure
from clsim.models.heads import MASK_VALUE, active_outputs, target_head
from clsim.stream import Experience

PUBLISHED_SCHEDULE: dict[str, dict[str, Any]] = {
    "first_task": {"epochs": 200, "lr": 0.1, "milestones": [60, 120, 170], "weight_decay": 5e-4},
    "later_tasks": {"epochs": 170, "lr": 0.1, "milestones": [80, 120, 150], "weight_decay": 2e-4},
    "common": {"optimizer": "sgd", "momentum": 0.9, "batch_size": 128, "lr_decay": 0.1},
}
"""MEMO's CIFAR-100 schedule (METHODS.md); for reference, the scenario drives training."""

RESNET32_PARAMETERS = 463_504
RESNET32_SHARED_PARAMETERS = 112_016
RESNET32_BLOCK_PARAMETERS = 351_488
CIFAR_SAMPLE_BYTES = 32 * 32 * 3


# ------------------------------------------------------------------------ arithmetic


def model_as_exemplars(n_parameters: int, sample_bytes: int, bytes_per_parameter: int = 4) -> int:
    """Whole exemplars a model's parameters are worth: ResNet-32 on CIFAR gives 603."""
    return n_parameters * bytes_per_parameter // sample_bytes


def memo_exemplar_arithmetic(
    budget_bytes: int,
    shared_parameters: int,
    block_parameters: int,
    n_blocks: int,
    sample_bytes: int,
    bytes_per_parameter: int = 4,
) -> int:
    """Exemplars left by G and ``n_blocks`` specialized blocks, the paper's way.

    ``(budget - 4 * (G + n * S)) // sample_bytes``; with one block this is a single
    backbone. Negative when the blocks alone exceed the budget.
    """
    model = bytes_per_parameter * (shared_parameters + n_blocks * block_parameters)
    return (budget_bytes - model) // sample_bytes


def memory_mb(n_parameters: int, n_exemplars: int, sample_bytes: int) -> float:
    """The paper's memory axis: (parameters x 4 + exemplars x sample bytes) / 2^20."""
    return (n_parameters * 4 + n_exemplars * sample_bytes) / 2**20


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters at their dtype (no buffers): the paper's count."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def align_weights(weight: torch.Tensor, n_old: int) -> float:
    """Weight alignment, in place: scale rows ``n_old:`` so their mean L2 norm equals
    that of rows ``:n_old``; returns the factor (1.0 when either group is empty)."""
    if n_old == 0 or n_old >= weight.shape[0]:
        return 1.0
    with torch.no_grad():
        norms = torch.linalg.vector_norm(weight, dim=1)
        gamma = norms[:n_old].mean() / norms[n_old:].mean()
        weight[n_old:] *= gamma
    return float(gamma)


# --------------------------------------------------------------------------- network


def split_backbone(features: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """``(G, S)``: S is the last parameter-holding child of ``features`` and all after it.

    For clsim's ResNets G = stem + stage1 + stage2 and S = stage3 + pool; for convnet2
    G = block1 and S = block2 + pool. Modules are shared, not copied; names are kept.
    """
    if not isinstance(features, nn.Sequential):
        raise ConfigError(
            "memo splits model.features into a shared and a per-task part, which needs an "
            f"nn.Sequential of layers; got {type(features).__name__} (use resnet, convnet2, "
            "small_cnn or mlp)"
        )
    children = list(features.named_children())
    weighted = [i for i, (_, m) in enumerate(children) if any(True for _ in m.parameters())]
    if not weighted:
        raise ConfigError(
            "memo: model.features has no layer with parameters to specialise per task "
            "(an mlp needs at least one hidden layer)"
        )
    cut = weighted[-1]
    return nn.Sequential(OrderedDict(children[:cut])), nn.Sequential(OrderedDict(children[cut:]))


class MemoFeatures(nn.Module):
    """G shared, one specialized block per task; output ``[S_1(G(x)); ...; S_t(G(x))]``,
    so the newest block's features are the last ``block_dim`` columns.

    All blocks but the newest are frozen and stay in eval mode whatever mode the model is
    put in.
    """

    def __init__(self, shared: nn.Module, block: nn.Module, block_dim: int) -> None:
        super().__init__()
        self.shared = shared
        self.blocks = nn.ModuleList([block])
        self.block_dim = int(block_dim)

    @property
    def out_dim(self) -> int:
        return self.block_dim * len(self.blocks)

    def add_block(self) -> nn.Module:
        """Freeze the newest block and append a trainable copy of it."""
        old = self.blocks[-1]
        new = copy.deepcopy(old)
        old.requires_grad_(False)
        old.eval()
        new.requires_grad_(True)
        new.train(self.training)
        self.blocks.append(new)
        return new

    def train(self, mode: bool = True) -> MemoFeatures:
        super().train(mode)
        for block in list(self.blocks)[:-1]:
            block.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.shared(x)
        return torch.cat([block(g) for block in self.blocks], dim=1)


def newest_block(features: torch.Tensor, block_dim: int) -> torch.Tensor:
    """The newest block's slice ``S_t(G(x))`` of MEMO's concatenated features."""
    return features[:, -block_dim:]


def augment_padding(sample_shape: tuple[int, ...]) -> int:
    """Zero padding of the random crop: the CIFAR 4 pixels at 32 px, scaled to the image
    height (1 on 8x8 digits); 0 for samples that are not images."""
    if len(sample_shape) != 3:
        return 0
    return max(1, round(4 * sample_shape[1] / 32))


class MemoHead(nn.Module):
    """A linear head over the seen classes (``classes``, in order) returning one logit
    per label id, ``MASK_VALUE`` for ids without a row."""

    classes: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        classes: Sequence[int] = (),
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        n = len(classes)
        self.weight = nn.Parameter(torch.empty(n, self.in_features, device=device))
        self.bias = nn.Parameter(torch.empty(n, device=device))
        if n:  # nn.Linear's initialisation
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.register_buffer(
            "classes", torch.tensor(list(classes), dtype=torch.long, device=device)
        )

    def grown(self, classes: Sequence[int], in_features: int) -> MemoHead:
        """A head over ``classes`` (the current ones first) and ``in_features`` inputs,
        with this head's weights copied into its old-class x old-feature block."""
        n_old, d_old = self.weight.shape
        if list(classes[:n_old]) != self.classes.tolist() or in_features < d_old:
            raise ValueError("a grown head must keep the old classes first and old features")
        head = MemoHead(in_features, self.out_features, classes, device=self.weight.device)
        with torch.no_grad():
            head.weight[:n_old, :d_old] = self.weight
            head.bias[:n_old] = self.bias
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight, self.bias)
        out = logits.new_full((x.shape[0], self.out_features), MASK_VALUE)
        return out.index_copy(1, self.classes, logits)


def _head_classes(model: nn.Module) -> list[int]:
    """The classes the head already scores, in order: a linear head's rows, or the
    outputs a fixed-target head has switched on (it holds every class's target from the
    start)."""
    head = model.head
    if isinstance(head, MemoHead):
        return head.classes.tolist()
    active = active_outputs(model)
    return [] if active is None else active.nonzero().squeeze(1).tolist()


# --------------------------------------------------------------------------- plugin


@dataclass
class MemoOptions:
    aux_weight: float = field(
        default=1.0, metadata={"min": 0.0, "help": "weight of the auxiliary loss (paper: 1.0)"}
    )
    weight_align: bool = field(
        default=True, metadata={"help": "align new-class head rows to old ones after a task"}
    )
    selection: Literal["herding", "random"] = field(
        default="herding", metadata={"help": "how exemplars are chosen (paper: herding)"}
    )
    capacity: int | None = field(
        default=None,
        metadata={"min": 1, "help": "exemplars stored; default: what the budget leaves"},
    )
    parameters_only: bool = field(
        default=False,
        metadata={"help": "size memory the paper's way: float parameters of G and S only"},
    )
    augment: bool = field(
        default=True, metadata={"help": "batched random crop + flip of image batches"}
    )
    first_epochs: int | None = field(
        default=None,
        metadata={"min": 1, "help": "epochs of the first task; default: scenario's (paper 200)"},
    )
    later_epochs: int | None = field(
        default=None,
        metadata={"min": 1, "help": "epochs of later tasks; default: scenario's (paper 170)"},
    )
    expected_tasks: int | None = field(
        default=None,
        metadata={"min": 1, "help": "fail at setup if the budget cannot hold this many blocks"},
    )


class MemoPlugin:
    """MEMO (Zhou et al., ICLR 2023): shared shallow layers, one deep block per task."""

    Options = MemoOptions

    def __init__(self, options: MemoOptions | None = None) -> None:
        self.options = options or MemoOptions()
        self.buffer: ExemplarBuffer | None = None
        self.generator: torch.Generator | None = None
        self.augment_generator: torch.Generator | None = None
        self.aux_head: nn.Linear | None = None  # on the newest block; trained, charged here
        self.aux_labels: torch.Tensor | None = None  # class id -> aux label (0 = old)
        self.n_tasks = 0  # tasks finished
        self.n_old = 0  # head rows that predate the current task

    # -- setup: rewire the model, size the memory ------------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        model = ctx.model
        head = getattr(model, "head", None)
        target = target_head(model)
        if not isinstance(getattr(model, "features", None), nn.Module) or (
            target is None and not isinstance(head, nn.Linear)
        ):
            raise ConfigError(
                "memo needs a clsim model with .features and a linear .head (or a head "
                f"scoring fixed class targets, such as language_head's); got a "
                f"{type(head).__name__} head"
            )
        shared, block = split_backbone(model.features)
        self.generator = ctx.torch_generator("memo")
        if self.options.augment and augment_padding(ctx.sample_shape):
            self.augment_generator = ctx.torch_generator("memo", "augment", device=ctx.device)
        model.features = MemoFeatures(shared, block, model.feature_dim)
        if target is not None:  # fixed targets: no class is switched on yet
            model.head = target.widened(
                model.feature_dim,
                generator=self.generator,
                active=torch.zeros(target.out_features, dtype=torch.bool),
            ).to(ctx.device)
        else:
            model.head = MemoHead(
                model.feature_dim, head.out_features, device=head.weight.device
            )
        self.aux_labels = torch.zeros(head.out_features, dtype=torch.long, device=ctx.device)
        ctx.log(
            "memo_split",
            shared_parameters=sum(p.numel() for p in shared.parameters()),
            block_parameters=sum(p.numel() for p in block.parameters()),
        )
        if self.options.capacity is None and ctx.budget_bytes is None:
            raise ConfigError(
                "memo needs 'capacity' or a budget for the strategy "
                "(e.g. budget: '10 models + 2000 exemplars')"
            )
        if self.options.capacity is not None:  # a fixed store is in place before another
            self._set_capacity(ctx, self.options.capacity)  # plugin sizes from the budget

    def clsim_size_stores(self, ctx: RunContext) -> None:
        """The exemplar memory for G + S_1, beside the whole strategy; fail at once if the
        budget cannot hold ``expected_tasks`` blocks."""
        self._check_expected_tasks(ctx)
        self._resize_memory(ctx, "at setup")

    # -- experience boundaries: expand, grow the heads ---------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        if not experience.classes:
            raise ConfigError(
                "memo adds a block per task and herds exemplars at its end; it needs visible "
                "experience boundaries (class_incremental streams)"
            )
        features, head = ctx.model.features, ctx.model.head
        target = target_head(ctx.model)
        if not isinstance(features, MemoFeatures) or (
            target is None and not isinstance(head, MemoHead)
        ):
            raise ConfigError("memo: another plugin replaced model.features or model.head")
        if self.n_tasks > 0:
            features.add_block()
        old = _head_classes(ctx.model)
        known = set(old)
        new = [c for c in ctx.seen_classes if c not in known]
        if target is not None:  # widen the projection, switch the new classes on
            grown = target.widened(features.out_dim, generator=self.generator)
            grown.expose(torch.tensor(new, dtype=torch.long))
        else:
            grown = head.grown(old + new, features.out_dim)
        self.n_old = len(old)
        self.aux_labels.zero_()
        self.aux_head = None
        if self.n_tasks > 0:
            self.aux_head = nn.Linear(features.block_dim, len(new) + 1).to(ctx.device)
            index = torch.tensor(new, dtype=torch.long, device=self.aux_labels.device)
            self.aux_labels[index] = torch.arange(1, len(new) + 1, device=index.device)
        ctx.model.head = grown
        ctx.model.feature_dim = features.out_dim
        self._resize_memory(ctx, f"for experience {experience.index}")
        ctx.log(
            "memo_expand",
            experience=experience.index,
            blocks=len(features.blocks),
            classes=len(old) + len(new),
            exemplar_capacity=self.buffer.capacity,
        )

    # -- training: the task's data with the exemplars, plus the aux loss --------

    def clsim_plan_experience(
        self, ctx: RunContext, experience: Experience, plan: ExperiencePlan
    ) -> ExperiencePlan:
        """Train on the task's samples followed by the stored exemplars (the union, as in
        iCaRL / PyCIL), for the first or later tasks' epochs when set."""
        if self.buffer is not None and len(self.buffer):
            plan = plan.extended(*self.buffer.stored())
        epochs = self.options.first_epochs if self.n_tasks == 0 else self.options.later_epochs
        return plan if epochs is None else replace(plan, epochs=epochs)

    def clsim_trainable(self, ctx: RunContext) -> nn.Module | None:
        """The aux head, trained by the scenario's optimizer beside the model."""
        return self.aux_head

    def clsim_inputs(self, ctx: RunContext, inputs: torch.Tensor) -> torch.Tensor | None:
        """Random crop + horizontal flip of a training batch of images (``augment``)."""
        if self.augment_generator is None or inputs.dim() != 4:
            return None
        padding = augment_padding(ctx.sample_shape)
        return crop_flip(inputs, self.augment_generator, padding=padding)

    def clsim_loss(self, ctx: RunContext, output: ForwardOutput) -> torch.Tensor | None:
        """``aux_weight`` x CE of the aux head on the newest block's features, with the
        old classes collapsed to label 0."""
        if self.aux_head is None or self.options.aux_weight == 0 or output.features is None:
            return None
        newest = newest_block(output.features, ctx.model.features.block_dim)
        targets = self.aux_labels[output.targets.to(self.aux_labels.device)]
        return self.options.aux_weight * F.cross_entropy(self.aux_head(newest), targets)

    # -- after the task: align, select exemplars --------------------------------

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if self.n_tasks > 0 and self.options.weight_align:
            if target_head(ctx.model) is not None:
                # a fixed-target head's rows are its class targets: nothing to rescale
                ctx.log("memo_weight_align", experience=experience.index, gamma=None,
                        skipped="the head scores fixed class targets")
            else:
                gamma = align_weights(ctx.model.head.weight.data, self.n_old)
                ctx.log("memo_weight_align", experience=experience.index, gamma=gamma)
        self._select_exemplars(ctx, experience)
        self.n_tasks += 1
        ctx.log("memo_memory", experience=experience.index, **self.memory_parts(ctx))

    def _select_exemplars(self, ctx: RunContext, experience: Experience) -> None:
        """An even share per seen class: new classes herded (or drawn), old ones keep a
        prefix of what they had."""
        per_class = self.buffer.capacity // len(ctx.seen_classes)
        old_x, old_y = self.buffer.stored()
        keep_x, keep_y = [], []
        for c in ctx.seen_classes:
            samples = experience.train_x[experience.train_y == c]
            if c in experience.classes and len(samples):
                if self.options.selection == "herding":
                    with ctx.compute_part("herding"):  # charged as memo.herding
                        order = herding_order(ctx.features(samples), per_class).cpu()
                else:
                    order = torch.randperm(len(samples), generator=self.generator)[:per_class]
                picked = samples[order]
            else:  # stored in selection order already: shrinking keeps the prefix
                picked = old_x[old_y == c][:per_class]
            keep_x.append(picked)
            keep_y.append(torch.full((len(picked),), c, dtype=torch.long))
        self.buffer.replace_all(torch.cat(keep_x), torch.cat(keep_y))

    # -- memory: what the budget leaves for exemplars ----------------------------

    def _per_sample_bytes(self, ctx: RunContext) -> int:
        if self.options.parameters_only:
            return ctx.sample_bytes
        label = torch.empty((), dtype=label_dtype(ctx.n_classes)).element_size()
        return ctx.sample_bytes + label

    def model_overhead_bytes(self, ctx: RunContext) -> int:
        """What the budget must hold before exemplars (:meth:`beside_exemplars`), in bytes."""
        return self.beside_exemplars(ctx).total_bytes

    def beside_exemplars(self, ctx: RunContext) -> Beside:
        """What the budget must hold before exemplars: the paper's G + S parameter bytes
        (``parameters_only``), else the ledger's model and the state of every plugin of the
        strategy (this one's aux head included, its exemplar store empty), and the
        optimizer state the loop carries through an online experience for the model."""
        if self.options.parameters_only:
            features = ctx.model.features
            paper = parameter_bytes(features.shared) + parameter_bytes(features.blocks)
            return Beside({}, ctx.name_of(self) or "memo",
                          {"the float parameters of G and S (parameters_only)": paper})
        empty = ExemplarBuffer(0, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes,
                               self.generator)
        return held_beside(ctx, "memo", self, "buffer", empty,
                           loop_state=ctx.loop_state_bytes())

    def _resize_memory(self, ctx: RunContext, when: str) -> None:
        """Size the exemplar memory for the model as it is now, or fail naming the minimum."""
        n_needed = max(1, len(ctx.seen_classes))  # herding gives every seen class one
        asked = self.options.capacity
        if asked is not None and asked < n_needed:
            raise ConfigError(
                f"memo: a capacity of {asked} exemplars cannot give each of the "
                f"{n_needed} seen classes one {when}; raise 'capacity'"
            )
        if ctx.budget_bytes is None:
            if asked is None:
                raise ConfigError(
                    "memo needs 'capacity' or a budget for the strategy "
                    "(e.g. budget: '10 models + 2000 exemplars')"
                )
            self._set_capacity(ctx, asked)
            return
        blocks = f"G and {len(ctx.model.features.blocks)} specialized block(s) {when}"
        beside = self.beside_exemplars(ctx)
        fit = items_that_fit(
            ctx.budget_bytes,
            beside.total_bytes if self.options.parameters_only else beside,
            self._per_sample_bytes(ctx),
            plugin="memo",
            items=f"exemplars (the {asked} asked for)" if asked is not None
            else "exemplars (one per seen class)",
            at_least=max(n_needed, asked or 0),
            overhead=f"the float parameters of {blocks} (parameters_only)"
            if self.options.parameters_only
            else f"{blocks}, the heads, the plugins' state and the loop's optimizer state",
        )
        if asked is None:
            announce(ctx, "buffer", fit, self._per_sample_bytes(ctx), beside,
                     stored="exemplars", when=when)
        self._set_capacity(ctx, fit if asked is None else asked)

    def _set_capacity(self, ctx: RunContext, capacity: int) -> None:
        """A buffer of ``capacity``, keeping a prefix of each class's stored exemplars."""
        old = self.buffer
        if old is not None and old.capacity == capacity:
            return
        new = ExemplarBuffer(
            capacity, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes, self.generator
        )
        if old is not None and len(old):
            x, y = old.stored()
            classes = list(dict.fromkeys(y.tolist()))
            per_class = capacity // len(classes)
            keep = torch.cat([(y == c).nonzero().squeeze(1)[:per_class] for c in classes])
            new.replace_all(x[keep], y[keep])
        self.buffer = new

    def _check_expected_tasks(self, ctx: RunContext) -> None:
        n = self.options.expected_tasks
        if n is None or ctx.budget_bytes is None:
            return
        block = ctx.model.features.blocks[0]
        block_bytes = (
            parameter_bytes(block) if self.options.parameters_only else measure(block).total_bytes
        )
        minimum = (
            self.model_overhead_bytes(ctx) + (n - 1) * block_bytes + self._per_sample_bytes(ctx)
        )
        if minimum > ctx.budget_bytes:
            raise ConfigError(
                f"memo: a budget of {ctx.budget_bytes} bytes cannot hold G and the {n} "
                f"specialized blocks of expected_tasks={n} ({block_bytes} bytes each) and one "
                f"exemplar; the minimum budget is at least {minimum} bytes"
            )

    def memory_parts(self, ctx: RunContext) -> dict[str, int]:
        """Ledger bytes of G, each S_i, the head, the aux head and the exemplars."""
        features, head = ctx.model.features, ctx.model.head
        parts = {"shared": measure(features.shared).total_bytes}
        for i, block in enumerate(features.blocks):
            parts[f"block_{i}"] = measure(block).total_bytes
        parts["aux_head"] = 0 if self.aux_head is None else measure(self.aux_head).total_bytes
        parts["head"] = measure(head).total_bytes
        parts["exemplars"] = (
            self.buffer.x.untyped_storage().nbytes() + self.buffer.y.untyped_storage().nbytes()
        )
        return parts
