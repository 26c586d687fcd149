"""The user's SIGINT stops clsim; a plugin's own KeyboardInterrupt fails only its strategy,
whatever SIGINT handler clsim starts with (clsim.interrupts).

Under ``nohup ... &`` or in a script's background job SIGINT is ignored (SIG_IGN), and
spawned pool workers inherit that: no Ctrl-C can arrive, so every KeyboardInterrupt is a
plugin's. A program embedding clsim may have its own handler: clsim records the signal and
hands it on. Each case runs in a real interpreter, so no signal touches this one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import REPO_ROOT
from test_plugin_faults import MESSAGES, expected_message, scenario_text

from clsim import interrupts

PLUGIN = "RaisesKeyboardInterruptInAfterBatch"


@pytest.fixture(autouse=True)
def no_tracking_leaks():
    """Every test leaves SIGINT as Python has it, and nothing tracking or recorded."""
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not interrupts._tracking.is_set()
    assert not interrupts._user_interrupted.is_set()


def env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests"),
            "CLSIM_TEST_TEARDOWNS": str(tmp_path / "teardowns.txt")}


def clsim_with_sigint_ignored(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``clsim ARGS`` started as a shell starts a background job (``trap '' INT``: SIGINT
    ignored, inherited through exec by clsim and its spawned workers)."""
    return subprocess.run(["sh", "-c", 'trap "" INT; exec "$@"', "sh", sys.executable,
                           "-m", "clsim.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env(tmp_path))


def message_seen_from(folder, plugin: str, hook: str, kind: str) -> str:
    """The failure message as a clsim started in ``folder`` words it: the plugin's file
    is shown relative to the working folder when inside it, so here as an absolute path."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        return expected_message(plugin, hook, MESSAGES[kind])
    finally:
        os.chdir(previous)


def write_scenario(tmp_path, plugin: str):
    path = tmp_path / "s.yaml"
    path.write_text(scenario_text(plugin), encoding="utf-8")
    return path


def test_sigint_ignored_a_plugins_keyboard_interrupt_fails_only_its_strategy(tmp_path):
    path = write_scenario(tmp_path, PLUGIN)
    proc = clsim_with_sigint_ignored(tmp_path, "run", str(path), "--out",
                                     str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert "interrupted" not in proc.stderr and "Traceback" not in proc.stderr
    assert "clsim: error: strategy faulty failed" in proc.stderr
    strategies = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert [s["status"] for s in strategies.values()] == ["ok", "failed", "ok"]
    assert strategies["faulty"]["error"] == message_seen_from(
        tmp_path, PLUGIN, "clsim_after_batch", "KeyboardInterrupt")


def test_sigint_ignored_pool_workers_fail_only_the_plugins_cells(tmp_path):
    """The spawned workers inherit SIG_IGN: they too count the plugin's KeyboardInterrupt
    as its fault, and the grid finishes."""
    path = write_scenario(tmp_path, PLUGIN)
    proc = clsim_with_sigint_ignored(tmp_path, "compare", str(path), "--out",
                                     str(tmp_path / "out"), "--workers", "2", "--threads",
                                     "1", "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert "2 cell(s) failed" in proc.stderr and "Traceback" not in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").open()]
    assert len(records) == 6 and len({r["pid"] for r in records}) == 2
    message = message_seen_from(tmp_path, PLUGIN, "clsim_after_batch", "KeyboardInterrupt")
    assert sorted((r["strategy"], r["status"], r.get("error")) for r in records) == [
        ("after", "ok", None), ("after", "ok", None), ("before", "ok", None),
        ("before", "ok", None), ("faulty", "failed", message), ("faulty", "failed", message)]


EMBEDDING = """\
import json, signal, sys
from clsim.cli import main
calls = []
def handler(signum, frame):
    calls.append(signum)
    raise KeyboardInterrupt
signal.signal(signal.SIGINT, handler)
codes = [main(['run', path, '--out', out, '--no-progress']) for path, out in
         zip(sys.argv[1::2], sys.argv[2::2])]
print(json.dumps({'codes': codes, 'calls': calls,
                  'restored': signal.getsignal(signal.SIGINT) is handler}))
"""


def test_an_embedding_programs_handler_gets_the_sigint_and_is_put_back(tmp_path):
    """A program with its own SIGINT handler calls clsim.cli.main: a plugin's own
    KeyboardInterrupt fails only its strategy (exit 1, the handler not called); a real
    SIGINT reaches the handler, whose KeyboardInterrupt stops clsim (exit 130); the
    handler is in place again after each."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    raises = write_scenario(tmp_path / "a", PLUGIN)
    signals = write_scenario(tmp_path / "b", "SignalsInAfterBatch")
    proc = subprocess.run([sys.executable, "-c", EMBEDDING, str(raises), str(tmp_path / "o1"),
                           str(signals), str(tmp_path / "o2")], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.splitlines()[-1])  # after the results tables
    assert outcome == {"codes": [1, 130], "calls": [int(signal.SIGINT)], "restored": True}
    assert "clsim: interrupted" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("handler", [signal.SIG_IGN, signal.SIG_DFL], ids=["ign", "dfl"])
def test_a_handler_that_cannot_raise_is_left_alone_and_tracked(handler):
    """SIG_IGN or SIG_DFL: no SIGINT can raise KeyboardInterrupt, so every one is a
    plugin's; the handler stays as it was, during and after."""
    signal.signal(signal.SIGINT, handler)
    try:
        interrupts.track_user_interrupts()
        assert signal.getsignal(signal.SIGINT) is handler
        assert interrupts.is_contained(KeyboardInterrupt())
        interrupts.stop_tracking()
        assert signal.getsignal(signal.SIGINT) is handler
        assert not interrupts.is_contained(KeyboardInterrupt())  # a library: the caller's
    finally:
        interrupts.stop_tracking()
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.xdist_group("ray")  # one Ray cluster at a time
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="clsim[ray] not installed")
def test_a_plugins_keyboard_interrupt_on_a_ray_worker_fails_only_its_cells(tmp_path):
    """Ray workers record SIGINT as pool workers do: the plugin's own KeyboardInterrupt
    is its fault (named), not 'the Ray worker running this cell failed'."""
    path = write_scenario(tmp_path, PLUGIN)
    proc = subprocess.run([sys.executable, "-m", "clsim.cli", "compare", str(path), "--out",
                           str(tmp_path / "out"), "--executor", "ray", "--workers", "2",
                           "--threads", "1", "--no-progress"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env(tmp_path))
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").open()]
    message = message_seen_from(tmp_path, PLUGIN, "clsim_after_batch", "KeyboardInterrupt")
    assert sorted((r["strategy"], r["status"], r.get("error")) for r in records) == [
        ("after", "ok", None), ("after", "ok", None), ("before", "ok", None),
        ("before", "ok", None), ("faulty", "failed", message), ("faulty", "failed", message)]
