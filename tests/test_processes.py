"""No process outlives a killed clsim: workers and helpers die with their parent.

``clsim compare`` runs cells in child processes (a spawned process pool, or a local Ray
cluster). A SIGKILL of clsim cannot be caught, so each child must notice on its own
(clsim.executors.die_with_parent); these tests kill the real parent while cells are
running and look in /proc for anything left of its session.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="reads processes from /proc (Linux)")

GRID = """\
name: slow_grid
seed: 0
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [16]}
training: {epochs: 1, batch_size: 16, optimizer: {name: sgd, lr: 0.1}}
strategies:
  a:
    plugins: [naive, 'faulty_plugins:SlowCell']
  b:
    plugins: [naive, 'faulty_plugins:SlowCell']
compare:
  budgets: ['model + 10 exemplars', 'model + 20 exemplars']
  seeds: [0]
"""


def session_processes(sid: int) -> set[int]:
    """Live (not zombie) processes of session ``sid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            found.add(int(entry.name))
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` until true; a failure after ``timeout`` seconds names ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_compare(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """``clsim compare`` of the slow grid in a new session; the folder its cells mark."""
    running = tmp_path / "running"
    running.mkdir()
    (tmp_path / "g.yaml").write_text(GRID, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests"),
           "CLSIM_TEST_RUNNING": str(running)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clsim.cli", "compare", str(tmp_path / "g.yaml"), "--out",
         str(tmp_path / "out"), "--threads", "1", "--no-progress", *extra],
        cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, running


def kill_session(sid: int) -> None:
    """Clean up whatever a failed test left (only this test's own session)."""
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_nothing_survives_a_kill(proc: subprocess.Popen, running: Path, workers: int,
                                   startup: float) -> None:
    sid = proc.pid  # a new session's id is its leader's pid
    try:
        wait_for(lambda: len(list(running.iterdir())) >= workers, startup,
                 f"{workers} workers running cells")
        helpers = session_processes(sid) - {proc.pid}
        assert {int(p.name) for p in running.iterdir()} <= helpers
        proc.send_signal(signal.SIGKILL)  # the parent only
        proc.wait(timeout=10)
        wait_for(lambda: not session_processes(sid), 5.0,
                 f"the session's processes to end; still alive: {helpers}")
    finally:
        kill_session(sid)


def test_process_pool_workers_and_resource_tracker_die_with_a_killed_clsim(tmp_path):
    """SIGKILL of `clsim compare --workers 2` while both workers run cells: within 5 s no
    process of its session is left (workers, multiprocessing's resource tracker)."""
    proc, running = start_compare(tmp_path, "--workers", "2")
    assert_nothing_survives_a_kill(proc, running, workers=2, startup=120)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="clsim[ray] not installed")
def test_a_local_ray_cluster_dies_with_a_killed_clsim(tmp_path):
    """SIGKILL of `clsim compare --executor ray` while Ray workers run cells: within 5 s
    nothing of its session is left (raylet, GCS, workers, dashboard and runtime-env
    agents, clsim's watchdog)."""
    proc, running = start_compare(tmp_path, "--executor", "ray", "--workers", "2")
    assert_nothing_survives_a_kill(proc, running, workers=2, startup=180)
