"""Scenario YAML validation: every mistake names the file, the key path and the line."""

from __future__ import annotations

import pytest
from helpers import DIGITS_SCENARIO

from clsim.config import load_scenario, parse_scenario
from clsim.errors import ConfigError


def error_of(text: str, source: str = "s.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, source=source)
    return info.value


def test_the_digits_scenario_is_valid_and_resolves_defaults():
    scenario = parse_scenario(DIGITS_SCENARIO)
    assert scenario.training.optimizer.lr == 0.1
    assert scenario.training.eval_batch_size == "auto"  # a default from TrainingConfig
    assert scenario.model.options.hidden == [32]
    assert [p.ref for p in scenario.strategies["naive"].plugins] == ["naive"]


def test_unknown_top_level_key_names_line_and_suggests():
    text = DIGITS_SCENARIO.replace("seed: 0", "sead: 0")
    err = error_of(text)
    assert str(err).startswith("s.yaml:2: sead: unknown key 'sead'")
    assert "did you mean 'seed'?" in str(err)


def test_unknown_nested_key_has_full_path():
    text = DIGITS_SCENARIO.replace("batch_size: 64", "batchsize: 64")
    err = error_of(text)
    assert err.key_path == "training.batchsize"
    assert err.line == 6
    assert "did you mean 'batch_size'?" in str(err)


def test_wrong_type_says_expected_and_got():
    err = error_of(DIGITS_SCENARIO.replace("epochs: 1", "epochs: one"))
    assert err.key_path == "training.epochs"
    assert "expected an integer >= 1 and <= 10000; got 'one' (string)" in str(err)


def test_bool_is_not_an_integer():
    err = error_of(DIGITS_SCENARIO.replace("epochs: 1", "epochs: true"))
    assert "got True (boolean)" in str(err)


def test_bounds_are_checked():
    err = error_of(DIGITS_SCENARIO.replace("lr: 0.1", "lr: -0.1"))
    assert err.key_path == "training.optimizer.lr"
    assert "expected a number > 0 and <= 10000.0; got -0.1" in str(err)


def test_literal_typo_suggests_closest_option():
    err = error_of(DIGITS_SCENARIO.replace("name: sgd", "name: sdg"))
    assert "one of 'sgd', 'adam', 'adamw'" in str(err)
    assert "(did you mean 'sgd'?)" in str(err)


def test_unknown_plugin_is_named_with_registered_ones():
    err = error_of(DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: [naiv]"))
    assert err.key_path == "strategies.naive.plugins[0]"
    assert "unknown plugin 'naiv'" in str(err)
    assert "did you mean 'naive'?" in str(err)


def test_plugin_option_typo_names_the_option_path():
    text = DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: [{replay: {selction: herding}}]")
    err = error_of(text)
    assert err.key_path == "strategies.naive.plugins[0].replay.selction"
    assert "did you mean 'selection'?" in str(err)


def test_plugin_option_bad_value():
    text = DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: [{replay: {selection: herd}}]")
    err = error_of(text)
    assert "one of 'reservoir', 'class_balanced', 'herding'" in str(err)
    assert "did you mean 'herding'?" in str(err)


def test_options_for_plugin_without_options_rejected():
    err = error_of(DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: [{naive: {x: 1}}]"))
    assert "takes no options" in str(err)


def test_dotted_path_that_does_not_import():
    err = error_of(DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: ['nope.mod:Cls']"))
    assert "cannot import module 'nope.mod'" in str(err)


def test_a_plugin_module_that_raises_on_import_is_blamed_cleanly(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin_mod.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = error_of(DIGITS_SCENARIO.replace("plugins: [naive]",
                                           "plugins: ['broken_plugin_mod:Cls']"))
    assert "strategies.naive.plugins[0]" in str(err)
    assert "importing module 'broken_plugin_mod' for plugin 'broken_plugin_mod:Cls' raised " \
        "RuntimeError: no GPU here" in str(err)


def test_unknown_model_and_model_option():
    err = error_of(DIGITS_SCENARIO.replace("name: mlp", "name: mpl"))
    assert err.key_path == "model.name" and "did you mean 'mlp'?" in str(err)
    err = error_of(DIGITS_SCENARIO.replace("hidden: [32]", "hiden: [32]"))
    assert err.key_path == "model.hiden"


def test_duplicate_strategy_names_are_an_error():
    text = DIGITS_SCENARIO + "  naive:\n    plugins: [naive]\n"
    err = error_of(text)
    assert "duplicate key 'naive'" in str(err)
    assert err.line == 10


def test_python_object_tags_are_refused():
    err = error_of(
        DIGITS_SCENARIO.replace("seed: 0", "seed: !!python/object/apply:os.system ['echo hi']")
    )
    assert "invalid YAML" in str(err)
    assert "not allowed" in str(err)


def test_syntax_error_gives_line():
    err = error_of("data: {dataset: digits\nstream: [")
    assert str(err).startswith("s.yaml:")
    assert "invalid YAML" in str(err)


def test_empty_and_non_mapping_files():
    assert "the file is empty" in str(error_of(""))
    assert "expected a mapping at the top level" in str(error_of("- a\n- b\n"))


def test_missing_required_section():
    err = error_of("data: {dataset: digits}\n")
    assert "missing required key" in str(err)


def test_stream_needs_a_size():
    err = error_of(DIGITS_SCENARIO.replace("n_experiences: 5", "task_labels: false"))
    assert err.key_path == "stream"
    assert "'n_experiences' or 'increment'" in str(err)


def test_bad_device():
    err = error_of("device: tpu\n" + DIGITS_SCENARIO)
    assert "'device' must be auto, cpu, cuda or cuda:N; got 'tpu'" in str(err)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(DIGITS_SCENARIO.replace("tiny", "caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_scenario(path)


def test_missing_scenario_file(tmp_path):
    with pytest.raises(ConfigError, match="scenario file not found"):
        load_scenario(tmp_path / "nope.yaml")


def test_long_values_are_cut_in_messages():
    err = error_of(DIGITS_SCENARIO.replace("epochs: 1", "epochs: '" + "x" * 500 + "'"))
    assert len(str(err)) < 200


def test_resolved_config_round_trips_to_plain_data():
    import json

    scenario = parse_scenario(
        DIGITS_SCENARIO.replace("plugins: [naive]", "plugins: [{replay: {capacity: 10}}]")
    )
    plain = scenario.to_dict()
    json.dumps(plain)  # serialisable
    assert plain["strategies"]["naive"]["plugins"] == [
        {"replay": {"selection": "reservoir", "capacity": 10, "batch_size_mem": None,
                    "nme": False, "update": "batch"}}
    ]


def test_alias_bombs_and_self_references_are_refused_where_they_are_used():
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10^9 leaves if aliases were expanded
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    err = error_of("\n".join(levels) + "\n")
    assert (err.line, err.key_path) == (5, "a4[7]")  # where the count passes 100,000
    assert "aliases repeat more than 100,000 values in this document (*a3 here repeats " \
        "11,111 values)" in str(err)
    err = error_of("a: &x [*x]\n")
    assert str(err) == "s.yaml:1: a[0]: the alias *x is used inside the value it names, " \
        "so that value would never end"


def test_deep_nesting_is_a_config_error():
    assert "nested too deeply" in str(error_of("a: " + "[" * 5000 + "]" * 5000 + "\n"))


def test_non_string_keys_are_refused_not_merged():
    text = DIGITS_SCENARIO.replace("  naive:\n", "  1:\n")
    err = error_of(text)
    assert err.key_path == "strategies.1" and "keys must be strings; got 1 (integer)" in str(err)


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("name: tiny", "name: ../../escape", "'name' is used in folder names"),
        ("plugins: [naive]", "plugins: [{naive: 0}]", "takes no options; got 0"),
        ("seed: 0", "seed: 18446744073709551616", "expected an integer >= 0 and <= "),
        ("seed: 0", "seed: 0\nthreads: 0", "expected an integer >= 1"),
        ("plugins: [naive]", "plugins: [':Cls']", "cannot import module ''"),
    ],
)
def test_more_bad_values(old, new, fragment):
    assert fragment in str(error_of(DIGITS_SCENARIO.replace(old, new)))
