"""Hostile scenario and hierarchy YAML: every value costs bounded work, a file that is no
regular file is refused before it is opened, merge keys are plain data, and every
message quoting a user value stays short. Anything that could hang runs in a real
process whose timeout turns a hang into a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DIGITS_SCENARIO, REPO_ROOT

from clsim.cli import main
from clsim.config import load_scenario, parse_scenario
from clsim.errors import ConfigError
from clsim.models import MLPOptions, build_model
from clsim.validation import ALIAS_LIMIT, short_repr

HANG = 120  # seconds: only turns a hang into a failure; each call takes about one


def _clsim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clsim.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=HANG)


def _refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, source="s.yaml")
    return info.value


def _bomb(name: str, levels: int = 9) -> list[str]:
    """Flow-style anchors name0..: nine of the previous each (9^levels values expanded)."""
    items = [f"&{name}0 [" + ", ".join(["1"] * 9) + "]"]
    items += [f"&{name}{i} [" + ", ".join([f"*{name}{i - 1}"] * 9) + "]"
              for i in range(1, levels)]
    return items


# ------------------------------------------------------------------ alias bombs


BOMB_PLACES = {
    # where the alias of the whole bomb is used -> the scenario text
    "seed": DIGITS_SCENARIO.replace("seed: 0", "seed: [" + ", ".join(_bomb("b")) + "]"),
    "stream.class_order": DIGITS_SCENARIO.replace(
        "n_experiences: 5}", "n_experiences: 5, class_order: [" + ", ".join(_bomb("b")) + "]}"),
    "plugin option": DIGITS_SCENARIO.replace(
        "plugins: [naive]", "plugins: [{replay: {capacity: [" + ", ".join(_bomb("b")) + "]}}]"),
    "compare.budgets": DIGITS_SCENARIO + "compare: {budgets: [" + ", ".join(_bomb("b")) + "]}\n",
}


@pytest.mark.parametrize("place", sorted(BOMB_PLACES))
def test_an_alias_bomb_in_a_typed_key_is_refused_through_a_process(place, tmp_path):
    """A few hundred bytes that expand to 9^9 values: one message naming file, line and
    key path of the alias, never a hang (a real process, killed if it hangs)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB_PLACES[place], encoding="utf-8")
    proc = _clsim("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"clsim: error: {path}:"), proc.stderr
    assert f"aliases repeat more than {ALIAS_LIMIT:,} values in this document" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 400


def test_the_alias_limit_counts_each_node_once_and_keeps_legitimate_reuse():
    """Reusing a class order and a strategy body through aliases is fine; the count is of
    repeated values, so exactly the limit passes and one more is refused."""
    reuse = DIGITS_SCENARIO.replace(
        "n_experiences: 5}", "n_experiences: 5, class_order: &order [9, 8, 7, 6, 5, 4, 3, 2, "
        "1, 0]}").replace("  naive:\n    plugins: [naive]\n",
                          "  naive: &body\n    plugins: [naive]\n  again: *body\n")
    scenario = parse_scenario(reuse + "compare: {budgets: [1KB], seeds: [0]}\n")
    assert list(scenario.strategies) == ["naive", "again"]
    under = "a: &a [" + ", ".join(["1"] * (ALIAS_LIMIT - 1)) + "]\nb: *a\n"
    assert "unknown key 'a'" in str(_refused(under))  # ALIAS_LIMIT values repeated: allowed
    over = under.replace("[1, ", "[1, 1, ", 1)
    assert "aliases repeat more than 100,000" in str(_refused(over))


def test_an_alias_inside_the_value_it_names_is_refused_where_it_is_used():
    err = _refused(DIGITS_SCENARIO.replace("data: {dataset: digits}",
                                           "data: &d {dataset: digits, root: [*d]}"))
    assert (err.line, err.key_path) == (3, "data.root[0]")
    assert "the alias *d is used inside the value it names" in str(err)


def test_a_hierarchy_file_alias_bomb_is_refused_through_a_process(tmp_path):
    (tmp_path / "tree.yaml").write_text(
        "levels: [parity, digit]\nbomb: [" + ", ".join(_bomb("t")) + "]\n"
        "tree: {even: [0, 2, 4, 6, 8], odd: [1, 3, 5, 7, 9]}\n", encoding="utf-8")
    scenario = tmp_path / "s.yaml"
    scenario.write_text(_hierarchical("tree.yaml"), encoding="utf-8")
    proc = _clsim("validate", str(scenario), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"s.yaml:4: stream.hierarchy: hierarchy file {tmp_path}/tree.yaml:2: bomb[5][0]: " \
        "aliases repeat more than 100,000 values" in proc.stderr


def _hierarchical(hierarchy: str) -> str:
    return DIGITS_SCENARIO.replace(
        "stream: {type: class_incremental, n_experiences: 5}",
        f"stream: {{type: hierarchical, hierarchy: {hierarchy}}}").replace(
        "batch_size: 64", "batch_size: 16")


# ------------------------------------------------------------------ bounded messages


def _shared_nest(levels: int) -> list:
    """9^levels leaves held in a few hundred objects (what an alias bomb constructs)."""
    node: list = [1] * 9
    for _ in range(levels):
        node = [node] * 9
    return node


def test_short_repr_costs_bounded_work_whatever_the_value():
    """Run in a fresh process: a repr() of the whole value would never return."""
    code = (
        "from clsim.validation import short_repr\n"
        "node = [1] * 9\n"
        "for _ in range(9): node = [node] * 9\n"
        "loop = [1]; loop.append(loop)\n"
        "values = [node, {str(i): node for i in range(10**5)}, 'x' * 10**8, 7 ** 10**6, "
        "b'y' * 10**8, loop, {1, 2, 3}]\n"
        "print(max(len(short_repr(v)) for v in values))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=HANG, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) <= 60


def test_short_repr_shows_the_start_of_each_kind_of_value():
    assert short_repr(_shared_nest(3)).startswith("[[[[...], [...], [...]")
    assert short_repr("x" * 10**6) == "'" + "x" * 22 + "..." + "x" * 23 + "'"
    assert short_repr(7 ** 10**5) == "<an integer of 280736 bits>"
    assert short_repr({"b": 1, "a": 2}) == "{'b': 1, 'a': 2}"  # the user's order
    assert short_repr("three") == "'three'"


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("name: tiny", "name: NAME", "name"),
        ("name: tiny", "name: tiny\ndescription: NAME", "description"),
        ("  naive:\n", "  ? NAME\n  :\n", "strategies."),
        ("plugins: [naive]", "plugins: [NAME]", "strategies.naive.plugins[0]"),
        ("dataset: digits", "dataset: NAME", "data.dataset"),
        ("name: mlp", "name: NAME", "model.name"),
        ("type: class_incremental", "type: NAME", "stream.type"),
        ("seed: 0", "seed: 0\ndevice: NAME", "device"),
        ("seed: 0", "seed: NAME", "seed"),
        ("seed: 0", "seed: 0\n? NAME\n: 1", ""),
        ("plugins: [naive]", "plugins: [{replay: {? NAME\n : 1}}]", "strategies.naive"),
        ("name: sgd", "name: NAME", "training.optimizer.name"),
    ],
)
def test_a_megabyte_value_is_quoted_in_a_few_characters(old, new, key):
    """A pasted blob in any key: the message names the key and stays one short line."""
    err = _refused(DIGITS_SCENARIO.replace(old, new.replace("NAME", "Q" * 10**6)))
    text = str(err)
    assert len(text) < 600 and "\n" not in text, text[:2000]
    assert text.startswith(f"s.yaml:{err.line}: {key}"), text


# ------------------------------------------------------------------ names and bounds


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("name: tiny", 'name: "tiny\\nrun"', "expected one line of printable characters"),
        ("name: tiny", 'name: "tiny\\trun"', "which holds the character '\\t'"),
        ("name: tiny", "name: " + "n" * 201, "expected at most 200 characters; got 201"),
        ("  naive:\n", "  " + "s" * 201 + ":\n", "a strategy name has at most 200 characters"),
        ("name: tiny", "name: tiny\ndescription: " + "d" * 4001,
         "expected at most 4,000 characters; got 4,001"),
        ("epochs: 1", "epochs: 1000000000000", "expected an integer >= 1 and <= 10000"),
        ("hidden: [32]", "hidden: [" + ", ".join(["4"] * 1001) + "]",
         "expected at most 1,000 item(s); got 1,001"),
        ("hidden: [32]", "hidden: [1000001]", "expected an integer >= 1 and <= 1000000"),
        ("hidden: [32]", "hidden: [32], dropout: 1", "expected a number >= 0.0 and < 1.0"),
        ("name: mlp, hidden: [32]", "name: resnet, depth: 2006", "<= 2000; got 2006"),
        ("name: mlp, hidden: [32]", "name: convnet2, channels: 1000001", "<= 1000000"),
        ("seed: 0", "seed: 0\nthreads: 1025", "expected an integer >= 1 and <= 1024"),
        ("seed: 0", "seed: 0\ncompare: {budgets: [1KB], seeds: [9223372036854775808]}",
         "expected an integer >= 0 and <= 9223372036854775807"),
        ("plugins: [naive]", "plugins: [" + "p" * 501 + "]",
         "a plugin name (or package.module:Class) has at most 500 characters"),
    ],
)
def test_values_past_their_bounds_are_refused_with_the_bound(old, new, fragment):
    assert fragment in str(_refused(DIGITS_SCENARIO.replace(old, new)))


def test_values_at_their_bounds_load():
    text = (DIGITS_SCENARIO.replace("name: tiny", "name: " + "n" * 200)
            .replace("epochs: 1", "epochs: 10000")
            .replace("hidden: [32]", "hidden: [" + ", ".join(["4"] * 999) + ", 1000000]")
            .replace("  naive:\n", "  " + "s" * 200 + ":\n")
            .replace("seed: 0", "seed: 0\nthreads: 1024\ndescription: 'two\\nlines'\n"
                     "compare: {budgets: [1KB], seeds: [0, 9223372036854775807]}"))
    scenario = parse_scenario(text)
    assert scenario.training.epochs == 10_000
    assert len(scenario.model.options.hidden) == 1000
    assert scenario.compare.seeds == [0, 2**63 - 1]


def test_model_builders_keep_the_bounds_for_plain_python_callers():
    with pytest.raises(ValueError, match="lists at most 1,000 layers"):
        build_model("mlp", (64,), 10, MLPOptions(hidden=[1] * 1001))
    with pytest.raises(ValueError, match="ints from 1 to 1,000,000. Got \\[10000000\\]"):
        build_model("mlp", (64,), 10, MLPOptions(hidden=[10**7]))


# ------------------------------------------------------------------ merge keys


MERGED = DIGITS_SCENARIO.replace(
    "  naive:\n    plugins: [naive]\n",
    "  replay: &replay\n    budget: 48KB\n    strict: true\n    plugins: [replay]\n"
    "  lax:\n    <<: *replay\n    strict: false\n",
)


def test_a_merge_key_merges_and_a_written_key_wins():
    scenario = parse_scenario(MERGED)
    lax, replay = scenario.strategies["lax"], scenario.strategies["replay"]
    assert (lax.strict, replay.strict) == (False, True)
    assert lax.budget.bytes == replay.budget.bytes == 48 * 1024
    assert [p.ref for p in lax.plugins] == ["replay"]


def test_an_earlier_merged_mapping_wins_over_a_later_one_whatever_the_key():
    """YAML's rule; PyYAML alone lets the later one win for keys that are not short."""
    text = DIGITS_SCENARIO.replace("  naive:\n    plugins: [naive]\n", (
        "  first: &first\n    plugins: [naive]\n    budget: 1KB\n"
        "  second: &second\n    plugins: [replay]\n    budget: 2KB\n    strict: true\n"
        "  both:\n    <<: [*first, *second]\n"))
    both = parse_scenario(text).strategies["both"]
    assert ([p.ref for p in both.plugins], both.budget.bytes, both.strict) == \
        (["naive"], 1024, True)


def test_a_merged_value_is_reported_at_the_line_it_is_written_on():
    text = MERGED.replace("budget: 48KB", "budget: -1KB").replace(
        "  replay: &replay\n", "  lax0: {plugins: [naive]}\n  replay: &replay\n")
    err = _refused(text.replace("  lax:\n    <<: *replay\n", "  lax:\n    <<: *replay\n"))
    assert (err.key_path, err.line) == ("strategies.replay.budget", 10)


def test_a_key_written_twice_beside_a_merge_is_still_a_duplicate():
    err = _refused(MERGED + "    strict: true\n")
    assert (err.key_path, err.line) == ("strategies.lax.strict", 15)
    assert "duplicate key 'strict'" in str(err)
    err = _refused(MERGED.replace("    strict: false\n", "    <<: *replay\n"))
    assert "duplicate key '<<'" in str(err)


def test_a_merge_of_something_else_than_mappings_is_refused():
    err = _refused(MERGED.replace("<<: *replay", "<<: [*replay, 3]"))
    assert err.key_path == "strategies.lax.<<" and "takes a mapping" in str(err)


# ------------------------------------------------------------------ files that are no files


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_named_pipe_as_scenario_is_refused_before_it_is_opened(command, tmp_path):
    """Opening a FIFO with no writer blocks forever: a real one, in a real process."""
    os.mkfifo(tmp_path / "pipe.yaml")
    proc = _clsim(command, str(tmp_path / "pipe.yaml"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"clsim: error: scenario file '{tmp_path}/pipe.yaml' is a named " \
        "pipe (FIFO); expected a regular file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.yaml"]  # no runs/ folder


def test_dev_zero_as_scenario_is_refused_before_it_is_read(tmp_path):
    proc = _clsim("validate", "/dev/zero", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "scenario file '/dev/zero' is a character device; expected a regular file" \
        in proc.stderr


def test_a_symlink_loop_as_scenario_says_so(tmp_path):
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    with pytest.raises(ConfigError, match="'.*loop.yaml' is a symbolic link loop"):
        load_scenario(tmp_path / "loop.yaml")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda path: os.mkfifo(path), "is a named pipe (FIFO); expected a regular file"),
        (lambda path: path.symlink_to("/dev/zero"), "is a character device"),
        (lambda path: path.symlink_to(path.name), "is a symbolic link loop"),
    ],
    ids=["fifo", "dev_zero", "symlink_loop"],
)
def test_a_hierarchy_file_that_is_no_regular_file_is_refused(make, fragment, tmp_path):
    make(tmp_path / "tree.yaml")
    scenario = tmp_path / "s.yaml"
    scenario.write_text(_hierarchical("tree.yaml"), encoding="utf-8")
    proc = _clsim("validate", str(scenario), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"clsim: error: {scenario}:4: stream.hierarchy: hierarchy "
                                  f"file '{tmp_path}/tree.yaml' {fragment}"), proc.stderr


OPTION_FAULTS = '''
from dataclasses import dataclass


class Boom(BaseException):
    pass


@dataclass
class RaisingOptions:
    lam: float = 1.0

    def __post_init__(self):
        raise {error}


class Raising:
    """Options whose own code raises something else than a ValueError."""

    Options = RaisingOptions

    def __init__(self, options):
        self.options = options

    def clsim_setup(self, ctx):
        pass


@dataclass
class OddOptions:
    when: complex = 0j


class OddType:
    """Options with a field type clsim cannot check from YAML."""

    Options = OddOptions

    def __init__(self, options):
        pass

    def clsim_setup(self, ctx):
        pass
'''


@pytest.mark.parametrize("error", ["RuntimeError('no')", "SystemExit(0)", "Boom('x')",
                                   "KeyboardInterrupt()"])
def test_a_plugins_options_raising_anything_is_named_at_its_key(error, tmp_path, monkeypatch,
                                                                capsys):
    """A plugin's Options dataclass runs its author's code while the YAML is read: what it
    raises (a BaseException too, and a KeyboardInterrupt that is not the user's Ctrl-C) is
    an error at the plugin's key path, exit 2, not a crash."""
    module = f"option_faults_{error.partition('(')[0].lower()}"  # a fresh module per case
    (tmp_path / f"{module}.py").write_text(OPTION_FAULTS.format(error=error))
    monkeypatch.syspath_prepend(str(tmp_path))
    scenario = tmp_path / "s.yaml"
    scenario.write_text(DIGITS_SCENARIO.replace(
        "plugins: [naive]", f"plugins: [naive, {{{module}:Raising: {{lam: 2}}}}]"))
    assert main(["validate", str(scenario)]) == 2
    err = capsys.readouterr().err
    assert f"s.yaml:9: strategies.naive.plugins[1].{module}:Raising: the options of plugin " \
        f"'{module}:Raising' ({module}:RaisingOptions) could not be built: " in err, err
    scenario.write_text(DIGITS_SCENARIO.replace(
        "plugins: [naive]", f"plugins: [naive, {{{module}:OddType: {{when: 1}}}}]"))
    assert main(["validate", str(scenario)]) == 2
    assert "cannot check values of type <class 'complex'>" in capsys.readouterr().err
