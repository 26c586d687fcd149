"""PL-FMS: hierarchy-aware pseudo-labelling and flexible memory sampling (HLE).

Lee, Jung, Choi and Chun, "Online Continual Learning on Hierarchical Label Expansion",
ICCV 2023 (arXiv:2308.14374). METHODS.md section 5.

An online rehearsal method for streams whose labels expand from coarse to fine. It is
experience replay (ER) with the engine's per-level cross-entropy (one softmax per level
of the :class:`~clsim.labels.LabelSpace`), plus three parts:

* **Memory management**: a fixed-capacity memory kept class-balanced; when it is full,
  an incoming sample evicts, from the class holding the most samples (the incoming one
  counted), the stored sample with the lowest *importance*, an exponential moving average
  of how much that sample's loss falls when the model is trained on it.
* **Flexible memory sampling (FMS)**: a stream sample of class ``c`` joins the training
  batch with probability ``min(1, (n - n_c) / (N / |C_seen|))``, with ``n`` its stream
  position, ``n_c`` the position of the first sample of ``c``, ``N`` the stream length and
  ``|C_seen|`` the number of labels seen so far; memory samples fill the rest of the batch,
  so a class that has just appeared is learnt mostly through the (balanced) memory.
* **Hierarchy-aware pseudo-labelling (PL)**: a sample labelled at level ``h`` gets a label
  at every other level: at coarser levels its ancestors, known exactly from the hierarchy;
  at each finer level the argmax of the model's logits over the (seen) children of its
  label one level up. Pseudo-labels are extra targets (a cross-entropy term per level) and
  decide which class a stored sample counts for when the memory is balanced.

The memory is filled and managed by this plugin; the training loop is the engine's. Per
stream batch of ``B`` samples (``clsim_before_batch``): every stream sample is offered to
the memory, then FMS keeps ``k`` of them and ``B + batch_size_mem - k`` memory samples are
drawn uniformly (never a sample admitted in the same step) to fill the batch, stream rows
first. The engine's task loss is the per-level cross-entropy on every row's own label;
``clsim_loss`` adds ``pseudo_weight`` times the cross-entropy at every other level that
has a target, summed over levels and averaged over the batch's rows.

**Memory** (charged by the ledger): the raw samples at their storage dtype (uint8 images),
one label per level (the narrowest integer type that holds every flat id plus an
"unknown" marker), the level of each sample's true label (uint8), its importance
(float32), the count of stored samples, and three small counters of the stream (each
label's first position, samples seen, the estimate of ``N``). Unless ``capacity`` is
given, the memory holds what the budget leaves after the whole strategy once every plugin
has set up (the model, this bookkeeping, any other plugin's state, the loop's optimizer
state), divided by the bytes of one stored sample with its labels, level and importance.

**Reconstructed** (the paper fixes the ideas; these details are this implementation's):

- *Importance*: each time a stored sample is replayed, its loss (the per-level
  cross-entropy on its stored labels: weight 1 at its own level, ``pseudo_weight`` at the
  others) is computed in eval mode without gradients just before the batch's update step
  and again just after it; importance <- ``importance_decay`` * importance +
  (1 - ``importance_decay``) * (loss before - loss after). A sample entering the memory
  starts at the mean importance of the stored samples of its class (of the whole memory
  when its class has none; 0 when the memory is empty), so it is never its class's least
  important sample and always enters; ties are broken by the lowest class id and the
  lowest memory slot.
- *Balancing key*: a stored sample counts for its finest known label, true or pseudo;
  pseudo-labels of a stored sample are refreshed from the training forward pass each time
  it is replayed (a stored sample that was never replayed counts for its true label).
- *Order*: the memory is updated before the batch is formed (ER updates after), so a
  sample that FMS keeps out of the batch is still stored and can be replayed.
- *N and |C_seen|*: ``|C_seen|`` counts labels of every level seen by the plugin,
  including the sample's own. ``N`` is ``stream_length`` when given; else, with visible
  boundaries, the stream position at which the current experience ends (the samples
  delivered so far plus the current experience's, the most the plugin can know without
  seeing the future); with hidden boundaries, the samples seen so far (``n + 1``).
- *Pseudo-labels as targets*: hard argmax labels (no confidence threshold), recomputed
  from the detached logits of the same forward pass; a target whose output is not yet
  active (its class unseen) is skipped, as is a finer level with no seen child.
- *Defaults*: ``importance_decay`` 0.9 and ``pseudo_weight`` 1.0 are not published
  values; the memory batch size defaults to the stream batch size as in ER.

``flexible_sampling``, ``importance`` and ``pseudo_labels`` switch the three parts off one
by one for ablations; with all three off this is ER with a class-balanced memory that
evicts a random sample of the largest class, updated before the batch. ``clsim_report``
writes the memory's composition and FMS's admission rate to ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from clsim_plugins.buffers import label_dtype

from clsim.capacity import size_store
from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.labels import LabelSpace
from clsim.loop_types import ForwardOutput
from clsim.models.heads import active_outputs, expose_labels
from clsim.stream import Batch, Experience


@dataclass
class PlFmsOptions:
    """Options of the pl_fms plugin (published where the paper gives a value)."""

    capacity: int | None = field(
        default=None,
        metadata={"min": 1, "help": "samples stored; default: what the budget leaves after "
                  "the model"},
    )
    batch_size_mem: int | None = field(
        default=None,
        metadata={"min": 1, "help": "memory rows per batch when every stream sample is "
                  "admitted; a batch holds stream batch + this many rows; default: the "
                  "stream batch size (as ER)"},
    )
    flexible_sampling: bool = field(
        default=True,
        metadata={"help": "admit a stream sample with probability min(1, (n - n_c) / "
                  "(N / |C_seen|)); false: admit every one (ablation)"},
    )
    stream_length: int | None = field(
        default=None,
        metadata={"min": 1, "help": "N of flexible sampling; default: the end of the current "
                  "experience (visible boundaries) or the samples seen so far (hidden)"},
    )
    importance: bool = field(
        default=True,
        metadata={"help": "evict the least important sample of the largest class; false: a "
                  "random one (ablation)"},
    )
    importance_decay: float = field(
        default=0.9,
        metadata={"min": 0, "max": 1, "help": "EMA decay of a sample's importance (its "
                  "loss decrease per update step)"},
    )
    pseudo_labels: bool = field(
        default=True,
        metadata={"help": "hierarchy-aware pseudo-labels as extra targets and balancing "
                  "keys; false: true labels only (ablation)"},
    )
    pseudo_weight: float = field(
        default=1.0,
        metadata={"min": 0, "help": "weight of the cross-entropy on pseudo-labels"},
    )


# ---------------------------------------------------------------------------
# the hierarchy: pseudo-labels and per-level losses
# ---------------------------------------------------------------------------


def parents_of(labels: LabelSpace) -> torch.Tensor:
    """``(n_classes,)`` int64: the flat id of every flat id's parent, -1 at the top level."""
    table = torch.tensor(labels.ancestors()[: labels.n_classes])
    level = torch.tensor(labels.level_of())
    parent = table[torch.arange(labels.n_classes), (level - 1).clamp(min=0)]
    return torch.where(level > 0, parent, torch.full_like(parent, -1))


def hierarchy_targets(
    labels: LabelSpace, y: torch.Tensor, logits: torch.Tensor, active: torch.Tensor | None
) -> torch.Tensor:
    """A label at every level for samples labelled ``y``: ``(B, n_levels)`` flat ids, -1
    where there is none.

    Coarser levels get the ancestors of ``y`` (exact, from the hierarchy), ``y``'s own
    level gets ``y``; each finer level gets the argmax of ``logits`` over the active
    children of the label one level up, or -1 when none of them is active.
    """
    device = logits.device
    y = y.to(device, torch.long)
    targets = torch.tensor(labels.ancestors(), device=device)[y]
    if labels.n_levels == 1:
        return targets
    parent = parents_of(labels).to(device)
    on = torch.ones(labels.n_classes, dtype=torch.bool, device=device) if active is None \
        else active.to(device)
    for level in range(1, labels.n_levels):
        above = targets[:, level - 1]
        todo = (targets[:, level] < 0) & (above >= 0)
        if not bool(todo.any()):
            continue
        children = (parent.unsqueeze(0) == above.unsqueeze(1)) & on.unsqueeze(0)
        guess = logits.detach().masked_fill(~children, float("-inf")).argmax(dim=1)
        targets[:, level] = torch.where(todo & children.any(dim=1), guess, targets[:, level])
    return targets


def level_losses(labels: LabelSpace, logits: torch.Tensor, targets: torch.Tensor,
                 active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy within each level against ``targets`` ``(B, n_levels)``: the losses
    ``(B, n_levels)`` and the mask of those that count (a target, and its output active)."""
    log_probs = torch.cat([F.log_softmax(logits[:, labels.level_slice(level)], dim=1)
                           for level in range(labels.n_levels)], dim=1)
    valid = targets >= 0
    if active is not None:
        valid &= active.to(logits.device)[targets.clamp(min=0)]
    losses = -log_probs.gather(1, targets.clamp(min=0))
    return losses.masked_fill(~valid, 0.0), valid


def fms_probability(position: int, first: int, n_seen: int, length: float) -> float:
    """FMS's admission probability min(1, (n - n_c) / (N / |C_seen|))."""
    return min(1.0, (position - first) * n_seen / length)


# ---------------------------------------------------------------------------
# the memory
# ---------------------------------------------------------------------------


class HierarchyMemory:
    """A fixed-capacity store of raw samples with a label per level, class-balanced.

    Rows ``[:size]`` are stored samples. ``labels[i, l]`` is sample ``i``'s flat id at level
    ``l`` (``UNKNOWN``, the dtype's largest value, where it has none), ``level[i]`` the
    level of its true label and ``importance[i]`` its importance score. Everything is a
    tensor allocated once at full capacity, so the ledger sees the real, constant cost.
    """

    def __init__(self, capacity: int, sample_shape: tuple[int, ...], sample_dtype: torch.dtype,
                 n_classes: int, n_levels: int) -> None:
        dtype = label_dtype(n_classes + 1)  # one value more than the ids: "unknown"
        self.x = torch.zeros((capacity, *sample_shape), dtype=sample_dtype)
        self.labels = torch.full((capacity, n_levels), torch.iinfo(dtype).max, dtype=dtype)
        self.level = torch.zeros(capacity, dtype=torch.uint8)
        self.importance = torch.zeros(capacity, dtype=torch.float32)
        self.stored = torch.zeros((), dtype=torch.int64)

    @property
    def capacity(self) -> int:
        return int(self.x.shape[0])

    @property
    def size(self) -> int:
        return int(self.stored)

    def __len__(self) -> int:
        return self.size

    def label_rows(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """``(k, n_levels)`` int64 labels of ``slots`` (all stored when None), -1 = none."""
        rows = self.labels[: self.size] if slots is None else self.labels[slots]
        rows = rows.long()
        return rows.masked_fill(rows == torch.iinfo(self.labels.dtype).max, -1)

    def set_label_rows(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        unknown = torch.iinfo(self.labels.dtype).max
        self.labels[slots] = rows.cpu().masked_fill(rows.cpu() < 0, unknown).to(self.labels.dtype)

    def true_labels(self, slots: torch.Tensor) -> torch.Tensor:
        return self.label_rows(slots).gather(1, self.level[slots].long().unsqueeze(1)).squeeze(1)

    def keys(self) -> torch.Tensor:
        """The class every stored sample counts for when balancing: its finest known label."""
        return finest(self.label_rows())

    def add(self, x: torch.Tensor, row: torch.Tensor, level: int, *, by_importance: bool,
            generator: torch.Generator) -> int:
        """Store one sample with label row ``row`` (flat ids, -1 = none) whose true label
        is at ``level``; returns its slot. When full, the victim comes from the class with
        the most stored samples, this one counted (ties: the lowest class id), and is that
        class's least important sample (ties: the lowest slot), or a random one of it."""
        key = int(finest(row.unsqueeze(0)))
        size = self.size
        keys = self.keys()
        same = keys == key
        if bool(same.any()):
            start = self.importance[:size][same].mean()
        elif size:
            start = self.importance[:size].mean()
        else:
            start = torch.zeros(())
        if size < self.capacity:
            slot = size
            self.stored += 1
        else:
            counts = torch.bincount(keys, minlength=max(int(keys.max()), key) + 1)
            grown = counts.clone()
            grown[key] += 1
            grown[counts == 0] = -1  # only a class with stored samples can give one up
            largest = int(grown.argmax())
            slots = (keys == largest).nonzero().squeeze(1)
            if by_importance:
                slot = int(slots[self.importance[slots].argmin()])
            else:
                slot = int(slots[torch.randint(len(slots), (), generator=generator)])
        self.x[slot] = x
        self.set_label_rows(torch.tensor([slot]), row.unsqueeze(0))
        self.level[slot] = level
        self.importance[slot] = start
        return slot


def finest(rows: torch.Tensor) -> torch.Tensor:
    """``(k,)`` the label at the finest level that has one, per row of ``(k, n_levels)``."""
    key = rows[:, 0]
    for level in range(1, rows.shape[1]):
        key = torch.where(rows[:, level] >= 0, rows[:, level], key)
    return key


# ---------------------------------------------------------------------------
# the plugin
# ---------------------------------------------------------------------------


class PlFmsPlugin:
    """PL-FMS: ER with an importance-managed, class-balanced memory, flexible memory
    sampling and hierarchy-aware pseudo-labels (Lee et al., ICCV 2023)."""

    Options = PlFmsOptions

    def __init__(self, options: PlFmsOptions) -> None:
        self.options = options
        self.memory: HierarchyMemory | None = None
        self.generator: torch.Generator | None = None
        self.first_seen: torch.Tensor | None = None  # stream position of each label's first sample
        self.position = torch.zeros((), dtype=torch.int64)  # stream samples seen
        self.stream_end = torch.zeros((), dtype=torch.int64)  # N's estimate; 0 = unknown
        self.admitted = torch.zeros((), dtype=torch.int64)  # stream samples trained on
        # per-batch state, None between batches
        self._replayed: torch.Tensor | None = None  # memory slots in the batch
        self._loss_before: torch.Tensor | None = None
        self._fresh_rows: torch.Tensor | None = None  # refreshed label rows of the replayed

    # -- setup: size the memory from the budget ----------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        self.generator = ctx.torch_generator("pl_fms")
        self.first_seen = torch.full((ctx.n_classes,), -1, dtype=torch.int64)
        if self.options.capacity is not None:
            self.memory = self._memory(ctx, self.options.capacity)
        elif ctx.budget_bytes is None:
            raise ConfigError("pl_fms needs 'capacity' or a budget for the strategy "
                              "(e.g. budget: 'model + 1000 exemplars')")

    def clsim_size_stores(self, ctx: RunContext) -> None:
        """The memory fills what the budget leaves beside the whole strategy."""
        if self.options.capacity is None:
            self.memory = self._memory(ctx, self._capacity_from_budget(ctx))

    def _memory(self, ctx: RunContext, capacity: int) -> HierarchyMemory:
        return HierarchyMemory(capacity, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes,
                               self._labels(ctx).n_levels)

    def _capacity_from_budget(self, ctx: RunContext) -> int:
        one = self._memory(ctx, 1)
        per_sample = sum(t.element_size() * t[0].numel()
                         for t in (one.x, one.labels, one.level, one.importance))
        return size_store(ctx, "pl_fms", self, "memory", self._memory(ctx, 0), per_sample,
                          loop_state=ctx.loop_state_bytes(), items="stored sample",
                          stored="samples")

    @staticmethod
    def _labels(ctx: RunContext) -> LabelSpace:
        if ctx.labels is not None:
            return ctx.labels
        return LabelSpace.flat([str(c) for c in range(ctx.n_classes)])

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        # N's estimate: where this experience ends (unknown with hidden boundaries)
        if experience.n_train:
            self.stream_end.fill_(int(self.position) + ctx.epochs * experience.n_train)
        else:
            self.stream_end.zero_()

    # -- flexible memory sampling ---------------------------------------------

    def admission_probabilities(self, y: torch.Tensor) -> torch.Tensor:
        """FMS's probability for each stream sample of a batch, in stream order; records
        first appearances and advances the stream position."""
        first, start = self.first_seen, int(self.position)
        n_seen = int((first >= 0).sum())
        out = torch.empty(len(y), dtype=torch.float64)
        for i, label in enumerate(y.tolist()):
            position = start + i
            if first[label] < 0:
                first[label] = position
                n_seen += 1
            if self.options.stream_length is not None:
                length = self.options.stream_length
            elif int(self.stream_end) > 0:
                length = int(self.stream_end)
            else:  # hidden boundaries: the stream so far
                length = position + 1
            out[i] = fms_probability(position, int(first[label]), n_seen, length)
        self.position += len(y)
        return out

    # -- training: offer to memory, form the batch, learn, update importances ---

    def clsim_before_batch(self, ctx: RunContext, batch: Batch) -> Batch:
        own, labels, memory = batch.stream_part(), self._labels(ctx), self.memory
        y = own.y.cpu().long()
        probability = self.admission_probabilities(y)
        # every stream sample is offered to the memory first
        rows = torch.tensor(labels.ancestors())[y]
        level = torch.tensor(labels.level_of())[y]
        slots = [memory.add(own.x[i].cpu(), rows[i], int(level[i]),
                            by_importance=self.options.importance, generator=self.generator)
                 for i in range(len(y))]
        if self.options.flexible_sampling:
            admit = torch.rand(len(y), generator=self.generator, dtype=torch.float64) < probability
        else:
            admit = torch.ones(len(y), dtype=torch.bool)
        self.admitted += int(admit.sum())
        # memory fills the batch; a sample admitted in this step is not drawn again
        wanted = (self.options.batch_size_mem or len(y)) + len(y) - int(admit.sum())
        allowed = torch.ones(memory.size, dtype=torch.bool)
        allowed[torch.tensor([s for s, a in zip(slots, admit.tolist(), strict=True) if a],
                             dtype=torch.long)] = False
        candidates = allowed.nonzero().squeeze(1)
        order = torch.randperm(len(candidates), generator=self.generator)[:wanted]
        self._replayed = replayed = candidates[order]
        if self.options.importance and len(replayed):
            expose_labels(ctx.model, memory.true_labels(replayed))  # as the engine will
            self._loss_before = self._sample_losses(ctx, replayed)
        keep = admit.to(own.y.device)
        task = None if own.task_id is None else own.task_id[keep]
        mixed = Batch(own.x[keep], own.y[keep], task).extend(
            memory.x[replayed], memory.true_labels(replayed))
        if len(batch) > batch.n_stream:  # rows an earlier plugin appended stay last
            extra = slice(batch.n_stream, None)
            mixed = mixed.extend(batch.x[extra], batch.y[extra],
                                 None if batch.task_id is None else batch.task_id[extra])
        return mixed

    def clsim_loss(self, ctx: RunContext, batch: Batch, logits: torch.Tensor,
                   output: ForwardOutput) -> torch.Tensor | None:
        labels = self._labels(ctx)
        if not self.options.pseudo_labels or labels.n_levels == 1:
            return None
        # one label per row of logits: with several views (another plugin's clsim_inputs)
        # the labels repeat per view, and the first view's rows are the batch's own
        y = output.targets
        active = active_outputs(ctx.model)
        targets = hierarchy_targets(labels, y, logits, active)
        if self._replayed is not None:
            start = batch.n_stream
            self._fresh_rows = targets[start : start + len(self._replayed)].cpu()
        own = torch.tensor(labels.level_of(), device=logits.device)[y.to(logits.device)]
        losses, valid = level_losses(labels, logits, targets, active)
        others = valid & (torch.arange(labels.n_levels, device=logits.device) != own.unsqueeze(1))
        return self.options.pseudo_weight * losses.masked_fill(~others, 0.0).sum() / len(y)

    def clsim_after_update(self, ctx: RunContext) -> None:
        replayed = self._replayed
        if not self.options.importance or replayed is None or not len(replayed):
            return
        decrease = self._loss_before - self._sample_losses(ctx, replayed)
        decay = self.options.importance_decay
        importance = self.memory.importance
        importance[replayed] = decay * importance[replayed] + (1 - decay) * decrease.float()

    def clsim_after_batch(self) -> None:
        if self._fresh_rows is not None:
            self.memory.set_label_rows(self._replayed, self._fresh_rows)
        self._replayed = self._loss_before = self._fresh_rows = None

    @torch.no_grad()
    def _sample_losses(self, ctx: RunContext, slots: torch.Tensor) -> torch.Tensor:
        """Per stored sample: cross-entropy on its stored labels, weight 1 at its own
        level and ``pseudo_weight`` at the others (eval mode, no gradient)."""
        labels, model = self._labels(ctx), ctx.model
        x = self.memory.x[slots]
        was_training = model.training
        model.eval()
        # memoised on its own: how many rows are replayed is drawn at random, which the
        # loop's step signature (taken before clsim_before_batch) cannot know
        try:
            with ctx.compute_step("sample_losses", tuple(x.shape)):
                logits = model(ctx.to_input(x))
        finally:
            model.train(was_training)
        rows = self.memory.label_rows(slots).to(logits.device)
        losses, valid = level_losses(labels, logits, rows, active_outputs(model))
        own = torch.nn.functional.one_hot(self.memory.level[slots].long(), labels.n_levels)
        weight = own.to(logits.device, logits.dtype)
        if self.options.pseudo_labels:
            weight = weight + self.options.pseudo_weight * (1 - weight)
        return (losses * weight * valid).sum(dim=1).cpu()

    # -- reporting ----------------------------------------------------------

    def clsim_report(self, ctx: RunContext) -> dict:
        labels, memory = self._labels(ctx), self.memory
        rows = memory.label_rows()
        level = memory.level[: memory.size].long()
        finer = (rows >= 0).sum(dim=1) > level + 1  # a pseudo-label below its own level
        seen = int(self.position)
        return {
            "capacity": memory.capacity,
            "stored": memory.size,
            "stored_by_level": {name: int((level == i).sum())
                                for i, name in enumerate(labels.level_names)},
            "stored_with_finer_pseudo_label": int(finer.sum()),
            "stored_classes": int(memory.keys().unique().numel()),
            "stream_samples": seen,
            "admitted_to_batches": int(self.admitted),
            "admission_rate": None if seen == 0 else int(self.admitted) / seen,
        }
