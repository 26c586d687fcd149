"""Compute budgets as users write them, and how the standard loop keeps to one.

A compute budget bounds what a strategy computes to learn: every FLOP the compute meter
counts (:mod:`clsim.compute`) except the test predictions', or its optimizer steps.
Accepted forms:

* ``"2 TFLOP"``: FLOPs with an SI prefix (``FLOP``, ``KFLOP``, ``MFLOP``, ``GFLOP``,
  ``TFLOP``, ``PFLOP``; 1 GFLOP = 10^9, as FLOPs are always written);
* ``"5000 steps"``: optimizer steps;
* ``"1.0 passes"``: relative to the stream, the FLOPs of that many passes of the
  scenario's model over every training sample of the stream, forward and backward
  (:func:`one_pass_flops`), so every strategy of a scenario gets the same FLOPs whatever
  its own model.

The budget is shared among the experiences a strategy is shown (``compute_share``:
``proportional`` to their training samples, or ``even``), as the budgeted continual-
learning papers give each time step its share (Prabhu et al., "Computationally Budgeted
Continual Learning", CVPR 2023). The standard loop stops an experience's training when
the next step would not fit in what is left of its share (:class:`ComputeAllowance`); the
batches it did not train are recorded as cut. What is not spent of a share is not carried
over: a strategy cannot save compute early to spend it late. Work outside the loop's
steps (a closed-form solve, herding after an experience, a plugin's own training loop) is
counted but not stopped: it can take an experience over its share, which the summary
records (``over_budget``) and ``strict`` turns into a failure, as for memory.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from clsim.errors import ConfigError
from clsim.flops import flops_of

SHARE_RULES = ("proportional", "even")
_PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_MAX_FLOPS = 10**24  # a zettaFLOP and more: a typo, not a budget
_MAX_STEPS = 10**12
_FORM = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]+)\s*$")
_FORMS = ("FLOPs with a unit ('2 TFLOP', '500 GFLOP'), optimizer steps ('5000 steps') or "
          "passes over the stream ('1.0 passes')")


@dataclass(frozen=True)
class ComputeBudget:
    """A parsed compute budget: ``amount`` of ``unit`` (FLOPs, steps or passes)."""

    amount: float
    unit: Literal["flops", "steps", "passes"]
    text: str

    description = "a compute budget: " + _FORMS

    @classmethod
    def parse(cls, value: object) -> ComputeBudget:
        if not isinstance(value, str):
            raise ValueError(f"expected {_FORMS}, as a string with its unit; got {value!r}")
        match = _FORM.match(value.lower())
        if not match:
            raise ValueError(f"cannot read {value!r}: expected {_FORMS}")
        number, unit = float(match["num"]), match["unit"]
        if not math.isfinite(number):
            raise ValueError(f"compute budget {value!r} is not a finite number")
        if unit in ("step", "steps"):
            if number != int(number):
                raise ValueError(f"steps are whole numbers; got {value!r}")
            kind = "steps"
            limit = _MAX_STEPS
        elif unit in ("pass", "passes"):
            kind, limit = "passes", 10**6
        elif unit.removesuffix("s").endswith("flop") and \
                unit.removesuffix("s").removesuffix("flop") in _PREFIXES:
            number *= _PREFIXES[unit.removesuffix("s").removesuffix("flop")]
            kind, limit = "flops", _MAX_FLOPS
        else:
            raise ValueError(f"unknown unit {match['unit']!r} in compute budget {value!r} "
                             "(known: FLOP, KFLOP, MFLOP, GFLOP, TFLOP, PFLOP, steps, passes)")
        if number <= 0:
            raise ValueError(f"a compute budget must be more than 0; got {value!r}")
        if number > limit:
            raise ValueError(f"compute budget {value!r} is implausibly large; is the unit "
                             "right?")
        if kind != "passes" and number < 1:
            raise ValueError(f"compute budget {value!r} is less than one "
                             f"{'FLOP' if kind == 'flops' else 'step'}")
        return cls(number, kind, value.strip())

    @property
    def kind(self) -> Literal["flops", "steps"]:
        """What the loop counts against the budget."""
        return "steps" if self.unit == "steps" else "flops"

    def resolve(self, pass_flops: int) -> int:
        """The budget in FLOPs or steps (:attr:`kind`); ``pass_flops``: one pass over the
        stream (:func:`one_pass_flops`), used by ``passes`` only."""
        if self.unit == "passes":
            return round(self.amount * pass_flops)
        return round(self.amount)

    def __str__(self) -> str:
        return self.text


def one_pass_flops(model: nn.Module, rows: torch.Tensor, labels: torch.Tensor,
                   n_samples: int) -> int:
    """FLOPs of one forward and backward pass of ``model`` over ``n_samples`` training
    samples: counted on ``rows`` (model inputs) with a cross-entropy loss against
    ``labels``, every parameter trained, and scaled to ``n_samples``. The counted ops
    (matrix products, convolutions, attention) cost the same for every row of a batch, so
    the scaling is exact. ``model`` is a copy the caller may throw away; it is put in
    training mode."""
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(rows), labels)
        loss.backward()

    _, flops = flops_of(step)
    return flops * n_samples // len(rows)


def split_shares(total: int, sizes: Sequence[int], rule: str) -> list[int]:
    """``total`` split among experiences of ``sizes`` training samples: ``even``, or
    ``proportional`` to the sizes; whole numbers that sum to ``total`` (what rounding
    leaves goes to the experiences with the largest remainders, the earliest first)."""
    if rule not in SHARE_RULES:
        raise ValueError(f"compute_share must be one of {', '.join(SHARE_RULES)}; got {rule!r}")
    weights = [1] * len(sizes) if rule == "even" else list(sizes)
    whole = sum(weights)
    if whole == 0:
        weights, whole = [1] * len(sizes), len(sizes)
    shares = [total * w // whole for w in weights]
    remainders = sorted(range(len(sizes)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass
class ExperienceSpending:
    """One experience's share and what was done with it."""

    experience: int
    share: int
    spent: int = 0
    trained_batches: int = 0
    cut_batches: int = 0
    first_cut: dict[str, int] | None = None  # where the loop stopped: part, epoch, batch

    @property
    def over(self) -> bool:
        return self.spent > self.share

    def to_dict(self) -> dict[str, Any]:
        return {"experience": self.experience, "share": self.share, "spent": self.spent,
                "trained_batches": self.trained_batches, "cut_batches": self.cut_batches,
                "first_cut": self.first_cut, "over_share": self.over}


@dataclass
class ComputeAllowance:
    """A strategy's compute budget resolved for its stream: what ``ctx.compute_budget``
    shows plugins, and what the standard loop keeps to (module docstring).

    ``kind`` is ``flops`` (the meter's FLOPs but the test predictions') or ``steps``
    (optimizer steps); ``shares[i]`` is the share of the i-th experience shown. What the
    setup hooks compute is charged to the first share; what the plugins compute for their
    reports after the last experience (``after_last``) counts in ``spent`` alone."""

    budget: ComputeBudget
    kind: Literal["flops", "steps"]
    total: int
    share_rule: str
    shares: list[int]
    pass_flops: int | None = None  # one pass over the stream (every FLOP budget has it)
    n_samples: int = 0  # training samples of the stream
    experiences: list[ExperienceSpending] = field(default_factory=list)
    after_last: int = 0  # computed after the last experience (plugin reports)
    # the step-cost prediction (allows_step): the last trained step's cost and rows
    _baseline: int = 0  # the meter's reading when the experience's share opened
    _last_reading: int | None = None  # at the top of the previous step, if it trained
    _last_cost: int | None = None
    _last_rows: int = 0  # its batch rows as drawn
    _last_inputs: int = 0  # its model-input rows (plugins' added rows and views included)
    _pending: tuple[int, int] | None = None  # the step in flight: (rows, model inputs)
    _stopped: bool = False  # the share ran out: the rest of the experience is cut
    _part: int = 0  # fits in the experience so far (an online experience has several)

    # -- the loop --------------------------------------------------------------

    def begin_experience(self, number: int, experience: int, meter: Any) -> None:
        """The ``number``-th shown experience (id ``experience``) begins: its share opens
        at the meter's reading now (the meter has just begun the experience's row), the
        setup's computing charged to the first."""
        self.experiences.append(ExperienceSpending(experience, self.shares[number]))
        setup = meter.rows[0] if number == 0 and meter.rows[0].stage == "setup" else None
        self._baseline = self._reading(meter.row) - \
            (0 if setup is None else self._reading(setup))
        self._last_reading, self._pending, self._stopped, self._part = None, None, False, 0

    def begin_fit(self) -> None:
        """A fit of the standard loop (one part of an online experience) begins."""
        self._part += 1
        self._last_reading = self._pending = None

    def allows_step(self, meter: Any, rows: int) -> bool:
        """Whether the loop may take its next step, of a batch of ``rows`` samples as
        drawn: its predicted cost still fits in what is left of the share. Once a step
        does not fit, no later step of the experience is taken.

        The prediction is the last trained step's cost (measured from the top of that
        step to the top of this one: its hooks included) per model-input row, times the
        rows this step is expected to feed the model: the last step's inputs less its
        drawn rows, plus ``rows``, for a batch no larger than the last (exact where a
        plugin adds a fixed number of rows, replay's memory batch; more than extra views
        add), else the last inputs scaled by the rows (exact for views, more than a fixed
        addition). Before any step of the run, one pass's FLOPs per sample times ``rows``.
        """
        now = self._reading(meter.row)
        if self._last_reading is not None and self._pending is not None:
            self._last_cost = now - self._last_reading
            self._last_rows, self._last_inputs = self._pending
        self._last_reading, self._pending = now, None
        if self._stopped:
            return False
        spent, share = now - self._baseline, self.experiences[-1].share
        if self.kind == "steps":
            fits = spent + 1 <= share
        else:
            fits = spent < share and spent + self._predicted(rows) <= share
        self._stopped = not fits
        return fits

    def _predicted(self, rows: int) -> int:
        if self._last_cost is None or self._last_inputs == 0:
            return 0 if not self.n_samples else -(-(self.pass_flops or 0) * rows
                                                   // self.n_samples)
        if rows <= self._last_rows:
            inputs = rows + self._last_inputs - self._last_rows
        else:
            inputs = self._last_inputs * rows / self._last_rows
        return math.ceil(self._last_cost * inputs / self._last_inputs)

    def stepped(self, rows: int, inputs: int) -> None:
        """The step trained on ``rows`` drawn samples, fed to the model as ``inputs``."""
        self.experiences[-1].trained_batches += 1
        self._pending = (rows, inputs)

    def cut(self, batches: int, epoch: int, batch: int) -> None:
        """The loop stops the fit: ``batches`` of it are left untrained, the first at
        ``batch`` (1-based) of ``epoch`` (0-based)."""
        current = self.experiences[-1]
        current.cut_batches += batches
        if current.first_cut is None and batches:
            current.first_cut = {"part": self._part, "epoch": epoch, "batch": batch}

    def end_experience(self, meter: Any) -> ExperienceSpending:
        """The experience's learning is over (before its evaluation): what it spent."""
        current = self.experiences[-1]
        current.spent = self._reading(meter.row) - self._baseline
        return current

    def close(self, meter: Any) -> None:
        """The run is over: what the plugins computed after the last experience."""
        row = meter.row
        self.after_last = self._reading(row) if row.stage == "report" else 0

    def _reading(self, row: Any) -> int:
        """A meter row's count for this budget: FLOPs but the test predictions', or
        optimizer steps."""
        if self.kind == "steps":
            return row.optimizer_steps
        return sum(row.flops.values()) - row.evaluation_flops

    # -- results ---------------------------------------------------------------

    @property
    def spent(self) -> int:
        return sum(e.spent for e in self.experiences) + self.after_last

    def to_dict(self) -> dict[str, Any]:
        """``compute.budget`` of a strategy in summary.json."""
        return {
            "text": self.budget.text,
            "kind": self.kind,
            "total": self.total,
            "pass_flops": self.pass_flops,
            "share": self.share_rule,
            "shares": list(self.shares),
            "spent": self.spent,
            "after_last": self.after_last,
            "over_budget": self.spent > self.total or any(e.over for e in self.experiences),
            "trained_batches": sum(e.trained_batches for e in self.experiences),
            "cut_batches": sum(e.cut_batches for e in self.experiences),
            "experiences": [e.to_dict() for e in self.experiences],
        }

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the experiences spent so far, and the last trained
        step, which predicts the next experience's first."""
        return {"experiences": [vars(e).copy() for e in self.experiences],
                "last_step": [self._last_cost, self._last_rows, self._last_inputs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experiences = [ExperienceSpending(**e) for e in state["experiences"]]
        self._last_cost, self._last_rows, self._last_inputs = state["last_step"]


def allowance_for(budget: ComputeBudget, share_rule: str, model: nn.Module,
                  experiences: Sequence[Any], to_input: Any) -> ComputeAllowance:
    """``budget`` resolved for a strategy about to learn ``experiences`` (those it is
    shown, with ``n_train``, ``train_x`` and ``train_y``) with ``model`` (the scenario's,
    before any plugin changed it; a copy is counted). ``to_input`` turns stored rows into
    the model's input."""
    sizes = [exp.n_train for exp in experiences]
    pass_flops = None
    if budget.kind == "flops":  # what 'passes' are in, and the loop's first prediction
        # two rows (BatchNorm in training mode needs more than one), from any experience
        rows = to_input(torch.cat([exp.train_x[:2] for exp in experiences])[:2])
        labels = torch.cat([exp.train_y[:2] for exp in experiences])[:2].to(rows.device)
        with torch.random.fork_rng(devices=[rows.device] if rows.device.type == "cuda" else []):
            pass_flops = one_pass_flops(copy.deepcopy(model), rows, labels, sum(sizes))
    total = budget.resolve(pass_flops or 0)
    if total < 1:
        raise ConfigError(f"compute budget {budget} is less than one FLOP of this stream "
                          f"(one pass: {pass_flops} FLOPs)")
    return ComputeAllowance(budget, budget.kind, total, share_rule,
                            split_shares(total, sizes, share_rule), pass_flops, sum(sizes))
