"""Experience replay with reservoir, class-balanced or herding selection, and iCaRL's
nearest-mean-of-exemplars readout.

Each training batch is concatenated with an equal-size uniform draw from memory (ER,
Chaudhry et al. 2019). Reservoir and class-balanced memories update after every batch
with the stream's own samples (``update: batch``, ER's rule), or with ``update:
experience_end`` once per experience with all its samples, so an experience replays only
what earlier ones left (the schedule of Avalanche's ``Replay``); herding (Rebuffi et al.,
iCaRL, CVPR 2017) rebuilds the memory after each experience with an even share per seen
class. Unless ``capacity`` is
given, the buffer holds what the budget leaves after the whole strategy once every plugin
has set up (the model, this plugin's own bookkeeping, every other plugin's state, the
loop's optimizer state), divided by the bytes of one stored sample plus its label
(:mod:`clsim.capacity`; the run's log says what it subtracted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from clsim_plugins.buffers import (
    ExemplarBuffer,
    herding_order,
    require_capacity_or_budget,
    stored_sample_bytes,
)

from clsim.capacity import size_store
from clsim.context import RunContext
from clsim.errors import ConfigError
from clsim.stream import Batch, Experience


@dataclass
class ReplayOptions:
    selection: Literal["reservoir", "class_balanced", "herding"] = field(
        default="reservoir", metadata={"help": "which samples the memory keeps"}
    )
    capacity: int | None = field(
        default=None,
        metadata={
            "min": 1,
            "help": "samples stored; default: what the budget leaves after the model",
        },
    )
    batch_size_mem: int | None = field(
        default=None,
        metadata={"min": 1, "help": "memory samples per batch; default: the batch size"},
    )
    nme: bool = field(
        default=False, metadata={"help": "predict with the nearest mean of exemplars (iCaRL)"}
    )
    update: Literal["batch", "experience_end"] = field(
        default="batch",
        metadata={"help": "when reservoir / class_balanced memories take the stream's samples: "
                          "after every batch (ER), or at each experience's end"},
    )


class ReplayPlugin:
    """Experience replay (reservoir, class-balanced or herding memory; optional NME)."""

    Options = ReplayOptions

    def __init__(self, options: ReplayOptions) -> None:
        self.options = options
        self.buffer: ExemplarBuffer | None = None
        self.class_means: torch.Tensor | None = None

    # -- setup: a fixed buffer now, one sized from the budget once all have set up --

    def clsim_setup(self, ctx: RunContext) -> None:
        if self.options.nme:  # allocated now so that sizing charges it
            self.class_means = torch.zeros(ctx.n_classes, ctx.model.feature_dim, device=ctx.device)
        require_capacity_or_budget("replay", self.options.capacity, ctx)
        if self.options.capacity is not None:
            self.buffer = self._buffer(ctx, self.options.capacity)

    def clsim_size_stores(self, ctx: RunContext) -> None:
        """The buffer fills what the budget leaves beside the whole strategy."""
        if self.options.capacity is not None:
            return
        capacity = size_store(ctx, "replay", self, "buffer", self._buffer(ctx, 0),
                              stored_sample_bytes(ctx), loop_state=ctx.loop_state_bytes(),
                              items="exemplar", stored="exemplars")
        self.buffer = self._buffer(ctx, capacity)

    @staticmethod
    def _buffer(ctx: RunContext, capacity: int) -> ExemplarBuffer:
        return ExemplarBuffer(capacity, ctx.sample_shape, ctx.sample_dtype, ctx.n_classes,
                              ctx.torch_generator("replay"))

    # -- training: mix memory into every batch, update the memory -----------

    def clsim_before_batch(self, batch: Batch) -> Batch | None:
        if not self.buffer:
            return None
        x, y = self.buffer.sample(self.options.batch_size_mem or batch.n_stream)
        return batch.extend(x, y)

    def clsim_after_batch(self, batch: Batch) -> None:
        if self.options.update == "batch":
            own = batch.stream_part()
            self._add(own.x.cpu(), own.y.cpu())

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.options.selection == "reservoir":
            self.buffer.add_reservoir(x, y)
        elif self.options.selection == "class_balanced":
            self.buffer.add_class_balanced(x, y)

    def clsim_after_experience(self, ctx: RunContext, experience: Experience) -> None:
        if self.options.update == "experience_end" and self.options.selection != "herding":
            if not experience.classes:
                raise ConfigError(
                    "replay: update: experience_end stores an experience's samples at its "
                    "end, and with hidden boundaries there is no such end; use update: batch"
                )
            self._add(experience.train_x, experience.train_y)  # in the stream's order
        if self.options.selection == "herding":
            self.herd(ctx, experience)
        if self.options.nme:
            self.update_class_means(ctx)

    def herd(self, ctx: RunContext, experience: Experience) -> None:
        """Keep the first m herding picks of every seen class, m = capacity // classes."""
        if not experience.classes:
            raise ConfigError(
                "replay (herding): herding picks exemplars from an experience's data at its "
                "end, and with hidden boundaries there is no such end; use selection: "
                "reservoir or class_balanced"
            )
        per_class = self.buffer.capacity // len(ctx.seen_classes)
        if per_class == 0:
            raise ConfigError(
                f"replay (herding): a capacity of {self.buffer.capacity} exemplars cannot give "
                f"each of the {len(ctx.seen_classes)} seen classes one; raise the budget or "
                "the capacity, or use selection: reservoir"
            )
        old_x, old_y = self.buffer.stored()
        keep_x, keep_y = [], []
        for c in ctx.seen_classes:
            if c in experience.classes:
                samples = experience.train_x[experience.train_y == c]
                with ctx.compute_part("herding"):  # charged as replay.herding
                    order = herding_order(ctx.features(samples), per_class)
                keep_x.append(samples[order])
            else:  # stored in herding order already: shrinking keeps the prefix
                keep_x.append(old_x[old_y == c][:per_class])
            keep_y.append(torch.full((len(keep_x[-1]),), c, dtype=torch.long))
        self.buffer.replace_all(torch.cat(keep_x), torch.cat(keep_y))

    # -- evaluation: nearest mean of exemplars --------------------------------

    def update_class_means(self, ctx: RunContext) -> None:
        """The normalised mean of each class's normalised exemplar features (public, like
        :meth:`herd`: iCaRL runs both on a replay memory of its own)."""
        x, y = self.buffer.stored()
        self.class_means.zero_()
        if len(y) == 0:
            return
        features = torch.nn.functional.normalize(ctx.features(x), dim=1)
        y = y.to(features.device)
        for c in y.unique().tolist():
            self.class_means[c] = torch.nn.functional.normalize(features[y == c].mean(0), dim=0)

    def clsim_predict(self, ctx: RunContext, x: torch.Tensor) -> torch.Tensor | None:
        if not self.options.nme or not self.buffer:
            return None
        features = torch.nn.functional.normalize(ctx.model.features(x), dim=1)
        # classes with exemplars are exactly those with a (unit-norm, so non-zero) mean
        known = self.class_means.any(dim=1).nonzero().squeeze(1)
        if len(known) == 0:  # no means yet (online, before the first experience end)
            return None
        distance = torch.cdist(features, self.class_means[known])
        if ctx.labels is None or ctx.labels.n_levels == 1:
            return known[distance.argmin(dim=1)]
        # hierarchical labels: the nearest mean within each level, -1 for a level without
        return torch.stack([self._nearest_in(known, distance, ctx.labels.level_slice(level))
                            for level in range(ctx.labels.n_levels)], dim=1)

    @staticmethod
    def _nearest_in(known: torch.Tensor, distance: torch.Tensor, level: slice) -> torch.Tensor:
        inside = (known >= level.start) & (known < level.stop)
        if not bool(inside.any()):
            return torch.full((len(distance),), -1, dtype=known.dtype, device=known.device)
        return known[inside][distance[:, inside].argmin(dim=1)]
