"""The compute meter: what a strategy computed, counted, part by part and experience by
experience.

FLOPs are counted as torch dispatches each op (:mod:`clsim.flops`), never taken from a
formula a plugin declares, and charged to the part of the run that is current, named the
way the memory ledger names what a strategy holds:

* ``training.forward`` / ``training.backward``: the standard loop's model forward (with
  the loss) and backward pass; ``evaluation.forward``: predictions on the test sets;
* ``<plugin>.<hook>``: whatever a plugin computes inside one of its hooks (a teacher's
  forward in ``clsim_loss``, features in ``clsim_after_experience``), and
  ``<plugin>.<label>`` for a sub-part the plugin names with ``ctx.compute_part(label)``
  (``replay.herding``, ``lwf.teacher``).

Besides FLOPs: optimizer steps (the loop's and ``ctx.backward_step``'s), samples forwarded
(model input rows of the loop's training steps, replayed rows and extra views included;
test rows predicted), and process CPU seconds and wall seconds of each experience.

**Memoised training steps.** Counting dispatches every op through Python, far too slow to
keep on for every step. A step's FLOPs are a function of the shapes it meets, and within
one plan of the loop (one ``Trainer.fit``: one experience, or one part of an online
experience) the model's structure and its trainable set stay put; an online experience's
parts share their counts when the model's structure, its trainable set and its mode are
the same (:func:`structure_key`), as they usually are. What a plugin computes
in a step may also depend on how much it holds (DER forwards memory samples once its
buffer is not empty, and as many as it holds up to a batch), so a step's signature is the
batch's shapes before and after ``clsim_before_batch`` and the sizes of what the plugins
hold (:func:`state_sizes`). The first step of each signature is counted under the mode,
and later steps with that signature are charged the same counts without it. Where that
assumption fails (a plugin whose work depends on something else, e.g. on the labels in a
batch), the counts are wrong: ``CLSIM_COMPUTE=every_step`` counts every step instead, and
tests/test_compute.py checks both give the same counts for the built-in strategies it
runs. A plugin that trains an experience itself marks its steps with ``ctx.compute_step(...)``
to have them memoised the same way (TAME does), and a plugin whose work inside a loop
step depends on something the step's signature cannot know marks that work the same way:
a ``ctx.compute_step`` nested in a memoised step is memoised, and charged, on its own
(PL-FMS's per-sample losses, over a number of replayed rows drawn at random in
``clsim_before_batch``). **Predictions** are memoised the same way within one
evaluation, where the model and the plugins stay put: a batch's FLOPs follow from its
shape and task (``prediction_regions``; TAME marks the experts it routes rows to with
``ctx.compute_step``). Everything else (setup, hooks around an experience, reports) is
counted op by op.

**Features the simulator's cache serves** (:mod:`clsim.feature_cache`) are charged as if
the strategy computed them: rows x the encoder's FLOPs per row. The cache is the
simulator's, so a count must not depend on what it held: a cell counts the same first or
last in its worker.

``CLSIM_COMPUTE`` picks the mode: ``on`` (default: memoised steps), ``every_step``, or
``off`` (nothing counted, no ``compute`` in summary.json).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.nn import Module

from clsim.errors import ConfigError
from clsim.flops import COUNTED_OPS, FlopCounter

ENV_VAR = "CLSIM_COMPUTE"
MODES = ("on", "every_step", "off")

TRAINING_FORWARD = "training.forward"
TRAINING_BACKWARD = "training.backward"
EVALUATION_FORWARD = "evaluation.forward"
OUTSIDE = "run"  # FLOPs outside any named part (a torch hook between hook calls)

CLOCK_KEYS = ("cpu_seconds", "wall_seconds")
"""Fields of :meth:`ComputeMeter.to_dict` (totals and rows) that are clock readings, not
counts: they differ between two runs of the same strategy."""


def without_clocks(record: dict[str, Any]) -> dict[str, Any]:
    """A strategy's record (``StrategyOutcome.to_dict``, a summary.json entry) without the
    compute meter's clock readings: what two runs that computed the same thing share."""
    compute = record.get("compute")
    if not isinstance(compute, dict):
        return record
    rows = [{k: v for k, v in row.items() if k not in CLOCK_KEYS}
            for row in compute.get("rows", [])]
    kept = {k: v for k, v in compute.items() if k not in CLOCK_KEYS}
    return {**record, "compute": {**kept, "rows": rows}}


def mode_from_env() -> str:
    """The meter's mode from ``CLSIM_COMPUTE`` (``on`` when unset)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    return check_mode(value or "on", f"environment variable {ENV_VAR}")


def check_mode(mode: str, where: str = "compute mode") -> str:
    """``mode`` if it is one of :data:`MODES`, else a ConfigError naming ``where``."""
    if mode not in MODES:
        raise ConfigError(f"{where}={mode!r}: expected one of {', '.join(MODES)} (on: "
                          "count memoised training steps; every_step: count every step; "
                          "off: no compute accounting)")
    return mode


@dataclass
class ComputeRow:
    """What one stage of a run computed: ``setup`` (before the first experience: setup
    hooks and the evaluation of the untrained model), one experience (its hooks, training,
    the evaluation after it), or ``report`` (after the last)."""

    stage: str
    experience: int | None = None
    flops: dict[str, int] = field(default_factory=dict)  # part -> FLOPs
    optimizer_steps: int = 0
    training_samples: int = 0  # model input rows of the loop's steps
    evaluation_samples: int = 0  # test rows predicted
    evaluation_flops: int = 0  # FLOPs while predicting (every part)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "experience": self.experience,
            "flops": sum(self.flops.values()),
            "parts": dict(sorted(self.flops.items())),
            "optimizer_steps": self.optimizer_steps,
            "samples_forwarded": {"training": self.training_samples,
                                  "evaluation": self.evaluation_samples},
            "evaluation_flops": self.evaluation_flops,
            "inference_flops_per_sample": _per(self.evaluation_flops, self.evaluation_samples),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
        }


class ComputeMeter:
    """Counts one strategy's run; the engine creates it and keeps it current while the
    strategy runs (:func:`current`)."""

    def __init__(self, mode: str = "on") -> None:
        self.mode = check_mode(mode)
        self.part = OUTSIDE
        self.plugin: str | None = None  # the plugin whose hook is running
        self.rows: list[ComputeRow] = []
        self._counter = FlopCounter(self.charge)
        self._armed = False  # inside active(), accounting on: regions may count
        self._entered = False  # the counter is on the dispatch stack
        self._suppressed = False  # paused: the caller charges what it knows
        self._replaying = False  # inside a memoised step: its counts are known
        self._evaluating = False
        # steps being memoised, innermost last: a FLOP goes to the innermost only (a
        # nested step is memoised, and charged, on its own)
        self._capture: list[dict[str, int]] = []
        # regions of the loop's steps (before_batch, forward, backward) counted op by op
        # and charged from the memo: how much of the count is memoised
        self.regions = {"counted": 0, "memoised": 0}
        # prediction batches of the evaluations, counted op by op and charged from the memo
        self.prediction_regions = {"counted": 0, "memoised": 0}
        self._memos: dict[tuple, dict[tuple, dict[str, int]]] = {}  # by plan scope
        self._clock: tuple[float, float] | None = None
        self.begin("setup")

    # -- stages ----------------------------------------------------------------

    @property
    def row(self) -> ComputeRow:
        return self.rows[-1]

    def begin(self, stage: str, experience: int | None = None) -> None:
        """Close the current row (its clocks) and open one for ``stage``."""
        self._close_clock()
        self._memos.clear()  # plugins' state may change between experiences
        self.rows.append(ComputeRow(stage, experience))
        self._clock = (time.process_time(), time.perf_counter())

    def finish(self) -> None:
        """Stop the clocks of the current row (the run is over)."""
        self._close_clock()

    def _close_clock(self) -> None:
        if self._clock is not None and self.rows:
            cpu, wall = self._clock
            self.row.cpu_seconds += time.process_time() - cpu
            self.row.wall_seconds += time.perf_counter() - wall
        self._clock = None

    # -- counting --------------------------------------------------------------

    @property
    def counting(self) -> bool:
        """Whether ops dispatched now are counted: inside a counted region (a hook call, a
        step being counted, a prediction), not in a memoised step, accounting on."""
        return self._entered

    def charge(self, flops: int) -> None:
        """Add ``flops`` to the current part (the FLOP counter's callback)."""
        if not flops:
            return
        parts = self.row.flops
        parts[self.part] = parts.get(self.part, 0) + flops
        if self._evaluating:
            self.row.evaluation_flops += flops
        if self._capture:
            captured = self._capture[-1]
            captured[self.part] = captured.get(self.part, 0) + flops

    @contextmanager
    def active(self) -> Iterator[ComputeMeter]:
        """Arm the meter for a strategy's run (the engine wraps it) and make it current
        for the feature cache and ``ctx.compute_part``.

        Armed, it counts only inside counted regions (:meth:`counted`): every hook call,
        each step the memo counts, each prediction. The counter is not kept on the
        dispatch stack in between, because then every op of the loop's own bookkeeping
        (batch indexing, loss sums, the ledger) would go through Python too."""
        previous = _CURRENT.meter
        _CURRENT.meter = self
        self._armed = self.mode != "off"
        try:
            yield self
        finally:
            self._armed = False
            if self._entered:  # an exception left a region open
                self._entered = False
                self._counter.__exit__(None, None, None)
            _CURRENT.meter = previous

    @contextmanager
    def counted(self) -> Iterator[None]:
        """Count what is dispatched inside (a no-op when already counting, in a memoised
        step, paused or unarmed)."""
        if self._entered or self._suppressed or self._replaying or not self._armed:
            yield
            return
        self._counter.__enter__()
        self._entered = True
        try:
            yield
        finally:
            self._entered = False
            self._counter.__exit__(None, None, None)

    @contextmanager
    def _counter_left(self) -> Iterator[None]:
        """The counter off the dispatch stack inside, back on after if it was on."""
        was_entered = self._entered
        if was_entered:
            self._entered = False
            self._counter.__exit__(None, None, None)
        try:
            yield
        finally:
            if was_entered:
                self._counter.__enter__()
                self._entered = True

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing dispatched inside is counted, hook calls included (the caller charges
        what it knows)."""
        was_suppressed = self._suppressed
        with self._counter_left():
            self._suppressed = True
            try:
                yield
            finally:
                self._suppressed = was_suppressed

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """A memoised step whose counts are known: nothing inside is counted, but parts
        are still named and a nested step (``ctx.compute_step``) is still memoised, and
        charged, on its own (its count is not in the enclosing step's)."""
        was_replaying = self._replaying
        with self._counter_left():
            self._replaying = True
            try:
                yield
            finally:
                self._replaying = was_replaying

    @contextmanager
    def recording(self, captured: dict[str, int]) -> Iterator[None]:
        """A step being memoised: count what is dispatched inside (even inside a replayed
        step that encloses it) into ``captured``, nested steps left out."""
        was_replaying = self._replaying
        self._replaying = False
        self._capture.append(captured)
        try:
            with self.counted():
                yield
        finally:
            self._capture.pop()
            self._replaying = was_replaying

    @contextmanager
    def named(self, part: str, plugin: str | None = None) -> Iterator[None]:
        """Charge what is computed inside to ``part`` (``plugin``: whose code runs)."""
        before, before_plugin = self.part, self.plugin
        self.part = part
        if plugin is not None:
            self.plugin = plugin
        try:
            yield
        finally:
            self.part, self.plugin = before, before_plugin

    @contextmanager
    def hook(self, plugin: str, hook: str) -> Iterator[None]:
        """A plugin's hook call, counted and charged to ``<plugin>.<hook>``."""
        with self.counted(), self.named(f"{plugin}.{hook}", plugin):
            yield

    @property
    def idle(self) -> bool:
        """Nothing to count or name now (unarmed, or paused): hook calls skip the meter
        altogether. A memoised step is not idle: a step nested in it may count."""
        return self._suppressed or not self._armed

    def plugin_part(self, label: str):
        """A sub-part a plugin names inside its hook: ``<plugin>.<label>``."""
        if self.idle:
            return nullcontext()
        owner = self.plugin or OUTSIDE
        return self.named(f"{owner}.{label}", self.plugin)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Predictions on the test sets: ``evaluation.forward`` unless a hook names its
        own part, every FLOP also counted as inference."""
        was = self._evaluating
        self._evaluating = True
        try:
            with self.named(EVALUATION_FORWARD):
                yield
        finally:
            self._evaluating = was

    def plugin_step(self, signature: tuple):
        """A step of a plugin's own training loop (an experience it trains itself),
        memoised as the loop's are, by ``signature`` within the experience (module
        docstring). The plugin vouches that the step's FLOPs follow from ``signature``;
        ``CLSIM_COMPUTE=every_step`` checks it. Inside a step of the loop (a hook in a
        batch), it is memoised on its own: work whose size the loop's signature cannot
        know (a random number of rows) is charged right whether that step is counted or
        charged from the memo."""
        if self.idle:
            return nullcontext()
        # by the part too: counts captured in one hook must not be charged to another's
        return self.memo(("plugin", self.plugin, self.part)).region(signature)

    def memo(self, scope: tuple = ()) -> StepMemo:
        """A memo of step counts for one plan of the loop, shared with the experience's
        earlier plans of the same ``scope`` (:func:`structure_key`; module docstring)."""
        return StepMemo(self, self._memos.setdefault(scope, {}))

    def prediction_memo(self) -> StepMemo:
        """A memo of one evaluation's prediction batches, by signature (the batch's shape
        and task): within one evaluation the model and the plugins stay put, so a batch's
        FLOPs follow from its shape (module docstring). Work that depends on the batch's
        content (TAME routing rows to experts) is marked with ``ctx.compute_step``."""
        return StepMemo(self, {}, self.prediction_regions)

    # -- counts that need no dispatch ------------------------------------------

    def add_parts(self, parts: dict[str, int]) -> None:
        """Charge a memoised step's counts (to the row only: no enclosing step being
        memoised holds a nested step's count)."""
        row = self.row.flops
        for part, flops in parts.items():
            row[part] = row.get(part, 0) + flops
        if self._evaluating:
            self.row.evaluation_flops += sum(parts.values())

    def optimizer_step(self) -> None:
        self.row.optimizer_steps += 1

    def training_rows(self, n: int) -> None:
        self.row.training_samples += n

    def evaluation_rows(self, n: int) -> None:
        self.row.evaluation_samples += n

    # -- results ---------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        parts: dict[str, int] = {}
        for row in self.rows:
            for part, flops in row.flops.items():
                parts[part] = parts.get(part, 0) + flops
        return dict(sorted(parts.items()))

    def state_dict(self) -> dict[str, Any]:
        """The rows so far, for a checkpoint (a resumed run continues them)."""
        return {"rows": [dict(vars(row), flops=dict(row.flops)) for row in self.rows],
                "regions": dict(self.regions),
                "prediction_regions": dict(self.prediction_regions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [ComputeRow(**row) for row in state["rows"]]
        self.regions = dict(state["regions"])
        self.prediction_regions = dict(state.get("prediction_regions",
                                                 {"counted": 0, "memoised": 0}))

    def to_dict(self) -> dict[str, Any]:
        """``compute`` of a strategy in summary.json."""
        rows = [row.to_dict() for row in self.rows]
        last = next((r for r in reversed(self.rows) if r.evaluation_samples), None)
        flops = self.totals()
        return {
            "mode": self.mode,
            "flops_total": sum(flops.values()),
            # what the strategy computed to learn: everything but the test predictions
            # (what a compute budget bounds, and the compute axis of a comparison)
            "learning_flops": sum(flops.values()) - sum(r.evaluation_flops for r in self.rows),
            "parts": flops,
            "steps": sum(r.optimizer_steps for r in self.rows),
            "samples_forwarded": {
                "training": sum(r.training_samples for r in self.rows),
                "evaluation": sum(r.evaluation_samples for r in self.rows),
            },
            # per test sample, at the last evaluation: what the final model costs to use
            "inference_flops_per_sample": None if last is None
            else _per(last.evaluation_flops, last.evaluation_samples),
            "cpu_seconds": round(sum(r.cpu_seconds for r in self.rows), 3),
            "wall_seconds": round(sum(r.wall_seconds for r in self.rows), 3),
            "rows": rows,
            # the loop's step regions (before_batch, forward, backward) counted op by op
            # and charged from the memo
            "step_regions": dict(self.regions),
            # the evaluations' prediction batches counted op by op and charged from the memo
            "prediction_regions": dict(self.prediction_regions),
            "counted": "FLOPs of torch's matrix products, convolutions and attention "
                       "(forward and backward), counted per op; other ops (elementwise, "
                       "norms, the optimizer's update) count 0",
            "counted_ops": list(COUNTED_OPS),
            "estimated": "memoised training steps and prediction batches: each "
                         "signature's first counted, the rest charged the same"
                         if self.mode == "on" else None,
        }


class StepMemo:
    """Counts of the loop's steps by signature, within one plan (see the module
    docstring): the first step of a signature runs under the counter and its counts are
    kept; later ones run with the counter paused and are charged the kept counts."""

    def __init__(self, meter: ComputeMeter, known: dict[tuple, dict[str, int]] | None = None,
                 tally: dict[str, int] | None = None) -> None:
        self.meter = meter
        self.known: dict[tuple, dict[str, int]] = {} if known is None else known
        # where the regions counted and memoised are tallied: the meter's step regions
        self.tally = meter.regions if tally is None else tally

    @property
    def active(self) -> bool:
        """Whether signatures matter (counting memoised steps); else skip computing them."""
        return self.meter.mode == "on" and not self.meter.idle

    @contextmanager
    def region(self, signature: tuple) -> Iterator[None]:
        meter = self.meter
        if meter.idle:  # off, or inside a region already paused
            yield
            return
        known = None if meter.mode == "every_step" else self.known.get(signature)
        if known is not None:
            with meter.replaying():
                yield
            meter.add_parts(known)
            self.tally["memoised"] += 1
            return
        captured: dict[str, int] = {}
        with meter.recording(captured):
            yield
        self.known[signature] = captured
        self.tally["counted"] += 1


def structure_key(model: Module, trained: list[Tensor]) -> tuple:
    """What a plan's steps compute follows from, besides the batch: the model's parameter
    shapes and which require a gradient, the shapes of what the optimizer trains, and the
    model's mode (BatchNorm and dropout)."""
    return (tuple((tuple(p.shape), p.requires_grad) for p in model.parameters()),
            tuple(tuple(p.shape) for p in trained), model.training)


def state_sizes(plugins: list[tuple[str, Any]]) -> tuple:
    """How much each plugin holds, cheaply: for every attribute, its value if it is a
    number (an int, float or bool: a counter, a switch), the shape of a tensor or array,
    the ``len()`` of a sized object, and one level further into dicts, lists and tuples
    (up to :data:`_SIZE_ITEMS` items) and into objects without a length (a buffer's own
    counters, an options object); modules, strings and ``None`` left out. Part of a
    step's signature: a buffer filling, a store growing, a counter moving changes it
    (a value that changes every step makes every step count: correct, only slower)."""
    sizes: list[object] = []
    for _, plugin in plugins:
        state = getattr(plugin, "__dict__", None)
        if state:
            sizes.append(tuple(_size(value, 1) for value in state.values()))
    return tuple(sizes)


_SIZE_ITEMS = 64
"""The most items of a container :func:`state_sizes` reads one by one (a longer one: its
length alone)."""

_NUMBERS = (int, float)  # bool is an int


def _size(value: object, depth: int) -> object:
    """What :func:`state_sizes` reads of ``value``, ``depth`` more levels down."""
    if isinstance(value, Tensor):
        return value.shape
    if isinstance(value, _NUMBERS):
        return value
    if value is None or isinstance(value, str | bytes | Module):
        return None
    if isinstance(value, dict):
        values = value.values()
    elif isinstance(value, list | tuple):
        values = value
    else:
        shape = getattr(value, "shape", None)  # a numpy array
        if isinstance(shape, tuple):
            return shape
        if hasattr(type(value), "__len__"):
            try:
                return len(value)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - a plugin's __len__ that fails: no size
                return None
        state = getattr(value, "__dict__", None)
        if depth <= 0 or not state:
            return None
        return tuple(_size(item, depth - 1) for item in state.values())
    if depth <= 0 or len(values) > _SIZE_ITEMS:
        return len(values)
    return tuple(_size(item, depth - 1) for item in values)


class _Current(threading.local):
    meter: ComputeMeter | None = None


_CURRENT = _Current()


def current() -> ComputeMeter | None:
    """The meter of the strategy running in this thread, or None."""
    return _CURRENT.meter


def counted():
    """The current meter's :meth:`ComputeMeter.counted` region (nothing outside a run)."""
    meter = _CURRENT.meter
    return nullcontext() if meter is None else meter.counted()


def _per(flops: int, samples: int) -> float | None:
    return None if samples == 0 else flops / samples
