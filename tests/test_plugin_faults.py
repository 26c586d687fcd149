"""A plugin failing in any hook fails its own strategy (or its own cell), nothing else.

Every hook of clsim/hookspecs.py is covered by a generated faulty plugin
(tests/faulty_plugins.py), so a new hook is tested as soon as it is specified. The other
strategies of the run, and the other cells of a comparison, must finish with exactly the
results they have without the faulty strategy beside them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import faulty_plugins
import pytest
from helpers import DIGITS_SCENARIO, REPO_ROOT, run_cli, without_measurements

from clsim import hookspecs, interrupts
from clsim.cli import main
from clsim.compare import run_compare
from clsim.config import parse_scenario
from clsim.executors import run_inline
from clsim.grid import plan
from clsim.runner import run_scenario
from clsim.text import source_line

SPECIFIED_HOOKS = sorted(
    name for name in dir(hookspecs)
    if name.startswith("clsim_") and hasattr(getattr(hookspecs, name), "clsim_spec")
)
# where each hook first fires: outside any experience, or in experience 0 (a new hook
# must be placed in one of the two, which a test below demands; until it is, its message
# is checked up to the experience)
OUTSIDE_EXPERIENCES = {"clsim_setup", "clsim_size_stores", "clsim_teardown", "clsim_predict",
                       "clsim_report"}
IN_EXPERIENCE_0 = {
    "clsim_before_experience", "clsim_train_experience", "clsim_after_experience",
    "clsim_plan_experience", "clsim_trainable", "clsim_before_batch", "clsim_inputs",
    "clsim_forward", "clsim_task_loss", "clsim_loss", "clsim_after_backward",
    "clsim_after_update", "clsim_after_batch",
}

SCENARIO = """\
name: faults
seed: 0
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [16]}
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.1}}
budget: model + 50 exemplars
strategies:
  before:
    plugins: [replay]
FAULTY  after:
    plugins: [{replay: {selection: herding, nme: true}}]
compare:
  budgets: ['model + 50 exemplars', 'model + 120 exemplars']
  seeds: [0]
"""


def scenario_text(plugin: str | None) -> str:
    """The scenario with a strategy 'faulty' (naive plus ``plugin``) between two others,
    or without it."""
    faulty = "" if plugin is None else \
        f"  faulty:\n    plugins: [naive, 'faulty_plugins:{plugin}']\n"
    return SCENARIO.replace("FAULTY", faulty)


def plain(outcome) -> dict:
    """An outcome as summary.json holds it, without the wall-clock time."""
    return without_measurements(outcome.to_dict())


def without_clocks(record: dict) -> dict:
    return {k: v for k, v in without_measurements(record).items() if k != "pid"}


def cell_records(text: str) -> dict[str, dict]:
    """Every cell of the comparison, run by the inline executor; without pid and time."""
    scenario = parse_scenario(text, source="g.yaml")
    return {r["cell"]: without_clocks(r) for r in run_inline(plan(scenario, text, threads=1))}


def expected_message(plugin: str, hook: str, detail: str) -> str:
    where = ", experience 0" if hook in IN_EXPERIENCE_0 else ""
    return f"plugin {plugin!r} failed in {hook} (strategy 'faulty'{where}): {detail}" \
        + raised_at(plugin, hook)


def raised_at(plugin: str, method: str) -> str:
    """' (tests/faulty_plugins.py:N)': the line where ``plugin``'s ``method`` raised (the
    last line of its code), with which the failure message ends."""
    code = getattr(getattr(faulty_plugins, plugin), method).__code__
    line = max(line for *_, line in code.co_lines() if line is not None)
    return f" ({source_line(faulty_plugins.__file__, line)})"


@pytest.fixture(autouse=True)
def no_tracking_leaks():
    """main() leaves SIGINT as Python has it, with nothing tracking or recorded, so a
    leak into the tests after it (or into a program using clsim) fails loudly."""
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not interrupts._tracking.is_set()
    assert not interrupts._user_interrupted.is_set()


@pytest.fixture(scope="module")
def clean_run() -> dict[str, dict]:
    result = run_scenario(parse_scenario(scenario_text(None)), None)
    return {o.name: plain(o) for o in result.outcomes}


@pytest.fixture(scope="module")
def clean_cells() -> dict[str, dict]:
    return cell_records(scenario_text(None))


def test_every_specified_hook_has_a_faulty_plugin_and_a_known_place():
    assert SPECIFIED_HOOKS, "no hook specs found in clsim.hookspecs"
    for hook in SPECIFIED_HOOKS:
        assert hasattr(faulty_plugins, faulty_plugins.class_name(hook))
    # a new hook should be placed in one of the two sets, so its message is checked exactly
    assert set(SPECIFIED_HOOKS) == OUTSIDE_EXPERIENCES | IN_EXPERIENCE_0


@pytest.mark.parametrize("hook", SPECIFIED_HOOKS)
def test_a_plugin_raising_in_any_hook_fails_only_its_strategy(hook, clean_run):
    plugin = faulty_plugins.class_name(hook)
    result = run_scenario(parse_scenario(scenario_text(plugin)), None)
    outcomes = {o.name: o for o in result.outcomes}
    assert list(outcomes) == ["before", "faulty", "after"]
    error = outcomes["faulty"].error
    if hook in OUTSIDE_EXPERIENCES | IN_EXPERIENCE_0:
        assert error == expected_message(plugin, hook, f"RuntimeError: fault in {hook}")
    else:
        assert error.startswith(f"plugin {plugin!r} failed in {hook} (strategy 'faulty'"), error
    assert result.summary["strategies"]["faulty"]["status"] == "failed"
    # the strategies before and after it finish exactly as without it
    assert {n: plain(outcomes[n]) for n in ("before", "after")} == clean_run


@pytest.mark.parametrize("hook", SPECIFIED_HOOKS)
def test_a_plugin_raising_in_any_hook_fails_only_its_compare_cells(hook, clean_cells):
    plugin = faulty_plugins.class_name(hook)
    records = cell_records(scenario_text(plugin))
    failed = {cell: r for cell, r in records.items() if r["strategy"] == "faulty"}
    assert len(failed) == 2  # one per budget
    for record in failed.values():
        assert record["status"] == "failed"
        assert record["error"].startswith(f"plugin {plugin!r} failed in {hook} "
                                          "(strategy 'faulty'"), record["error"]
        assert record["error"].endswith(f"RuntimeError: fault in {hook}"
                                        + raised_at(plugin, hook))
    others = {cell: r for cell, r in records.items() if r["strategy"] != "faulty"}
    assert others == clean_cells
    assert all(r["status"] == "ok" for r in others.values())


def test_sys_exit_in_a_plugin_is_blamed_on_the_plugin(clean_run, tmp_path):
    """The run does not end with the plugin's exit code 3: the strategy fails with a
    message naming plugin and hook, and the next strategy runs."""
    scenario = parse_scenario(scenario_text("ExitsInAfterBatch"))
    result = run_scenario(scenario, tmp_path / "out")
    message = expected_message("ExitsInAfterBatch", "clsim_after_batch",
                               "SystemExit(3): a plugin may not exit the program; raise an "
                               "exception instead")
    strategies = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert [o.error for o in result.outcomes] == [None, message, None]
    assert strategies["faulty"]["error"] == message
    assert {n: without_measurements(strategies[n])
            for n in ("before", "after")} == clean_run


def run_clsim(*args: str, teardowns: Path) -> subprocess.CompletedProcess:
    """``clsim ARGS`` in a fresh interpreter that can import tests/faulty_plugins.py; a
    real SIGINT there cannot leak into this test process's interrupt record."""
    return run_cli(*args, env={"PYTHONPATH": str(REPO_ROOT / "tests"),
                               "CLSIM_TEST_TEARDOWNS": str(teardowns)})


def test_keyboard_interrupt_in_a_plugin_stops_clsim_run_with_exit_130(tmp_path):
    """A real SIGINT (what Ctrl-C sends) arriving inside a plugin stops clsim: exit 130,
    the plugin's teardown runs, the strategy finished before is kept, the next never
    starts."""
    path = tmp_path / "s.yaml"
    path.write_text(scenario_text("SignalsInAfterBatch"), encoding="utf-8")
    teardowns = tmp_path / "teardowns.txt"
    proc = run_clsim("run", str(path), "--out", str(tmp_path / "out"), "--no-progress",
                     teardowns=teardowns)
    assert proc.returncode == 130, proc.stderr
    assert "clsim: interrupted" in proc.stderr and "Traceback" not in proc.stderr
    assert teardowns.read_text() == "teardown\n"  # on the way out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["strategies"]) == ["before"]  # 'after' never started
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").open()]
    assert not any(e.get("strategy") == "after" for e in events)
    assert events[-1]["event"] == "run_end"


def test_a_real_sigint_in_a_library_run_propagates(tmp_path):
    """clsim used as a library (no CLI, nothing tracking SIGINT): the interrupt reaches
    the caller after the plugin's teardown."""
    teardowns = tmp_path / "teardowns.txt"
    code = ("import sys, faulty_plugins, test_plugin_faults as t\n"
            "from clsim.config import parse_scenario\n"
            "from clsim.runner import run_scenario\n"
            "try:\n"
            "    run_scenario(parse_scenario(t.scenario_text('SignalsInAfterBatch')), None)\n"
            "except KeyboardInterrupt:\n"
            "    sys.exit(42)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT / "tests",
                          env={**os.environ, "CLSIM_TEST_TEARDOWNS": str(teardowns)})
    assert proc.returncode == 42, proc.stderr
    assert teardowns.read_text() == "teardown\n"


MESSAGES = {
    "SystemExit": "SystemExit(0): a plugin may not exit the program; raise an exception instead",
    "KeyboardInterrupt": "KeyboardInterrupt (raised by the plugin, not by Ctrl-C); raise an "
                         "exception instead",
    "GeneratorExit": "GeneratorExit (a BaseException); a plugin must raise an Exception",
    "Boom": "Boom: boom (a BaseException); a plugin must raise an Exception",
}


@pytest.mark.parametrize("kind", sorted(faulty_plugins.BASE_EXCEPTIONS))
def test_a_base_exception_in_a_hook_fails_only_its_strategy(kind, clean_run, tmp_path, capsys):
    """clsim run: SystemExit(0), a plugin's own KeyboardInterrupt, GeneratorExit or a
    BaseException subclass fails the plugin's strategy (exit 1), naming plugin and hook;
    the other strategies finish exactly as without it."""
    plugin = f"Raises{kind}InAfterBatch"
    path = tmp_path / "s.yaml"
    path.write_text(scenario_text(plugin), encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "clsim: error: strategy faulty failed" in stderr
    strategies = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert strategies["faulty"]["error"] == expected_message(plugin, "clsim_after_batch",
                                                             MESSAGES[kind])
    assert {n: without_measurements(strategies[n])
            for n in ("before", "after")} == clean_run


@pytest.mark.parametrize("kind", sorted(faulty_plugins.BASE_EXCEPTIONS))
def test_a_base_exception_in_a_hook_fails_only_its_compare_cells(kind, clean_cells, tmp_path,
                                                                 capsys):
    """clsim compare, inline executor: only the faulty strategy's cells fail, each
    record saying why; the grid finishes and the command exits 1."""
    plugin = f"Raises{kind}InAfterBatch"
    path = tmp_path / "g.yaml"
    path.write_text(scenario_text(plugin), encoding="utf-8")
    code = main(["compare", str(path), "--out", str(tmp_path / "out"), "--executor", "inline",
                 "--threads", "1", "--no-progress"])
    stderr = capsys.readouterr().err
    assert code == 1 and "Traceback" not in stderr and "2 cell(s) failed" in stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").open()]
    assert len(records) == 6
    for r in records:
        if r["strategy"] == "faulty":
            assert (r["status"], r["error"]) == (
                "failed", expected_message(plugin, "clsim_after_batch", MESSAGES[kind]))
        else:
            assert without_clocks(r) == clean_cells[r["cell"]]


@pytest.mark.parametrize("kind", sorted(faulty_plugins.BASE_EXCEPTIONS))
def test_a_base_exception_in_a_constructor_fails_only_its_strategy(kind, tmp_path, capsys):
    plugin = f"Raises{kind}InInit"
    path = tmp_path / "s.yaml"
    path.write_text(scenario_text(plugin), encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    strategies = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert [s["status"] for s in strategies.values()] == ["ok", "failed", "ok"]
    assert strategies["faulty"]["error"] == (
        f"plugin {plugin!r} (faulty_plugins:{plugin}) could not be created: {MESSAGES[kind]}"
        + raised_at(plugin, "__init__"))


def test_a_base_exception_in_a_torch_hook_fails_only_its_strategy(clean_run):
    """A forward hook the plugin put on the model runs outside clsim's hook calls; the
    engine still fails only that strategy, and names the plugin from the traceback."""
    result = run_scenario(parse_scenario(scenario_text("BoomInForwardHook")), None)
    outcomes = {o.name: o for o in result.outcomes}
    assert outcomes["faulty"].error == (
        "plugin 'BoomInForwardHook' failed outside its hooks (strategy 'faulty'; e.g. in a "
        "torch hook it installed): Boom: in a forward hook (a BaseException); a plugin must "
        "raise an Exception")
    assert {n: plain(outcomes[n]) for n in ("before", "after")} == clean_run


def test_keyboard_interrupt_in_a_process_pool_worker_fails_only_its_cells(clean_cells,
                                                                          tmp_path):
    """A worker records the user's Ctrl-C as clsim does, so a KeyboardInterrupt the plugin
    raises itself fails its cells and the pool runs on."""
    path = tmp_path / "g.yaml"
    path.write_text(scenario_text("RaisesKeyboardInterruptInAfterBatch"), encoding="utf-8")
    proc = run_clsim("compare", str(path), "--out", str(tmp_path / "out"), "--workers", "2",
                     "--threads", "1", "--no-progress", teardowns=tmp_path / "t.txt")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").open()]
    assert len(records) == 6
    for r in records:
        if r["strategy"] == "faulty":
            assert (r["status"], r["error"]) == ("failed", expected_message(
                "RaisesKeyboardInterruptInAfterBatch", "clsim_after_batch",
                MESSAGES["KeyboardInterrupt"]))
        else:
            assert without_clocks(r) == clean_cells[r["cell"]]


def test_sys_exit_in_a_process_pool_worker_fails_only_its_cells(clean_cells, tmp_path,
                                                                 monkeypatch):
    """A SystemExit escaping into a pool worker would reach the parent through the future
    and end the whole comparison; it must fail only the faulty strategy's cells."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tests"))  # spawned workers import the plugin
    path = tmp_path / "g.yaml"
    path.write_text(scenario_text("ExitsInAfterBatch"), encoding="utf-8")
    result = run_compare(path, tmp_path / "out", executor="local", workers=2, threads=1)
    records = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").open()]
    assert len(records) == 6 and len(result.failed) == 2
    assert len({r["pid"] for r in records} - {os.getpid()}) == 2  # two worker processes
    message = expected_message("ExitsInAfterBatch", "clsim_after_batch",
                               "SystemExit(3): a plugin may not exit the program; raise an "
                               "exception instead")
    for r in records:
        if r["strategy"] == "faulty":
            assert (r["status"], r["error"]) == ("failed", message)
        else:
            assert without_clocks(r) == clean_cells[r["cell"]]
    assert message in (tmp_path / "out" / "report.md").read_text()


IMPORT_FAULTS = {  # module body -> what the message must say it raised
    "raise SystemExit(0)": "SystemExit(0): a plugin may not exit the program",
    "import sys; sys.exit(5)": "SystemExit(5): a plugin may not exit the program",
    "raise KeyboardInterrupt": "KeyboardInterrupt (raised by the plugin, not by Ctrl-C)",
    "raise GeneratorExit": "GeneratorExit (a BaseException)",
    "class Boom(BaseException): pass\nraise Boom('at import')": "Boom: at import (a "
                                                                "BaseException)",
}


def plugin_module(folder: Path, name: str, body: str) -> None:
    """A module ``name`` in ``folder`` whose import runs ``body`` before defining Plugin."""
    (folder / f"{name}.py").write_text(
        f"{body}\nclass Plugin:\n    def clsim_setup(self):\n        pass\n", encoding="utf-8")


@pytest.mark.parametrize("body", sorted(IMPORT_FAULTS), ids=lambda b: b.split("(")[0][-14:])
def test_a_base_exception_importing_a_plugin_module_is_a_plugin_error(body, tmp_path,
                                                                      monkeypatch, capsys):
    """`package.module:Class` whose import exits or raises a BaseException: clsim says so
    (exit 2, file and key path named) instead of ending silently with the module's code."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"exits_on_import_{abs(hash(body))}"
    plugin_module(tmp_path, name, body)
    path = tmp_path / "s.yaml"
    path.write_text(scenario_text(None).replace("plugins: [replay]\n",
                                                f"plugins: ['{name}:Plugin']\n", 1))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clsim: error: {path}:10: strategies.before.plugins[0]: importing "
                          f"module {name!r} for plugin '{name}:Plugin' raised "
                          f"{IMPORT_FAULTS[body]}"), err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_plugin_module_exiting_0_at_import_fails_a_real_process(tmp_path):
    """Through a real interpreter: exit status 2, not the module's 0."""
    plugin_module(tmp_path, "quits_quietly", "raise SystemExit(0)")
    path = tmp_path / "s.yaml"
    path.write_text(DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: ['quits_quietly:P']"))
    proc = run_cli("validate", str(path), env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "importing module 'quits_quietly' for plugin 'quits_quietly:P' raised SystemExit(0)" \
        in proc.stderr


@pytest.mark.parametrize("body", ["raise SystemExit(0)", "raise KeyboardInterrupt"])
def test_a_registered_plugin_whose_package_exits_at_import_is_named(body, tmp_path,
                                                                    monkeypatch, capsys):
    """An installed distribution declaring an entry point whose module exits while
    importing: the plugin and its entry point are named (a real dist-info on sys.path)."""
    dist = tmp_path / "exiting_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: exiting-plugin\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text("[clsim.plugins]\nexits_at_import = "
                                           "exiting_plugin_mod:Plugin\n")
    plugin_module(tmp_path, "exiting_plugin_mod", body)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "s.yaml"
    path.write_text(DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: [exits_at_import]"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clsim: error: {path}:9: strategies.naive.plugins[0]: plugin "
                          "'exits_at_import' failed to load (exiting_plugin_mod:Plugin): "
                          f"{IMPORT_FAULTS[body].split(':')[0]}"), err
    assert "Traceback" not in err
    assert main(["list"]) == 0  # the listing marks it broken instead of ending
    assert "exits_at_import  BROKEN: plugin 'exits_at_import' failed to load" \
        in capsys.readouterr().out


def test_a_base_exception_escaping_every_command_is_one_paragraph(tmp_path, monkeypatch,
                                                                  capsys):
    """Options whose check() raises a BaseException: whatever reports it, it is one
    paragraph starting with 'clsim: ', never a traceback, never the plugin's exit code."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "checks_badly.py").write_text(
        "import dataclasses\n"
        "class Boom(BaseException):\n    pass\n"
        "@dataclasses.dataclass\nclass Opts:\n    lr: float = 0.1\n"
        "    def check(self):\n        raise Boom('from check')\n"
        "class Plugin:\n    Options = Opts\n    def clsim_setup(self):\n        pass\n")
    path = tmp_path / "s.yaml"
    path.write_text(DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: ['checks_badly:Plugin']"))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("clsim: error: ") and err.count("\n") == 1, err
    assert "Boom: from check" in err and "Traceback" not in err
