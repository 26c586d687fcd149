"""A-GEM (plugins/agem.py): the projection, inside a real run too, the memory's ledger
charge, its budget-sized capacity, and an end-to-end run on digits against naive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clsim_plugins.agem import AgemPlugin, project
from helpers import DIGITS_SCENARIO, digits_scenario

from clsim.assembly import build_stream, load_scenario_data
from clsim.config import parse_scenario
from clsim.engine import run_strategy
from clsim.runner import run_scenario


def scenario_text(strategies: str, epochs: int = 3) -> str:
    return digits_scenario(strategies, hidden=64, epochs=epochs, batch_size=32,
                           lr=0.05, name="agem")




SAMPLE_BYTES, LABEL_BYTES = 64, 1  # an 8x8 uint8 digit, a uint8 label


def summaries(tmp_path: Path, strategies: str) -> dict:
    scenario = parse_scenario(scenario_text(strategies=strategies))
    return run_scenario(scenario, tmp_path).summary["strategies"]


class RecordingAgem(AgemPlugin):
    """A-GEM that records, at every update with a memory, g . g_ref before and after the
    projection and whether the gradient changed (plain lists, outside any budget)."""

    def clsim_setup(self, ctx) -> None:
        super().clsim_setup(ctx)
        self.records: list[tuple[float, float, bool]] = []
        self._ref: torch.Tensor | None = None

    def _reference_gradient(self, ctx, params):
        self._ref = super()._reference_gradient(ctx, params)
        return self._ref

    def clsim_after_backward(self, ctx, batch) -> None:
        before = _flat_grad(ctx.model)
        super().clsim_after_backward(ctx, batch)
        if self._ref is None:
            return
        after = _flat_grad(ctx.model)
        self.records.append((float(before @ self._ref), float(after @ self._ref),
                             bool(torch.equal(before, after))))
        self._ref = None


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])


def test_projection_leaves_no_conflict_and_keeps_an_agreeing_gradient_exactly() -> None:
    """On 2,000 random pairs (half built to conflict): after projection g . g_ref >= 0 (to
    rounding), the projected g differs from g by a multiple of g_ref; when g . g_ref >= 0
    the very same tensor comes back."""
    generator = torch.Generator().manual_seed(0)
    projected_any = False
    for case in range(2000):
        g = torch.randn(50, generator=generator, dtype=torch.float64)
        g_ref = torch.randn(50, generator=generator, dtype=torch.float64)
        if case % 2:
            g_ref = g_ref - 2 * g  # mostly against g
        out = project(g, g_ref)
        scale = float(g.norm() * g_ref.norm())
        assert float(out @ g_ref) >= -1e-12 * scale
        if float(g @ g_ref) >= 0:
            assert out is g
        else:
            projected_any = True
            assert float(out @ g_ref) == pytest.approx(0, abs=1e-12 * scale)
            step = g - out  # removed along g_ref only
            assert torch.allclose(step, (step @ g_ref) / (g_ref @ g_ref) * g_ref)
    assert projected_any
    zero = torch.zeros(50, dtype=torch.float64)
    g = torch.randn(50, generator=generator, dtype=torch.float64)
    assert project(g, zero) is g  # an empty reference gradient changes nothing


def test_in_a_run_every_update_agrees_with_the_memory_gradient(monkeypatch) -> None:
    """In a real run (digits, 3 experiences), after the hook the step's gradient never
    conflicts with the memory gradient; conflicts did occur and were projected, and every
    update that agreed already kept its gradient bit for bit."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    scenario = parse_scenario(scenario_text(
        strategies=f"  agem: {{plugins: [{{'{__name__}:RecordingAgem': {{capacity: 200}}}}]}}\n"))
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    outcome = run_strategy(scenario, scenario.strategies["agem"], dataset, stream, seed=0,
                           device=torch.device("cpu"), keep=True)
    assert outcome.error is None
    records = next(iter(outcome.plugins.values())).records
    assert records  # the memory took part from the second experience on
    conflicts = [r for r in records if r[0] < 0]
    assert conflicts and len(conflicts) < len(records)
    for before, after, unchanged in records:
        assert after >= -1e-4 * max(1.0, abs(before))
        assert unchanged == (before >= 0)


def test_a_fixed_memory_is_charged_its_samples_and_labels(tmp_path: Path) -> None:
    """capacity 100 on digits: the ledger charges agem.memory.x 100 x 64 bytes and .y 100
    x 1 byte, and besides them only the buffer's counters."""
    (s,) = summaries(tmp_path, "  fixed: {plugins: [{agem: {capacity: 100}}]}\n").values()
    assert s["status"] == "ok", s["error"]
    parts = s["ledger"][-1]["parts"]
    assert parts["agem.memory.x"] == 100 * SAMPLE_BYTES
    assert parts["agem.memory.y"] == 100 * LABEL_BYTES
    assert {p for p in parts if p.startswith("agem.")} == {
        f"agem.memory.{a}" for a in ("x", "y", "capacity", "size", "n_seen",
                                     "class_counts", "class_seen")}


def test_a_budget_sized_memory_fills_the_budget_at_the_peak(tmp_path: Path) -> None:
    """Sized from 'model + 300 exemplars', the peak is within the budget and one more
    sample would not have fitted."""
    (s,) = summaries(tmp_path, "  b: {budget: 'model + 300 exemplars', plugins: [agem]}\n"
                     ).values()
    assert s["status"] == "ok", s["error"]
    assert s["over_budget"] is False
    assert s["peak_bytes"] <= s["budget_bytes"] < s["peak_bytes"] + SAMPLE_BYTES + LABEL_BYTES


def test_agem_beats_naive_on_class_incremental_digits(tmp_path: Path) -> None:
    runs = summaries(tmp_path, "  naive: {plugins: [naive]}\n"
                     "  agem: {budget: 'model + 300 exemplars', plugins: [agem]}\n")
    assert runs["agem"]["status"] == "ok", runs["agem"]["error"]
    assert runs["agem"]["final_accuracy"] > runs["naive"]["final_accuracy"] + 0.2


def test_hidden_boundaries_are_refused_before_any_training(tmp_path) -> None:
    """A-GEM stores each experience's samples at its end: a stream without ends is
    refused at its start, not after training through it."""
    text = DIGITS_SCENARIO.replace(
        "stream: {type: class_incremental, n_experiences: 5}",
        "stream: {type: recurring, n_tasks: 2, sequence: [0, 1, 0]}").replace(
        "plugins: [naive]", "plugins: [{agem: {capacity: 50}}]")
    (s,) = run_scenario(parse_scenario(text), tmp_path).summary["strategies"].values()
    assert s["status"] == "failed"
    assert "agem needs task boundaries (it stores samples of each experience" in s["error"]
    assert "clsim_before_experience" in s["error"]
