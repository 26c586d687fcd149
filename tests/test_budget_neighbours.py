"""A store sized from the budget fills what the whole strategy leaves, not the model alone.

The case of the issue: replay alone on digits (mlp 64-100-10, 30,040 bytes) under 48 KB
(49,152 bytes) keeps 291 exemplars of 65 bytes (64 raw bytes and a label byte) and peaks
at 49,139 bytes. A user plugin beside it holding two Python numbers (16 bytes) used to
leave replay's buffer as it was, so the strategy held 49,155 bytes, 3 over budget. Sized
once every plugin has set up (``clsim_size_stores``), from the ledger's reading of the
whole strategy, the buffer is one exemplar smaller whichever plugin is listed first, the
run's log names what was subtracted, and a strict run that still outgrows its budget
names every part that grew since setup.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from clsim_plugins.replay import ReplayPlugin

from clsim.config import parse_scenario
from clsim.memory import Measurement
from clsim.runner import run_scenario

MODEL_BYTES = (64 * 100 + 100 + 100 * 10 + 10) * 4  # 30,040
BUDGET = 48 * 1024  # 49,152
ITEM_BYTES = 64 + 1  # an 8x8 uint8 image and its uint8 label
REPLAY = "{replay: {selection: class_balanced}}"


class Counter:
    """A user plugin holding two Python numbers (8 bytes each, as the ledger charges them),
    made in its own clsim_setup."""

    def clsim_setup(self) -> None:
        self.seen = 0
        self.loss_sum = 0.0


class Grower:
    """A user plugin whose state grows after each experience: 10 Python floats (80 bytes)
    and a float64 tensor of 25 values (200 bytes)."""

    def clsim_setup(self) -> None:
        self.history: list[float] = []
        self.snapshot: torch.Tensor | None = None

    def clsim_after_experience(self) -> None:
        self.history.extend([0.0] * 10)
        self.snapshot = torch.zeros(25, dtype=torch.float64)


class SecondReplay(ReplayPlugin):
    """A second replay buffer in the same strategy (a strategy names each plugin once)."""


SCENARIO = """\
name: neighbours
seed: 0
threads: 1
data: {{dataset: digits}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {{name: mlp, hidden: [100]}}
training: {{epochs: 1, batch_size: 32, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}
budget: 48KB
strategies:
{strategies}"""


def run(tmp_path: Path, strategies: dict[str, str], strict: bool = False
        ) -> tuple[dict, dict[str, list[dict]]]:
    """Summaries by strategy, and each strategy's ``store_sized`` events."""
    lines = "".join(f"  {name}: {{strict: {str(strict).lower()}, plugins: {plugins}}}\n"
                    for name, plugins in strategies.items())
    result = run_scenario(parse_scenario(SCENARIO.format(strategies=lines)), tmp_path)
    sized: dict[str, list[dict]] = {name: [] for name in strategies}
    for path in tmp_path.rglob("events.jsonl"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "store_sized":
                sized[event["strategy"]].append(event)
    return result.summary["strategies"], sized


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory) -> tuple[dict, dict[str, list[dict]]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(Path(__file__).parent))
        return run(tmp_path_factory.mktemp("neighbours"), {
            "alone": f"[{REPLAY}]",
            "replay_first": f"[{REPLAY}, '{__name__}:Counter']",
            "counter_first": f"['{__name__}:Counter', {REPLAY}]",
        })


def capacity(summary: dict, plugin: str = "replay") -> int:
    return summary["ledger"][-1]["parts"][f"{plugin}.buffer.x"] // 64


def test_a_neighbour_in_either_order_leaves_one_exemplar_less_and_the_run_within_budget(
    neighbours,
) -> None:
    """Alone: 291 exemplars, 49,139 bytes. Beside the 16-byte plugin, listed after replay
    (its state made after replay's clsim_setup) or before it: 290, and 49,139 - 65 + 16 =
    49,090 bytes, within 49,152 (was 49,155, over)."""
    summaries, sized = neighbours
    alone = summaries["alone"]
    own = sized["alone"][0]["held"]["replay"]  # replay's bookkeeping, its buffer empty
    assert capacity(alone) == (BUDGET - MODEL_BYTES - own) // ITEM_BYTES == 291
    assert alone["peak_bytes"] == 49_139 and alone["over_budget"] is False
    for name in ("replay_first", "counter_first"):
        s = summaries[name]
        assert s["status"] == "ok", s["error"]
        assert s["ledger"][0]["parts"]["Counter.seen"] == 8
        assert s["ledger"][0]["parts"]["Counter.loss_sum"] == 8
        assert capacity(s) == (BUDGET - MODEL_BYTES - own - 16) // ITEM_BYTES == 290
        assert s["peak_bytes"] == alone["peak_bytes"] - ITEM_BYTES + 16 == 49_090
        assert s["peak_bytes"] <= s["budget_bytes"] == BUDGET
        assert s["over_budget"] is False


def test_the_log_names_every_holder_it_subtracted(neighbours) -> None:
    """One ``store_sized`` event per store, with each holder's bytes in the strategy's
    order and a line naming them."""
    _, sized = neighbours
    own = sized["alone"][0]["held"]["replay"]
    loop = {"the loop's optimizer state": 0}  # offline: the loop carries nothing over
    expected = {
        "alone": {"model": MODEL_BYTES, "replay": own},
        "replay_first": {"model": MODEL_BYTES, "replay": own, "Counter": 16},
        "counter_first": {"model": MODEL_BYTES, "Counter": 16, "replay": own},
    }
    for name, held in expected.items():
        (event,) = sized[name]
        assert event["plugin"] == "replay" and event["store"] == "buffer"
        assert list(event["held"].items()) == list(held.items())  # in the strategy's order
        assert event["reserved"] == loop
        assert event["budget_bytes"] == BUDGET and event["item_bytes"] == ITEM_BYTES
        assert event["capacity"] == 291 if name == "alone" else 290
    assert sized["replay_first"][0]["message"] == (
        f"replay: 290 exemplars fit in 48.00 KB beside 29.34 KB held by the model, {own} B "
        "by 'replay' itself, 16 B by 'Counter' and 0 B for the loop's optimizer state")
    assert sized["counter_first"][0]["message"] == (
        f"replay: 290 exemplars fit in 48.00 KB beside 29.34 KB held by the model, 16 B by "
        f"'Counter', {own} B by 'replay' itself and 0 B for the loop's optimizer state")


def test_two_stores_share_the_budget_first_come_first_served(
    tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first store sized fills what is left; the second sees it full and is refused
    naming the minimum budget, and it fits once the first has a fixed capacity: it then
    fills what the first leaves, to the byte."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    second = f"'{__name__}:SecondReplay'"
    summaries, sized = run(tmp_path, {
        "greedy": f"[{REPLAY}, {second}]",
        "split": f"[{{replay: {{selection: class_balanced, capacity: 100}}}}, {second}]",
    })
    error = summaries["greedy"]["error"]
    assert error.startswith("plugin 'SecondReplay' failed in clsim_size_stores")
    (first,) = sized["greedy"]  # replay sized, and said so, before the refusal
    own = first["held"]["replay"]  # either replay's bookkeeping, its buffer empty
    assert first["plugin"] == "replay" and first["capacity"] == 291
    # beside SecondReplay's empty buffer: the model and replay with its 291 exemplars
    beside = MODEL_BYTES + 291 * ITEM_BYTES + own + own
    minimum = int(re.search(r"the minimum budget is (\d+) bytes", error)[1])
    assert minimum == beside + ITEM_BYTES and BUDGET < minimum
    assert f"take {beside} bytes (29.34 KB held by the model, " in error
    assert f"by 'replay', {own} B by 'SecondReplay' itself and 0 B for" in error
    split = summaries["split"]
    assert split["status"] == "ok", split["error"]
    assert capacity(split) == 100
    (event,) = sized["split"]  # only SecondReplay sizes from the budget
    assert event["plugin"] == "SecondReplay"
    assert event["capacity"] == capacity(split, "SecondReplay") == \
        (BUDGET - sum(event["held"].values())) // ITEM_BYTES
    assert event["held"]["replay"] == capacity(split) * ITEM_BYTES + \
        own  # its 100 exemplars and its bookkeeping
    assert split["peak_bytes"] <= BUDGET < split["peak_bytes"] + ITEM_BYTES


def test_a_strict_failure_names_every_part_that_grew_since_setup(
    tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replay fills the budget at setup; the neighbour then grows two parts (200 and 80
    bytes). The failure names both, with their bytes at setup and now, though the
    smaller is not among the largest parts."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    summaries, _ = run(tmp_path, {"grows": f"[{REPLAY}, '{__name__}:Grower']"}, strict=True)
    held = 49_139 + 200 + 80  # replay as alone, then the neighbour's growth
    assert summaries["grows"]["ledger"][-1]["total_bytes"] == held
    assert summaries["grows"]["error"] == (
        f"strategy 'grows' holds {held} bytes after experience 0, over its budget of "
        f"{BUDGET} bytes (48KB), checked against the peak held during training "
        "(budget_check: peak); grown since setup: Grower.snapshot +200 B (0 -> 200), "
        "Grower.history +80 B (0 -> 80); largest parts: model.parameters 30040 B, "
        "replay.buffer.x 18624 B, replay.buffer.y 291 B"
    )


def test_grown_since_lists_each_larger_part_with_both_readings() -> None:
    then = Measurement({"model.parameters": 100, "a.x": 10, "a.y": 5})
    now = Measurement({"model.parameters": 100, "a.x": 12, "a.y": 4, "b.z": 7})
    assert now.grown_since(then) == {"b.z": (0, 7), "a.x": (10, 12)}
    assert then.grown_since(then) == {}


USER_PLUGINS = '''\
class Counter:
    """Two Python numbers, made in its own setup."""

    def clsim_setup(self):
        self.seen = 0
        self.loss_sum = 0.0


class Grower:
    """State that grows after each experience."""

    def clsim_setup(self):
        self.history = []

    def clsim_after_experience(self):
        self.history.extend([0.0] * 10)
'''


def test_through_the_cli_a_plugin_beside_replay_fits_and_strict_names_what_grew(tmp_path):
    """As a user meets it: their plugin file beside the scenario, clsim run from there."""
    from helpers import run_cli

    strategies = (f"  counted: {{plugins: [{REPLAY}, 'user_plugins:Counter']}}\n"
                  f"  grows: {{strict: true, plugins: [{REPLAY}, 'user_plugins:Grower']}}\n")
    (tmp_path / "user_plugins.py").write_text(USER_PLUGINS, encoding="utf-8")
    (tmp_path / "s.yaml").write_text(SCENARIO.format(strategies=strategies), encoding="utf-8")
    proc = run_cli("run", "s.yaml", "--out", "out", "--no-progress", cwd=tmp_path,
                   env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr  # 'grows' outgrows its budget under strict
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    counted, grows = summary["counted"], summary["grows"]
    assert counted["status"] == "ok" and counted["peak_bytes"] == 49_090
    assert counted["over_budget"] is False
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").open()]
    (sized,) = [e for e in events if e["event"] == "store_sized" and e["strategy"] == "counted"]
    assert sized["capacity"] == 290 and "16 B by 'Counter'" in sized["message"]
    assert grows["status"] == "failed"
    assert "grown since setup: Grower.history" in grows["error"]


def test_a_fixed_store_is_in_place_before_a_neighbour_sizes_from_the_budget(tmp_path):
    """memo with a fixed capacity holds its store from clsim_setup, as replay and pl_fms
    do, so replay sizes beside it whichever is listed first. (memo re-checks its blocks
    before each experience; what replay took first, memo cannot have: first come, first
    served.)"""
    store = "{memo: {capacity: 50}}"
    sized = {}
    for order in ("replay_first", "store_first"):
        plugins = f"[{REPLAY}, {store}]" if order == "replay_first" else f"[{store}, {REPLAY}]"
        lines = f"  s: {{plugins: {plugins}}}\n"
        out = tmp_path / order
        run_scenario(parse_scenario(SCENARIO.format(strategies=lines)), out, limit=40)
        (event,) = [json.loads(line) for line in (out / "events.jsonl").open()
                    if '"store_sized"' in line and '"plugin": "replay"' in line]
        sized[order] = event
    held = [event["held"]["memo"] for event in sized.values()]
    assert held[0] == held[1] and held[0] >= 50 * ITEM_BYTES  # its 50 items counted
    assert sized["replay_first"]["capacity"] == sized["store_first"]["capacity"]
