"""DER and DER++: dark experience replay (Buzzega, Boschini, Porrello, Abati and
Calderara, "Dark Experience for General Continual Learning: a Strong, Simple Baseline",
NeurIPS 2020), as hooks over the standard loop.

The paper's Algorithm 1 (DER++; DER is ``beta = 0``), in the order the hooks below run::

    for each batch (x, y):
        L = CE(h(x), y)                                               the loop's task loss
        (x', z')      <- a batch drawn from the memory M              clsim_loss
        L += alpha * || h(x') - z' ||^2                               (same hook)
        (x'', y'')    <- another batch drawn from M     (DER++ only)
        L += beta * CE(h(x''), y'')                                   (same hook)
        step on L                                                     the loop
        M <- reservoir(M, (x, z = h(x), y))                           clsim_after_batch

Reconstructed as the authors' code (mammoth) does it: the logits stored with a sample
are those of the batch's forward pass, taken before the optimizer's step (the loop hands
them to ``clsim_after_batch``; with augmented views, the first view's), detached, as
float32; the squared distance is the mean over the stored logits (``F.mse_loss``); the
memory batches are separate forward passes of ``batch_size_mem`` samples each, drawn
independently; the memory is a reservoir over every sample the stream delivers.

Logits of classes not seen yet: the memory stores the full output vector of the head at
storing time, one column per output of the label space (``ctx.n_classes``), future
classes included, as mammoth does with its fixed-size head. Where the head produced no
value for an output (a head narrower than the label space, one that widens later, or an
output a masked head had switched off), the column is stored as NaN and the distance is
the mean over the stored values only, so a logit the model never produced is never
regressed to (with a plain head every value is stored and the term is mammoth's).

Defaults: ``alpha = 0.3``, ``beta = 0`` (DER), the paper's best for seq-CIFAR-10 with a
buffer of 500 (its appendix of hyperparameters, mammoth's ``best_args``); DER++ there
uses ``alpha = 0.2, beta = 0.5``. ``batch_size_mem`` defaults to the scenario's batch
size (mammoth's ``minibatch_size`` equals its ``batch_size``). Unless ``capacity`` is
given, the memory holds what the budget leaves beside the whole strategy
(:mod:`clsim.capacity`), one item being a raw sample at its dtype, its label and its
float32 logits; the ledger charges exactly those three arrays (``der.buffer.x``, ``.y``,
``.logits``) and the buffer's per-class counts. DER itself needs no labels; the shared
reservoir keeps them (one byte each for up to 256 classes), and DER++ reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from clsim_plugins.buffers import ExemplarBuffer, require_capacity_or_budget, stored_sample_bytes

from clsim.capacity import size_store
from clsim.context import RunContext
from clsim.models.heads import active_outputs
from clsim.stream import Batch


@dataclass
class DerOptions:
    alpha: float = field(default=0.3, metadata={"min": 0, "help": "weight of the logit "
                                                                  "distance on memory"})
    beta: float = field(default=0.0, metadata={"min": 0, "help": "weight of the memory's "
                                                                 "cross-entropy (DER++); 0: DER"})
    capacity: int | None = field(
        default=None, metadata={"min": 1, "help": "samples stored; default: what the "
                                                  "budget leaves after the strategy"})
    batch_size_mem: int | None = field(
        default=None, metadata={"min": 1, "help": "memory samples per term; default: "
                                                  "the batch size"})


class LogitBuffer(ExemplarBuffer):
    """A reservoir of (raw sample, label, logits): ``logits[i]`` are the float32 logits
    stored with sample ``i``, NaN where the head gave no value. The slots are the
    reservoir's own: every write of a sample (``_write``) writes its logits beside it."""

    def __init__(self, capacity: int, sample_shape: tuple[int, ...],
                 sample_dtype: torch.dtype, n_classes: int,
                 generator: torch.Generator) -> None:
        super().__init__(capacity, sample_shape, sample_dtype, n_classes, generator)
        self.logits = torch.zeros(capacity, n_classes, dtype=torch.float32)
        self._offered: torch.Tensor | None = None  # the logits of the batch being added

    def add_with_logits(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        """Reservoir-update with ``(x, y)``, storing ``logits`` (N x n_classes) with them."""
        self._offered = logits
        try:
            self.add_reservoir(x, y)
        finally:
            self._offered = None

    def _write(self, writes: dict[int, int], x: torch.Tensor, labels: list[int]) -> None:
        super()._write(writes, x, labels)
        if writes and self._offered is not None:
            slots = torch.tensor(list(writes), dtype=torch.long)
            rows = torch.tensor(list(writes.values()), dtype=torch.long)
            self.logits[slots] = self._offered[rows]

    def sample_with_logits(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` stored triples drawn uniformly without replacement (fewer if fewer stored)."""
        index = torch.randperm(self.size, generator=self.generator)[: min(n, self.size)]
        return (self.x.index_select(0, index), self.y.index_select(0, index).long(),
                self.logits.index_select(0, index))


def logit_distance(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between ``logits`` and ``stored`` over the stored values
    (NaN: none stored); ``F.mse_loss`` when every value is stored."""
    width = min(logits.shape[1], stored.shape[1])
    logits, stored = logits[:, :width], stored[:, :width]
    kept = ~torch.isnan(stored)
    if bool(kept.all()):
        return F.mse_loss(logits, stored)
    return (logits[kept] - stored[kept]).pow(2).mean()


class DerPlugin:
    """DER / DER++: replay memory samples against the logits they had when stored."""

    Options = DerOptions

    def __init__(self, options: DerOptions) -> None:
        self.options = options
        self.buffer: LogitBuffer | None = None

    # -- the memory: a fixed capacity now, or what the budget leaves ----------------

    def clsim_setup(self, ctx: RunContext) -> None:
        require_capacity_or_budget("der", self.options.capacity, ctx)
        if self.options.capacity is not None:
            self.buffer = self._buffer(ctx, self.options.capacity)

    def clsim_size_stores(self, ctx: RunContext) -> None:
        if self.options.capacity is not None:
            return
        item_bytes = stored_sample_bytes(ctx) + 4 * ctx.n_classes
        self.buffer = self._buffer(ctx, size_store(
            ctx, "der", self, "buffer", self._buffer(ctx, 0), item_bytes,
            loop_state=ctx.loop_state_bytes(), items="memory sample with its logits",
            stored="memory samples"))

    @staticmethod
    def _buffer(ctx: RunContext, capacity: int) -> LogitBuffer:
        return LogitBuffer(capacity, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes,
                           ctx.torch_generator("der"))

    # -- each batch: the dark-knowledge term (and DER++'s labels) on memory ---------

    def clsim_loss(self, ctx: RunContext, batch: Batch) -> torch.Tensor | None:
        if not self.buffer:
            return None
        n = self.options.batch_size_mem or batch.n_stream
        x, _, z = self.buffer.sample_with_logits(n)
        loss = self.options.alpha * logit_distance(ctx.model(ctx.to_input(x)),
                                                   z.to(ctx.device))
        if self.options.beta > 0:
            x, y, _ = self.buffer.sample_with_logits(n)
            loss = loss + self.options.beta * ctx.task_loss(ctx.model(ctx.to_input(x)), y)
        return loss

    # -- after the step: store the batch with the logits it had ---------------------

    def clsim_after_batch(self, ctx: RunContext, batch: Batch, logits: torch.Tensor) -> None:
        incoming = batch.stream_part()
        produced = logits[: incoming.n_stream].float().cpu()  # the first view's rows
        stored = torch.full((len(produced), ctx.n_classes), float("nan"))
        width = min(produced.shape[1], ctx.n_classes)
        stored[:, :width] = produced[:, :width]
        active = active_outputs(ctx.model)
        if active is not None:  # a masked head's switched-off outputs are not logits
            off = ~active.cpu()
            stored[:, : len(off)][:, off] = float("nan")
        self.buffer.add_with_logits(incoming.x.cpu(), incoming.y.cpu(), stored)
