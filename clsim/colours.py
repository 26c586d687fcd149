"""One colour and marker per strategy name, the same in every figure clsim draws.

The style is a function of the name alone (a SHA-256 of it), not of the other strategies
in the figure, so a strategy keeps its colour between ``clsim compare``'s plot and
``clsim run``'s figure, and between runs that name different strategies. Two names can
share a colour (13 of them); the marker then usually tells them apart. ``SALT`` is the
first that gives every bundled scenario's strategies distinct colours.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# distinct on white and for most colour-vision deficiencies (after Trubetskoy's 20
# distinct colours, the light ones dropped)
PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
    "#469990", "#9a6324", "#800000", "#808000", "#000075", "#a9a9a9",
)
MARKERS = ("o", "s", "^", "D", "v", "P")
SALT = 14


@dataclass(frozen=True)
class StrategyStyle:
    colour: str
    marker: str


def strategy_style(name: str) -> StrategyStyle:
    """The colour and marker of strategy ``name`` in every plot."""
    digest = hashlib.sha256(f"{SALT}:{name}".encode()).digest()
    return StrategyStyle(PALETTE[int.from_bytes(digest[:8], "big") % len(PALETTE)],
                         MARKERS[int.from_bytes(digest[8:16], "big") % len(MARKERS)])


def strategy_colour(name: str) -> str:
    """The colour of strategy ``name`` (a hex string matplotlib accepts)."""
    return strategy_style(name).colour


LINE_STYLES = ("-", "--", ":", "-.")
"""The lines of one strategy at successive levels of a second budget axis (a plot along
memory through points that also vary compute, and the other way round)."""
