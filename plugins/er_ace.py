"""ER-ACE: experience replay with the asymmetric cross-entropy (Caccia, Aljundi, Asadi,
Tuytelaars, Pineau and Belilovsky, "New Insights on Reducing Abrupt Representation Change
in Online Continual Learning", ICLR 2022), as hooks over the standard loop.

The paper's algorithm (ER with ACE), in the order the hooks below run::

    for each incoming batch (x_in, y_in):
        (x_bf, y_bf) <- a batch drawn from the memory                clsim_before_batch
        L = CE(logits(x_in) over the classes in y_in only, y_in)      clsim_task_loss
          + CE(logits(x_bf) over every class seen so far, y_bf)
        step on L                                                     the loop
        reservoir-update the memory with (x_in, y_in)                 clsim_after_batch

The incoming samples' logits of classes absent from the incoming batch are masked out of
their softmax, so new classes do not push the old ones' logits down; the replayed
samples use the full cross-entropy over the seen classes (``ctx.seen_classes``). The
replayed rows travel in the same batch, after the stream's own (``batch.extend``), so
one forward serves both, and the task loss replaces the loop's default
(``clsim_task_loss``): the two terms are summed, as in the paper's equation and the
authors' code (Avalanche's ``ER_ACE`` halves the sum).

Reconstructed, and where it differs from the authors' code: the incoming batch is
masked from the first batch on (their code masks from the second task, and also leaves
unmasked the outputs above the largest class seen, a detail of their label order);
hierarchical label spaces are refused (the masks are defined on one flat level). The
paper's setting: online (one epoch), incoming and memory batches of 10, a reservoir
memory (100 to 1000 samples on split CIFAR-10); here ``batch_size_mem`` defaults to the
scenario's batch size, as in their code. Unless ``capacity`` is given, the memory holds
what the budget leaves beside the whole strategy (:mod:`clsim.capacity`); the ledger
charges its samples at their raw dtype and their labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from clsim_plugins.buffers import ExemplarBuffer, require_capacity_or_budget, stored_sample_bytes

from clsim.capacity import size_store
from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.loop_types import ForwardOutput
from clsim.stream import Batch


@dataclass
class ErAceOptions:
    capacity: int | None = field(
        default=None, metadata={"min": 1, "help": "samples stored; default: what the "
                                                  "budget leaves after the strategy"})
    batch_size_mem: int | None = field(
        default=None, metadata={"min": 1, "help": "memory samples per batch; default: "
                                                  "the batch size"})


def restricted_cross_entropy(logits: torch.Tensor, y: torch.Tensor,
                             classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` over the outputs ``classes`` only (sorted class ids,
    holding every label of ``y``): the other outputs are left out of the softmax."""
    target = torch.searchsorted(classes, y.contiguous())
    return F.cross_entropy(logits.index_select(1, classes), target)


class ErAcePlugin:
    """ER-ACE: reservoir replay; the incoming batch's softmax spans its own classes only."""

    Options = ErAceOptions

    def __init__(self, options: ErAceOptions) -> None:
        self.options = options
        self.buffer: ExemplarBuffer | None = None

    # -- the memory: a fixed capacity now, or what the budget leaves ----------------

    def clsim_setup(self, ctx: RunContext) -> None:
        if ctx.labels is not None and ctx.labels.n_levels > 1:
            raise ConfigError("er_ace masks the logits of one flat label space; this "
                              f"stream has {ctx.labels.n_levels} label levels")
        require_capacity_or_budget("er_ace", self.options.capacity, ctx)
        if self.options.capacity is not None:
            self.buffer = self._buffer(ctx, self.options.capacity)

    def clsim_size_stores(self, ctx: RunContext) -> None:
        if self.options.capacity is not None:
            return
        self.buffer = self._buffer(ctx, size_store(
            ctx, "er_ace", self, "buffer", self._buffer(ctx, 0), stored_sample_bytes(ctx),
            loop_state=ctx.loop_state_bytes(), items="exemplar", stored="exemplars"))

    @staticmethod
    def _buffer(ctx: RunContext, capacity: int) -> ExemplarBuffer:
        return ExemplarBuffer(capacity, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes,
                              ctx.torch_generator("er_ace"))

    # -- each incoming batch: replay, the asymmetric loss, then the reservoir -------

    def clsim_before_batch(self, batch: Batch) -> Batch | None:
        if not self.buffer:
            return None
        return batch.extend(*self.buffer.sample(self.options.batch_size_mem or batch.n_stream))

    def clsim_task_loss(self, ctx: RunContext, batch: Batch, output: ForwardOutput
                        ) -> torch.Tensor:
        n, rows = batch.n_stream, len(batch)
        logits = output.logits.reshape(output.views, rows, -1)  # view after view
        targets = output.targets.reshape(output.views, rows)
        width = logits.shape[-1]
        present = targets[:, :n].unique()  # sorted
        loss = restricted_cross_entropy(logits[:, :n].reshape(-1, width),
                                        targets[:, :n].reshape(-1), present)
        if n < rows:
            replayed = targets[:, n:].reshape(-1)
            # every seen class, and the stored labels too: with hidden boundaries the
            # engine adds a part's classes to ctx.seen_classes only after it has trained
            seen = torch.unique(torch.cat([replayed, torch.tensor(
                ctx.seen_classes, dtype=replayed.dtype, device=replayed.device)]))
            loss = loss + restricted_cross_entropy(logits[:, n:].reshape(-1, width),
                                                   replayed, seen)
        return loss

    def clsim_after_batch(self, batch: Batch) -> None:
        incoming = batch.stream_part()
        self.buffer.add_reservoir(incoming.x.cpu(), incoming.y.cpu())
