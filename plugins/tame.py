"""TAME: task-agnostic continual learning with multiple experts, a shift detector and a selector.

Zhu, Majzoubi, Jain and Choromanska, "TAME: Task Agnostic Continual Learning using
Multiple Experts", arXiv:2210.03869 (2022, revised 2024; METHODS.md section 4).
No task ids and no boundaries are given: a new task shows itself as a statistically
significant jump of the active expert's training loss, which switches training to another
expert; at test a selector network routes each sample to an expert.

**Training** is owned by the plugin (``clsim_train_experience``): each delivered part of
the stream is processed in order, in mini-batches of ``ctx.batch_size`` (the last batch of
a part may be smaller; batches do not straddle parts). Per batch:

1. every expert's loss L on the batch is computed (eval mode, no gradient; cross-entropy
   over the expert's every output, the whole label space) and smoothed:
   ``L_s <- a L + (1 - a) L_s`` (a = ``smoothing`` = 0.2; a new expert starts at
   ``L_s = L``);
2. the active expert's threshold is ``mean(window) + n_std * max(std(window), min_std)``
   over its window of its last ``window`` training losses (W = 100, n_std = 3,
   min_std = 0.005; std is the population standard deviation). When ``L_s`` exceeds it,
   a shift is declared: the threshold is frozen and the expert deactivated, and the
   batch is held. The next batch chooses: every expert's smoothed loss restarts at its
   loss on it, the other experts are scanned in creation order and the first whose
   smoothed loss is below its frozen threshold becomes active (a recurring task goes
   back to its old expert); if none qualifies a new expert is created. The chosen
   expert then takes steps 3 and 4 on the held batch and on the choosing one, in
   stream order;
3. the active expert takes one step of the scenario's optimizer (``training.optimizer``:
   class, lr, momentum, weight decay; ``ctx.new_optimizer``) on the batch, under the
   scenario's non-finite policy (``ctx.backward_step``), and the loss it had before the
   step enters its window;
4. the batch is offered to the selector buffer, tagged with the expert that trained on it.

**Why TAME owns the experience instead of hooking the standard loop**: the loop trains
``ctx.model`` with one optimizer built before an experience's batches (kept across the
parts of an online one), and every hook sees that model's forward pass. TAME trains, per
batch, a network chosen only after every expert's loss on that batch is known, which is
usually not ``ctx.model``, and creates networks in the middle of an experience, after the
loop's optimizer was built: a new expert would be outside it, and the forward output,
logits and task loss each hook sees would be expert 0's, not the trained network's. Its
shifts also run trainings on the buffer (pruned experts' fine-tuning, the selector) in the
middle of the stream. Every gradient step still goes through ``ctx.new_optimizer`` and
``ctx.backward_step``, so the scenario's optimizer and non-finite policy rule all of them.

**Optimizer state** (momentum buffers, Adam's moments): each expert keeps its own, carried
from one of its steps to its next (a fresh state every batch would turn Adam's step into
``lr * sign(gradient)`` and drop momentum altogether). The state is kept as tensors on the
plugin (``optimizer_state``), where the ledger charges it; the optimizer object is rebuilt
around it per step. SGD without momentum has none. An expert's state appears at its first
step, and the buffer is re-sized then. Fine-tuning and selector training use an optimizer
fresh for each call, as the standard loop does per experience.

The shift detector never reads experience boundaries: with ``boundaries: hidden`` the
plugin sees one merged experience; on an online stream with visible boundaries
``clsim_before_experience`` / ``clsim_after_experience`` still fire per true task and
the plugin ignores them for detection (the selector is trained there, as after any part).

**Experts** are networks of the scenario's architecture with one output per label id, all
of them in use from the start (a growing head, as online streams give the model, is
switched on entirely: each expert is trained over the whole label space).
Expert 0 is ``ctx.model`` itself (so the ledger charges it as the model, not twice);
every later expert is a deep copy of it whose parameters are all re-initialised by their
modules' own ``reset_parameters`` under a seed drawn from the plugin's generator (fresh,
not copied weights). An expert predicts by its argmax over the classes it has trained on.

**Selector**: an MLP on the flattened model input, ``Linear(d, selector_hidden) - ReLU -
Linear(selector_hidden, n_experts)``, trained by cross-entropy to predict the expert tag
of the buffered samples, stepped by the scenario's optimizer at ``selector_lr_scale``
times its learning rate (a ``Trainable`` factor). It is retrained from scratch (seeded)
whenever it is about to be used and its buffer changed: at the end of every delivered
part (so before each anytime evaluation) and in ``clsim_after_experience``; with one
expert it is not built (every sample goes to expert 0). ``clsim_predict`` routes each
test sample to the selector's expert and returns that expert's prediction, so a misrouted
sample counts as wrong in the engine's class-incremental accuracy.

**Selector buffer**: a class-balanced uniform sample of the stream by random priorities
(:class:`PriorityBuffer`): each offered sample draws a priority ~ U(0, 1); per class the
``k = capacity // classes seen`` highest priorities are kept, so each class's share is a
uniform sample of what that class offered (k never grows: classes only accumulate and the
capacity only shrinks). Each item keeps its label and its expert tag. The buffer doubles
as the pruning buffer: an expert is fine-tuned on the items tagged with it.

**Pruning** (``prune``, on by default): global L1 magnitude pruning within one network
(one threshold over all its weight matrices and kernels; biases and normalisation
parameters are kept), then fine-tuning (the scenario's optimizer at its learning rate)
with the pruned weights held at zero. An expert is pruned to ``expert_sparsity`` when the
detector deactivates it, and fine-tuned for ``finetune_epochs`` on its buffered items;
the last active expert is pruned at the end of a hidden-boundary stream (its one
``clsim_after_experience``); with visible boundaries the plugin cannot know the end of
the stream, so the last active expert stays dense. A pruned expert that becomes active
again keeps its zeros (the mask is re-applied after every step). The selector is pruned
to ``selector_sparsity`` and fine-tuned after each of its trainings. Masks are not
stored: a pruned weight is exactly 0, and the mask is recomputed as ``weight != 0`` when
needed. Weights are stored dense, so the ledger charges pruned networks at their dense
size; the report gives their sparsity and the bytes they would take packed (a float32
value and an int32 index per non-zero).

**Memory** (charged by the ledger, all tensors): the experts (``model`` for expert 0,
``tame.experts`` for the others), their optimizer state, the selector, the buffer (raw
samples, labels, expert tags, priorities, occupancy), the loss windows, their fill
counts, the smoothed losses, the frozen thresholds, the classes of each expert, the
classes seen, the active expert, the stream position, the hidden-boundary flag and the
switch log. The buffer's capacity is ``capacity`` if given, else what the budget leaves
after everything else the strategy holds (with room kept for 64 more logged switches),
computed once every plugin has set up (``clsim_size_stores``) and again after each new
expert and each expert's first step (:mod:`clsim.capacity`); the
buffer then shrinks, keeping the highest priorities of each class (still a uniform
sample). If the budget cannot hold the experts and one buffered sample per seen class,
the run fails with a ConfigError naming the number of experts and the minimum budget.

**Reconstructed** (the paper and METHODS.md leave these open):

- warm-up: an active expert whose window holds fewer than W losses cannot be deactivated
  (no threshold yet), so a new expert trains at least W batches before the next shift;
- the scan after a shift is judged on the batch after the one that declared it, every
  expert's smoothed loss restarting at its loss there. The restart: the smoothed values
  average the previous task's data, and an old expert's would need about 15 batches to
  decay below its threshold, so without it a recurring task would always get a new
  expert. The next batch: boundaries do not align with batches, and when one falls
  inside the declaring batch, that batch mixes both tasks; the samples of the task being
  left put an old expert's loss on it over its frozen threshold (on A, B, A with both
  boundaries inside a batch of 8, judging on the declaring batch made a third expert in 4
  of 5 offsets; tests/test_tame.py). The official code (HaoranZhuExplorer/TAME,
  ``utils_.py``) judges a candidate on the declaring batch by ``a L + (1 - a)`` times its
  smoothed loss when last active, which a mixed batch whose loss is over 5 times the
  threshold puts over it too. The next batch lies wholly after the change whenever the
  task lasts longer than a batch and the shift is declared within a batch of its start.
  The steps, their order, the draws from the plugin's generator and the classes the
  buffer counts when a new expert re-sizes it (so the items a pruned expert fine-tunes
  on) are those of judging on the declaring batch: where both batches hold only the new
  task the run is the same, byte for byte (measured on the synthetic A, B, A and on
  ``tame_recurring_fashion_mnist``). The held batch is the loop's data, kept for one
  batch within a delivered part: if the part ends on it (an anytime evaluation follows),
  it is judged alone, as before;
- the expert deactivated at a shift is not a candidate in the scan that follows it;
- the loss is taken over the whole label space, not over the classes seen so far: with a
  growing mask an old expert's loss on its own task rises as soon as other tasks bring
  new classes (their untrained outputs join the softmax), so a recurring task would find
  it above its frozen threshold;
- the experts step with the scenario's optimizer at batch ``ctx.batch_size`` (METHODS.md
  says SGD; the shipped scenarios use SGD, lr 0.01, no momentum; ``tame_quick`` 0.05);
- selector width 100, 10 epochs in batches of 64, retrained from scratch, at
  ``selector_lr_scale`` = 50 times the scenario's lr: 0.5 beside the shipped lr 0.01
  without momentum, the steady-state step ``lr / (1 - momentum)`` of the selector's former
  private SGD (0.05, momentum 0.9); with momentum in ``training.optimizer`` lower it (5
  with momentum 0.9); expert sparsity 0.9 ("high sparsity"), selector sparsity 0.5, 5
  fine-tuning epochs; pruning one-shot at deactivation rather than gradual;
- a stream that is not online (``training.epochs`` above 1) is refused: TAME sees each
  sample once. Hierarchical label spaces are refused. Task ids, if visible, are ignored.

**Known limitation** (of the published rule, kept as is): every training loss of the active
expert enters its window, including those of a new task's first batches when they do not
yet lift ``L_s`` over the threshold; an expert whose window still holds its own learning
curve (too few batches, too small a learning rate) has a threshold high enough that such
batches raise it further and the shift is absorbed, not detected. The shipped scenarios
give every task many more than W batches (split MNIST: about 750 of 16 images).

**Report** (``clsim_report``; summary.json ``strategies.<S>.plugins.tame``): experts
created, the expert sequence, every switch, the detections (stream position in training samples at
the end of the batch that declared the shift) scored against ``stream.boundaries()``:
a detection explains a true boundary b when it is the first in ``(b, b + delay_window *
batch_size]`` (and not past the next boundary), its delay is ``detection - b`` samples
and ``ceil(delay / batch_size)`` batches; a boundary without one is missed, every other
detection is a false alarm. Also: the expert active for most of each true task's training
samples, ``within_expert_accuracy`` (each distinct true task's test set predicted by that
expert: the oracle route, what the original code printed as within-task accuracy),
``routing_accuracy`` (the selector choosing that expert), thresholds, sparsities, bytes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from clsim_plugins.buffers import label_dtype
from torch import nn

from clsim.capacity import Beside, announce, held_beside, items_that_fit
from clsim.context import RunContext
from clsim.errors import ConfigError, OptionError
from clsim.loop_types import Trainable
from clsim.models.heads import expose_labels
from clsim.stream import Experience, Stream

LOG_RESERVE = 64  # switches the capacity computation leaves room for in the log
_LOG_COLUMNS = 5  # batch start, batch end, from expert, to expert, created (0/1)


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------


@dataclass
class TameOptions:
    """Options of the tame plugin; detector defaults are the published ones."""

    window: int = field(
        default=100, metadata={"min": 2, "help": "W: training losses in each expert's window"}
    )
    smoothing: float = field(
        default=0.2,
        metadata={"min": 0, "min_exclusive": True, "max": 1,
                  "help": "a in L_s <- a L + (1 - a) L_s"},
    )
    n_std: float = field(
        default=3.0, metadata={"min": 0, "help": "threshold = mean + n_std * max(std, min_std)"}
    )
    min_std: float = field(
        default=0.005, metadata={"min": 0, "help": "floor of the window's standard deviation"}
    )
    capacity: int | None = field(
        default=None,
        metadata={"min": 1, "help": "selector buffer size; default: what the budget leaves"},
    )
    selector_hidden: int = field(
        default=100, metadata={"min": 1, "help": "hidden width of the selector MLP"}
    )
    selector_epochs: int = field(
        default=10, metadata={"min": 1, "help": "epochs of each selector training"}
    )
    selector_lr_scale: float = field(
        default=50.0,
        metadata={"min": 0, "min_exclusive": True,
                  "help": "selector lr = this x training.optimizer.lr (50: 0.5 beside 0.01; "
                  "lower it when training.optimizer has momentum)"},
    )
    selector_batch_size: int = field(
        default=64, metadata={"min": 1, "help": "mini-batch size of selector training"}
    )
    prune: bool = field(default=True, metadata={"help": "prune experts and selector"})
    expert_sparsity: float = field(
        default=0.9,
        metadata={"min": 0, "max": 1,
                  "help": "fraction (below 1) of an expert's weights zeroed at deactivation"},
    )
    selector_sparsity: float = field(
        default=0.5,
        metadata={"min": 0, "max": 1,
                  "help": "fraction (below 1) of the selector's weights zeroed"},
    )
    finetune_epochs: int = field(
        default=5, metadata={"min": 0, "help": "fine-tuning epochs after pruning"}
    )
    delay_window: int = field(
        default=100,
        metadata={"min": 1, "help": "report: batches after a true boundary within which a "
                  "detection explains it (else it is a false alarm)"},
    )

    def check(self) -> None:
        # the validator has no exclusive maximum: sparsity 1 would delete the network
        for key in ("expert_sparsity", "selector_sparsity"):
            if getattr(self, key) >= 1:
                raise OptionError(key, f"{key} must be below 1 (1 removes every weight); "
                                  f"got {getattr(self, key)}")


# ---------------------------------------------------------------------------
# the selector buffer: a class-balanced uniform sample by random priorities
# ---------------------------------------------------------------------------


class PriorityBuffer:
    """A class-balanced uniform sample of a stream, of fixed capacity.

    Every offered item carries a priority; per class the ``capacity // classes seen``
    highest priorities are kept. With i.i.d. uniform priorities, each class's share is a
    uniform random subset of what that class offered. Slots are tensors allocated at
    full capacity (``filled`` marks the occupied ones), so the ledger sees the real cost.
    """

    def __init__(
        self,
        capacity: int,
        sample_shape: tuple[int, ...],
        sample_dtype: torch.dtype,
        n_classes: int,
    ) -> None:
        self.x = torch.zeros((capacity, *sample_shape), dtype=sample_dtype)
        self.labels = torch.zeros(capacity, dtype=label_dtype(n_classes))
        self.experts = torch.zeros(capacity, dtype=torch.int16)
        self.priorities = torch.zeros(capacity, dtype=torch.float32)
        self.filled = torch.zeros(capacity, dtype=torch.bool)
        self.class_seen = torch.zeros(n_classes, dtype=torch.bool)

    @property
    def capacity(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        return int(self.filled.sum())

    def per_class(self) -> int:
        """k: items kept per class (0 before any class was seen)."""
        seen = int(self.class_seen.sum())
        return self.capacity // seen if seen else 0

    @staticmethod
    def item_bytes(sample_bytes: int, n_classes: int) -> int:
        """Bytes one slot takes: the raw sample, label, tag, priority and occupancy flag."""
        label = torch.empty((), dtype=label_dtype(n_classes)).element_size()
        return sample_bytes + label + 2 + 4 + 1

    def offer(
        self, x: torch.Tensor, y: torch.Tensor, expert: int, priorities: torch.Tensor
    ) -> None:
        """Offer items ``(x, y)`` with their ``priorities``; they are tagged ``expert``."""
        y = y.to("cpu", torch.long)
        self.class_seen[y] = True
        k = self.per_class()
        if k == 0:
            raise ValueError(f"a buffer of {self.capacity} items cannot hold one item of "
                             f"each of the {int(self.class_seen.sum())} classes seen")
        stored = self.filled.nonzero().squeeze(1)
        labels = torch.cat([self.labels[stored].long(), y])
        prio = torch.cat([self.priorities[stored], priorities.to("cpu", torch.float32)])
        keep = _top_per_class(labels, prio, k)
        n_old = len(stored)
        self.filled[stored[~keep[:n_old]]] = False
        new = keep[n_old:].nonzero().squeeze(1)
        slots = (~self.filled).nonzero().squeeze(1)[: len(new)]
        self.x[slots] = x[new.to(x.device)].to("cpu")
        self.labels[slots] = y[new].to(self.labels.dtype)
        self.experts[slots] = expert
        self.priorities[slots] = prio[n_old:][new]
        self.filled[slots] = True

    def resized(self, capacity: int) -> PriorityBuffer:
        """A buffer of ``capacity`` holding, per class, the highest priorities of this one."""
        out = PriorityBuffer(capacity, tuple(self.x.shape[1:]), self.x.dtype,
                             len(self.class_seen))
        out.class_seen = self.class_seen.clone()
        stored = self.filled.nonzero().squeeze(1)
        k = out.per_class()
        if k == 0 and len(stored):
            raise ValueError(f"a buffer of {capacity} items cannot hold one item of each of "
                             f"the {int(self.class_seen.sum())} classes seen")
        kept = stored[_top_per_class(self.labels[stored].long(), self.priorities[stored], k)]
        n = len(kept)
        out.x[:n] = self.x[kept]
        out.labels[:n] = self.labels[kept]
        out.experts[:n] = self.experts[kept]
        out.priorities[:n] = self.priorities[kept]
        out.filled[:n] = True
        return out

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, labels, expert tags)`` of the occupied slots, in slot order."""
        index = self.filled.nonzero().squeeze(1)
        return self.x[index], self.labels[index].long(), self.experts[index].long()


def _top_per_class(labels: torch.Tensor, priorities: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the items among the ``k`` highest priorities of their class."""
    if len(labels) == 0:
        return torch.zeros(0, dtype=torch.bool)
    order = torch.argsort(priorities, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order)) - starts[sorted_labels]
    keep = torch.zeros(len(labels), dtype=torch.bool)
    keep[order] = rank < k
    return keep


# ---------------------------------------------------------------------------
# pruning and the shift statistics, as pure functions
# ---------------------------------------------------------------------------


def prunable(module: nn.Module) -> list[nn.Parameter]:
    """The weights global magnitude pruning acts on: matrices and kernels (dim >= 2)."""
    return [p for p in module.parameters() if p.dim() >= 2]


@torch.no_grad()
def magnitude_prune(module: nn.Module, sparsity: float) -> None:
    """Global L1 magnitude pruning: zero the ``sparsity`` fraction of smallest |w| over all
    of ``module``'s weight matrices and kernels together (ties broken by position)."""
    weights = prunable(module)
    flat = torch.cat([p.detach().abs().flatten() for p in weights])
    n_zero = int(math.floor(sparsity * flat.numel()))
    if n_zero == 0:
        return
    drop = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    drop[torch.argsort(flat, stable=True)[:n_zero]] = True
    start = 0
    for p in weights:
        n = p.numel()
        p.masked_fill_(drop[start : start + n].view_as(p), 0.0)
        start += n


def sparsity_of(module: nn.Module) -> float:
    """Fraction of zero entries among ``module``'s prunable weights."""
    weights = prunable(module)
    total = sum(p.numel() for p in weights)
    zeros = sum(int((p == 0).sum()) for p in weights)
    return zeros / total if total else 0.0


def packed_bytes(module: nn.Module) -> int:
    """Bytes the module would take with its prunable weights stored as (float32 value,
    int32 index) pairs of the non-zeros, everything else dense."""
    dense = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    weights = prunable(module)
    stored = sum(p.numel() * p.element_size() for p in weights)
    nonzero = sum(int((p != 0).sum()) for p in weights)
    return dense - stored + nonzero * 8


def _holds_tensors(states: list[dict[str, torch.Tensor]]) -> bool:
    """Whether an expert's optimizer state holds any tensor (momentum, moments)."""
    return any(isinstance(v, torch.Tensor) for state in states for v in state.values())


def threshold(window: torch.Tensor, n_std: float, min_std: float) -> torch.Tensor:
    """``mean + n_std * max(std, min_std)`` of a window of losses (population std)."""
    std = window.std(unbiased=False).clamp_min(min_std)
    return window.mean() + n_std * std


def score_detections(
    detections: list[int], boundaries: list[int], window: int
) -> dict[str, Any]:
    """Detections (stream positions) against true task starts (``boundaries[0]`` is 0).

    The first detection in ``(b, min(b + window, next boundary)]`` explains boundary b
    (its delay is ``detection - b``); a boundary with none is missed; every detection
    that explains no boundary is a false alarm.
    """
    starts = list(boundaries[1:])
    explained: set[int] = set()
    per_boundary = []
    for i, b in enumerate(starts):
        stop = b + window if i + 1 == len(starts) else min(b + window, starts[i + 1])
        found = next((d for d in detections if b < d <= stop and d not in explained), None)
        if found is not None:
            explained.add(found)
        per_boundary.append({"boundary": b, "detection": found,
                             "delay_samples": None if found is None else found - b})
    return {
        "boundaries": per_boundary,
        "missed_boundaries": [p["boundary"] for p in per_boundary if p["detection"] is None],
        "false_alarms": [d for d in detections if d not in explained],
    }


# ---------------------------------------------------------------------------
# the plugin
# ---------------------------------------------------------------------------


@dataclass
class _Held:
    """A batch that declared a shift, held until the batch after it chooses the expert:
    the raw samples and labels, their model inputs, every expert's loss on it, its start
    in the stream and the expert it deactivated."""

    xb: torch.Tensor
    yb: torch.Tensor
    inputs: torch.Tensor
    y: torch.Tensor
    losses: torch.Tensor
    start: int
    source: int



class TamePlugin:
    """TAME (Zhu et al.): experts switched by a loss-jump detector, routed by a selector."""

    Options = TameOptions

    def __init__(self, options: TameOptions | None = None) -> None:
        self.options = options or TameOptions()
        o = self.options
        self.experts = nn.ModuleList()
        self.selector: nn.Sequential | None = None
        self.buffer: PriorityBuffer | None = None
        self.loss_windows = torch.zeros(0, o.window)  # circular, per expert
        self.window_fill = torch.zeros(0, dtype=torch.long)  # losses pushed per expert
        self.smoothed_losses = torch.zeros(0)
        self.thresholds = torch.zeros(0)  # frozen at deactivation; NaN until then
        self.expert_classes = torch.zeros(0, 0, dtype=torch.bool)  # trained-on, per expert
        self.pruned = torch.zeros(0, dtype=torch.bool)
        # per expert, per trainable parameter: the scenario optimizer's state (momentum,
        # Adam moments) carried from one of the expert's steps to its next
        self.optimizer_state: list[list[dict[str, torch.Tensor]]] = []
        self.active = torch.zeros((), dtype=torch.long)
        self.position = torch.zeros((), dtype=torch.long)  # training samples processed
        self.hidden_boundaries = torch.zeros((), dtype=torch.bool)
        self.selector_stale = torch.zeros((), dtype=torch.bool)
        self.switches = torch.zeros(0, _LOG_COLUMNS, dtype=torch.long)
        self.generator: torch.Generator | None = None

    # -- setup -----------------------------------------------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        if ctx.epochs != 1:
            raise ConfigError(
                f"tame learns each sample once, in stream order; training.epochs is "
                f"{ctx.epochs}: use an online stream (online: true) or training.epochs: 1")
        if ctx.labels is not None and ctx.labels.n_levels > 1:
            raise ConfigError("tame supports flat label spaces only; this stream has "
                              f"{ctx.labels.n_levels} label levels (hierarchical)")
        if self.options.capacity is None and ctx.budget_bytes is None:
            raise ConfigError("tame needs 'capacity' or a budget for the strategy (the "
                              "selector buffer fills what the experts leave)",
                              key_path="capacity")
        self.generator = ctx.torch_generator("tame")
        self.expert_classes = torch.zeros(0, ctx.n_classes, dtype=torch.bool)
        self._add_expert(ctx, ctx.model)
        if self.options.capacity is not None:  # a fixed store is in place before another
            self.buffer = PriorityBuffer(  # plugin sizes from the budget; checked there
                self.options.capacity, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes)

    def clsim_size_stores(self, ctx: RunContext) -> None:
        """The selector buffer, beside expert 0 and every plugin of the strategy."""
        self._size_buffer(ctx)

    def clsim_before_experience(self, ctx: RunContext, experience: Experience) -> None:
        # only a hidden-boundary stream shows an experience without its data
        if experience.n_train == 0:
            self.hidden_boundaries.fill_(True)

    # -- training --------------------------------------------------------------

    def clsim_train_experience(self, ctx: RunContext, experience: Experience) -> Any:
        # owned, not hooks: each batch trains the expert the detector picks after reading
        # the batch, and may create one (the module docstring says why the loop cannot)
        x, y = experience.train_x, experience.train_y
        held: _Held | None = None  # a triggering batch waiting for the batch after it
        for start in range(0, len(y), ctx.batch_size):
            held = self._batch(ctx, x[start : start + ctx.batch_size],
                               y[start : start + ctx.batch_size], held)
        if held is not None:  # the part ended on the triggering batch: it judges alone
            self._choose(ctx, held, held.losses, held.inputs, held.y)
        self._refresh_selector(ctx)
        return True

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if bool(self.hidden_boundaries) and self.options.prune:
            # the one after_experience of a hidden-boundary stream is the stream's end
            self._prune_expert(ctx, int(self.active))
        self._refresh_selector(ctx)

    def _batch(self, ctx: RunContext, xb: torch.Tensor, yb: torch.Tensor,
               held: _Held | None) -> _Held | None:
        """Detect (or, after a shift, choose), train the active expert, buffer the batch;
        returns the batch itself when it declares a shift (the choice waits for the next).

        A batch on which the active expert's loss is not finite never reaches the
        detector: its step applies ``training.nonfinite_loss`` (``stop`` raises,
        ``skip_batch`` counts it and the batch is dropped as if never drawn, the stream
        position still advancing past it)."""
        o = self.options
        inputs = ctx.to_input(xb)
        y = yb.to(ctx.device, torch.long)
        with ctx.compute_step("losses", tuple(inputs.shape), self._sizes()):  # memoised
            losses = self._losses(inputs, y)
        start = int(self.position)
        self.position += len(yb)
        if held is not None:  # a shift was declared on the previous batch: choose on this one
            active = self._choose(ctx, held, losses, inputs, y)
            loss = self._expert_loss(active, inputs, y)  # it has just stepped on held
            if bool(torch.isfinite(loss)):
                self.buffer.class_seen[yb.long()] = True
            self._learn(ctx, active, xb, yb, inputs, y, loss)
            return None
        active = int(self.active)
        if bool(torch.isfinite(losses[active])):
            self.buffer.class_seen[yb.long()] = True  # the minimum buffer counts them now
            fresh = torch.isnan(self.smoothed_losses)
            self.smoothed_losses = torch.where(
                fresh, losses, o.smoothing * losses + (1 - o.smoothing) * self.smoothed_losses)
            if int(self.window_fill[active]) >= o.window:  # warm-up over: a threshold exists
                limit = threshold(self.loss_windows[active], o.n_std, o.min_std)
                if bool(self.smoothed_losses[active] > limit):  # a shift: freeze, hold
                    self.thresholds[active] = limit
                    return _Held(xb, yb, inputs, y, losses, start, active)
        self._learn(ctx, active, xb, yb, inputs, y, losses[active])
        return None

    def _choose(self, ctx: RunContext, held: _Held, losses: torch.Tensor,
                inputs: torch.Tensor, y: torch.Tensor) -> int:
        """After the shift ``held`` declared: every expert's smoothed loss restarts at its
        loss on the judging batch ``(inputs, y)`` (``losses``), the first other expert
        below its frozen threshold becomes active, else a new one; the deactivated expert
        is pruned and the chosen one trains on the held batch. Returns the chosen one."""
        source = held.source
        self.smoothed_losses = losses.clone()  # restart on the new distribution
        fits = (self.smoothed_losses < self.thresholds) & ~torch.isnan(self.thresholds)
        fits[source] = False
        chosen = fits.nonzero().squeeze(1)
        created = len(chosen) == 0
        if created:
            self._add_expert(ctx, self._fresh_expert(ctx))
            target = len(self.experts) - 1
            self.smoothed_losses[target] = self._expert_loss(target, inputs, y)
        else:
            target = int(chosen[0])
        end = held.start + len(held.yb)
        row = torch.tensor([[held.start, end, source, target, int(created)]])
        self.switches = torch.cat([self.switches, row])
        ctx.log("tame_switch", position=end, source=source, target=target, created=created,
                threshold=float(self.thresholds[source]))
        if self.options.prune:
            self._prune_expert(ctx, source)
        self.active.fill_(target)
        # its loss on the held batch, before any step on it (a new expert's is computed)
        loss = self._expert_loss(target, held.inputs, held.y) if created else \
            held.losses[target]
        self._learn(ctx, target, held.xb, held.yb, held.inputs, held.y, loss)
        return target

    def _learn(self, ctx: RunContext, index: int, xb: torch.Tensor, yb: torch.Tensor,
               inputs: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        """Expert ``index`` steps on the batch; ``loss`` (its loss before the step) enters
        its window, and the batch is offered to the buffer tagged with it (not when
        ``skip_batch`` dropped the batch)."""
        if not self._train_step(ctx, index, inputs, y):
            return
        self._push_loss(index, loss)
        self.expert_classes[index, yb.long()] = True
        priorities = torch.rand(len(yb), generator=self.generator)
        try:
            self.buffer.offer(xb, yb, index, priorities)
        except ValueError as exc:
            self._refuse_buffer(ctx, str(exc))
        self.selector_stale.fill_(True)

    # -- experts ---------------------------------------------------------------

    @staticmethod
    def _loss(expert: nn.Module, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the whole label space (every output of the expert)."""
        return F.cross_entropy(expert(inputs), y)

    @torch.no_grad()
    def _expert_loss(self, index: int, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Expert ``index``'s loss on the batch, eval mode, no gradient, a CPU float."""
        expert = self.experts[index]
        was = expert.training
        expert.eval()
        loss = self._loss(expert, inputs, y)
        expert.train(was)
        return loss.float().cpu()

    def _sizes(self) -> tuple[int, ...]:
        """Each expert's parameter count: with the batch's shape, what a step's FLOPs
        follow from (``ctx.compute_step``)."""
        return tuple(_size(expert) for expert in self.experts)

    def _losses(self, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every expert's loss on the batch (:meth:`_expert_loss`)."""
        return torch.stack([self._expert_loss(i, inputs, y) for i in range(len(self.experts))])

    def _train_step(self, ctx: RunContext, index: int, inputs: torch.Tensor,
                    y: torch.Tensor) -> bool:
        """One step of expert ``index`` with the scenario's optimizer, continuing its own
        optimizer state; False when ``skip_batch`` dropped the batch."""
        expert = self.experts[index]
        expert.train()
        params = [p for p in expert.parameters() if p.requires_grad]
        optimizer = ctx.new_optimizer(expert)
        for p, state in zip(params, self.optimizer_state[index], strict=False):
            optimizer.state[p] = state
        masks = self._masks(expert) if bool(self.pruned[index]) else None
        with ctx.compute_step("train", index, tuple(inputs.shape), self._sizes()[index]):
            stepped = ctx.backward_step(optimizer, self._loss(expert, inputs, y))
        expert.zero_grad(set_to_none=True)  # gradients are not state to keep
        if not stepped:
            return False
        had_state = _holds_tensors(self.optimizer_state[index])
        self.optimizer_state[index] = [optimizer.state[p] for p in params]
        if masks is not None:
            with torch.no_grad():
                for p, mask in masks:
                    p.mul_(mask)
        if not had_state and _holds_tensors(self.optimizer_state[index]):
            self._size_buffer(ctx)  # the expert's first step made its state: charge it
        return True

    @staticmethod
    def _masks(module: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """The pruning masks of ``module``, recomputed: a pruned weight is exactly 0."""
        return [(p, p != 0) for p in prunable(module)]

    def _push_loss(self, index: int, loss: torch.Tensor) -> None:
        slot = int(self.window_fill[index]) % self.options.window
        self.loss_windows[index, slot] = loss
        self.window_fill[index] += 1

    def _fresh_expert(self, ctx: RunContext) -> nn.Module:
        """The scenario's architecture, every parameter re-drawn from the plugin's seed."""
        expert = copy.deepcopy(self.experts[0]).to("cpu")
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in expert.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        expert.zero_grad(set_to_none=True)
        return expert.to(ctx.device)

    def _add_expert(self, ctx: RunContext, expert: nn.Module) -> None:
        """Append ``expert`` and its rows of state; re-size the selector and the buffer."""
        if len(self.experts) >= torch.iinfo(torch.int16).max:
            raise ConfigError("tame: the expert tags are int16; no more experts fit")
        # the whole label space from the start: a growing head's outputs all switched on
        expose_labels(expert, torch.arange(ctx.n_classes))
        self.experts.append(expert)
        nan = torch.tensor([float("nan")])
        self.loss_windows = torch.cat([self.loss_windows,
                                       torch.zeros(1, self.options.window)])
        self.window_fill = torch.cat([self.window_fill, torch.zeros(1, dtype=torch.long)])
        self.smoothed_losses = torch.cat([self.smoothed_losses, nan])
        self.thresholds = torch.cat([self.thresholds, nan])
        self.expert_classes = torch.cat(
            [self.expert_classes, torch.zeros(1, ctx.n_classes, dtype=torch.bool)])
        self.pruned = torch.cat([self.pruned, torch.zeros(1, dtype=torch.bool)])
        self.optimizer_state.append([])  # made by the expert's first step
        n = len(self.experts)
        self.selector = self._build_selector(ctx, n) if n > 1 else None
        self.selector_stale.fill_(n > 1)
        if self.buffer is not None:  # expert 0 (setup): clsim_size_stores sizes it
            self._size_buffer(ctx)
        if n > 1:
            ctx.log("tame_new_expert", expert=n - 1, position=int(self.position),
                    buffer_capacity=self.buffer.capacity)

    # -- memory -----------------------------------------------------------------

    def _size_buffer(self, ctx: RunContext) -> None:
        """Capacity from the budget (or ``capacity``); fail naming the minimum budget for
        the experts held now."""
        if ctx.budget_bytes is None:
            capacity = self.options.capacity
        else:
            seen = 1 if self.buffer is None else max(1, int(self.buffer.class_seen.sum()))
            beside = self._beside(ctx)
            item_bytes = PriorityBuffer.item_bytes(ctx.sample_bytes, ctx.n_classes)
            fits = items_that_fit(
                ctx.budget_bytes, beside, item_bytes,
                plugin="tame", items="buffered sample(s)",
                at_least=max(seen, self.options.capacity or 0),
                overhead=f"{len(self.experts)} expert(s) with their optimizer state, the "
                         "selector, bookkeeping and the other plugins' state")
            capacity = self.options.capacity or fits
            if self.options.capacity is None and (self.buffer is None
                                                  or capacity < self.buffer.capacity):
                announce(ctx, "buffer", capacity, item_bytes, beside,
                         stored="buffered samples", when=f"with {len(self.experts)} expert(s)")
        if self.buffer is None:
            self.buffer = PriorityBuffer(capacity, ctx.sample_shape, ctx.sample_dtype,
                                         ctx.n_classes)
        elif capacity != self.buffer.capacity:
            self.buffer = self.buffer.resized(min(capacity, self.buffer.capacity))

    def _beside(self, ctx: RunContext) -> Beside:
        """What is held besides the buffer's items: experts, their optimizer state,
        selector, bookkeeping, an empty buffer, every other plugin's state and the log
        reserve."""
        empty = PriorityBuffer(0, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes)
        # tame owns every experience (clsim_train_experience): the loop carries no
        # optimizer; the experts' own optimizers are on the plugin, measured here
        return held_beside(ctx, "tame", self, "buffer", empty, loop_state=0, reserved={
            f"{LOG_RESERVE} more logged switches": LOG_RESERVE * _LOG_COLUMNS * 8})

    def _refuse_buffer(self, ctx: RunContext, why: str) -> None:
        """The buffer cannot hold one sample of each class seen: say what would."""
        seen = int(self.buffer.class_seen.sum())
        if self.options.capacity is not None or ctx.budget_bytes is None:
            raise ConfigError(f"tame: {why}; raise 'capacity' to at least {seen}")
        self._size_buffer(ctx)  # raises naming the minimum budget for the classes seen
        raise ConfigError(f"tame: {why}")

    # -- pruning ---------------------------------------------------------------

    def _prune_expert(self, ctx: RunContext, index: int) -> None:
        """Prune expert ``index`` to ``expert_sparsity`` and fine-tune it on its items."""
        expert = self.experts[index]
        magnitude_prune(expert, self.options.expert_sparsity)
        self.pruned[index] = True
        x, labels, tags = self.buffer.stored()
        mine = tags == index
        if self.options.finetune_epochs and bool(mine.any()):
            self._fit(ctx, Trainable(expert), x[mine], labels[mine],
                      self.options.finetune_epochs, ctx.batch_size, masked=True)

    def _fit(self, ctx: RunContext, trainable: Trainable, x: torch.Tensor,
             targets: torch.Tensor, epochs: int, batch_size: int, *, masked: bool) -> None:
        """Shuffled mini-batches of cross-entropy on raw samples, stepped by the
        scenario's optimizer (fresh for the call, at ``trainable.lr_scale``) under its
        non-finite policy; ``masked`` holds pruned weights at zero."""
        module = trainable.params
        optimizer = ctx.new_optimizer([trainable])
        masks = self._masks(module) if masked else []
        targets = targets.to(ctx.device)
        module.train()
        for _ in range(epochs):
            order = torch.randperm(len(targets), generator=self.generator)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                with ctx.compute_step("fit", _size(module), tuple(x[index].shape)):
                    logits = module(ctx.to_input(x[index]))
                    loss = F.cross_entropy(logits, targets[index.to(targets.device)])
                    stepped = ctx.backward_step(optimizer, loss)
                if stepped and masks:
                    with torch.no_grad():
                        for p, mask in masks:
                            p.mul_(mask)
        module.zero_grad(set_to_none=True)

    # -- selector --------------------------------------------------------------

    def _build_selector(self, ctx: RunContext, n_experts: int) -> nn.Sequential:
        width = math.prod(ctx.sample_shape)
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            selector = nn.Sequential(
                nn.Flatten(),
                nn.Linear(width, self.options.selector_hidden),
                nn.ReLU(),
                nn.Linear(self.options.selector_hidden, n_experts),
            )
        return selector.to(ctx.device)

    def _refresh_selector(self, ctx: RunContext) -> None:
        """Train the selector from scratch on the buffer if it changed since last time."""
        if self.selector is None or not bool(self.selector_stale):
            return
        o = self.options
        self.selector = self._build_selector(ctx, len(self.experts))
        x, _, tags = self.buffer.stored()
        selector = Trainable(self.selector, o.selector_lr_scale)
        self._fit(ctx, selector, x, tags, o.selector_epochs, o.selector_batch_size,
                  masked=False)
        if o.prune:
            magnitude_prune(self.selector, o.selector_sparsity)
            if o.finetune_epochs:
                self._fit(ctx, selector, x, tags, o.finetune_epochs, o.selector_batch_size,
                          masked=True)
        self.selector.eval()
        self.selector_stale.fill_(False)

    # -- prediction ------------------------------------------------------------

    @torch.no_grad()
    def route(self, inputs: torch.Tensor) -> torch.Tensor:
        """The expert the selector picks for each model input."""
        if self.selector is None:
            return torch.zeros(len(inputs), dtype=torch.long, device=inputs.device)
        self.selector.eval()
        return self.selector(inputs).argmax(dim=1)

    @torch.no_grad()
    def expert_predict(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        """Expert ``index``'s argmax over the classes it has trained on."""
        expert = self.experts[index]
        was = expert.training
        expert.eval()
        logits = expert(inputs)
        expert.train(was)
        own = self.expert_classes[index].to(logits.device)
        return logits.masked_fill(~own, float("-inf")).argmax(dim=1)

    @torch.no_grad()
    def clsim_predict(self, ctx: RunContext, x: torch.Tensor) -> torch.Tensor | None:
        if not bool(self.expert_classes.any()):
            return None  # nothing trained yet: the model's own argmax
        routes = self.route(x)
        predicted = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for index in routes.unique().tolist():
            rows = routes == index
            if bool(self.expert_classes[index].any()):
                chosen = x[rows]  # how many rows the selector routes here: memoised apart
                with ctx.compute_step("predict", index, tuple(chosen.shape),
                                      _size(self.experts[index])):
                    predicted[rows] = self.expert_predict(index, chosen)
        return predicted

    # -- report ----------------------------------------------------------------

    @torch.no_grad()
    def clsim_report(self, ctx: RunContext, stream: Stream) -> dict[str, Any]:
        o = self.options
        log = self.switches.tolist()
        detections = [row[1] for row in log]
        boundaries = list(stream.boundaries())
        scores = score_detections(detections, boundaries, o.delay_window * ctx.batch_size)
        for entry in scores["boundaries"]:
            delay = entry["delay_samples"]
            entry["delay_batches"] = None if delay is None else -(-delay // ctx.batch_size)
        # which expert trained each stretch of the stream: segments between switches
        starts = [0] + [row[0] for row in log]
        owners = [0] + [row[3] for row in log]
        ends = starts[1:] + [int(self.position)]
        per_task = []
        for exp, begin in zip(stream, boundaries, strict=True):
            counts = [0] * len(self.experts)
            for s, e, owner in zip(starts, ends, owners, strict=True):
                counts[owner] += max(0, min(e, begin + exp.n_train) - max(s, begin))
            per_task.append(counts)
        task_expert = [max(range(len(c)), key=lambda i, c=c: (c[i], -i)) for c in per_task]
        # distinct test sets (a recurring task tests the same set): the oracle expert of a
        # class group is the one that trained most of its samples over all its occurrences
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, exp in enumerate(stream):
            groups.setdefault(tuple(exp.classes), []).append(j)
        within = routed = total = 0
        within_per_task = []
        for members in groups.values():
            counts = [sum(per_task[j][i] for j in members) for i in range(len(self.experts))]
            oracle = max(range(len(counts)), key=lambda i: (counts[i], -i))
            exp = stream[members[0]]
            right = route_right = 0
            for start in range(0, exp.n_test, 1024):
                inputs = ctx.to_input(exp.test_x[start : start + 1024])
                y = exp.test_y[start : start + 1024].to(ctx.device)
                right += int((self.expert_predict(oracle, inputs) == y).sum())
                route_right += int((self.route(inputs) == oracle).sum())
            within += right
            routed += route_right
            total += exp.n_test
            within_per_task.append({"classes": list(exp.classes), "expert": oracle,
                                    "accuracy": right / exp.n_test})
        sequence = [0] + [row[3] for row in log]
        return {
            "n_experts": len(self.experts),
            "expert_sequence": sequence,
            "switches": [{"batch_start": r[0], "position": r[1], "source": r[2],
                          "target": r[3], "created": bool(r[4])} for r in log],
            "detections": detections,
            "true_boundaries": boundaries,
            "delay_window_samples": o.delay_window * ctx.batch_size,
            "boundary_detection": scores["boundaries"],
            "missed_boundaries": scores["missed_boundaries"],
            "false_alarms": scores["false_alarms"],
            "expert_per_task": task_expert,
            "expert_samples_per_task": per_task,
            "within_expert_accuracy": within / total if total else None,
            "within_expert_accuracy_per_task": within_per_task,
            "routing_accuracy": routed / total if total else None,
            "thresholds": [None if v != v else v for v in self.thresholds.tolist()],
            "pruning": o.prune,
            "expert_sparsity": [sparsity_of(e) for e in self.experts],
            "selector_sparsity": None if self.selector is None else sparsity_of(self.selector),
            "expert_packed_bytes": [packed_bytes(e) for e in self.experts],
            "buffer": {"capacity": self.buffer.capacity, "stored": len(self.buffer),
                       "per_class": self.buffer.per_class()},
        }


def _size(module: nn.Module) -> tuple[int, bool]:
    """A module's parameter count and whether it trains (``ctx.compute_step`` signatures)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), any(p.requires_grad for p in params)
