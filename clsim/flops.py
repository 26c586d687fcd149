"""Floating-point operations of torch code, counted op by op as torch dispatches it.

The formulas are torch's own (``torch.utils.flop_counter.flop_registry``, the table behind
``FlopCounterMode``): matrix products, convolutions and attention, forward and backward,
computed from the shapes of each call. Everything else (elementwise ops, reductions,
norms, softmax, the optimizer's update) has no formula there and counts 0: the counts are
those of the ops listed in :data:`COUNTED_OPS`, not a total of every arithmetic operation.

Why a mode of our own and not ``FlopCounterMode``: that mode installs global module hooks
on entry to attribute FLOPs to modules, and keeps per-module tables. clsim charges FLOPs
to named parts of a run instead (``training.forward``, ``replay.herding``), so the mode
here only hands each op's count to a callback, which adds it to whatever part is current.
It dispatches exactly as ``FlopCounterMode`` does: an op without a formula is first
decomposed (so a composite op's matrix products are still seen), then run.

Backward ops are counted too: autograd runs them with the dispatch modes of the thread
that called ``backward``, so a mode entered around ``loss.backward()`` sees the gradient
matrix products, and only those autograd really computes (no gradient with respect to a
frozen weight, none with respect to an input that does not require one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# shape queries: no arithmetic, and some tensor subclasses answer them only outside a mode
_QUERIES = frozenset({
    torch.ops.aten.is_contiguous.default,
    torch.ops.aten.is_contiguous.memory_format,
    torch.ops.aten.is_strides_like_format.default,
    torch.ops.aten.is_non_overlapping_and_dense.default,
    torch.ops.aten.size.default,
    torch.ops.aten.sym_size.default,
    torch.ops.aten.stride.default,
    torch.ops.aten.sym_stride.default,
    torch.ops.aten.storage_offset.default,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten.numel.default,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.dim.default,
    torch.ops.prim.layout.default,
    # newer torch asks this instead of is_contiguous (absent before it)
    *((torch.ops.aten.sym_is_contiguous.default,)
      if hasattr(torch.ops.aten, "sym_is_contiguous") else ()),
})

COUNTED_OPS: tuple[str, ...] = tuple(sorted(
    str(op).removeprefix("aten.") for op in flop_registry
    if isinstance(op, torch._ops.OpOverloadPacket)
))
"""The aten ops whose FLOPs are counted (matrix products, convolutions, attention); any
other op counts 0."""


class FlopCounter(TorchDispatchMode):
    """While entered, every counted op's FLOPs go to ``charge(flops)``.

    One instance may be entered and exited many times (the compute meter pauses it for
    steps whose count it already knows)."""

    def __init__(self, charge: Callable[[int], None]) -> None:
        super().__init__()
        self.charge = charge

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _QUERIES:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):  # compiled regions: not counted
            return NotImplemented
        packet = func._overloadpacket
        formula = flop_registry.get(packet)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:  # a composite op: count the ops it is made of
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        out = func(*args, **kwargs)
        if formula is not None:
            self.charge(int(formula(*args, **kwargs, out_val=out)))
        return out


def flops_of(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the FLOPs it performed (forward and any backward it ran)."""
    total = [0]

    def add(flops: int) -> None:
        total[0] += flops

    with FlopCounter(add):
        result = fn()
    return result, total[0]
