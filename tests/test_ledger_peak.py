"""The ledger's two figures: the peak held during training and the bytes kept between
experiences. What a plugin holds only while an experience trains (a distillation teacher,
anything built in clsim_before_experience and dropped in clsim_after_experience) and the
optimizer state the loop carries across the parts of an online experience are in the
peak, exactly; the budget is checked against the peak unless ``budget_check: between``."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from clsim.config import parse_scenario
from clsim.memory import model_bytes
from clsim.models import build_model
from clsim.models.mlp import MLPOptions
from clsim.runner import run_scenario

MODULE = "ledger_peak_test_plugins"
MB = 2**20


class OneMegabyte:
    """Builds a 1 MB float32 tensor in clsim_before_experience, drops it after."""

    def __init__(self, options=None) -> None:
        self.options = options
        self.scratch: torch.Tensor | None = None

    def clsim_before_experience(self, ctx, experience) -> None:
        self.scratch = torch.zeros(MB // 4)

    def clsim_after_experience(self, ctx, experience) -> None:
        self.scratch = None


@pytest.fixture
def this_module(monkeypatch):
    monkeypatch.setitem(sys.modules, MODULE, sys.modules[__name__])
    return MODULE


def digits_mlp() -> nn.Module:
    return build_model("mlp", (1, 8, 8), 10, MLPOptions(hidden=[32]))


def run(yaml: str) -> dict:
    return run_scenario(parse_scenario(yaml), None).summary["strategies"]


def digits(strategies: str, *, stream: str = "{n_experiences: 5}",
           training: str = "{epochs: 1, batch_size: 64}", top: str = "") -> str:
    return (f"data: {{dataset: digits}}\nstream: {stream}\nmodel: {{name: mlp, hidden: [32]}}\n"
            f"training: {training}\n{top}strategies:\n{strategies}")


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------
# anything held only during an experience is in the peak, and not between
# ---------------------------------------------------------------------------


def test_state_built_before_and_dropped_after_an_experience_is_in_the_peak_only(
        this_module) -> None:
    """1 MB built in clsim_before_experience and dropped in clsim_after_experience: charged
    1 MB at the start and at the end of training, 0 between experiences."""
    s = run(digits(f"  scratch:\n    plugins: [naive, {this_module}:OneMegabyte]\n"))["scratch"]
    assert s["status"] == "ok", s["error"]
    model = model_bytes(digits_mlp())
    assert s["peak_bytes"] == model + MB
    assert s["kept_bytes"] == model
    assert [(r["experience"], r["point"]) for r in s["ledger"]] == [
        (e, point) for e in range(5) for point in ("start", "trained", "end")]
    for r in s["ledger"]:
        held = MB if r["point"] in ("start", "trained") else 0
        assert r["parts"].get("OneMegabyte.scratch", 0) == held, r
        assert r["total_bytes"] == model + held


def test_prd_peak_is_the_model_projector_prototypes_and_teacher() -> None:
    """PRD while task 2 trains holds the model, the projector, the prototypes of all ten
    classes and its teacher: a copy of the encoder, of the five old prototype rows, the
    class ids of the old and new rows, and the five float32 loss sums. Kept between
    experiences: the model, the projector and the prototypes only."""
    plugins = "[{prd: {projector_hidden: 16, projector_dim: 8, crop_padding: 1, flip: false}}]"
    s = run(digits(f"  prd:\n    plugins: {plugins}\n", stream="{n_experiences: 2}"))["prd"]
    assert s["status"] == "ok", s["error"]
    model = digits_mlp()
    dim = model.feature_dim
    projector = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 8))
    prototypes = 10 * dim * 4 + 10 * 2 * 8  # a float row, class id and task id per class
    kept = model_bytes(model) + model_bytes(projector) + prototypes
    teacher = (model_bytes(model.features)  # the frozen encoder
               + 5 * dim * 4  # the old prototype rows
               + 5 * 8 + 5 * 8)  # the class ids of the old rows and of the new ones
    sums = 5 * 4  # supcon, proto, distill, the total and a batch count, float32
    assert s["kept_bytes"] == kept
    assert s["peak_bytes"] == kept + teacher + sums
    by_point = {(r["experience"], r["point"]): r for r in s["ledger"]}
    start = by_point[1, "start"]["parts"]
    assert start["prd.old_encoder.parameters"] == nbytes(*model.features.parameters())
    assert start["prd.old_prototypes"] == 5 * dim * 4
    assert by_point[1, "start"]["total_bytes"] == kept + teacher
    assert by_point[1, "trained"]["parts"]["prd._sums"] == sums
    assert not any(p.startswith("prd.old") for p in by_point[1, "end"]["parts"])
    # the first task has no teacher: its class ids and sums only
    assert by_point[0, "trained"]["total_bytes"] == \
        model_bytes(model) + model_bytes(projector) + 5 * dim * 4 + 5 * 2 * 8 + 5 * 8 + sums


# ---------------------------------------------------------------------------
# the optimizer an online experience carries over its parts
# ---------------------------------------------------------------------------

ONLINE = "{online: true, n_experiences: 5, eval_every: 100}"


@pytest.mark.parametrize(
    ("optimizer", "state"),
    [
        # a momentum buffer per parameter
        ("{name: sgd, lr: 0.01, momentum: 0.9}", lambda ps: nbytes(*ps)),
        # two moments per parameter and a float32 step count per parameter tensor
        ("{name: adam, lr: 0.001}", lambda ps: 2 * nbytes(*ps) + 4 * len(ps)),
        ("{name: sgd, lr: 0.01}", lambda ps: 0),  # plain SGD keeps no state
    ],
)
def test_online_optimizer_state_is_in_the_peak(optimizer, state) -> None:
    """On an online stream the loop keeps its optimizer across the parts of an experience
    (from one anytime evaluation to the next): its state is charged as loop.optimizer at
    every anytime point and at the end of training, and is gone between experiences."""
    s = run(digits("  naive:\n    plugins: [naive]\n", stream=ONLINE,
                   training=f"{{batch_size: 10, optimizer: {optimizer}}}"))["naive"]
    assert s["status"] == "ok", s["error"]
    expected = state(list(digits_mlp().parameters()))
    # the model: its parameters and the growing head's mask of the labels met (a bool each)
    model = model_bytes(digits_mlp()) + 10
    anytime = [r for r in s["ledger"] if r["point"] == "anytime"]
    assert len(anytime) > 5
    for r in s["ledger"]:
        carried = expected if r["point"] in ("anytime", "trained") else 0
        assert r["parts"].get("loop.optimizer", 0) == carried, r
        assert r["total_bytes"] == model + carried
    assert s["peak_bytes"] == model + expected
    assert s["kept_bytes"] == model


# ---------------------------------------------------------------------------
# budget_check: which figure over_budget and strict mode follow
# ---------------------------------------------------------------------------


def test_budget_check_chooses_the_figure_over_budget_follows(this_module) -> None:
    """Under model + 512 KB, 1 MB held during training is over budget by the peak (the
    default) and within it by the bytes kept between experiences; the summary names the
    check, and only the rows the check counts are flagged."""
    model = model_bytes(digits_mlp())
    strategies = "".join(
        f"  {name}:\n    budget: model + 512KB\n{extra}"
        f"    plugins: [naive, {this_module}:OneMegabyte]\n"
        for name, extra in (("default", ""), ("peak", "    budget_check: peak\n"),
                            ("between", "    budget_check: between\n")))
    result = run(digits(strategies))
    for name in ("default", "peak"):
        s = result[name]
        assert s["status"] == "ok" and s["budget_check"] == "peak"
        assert s["budget_bytes"] == model + MB // 2
        assert s["over_budget"] is True
        assert [r["over_budget"] for r in s["ledger"]] == [True, True, False] * 5
    s = result["between"]
    assert s["status"] == "ok" and s["budget_check"] == "between"
    assert s["over_budget"] is False
    assert not any(r["over_budget"] for r in s["ledger"])
    assert (s["peak_bytes"], s["kept_bytes"]) == (model + MB, model)
    # a scenario-wide default, overridden per strategy
    plugins = f"    plugins: [naive, {this_module}:OneMegabyte]\n"
    text = digits(f"  a:\n{plugins}  b:\n    budget_check: peak\n{plugins}",
                  top="budget: model + 512KB\nbudget_check: between\n")
    both = run(text)
    assert (both["a"]["over_budget"], both["b"]["over_budget"]) == (False, True)


def test_strict_peak_check_fails_naming_the_point(this_module) -> None:
    """strict with the peak check stops at the first point over budget, here right after
    clsim_before_experience of experience 0, and says which figure was checked; with the
    between check the same strategy runs to the end."""
    strategies = "".join(
        f"  {name}:\n    budget: model + 512KB\n    strict: true\n    budget_check: {check}\n"
        f"    plugins: [naive, {this_module}:OneMegabyte]\n"
        for name, check in (("peak", "peak"), ("between", "between")))
    result = run(digits(strategies))
    s = result["peak"]
    assert s["status"] == "failed"
    model = model_bytes(digits_mlp())
    assert f"holds {model + MB} bytes after clsim_before_experience of experience 0" \
        in s["error"]
    assert "checked against the peak held during training (budget_check: peak)" in s["error"]
    assert f"OneMegabyte.scratch {MB} B" in s["error"]
    assert [r["point"] for r in s["ledger"]] == ["start"]
    assert result["between"]["status"] == "ok"
    assert result["between"]["over_budget"] is False
