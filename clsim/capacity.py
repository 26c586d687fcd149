"""Budget to capacity: how many items (exemplars, buffered samples) a strategy can store.

Every store sized from the budget follows one rule: once every plugin of the strategy has
set up (the hook ``clsim_size_stores``), measure what the whole strategy holds with the
store emptied (the model, every plugin as the ledger measures it, this one with the empty
store) and what the training loop will hold beside it at the peak (the optimizer state an
online experience carries over its parts, :meth:`clsim.context.RunContext.loop_state_bytes`:
0 offline and for a stateless optimizer), fill what the budget leaves with whole items,
and say so in the run's log (event ``store_sized``, naming every holder it subtracted).
Written once here, so every plugin sizes its memory, and words its log line and its error,
the same way (:func:`size_store` does all three; :func:`held_beside`,
:func:`items_that_fit` and :func:`announce` are its steps, for a plugin with its own
arithmetic). The analytic learner is the exception: its state is not a count of items but
a d_b x d_b matrix, so it solves a quadratic for the largest d_b instead
(``plugins/analytic.py``), with the same wording.

Two stores sized from one budget share it first come, first served: each is sized in the
order the strategy calls ``clsim_size_stores`` (its YAML order), and a later one sees the
earlier ones full (usually with no room left, a ConfigError naming the minimum budget); give
all but one a fixed ``capacity`` to split a budget between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clsim.budget import format_bytes
from clsim.errors import ConfigError

if TYPE_CHECKING:
    from clsim.context import RunContext

LOOP_STATE = "the loop's optimizer state"


@dataclass(frozen=True)
class Beside:
    """What a store is sized beside. ``held``: bytes the strategy holds with the store
    emptied, by holder (``"model"``, then each plugin by its name in the strategy, in its
    order); ``own``: the name of the plugin whose store it is; ``reserved``: bytes kept
    free for what is not held yet, by what it is for (the loop's optimizer state at the
    peak, room for a log to grow)."""

    held: dict[str, int]
    own: str
    reserved: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.held.values()) + sum(self.reserved.values())

    def describe(self) -> str:
        """'29.34 KB held by the model, 24 B by 'replay' itself, 16 B by 'counter' and 0 B
        for the loop's optimizer state'."""
        words = []
        for holder, nbytes in self.held.items():
            if holder == "model":
                words.append(f"{format_bytes(nbytes)} held by the model")
            else:
                itself = " itself" if holder == self.own else ""
                words.append(f"{format_bytes(nbytes)} by {holder!r}{itself}")
        words += [f"{format_bytes(nbytes)} for {what}" for what, nbytes in self.reserved.items()]
        if len(words) < 2:
            return "".join(words)
        return ", ".join(words[:-1]) + " and " + words[-1]


def held_beside(
    ctx: RunContext, name: str, plugin: Any, store: str, empty: Any, *, loop_state: int,
    reserved: dict[str, int] | None = None,
) -> Beside:
    """What the strategy holds with ``plugin.<store>`` replaced by ``empty`` (the store
    with room for no item) for the measurement: the model and every plugin of the strategy
    (``ctx.held_bytes``; ``plugin`` is measured as ``name`` if it is not one of them, as
    when driven by hand), plus ``loop_state``, the optimizer state the loop carries at
    the peak (``ctx.loop_state_bytes()``; 0 for a plugin that owns every experience, whose
    loop never trains), and any other ``reserved`` bytes."""
    kept = getattr(plugin, store)
    setattr(plugin, store, empty)
    try:
        held = ctx.held_bytes(also=(name, plugin))
    finally:
        setattr(plugin, store, kept)
    return Beside(held, ctx.name_of(plugin) or name,
                  {LOOP_STATE: loop_state, **(reserved or {})})


def items_that_fit(
    budget_bytes: int,
    overhead_bytes: int | Beside,
    item_bytes: int,
    *,
    plugin: str,
    items: str = "stored samples",
    at_least: int = 1,
    overhead: str = "the model, the plugin's bookkeeping and the loop's optimizer state",
) -> int:
    """Whole items of ``item_bytes`` that fit in the budget next to ``overhead_bytes`` (a
    byte count, or a :class:`Beside` whose holders the error then names); fewer than
    ``at_least`` is a ConfigError that names the minimum budget."""
    beside = overhead_bytes if isinstance(overhead_bytes, Beside) else None
    held = overhead_bytes.total_bytes if beside is not None else overhead_bytes
    capacity = (budget_bytes - held) // item_bytes
    if capacity < at_least:
        minimum = held + at_least * item_bytes
        parts = "" if beside is None else f" ({beside.describe()})"
        raise ConfigError(
            f"{plugin}: a budget of {budget_bytes} bytes leaves no room for {at_least} "
            f"{items}: {overhead} take {held} bytes{parts} and one item {item_bytes} "
            f"bytes; the minimum budget is {minimum} bytes"
        )
    return int(capacity)


def announce(ctx: RunContext, store: str, capacity: int, item_bytes: int, beside: Beside,
             *, stored: str = "items", when: str = "") -> str:
    """Log the sizing of ``beside.own``'s ``store`` (event ``store_sized``, with every
    holder's bytes) and return its line: 'replay: 293 exemplars fit in 48.00 KB beside
    29.34 KB held by the model, ...' (``when``, as 'for experience 1', after the budget)."""
    message = (f"{beside.own}: {capacity} {stored} fit in {format_bytes(ctx.budget_bytes)}"
               f"{' ' + when if when else ''} beside {beside.describe()}")
    ctx.log("store_sized", plugin=beside.own, store=store, capacity=capacity,
            item_bytes=item_bytes, budget_bytes=ctx.budget_bytes, held=dict(beside.held),
            reserved=dict(beside.reserved), message=message)
    return message


def size_store(
    ctx: RunContext, name: str, plugin: Any, store: str, empty: Any, item_bytes: int, *,
    loop_state: int, items: str, stored: str, at_least: int = 1,
    overhead: str = "the model, the plugins' state and the loop's optimizer state",
    reserved: dict[str, int] | None = None,
) -> int:
    """The capacity of ``plugin.<store>`` from the budget (:func:`held_beside`, then
    :func:`items_that_fit`), announced in the log (:func:`announce`). Call it from
    ``clsim_size_stores`` (every plugin set up) or later (a store re-sized as the model
    grows); ``items`` words the error ('exemplar': 'no room for 1 exemplar'), ``stored``
    the log line ('exemplars': '293 exemplars fit in ...')."""
    beside = held_beside(ctx, name, plugin, store, empty, loop_state=loop_state,
                         reserved=reserved)
    capacity = items_that_fit(ctx.budget_bytes, beside, item_bytes, plugin=beside.own,
                              items=items, at_least=at_least, overhead=overhead)
    announce(ctx, store, capacity, item_bytes, beside, stored=stored)
    return capacity
