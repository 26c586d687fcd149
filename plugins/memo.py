"""MEMO: a memory-efficient expandable model for class-incremental learning.

Zhou, Wang, Ye and Zhan, "A Model or 603 Exemplars: Towards Memory-Efficient
Class-Incremental Learning", ICLR 2023 (METHODS.md section 2). Shallow layers change
little between tasks and deep ones specialise, so MEMO shares a *generalized* part G and
gives each task t only a new *specialized* deep block S_t; the memory an expanding method
saves by not copying G goes to exemplars. Models and exemplars are counted in one unit.

The network (the plugin rewires ``ctx.model`` at setup, so the engine's loop, evaluation
and ``ctx.features`` keep working on it):

* ``model.features`` becomes :class:`MemoFeatures`: G, then ``[S_1(G(x)); ...; S_t(G(x))]``.
  At task t >= 1, S_t starts as a copy of S_{t-1}; every older S_i is frozen
  (``requires_grad`` off and kept in eval mode, so its BatchNorm statistics stay put even
  while the model trains). G keeps training, as in the published runs; the gradient of
  the old blocks' features reaches G through the frozen blocks, as in the published code.
* ``model.head`` becomes :class:`MemoHead`: one linear layer over the seen classes and
  all blocks' features. It grows each task: old weights are copied into the old-class x
  old-feature block, the rest is a fresh ``nn.Linear`` initialisation. It still returns
  one logit per label id; unseen classes get :data:`clsim.models.heads.MASK_VALUE`.
* ``model.features.aux``: the auxiliary head on S_t alone, (new classes + 1) outputs,
  old classes collapsed to label 0. Loss: CE(head) + ``aux_weight`` x CE(aux).
* After each task t >= 1, weight alignment scales the new-class rows of the head by
  mean norm of old rows / mean norm of new rows.
* With ``language_head`` (LingoCL, listed in the same strategy; it runs first) the head
  is its :class:`clsim.models.heads.SemanticHead` instead: cosine logits against frozen
  class-name targets. MEMO grows it the same way: each task widens the projection to the
  new feature width, the trained projection copied into the old input columns, and
  switches on the task's classes (unseen ones stay masked). The targets never change,
  so weight alignment has nothing to align and is skipped (logged as such).
* Exemplars: herding (iCaRL) on the concatenated features, an even share per seen class,
  trained on together with the task's data (the union, as in iCaRL / PyCIL).

How backbones are split (:func:`split_backbone`): S is the last child of the
``features`` Sequential that holds parameters, and everything after it; G is everything
before. That gives the paper's split for the CIFAR ResNets (G = stem + stage 1 + stage 2,
S = stage 3 + pooling: 112,016 + 351,488 parameters for ResNet-32) and for MEMO's
``convnet2`` (G = ``block1``, S = ``block2`` + pooling); for ``small_cnn`` S is the last
conv block, for ``mlp`` the last hidden layer (the only one with ``hidden: [h]``: G is then
the flattening, and MEMO degenerates to one small network per task).

Memory. Unless ``capacity`` is given, the exemplar capacity is what the budget leaves
after the model as it is for the current task (G, every S_i, the grown head and the aux
head) and the plugin's bookkeeping, divided by the bytes of one stored sample and its
label; it is computed at setup and again after every expansion, and the stored exemplars
shrink to it (old classes keep a prefix of their herding order). A budget that cannot
hold one exemplar per seen class next to the blocks is a ConfigError naming the minimum.

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

* Training uses the scenario's ``training`` section (optimizer, lr, batch size, epochs).
  The published schedule (:data:`PUBLISHED_SCHEDULE`: SGD, first task 200 epochs,
  lr 0.1, milestones 60/120/170, wd 5e-4; later 170 epochs, 80/120/150, wd 2e-4) is
  documented, not applied; ``first_epochs`` / ``later_epochs`` can set the epochs.
* Augmentation (``augment``) is a batched random crop + horizontal flip inside
  ``MemoFeatures.forward`` in training mode, on the normalised input, zero padded by
  ``max(1, round(4 * H / 32))`` pixels (the CIFAR 4 at 32 px, 1 on 8x8 digits).
* The aux head stays in the model (on ``model.features``, trained by the same optimizer,
  charged) until the next task replaces it.
  Weight alignment scales weights only, not biases (as the published code).
* The head keeps rows for seen classes only; other label ids are masked logits.
* The budget check counts this plugin's own state, not other plugins of the strategy.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from clsim_plugins.buffers import ExemplarBuffer, herding_order, label_dtype
from torch import nn

from clsim.augment import crop_flip
from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.memory import measure
from clsim.models.heads import MASK_VALUE, SemanticHead
from clsim.stream import Batch, Experience

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
    """G shared, one specialized block per task; output ``[S_1(G(x)); ...; S_t(G(x))]``.

    All blocks but the newest are frozen and stay in eval mode whatever mode the model is
    put in. In training mode with gradients on, the newest block's output of the last
    forward is kept in ``newest`` for the aux loss (the plugin clears it right away).
    """

    def __init__(
        self,
        shared: nn.Module,
        block: nn.Module,
        block_dim: int,
        augment_padding: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.shared = shared
        self.blocks = nn.ModuleList([block])
        self.block_dim = int(block_dim)
        self.augment_padding = int(augment_padding)
        self.generator = generator
        self.newest: torch.Tensor | None = None
        self.aux: nn.Linear | None = None  # the auxiliary head on the newest block

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
        training = self.training and torch.is_grad_enabled()
        if training and self.augment_padding > 0 and self.generator is not None and x.dim() == 4:
            x = crop_flip(x, self.generator, padding=self.augment_padding)
        g = self.shared(x)
        outs = [block(g) for block in self.blocks]
        self.newest = outs[-1] if training else None
        return torch.cat(outs, dim=1)


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


def _head_classes(head: MemoHead | SemanticHead) -> list[int]:
    """The classes a head already has, in order: a linear head's rows, or the outputs a
    semantic head has switched on (its targets exist for every class from the start)."""
    if isinstance(head, SemanticHead):
        return head.active.nonzero().squeeze(1).tolist()
    return head.classes.tolist()


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
        self.aux_labels: torch.Tensor | None = None  # class id -> aux label (0 = old)
        self.n_tasks = 0  # tasks finished
        self.n_old = 0  # head rows that predate the current task

    # -- setup: rewire the model, size the memory ------------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        model = ctx.model
        head = getattr(model, "head", None)
        if not isinstance(getattr(model, "features", None), nn.Module) or not isinstance(
            head, nn.Linear | SemanticHead
        ):
            raise ConfigError(
                "memo needs a clsim model with .features and a linear .head (or the "
                f"language_head's semantic head); got a {type(head).__name__} head"
            )
        shared, block = split_backbone(model.features)
        self.generator = ctx.torch_generator("memo")
        padding = 0
        if self.options.augment and len(ctx.sample_shape) == 3:
            padding = max(1, round(4 * ctx.sample_shape[1] / 32))
        model.features = MemoFeatures(
            shared,
            block,
            model.feature_dim,
            padding,
            ctx.torch_generator("memo", "augment", device=ctx.device),
        )
        if isinstance(head, SemanticHead):  # language-guided: no class is active yet
            model.head = head.widened(
                model.feature_dim,
                generator=self.generator,
                active=torch.zeros(head.out_features, dtype=torch.bool),
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
        self._check_expected_tasks(ctx)
        self._resize_memory(ctx, "at setup")

    def _per_sample_bytes(self, ctx: RunContext) -> int:
        if self.options.parameters_only:
            return ctx.sample_bytes
        label = torch.empty((), dtype=label_dtype(ctx.n_classes)).element_size()
        return ctx.sample_bytes + label

    def model_overhead_bytes(self, ctx: RunContext) -> int:
        """What the budget must hold before exemplars: the paper's G + S parameter bytes
        (``parameters_only``), else the ledger's model and plugin state with no exemplar."""
        if self.options.parameters_only:
            features = ctx.model.features  # G and the blocks: not the aux head
            return parameter_bytes(features.shared) + parameter_bytes(features.blocks)
        kept = self.buffer
        self.buffer = ExemplarBuffer(
            0, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes, self.generator
        )
        try:
            return measure(ctx.model, [("memo", self)]).total_bytes
        finally:
            self.buffer = kept

    def capacity_for(self, ctx: RunContext) -> int:
        """Exemplars the budget leaves next to the model as it is now (may be < 1)."""
        if ctx.budget_bytes is None:
            raise ConfigError(
                "memo needs 'capacity' or a budget for the strategy "
                "(e.g. budget: '10 models + 2000 exemplars')"
            )
        return (ctx.budget_bytes - self.model_overhead_bytes(ctx)) // self._per_sample_bytes(ctx)

    def _resize_memory(self, ctx: RunContext, when: str) -> None:
        """Size the exemplar memory for the model as it is now, or fail naming the minimum."""
        n_needed = max(1, len(ctx.seen_classes))  # herding gives every seen class one
        capacity = self.options.capacity
        if capacity is not None and capacity < n_needed:
            raise ConfigError(
                f"memo: a capacity of {capacity} exemplars cannot give each of the "
                f"{n_needed} seen classes one {when}; raise 'capacity'"
            )
        if ctx.budget_bytes is None:
            if capacity is None:
                self.capacity_for(ctx)  # raises: neither a capacity nor a budget
            self._set_capacity(ctx, int(capacity))
            return
        per_sample = self._per_sample_bytes(ctx)
        overhead = self.model_overhead_bytes(ctx)
        if capacity is None:
            capacity = (ctx.budget_bytes - overhead) // per_sample
        minimum = overhead + max(n_needed, self.options.capacity or 0) * per_sample
        if minimum > ctx.budget_bytes:
            stored = "the exemplars asked for" if self.options.capacity else "one exemplar per"
            if not self.options.capacity:
                stored += f" seen class ({n_needed})"
            raise ConfigError(
                f"memo: a budget of {ctx.budget_bytes} bytes cannot hold G and "
                f"{len(ctx.model.features.blocks)} specialized block(s) {when}: the model and "
                f"the plugin's bookkeeping take {overhead} bytes and {stored} "
                f"{minimum - overhead} bytes; the minimum budget is {minimum} bytes"
            )
        self._set_capacity(ctx, int(capacity))

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

    # -- experience boundaries: expand, grow the heads ---------------------------

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        if not experience.classes:
            raise ConfigError(
                "memo adds a block per task and herds exemplars at its end; it needs visible "
                "experience boundaries (class_incremental streams)"
            )
        features, head = ctx.model.features, ctx.model.head
        if not isinstance(features, MemoFeatures) or not isinstance(head, MemoHead | SemanticHead):
            raise ConfigError("memo: another plugin replaced model.features or model.head")
        if self.n_tasks > 0:
            features.add_block()
        old = _head_classes(head)
        known = set(old)
        new = [c for c in ctx.seen_classes if c not in known]
        if isinstance(head, SemanticHead):  # widen the projection, switch the new classes on
            grown = head.widened(features.out_dim, generator=self.generator)
            grown.expose(torch.tensor(new, dtype=torch.long))
        else:
            grown = head.grown(old + new, features.out_dim)
        self.n_old = len(old)
        self.aux_labels.zero_()
        features.aux = None
        if self.n_tasks > 0:
            features.aux = nn.Linear(features.block_dim, len(new) + 1).to(ctx.device)
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

    def clsim_train_experience(self, ctx: RunContext, experience: Experience) -> Any:
        x, y = experience.train_x, experience.train_y
        if self.buffer is not None and len(self.buffer):
            mem_x, mem_y = self.buffer.stored()
            x = torch.cat([x, mem_x.to(x.device)])
            y = torch.cat([y, mem_y.to(y.device)])
        epochs = self.options.first_epochs if self.n_tasks == 0 else self.options.later_epochs
        ctx.fit(x, y, epochs=epochs or ctx.epochs)  # ctx.epochs: the scenario's (1 online)
        return True

    def clsim_loss(self, ctx: RunContext, batch: Batch, logits: torch.Tensor) -> Any:
        features = ctx.model.features
        newest, features.newest = features.newest, None
        if (
            newest is None
            or features.aux is None
            or self.options.aux_weight == 0
            or newest.shape[0] != len(batch)
        ):
            return None
        targets = self.aux_labels[batch.y.to(self.aux_labels.device)]
        return self.options.aux_weight * F.cross_entropy(features.aux(newest), targets)

    # -- after the task: align, select exemplars --------------------------------

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        ctx.model.features.newest = None
        head = ctx.model.head
        if self.n_tasks > 0 and self.options.weight_align:
            if isinstance(head, SemanticHead):  # nothing to align: rows are unit targets
                ctx.log("memo_weight_align", experience=experience.index, gamma=None,
                        skipped="cosine logits against frozen unit-norm targets")
            else:
                gamma = align_weights(head.weight.data, self.n_old)
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
                    order = herding_order(ctx.features(samples), per_class).cpu()
                else:
                    order = torch.randperm(len(samples), generator=self.generator)[:per_class]
                picked = samples[order]
            else:  # stored in selection order already: shrinking keeps the prefix
                picked = old_x[old_y == c][:per_class]
            keep_x.append(picked)
            keep_y.append(torch.full((len(picked),), c, dtype=torch.long))
        self.buffer.replace_all(torch.cat(keep_x), torch.cat(keep_y))

    def memory_parts(self, ctx: RunContext) -> dict[str, int]:
        """Ledger bytes of G, each S_i, the head, the aux head and the exemplars."""
        features, head = ctx.model.features, ctx.model.head
        parts = {"shared": measure(features.shared).total_bytes}
        for i, block in enumerate(features.blocks):
            parts[f"block_{i}"] = measure(block).total_bytes
        parts["aux_head"] = 0 if features.aux is None else measure(features.aux).total_bytes
        parts["head"] = measure(head).total_bytes
        parts["exemplars"] = (
            self.buffer.x.untyped_storage().nbytes() + self.buffer.y.untyped_storage().nbytes()
        )
        return parts
