"""Budget to capacity: how many items (exemplars, buffered samples) a strategy can store.

Every store sized from the budget follows one rule: measure what the strategy holds with
its store emptied (the model, the plugin's other state, the empty store itself) and what
the training loop will hold beside it at the peak (the optimizer state an online
experience carries over its parts, :meth:`clsim.context.RunContext.loop_state_bytes`: 0
offline and for a stateless optimizer), and fill what the budget leaves with whole
items. Written once here, so every plugin sizes its memory, and words its error, the
same way. The analytic learner is the exception: its state is not a count of items but
a d_b x d_b matrix, so it solves a quadratic for the largest d_b instead
(``plugins/analytic.py``), with the same wording.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from clsim.errors import ConfigError
from clsim.memory import measure


def bytes_without_items(
    model: nn.Module | None, name: str, plugin: Any, store: str, empty: Any, *,
    loop_state: int,
) -> int:
    """Ledger bytes of ``model`` and ``plugin`` with ``plugin.<store>`` replaced by
    ``empty`` (the store with room for no item) for the measurement, plus ``loop_state``:
    the optimizer state the loop carries at the peak (``ctx.loop_state_bytes()``; 0 for a
    plugin that owns every experience, whose loop never trains)."""
    kept = getattr(plugin, store)
    setattr(plugin, store, empty)
    try:
        return measure(model, [(name, plugin)]).total_bytes + loop_state
    finally:
        setattr(plugin, store, kept)


def items_that_fit(
    budget_bytes: int,
    overhead_bytes: int,
    item_bytes: int,
    *,
    plugin: str,
    items: str = "stored samples",
    at_least: int = 1,
    overhead: str = "the model, the plugin's bookkeeping and the loop's optimizer state",
) -> int:
    """Whole items of ``item_bytes`` that fit in the budget next to ``overhead_bytes``;
    fewer than ``at_least`` is a ConfigError that names the minimum budget."""
    capacity = (budget_bytes - overhead_bytes) // item_bytes
    if capacity < at_least:
        minimum = overhead_bytes + at_least * item_bytes
        raise ConfigError(
            f"{plugin}: a budget of {budget_bytes} bytes leaves no room for {at_least} "
            f"{items}: {overhead} take {overhead_bytes} bytes and one item {item_bytes} "
            f"bytes; the minimum budget is {minimum} bytes"
        )
    return int(capacity)
