"""Memory budgets as users write them, resolved to bytes through one arithmetic.

Accepted forms (sums with ``+`` allowed): an integer number of bytes; a size with a
binary unit, ``"7.6MB"`` (1 KB = 2^10 bytes, 1 MB = 2^20, 1 GB = 2^30; ``KiB``/``MiB``/
``GiB`` are the same units); ``"500 exemplars"`` (500 times the bytes of one raw sample
of the scenario's dataset); ``"model"`` (the strategy's model at setup, parameters and
buffers at their dtype width). ``"model + 500 exemplars"`` therefore gives a replay
method its model plus room for 500 raw samples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clsim.compute_budget import ComputeBudget

_UNITS = {"b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30}
_MAX_BYTES = 2**50  # 1 PiB: anything larger is a typo, not a budget
_TERM = re.compile(
    r"^\s*(?:(?P<count>\d+)?\s*(?P<word>models?)|(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]+)?)\s*$"
)
_FORMS = (
    "bytes as an integer, a size such as '7.6MB' (MB = 2^20 bytes), 'N exemplars', "
    "'model', or a sum such as 'model + 500 exemplars'"
)


@dataclass(frozen=True)
class Budget:
    """A parsed budget: a constant byte count plus multiples of exemplars and of the model."""

    bytes: int = 0
    exemplars: int = 0
    models: int = 0
    text: str = ""

    description = "a memory budget: " + _FORMS

    @classmethod
    def parse(cls, value: object) -> Budget:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected {_FORMS}; got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"a budget cannot be negative; got {value} bytes")
            return cls._checked(cls(bytes=value, text=str(value)))
        total = cls(text=value.strip())
        terms = value.lower().split("+")
        if not value.strip() or any(not t.strip() for t in terms):
            raise ValueError(f"expected {_FORMS}; got {value!r}")
        nbytes = exemplars = models = 0
        for term in terms:
            match = _TERM.match(term)
            if not match:
                raise ValueError(
                    f"cannot read {term.strip()!r} in budget {value!r}: expected {_FORMS}"
                )
            if match["word"]:
                models += int(match["count"] or 1)
                continue
            number = float(match["num"])
            if number > _MAX_BYTES:
                raise ValueError(f"budget {value!r} is larger than 1 PiB; is a unit missing?")
            unit = match["unit"] or "b"
            if unit in ("exemplar", "exemplars"):
                if number != int(number):
                    raise ValueError(f"exemplar counts are whole numbers; got {term.strip()!r}")
                exemplars += int(number)
            elif unit in _UNITS:
                nbytes += round(number * _UNITS[unit])
            else:
                known = "B, KB, MB, GB, exemplars, model"
                raise ValueError(f"unknown unit {unit!r} in budget {value!r} (known: {known})")
        return cls._checked(cls(bytes=nbytes, exemplars=exemplars, models=models, text=total.text))

    @classmethod
    def _checked(cls, budget: Budget) -> Budget:
        if max(budget.bytes, budget.exemplars, budget.models) > _MAX_BYTES:
            raise ValueError(f"budget {budget.text!r} is larger than 1 PiB; is a unit missing?")
        return budget

    def resolve(self, *, model_bytes: int, sample_bytes: int) -> int:
        """Bytes allowed for a model of ``model_bytes`` on samples of ``sample_bytes`` each."""
        return self.bytes + self.exemplars * sample_bytes + self.models * model_bytes

    def __str__(self) -> str:
        return self.text


def format_bytes(n: int | None) -> str:
    """Human-readable binary size: 1536 -> '1.50 KB' (KB = 2^10 bytes, as budgets)."""
    if n is None:
        return "-"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class BudgetPoint:
    """One point of a comparison's budget axis: a memory budget, a compute budget
    (:mod:`clsim.compute_budget`), or both.

    A plain memory budget resolves ``model`` against each strategy's own model. ``{aligned:
    BUDGET}`` is the memory-aligned protocol of MEMO (Zhou et al., ICLR 2023): ``model``
    means the scenario's *reference* model, so every strategy gets the same total bytes,
    and what a strategy does not spend on its own model is left for exemplars. A point
    without a memory budget leaves each strategy its own (the scenario's ``budget``).
    """

    budget: Budget | None
    aligned: bool = False
    compute: ComputeBudget | None = None

    description = ("a memory budget (see 'budget'), a compute budget ('2 TFLOP', '5000 "
                   "steps', '1.0 passes'), or a mapping with 'memory' or 'aligned' and/or "
                   "'compute'")

    @classmethod
    def parse(cls, value: object) -> BudgetPoint:
        if isinstance(value, dict):
            unknown = [str(key) for key in value if key not in ("aligned", "memory", "compute")]
            if unknown:
                raise ValueError(f"unknown key {', '.join(map(repr, unknown))} in a budget point "
                                 "(known keys: memory, aligned, compute)")
            if any(value.get(key) is None for key in value):
                empty = next(str(key) for key in value if value.get(key) is None)
                raise ValueError(f"'{empty}' of a budget point needs a budget; got nothing")
            if not value or {"aligned", "memory"} <= set(value):
                raise ValueError("a budget point mapping takes 'memory' or 'aligned' (a memory "
                                 "budget; not both) and/or 'compute' (a compute budget); got "
                                 f"{', '.join(map(str, value)) or 'none'}")
            memory = value.get("aligned", value.get("memory"))
            return cls(None if memory is None else Budget.parse(memory),
                       aligned="aligned" in value,
                       compute=None if "compute" not in value
                       else ComputeBudget.parse(value["compute"]))
        if isinstance(value, str) and _looks_like_compute(value):
            return cls(None, compute=ComputeBudget.parse(value))
        return cls(Budget.parse(value))

    @property
    def memory_label(self) -> str | None:
        """The memory budget's part of the label (None: each strategy's own budget)."""
        if self.budget is None:
            return None
        return f"aligned: {self.budget.text}" if self.aligned else self.budget.text

    @property
    def label(self) -> str:
        parts = [] if self.budget is None else [self.memory_label]
        if self.compute is not None:
            parts.append(self.compute.text)
        return ", ".join(parts)

    def to_plain(self) -> str | dict[str, str]:
        """The point as the YAML gave it (for the resolved scenario)."""
        if self.compute is None and not self.aligned and self.budget is not None:
            return self.budget.text
        plain = {} if self.budget is None else \
            {"aligned" if self.aligned else "memory": self.budget.text}
        if self.compute is not None:
            plain["compute"] = self.compute.text
        return plain

    def resolve(self, *, model_bytes: int, reference_model_bytes: int, sample_bytes: int) -> int:
        """Total bytes for a strategy whose own model takes ``model_bytes`` (a point with a
        memory budget only)."""
        assert self.budget is not None
        models = reference_model_bytes if self.aligned else model_bytes
        return self.budget.resolve(model_bytes=models, sample_bytes=sample_bytes)


def _looks_like_compute(text: str) -> bool:
    """Whether a budget point string names compute (a FLOP, step or pass unit)."""
    return _COMPUTE_UNIT.search(text.strip().lower()) is not None


_COMPUTE_UNIT = re.compile(r"(flops?|steps?|pass|passes)$")
