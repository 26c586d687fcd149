"""Compute budgets: what they parse to, how they are shared, and how the loop keeps to them.

The properties are exact: one pass of an MLP over the stream equals the closed form, a
budget of one pass trains exactly one epoch of a two-epoch plan, a step budget takes
exactly its steps, and under equal compute replay pays for its memory batches with
fewer steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import REPO_ROOT, run_cli
from torch import nn

from clsim.budget import BudgetPoint
from clsim.compute_budget import ComputeBudget, one_pass_flops, split_shares
from clsim.config import parse_scenario
from clsim.errors import ConfigError
from clsim.grid import plan, run_cell
from clsim.report import analyse, report_markdown
from clsim.runner import run_scenario

SCENARIO = """\
name: compute_budget_test
seed: 0
threads: 1
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [32]}
training: {epochs: 2, batch_size: 32, optimizer: {name: sgd, lr: 0.1}}
strategies:
  naive:
    plugins: [naive]
  naive_pass:
    plugins: [naive]
    compute_budget: "1.0 passes"
  replay_pass:
    plugins: [{replay: {capacity: 200}}]
    compute_budget: "1.0 passes"
  naive_steps:
    plugins: [naive]
    compute_budget: "40 steps"
"""

# an MLP 64 -> 32 -> 10, per sample: forward 2(64*32 + 32*10); backward the weight
# gradients of both layers (the same again) and the input gradient of the second layer
# (2*32*10); the first layer's input needs none
PASS_FLOPS_PER_SAMPLE = 4 * 64 * 32 + 6 * 32 * 10


@pytest.fixture(scope="module")
def summary() -> dict:
    return run_scenario(parse_scenario(SCENARIO), None).summary["strategies"]


# -- what a budget is ------------------------------------------------------------


@pytest.mark.parametrize(("text", "unit", "amount"), [
    ("2 TFLOP", "flops", 2e12), ("500 GFLOPs", "flops", 5e11), ("1e6 flop", "flops", 1e6),
    ("5000 steps", "steps", 5000), ("1 step", "steps", 1), ("0.5 passes", "passes", 0.5),
    ("1 pass", "passes", 1),
])
def test_compute_budgets_parse(text: str, unit: str, amount: float) -> None:
    budget = ComputeBudget.parse(text)
    assert (budget.unit, budget.amount, budget.text) == (unit, amount, text)


@pytest.mark.parametrize(("value", "message"), [
    ("2 XFLOP", "unknown unit 'xflop'"), ("1.5 steps", "whole numbers"),
    ("0 passes", "more than 0"), (5000, "as a string with its unit"),
    ("lots", "cannot read"), ("1e30 TFLOP", "implausibly large"),
    ("1e400 steps", "not a finite number"), ("0.3 FLOP", "less than one FLOP"),
    ("nan passes", "cannot read"),
])
def test_bad_compute_budgets_say_what_is_expected(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ComputeBudget.parse(value)


def test_a_budget_point_gives_memory_compute_or_both() -> None:
    assert BudgetPoint.parse("1MB").compute is None
    compute_only = BudgetPoint.parse("1.0 passes")
    assert compute_only.budget is None and compute_only.label == "1.0 passes"
    both = BudgetPoint.parse({"memory": "1MB", "compute": "2 GFLOP"})
    assert both.label == "1MB, 2 GFLOP" and both.compute.amount == 2e9
    assert both.to_plain() == {"memory": "1MB", "compute": "2 GFLOP"}
    aligned = BudgetPoint.parse({"aligned": "model", "compute": "10 steps"})
    assert aligned.aligned and aligned.label == "aligned: model, 10 steps"
    with pytest.raises(ValueError, match="'memory' or 'aligned'"):
        BudgetPoint.parse({"memory": "1MB", "aligned": "1MB"})
    with pytest.raises(ValueError, match="'memory' of a budget point needs a budget"):
        BudgetPoint.parse({"memory": None, "compute": "1 passes"})


@pytest.mark.parametrize("rule", ["even", "proportional"])
def test_shares_are_whole_and_sum_to_the_budget(rule: str) -> None:
    sizes = [269, 276, 271, 267, 263]
    shares = split_shares(1001, sizes, rule)
    assert sum(shares) == 1001
    if rule == "even":
        assert shares == [201, 200, 200, 200, 200]
    else:  # within one of the exact proportion
        assert all(abs(s - 1001 * n / sum(sizes)) < 1 for s, n in zip(shares, sizes, strict=True))


def test_one_pass_equals_the_closed_form() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    rows, labels = torch.randn(2, 64), torch.tensor([0, 1])
    assert one_pass_flops(model, rows, labels, 1346) == 1346 * PASS_FLOPS_PER_SAMPLE


# -- the loop keeps to it --------------------------------------------------------


def test_one_pass_trains_one_epoch_of_two(summary: dict) -> None:
    """A budget of one pass is half a two-epoch plan: every experience trains its first
    epoch and the second is cut, whole, from its first batch."""
    full, capped = summary["naive"]["compute"], summary["naive_pass"]["compute"]
    budget = capped["budget"]
    assert budget["pass_flops"] == 1346 * PASS_FLOPS_PER_SAMPLE  # digits: 1,346 training rows
    assert budget["total"] == budget["pass_flops"] == budget["spent"]
    assert capped["learning_flops"] == full["learning_flops"] // 2
    assert capped["steps"] * 2 == full["steps"] == budget["trained_batches"] * 2
    assert budget["cut_batches"] == budget["trained_batches"]
    for spending in budget["experiences"]:
        assert spending["trained_batches"] == spending["cut_batches"]
        assert spending["first_cut"] == {"part": 1, "epoch": 1, "batch": 1}
        assert spending["spent"] == spending["share"] and not spending["over_share"]
    assert not budget["over_budget"]


def test_a_step_budget_takes_exactly_its_steps(summary: dict) -> None:
    compute = summary["naive_steps"]["compute"]
    budget = compute["budget"]
    assert (budget["kind"], budget["total"], budget["spent"]) == ("steps", 40, 40)
    assert compute["steps"] == 40 and budget["shares"] == [8] * 5
    assert [e["trained_batches"] for e in budget["experiences"]] == [8] * 5
    # 9 batches an epoch, 2 epochs: the 9th batch of the first epoch is the first cut
    assert {e["cut_batches"] for e in budget["experiences"]} == {10}
    assert {tuple(e["first_cut"].values()) for e in budget["experiences"]} == {(1, 0, 9)}


def test_under_equal_compute_replay_pays_for_its_memory_batches(summary: dict) -> None:
    naive, replay = summary["naive_pass"]["compute"], summary["replay_pass"]["compute"]
    assert replay["budget"]["total"] == naive["budget"]["total"]  # the stream's pass
    assert replay["budget"]["spent"] <= replay["budget"]["total"]
    # a replay step forwards its batch and as many memory rows: about half the steps
    assert replay["steps"] < naive["steps"]
    assert replay["samples_forwarded"]["training"] <= naive["samples_forwarded"]["training"]
    assert summary["replay_pass"]["status"] == "ok"


@pytest.mark.parametrize("passes", ["2.01", "2.03", "2.05", "2.07"])
def test_a_fixed_memory_batch_never_takes_replay_over_a_share(passes: str) -> None:
    """Replay adds 32 memory rows to every batch: a short last batch costs more per drawn
    row than a full one, and the loop's prediction (the rows the model was fed) says so,
    so no share is overspent at any boundary."""
    text = SCENARIO.replace("{replay: {capacity: 200}}",
                            "{replay: {capacity: 200, batch_size_mem: 32}}").replace(
        'compute_budget: "1.0 passes"\n  naive_steps', f'compute_budget: "{passes} passes"'
        '\n  naive_steps')
    record = run_scenario(parse_scenario(text), None, only=["replay_pass"]) \
        .summary["strategies"]["replay_pass"]
    budget = record["compute"]["budget"]
    assert budget["cut_batches"] > 0 and not budget["over_budget"]
    assert all(e["spent"] <= e["share"] for e in budget["experiences"])


def test_a_budget_does_not_change_an_uncut_run() -> None:
    """A budget that cuts nothing leaves the run as it was (the pass count draws no random
    number and changes no state)."""
    def run(budget: str) -> dict:
        text = SCENARIO.replace('compute_budget: "1.0 passes"', budget, 1)
        return run_scenario(parse_scenario(text), None, only=["naive_pass"]) \
            .summary["strategies"]["naive_pass"]

    capped, free = run('compute_budget: "2.0 passes"'), run("")
    assert capped["compute"]["budget"]["cut_batches"] == 0
    assert free["compute"]["budget"] is None
    assert capped["accuracy_matrix"] == free["accuracy_matrix"]
    assert capped["compute"]["learning_flops"] == free["compute"]["learning_flops"]


def test_work_outside_the_loop_over_its_share_fails_a_strict_strategy() -> None:
    """The analytic learner solves each experience in closed form, outside the loop's
    steps: the loop cannot stop it, so a tiny budget is overspent, recorded, and fatal
    under strict."""
    text = (REPO_ROOT / "scenarios" / "analytic_quick.yaml").read_text()
    scenario = parse_scenario(text + '\ncompute_budget: "1 KFLOP"\n')
    name = "analytic"
    record = run_scenario(scenario, None, only=[name]).summary["strategies"][name]
    budget = record["compute"]["budget"]
    assert record["status"] == "ok" and budget["over_budget"]
    assert budget["trained_batches"] == 0  # the loop took no step: 1 KFLOP pays for none
    assert record["compute"]["parts"]["analytic.clsim_train_experience"] > 1000
    # naive's loop keeps to the share: not a single step fits
    naive = run_scenario(scenario, None, only=["naive"]).summary["strategies"]["naive"]
    assert naive["compute"]["budget"]["spent"] == 0 and not naive["compute"]["budget"][
        "over_budget"]
    strict = parse_scenario(text + '\ncompute_budget: "1 KFLOP"\nstrict: true\n')
    failed = run_scenario(strict, None, only=[name]).summary["strategies"][name]
    assert failed["status"] == "failed"
    assert "over its share" in failed["error"] and "1 KFLOP" in failed["error"]
    assert "largest parts: analytic.clsim_after_experience" in failed["error"]


def test_a_compute_budget_needs_accounting(monkeypatch) -> None:
    monkeypatch.setenv("CLSIM_COMPUTE", "off")
    record = run_scenario(parse_scenario(SCENARIO), None, only=["naive_steps"]) \
        .summary["strategies"]["naive_steps"]
    assert record["status"] == "failed"
    assert "needs compute accounting: unset CLSIM_COMPUTE=off" in record["error"]


# -- where users write it --------------------------------------------------------


@pytest.mark.parametrize(("edit", "where", "message"), [
    ('compute_budget: "1.0 passes"', 'compute_budget: "1.0 parsecs"', "unknown unit"),
    ("epochs: 2,", "epochs: 2, compute_share: half,", "unknown key 'compute_share'"),
])
def test_bad_yaml_names_file_line_and_key(edit: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_scenario(SCENARIO.replace(edit, where, 1), source="budgets.yaml")
    assert "budgets.yaml:" in str(caught.value)


def test_bad_share_rule_is_refused() -> None:
    with pytest.raises(ConfigError, match="compute_share") as caught:
        parse_scenario(SCENARIO + "compute_share: half\n", source="budgets.yaml")
    assert "proportional" in str(caught.value) and "budgets.yaml:" in str(caught.value)


def test_the_cli_refuses_a_bad_compute_budget(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(SCENARIO.replace('"40 steps"', '"forty steps"'))
    proc = run_cli("run", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "strategies.naive_steps.compute_budget" in proc.stderr
    assert "bad.yaml:" in proc.stderr


def test_compare_cells_carry_their_compute_budget() -> None:
    text = SCENARIO + ("compare:\n  budgets: ['0.5 passes', {memory: 64KB, compute: "
                       "'1.0 passes'}, {aligned: model + 100 exemplars, compute: '2 steps'}]"
                       "\n  strategies: [naive]\n")
    scenario = parse_scenario(text)
    cells = [run_cell(task) for task in plan(scenario, text, threads=1)]
    assert [c["budget"] for c in cells] == ["0.5 passes", "64KB, 1.0 passes",
                                            "aligned: model + 100 exemplars, 2 steps"]
    assert [c["compute_budget"] for c in cells] == ["0.5 passes", "1.0 passes", "2 steps"]
    assert [c["memory_budget"] for c in cells] == [None, "64KB",
                                                   "aligned: model + 100 exemplars"]
    assert cells[2]["compute"]["steps"] == 2
    half, whole = (c["compute"]["budget"] for c in cells[:2])
    assert half["total"] * 2 == whole["total"] == whole["pass_flops"]
    assert cells[0]["memory_mb"] is None and cells[1]["memory_mb"] == 64 / 1024
    assert whole["trained_batches"] == cells[1]["compute"]["steps"] == 45  # one epoch
    # a cell whose work outside the loop overspent a share is listed in the report
    over = copy.deepcopy(cells[0])
    over["compute"]["budget"]["over_budget"] = True
    over["compute"]["budget"]["experiences"][3]["over_share"] = True
    report = report_markdown(analyse([over, *cells[1:]]), "t")
    assert "## Over a compute share" in report
    assert f"- {over['cell']}: spent {half['spent']:,} of {half['total']:,} FLOPs; over the " \
        "share of experience 3" in report
    # half a pass: each experience trains the whole 32-row batches its share pays for
    for spending in half["experiences"]:
        rows = spending["share"] // PASS_FLOPS_PER_SAMPLE
        assert spending["trained_batches"] == rows // 32
        assert spending["spent"] == spending["trained_batches"] * 32 * PASS_FLOPS_PER_SAMPLE


def test_the_run_console_says_what_each_budget_spent_and_cut(summary: dict) -> None:
    from clsim.logging.console import compute_budget_note

    note = compute_budget_note(summary).splitlines()
    assert note[0].startswith("compute budgets")
    assert "  naive_steps: 40 steps = 40 steps, spent 40; trained 40 batches, cut 50" in note
    assert not any(line.startswith("  naive:") for line in note)  # no budget, no line
    assert compute_budget_note({"naive": summary["naive"]}) == ""


def test_an_online_experience_keeps_to_its_share_across_its_parts() -> None:
    """Online, an experience is trained in parts (one fit each): the share spans them, the
    loop stops in the part where it runs out and cuts every later part whole, and the last
    step's cost still predicts the next part's first (no part overshoots)."""
    text = SCENARIO.replace("stream: {type: class_incremental, n_experiences: 5}",
                            "stream: {type: class_incremental, n_experiences: 5, online: true, "
                            "eval_every: 100}").replace("epochs: 2", "epochs: 1")
    text = text.replace('compute_budget: "1.0 passes"', 'compute_budget: "0.5 passes"', 1)
    record = run_scenario(parse_scenario(text), None, only=["naive_pass"]) \
        .summary["strategies"]["naive_pass"]
    assert record["status"] == "ok", record["error"]
    budget = record["compute"]["budget"]
    for spending in budget["experiences"]:
        assert spending["spent"] <= spending["share"]
        rows = spending["share"] // PASS_FLOPS_PER_SAMPLE
        assert spending["spent"] > (rows - 32) * PASS_FLOPS_PER_SAMPLE  # within a batch
        assert spending["first_cut"]["part"] >= 2 and spending["cut_batches"] > 0
