"""Checkpoints: safe state encoding, exact resume for every built-in plugin, a real kill."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from helpers import DIGITS_SCENARIO, REPO_ROOT, comparable_outcome, run_cli, without_measurements

from clsim.assembly import build_stream, limit_stream, load_scenario_data
from clsim.checkpoint import Checkpointing, checkpoint_path, fingerprint, read_checkpoint
from clsim.cli import main
from clsim.config import load_scenario
from clsim.engine import run_strategy
from clsim.seeding import torch_generator
from clsim.snapshot import Decoder, Encoder, SnapshotError
from clsim.training import Trainer

ALLOWED = ("clsim", "torch", "numpy", __name__.split(".")[0])


@dataclass(frozen=True)
class Frozen:
    a: int
    b: tuple


class Pair(NamedTuple):
    left: object
    right: object


class Holder:
    def __init__(self):
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                                         torch.nn.Linear(4, 2))
        self.old = self.model[0]  # shared with the model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.generator = torch.Generator().manual_seed(5)
        self.rng = np.random.default_rng(7)
        self.table = collections.defaultdict(list, {3: [1.5], (1, "x"): []})
        self.recent = collections.deque([1, 2], maxlen=4)
        self.frozen = Frozen(1, (2.5, "s"))
        self.pair = Pair(np.arange(6, dtype=np.float32).reshape(2, 3), np.int64(9))
        self.view = self.model[0].weight[:2]  # a view of a parameter
        self.me = self  # a cycle
        self.hook = self.model.register_forward_hook(self.on_forward)
        self.calls = 0

    def on_forward(self, module, inputs, output):
        self.calls += 1


def _round_trip(obj, tmp_path):
    node = Encoder(ALLOWED).encode(obj)
    torch.save(node, tmp_path / "s.pt")
    return Decoder(ALLOWED).decode(torch.load(tmp_path / "s.pt", weights_only=True))


def test_state_survives_a_weights_only_round_trip(tmp_path):
    holder = Holder()
    loss = holder.model(torch.randn(5, 3)).sum()
    loss.backward()
    holder.optimizer.step()  # momentum buffers to carry over
    holder.generator.manual_seed(11)
    holder.rng.random(3)
    back = _round_trip(holder, tmp_path)

    assert back is not holder and back.me is back
    assert back.old is back.model[0]  # identity kept across the graph
    params = list(back.model.parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in params)
    assert [p for g in back.optimizer.param_groups for p in g["params"]] == params
    for p_old, p_new in zip(holder.model.parameters(), params, strict=True):
        assert torch.equal(p_old, p_new)
        assert torch.equal(holder.optimizer.state[p_old]["momentum_buffer"],
                           back.optimizer.state[p_new]["momentum_buffer"])
    assert back.view.untyped_storage().data_ptr() == \
        back.model[0].weight.untyped_storage().data_ptr()  # the view still shares storage
    assert torch.equal(torch.rand(4, generator=holder.generator),
                       torch.rand(4, generator=back.generator))
    assert np.array_equal(holder.rng.random(4), back.rng.random(4))
    assert back.table == holder.table and back.table.default_factory is list
    assert back.recent == holder.recent and back.recent.maxlen == 4
    assert back.frozen == holder.frozen and isinstance(back.frozen, Frozen)
    assert isinstance(back.pair, Pair) and np.array_equal(back.pair.left, holder.pair.left)
    assert back.pair.right.dtype == np.int64 and back.pair.right == 9
    back.model(torch.zeros(1, 3))  # the forward hook is bound to the restored holder
    assert back.calls == 2 and holder.calls == 1  # one call before the trip, one after


def test_next_steps_match_after_a_round_trip(tmp_path):
    holder = Holder()
    back = _round_trip(holder, tmp_path)
    for h in (holder, back):
        for _ in range(3):
            h.optimizer.zero_grad()
            h.model(torch.randn(8, 3, generator=h.generator)).pow(2).sum().backward()
            h.optimizer.step()
    for a, b in zip(holder.model.parameters(), back.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("value", "named"), [
    (lambda x: x, "lambda"),
    ({"ok": [1, {"deep": open}]}, "state['ok'][1]['deep']"),
    (np.array([object()]), "numpy array of Python objects"),
    (collections.Counter(a=1), "collections.Counter"),
])
def test_what_cannot_be_saved_is_named(value, named):
    with pytest.raises(SnapshotError, match="checkpoint") as info:
        Encoder(ALLOWED).encode(value)
    assert named in str(info.value)


@pytest.mark.parametrize("node", [
    {"__clsim__": "object", "id": 0, "class": "os:system", "state": {}},
    {"__clsim__": "object", "id": 0, "class": f"{__name__}:Frozen.__init__.__globals__",
     "state": {}},
    {"__clsim__": "namedtuple", "class": "torch:os.system", "items": ["touch /tmp/x"]},
    {"__clsim__": "namedtuple", "class": "torch:builtins.eval", "items": ["1"]},
    {"__clsim__": "namedtuple", "class": "torch:Tensor", "items": []},
    {"__clsim__": "named", "path": "torch:load"},
    {"__clsim__": "named", "path": "numpy:testing.assert_equal"},
    {"__clsim__": "enum", "class": "torch:sys.modules", "name": "os"},
    {"__clsim__": "optimizer", "class": "torch:nn.Linear", "id": 0, "groups": []},
    {"__clsim__": "dict", "id": 0, "type": "defaultdict", "keys": [], "values": [],
     "factory": {"__clsim__": "named", "path": "torch:cuda.init"}},
    {"__clsim__": "_resolve", "path": "os:system"},
    {"__clsim__": "method", "self": {"__clsim__": "tuple", "items": []}, "name": "index"},
])
def test_a_crafted_checkpoint_cannot_reach_code(node):
    imported = set(sys.modules)
    with pytest.raises(SnapshotError, match="checkpoint"):
        Decoder(ALLOWED).decode(node)
    assert set(sys.modules) == imported  # nothing imported on the way


class Memory(dict):
    pass


def test_subclasses_of_builtins_and_hooked_tensors_are_refused_not_emptied():
    with pytest.raises(SnapshotError, match="test_checkpoint.Memory"):
        Encoder(ALLOWED).encode({"m": Memory(a=1)})
    tensor = torch.zeros(2, requires_grad=True)
    tensor.register_hook(lambda g: g)
    with pytest.raises(SnapshotError, match="hooks or attributes"):
        Encoder(ALLOWED).encode(tensor)


def test_adamw_and_a_scheduler_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    holder = types.SimpleNamespace(model=model)
    holder.optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    holder.schedule = torch.optim.lr_scheduler.StepLR(holder.optimizer, step_size=2)
    for h in (holder,):
        h.model(torch.ones(1, 3)).sum().backward()
        h.optimizer.step()
        h.schedule.step()
    back = _round_trip(holder, tmp_path)
    for h in (holder, back):
        for _ in range(3):
            h.optimizer.zero_grad()
            h.model(torch.ones(4, 3)).pow(2).sum().backward()
            h.optimizer.step()
            h.schedule.step()
    assert torch.equal(holder.model.weight, back.model.weight)
    assert back.schedule.optimizer is back.optimizer


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CLSIM_TEST_MARKER"]),))


def test_a_pickled_object_in_a_checkpoint_is_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("CLSIM_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"format": "clsim-checkpoint/1", "payload": _Payload()}, path)
    with pytest.raises(SnapshotError, match="cannot be read safely"):
        read_checkpoint(path, "any")
    assert not marker.exists()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SnapshotError, match="delete it to run this strategy from the start"):
        read_checkpoint(path, "any")


def test_the_trainer_hands_over_its_state_through_state_dict():
    """Batch order and the skipped-batch count, nothing of the wiring; the generator is
    restored in place and draws what the saved one draws next."""
    saved = Trainer(None, None, None, torch_generator(0, "batches"))
    torch.randperm(10, generator=saved.generator)
    saved.skipped_batches = 2
    state = saved.state_dict()
    assert set(state) == {"generator", "skipped_batches"}
    fresh = Trainer(None, None, None, torch_generator(5, "batches"))
    generator = fresh.generator
    fresh.load_state_dict(state)
    assert fresh.generator is generator and fresh.skipped_batches == 2
    assert torch.equal(torch.randperm(10, generator=fresh.generator),
                       torch.randperm(10, generator=saved.generator))


# ---------------------------------------------------------------------------
# resume gives what an uninterrupted run gives, for every built-in plugin
# ---------------------------------------------------------------------------

class _KeepEvery(Checkpointing):
    """Keeps a copy of every checkpoint, so a run can be resumed from each boundary."""

    def save(self, loop, next_experience, wall_seconds):
        super().save(loop, next_experience, wall_seconds)
        if not self.unavailable:
            shutil.copy(self.path, self.path.with_suffix(f".{next_experience}.pt"))


# every built-in plugin but avalanche (its own environment) appears in these;
# compute_sweep_quick resumes under a compute budget
RESUME_SCENARIOS = ["quickstart", "memo_quick", "prd_quick", "analytic_quick",
                    "pl_fms_quick", "fscil_strategies_quick", "lingo_quick", "hle_quick",
                    "classics_quick", "rotated_quick", "compute_sweep_quick"]


@pytest.mark.parametrize("name", RESUME_SCENARIOS)
def test_resuming_at_a_boundary_gives_the_uninterrupted_metrics(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scenario = load_scenario(REPO_ROOT / "scenarios" / f"{name}.yaml")
    dataset = load_scenario_data(scenario)
    stream = limit_stream(build_stream(scenario, dataset, scenario.seed), 40)
    device = torch.device("cpu")
    for strategy_name, strategy in scenario.strategies.items():
        key = fingerprint(scenario.to_dict(), scenario.seed, 40, strategy_name)
        keep = _KeepEvery(tmp_path / f"{strategy_name}.pt", key)
        full = run_strategy(scenario, strategy, dataset, stream, seed=scenario.seed,
                            device=device, checkpoint=keep)
        assert full.error is None and keep.unavailable is None
        assert keep.written == list(range(1, len(stream)))  # none after the last
        middle = keep.written[len(keep.written) // 2 - 1]
        payload = read_checkpoint(tmp_path / f"{strategy_name}.{middle}.pt", key)
        resumed = run_strategy(
            scenario, strategy, dataset, stream, seed=scenario.seed, device=device,
            checkpoint=Checkpointing(tmp_path / "again.pt", key, resume_from=payload))
        assert comparable_outcome(resumed) == comparable_outcome(full), (strategy_name, middle)


def test_tame_resumes_exactly_on_a_stream_with_boundaries(tmp_path):
    text = DIGITS_SCENARIO.replace("batch_size: 64", "batch_size: 8").replace(
        "plugins: [naive]", "plugins: [{tame: {window: 10}}]\n    budget: 7 models + 300 exemplars")
    path = tmp_path / "tame.yaml"
    path.write_text(text, encoding="utf-8")
    scenario = load_scenario(path)
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, 0)
    strategy = scenario.strategies["naive"]
    key = fingerprint(scenario.to_dict(), 0, None, "naive")
    keep = _KeepEvery(tmp_path / "t.pt", key)
    full = run_strategy(scenario, strategy, dataset, stream, seed=0,
                        device=torch.device("cpu"), checkpoint=keep)
    assert full.error is None and keep.written == [1, 2, 3, 4]
    for n in (1, 3):
        payload = read_checkpoint(tmp_path / f"t.{n}.pt", key)
        resumed = run_strategy(scenario, strategy, dataset, stream, seed=0,
                               device=torch.device("cpu"),
                               checkpoint=Checkpointing(tmp_path / "x.pt", key,
                                                        resume_from=payload))
        assert comparable_outcome(resumed) == comparable_outcome(full)


def test_a_checkpoint_of_another_strategy_or_seed_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(DIGITS_SCENARIO, encoding="utf-8")
    scenario = load_scenario(path)
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, 0)
    key = fingerprint(scenario.to_dict(), 0, None, "naive")
    keep = Checkpointing(tmp_path / "n.pt", key)
    run_strategy(scenario, scenario.strategies["naive"], dataset, stream, seed=0,
                 device=torch.device("cpu"), checkpoint=keep)
    read_checkpoint(keep.path, key)
    for other in (fingerprint(scenario.to_dict(), 1, None, "naive"),
                  fingerprint(scenario.to_dict(), 0, None, "replay"),
                  fingerprint(scenario.to_dict(), 0, 100, "naive")):
        with pytest.raises(SnapshotError, match="different scenario, seed, limit or strategy"):
            read_checkpoint(keep.path, other)


# ---------------------------------------------------------------------------
# through the CLI: a real SIGKILL, then --resume
# ---------------------------------------------------------------------------

KILL_SCENARIO = DIGITS_SCENARIO.replace("epochs: 1", "epochs: 5").replace(
    "hidden: [32]", "hidden: [256, 256]") + """\
  replay:
    plugins: [{replay: {capacity: 100}}]
    budget: model + 200 exemplars
"""


def _metrics(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {name: without_measurements(record)
            for name, record in summary["strategies"].items()}


def _events(out: Path, whole_lines: bool = False) -> list[dict]:
    """The events written so far (``whole_lines``: skip a line still being written)."""
    path = out / "events.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")[:-1] if whole_lines else text.splitlines()
    return [json.loads(line) for line in lines]


def test_a_killed_run_resumes_to_the_same_final_metrics(tmp_path):
    scenario = tmp_path / "kill.yaml"
    scenario.write_text(KILL_SCENARIO, encoding="utf-8")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run_cli("run", str(scenario), "--out", str(whole), "--no-progress",
                   "--checkpoint-every", "experience")
    assert proc.returncode == 0, proc.stderr
    assert not (whole / "checkpoints").exists()  # spent checkpoints are removed

    child = subprocess.Popen(
        [sys.executable, "-m", "clsim.cli", "run", str(scenario), "--out", str(killed),
         "--no-progress", "--checkpoint-every", "experience"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        ended = [e for e in _events(killed, whole_lines=True)
                 if e["event"] == "experience_end" and e["strategy"] == "replay"]
        if ended and ended[-1]["experience"] >= 1:
            break  # replay's experience 1 has ended: its checkpoint is being written
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    summary = json.loads((killed / "summary.json").read_text())
    assert list(summary["strategies"]) == ["naive"]  # replay was in flight
    checkpoints = list((killed / "checkpoints").glob("*.pt"))
    assert [p.name for p in checkpoints] == ["1-replay.pt"]  # naive's was spent
    naive_before = summary["strategies"]["naive"]

    proc = run_cli("run", str(scenario), "--out", str(killed), "--no-progress", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert _metrics(killed) == _metrics(whole)
    after = json.loads((killed / "summary.json").read_text())
    assert after["strategies"]["naive"] == naive_before  # kept as written, not rerun
    resumed = [e for e in _events(killed) if e["event"] == "strategy_resumed"]
    assert len(resumed) == 1 and resumed[0]["strategy"] == "replay"
    # from a checkpoint: after experience 0 (the kill beat the next write) or later
    assert 1 <= resumed[0]["experience"] <= 4
    assert not (killed / "checkpoints").exists()


def test_checkpoint_names_keep_short_names_and_cut_long_ones_as_tensorboard_does(tmp_path):
    """A name that fits keeps its file name (checkpoints written before stay valid); a
    long one is cut with a hash, as its TensorBoard folder is, so two never collide."""
    assert checkpoint_path(tmp_path, 1, "replay_2-x.v") == \
        tmp_path / "checkpoints" / "1-replay_2-x.v.pt"
    long_a, long_b = "é" * 199 + "1", "é" * 199 + "2"
    a, b = checkpoint_path(tmp_path, 0, long_a), checkpoint_path(tmp_path, 0, long_b)
    assert a != b and a.parent == tmp_path / "checkpoints"
    assert all(len(p.name.encode()) <= 110 for p in (a, b))
    from clsim.results import safe_name

    assert a.name == f"0-{safe_name(long_a)}.pt"


def test_resume_refuses_another_run_and_keeps_its_results(tmp_path, capsys):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(DIGITS_SCENARIO, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    before = (out / "summary.json").read_bytes()
    capsys.readouterr()
    for extra, message in [(["--seed", "4"], "different 'seed' (0 there, 4 now)"),
                           (["--limit", "9"], "different 'limit' (None there, 9 now)"),
                           (["--strategy", "naive", "--strategy", "naive"],
                            "different 'strategies_requested'")]:
        code = main(["run", str(scenario), "--out", str(out), "--no-progress", "--resume",
                     *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
    assert (out / "summary.json").read_bytes() == before
    assert main(["run", str(scenario), "--no-progress", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["run", str(scenario), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "there is no run to continue" in capsys.readouterr().err


class Forgetful:
    """A plugin that keeps a lambda: its state cannot be checkpointed."""

    def __init__(self):
        self.callback = lambda: None

    def clsim_setup(self, ctx):  # a plugin implements at least one hook
        pass


def test_a_strategy_that_cannot_be_saved_runs_on_and_says_why(tmp_path):
    text = DIGITS_SCENARIO.replace("plugins: [naive]",
                                   "plugins: [naive, test_checkpoint:Forgetful]")
    scenario = tmp_path / "s.yaml"
    scenario.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    proc = run_cli("run", str(scenario), "--out", str(out), "--no-progress",
                   "--checkpoint-every", "experience",
                   env={"PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "summary.json").read_text())["strategies"]["naive"]
    assert record["status"] == "ok"
    assert "plugin 'Forgetful'.callback is a lambda" in record["checkpoint"]
    assert "ran without checkpoints" in proc.stderr


# ---------------------------------------------------------------------------
# plugins that reach each other, interruption in-process, a damaged checkpoint
# ---------------------------------------------------------------------------

INTERRUPT_AT: list[int] = []  # experience before which Interrupting raises Ctrl-C


class Keeper:
    """Keeps the model itself (so Counter's hook, bound to Counter, is met here first)."""

    def clsim_setup(self, ctx):
        self.model = ctx.model


class Counter:
    """Counts forward passes through a hook on the model, and can interrupt the run."""

    def __init__(self):
        self.calls = torch.zeros((), dtype=torch.long)

    def clsim_setup(self, ctx):
        ctx.model.register_forward_hook(self.on_forward)

    def on_forward(self, module, inputs, output):
        self.calls += 1

    def clsim_before_experience(self, ctx, experience):
        if INTERRUPT_AT and experience.index == INTERRUPT_AT[0]:
            raise KeyboardInterrupt

    def clsim_report(self, ctx, stream):
        return {"forward_calls": int(self.calls)}


PAIR = DIGITS_SCENARIO.replace(
    "plugins: [naive]", "plugins: [test_checkpoint:Keeper, naive, test_checkpoint:Counter]")


def test_an_interrupted_run_resumes_plugins_that_reach_each_other(tmp_path, monkeypatch):
    from clsim.runner import run_scenario

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    path = tmp_path / "pair.yaml"
    path.write_text(PAIR, encoding="utf-8")
    scenario = load_scenario(path)
    INTERRUPT_AT.clear()
    whole = run_scenario(scenario, tmp_path / "whole", checkpoint_every="experience")
    assert whole.summary["strategies"]["naive"]["plugins"]["Counter"]["forward_calls"] > 0

    out = tmp_path / "cut"
    INTERRUPT_AT.append(3)
    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario, out, checkpoint_every="experience")
    INTERRUPT_AT.clear()
    saved = out / "checkpoints" / "0-naive.pt"
    payload = torch.load(saved, weights_only=True)
    assert payload["next_experience"] == 3

    damaged = dict(payload, state=dict(payload["state"], model={"__clsim__": "ref", "id": 999}))
    good = saved.read_bytes()
    torch.save(damaged, saved)
    with pytest.raises(SnapshotError, match="delete it to run this strategy from the start"):
        run_scenario(scenario, out, resume=True)
    assert json.loads((out / "summary.json").read_text())["strategies"] == {}  # no failure
    assert saved.exists()  # kept for the user to decide

    saved.write_bytes(good)
    resumed = run_scenario(scenario, out, resume=True)
    ours, theirs = (r.summary["strategies"]["naive"] for r in (resumed, whole))
    assert without_measurements(ours) == without_measurements(theirs)  # the hook kept
    # counting into the restored Counter
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(("field", "value", "says"), [
    ("next_experience", 99, "its next_experience is '99', where this run's stream continues "
                            "only at experience 1 to 4"),
    ("next_experience", -1, "its next_experience is '-1'"),
    ("next_experience", 0, "its next_experience is '0'"),
    ("wall_seconds", float("nan"), "its wall_seconds is 'nan', not a count"),
    ("position", 10**9, "its stream position is 1000000000, outside this run's 0 to"),
])
def test_a_checkpoint_that_does_not_fit_the_run_is_kept_and_not_blamed(
        field, value, says, tmp_path, capsys):
    """A checkpoint whose stream position (or another field) does not fit the run stops
    the resume naming the file; the file stays as it was and no strategy is failed."""
    path = tmp_path / "s.yaml"
    path.write_text(DIGITS_SCENARIO, encoding="utf-8")
    out = tmp_path / "cut"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    summary.update(strategies={}, checkpoint_every="experience")  # killed inside naive
    (out / "summary.json").write_text(json.dumps(summary))
    scenario = load_scenario(path)
    dataset = load_scenario_data(scenario)
    keep = _KeepEvery(out / "checkpoints" / "all.pt",
                      fingerprint(summary["config"], 0, None, "naive"))
    run_strategy(scenario, scenario.strategies["naive"], dataset,
                 build_stream(scenario, dataset, 0), seed=0, device=torch.device("cpu"),
                 checkpoint=keep)
    saved = out / "checkpoints" / "0-naive.pt"
    payload = torch.load(out / "checkpoints" / "all.3.pt", weights_only=True)
    for extra in (out / "checkpoints").glob("all*"):
        extra.unlink()
    if field == "position":  # inside the engine's state, as the encoder wrote it
        assert _replace_position(payload["state"]["loop"], value)
    else:
        payload[field] = value
    torch.save(payload, saved)
    damaged = saved.read_bytes()
    summary_bytes = (out / "summary.json").read_bytes()
    capsys.readouterr()

    code = main(["run", str(path), "--out", str(out), "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "internal error" not in err
    assert f"clsim: error: checkpoint {saved} cannot be restored: {says}" in err
    assert "delete it to run this strategy from the start" in err
    assert saved.read_bytes() == damaged  # kept for the user to decide
    assert (out / "summary.json").read_bytes() == summary_bytes  # nothing blamed on naive


def _replace_position(loop_state: dict, value: int) -> bool:
    """Set "position" in the engine's encoded state (a dict node: keys, then values)."""
    keys = loop_state["keys"]
    if "position" not in keys:
        return False
    loop_state["values"][keys.index("position")] = value
    return True
