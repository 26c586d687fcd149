"""Results folders: one writer at a time, disk errors named, names the OS accepts, damaged
records, strategies and cells that crash. Every test builds its hostile input here and
uses the real thing: real locks held by other processes, SIGKILL, RLIMIT_FSIZE (EFBIG,
as a full disk fails a write), a plugin that calls ``os._exit``."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DIGITS_SCENARIO, REPO_ROOT, run_cli

from clsim.cli import main
from clsim.lock import LOCK_NAME, FolderLock

# a plugin that waits in setup until the file $CLSIM_TEST_GATE exists (when set), so a
# test can hold a run inside its lock as long as it needs, without timing anything
GATE_PLUGIN = '''\
import os, time


class Gate:
    def clsim_setup(self, ctx):
        gate = os.environ.get("CLSIM_TEST_GATE")
        while gate and not os.path.exists(gate):
            time.sleep(0.02)
'''

# a plugin that kills the process running it, as a segfault in a C extension would
CRASH_PLUGIN = '''\
import os


class Crash:
    def clsim_before_experience(self, ctx, experience):
        os._exit(3)
'''

GRID = DIGITS_SCENARIO.replace("n_experiences: 5", "n_experiences: 2") + """\
    budget: 1MB
compare:
  budgets: [1MB]
  seeds: [0, 1]
"""


def _write(tmp: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def _plugins(tmp: Path) -> dict[str, str]:
    """Env for a subprocess that finds the test plugins written into ``tmp``."""
    (tmp / "gate_plugin.py").write_text(GATE_PLUGIN)
    (tmp / "crash_plugin.py").write_text(CRASH_PLUGIN)
    return {"PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")])}


def _clsim(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clsim.cli", *args], cwd=REPO_ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` while ``process`` runs; a timeout only turns a hang into a
    failure."""
    deadline = time.monotonic() + 120
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended before {what}: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _holds_lock(folder: Path, pid: int):
    def check() -> bool:
        lock = folder / LOCK_NAME
        return lock.exists() and lock.read_text().startswith(f"pid {pid},")
    return check


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


# ---------------------------------------------------------------------------
# one writer per results folder
# ---------------------------------------------------------------------------


def test_two_concurrent_compare_resumes_one_is_refused_and_no_record_repeats(tmp_path,
                                                                             monkeypatch):
    env = _plugins(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    grid = _write(tmp_path, GRID.replace("plugins: [naive]", "plugins: [naive, gate_plugin:Gate]"))
    out = tmp_path / "out"
    base = ["compare", str(grid), "--out", str(out), "--executor", "inline", "--no-progress",
            "--threads", "1"]
    assert main(base) == 0
    cells = out / "cells.jsonl"
    first = cells.read_bytes().splitlines(keepends=True)[0]
    cells.write_bytes(first)  # as a kill after the first cell leaves it

    gate = tmp_path / "go"
    holder = _clsim(*base, "--resume", env={**env, "CLSIM_TEST_GATE": str(gate)})
    started = out / "cells.started.json"
    _wait_for(lambda: json.loads(started.read_text()) != {}, holder, "the cell started")
    assert _holds_lock(out, holder.pid)()
    second = run_cli(*base, "--resume", env=env)
    gate.touch()
    stdout, stderr = holder.communicate(timeout=300)

    assert second.returncode == 2, second.stderr
    assert f"in use by another clsim (pid {holder.pid}, clsim compare --resume)" \
        in second.stderr and str(out) in second.stderr
    assert "Traceback" not in second.stderr and second.stderr.count("clsim: error:") == 1
    assert holder.returncode == 0, stderr
    ids = [r["cell"] for r in _records(cells)]
    assert len(ids) == len(set(ids)) == 2  # the refused one ran nothing
    assert not (out / LOCK_NAME).exists()


def test_a_sigkilled_holder_does_not_block_the_next_resume(tmp_path):
    env = _plugins(tmp_path)
    scenario = _write(tmp_path, DIGITS_SCENARIO.replace(
        "plugins: [naive]", "plugins: [naive, gate_plugin:Gate]"))
    out = tmp_path / "out"
    args = ["run", str(scenario), "--out", str(out), "--no-progress", "--limit", "20"]
    holder = _clsim(*args, env={**env, "CLSIM_TEST_GATE": str(tmp_path / "never")})
    _wait_for(lambda: (out / "summary.json").exists() and _holds_lock(out, holder.pid)(),
              holder, "the run held its folder")
    holder.kill()
    assert holder.wait() == -signal.SIGKILL
    holder.communicate()
    assert (out / LOCK_NAME).exists()  # left behind by the kill, but not held

    resumed = run_cli(*args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategies"]["naive"]["status"] == "ok"
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("command", ["run", "run --resume", "compare", "compare --resume",
                                     "report"])
def test_every_writer_is_refused_while_another_process_holds_the_folder(
        command, tmp_path, capsys):
    """The lock is held by this test (a real flock on another open file description, as
    another process would hold it); each command that writes a results folder refuses."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "cells.jsonl").write_text('{"cell": "x"}\n')
    grid = _write(tmp_path, GRID)
    argv = {
        "run": ["run", "quickstart", "--out", str(out), "--no-progress", "--limit", "5"],
        "run --resume": ["run", "quickstart", "--out", str(out), "--no-progress", "--limit",
                         "5", "--resume"],
        "compare": ["compare", str(grid), "--out", str(out), "--no-progress"],
        "compare --resume": ["compare", str(grid), "--out", str(out), "--no-progress",
                             "--resume"],
        "report": ["report", str(out)],
    }[command]
    with FolderLock(out, "compare --resume"):
        before = _snapshot(out)
        code = main(argv)
        assert _snapshot(out) == before
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--out: {out} is in use by another clsim (pid {os.getpid()}, clsim compare " \
           "--resume)" in err
    assert "Traceback" not in err


def test_a_stale_lock_file_is_not_results_and_is_cleared(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 999999999, clsim run\n")  # its holder died
    assert main(["run", "quickstart", "--out", str(out), "--no-progress", "--limit", "5"]) == 0
    assert json.loads((out / "summary.json").read_text())["strategies"]
    assert not (out / LOCK_NAME).exists()
    # written atomically through a temporary file, yet as readable as any file written
    mode = (out / "summary.json").stat().st_mode & 0o777
    assert mode == (out / "events.jsonl").stat().st_mode & 0o777, oct(mode)


# ---------------------------------------------------------------------------
# a full disk (RLIMIT_FSIZE: a write past the limit fails with EFBIG)
# ---------------------------------------------------------------------------


def _limited(max_bytes: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def test_run_on_a_full_disk_names_the_file_and_keeps_the_summary_whole(tmp_path):
    out = tmp_path / "out"
    args = ["run", "quickstart", "--out", str(out), "--no-progress", "--limit", "20"]
    # summary.json: ~2.9 KB at the start, ~5.5 KB with naive, ~10 KB with replay
    proc = _clsim(*args, preexec_fn=_limited(8000))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert f"clsim: error: cannot write {out / 'summary.json'}: File too large" in stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    summary = json.loads((out / "summary.json").read_text())  # the last whole version
    assert list(summary["strategies"]) == ["naive"]
    assert not list(out.glob(".summary.json.*"))  # no temporary file left
    events = _records(out / "events.jsonl")  # whole lines only
    assert events[-1]["event"] == "run_end" and events[-1]["interrupted"] is True

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    after = json.loads((out / "summary.json").read_text())["strategies"]
    assert after["naive"] == summary["strategies"]["naive"] and "replay" in after


def test_compare_on_a_full_disk_names_cells_jsonl_and_keeps_whole_records(tmp_path):
    grid = _write(tmp_path, GRID)
    out = tmp_path / "out"
    args = ["compare", str(grid), "--out", str(out), "--executor", "inline", "--no-progress",
            "--threads", "1"]
    proc = _clsim(*args, preexec_fn=_limited(1800))  # grid.json and a record (~1.1 KB) fit
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert f"clsim: error: cannot write {out / 'cells.jsonl'}: File too large" in stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr
    records = _records(out / "cells.jsonl")
    assert len(records) == 1 and records[0]["status"] == "ok"
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(_records(out / "cells.jsonl")) == 2


def test_tensorboard_on_a_full_disk_is_one_error_without_a_thread_traceback(tmp_path):
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from clsim.logging.tensorboard import TensorBoardLogger\n"
        "from clsim.results import ResultsWriteError\n"
        "log = TensorBoardLogger(Path(sys.argv[1]))\n"
        "try:\n"
        "    for step in range(10000):\n"
        "        log.experience(step, 0.5, [0.5] * 50, 1.0, 100, {'model': 10})\n"
        "    log.close()\n"
        "except ResultsWriteError as exc:\n"
        "    print('refused:', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tb")],
                          preexec_fn=_limited(4000), capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"refused: cannot write {tmp_path / 'tb'}: File too large" in proc.stdout
    assert proc.stderr == ""  # no "Exception in thread" from TensorBoard's writer


# a really full disk: a small tmpfs in a private user and mount namespace, so no root
# is needed and nothing outlives the test; inside it clsim runs, fails, the disk grows,
# and --resume finishes
FULL_DISK_SCRIPT = """\
set -u
mount -t tmpfs -o size=24k tmpfs "$DISK" || exit 99
"$PY" -m clsim.cli run quickstart --out "$DISK/out" --no-progress --limit 20 2>"$LOGS/err1"
echo "first=$?"
names() { "$PY" -c "import json, sys; print(*json.load(open(sys.argv[1]))['strategies'])" "$1"; }
echo "kept=$(names "$DISK/out/summary.json")"
ls -A "$DISK/out" | tr '\\n' ' ' | sed 's/^/files=/'; echo
mount -o remount,size=4m "$DISK"
"$PY" -m clsim.cli run quickstart --out "$DISK/out" --no-progress --limit 20 --resume \\
    >/dev/null 2>"$LOGS/err2"
echo "resumed=$?"
echo "after=$(names "$DISK/out/summary.json")"
"""


def test_run_on_a_really_full_disk_keeps_what_was_written_and_resumes(tmp_path):
    """ENOSPC from a real file system (a 24 KiB tmpfs): the error names the file, the
    summary keeps the strategy that finished, no temporary file is left, and once there
    is room ``--resume`` runs the rest."""
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    try:
        proc = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                               FULL_DISK_SCRIPT], capture_output=True, text=True, timeout=300,
                              cwd=REPO_ROOT, env={**os.environ, "DISK": str(disk),
                                                  "LOGS": str(logs), "PY": sys.executable})
    except FileNotFoundError:
        pytest.skip("no unshare here; the RLIMIT_FSIZE tests cover the same code")
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip(f"no user and mount namespaces here ({proc.stderr.strip()}); the "
                    "RLIMIT_FSIZE tests cover the same code")
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    err = (logs / "err1").read_text()
    assert lines["first"] == "2", err
    assert f"clsim: error: cannot write {disk / 'out'}/" in err
    assert "No space left on device (errno 28)" in err and "Traceback" not in err
    assert lines["kept"] == "naive"  # the summary is the last whole version
    assert not [f for f in lines["files"].split() if f.startswith(".summary.json.")]
    assert lines["resumed"] == "0", (logs / "err2").read_text()
    assert lines["after"] == "naive replay"


# ---------------------------------------------------------------------------
# names the OS refuses
# ---------------------------------------------------------------------------


def test_a_long_multibyte_strategy_name_runs_and_keeps_its_results(tmp_path, capsys):
    """200 letters (the most a name may have) of two bytes each: 400 bytes, more than a
    file name may have; two names equal up to the cut get two folders."""
    long_a, long_b = "é" * 199 + "1", "é" * 199 + "2"
    text = DIGITS_SCENARIO.replace("n_experiences: 5", "n_experiences: 2").replace(
        "  naive:\n    plugins: [naive]\n",
        f"  {long_a}:\n    plugins: [naive]\n  {long_b}:\n    plugins: [naive]\n")
    scenario = _write(tmp_path, text)
    out = tmp_path / "out"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress", "--limit", "20",
                 "--checkpoint-every", "experience"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [summary["strategies"][n]["status"] for n in (long_a, long_b)] == ["ok", "ok"]
    folders = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert len(folders) == 2 and all(len(f.encode()) <= 100 for f in folders)
    assert folders[0] != folders[1]


def test_a_short_strategy_name_keeps_its_folder_name():
    from clsim.results import safe_name

    assert safe_name("replay_2-x") == "replay_2-x"
    assert safe_name("é" * 300) != safe_name("é" * 299 + "e")
    assert len(safe_name("é" * 300).encode()) <= 100


@pytest.mark.parametrize("command", ["run", "compare"])
def test_an_out_too_long_for_the_os_fails_before_anything_runs(command, tmp_path, capsys):
    deep = tmp_path.joinpath(*(["d" * 200] * 19))  # about 3.9 KB: the files below it are not
    huge = tmp_path / ("x" * 300)  # one name longer than any file system allows
    grid = _write(tmp_path, GRID)
    scenario = "quickstart" if command == "run" else str(grid)
    for out, says in ((deep, "bytes long; clsim writes files up to"),
                      (huge, "has a folder name of 300 bytes")):
        assert main([command, scenario, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "clsim: error: --out" in err and says in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [grid]  # nothing was created


# ---------------------------------------------------------------------------
# damaged records
# ---------------------------------------------------------------------------


def test_compare_resume_reruns_damaged_records_and_says_so(tmp_path, capsys):
    grid = _write(tmp_path, GRID)
    out = tmp_path / "out"
    base = ["compare", str(grid), "--out", str(out), "--executor", "inline", "--no-progress",
            "--threads", "1"]
    assert main(base) == 0
    first, second = _records(out / "cells.jsonl")
    del first["strategy"]
    deep = "[" * 100_000 + "]" * 100_000
    (out / "cells.jsonl").write_text(
        json.dumps(first) + "\n" + deep + "\n" + json.dumps(second) + "\n")
    capsys.readouterr()

    before = _snapshot(out)
    assert main(["report", str(out)]) == 2  # the report cannot place that record
    err = capsys.readouterr().err
    assert "cells.jsonl: strategy: missing key in the record of cell" in err
    assert "(line 1)" in err and "Traceback" not in err
    assert _snapshot(out) == before

    assert main([*base, "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{out / 'cells.jsonl'}:1: strategy: missing key; the cell runs again" \
        in captured.err
    assert f"{out / 'cells.jsonl'}:2: nested too deeply to be a cell record; skipped" \
        in captured.err
    assert "ran 1 cells, kept 1" in captured.out
    assert len((out / "summary.csv").read_text().splitlines()) == 3
    assert main(["report", str(out)]) == 0  # the damaged line is superseded now


# ---------------------------------------------------------------------------
# strategies and cells that crash
# ---------------------------------------------------------------------------

ESCAPING = '''\
class Escape(BaseException):
    """Not an Exception: what no clsim code expects."""


class Escaper:
    def clsim_setup(self, ctx):
        def hook(module, inputs, output):
            raise Escape("from a forward hook")
        ctx.model.register_forward_hook(hook)
'''

INTERRUPTING = '''\
class Interrupting:
    def clsim_before_experience(self, ctx, experience):
        if experience.index == 1:
            raise KeyboardInterrupt
'''


def test_a_base_exception_from_a_strategy_fails_only_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "escaping.py").write_text(ESCAPING)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = DIGITS_SCENARIO.replace("  naive:\n", "  broken:\n    plugins: [naive, "
                                   "escaping:Escaper]\n  naive:\n")
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, text)), "--out", str(out), "--no-progress",
                 "--limit", "20"]) == 1
    strategies = json.loads((out / "summary.json").read_text())["strategies"]
    assert strategies["naive"]["status"] == "ok"
    assert "Escape: from a forward hook" in strategies["broken"]["error"]
    end = _records(out / "events.jsonl")[-1]
    assert end == {**end, "event": "run_end", "failed": ["broken"]} and "interrupted" not in end


def test_an_interrupted_run_says_so_in_run_end(tmp_path, monkeypatch):
    from clsim.config import load_scenario
    from clsim.runner import run_scenario

    (tmp_path / "interrupting.py").write_text(INTERRUPTING)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: [naive, "
                                   "interrupting:Interrupting]")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # the user's (nothing tracks SIGINT here)
        run_scenario(load_scenario(_write(tmp_path, text)), out, limit=20)
    end = _records(out / "events.jsonl")[-1]
    assert (end["event"], end["interrupted"], end["in_flight"], end["failed"]) == \
        ("run_end", True, "naive", [])
    assert not (out / LOCK_NAME).exists()


def test_a_cell_that_kills_clsim_is_retried_once_then_failed(tmp_path):
    env = _plugins(tmp_path)
    text = GRID.replace("  naive:\n", "  crashing:\n    plugins: [naive, crash_plugin:Crash]\n"
                        "  naive:\n").replace("seeds: [0, 1]", "seeds: [0]")
    grid = _write(tmp_path, text)
    out = tmp_path / "out"
    args = ["compare", str(grid), "--out", str(out), "--executor", "inline", "--no-progress",
            "--threads", "1"]
    crashed = "crashing | 1MB | seed 0"
    assert run_cli(*args, env=env).returncode == 3  # the plugin ended the process
    assert run_cli(*args, "--resume", env=env).returncode == 3  # retried once
    assert json.loads((out / "cells.started.json").read_text()) == {crashed: 2}
    assert not (out / "cells.jsonl").exists() or not _records(out / "cells.jsonl")

    third = run_cli(*args, "--resume", env=env)
    assert third.returncode == 1, third.stderr
    assert "crashed clsim twice while running" in third.stderr and "Traceback" not in third.stderr
    records = {r["cell"]: r for r in _records(out / "cells.jsonl")}
    assert records[crashed]["status"] == "failed"
    assert "crashed clsim twice" in records[crashed]["error"]
    assert records["naive | 1MB | seed 0"]["status"] == "ok"
    assert len((out / "summary.csv").read_text().splitlines()) == 3  # no "started" row
    assert json.loads((out / "cells.started.json").read_text()) == {}

    retried = run_cli(*args, "--resume", "--retry-failed", env=env)
    assert retried.returncode == 3  # --retry-failed runs it again
