"""The simulator's cache of frozen encoders' features: each sample through an encoder once.

Nearest-mean and analytic learners, few-shot prototype methods after their base session,
and any strategy on a frozen backbone pass the same samples through the same frozen
encoder at every hook, every evaluation and in every cell of a comparison grid that shares
it. Here a feature is computed once per process and reused while the encoder's weights,
the input transform and the call height stay the same.

It is the simulator's cache, not the method's memory: a strategy could equally recompute
the features, so the ledger does not charge these bytes (README says so). A strategy
that keeps features does so in its own tensors (a lookup returns a fresh tensor, never a
view into the cache) and pays for them.

Correctness rests on three facts:

* a row's features depend on the row alone: they are computed in eval mode, in calls of
  exactly ``chunk`` rows (the last zero-padded: :func:`fixed_chunk_outputs`), so a cached
  row is bit-identical to a recomputed one, and a run's results do not depend on what
  the cache held before it (another cell's features, an earlier evaluation's);
* samples are identified by their bytes (:mod:`clsim.digests`), not by where they sit;
* an encoder is identified by its structure (``repr``, every module's plain settings
  and non-buffer tensors), every parameter and buffer's bytes, dtype, shape and strides (a
  channels-last weight computes otherwise), and the autocast and TF32 switches; a batch
  of model inputs by its layout too (a channels-last batch computes otherwise).
  Buffers are hashed at every lookup, because BatchNorm updates its running statistics
  without bumping their version counter. A parameter's digest is kept while it is the
  same tensor at the same version, and forgotten at every experience start and every
  evaluation (:meth:`FeatureCache.forget_weights`): an edit through ``.data``, which no
  version counter sees, is missed only by a lookup in the same phase.

Only a frozen encoder (:func:`is_frozen`: no trainable parameter, every module in eval
mode, no forward hook) is cached: features that change at every step would only fill
memory, batch statistics break the row independence, and a hook's effect cannot be keyed.
The size is bounded (least recently used encoder evicted first): ``CLSIM_FEATURE_CACHE``
sets it (``2GB`` by default; ``0`` or ``off`` turns the cache off). Plugins call
:func:`feature_cache` when they need it and never keep the cache object: the ledger would
then charge them the whole cache.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clsim import compute
from clsim.budget import Budget
from clsim.digests import DIGEST_BYTES, row_digests
from clsim.errors import ConfigError
from clsim.flops import flops_of

ENV_VAR = "CLSIM_FEATURE_CACHE"
DEFAULT_MAX_BYTES = 2 * 2**30


@torch.no_grad()
def fixed_chunk_outputs(
    forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``forward`` of model inputs in calls of exactly ``chunk`` rows (the last zero-padded),
    so each row's result does not depend on the other rows of the call. The caller sets
    eval mode (BatchNorm must not use batch statistics)."""
    parts = []
    for start in range(0, len(inputs), chunk):
        part = inputs[start : start + chunk]
        n = len(part)
        if n < chunk:  # padded in the batch's own layout: a layout computes otherwise
            padded = part.new_zeros((chunk, *part.shape[1:]))
            if part.dim() == 4:
                padded = padded.contiguous(memory_format=_memory_format(part))
            padded[:n] = part
            part = padded
        parts.append(forward(part)[:n])
    if not parts:  # an empty input: the output's width comes from one (discarded) row
        return forward(inputs.new_zeros((1, *inputs.shape[1:])))[:0]
    return torch.cat(parts)


def computed_features(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    chunk: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``encoder(prepare(x))`` in calls of exactly ``chunk`` rows, ``prepare`` applied chunk
    by chunk (a whole dataset as float input would not fit)."""
    if prepare is None:
        return fixed_chunk_outputs(encoder, x, chunk)
    if len(x) == 0:
        return fixed_chunk_outputs(encoder, prepare(x), chunk)
    return torch.cat([fixed_chunk_outputs(encoder, prepare(x[start : start + chunk]), chunk)
                      for start in range(0, len(x), chunk)])


@dataclass(frozen=True)
class CacheCounts:
    """Rows through the cache: ``computed`` by the encoder, ``reused`` from the cache, and
    ``uncached`` (computed and not kept: the cache was full or off)."""

    computed: int = 0
    reused: int = 0
    uncached: int = 0

    def since(self, before: CacheCounts) -> CacheCounts:
        return CacheCounts(self.computed - before.computed, self.reused - before.reused,
                           self.uncached - before.uncached)

    def to_dict(self) -> dict[str, int]:
        return {"rows_computed": self.computed, "rows_reused": self.reused,
                "rows_uncached": self.uncached}


class _Table:
    """The features of one (encoder, transform, chunk, ...) key: digest -> row."""

    ENTRY_BYTES = DIGEST_BYTES + 64  # a dict entry and its key, roughly

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.where: dict[bytes, tuple[int, int]] = {}
        self.nbytes = 0

    @classmethod
    def cost(cls, features: torch.Tensor) -> int:
        """Bytes :meth:`add` will count for ``features``."""
        return features.numel() * features.element_size() + len(features) * cls.ENTRY_BYTES

    def add(self, digests: list[bytes], features: torch.Tensor) -> None:
        part = len(self.parts)
        self.parts.append(features)
        self.nbytes += self.cost(features)
        for row, digest in enumerate(digests):
            self.where[digest] = (part, row)

    def gather(self, found: list[tuple[int, tuple[int, int]]], out: torch.Tensor) -> None:
        """Copy the rows ``found`` ((output row, (part, row)) pairs) into ``out``."""
        by_part: dict[int, tuple[list[int], list[int]]] = {}
        for out_row, (part, row) in found:
            rows = by_part.setdefault(part, ([], []))
            rows[0].append(out_row)
            rows[1].append(row)
        for part, (out_rows, rows) in by_part.items():
            source = self.parts[part]
            out[torch.tensor(out_rows, device=out.device)] = source[
                torch.tensor(rows, device=source.device)].to(out.device)


class FeatureCache:
    """Frozen encoders' features by sample bytes; see the module docstring."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes_from_env() if max_bytes is None else int(max_bytes)
        self._tables: OrderedDict[tuple, _Table] = OrderedDict()
        self._param_digests: dict[int, tuple[weakref.ref, int, int, bytes]] = {}
        self.counts = CacheCounts()

    @property
    def nbytes(self) -> int:
        return sum(table.nbytes for table in self._tables.values())

    def clear(self) -> None:
        self._tables.clear()
        self._param_digests.clear()

    def forget_weights(self) -> None:
        """Hash every parameter again at its next lookup (the engine calls this at every
        experience start and evaluation)."""
        self._param_digests.clear()

    @torch.no_grad()
    def features(
        self,
        encoder: nn.Module,
        x: torch.Tensor,
        chunk: int,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prepare_key: object = None,
    ) -> torch.Tensor:
        """``encoder(prepare(x))`` row by row, in calls of ``chunk`` rows; each distinct row
        computed once while ``encoder`` is frozen (:func:`is_frozen`). ``prepare`` turns
        the stored rows into the encoder's input (``ctx.to_input``); ``prepare_key`` must
        name what it does. The caller puts the encoder in eval mode.

        While a strategy's compute is counted, a frozen encoder's rows are charged to it as
        if it computed every one of them (:func:`charge_as_computed`), whether the cache
        served them or not."""
        meter = compute.current()
        if meter is not None and meter.counting and len(x) and is_frozen(encoder):
            with meter.paused():
                out = self._features(encoder, x, chunk, prepare, prepare_key)
            charge_as_computed(meter, encoder, x, prepare)
            return out
        return self._features(encoder, x, chunk, prepare, prepare_key)

    def _features(self, encoder: nn.Module, x: torch.Tensor, chunk: int,
                  prepare: Callable[[torch.Tensor], torch.Tensor] | None,
                  prepare_key: object) -> torch.Tensor:
        frozen = is_frozen(encoder)
        if self.max_bytes <= 0 or not frozen or len(x) == 0:
            if frozen:
                self._count(uncached=len(x))
            return computed_features(encoder, x, chunk, prepare)
        if prepare is None:  # model inputs: a channels_last batch rounds otherwise
            prepare_key = (prepare_key, "model input", _layout(x))
        key = (self._encoder_digest(encoder), repr(prepare_key), int(chunk), str(x.device),
               _numerics())
        table = self._tables.get(key) or _Table()
        digests = row_digests(x)
        found, missing_rows, missing_digests, first = [], [], [], {}
        for row, digest in enumerate(digests):
            place = table.where.get(digest)
            if place is not None:
                found.append((row, place))
            elif digest not in first:
                first[digest] = len(missing_rows)
                missing_rows.append(row)
                missing_digests.append(digest)
        computed = None
        if missing_rows:
            index = torch.tensor(missing_rows, device=x.device)
            computed = computed_features(encoder, x[index], chunk, prepare)
        template = computed if computed is not None else table.parts[found[0][1][0]]
        out = template.new_empty((len(x), *template.shape[1:]))
        if found:
            table.gather(found, out)
        if computed is not None:
            rows = [row for row, digest in enumerate(digests) if digest in first]
            out[torch.tensor(rows, device=out.device)] = computed[
                torch.tensor([first[digests[r]] for r in rows], device=computed.device)]
            kept = self._keep(key, table, missing_digests, computed)
            self._count(computed=len(missing_rows) if kept else 0,
                        uncached=0 if kept else len(missing_rows))
        elif key in self._tables:
            self._tables.move_to_end(key)
        self._count(reused=len(x) - len(missing_rows))
        return out

    def _keep(self, key: tuple, table: _Table, digests: list[bytes],
              features: torch.Tensor) -> bool:
        """Store ``features`` in ``table`` (registered under ``key`` if new), evicting the
        least recently used other tables for room; False when they do not fit."""
        need = _Table.cost(features)
        others = [k for k in self._tables if k != key]
        while self.nbytes + need > self.max_bytes and others:
            del self._tables[others.pop(0)]
        if self.nbytes + need > self.max_bytes:
            return False
        table.add(digests, features.clone())
        self._tables[key] = table
        self._tables.move_to_end(key)
        return True

    def _count(self, computed: int = 0, reused: int = 0, uncached: int = 0) -> None:
        c = self.counts
        self.counts = CacheCounts(c.computed + computed, c.reused + reused,
                                  c.uncached + uncached)

    def _encoder_digest(self, encoder: nn.Module) -> bytes:
        h = hashlib.blake2b(repr(encoder).encode(), digest_size=DIGEST_BYTES)
        for module in encoder.modules():
            for name, value in sorted(vars(module).items()):
                if name.startswith("_") or name == "training":
                    continue
                if isinstance(value, torch.Tensor):
                    h.update(name.encode() + _tensor_digest(value))
                elif isinstance(value, bool | int | float | str | tuple | type(None)):
                    h.update(f"{name}={value!r}".encode())
        for name, p in encoder.named_parameters():
            h.update(name.encode())
            h.update(self._param_digest(p))
        for name, b in encoder.named_buffers():
            h.update(name.encode())
            h.update(_tensor_digest(b))
        return h.digest()

    def _param_digest(self, p: torch.Tensor) -> bytes:
        known = self._param_digests.get(id(p))
        if known is not None and known[0]() is p and known[1:3] == (p.data_ptr(), p._version):
            return known[3]
        digest = _tensor_digest(p)
        self._param_digests[id(p)] = (weakref.ref(p), p.data_ptr(), p._version, digest)
        return digest


def _tensor_digest(t: torch.Tensor) -> bytes:
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}{t.stride()}{t.device}".encode(),
                        digest_size=DIGEST_BYTES)
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    h.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return h.digest()


def _numerics() -> tuple:
    """The switches that change how the same weights compute: autocast per device type
    and its dtype, and TF32 matrix products."""
    autocast = tuple((kind, torch.is_autocast_enabled(kind), str(torch.get_autocast_dtype(kind)))
                     for kind in ("cpu", "cuda"))
    return (autocast, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_num_threads())


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _layout(x: torch.Tensor) -> str:
    if _memory_format(x) == torch.channels_last:
        return "channels_last"
    return "contiguous" if x.is_contiguous() else f"strides {x.stride()}"


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module``'s features are a fixed function of its input: no trainable
    parameter, every module in eval mode, no forward hook (which no key can see)."""
    for m in module.modules():
        if m.training or m._forward_hooks or m._forward_pre_hooks:
            return False
    return not any(p.requires_grad for p in module.parameters())


# FLOPs of one row through a frozen encoder: per encoder module (two encoders of one type
# and parameter shapes may still compute differently: a convolution's stride), then by its
# parameters' shapes and the row's shape, dtype and device; dropped with the module
_ROW_FLOPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = \
    weakref.WeakKeyDictionary()


def charge_as_computed(meter: compute.ComputeMeter, encoder: nn.Module, x: torch.Tensor,
                       prepare: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Charge ``meter`` the FLOPs of ``encoder`` on every row of ``x``: rows x the FLOPs
    of one row. The cache is the simulator's (module docstring): a strategy is charged
    what it would compute without it, so its count does not depend on what the cache held
    (another cell's features, an earlier evaluation's). A counted op's FLOPs grow linearly
    with the rows of a call (matrix products, convolutions, attention all do), so one row,
    counted once per encoder structure and input shape, gives them exactly; the padding
    of a fixed-height call is the simulator's too and is not charged."""
    row = x[:1] if prepare is None else prepare(x[:1])
    key = (tuple((name, tuple(p.shape), p.dtype) for name, p in encoder.named_parameters()),
           tuple(row.shape), row.dtype, str(row.device))
    known = _ROW_FLOPS.get(encoder)
    if known is None:
        known = _ROW_FLOPS[encoder] = {}
    per_row = known.get(key)
    if per_row is None:
        with meter.paused():
            _, per_row = flops_of(lambda: encoder(row))
        known[key] = per_row
    meter.charge(per_row * len(x))


def max_bytes_from_env() -> int:
    """The cache's size from ``CLSIM_FEATURE_CACHE`` (bytes, e.g. ``512MB``; ``0`` or
    ``off``: no cache); 2 GB when unset. A bad value is a ConfigError naming the variable
    (the CLI checks it before any command writes anything)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return DEFAULT_MAX_BYTES
    if value.lower() in ("off", "0", "none", "false"):
        return 0
    expected = "expected a size in bytes such as 512MB or 2GB (binary units), or off"
    try:
        budget = Budget.parse(value)
    except ValueError:
        budget = None
    if budget is None or budget.models or budget.exemplars:
        raise ConfigError(f"environment variable {ENV_VAR}={value!r}: {expected}")
    return budget.bytes


_CACHE: FeatureCache | None = None


def feature_cache() -> FeatureCache:
    """This process's cache (a worker of a comparison grid keeps it across its cells)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = FeatureCache()
    return _CACHE
