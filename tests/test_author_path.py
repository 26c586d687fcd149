"""What a plugin author meets first, through the CLI as they would meet it: where their
plugin failed (file:line, the traceback kept and printed with --debug), two packages
claiming one plugin name, a misspelt hook caught by validate, the scaffold's docstrings,
and a misspelt scenario name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from helpers import DIGITS_SCENARIO, run_cli

from clsim.cli import build_parser, main

RAISES = '''\
"""A plugin that fails after its first experience."""


class Raises:
    """Looks up a key that is not there."""

    def clsim_after_experience(self, ctx):
        table = {}
        return table["missing"]
'''
RAISE_LINE = 9  # the line of RAISES that raises

# a strategy failing between two that finish; --limit 20 keeps it to seconds
THREE_STRATEGIES = DIGITS_SCENARIO.replace(
    "  naive:\n    plugins: [naive]\n",
    "  first:\n    plugins: [naive]\n  s:\n    plugins: [naive, 'my_plugin:Raises']\n"
    "  last:\n    plugins: [naive]\n")
MESSAGE = ("plugin 'Raises' failed in clsim_after_experience (strategy 's', experience 0): "
           f"KeyError: 'missing' (my_plugin.py:{RAISE_LINE})")


def _failing_run(tmp_path: Path, *flags: str):
    """``clsim FLAGS...`` run from the plugin's folder, as its author would."""
    (tmp_path / "my_plugin.py").write_text(RAISES, encoding="utf-8")
    (tmp_path / "s.yaml").write_text(THREE_STRATEGIES, encoding="utf-8")
    return run_cli(*flags, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})


def test_a_failing_plugin_is_named_with_its_line_and_its_traceback_is_kept(tmp_path):
    proc = _failing_run(tmp_path, "run", "s.yaml", "--out", "out", "--no-progress",
                        "--limit", "20")
    assert proc.returncode == 1, proc.stderr
    assert f"clsim: strategy 's' failed: {MESSAGE}\n" in proc.stderr
    assert "Traceback" not in proc.stderr  # one line unless --debug
    assert "the 'traceback' that --debug prints" in proc.stderr
    out = tmp_path / "out"
    strategies = json.loads((out / "summary.json").read_text())["strategies"]
    # the strategies before and after it keep their results
    assert [s["status"] for s in strategies.values()] == ["ok", "failed", "ok"]
    record = strategies["s"]
    assert record["error"] == MESSAGE
    plugin_frame = f'my_plugin.py", line {RAISE_LINE}, in clsim_after_experience'
    assert plugin_frame in record["traceback"]
    assert record["traceback"].rstrip().endswith("KeyError: 'missing'")
    events = [json.loads(line) for line in (out / "events.jsonl").open()]
    failed = [e for e in events if e["event"] == "strategy_failed"]
    assert [(e["strategy"], e["error"]) for e in failed] == [("s", MESSAGE)]
    assert failed[0]["traceback"] == record["traceback"]
    assert "traceback" not in strategies["first"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_prints_the_plugins_traceback(where, tmp_path):
    command = ["run", "s.yaml", "--out", "out", "--no-progress", "--limit", "20",
               "--strategy", "s"]
    argv = ["--debug", *command] if where == "before" else [*command, "--debug"]
    proc = _failing_run(tmp_path, *argv)
    assert proc.returncode == 1, proc.stderr
    assert f"{MESSAGE}\nTraceback (most recent call last):" in proc.stderr
    assert f'my_plugin.py", line {RAISE_LINE}, in clsim_after_experience' in proc.stderr


def test_debug_is_parsed_on_either_side_of_every_command():
    parse = build_parser().parse_args
    for command in (["run", "x.yaml"], ["validate", "x.yaml"], ["compare", "x.yaml"],
                    ["list"], ["report", "d"], ["new-plugin", "p"]):
        assert parse(command).debug is False
        assert parse(["--debug", *command]).debug is True
        assert parse([*command, "--debug"]).debug is True


def test_a_constructor_that_raises_is_named_with_its_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_init.py").write_text(
        "class Plugin:\n    def __init__(self):\n        raise ValueError('no')\n\n"
        "    def clsim_setup(self):\n        pass\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(
        DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: ['bad_init:Plugin']"))
    assert main(["run", "s.yaml", "--out", "out", "--no-progress", "--limit", "20"]) == 1
    record = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]["naive"]
    assert record["error"] == ("plugin 'Plugin' (bad_init:Plugin) could not be created: "
                               "ValueError: no (bad_init.py:3)")
    assert 'bad_init.py", line 3, in __init__' in record["traceback"]
    assert "Traceback" not in capsys.readouterr().err


# -- two packages registering one name ---------------------------------------------------

def _installed(site: Path, dist: str, entry_points: str) -> None:
    """A distribution as pip leaves it: NAME-0.1.dist-info with METADATA and
    entry_points.txt, found through the path like any installed package."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[clsim.plugins]\n{entry_points}\n")


REPLAY_SCENARIO = DIGITS_SCENARIO.replace(
    "    plugins: [naive]\n",
    "    budget: 1000000\n    plugins:\n      - REF: {selection: herding}\n")


def test_two_packages_registering_one_name_are_refused_naming_both(tmp_path):
    site = tmp_path / "site"
    _installed(site, "clsim-replay", "replay = clsim_replay_mod:ReplayPlugin")
    (site / "clsim_replay_mod.py").write_text(
        "class ReplayPlugin:\n    \"\"\"Mine.\"\"\"\n\n    def clsim_after_batch(self):\n"
        "        pass\n")
    # the same target under one name twice is no clash
    _installed(site, "naive-again", "naive = clsim_plugins.naive:NaivePlugin")
    env = {"PYTHONPATH": str(site)}
    by_name = tmp_path / "by_name.yaml"
    by_name.write_text(REPLAY_SCENARIO.replace("REF", "replay"))
    proc = run_cli("validate", str(by_name), env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (f"clsim: error: {by_name}:11: strategies.naive.plugins[0].replay: plugin name "
            "'replay' is registered by 2 installed distributions: ") in proc.stderr
    for claim in ("clsim (clsim_plugins.replay:ReplayPlugin)",
                  "clsim-replay (clsim_replay_mod:ReplayPlugin)",
                  "name the one you mean by its dotted path module:Class"):
        assert claim in proc.stderr, proc.stderr
    # the dotted path of either still works
    by_path = tmp_path / "by_path.yaml"
    by_path.write_text(REPLAY_SCENARIO.replace("REF", "clsim_plugins.replay:ReplayPlugin"))
    proc = run_cli("validate", str(by_path), env=env)
    assert proc.returncode == 0, proc.stderr
    listing = run_cli("list", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "  replay           CLASH: plugin name 'replay' is registered by 2" in listing.stdout
    assert "  naive            " in listing.stdout and "naive            CLASH" not in \
        listing.stdout
    proc = run_cli("new-plugin", "replay", "--dir", str(tmp_path), env=env)
    assert proc.returncode == 2 and "already registered" in proc.stderr, proc.stderr


def test_new_plugin_refuses_a_registered_name(tmp_path, capsys):
    assert main(["new-plugin", "replay", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == ("clsim: error: a plugin named 'replay' is already registered, by clsim "
                   "(clsim_plugins.replay:ReplayPlugin); a second package registering "
                   "'replay' would make every scenario naming it ambiguous; choose another "
                   "name, e.g. 'my_replay' ('clsim list' shows the registered names)\n")
    assert not (tmp_path / "clsim-replay").exists()


# -- validate checks the hooks -----------------------------------------------------------

def test_validate_catches_a_misspelt_hook_as_a_run_would(tmp_path, monkeypatch, capsys):
    (tmp_path / "typo_plugin.py").write_text(
        "class Typo:\n    def clsim_after_bach(self, batch):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "s.yaml"
    path.write_text(DIGITS_SCENARIO.replace("plugins: [naive]",
                                            "plugins: [naive, 'typo_plugin:Typo']"))
    check = ("plugin 'Typo' (typo_plugin:Typo) defines 'clsim_after_bach', which is not a "
             "clsim hook; did you mean 'clsim_after_batch'? (hooks are listed in "
             "clsim/hookspecs.py)")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == f"clsim: error: strategy 'naive': {check}\n"
    # the same check, from the same code, as a run's start-up
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    capsys.readouterr()
    record = json.loads((tmp_path / "out" / "summary.json").read_text())["strategies"]
    assert record["naive"]["error"] == check


# -- the scaffold ------------------------------------------------------------------------

def test_the_scaffold_writes_docstrings_to_fill_in_under_any_name(tmp_path, capsys):
    assert main(["new-plugin", "freeze_after_first", "--dir", str(tmp_path)]) == 0
    source = (tmp_path / "clsim-freeze_after_first" / "clsim_freeze_after_first" /
              "plugin.py").read_text()
    assert "Pull the weights" not in source and "This example pulls" not in source
    tree = ast.parse(source)
    plugin = next(node for node in tree.body if isinstance(node, ast.ClassDef)
                  and node.name == "FreezeAfterFirstPlugin")
    assert ast.get_docstring(plugin).splitlines()[0] == (
        "Edit me: one line on what freeze_after_first does ('clsim list' shows this line).")
    assert ast.get_docstring(tree).startswith("FreezeAfterFirstPlugin: a clsim strategy "
                                              "plugin. Edit me")


# -- scenario names ----------------------------------------------------------------------

def test_a_misspelt_scenario_name_gets_the_closest_and_no_long_list(capsys):
    assert main(["run", "split_mnst"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clsim: error: no scenario file 'split_mnst', and no bundled "
                          "scenario of that name; did you mean 'split_mnist'? (bundled: ")
    assert err.endswith(" scenarios, listed by 'clsim list')\n") and err.count("\n") == 1
    assert "quickstart" not in err  # the names are not all listed


def test_a_failing_cell_of_compare_keeps_its_traceback_and_debug_prints_it(tmp_path):
    """clsim compare records a plugin's fault as clsim run does: the one line in the cell's
    error, the traceback beside it in cells.jsonl, printed with --debug."""
    grid = THREE_STRATEGIES.replace("  first:\n    plugins: [naive]\n", "").replace(
        "  last:\n    plugins: [naive]\n", "") + "compare:\n  budgets: ['1MB']\n  seeds: [0]\n"
    (tmp_path / "my_plugin.py").write_text(RAISES, encoding="utf-8")
    (tmp_path / "g.yaml").write_text(grid, encoding="utf-8")
    proc = run_cli("compare", "g.yaml", "--out", "out", "--no-progress", "--executor",
                   "inline", "--debug", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").open()]
    assert record["status"] == "failed" and record["error"] == MESSAGE
    plugin_frame = f'my_plugin.py", line {RAISE_LINE}, in clsim_after_experience'
    assert plugin_frame in record["traceback"]
    assert plugin_frame in proc.stderr


def test_compare_keeps_a_constructor_faults_traceback_and_every_fault(tmp_path):
    """A plugin failing as it is created (before the strategy's run), and one failing in
    two hooks: each cell keeps every traceback, as clsim run does."""
    plugins = RAISES + '''

class BadInit:
    def __init__(self):
        raise ValueError("no")

    def clsim_after_batch(self):
        pass


class TwoFaults:
    def clsim_setup(self):
        raise KeyError("first")

    def clsim_teardown(self):
        raise RuntimeError("second")
'''
    grid = THREE_STRATEGIES.replace("  first:\n    plugins: [naive]\n", "").replace(
        "  last:\n    plugins: [naive]\n", "").replace("my_plugin:Raises", "my_plugin:BadInit")
    grid += "  two:\n    plugins: [naive, 'my_plugin:TwoFaults']\n"
    grid += "compare:\n  budgets: ['1MB']\n  seeds: [0]\n"
    (tmp_path / "my_plugin.py").write_text(plugins, encoding="utf-8")
    (tmp_path / "g.yaml").write_text(grid, encoding="utf-8")
    proc = run_cli("compare", "g.yaml", "--out", "out", "--no-progress", "--executor",
                   "inline", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr
    records = {r["strategy"]: r for r in
               (json.loads(line) for line in (tmp_path / "out" / "cells.jsonl").open())}
    assert 'in __init__\n    raise ValueError("no")' in records["s"]["traceback"]
    two = records["two"]["traceback"]
    assert "KeyError: 'first'" in two and "RuntimeError: second" in two
