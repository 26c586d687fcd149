"""Joint training: the upper bound that trains on all data seen so far."""

from __future__ import annotations

import torch

from clsim.loop_types import ExperiencePlan
from clsim.stream import Experience


class JointPlugin:
    """Train on the union of every experience seen so far (and be charged for keeping it).

    The standard loop trains on the plan this plugin widens to every sample kept. The
    ledger charges every past sample the plugin holds, so joint training shows up in a
    comparison at its true memory cost rather than as a free upper bound.
    """

    def __init__(self) -> None:
        self.seen_x: list[torch.Tensor] = []
        self.seen_y: list[torch.Tensor] = []

    def clsim_plan_experience(
        self, experience: Experience, plan: ExperiencePlan
    ) -> ExperiencePlan:
        """The experience's plan (as earlier plugins left it) with every earlier sample
        appended; their task ids are not kept, so they read -1 where the plan has some."""
        earlier_x, earlier_y = list(self.seen_x), list(self.seen_y)
        self.seen_x.append(experience.train_x)
        self.seen_y.append(experience.train_y)
        if not earlier_x:
            return plan
        return plan.extended(torch.cat(earlier_x), torch.cat(earlier_y))
