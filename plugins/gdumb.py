"""GDumb: a greedy class-balanced sampler, then a model trained from scratch on it alone.

Prabhu, Torr and Dokania, "GDumb: A Simple Approach that Questions Our Progress in
Continual Learning", ECCV 2020. The learner never trains on the stream: a greedy sampler
(the paper's Algorithm 1) fills a memory of ``k`` samples, and before every evaluation
the model is re-initialised and trained on the memory only (the paper's "dumb learner").

**The algorithm as hooks over the standard loop**, in the order they run:

- ``clsim_setup``: keep the model's initial state (``initial``, a state_dict copy) and,
  with a fixed ``capacity``, allocate the memory; ``clsim_size_stores`` otherwise sizes
  it from what the budget leaves;
- ``clsim_plan_experience``: (1) Algorithm 1, sample by sample in stream order: with
  ``Y`` the classes met so far (this sample's included) and ``k_c = k / |Y|``, a sample
  of class ``y`` is admitted when ``y`` holds fewer than ``k_c`` samples; if the memory is
  full, a random sample of the largest class (ties broken at random) is evicted to make
  room; otherwise the sample is dropped; (2) re-initialise the model from ``initial``;
  (3) return a plan that trains on the memory's samples (not the stream's) for the
  scenario's epochs. Evaluation follows the experience's training, so the model scored
  after each experience is, as in the paper, one trained from scratch on the memory just
  before it is tested.

The memory is a :class:`clsim_plugins.buffers.ExemplarBuffer` (raw dtype samples, the
narrowest label dtype); only its admission rule (above) is GDumb's own, since replay's
``class_balanced`` rule differs (it refreshes a full class by reservoir sampling instead of
refusing it, and breaks ties by the first largest class).

**Re-initialisation, chosen**: from a copy of the initial ``state_dict`` (parameters and
buffers: BatchNorm statistics, the head's output mask), as Avalanche's ``GDumbPlugin``
keeps a copy of the initial model. It is exact for every model, and it costs one model's
bytes, which the ledger charges under ``gdumb.initial`` from setup on (so a budget-sized
memory is smaller by one model). Re-seeding each module's ``reset_parameters`` would hold
no bytes, but depends on every module having one and covering its buffers; not done here.

**Reconstructed / defaults**: the paper varies ``k`` per benchmark (e.g. 500 on
SplitMNIST, 200-2000 on CIFAR-10/100); Avalanche's ``GDumbPlugin(mem_size=200)`` and
continual-learning-baselines' class-incremental SplitMNIST (``mem_size=4400``, 400x2 MLP,
SGD lr 0.1, 10 epochs, batch 16). Here ``capacity`` defaults to what the budget leaves
(the clsim convention for stores); epochs, optimizer and batch size are the scenario's.
The paper's cosine-annealed SGD with warm restarts and CutMix are not reproduced (they
are training settings, not the method). Online streams: the memory takes each part and
the model is retrained at every part (one epoch, as an online plan must).

**Memory**: ``buffer`` (capacity x (sample bytes + label bytes), plus per-class counters)
and ``initial`` (one model), nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from clsim_plugins.buffers import ExemplarBuffer, require_capacity_or_budget, stored_sample_bytes

from clsim.capacity import size_store
from clsim.context import RunContext
from clsim.loop_types import ExperiencePlan
from clsim.stream import Experience


@dataclass
class GdumbOptions:
    """Options of the gdumb plugin (the paper's ``k`` is ``capacity``)."""

    capacity: int | None = field(
        default=None,
        metadata={"min": 1, "help": "samples the memory keeps (the paper's k); default: what "
                                    "the budget leaves after the model and its initial copy"},
    )


class GdumbPlugin:
    """GDumb: greedy class-balanced memory, model retrained from scratch on it."""

    Options = GdumbOptions

    def __init__(self, options: GdumbOptions | None = None) -> None:
        self.options = options or GdumbOptions()
        self.buffer: ExemplarBuffer | None = None
        self.initial: dict[str, torch.Tensor] | None = None

    # -- setup: the initial weights, and a fixed memory now -------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        self.initial = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
        require_capacity_or_budget("gdumb", self.options.capacity, ctx)
        if self.options.capacity is not None:
            self.buffer = self._buffer(ctx, self.options.capacity)

    def clsim_size_stores(self, ctx: RunContext) -> None:
        """The memory fills what the budget leaves beside the whole strategy."""
        if self.options.capacity is not None:
            return
        capacity = size_store(ctx, "gdumb", self, "buffer", self._buffer(ctx, 0),
                              stored_sample_bytes(ctx), loop_state=ctx.loop_state_bytes(),
                              items="sample", stored="samples")
        self.buffer = self._buffer(ctx, capacity)

    @staticmethod
    def _buffer(ctx: RunContext, capacity: int) -> ExemplarBuffer:
        return ExemplarBuffer(capacity, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes,
                              ctx.torch_generator("gdumb"))

    # -- each experience: sample, re-initialise, train on the memory only ------

    def clsim_plan_experience(self, ctx: RunContext, experience: Experience,
                              plan: ExperiencePlan) -> ExperiencePlan:
        self.sample(experience.train_x, experience.train_y)
        self.reinitialise(ctx)
        x, y = self.buffer.stored()
        return replace(plan, x=x, y=y.to(plan.y.dtype),
                       task_ids=None if plan.task_ids is None else
                       torch.full_like(y, -1, dtype=plan.task_ids.dtype))

    def sample(self, x: torch.Tensor, y: torch.Tensor) -> list[bool]:
        """Algorithm 1 over ``(x, y)`` in order; whether each sample was admitted."""
        buffer, admitted = self.buffer, []
        counts = buffer.class_counts
        for i, label in enumerate(y.tolist()):
            buffer.n_seen += 1
            buffer.class_seen[label] += 1
            n_classes = int((buffer.class_seen > 0).sum())  # |Y|, this sample's class included
            if counts[label] * n_classes >= buffer.capacity:  # n_y >= k / |Y|: not admitted
                admitted.append(False)
                continue
            if buffer.size < buffer.capacity:
                slot = buffer.size
                buffer.size += 1
            else:  # full: a random sample of a largest class (ties at random) makes room
                largest = np.flatnonzero(counts == counts.max())
                victim = int(largest[self._draw(len(largest))])
                slots = (buffer.y[: buffer.size] == victim).nonzero().squeeze(1)
                slot = int(slots[self._draw(len(slots))])
                counts[victim] -= 1
            buffer.x[slot] = x[i]
            buffer.y[slot] = label
            counts[label] += 1
            admitted.append(True)
        return admitted

    def _draw(self, n: int) -> int:
        return 0 if n == 1 else int(torch.randint(n, (), generator=self.buffer.generator))

    def reinitialise(self, ctx: RunContext) -> None:
        """The model's parameters and buffers back to their values at setup, in place
        (the optimizer the loop builds next sees the same parameter objects)."""
        ctx.model.load_state_dict(self.initial)
