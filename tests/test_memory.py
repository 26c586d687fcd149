"""The memory ledger: exact byte counts of what a strategy holds, and the budget checks."""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clsim.config import parse_scenario
from clsim.context import RunContext
from clsim.memory import Ledger, Measurement, measure, model_bytes
from clsim.models import MLPOptions, build_model
from clsim.runner import run_scenario

# The mlp used end to end on digits: 64 -> 32 -> 10, float32, no buffers.
# (64 * 32 + 32 + 32 * 10 + 10) parameters * 4 bytes = 2410 * 4 = 9640 bytes.
DIGITS_MLP_BYTES = 9640


def digits_mlp() -> nn.Module:
    return build_model("mlp", (1, 8, 8), 10, MLPOptions(hidden=[32]))


def scenario_yaml(strategies: str) -> str:
    return (
        "data: {dataset: digits}\n"
        "stream: {n_experiences: 5}\n"
        "model: {name: mlp, hidden: [32]}\n"
        "training: {epochs: 1, batch_size: 64}\n"
        "strategies:\n" + strategies
    )


class Holder:
    """A bare object standing in for a plugin's state."""


# ---------------------------------------------------------------------------
# a plugin defined outside the package, loaded by dotted path
# ---------------------------------------------------------------------------


class NestedDictPlugin:
    """Keeps one float64 tensor deep inside a dict of dicts of lists, and the run context."""

    def __init__(self) -> None:
        self.store: dict = {}
        self.ctx = None

    def clsim_setup(self, ctx) -> None:
        self.store = {"a": {"b": [torch.zeros(7, 3, dtype=torch.float64)]}}
        self.ctx = ctx  # the run context (dataset, model) is never charged to a plugin


def test_mlp_bytes_by_hand() -> None:
    """The reference model: 2410 float32 parameters are 9640 bytes, nothing else."""
    model = digits_mlp()
    assert sum(p.numel() for p in model.parameters()) == 2410
    assert measure(model).parts == {"model.parameters": DIGITS_MLP_BYTES}
    assert model_bytes(model) == DIGITS_MLP_BYTES


def test_plugin_by_dotted_path_nested_tensor_is_charged_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run through the engine, a tensor nested in dict -> dict -> list is found and charged
    at its real width (7 * 3 float64 = 168 bytes) to the plugin's attribute; the run
    context it keeps is not charged; the total is the model plus that, at every point of
    every experience (start, end of training, end)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    ref = f"{__name__}:NestedDictPlugin"
    assert sys.modules[__name__].NestedDictPlugin is NestedDictPlugin
    text = scenario_yaml(f"  nested:\n    plugins:\n      - {ref}\n")
    result = run_scenario(parse_scenario(text), None)
    summary = result.summary["strategies"]["nested"]
    assert summary["status"] == "ok", summary["error"]
    assert len(summary["ledger"]) == 3 * 5
    for record in summary["ledger"]:
        assert record["parts"] == {
            "NestedDictPlugin.store": 7 * 3 * 8,
            "model.parameters": DIGITS_MLP_BYTES,
        }
        assert record["total_bytes"] == DIGITS_MLP_BYTES + 168
        assert record["estimated"] is False
    assert summary["peak_bytes"] == summary["kept_bytes"] == DIGITS_MLP_BYTES + 168
    assert summary["budget_bytes"] is None and summary["over_budget"] is False


# ---------------------------------------------------------------------------
# the model: parameters and buffers at dtype width
# ---------------------------------------------------------------------------


class Mixed(nn.Module):
    """BatchNorm (float32 affine + stats, int64 counter), a float64 buffer, a float16 param."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("stats", torch.zeros(5, dtype=torch.float64))
        self.small = nn.Parameter(torch.zeros(3, dtype=torch.float16))


def test_model_counts_every_dtype_at_its_width() -> None:
    """BN weight+bias 2*4*4 = 32, running mean+var 2*4*4 = 32, num_batches_tracked 8
    (int64), a float64 buffer of 5 = 40 and a float16 parameter of 3 = 6: 118 bytes."""
    model = Mixed()
    assert model.bn.num_batches_tracked.dtype == torch.int64
    m = measure(model)
    assert m.parts == {"model.parameters": 32 + 6, "model.buffers": 32 + 8 + 40}
    assert m.total_bytes == 118
    assert model_bytes(model) == 118
    assert not m.estimated


def test_plain_tensor_attribute_on_a_submodule_is_counted() -> None:
    """A tensor kept as an ordinary attribute (not a parameter or buffer) is still held."""
    model = Mixed()
    model.bn.extra = torch.zeros(2, 2, dtype=torch.int32)
    m = measure(model)
    assert m.parts["model.extra"] == 16
    assert m.total_bytes == 118 + 16


def test_private_tensor_attribute_on_a_submodule_is_counted() -> None:
    """The ledger promises 'any tensor kept as a plain attribute of one of its modules';
    a leading underscore in the name does not make the memory free."""
    model = Mixed()
    model.bn._cache = torch.zeros(25, dtype=torch.float32)
    assert measure(model).total_bytes == 118 + 100


def test_tied_parameters_are_counted_once() -> None:
    """Two modules sharing one Parameter hold one storage."""
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    assert measure(nn.Sequential(a, b)).total_bytes == 4 * 4 * 4


def test_model_bytes_follows_dtype_conversion() -> None:
    """The same model in float64 holds exactly twice the bytes; in bfloat16 half."""
    model = digits_mlp()
    assert model_bytes(model.double()) == 2 * DIGITS_MLP_BYTES
    assert model_bytes(model.to(torch.bfloat16)) == DIGITS_MLP_BYTES // 2


# ---------------------------------------------------------------------------
# plugin state
# ---------------------------------------------------------------------------


def test_shared_tensor_is_charged_once() -> None:
    """Two attributes pointing at one tensor hold one storage: charged once, to the first."""
    p = Holder()
    t = torch.zeros(10, dtype=torch.float32)
    p.a = t
    p.b = t
    p.c = [t, (t, {"again": t})]
    m = measure(None, [("p", p)])
    assert m.parts == {"p.a": 40}


def test_view_charges_its_whole_base_once() -> None:
    """A view keeps its base storage alive: a slice of 2 of a 100-float tensor costs 400
    bytes; the base and several views together still cost 400."""
    base = torch.zeros(100, dtype=torch.float32)
    only_view = Holder()
    only_view.v = base[2:4]
    assert measure(None, [("p", only_view)]).total_bytes == 400

    many = Holder()
    many.views = [base[:10], base[50:], base.view(10, 10).t(), base[::3]]
    many.base = base
    assert measure(None, [("p", many)]).total_bytes == 400


def test_view_of_a_model_parameter_is_not_charged_to_the_plugin() -> None:
    """The model is walked first, so a plugin's view of a live parameter costs nothing more."""
    model = digits_mlp()
    p = Holder()
    p.w = model.head.weight.detach()[:, :3]
    m = measure(model, [("p", p)])
    assert m.parts == {"model.parameters": DIGITS_MLP_BYTES}


def test_live_model_reference_is_free_but_a_copy_is_charged() -> None:
    """Referring to the live model costs nothing; a deepcopy (an old model kept for
    distillation) is charged exactly the model's bytes, parameters and buffers."""
    model = Mixed()
    p = Holder()
    p.model = model
    p.also = [model, {"m": model.bn}]
    m = measure(model, [("p", p)])
    assert m.total_bytes == 118
    assert m.bytes_of("p") == 0

    p.old = copy.deepcopy(model)
    m = measure(model, [("p", p)])
    assert m.bytes_of("p.old") == 118
    assert m.parts["p.old.parameters"] == 38 and m.parts["p.old.buffers"] == 80
    assert m.total_bytes == 2 * 118


def test_numpy_arrays_and_views_counted_once_by_base() -> None:
    """A numpy array and its views (slices, transposes, views of views) cost the base once;
    a view held alone costs its whole base."""
    a = np.zeros((10, 3), dtype=np.float64)  # 240 bytes
    p = Holder()
    p.a = a
    p.rows = a[1:3]
    p.t = a.T
    p.deep = [a[::2][1:].T, a.reshape(-1)[3:]]
    m = measure(None, [("p", p)])
    assert m.total_bytes == 240
    assert m.parts == {"p.a": 240}

    q = Holder()
    q.v = np.arange(100, dtype=np.int16)[::10]
    assert measure(None, [("q", q)]).parts == {"q.v": 200}


def test_python_numbers_are_estimated_at_8_bytes_each() -> None:
    """Python ints, floats and bools in plugin state cost 8 bytes each and their part is
    marked estimated; a tensor beside them is exact."""
    p = Holder()
    p.scores = [1, 2.5, 3, True]
    p.exact = torch.zeros(2, dtype=torch.int64)
    m = measure(None, [("p", p)])
    assert m.parts == {"p.scores": 32, "p.exact": 16}
    assert m.estimated_parts == {"p.scores"}
    assert m.estimated
    assert m.to_dict()["estimated_parts"] == ["p.scores"]


def test_strings_and_bytes_cost_their_length() -> None:
    """A string costs its UTF-8 length, bytes their length, both estimated."""
    p = Holder()
    p.names = ["abc", "é"]  # 3 + 2 bytes
    p.raw = b"\x00" * 9
    m = measure(None, [("p", p)])
    assert m.parts == {"p.names": 5, "p.raw": 9}
    assert m.estimated_parts == {"p.names", "p.raw"}


@dataclasses.dataclass
class _Options:
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    name: str = "configuration"


class OptionsPlugin:
    Options = _Options

    def __init__(self, options: _Options) -> None:
        self.options = options
        self.state = torch.zeros(4, dtype=torch.uint8)


def test_declared_options_are_not_charged() -> None:
    """The plugin's options dataclass is configuration, not learned state."""
    m = measure(None, [("p", OptionsPlugin(_Options()))])
    assert m.parts == {"p.state": 4}
    assert not m.estimated


def test_run_context_in_skip_types_is_not_walked() -> None:
    """A plugin that keeps the run context is not charged for what the context reaches
    (the engine passes RunContext in skip_types); without the skip it would be. Nothing
    can be parked on the context to escape the ledger: it refuses new attributes."""
    model = digits_mlp()
    ctx = RunContext(
        strategy="s",
        model=model,
        device=torch.device("cpu"),
        data=None,
        seed=0,
        epochs=1,
        batch_size=8,
        seen_classes=[0, 1, 2],
    )
    with pytest.raises(AttributeError, match="keeps its state on itself"):
        ctx.scratch = torch.zeros(1000, dtype=torch.float32)
    ctx.seen_classes = list(range(1000))  # engine-owned fields stay writable
    p = Holder()
    p.ctx = ctx
    skipped = measure(model, [("p", p)], skip_types=(RunContext,))
    assert skipped.parts == {"model.parameters": DIGITS_MLP_BYTES}
    walked = measure(model, [("p", p)])
    assert walked.bytes_of("p.ctx") > 0  # shows the skip is what keeps it out


def test_cycles_terminate_and_charge_once() -> None:
    """An object referring to itself, a list containing itself and a dict containing
    itself are walked once; the tensor they share is charged once."""
    t = torch.zeros(3, dtype=torch.float64)
    p = Holder()
    p.me = p
    loop: list = [t]
    loop.append(loop)
    d: dict = {"t": t}
    d["d"] = d
    inner = Holder()
    inner.parent = p
    inner.t = t
    p.things = [loop, d, inner]
    m = measure(None, [("p", p)])
    assert m.total_bytes == 24


def test_sparse_tensor_counts_indices_and_values() -> None:
    """A sparse COO tensor costs its int64 indices and its values, not its dense size."""
    s = torch.sparse_coo_tensor(
        torch.tensor([[0, 5], [1, 7]]),
        torch.tensor([1.0, 2.0]),
        (1000, 1000),
        check_invariants=True,
    ).coalesce()
    p = Holder()
    p.s = s
    assert measure(None, [("p", p)]).total_bytes == 2 * 2 * 8 + 2 * 4


def test_attribute_of_a_dataclass_instance_outside_its_fields_is_counted() -> None:
    """'Everything reachable from each plugin object' includes an attribute a dataclass
    instance gets after construction (a cache, a lazily built table)."""

    @dataclasses.dataclass
    class State:
        step: int = 0

    state = State()
    state.table = torch.zeros(50, dtype=torch.float32)
    p = Holder()
    p.state = state
    assert measure(None, [("p", p)]).total_bytes == 8 + 200


# ---------------------------------------------------------------------------
# Measurement and Ledger
# ---------------------------------------------------------------------------


def reading(**parts: int) -> Measurement:
    return Measurement(parts={k.replace("__", "."): v for k, v in parts.items()})


def test_measurement_bytes_of_matches_whole_name_prefixes() -> None:
    """bytes_of('replay') sums 'replay' and 'replay.*' parts but not 'replay2.*'."""
    m = reading(replay=1, replay__x=10, replay__y__z=100, replay2__x=1000, model__parameters=5)
    assert m.bytes_of("replay") == 111
    assert m.bytes_of("replay.y") == 100
    assert m.bytes_of("model") == 5
    assert m.total_bytes == 1116


def test_ledger_flags_each_record_against_the_budget() -> None:
    """A record is over budget when its total exceeds the budget (equal is within); the
    ledger is over budget if any record is; peak is the largest total."""
    ledger = Ledger(budget_bytes=100)
    first = ledger.record(0, reading(model__parameters=60))
    second = ledger.record(1, reading(model__parameters=60, p__x=41))
    third = ledger.record(2, reading(model__parameters=60, p__x=40))
    assert (first.over_budget, second.over_budget, third.over_budget) == (False, True, False)
    assert ledger.over_budget
    assert ledger.peak_bytes == 101
    assert not ledger.estimated


def test_ledger_peak_and_kept_figures_and_the_check_they_follow() -> None:
    """peak_bytes is the largest reading at any point, kept_bytes the largest at an
    experience's end; with check 'between' only end readings are flagged over budget."""
    for check, flags, over in (("peak", [True, True, False], True),
                               ("between", [False, False, False], False)):
        ledger = Ledger(budget_bytes=100, check=check)
        records = [ledger.record(0, reading(a=150), point="start"),
                   ledger.record(0, reading(a=120), point="trained"),
                   ledger.record(0, reading(a=90), point="end")]
        assert [r.over_budget for r in records] == flags
        assert ledger.over_budget is over
        assert (ledger.peak_bytes, ledger.kept_bytes) == (150, 90)
        assert ledger.checked_bytes == (150 if check == "peak" else 90)
    ledger = Ledger(budget_bytes=100, check="between")
    ledger.record(0, reading(a=101), point="anytime")
    ledger.record(0, reading(a=101))  # point: end
    assert [r.over_budget for r in ledger.records] == [False, True]
    with pytest.raises(ValueError, match="budget_check"):
        Ledger(None, check="max")
    with pytest.raises(ValueError, match="point"):
        Ledger(None).record(0, reading(a=1), point="middle")


def test_measure_charges_what_the_loop_holds_after_model_and_plugins() -> None:
    """``held`` parts are walked last: an optimizer's state is charged, the parameters it
    is keyed by are the model's (not charged twice)."""
    model = digits_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    m = measure(model, held=[("loop.optimizer", optimizer.state)])
    assert m.parts == {"model.parameters": DIGITS_MLP_BYTES, "loop.optimizer": DIGITS_MLP_BYTES}


def test_ledger_without_budget_is_never_over() -> None:
    """No budget: nothing is over; an empty ledger peaks at 0."""
    assert Ledger(None).peak_bytes == 0
    assert not Ledger(None).over_budget
    ledger = Ledger(None)
    ledger.record(0, reading(a=10**12))
    assert not ledger.over_budget and ledger.peak_bytes == 10**12


def test_ledger_to_list_structure() -> None:
    """to_list gives one plain dict per experience, parts sorted, estimated parts listed."""
    ledger = Ledger(budget_bytes=50)
    ledger.record(0, reading(z=10, a=20))
    est = Measurement(parts={"p.n": 8, "model.parameters": 50}, estimated_parts={"p.n"})
    ledger.record(1, est)
    assert ledger.estimated
    assert ledger.to_list() == [
        {
            "experience": 0,
            "point": "end",
            "position": None,
            "over_budget": False,
            "total_bytes": 30,
            "parts": {"a": 20, "z": 10},
            "estimated": False,
            "estimated_parts": [],
        },
        {
            "experience": 1,
            "point": "end",
            "position": None,
            "over_budget": True,
            "total_bytes": 58,
            "parts": {"model.parameters": 50, "p.n": 8},
            "estimated": True,
            "estimated_parts": ["p.n"],
        },
    ]
    assert list(ledger.to_list()[1]["parts"]) == ["model.parameters", "p.n"]


# ---------------------------------------------------------------------------
# budgets through the engine: strict and not
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_kb_run():
    """Naive fine-tuning (model only, 9640 bytes) under a 1 KB budget, strict and not."""
    text = scenario_yaml(
        "  strict_one:\n    budget: 1KB\n    strict: true\n    plugins: [naive]\n"
        "  lenient:\n    budget: 1KB\n    plugins: [naive]\n"
    )
    return run_scenario(parse_scenario(text), None).summary["strategies"]


def test_strict_budget_fails_the_strategy_naming_budget_and_bytes(one_kb_run) -> None:
    """strict: true stops the strategy at the first point that holds more than its budget
    (the start of experience 0: the peak is checked); the error names the bytes held, the
    point, the budget in bytes and as written."""
    s = one_kb_run["strict_one"]
    assert s["status"] == "failed"
    assert f"holds {DIGITS_MLP_BYTES} bytes after clsim_before_experience of experience 0" \
        in s["error"]
    assert re.search(r"over its budget of 1024 bytes \(1KB\)", s["error"])
    assert f"model.parameters {DIGITS_MLP_BYTES} B" in s["error"]


def test_strict_failure_keeps_the_ledger_in_the_summary(one_kb_run) -> None:
    """The summary of a strategy stopped by its budget still says it was over budget."""
    s = one_kb_run["strict_one"]
    assert s["budget"] == "1KB"
    assert s["budget_bytes"] == 1024
    assert s["over_budget"] is True
    assert s["peak_bytes"] == DIGITS_MLP_BYTES
    assert len(s["ledger"]) == 1


def test_lenient_budget_runs_to_the_end_flagged_over_budget(one_kb_run) -> None:
    """Without strict, the strategy finishes and every record (three points of each of
    five experiences) is flagged over budget."""
    s = one_kb_run["lenient"]
    assert s["status"] == "ok" and s["error"] is None
    assert s["budget"] == "1KB" and s["budget_bytes"] == 1024
    assert s["over_budget"] is True
    assert s["peak_bytes"] == DIGITS_MLP_BYTES
    assert [r["over_budget"] for r in s["ledger"]] == [True] * 15
    assert [r["total_bytes"] for r in s["ledger"]] == [DIGITS_MLP_BYTES] * 15
    assert 0.0 <= s["final_accuracy"] <= 1.0


class _ClassLevel:
    shared = torch.zeros(16, dtype=torch.uint8)  # held by the class, so by every instance

    def get(self) -> torch.Tensor:
        return self.data


def test_state_behind_closures_methods_keys_and_buffers_is_charged() -> None:
    """Each 1 KiB hiding place is charged exactly once (review of the ledger's blind spots)."""
    import array
    import functools

    def kib(fill: int) -> torch.Tensor:
        return torch.full((1024,), fill, dtype=torch.uint8)

    captured = kib(1)
    holder = Holder()
    holder.closure = lambda: captured.sum()
    holder.partial = functools.partial(torch.add, kib(2))
    other = _ClassLevel()
    other.data = kib(3)
    holder.method = other.get  # a bound method keeps its object alive
    holder.keyed = {kib(4): "a tensor used as a key"}
    holder.storage = kib(5).untyped_storage()
    holder.arr = array.array("b", bytes(1024))
    holder.objects = np.array([kib(6), None], dtype=object)
    shared = np.zeros(1024, dtype=np.uint8)
    holder.twins = [shared, torch.from_numpy(shared)]  # one buffer, two views
    parts = measure(None, [("p", holder)]).parts
    assert parts["p.closure"] == 1024
    assert parts["p.partial"] == 1024
    assert parts["p.method"] == 1024  # the object it is bound to
    assert parts["p.keyed"] == 1024 + len("a tensor used as a key")
    assert parts["p.storage"] == 1024
    assert parts["p.arr"] == 1024
    assert parts["p.objects"] == 2 * 8 + 1024  # the pointer array and what it points to
    assert parts["p.twins"] == 1024


def test_plugin_class_attributes_are_charged() -> None:
    assert measure(None, [("c", _ClassLevel())]).parts == {"c.shared": 16}


def test_module_settings_are_not_charged_as_state() -> None:
    """Kernel sizes, strides and paddings are configuration: a conv net's ledger is exactly
    its parameters and buffers, and nothing in it is estimated."""
    from clsim.models import build_model

    model = build_model("resnet20", (3, 32, 32), 10)
    reading = measure(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert reading.total_bytes == params + buffers
    assert not reading.estimated
