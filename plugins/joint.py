"""Joint training: the upper bound that trains on all data seen so far."""

from __future__ import annotations

from typing import Any

import torch

from clsim.context import RunContext
from clsim.stream import Experience


class JointPlugin:
    """Train on the union of every experience seen so far (and be charged for keeping it).

    The ledger charges every past sample this plugin holds, so joint training shows up
    in a comparison at its true memory cost rather than as a free upper bound.
    """

    def __init__(self) -> None:
        self.seen_x: list[torch.Tensor] = []
        self.seen_y: list[torch.Tensor] = []

    def clsim_train_experience(self, ctx: RunContext, experience: Experience) -> Any:
        self.seen_x.append(experience.train_x)
        self.seen_y.append(experience.train_y)
        ctx.fit(torch.cat(self.seen_x), torch.cat(self.seen_y))
        return True
