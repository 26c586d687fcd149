"""Every built-in plugin, given a budget below its minimum, says so.

The plugins are clsim's own ``clsim.plugins`` entry points (pyproject.toml), so a new
built-in is covered without editing this file (give it a stream or companions in
``SETUPS`` if the default class-incremental digits run does not suit it). None is exempt:
every strategy holds at least its model, so even ``naive`` has a minimum. Below it a plugin
must either refuse at setup stating its minimum in bytes (exactly: one byte less
is refused, the minimum itself passes setup, and a plugin that learns of larger needs
later refuses again naming a larger minimum, until the run fits), or be reported over
budget (and, strict, fail naming the bytes held), exactly from one byte below what it
holds without a budget. A store sized from the budget is sized in ``clsim_size_stores``,
once every plugin has set up: a refusal there counts as a refusal in setup.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

import pytest

from clsim.config import parse_scenario
from clsim.runner import run_scenario

# the entry points clsim's own distribution declares (pyproject.toml), not third parties'
BUILT_INS = sorted(
    ep.name for ep in importlib.metadata.distribution("clsim").entry_points
    if ep.group == "clsim.plugins"
)

CLASS_INCREMENTAL = "{type: class_incremental, n_experiences: 5}"
FEW_SHOT = "{type: few_shot, base_classes: 4, ways: 2, shots: 5, sessions: 3}"
# plugin -> (stream, the strategy's plugin list); default: class-incremental, the plugin alone
SETUPS = {
    "tame": ("{type: class_incremental, n_experiences: 5, online: true, boundaries: hidden, "
             "eval_every: 200}", "[tame]"),
    "pl_fms": ("{type: hierarchical, mode: single_label, eval_every: 200, hierarchy: {levels: "
               "[parity, digit], tree: {even: [0, 2, 4, 6, 8], odd: [1, 3, 5, 7, 9]}}}",
               "[pl_fms]"),
    "prototype_fscil": (FEW_SHOT, "[prototype_fscil]"),
    "fast_slow": (FEW_SHOT, "[fast_slow]"),
    "nmc": (FEW_SHOT, "[nmc]"),
    # the default buffer_size 8192 needs 0.5 GB of float64 state: keep the exact-minimum
    # runs small
    "analytic": (CLASS_INCREMENTAL, "[{analytic: {buffer_size: 32}}]"),
    "language_head": (CLASS_INCREMENTAL,
                      "[naive, {language_head: {prompt: 'a handwritten digit {name}'}}]"),
    "avalanche": (CLASS_INCREMENTAL, "[{avalanche: {strategy: Naive}}]"),
}

SCENARIO = """\
name: minimum
seed: 0
threads: 1
data: {{dataset: digits}}
stream: {stream}
model: {{name: mlp, hidden: [16]}}
training: {{epochs: 1, batch_size: 32, optimizer: {{name: sgd, lr: 0.05}}}}
strategies:
  s:
    budget: {budget}
    strict: {strict}
    plugins: {plugins}
"""

MAX_REFUSALS = 12
MINIMUM = re.compile(r"the minimum budget (?:for [^;]+? )?is (?:at least )?(\d+) bytes")
# the points the ledger reads (memory.POINTS): start, end of training, anytime, end
OVER = re.compile(r"strategy 's' holds (\d+) bytes (?:after clsim_before_experience of "
                  r"experience \d+|at the end of experience \d+'s training \(before "
                  r"clsim_after_experience\)|after \d+ training samples|after experience \d+), "
                  r"over its budget of (\d+) bytes")


def run(plugin: str, budget: int | str | None, strict: bool = False) -> dict:
    """The summary entry of the plugin's strategy, run at ``budget``."""
    stream, plugins = SETUPS.get(plugin, (CLASS_INCREMENTAL, f"[{plugin}]"))
    text = SCENARIO.format(stream=stream, plugins=plugins, strict=str(strict).lower(),
                           budget="null" if budget is None else budget)
    return run_scenario(parse_scenario(text), None).summary["strategies"]["s"]


def refusal(plugin: str, outcome: dict) -> int | None:
    """The minimum a plugin stated when it refused its budget in setup, else None."""
    error = outcome["error"] or ""
    at_setup = rf"plugin {re.escape(repr(plugin))} failed in clsim_(setup|size_stores)"
    if not re.match(at_setup, error):
        return None
    match = MINIMUM.search(error)
    assert match, f"{plugin} refused its budget without stating the minimum: {error}"
    return int(match[1])


@pytest.mark.parametrize("plugin", BUILT_INS)
def test_a_budget_below_the_minimum_is_refused_or_reported(plugin):
    if plugin == "avalanche" and importlib.util.find_spec("avalanche") is None:
        pytest.skip("avalanche-lib is not importable here; it lives in .venv-avalanche "
                    "(DEVELOPERS.md), where this test runs it")
    loose, strict = run(plugin, "1KB"), run(plugin, "1KB", strict=True)
    minimum = refusal(plugin, loose)
    if minimum is not None:
        # refused in setup, strict or not, with an exact minimum
        assert minimum > 1024 and refusal(plugin, strict) == minimum
        assert refusal(plugin, run(plugin, minimum - 1)) == minimum
        # setup accepts its minimum; a plugin that learns of larger needs later (classes
        # seen, blocks, experts) refuses again naming a larger minimum, and following the
        # minimums it states ends in a run that fits
        budget = minimum
        for _ in range(MAX_REFUSALS):
            outcome = run(plugin, budget)
            assert refusal(plugin, outcome) is None, outcome["error"]
            if outcome["error"] is None:
                break
            stated = MINIMUM.search(outcome["error"])
            assert outcome["error"].startswith(f"plugin {plugin!r} failed in ") and stated, \
                outcome["error"]
            assert int(stated[1]) > budget
            budget = int(stated[1])
        else:
            pytest.fail(f"{plugin} still refuses after {MAX_REFUSALS} stated minimums")
        assert outcome["over_budget"] is False and outcome["peak_bytes"] <= budget
        return
    # not refused: measured over budget, flagged, and a strict run fails naming the bytes
    assert loose["error"] is None, loose["error"]
    assert loose["over_budget"] is True and loose["peak_bytes"] > 1024
    held = OVER.search(strict["error"] or "")
    assert held and int(held[1]) > 1024 and int(held[2]) == 1024, strict["error"]
    # the minimum is what it holds without a budget: one byte less is over budget
    unbounded = run(plugin, None)
    assert unbounded["error"] is None, unbounded["error"]
    peak = unbounded["peak_bytes"]
    assert run(plugin, peak - 1)["over_budget"] is True
    assert run(plugin, peak)["over_budget"] is False
