"""The bundled comparison of the classic strategies (scenarios/classics_quick.yaml): every
one runs in the standard loop beside the others under one memory budget, and the ledger
holds each to it, the one known exception named."""

from __future__ import annotations

import pytest

from clsim.cli import bundled_scenarios
from clsim.config import parse_scenario, read_scenario_text
from clsim.runner import run_scenario

REHEARSAL = ("replay", "replay_lwf", "er_ace", "der", "derpp", "gdumb", "icarl")


@pytest.fixture(scope="module")
def classics(tmp_path_factory) -> dict:
    path = bundled_scenarios()["classics_quick"]
    scenario = parse_scenario(read_scenario_text(path), source=str(path))
    return run_scenario(scenario, tmp_path_factory.mktemp("classics")).summary["strategies"]


def test_every_classic_strategy_runs_and_keeps_within_the_budget(classics) -> None:
    """By what it keeps between experiences, every strategy fits; by the peak, only
    replay + lwf is over: LwF's copy is made after replay sized its buffer (the scenario
    says so), and the ledger charges it exactly: a model and the old classes' ids."""
    assert all(s["status"] == "ok" for s in classics.values()), {
        name: s["error"] for name, s in classics.items() if s["status"] != "ok"}
    budget = classics["naive"]["budget_bytes"]
    assert all(s["budget_bytes"] == budget and s["kept_bytes"] <= budget
               for s in classics.values())
    over = {name for name, s in classics.items() if s["over_budget"]}
    assert over == {"replay_lwf"}
    model = classics["naive"]["peak_bytes"]
    old_class_ids = 8 * 8  # int64 ids of the 8 classes before the last experience
    assert classics["replay_lwf"]["peak_bytes"] == \
        classics["replay_lwf"]["kept_bytes"] + model + old_class_ids


def test_rehearsal_beats_forgetting_and_regularisers_do_not_on_class_increments(classics):
    """What the class-incremental literature reports (van de Ven et al. 2022): stored
    samples keep old classes; penalties and distillation alone forget them."""
    naive = classics["naive"]["final_accuracy"]
    for name in REHEARSAL:
        assert classics[name]["final_accuracy"] > naive + 0.6, name
    for name in ("lwf", "ewc_online", "si"):
        assert classics[name]["final_accuracy"] < naive + 0.05, name
