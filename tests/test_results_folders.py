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

import clsim.interrupts
from clsim.cli import main
from clsim.errors import ConfigError
from clsim.lock import LOCK_NAME, FolderLock


@pytest.fixture(autouse=True)
def _interrupt_tracking_is_undone():
    """Every command run in-process here leaves SIGINT as it found it: a leak of clsim's
    Ctrl-C tracking would change what later code (and tests) see."""
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not clsim.interrupts._tracking.is_set()


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
        try:
            return (folder / LOCK_NAME).read_text().startswith(f"pid {pid},")
        except FileNotFoundError:  # released (and removed) as we looked
            return False
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
    argument = "DIR" if command == "report" else "--out"  # report has no --out
    assert f"clsim: error: {argument}: {out} is in use by another clsim (pid {os.getpid()}, " \
           "clsim compare --resume)" in err
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


QUICKSTART = ["run", "quickstart", "--no-progress", "--limit", "20"]


def _json_bytes(data) -> int:
    """Bytes of ``data`` as clsim writes a JSON file (results.write_json_atomic)."""
    return len((json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def _quickstart_sizes(tmp: Path) -> dict[str, int]:
    """What a finished quickstart writes, from a reference run: the summary as written at
    the start, after naive and after replay, and the largest other file. The limits of
    the full-disk tests sit between these, so they hold whatever a summary holds."""
    reference = tmp / "reference"
    assert main([*QUICKSTART, "--out", str(reference)]) == 0
    summary = json.loads((reference / "summary.json").read_text())
    others = [p.stat().st_size for p in reference.rglob("*")  # run.png: drawn once the
              if p.is_file() and p.name not in ("summary.json", "run.png")]  # summary is whole
    return {"start": _json_bytes({**summary, "strategies": {}}),
            "naive": _json_bytes({**summary, "strategies": {
                "naive": summary["strategies"]["naive"]}}),
            "full": (reference / "summary.json").stat().st_size,
            "other": max(others),
            "tensorboard_naive": sum(p.stat().st_size for p in
                                     (reference / "tensorboard" / "naive").iterdir()),
            "tensorboard_all": sum(p.stat().st_size for p in
                                   (reference / "tensorboard").rglob("*") if p.is_file()),
            "events": (reference / "events.jsonl").stat().st_size,
            "figure": (reference / "run.png").stat().st_size}


def test_run_on_a_full_disk_names_the_file_and_keeps_the_summary_whole(tmp_path):
    sizes = _quickstart_sizes(tmp_path)
    # summary.json fits with naive, not with replay too; every other file fits
    limit = (sizes["naive"] + sizes["full"]) // 2
    assert sizes["naive"] < limit < sizes["full"] and sizes["other"] < limit, sizes
    out = tmp_path / "out"
    args = [*QUICKSTART, "--out", str(out)]
    proc = _clsim(*args, preexec_fn=_limited(limit))
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


def test_a_figure_that_cannot_be_saved_is_a_warning_and_the_run_succeeds(tmp_path):
    """run.png is drawn once every result is written: a disk that holds the results but
    not the picture leaves a finished run, exit 0, a warning and an event."""
    sizes = _quickstart_sizes(tmp_path)
    # room for the clock readings (wall and CPU seconds, per experience in compute) to
    # take a few more digits than in the reference run
    limit = max(sizes["full"], sizes["other"]) + 4096
    assert limit < sizes["figure"], sizes
    out = tmp_path / "out"
    proc = _clsim(*QUICKSTART, "--out", str(out), preexec_fn=_limited(limit))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "clsim: warning: run.png not drawn: " in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["strategies"].values()] == ["ok", "ok"]
    assert not (out / "run.png").exists() and "run.png" not in stdout
    assert not list(out.glob(".run.png*"))  # no partial picture left behind
    events = _records(out / "events.jsonl")
    assert [e["event"] for e in events][-2:] == ["run_end", "figure_failed"]  # drawn after


def test_compare_on_a_full_disk_names_cells_jsonl_and_keeps_whole_records(tmp_path):
    grid = _write(tmp_path, GRID)
    out = tmp_path / "out"
    args = ["compare", str(grid), "--out", str(out), "--executor", "inline", "--no-progress",
            "--threads", "1"]
    # from a reference comparison: grid.json and one record fit, two records do not
    reference = tmp_path / "reference"
    assert main([*args[:3], str(reference), *args[4:]]) == 0
    first, second = (reference / "cells.jsonl").read_bytes().splitlines(keepends=True)
    limit = len(first) + len(second) // 2
    assert (reference / "grid.json").stat().st_size < limit, limit
    proc = _clsim(*args, preexec_fn=_limited(limit))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert f"clsim: error: cannot write {out / 'cells.jsonl'}: File too large" in stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr
    records = _records(out / "cells.jsonl")
    assert len(records) == 1 and records[0]["status"] == "ok"
    # stopped by the full disk again: an error ran Python, so it is no crash of the cell
    # (two crashes in a row would record it failed, "crashed clsim twice")
    again = _clsim(*args, "--resume", preexec_fn=_limited(limit))
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 2, stderr
    assert f"clsim: error: cannot write {out / 'cells.jsonl'}: File too large" in stderr
    assert json.loads((out / "cells.started.json").read_text()) == {}
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "crashed" not in resumed.stderr
    assert [r["status"] for r in _records(out / "cells.jsonl")] == ["ok", "ok"]


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
mount -t tmpfs -o size="$SIZE" tmpfs "$DISK" || exit 99
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
    """ENOSPC from a real file system (a small tmpfs): the error names the file, the
    summary keeps the strategy that finished, no temporary file is left, and once there
    is room ``--resume`` runs the rest."""
    sizes = _quickstart_sizes(tmp_path)
    # tmpfs counts whole pages; while a summary is rewritten the old and new copies both
    # exist: room for naive's rewrite (lock, old summary, new one, events, naive's
    # TensorBoard file), not for replay's
    def pages(size: int) -> int:
        return -(-size // 4096)
    naive = 1 + pages(sizes["start"]) + pages(sizes["naive"]) + pages(sizes["events"]) + \
        pages(sizes["tensorboard_naive"])
    full = 1 + pages(sizes["naive"]) + pages(sizes["full"]) + pages(sizes["events"]) + \
        pages(sizes["tensorboard_all"]) + 1
    assert naive < full, sizes
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    try:
        proc = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                               FULL_DISK_SCRIPT], capture_output=True, text=True, timeout=300,
                              cwd=REPO_ROOT, env={**os.environ, "DISK": str(disk),
                                                  "LOGS": str(logs), "PY": sys.executable,
                                                  "SIZE": f"{4 * ((naive + full) // 2)}k"})
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


UNPRINTABLE = '''\
class Unprintable(Exception):  # from a torch hook, an Exception reaches the runner
    def __str__(self):
        raise RuntimeError("and its __str__ raises too")


class Raiser:
    def clsim_setup(self, ctx):
        def hook(module, inputs, output):
            raise Unprintable()
        ctx.model.register_forward_hook(hook)
'''


def test_an_exception_whose_str_raises_fails_only_its_strategy(tmp_path, monkeypatch):
    (tmp_path / "unprintable.py").write_text(UNPRINTABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = DIGITS_SCENARIO.replace("  naive:\n", "  broken:\n    plugins: [naive, "
                                   "unprintable:Raiser]\n  naive:\n")
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, text)), "--out", str(out), "--no-progress",
                 "--limit", "20"]) == 1
    strategies = json.loads((out / "summary.json").read_text())["strategies"]
    assert strategies["naive"]["status"] == "ok"
    assert strategies["broken"]["error"] == (
        "internal error: Unprintable: <unprintable: RuntimeError> (traceback in events.jsonl)")
    events = _records(out / "events.jsonl")
    crash = next(e for e in events if e["event"] == "internal_error")
    assert crash["strategy"] == "broken" and "Unprintable" in crash["traceback"]


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


# ---------------------------------------------------------------------------
# the lock file itself, hostile
# ---------------------------------------------------------------------------

# one finished cell, as compare appends it: enough for ``clsim report``
RECORD = {"cell": "naive | 1MB | seed 0", "strategy": "naive", "budget": "1MB",
          "budget_index": 0, "seed": 0, "status": "ok", "final_accuracy": 0.5,
          "average_incremental_accuracy": 0.6, "peak_bytes": 1000, "memory_mb": 1.0}
SUMMARY = b'{"strategies": {"naive": {"status": "ok"}}}\n'


def _comparison(out: Path) -> None:
    out.mkdir()
    (out / "cells.jsonl").write_text(json.dumps(RECORD) + "\n")
    (out / "summary.json").write_bytes(SUMMARY)


@pytest.mark.parametrize(("kind", "words"), [("link", "a symbolic link"),
                                             ("fifo", "a named pipe (FIFO)"),
                                             ("folder", "a folder")])
def test_a_lock_file_that_is_not_a_regular_file_is_refused_and_nothing_is_written(
        kind, words, tmp_path):
    """A link to summary.json is not followed (it was truncated to the holder's note), a
    named pipe does not block, a folder is named as one."""
    out = tmp_path / "out"
    _comparison(out)
    lock = out / LOCK_NAME
    {"link": lambda: lock.symlink_to("summary.json"), "fifo": lambda: os.mkfifo(lock),
     "folder": lock.mkdir}[kind]()
    says = (f"the lock file {str(lock)!r} is {words}; clsim creates it as a regular file "
            "and never writes through anything else. Remove it (it is not results), then "
            "run this again")
    proc = subprocess.run([sys.executable, "-m", "clsim.cli", "report", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"clsim: error: DIR: {says}\n")
    with pytest.raises(ConfigError) as refused:  # as run and compare take it
        FolderLock(out, "run").acquire()
    assert str(refused.value) == f"--out: {says}"
    assert (out / "summary.json").read_bytes() == SUMMARY
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "cells.jsonl", "summary.json"]
    assert lock.is_symlink() if kind == "link" else lock.exists()


# report a comparison, then take its lock again in the same process: a lock leaked by
# the failed command would refuse the second one ("in use by another clsim")
RELOCK_SCRIPT = """\
import sys
from pathlib import Path
from clsim.cli import main
from clsim.errors import ConfigError
from clsim.lock import FolderLock
out = Path(sys.argv[1])
print("code", main(["report", str(out)]), flush=True)
with FolderLock(out, "report again"):
    print("relocked", flush=True)
"""


def test_a_lock_note_that_cannot_be_written_neither_leaks_the_lock_nor_crashes(tmp_path):
    """RLIMIT_FSIZE 0: no byte can be written, not even the holder's note in the lock
    file; the note is a courtesy (the flock is the lock), so the command goes on and
    fails at its first results file, cleanly, and lets go of the lock."""
    out = tmp_path / "out"
    _comparison(out)
    proc = subprocess.run([sys.executable, "-c", RELOCK_SCRIPT, str(out)], cwd=REPO_ROOT,
                          preexec_fn=_limited(0), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "code 2\nrelocked\n", proc.stderr
    assert f"clsim: error: cannot write {out}/" in proc.stderr
    assert "File too large" in proc.stderr and "internal error" not in proc.stderr
    assert not (out / LOCK_NAME).exists()
    assert (out / "cells.jsonl").read_text() == json.dumps(RECORD) + "\n"


FULL_DISK_LOCK_SCRIPT = """\
set -u
mount -t tmpfs -o size=4m tmpfs "$DISK" || exit 99
mkdir "$DISK/out" && cp "$CELLS" "$DISK/out/cells.jsonl"
dd if=/dev/zero of="$DISK/filler" bs=4096 2>/dev/null
"$PY" -c "$SCRIPT" "$DISK/out" >"$LOGS/out1" 2>"$LOGS/err1"
echo "first=$?"
ls -A "$DISK/out" | tr '\\n' ' ' | sed 's/^/files=/'; echo
rm "$DISK/filler"
"$PY" -m clsim.cli report "$DISK/out" >/dev/null 2>"$LOGS/err2"
echo "second=$?"
"""


def test_report_on_a_really_full_disk_is_one_error_and_releases_the_lock(tmp_path):
    """ENOSPC from a real file system (a filled tmpfs): the lock note cannot be written,
    and neither can the report; one clean error, the lock is let go (and its file
    removed), and once there is room the report is written."""
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    (tmp_path / "cells.jsonl").write_text(json.dumps(RECORD) + "\n")
    try:
        proc = subprocess.run(
            ["unshare", "--map-root-user", "--mount", "sh", "-c", FULL_DISK_LOCK_SCRIPT],
            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
            env={**os.environ, "DISK": str(disk), "LOGS": str(logs), "PY": sys.executable,
                 "SCRIPT": RELOCK_SCRIPT, "CELLS": str(tmp_path / "cells.jsonl")})
    except FileNotFoundError:
        pytest.skip("no unshare here; the RLIMIT_FSIZE test covers the same code")
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip(f"no user and mount namespaces here ({proc.stderr.strip()})")
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    err = (logs / "err1").read_text()
    assert lines["first"] == "0", err
    assert (logs / "out1").read_text() == "code 2\nrelocked\n", err
    assert f"clsim: error: cannot write {disk / 'out'}/" in err
    assert "No space left on device (errno 28)" in err and "internal error" not in err
    assert LOCK_NAME not in lines["files"].split()
    assert lines["second"] == "0", (logs / "err2").read_text()


# ---------------------------------------------------------------------------
# named pipes and oversized numbers in place of results files
# ---------------------------------------------------------------------------

# every reader of a results file, each given a named pipe with no writer or reader: each
# must refuse it at once (opening a pipe to write, or reading one, blocks forever)
READERS_SCRIPT = """\
import os, sys
from pathlib import Path
from clsim.cellstore import CellStore, StartMarks
from clsim.checkpoint import read_checkpoint
from clsim.compare import _read_grid
from clsim.logging.events import EventLog
from clsim.runner import read_summary
folder = Path(sys.argv[1])
readers = {
    "events.jsonl": EventLog,
    "cells.jsonl": lambda path: CellStore(path).open(),
    "cells.started.json": lambda path: StartMarks(path).load(),
    "summary.json": read_summary,
    "grid.json": _read_grid,
    "0-naive.pt": lambda path: read_checkpoint(path, "key"),
}
for name, read in readers.items():
    path = folder / name
    os.mkfifo(path)
    try:
        read(path)
        print(name, "read")
    except Exception as exc:
        print(name, type(exc).__name__, exc)
"""


def test_a_named_pipe_in_place_of_any_results_file_is_refused_without_blocking(tmp_path):
    proc = subprocess.run([sys.executable, "-c", READERS_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    shown = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines()}
    roles = {"events.jsonl": "the run's event log",
             "cells.jsonl": "the comparison's cell records",
             "cells.started.json": "the comparison's start marks",
             "summary.json": "--resume: the run summary",
             "grid.json": "--resume: the grid file",
             "0-naive.pt": "checkpoint"}
    for name, role in roles.items():
        error = "SnapshotError" if name.endswith(".pt") else "ConfigError"
        assert shown[name] == (f"{error} {role} {str(tmp_path / name)!r} is a named pipe "
                               "(FIFO); expected a regular file"), proc.stdout


HUGE_INT = "1" * 5000  # more digits than Python converts (4300): a plain ValueError


def test_numbers_of_5000_digits_in_results_files_are_damage_not_a_crash(tmp_path, capsys):
    """cells.jsonl: the line is skipped and named; cells.started.json: a warning and the
    cells are retried (summary.json and grid.json: the corpus, cases_results.yaml)."""
    from clsim.cellstore import CellStore, StartMarks

    out = tmp_path / "out"
    _comparison(out)
    (out / "cells.jsonl").write_text(json.dumps(RECORD) + '\n{"cell": "x", "seed": '
                                     + HUGE_INT + "}\n")
    store = CellStore(out / "cells.jsonl")
    assert list(store.load()) == [RECORD["cell"]]
    assert [(d.line, d.cell, d.key) for d in store.damaged] == [(2, None, None)]
    assert store.damaged[0].problem.startswith(
        "not JSON clsim can read (Exceeds the limit (4300 digits)")

    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"clsim: warning: {out / 'cells.jsonl'}:2: not JSON clsim can read (Exceeds " \
        "the limit (4300 digits)" in err and err.endswith("; skipped\n")

    marks = StartMarks(out / "cells.started.json")
    marks.path.write_text('{"naive | 1MB | seed 0": ' + HUGE_INT + "}\n")
    warning = marks.load()
    assert warning.startswith(f"{marks.path} cannot be read (not JSON clsim can read "
                              "(Exceeds the limit (4300 digits)")
    assert warning.endswith("cells that crashed clsim before are not known, and are retried")
    assert marks.counts == {}


# ---------------------------------------------------------------------------
# the global hooks clsim installs are put back
# ---------------------------------------------------------------------------


def test_tensorboard_puts_back_the_thread_excepthook_when_it_closes(tmp_path):
    import threading

    from clsim.logging.tensorboard import TensorBoardLogger, open_summary_writer

    def mine(args):  # a hook of the program that uses clsim
        pass

    previous = threading.excepthook
    threading.excepthook = mine
    try:
        first = TensorBoardLogger(tmp_path / "a")
        assert threading.excepthook is not mine  # quiet while a writer is open
        with open_summary_writer(tmp_path / "b"):
            pass
        assert threading.excepthook is not mine  # the first one is still open
        first.close()
        assert threading.excepthook is mine
        first.close()
        assert threading.excepthook is mine
    finally:
        threading.excepthook = previous
