"""No process outlives a killed clsim: workers and helpers die with their parent.

``clsim compare`` runs cells in child processes (a spawned process pool, or a local Ray
cluster). A SIGKILL of clsim cannot be caught, so each child must notice on its own
(clsim.executors.die_with_parent); these tests kill the real parent while cells are
running and look in /proc for anything left of its session.
"""

from __future__ import annotations

import importlib.util
import json
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


@pytest.mark.xdist_group("ray")  # one Ray cluster at a time
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="clsim[ray] not installed")
def test_a_local_ray_cluster_dies_with_a_killed_clsim(tmp_path):
    """SIGKILL of `clsim compare --executor ray` while Ray workers run cells: within 5 s
    nothing of its session is left (raylet, GCS, workers, dashboard and runtime-env
    agents, clsim's watchdog)."""
    proc, running = start_compare(tmp_path, "--executor", "ray", "--workers", "2")
    assert_nothing_survives_a_kill(proc, running, workers=2, startup=180)


# ---------------------------------------------------------------------------
# a consumer that stops reading the pool's records (full disk, Ctrl-C)
# ---------------------------------------------------------------------------

# plugins for the tests below, written into the test's folder (spawned workers import them)
STOP_PLUGINS = """\
import os, time

class Marks:
    '''Marks its cell as running: a file named after its process in $CLSIM_TEST_RUNNING.'''
    def clsim_setup(self):
        open(os.path.join(os.environ['CLSIM_TEST_RUNNING'], str(os.getpid())), 'w').close()

class WaitsForGo:
    '''Finishes its cell only once the file $CLSIM_TEST_GO exists.'''
    def clsim_teardown(self):
        while not os.path.exists(os.environ['CLSIM_TEST_GO']):
            time.sleep(0.05)

class NeverEnds:
    '''A cell that never finishes on its own.'''
    def clsim_after_batch(self):
        while True:
            time.sleep(1)
"""

STOP_GRID = """\
name: stop_grid
seed: 0
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 2}
model: {name: mlp, hidden: [16]}
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.1}}
strategies:
  fast:
    plugins: [naive, 'stop_plugins:Marks', 'stop_plugins:WaitsForGo']
  stuck:
    plugins: [naive, 'stop_plugins:Marks', 'stop_plugins:NeverEnds']
  later:
    plugins: [naive, 'stop_plugins:Marks']
compare:
  budgets: ['model + 10 exemplars']
  seeds: [0]
"""

# clsim compare's own consumer (compare._run_cells) over the real process pool, with a
# results store whose append raises STOP (a full disk, or the user's Ctrl-C arriving there)
CONSUMER = """\
import json, sys, time
from pathlib import Path
from clsim import compare
from clsim.config import parse_scenario
from clsim.errors import ResultsWriteError
from clsim.grid import plan

STOP = {'ResultsWriteError': ResultsWriteError('cannot write cells.jsonl: disk full'),
        'KeyboardInterrupt': KeyboardInterrupt()}[sys.argv[2]]
text = Path(sys.argv[1]).read_text()
tasks = plan(parse_scenario(text), text, threads=1)
started = []

class Store:
    def append(self, record):
        started.append('append ' + record['strategy'])
        raise STOP

class Marks:
    def started(self, cell):
        started.append('start ' + cell.split(' ')[0])
    def finished(self, cell):
        pass
    def forget(self, cells):
        pass

begin = time.monotonic()
try:
    compare._run_cells(tasks, Store(), Marks(), compare._Progress(3, 0, False), 'local', 2,
                       None)
except BaseException as exc:
    outcome = f'{type(exc).__name__}: {exc}'
print(json.dumps({'outcome': outcome, 'calls': started,
                  'seconds': time.monotonic() - begin}))
"""


@pytest.mark.parametrize("stop", ["ResultsWriteError", "KeyboardInterrupt"])
def test_a_consumer_stopping_mid_way_gets_its_own_exception_and_the_pool_ends_at_once(
        stop, tmp_path):
    """The consumer raises while handling the first record (a full disk, a Ctrl-C outside
    wait()): its exception comes out unchanged (not 'generator ignored GeneratorExit'),
    the cell never started stays so, and the worker running a cell that never ends is
    ended instead of waited for."""
    (tmp_path / "stop_plugins.py").write_text(STOP_PLUGINS, encoding="utf-8")
    (tmp_path / "g.yaml").write_text(STOP_GRID, encoding="utf-8")
    (tmp_path / "go").touch()
    running = tmp_path / "running"
    running.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CLSIM_TEST_RUNNING": str(running),
           "CLSIM_TEST_GO": str(tmp_path / "go")}
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, str(tmp_path / "g.yaml"), stop],
                            cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)  # a pool waiting for the stuck cell hangs
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 0, err
    result = json.loads(out)
    expected = {"ResultsWriteError": "ResultsWriteError: cannot write cells.jsonl: disk full",
                "KeyboardInterrupt": "KeyboardInterrupt: "}[stop]
    assert result["outcome"] == expected
    assert result["calls"] == ["start fast", "start stuck", "append fast"]
    workers = {int(p.name) for p in running.iterdir()}
    assert len(workers) == 2
    for pid in workers:  # ended and reaped before _run_cells returned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


FULL_DISK_COMPARE = """\
set -u
mount -t tmpfs -o size=64k tmpfs "$DISK" || exit 99
"$PY" -m clsim.cli compare "$GRID" --out "$DISK/out" --workers 2 --threads 1 --no-progress \\
    2>"$LOGS/err" &
pid=$!
tries=0
while [ "$(ls "$CLSIM_TEST_RUNNING" | wc -l)" -lt 2 ] && [ $tries -lt 3000 ]; do
    sleep 0.1; tries=$((tries + 1))
done
dd if=/dev/zero of="$DISK/filler" bs=1k 2>/dev/null
touch "$CLSIM_TEST_GO"
wait $pid
echo "code=$?"
"""


def test_compare_with_workers_on_a_really_full_disk_is_a_clean_error(tmp_path):
    """`clsim compare --workers 2` whose cells.jsonl cannot take the first record (a real
    tmpfs filled while both cells run): exit 2 naming cells.jsonl, no internal error, no
    traceback, and clsim does not wait for the cell still running (it never ends)."""
    disk, logs, running = tmp_path / "disk", tmp_path / "logs", tmp_path / "running"
    for folder in (disk, logs, running):
        folder.mkdir()
    (tmp_path / "stop_plugins.py").write_text(STOP_PLUGINS, encoding="utf-8")
    (tmp_path / "g.yaml").write_text(STOP_GRID, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CLSIM_TEST_RUNNING": str(running),
           "CLSIM_TEST_GO": str(logs / "go"), "DISK": str(disk), "LOGS": str(logs),
           "GRID": str(tmp_path / "g.yaml"), "PY": sys.executable}
    try:
        proc = subprocess.Popen(["unshare", "--map-root-user", "--mount", "sh", "-c",
                                 FULL_DISK_COMPARE], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    try:
        out, err = proc.communicate(timeout=300)  # clsim waiting for the stuck cell hangs
    finally:
        kill_session(proc.pid)
    if proc.returncode == 99 or "unshare:" in err:
        pytest.skip(f"no user and mount namespaces here ({err.strip()})")
    clsim_err = (logs / "err").read_text()
    assert out == "code=2\n", clsim_err
    assert clsim_err.startswith("clsim: comparing ")
    assert f"\nclsim: error: cannot write {disk}/out/cells.jsonl" in clsim_err
    assert "No space left on device" in clsim_err
    assert "internal error" not in clsim_err and "Traceback" not in clsim_err
    assert len(list(running.iterdir())) == 2  # both cells were running


def test_the_ray_watchdog_ends_even_when_ray_shutdown_fails(monkeypatch):
    """A local cluster whose ray.shutdown() raises: the watchdog (a real process here)
    is still killed and reaped, instead of living as long as the host (a notebook)."""
    from types import SimpleNamespace

    from clsim import executors

    def fail():
        raise RuntimeError("shutdown failed")

    fake_ray = SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: None,
                               remote=lambda **kw: (lambda fn: fn), shutdown=fail)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    watchdog = subprocess.Popen(["sleep", "600"])
    monkeypatch.setattr(executors, "start_ray_watchdog", lambda: watchdog)
    try:
        with pytest.raises(RuntimeError, match="shutdown failed"):
            list(executors.run_ray([], workers=1, address=None))
        assert watchdog.returncode == -signal.SIGKILL  # killed and waited for
    finally:
        watchdog.kill()
        watchdog.wait()
