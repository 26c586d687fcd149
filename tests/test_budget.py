"""Memory budgets: the written forms, their byte arithmetic, and the errors for bad ones."""

from __future__ import annotations

import pytest

from clsim.budget import Budget, format_bytes
from clsim.config import parse_scenario
from clsim.errors import ConfigError

MB = 2**20

# MEMO (METHODS.md section 2): a CIFAR ResNet-32 and one 32x32x3 uint8 CIFAR image.
RESNET32_PARAMS = 463_504
RESNET32_BYTES = RESNET32_PARAMS * 4  # float32
CIFAR_SAMPLE_BYTES = 32 * 32 * 3


def resolve(text: object, *, model_bytes: int = 1000, sample_bytes: int = 64) -> int:
    return Budget.parse(text).resolve(model_bytes=model_bytes, sample_bytes=sample_bytes)


# ---------------------------------------------------------------------------
# accepted forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1234, 1234),
        ("1234", 1234),
        ("1234 B", 1234),
        ("7.6MB", round(7.6 * MB)),
        ("500KB", 500 * 2**10),
        ("1GB", 2**30),
        ("1.5 MiB", round(1.5 * MB)),
        ("2 KiB", 2048),
        ("3GiB", 3 * 2**30),
        ("  1KB  ", 1024),
    ],
)
def test_sizes_resolve_to_binary_bytes(text: object, expected: int) -> None:
    """Sizes use binary units (KB = 2^10, MB = 2^20) and fractional sizes round to a byte;
    the model and sample sizes play no part in a pure size."""
    assert resolve(text) == expected
    assert resolve(text, model_bytes=7, sample_bytes=3) == expected
    assert Budget.parse(text) == Budget(bytes=expected, text=str(text).strip())


def test_7_6_mb_is_rounded_to_the_nearest_byte() -> None:
    """7.6 * 2^20 = 7969177.6 is not an integer: the budget is the nearest byte."""
    assert resolve("7.6MB") == 7_969_178


@pytest.mark.parametrize("text", ["7.6mb", "7.6Mb", "7.6mB", "7.6 MB", "7.6 mib", "7.6MiB"])
def test_units_are_case_insensitive(text: str) -> None:
    """Any capitalisation of a unit names the same unit."""
    assert resolve(text) == round(7.6 * MB)


def test_exemplars_resolve_through_the_sample_size() -> None:
    """'N exemplars' is N raw samples of the scenario's dataset, whatever the model."""
    assert resolve("500 exemplars", sample_bytes=3072) == 500 * 3072
    assert resolve("500 exemplars", model_bytes=10**9, sample_bytes=64) == 500 * 64
    assert resolve("1 exemplar", sample_bytes=784) == 784
    assert resolve("500 EXEMPLARS", sample_bytes=3) == 1500
    assert Budget.parse("500 exemplars") == Budget(exemplars=500, text="500 exemplars")


def test_model_resolves_to_the_model_size() -> None:
    """'model' is the strategy's model at setup, whatever the sample size."""
    assert resolve("model", model_bytes=9640, sample_bytes=64) == 9640
    assert resolve("MODEL", model_bytes=9640) == 9640
    assert resolve("model + model", model_bytes=9640) == 2 * 9640
    assert Budget.parse("model") == Budget(models=1, text="model")


@pytest.mark.parametrize("text", ["2 models", "2 model", "2models", "2 MODELS"])
def test_counted_models(text: str) -> None:
    """'2 models' is documented (budget 'model' counts, as 'ten ResNet-32s' in MEMO) and
    must equal 'model + model'."""
    assert Budget.parse(text).models == 2
    assert resolve(text, model_bytes=9640) == resolve("model + model", model_bytes=9640)


def test_sums_add_every_term() -> None:
    """'model + 500 exemplars + 1KB' is the model plus 500 samples plus 1024 bytes."""
    budget = Budget.parse("model + 500 exemplars + 1KB")
    assert budget == Budget(bytes=1024, exemplars=500, models=1, text="model + 500 exemplars + 1KB")
    assert budget.resolve(model_bytes=9640, sample_bytes=64) == 9640 + 500 * 64 + 1024
    assert resolve("1KB + 1KB + 100") == 2048 + 100
    assert resolve("1.5KB+1.5KB") == 3072
    assert resolve("model+10 exemplars", model_bytes=5, sample_bytes=7) == 5 + 70


def test_text_and_str_keep_what_the_user_wrote() -> None:
    """str(budget) is the user's text (stripped, not lower-cased): it appears in results."""
    assert str(Budget.parse("  Model + 500 Exemplars ")) == "Model + 500 Exemplars"
    assert str(Budget.parse(1024)) == "1024"


def test_limit_is_exactly_one_pib() -> None:
    """1 PiB is accepted; one byte more is taken for a typo."""
    assert resolve(2**50) == 2**50
    assert resolve("1048576GB") == 2**50
    with pytest.raises(ValueError, match="1 PiB"):
        Budget.parse(2**50 + 1)


# ---------------------------------------------------------------------------
# the MEMO memory-aligned arithmetic (METHODS.md section 2)
# ---------------------------------------------------------------------------


def test_memo_one_resnet32_is_603_5_cifar_exemplars() -> None:
    """463,504 float32 parameters are 1,854,016 bytes = 603.5 CIFAR exemplars of 3072 bytes."""
    model_bytes = resolve("model", model_bytes=RESNET32_BYTES, sample_bytes=CIFAR_SAMPLE_BYTES)
    assert model_bytes == 1_854_016
    assert round(model_bytes / CIFAR_SAMPLE_BYTES, 1) == 603.5
    # 603 exemplars fit in one model's bytes, 604 do not
    assert resolve("603 exemplars", sample_bytes=CIFAR_SAMPLE_BYTES) <= model_bytes
    assert resolve("604 exemplars", sample_bytes=CIFAR_SAMPLE_BYTES) > model_bytes


def test_memo_7_63_mb_is_one_resnet32_plus_2000_exemplars() -> None:
    """(463504 * 4 + 2000 * 3072) / 2^20 = 7.6275... which the paper prints as 7.63 MB, and a
    '7.63MB' budget is that many bytes to within the 0.005 MB of the rounding."""
    exact = resolve(
        "model + 2000 exemplars", model_bytes=RESNET32_BYTES, sample_bytes=CIFAR_SAMPLE_BYTES
    )
    assert exact == 463_504 * 4 + 2000 * 3072 == 7_998_016
    assert round(exact / MB, 2) == 7.63
    assert abs(resolve("7.63MB") - exact) <= 0.005 * MB
    assert round(resolve("7.63MB") / MB, 2) == 7.63


def test_memo_23_54_mb_is_ten_resnet32s_plus_2000_exemplars() -> None:
    """The largest MEMO budget point: ten ResNet-32s + 2000 exemplars = 23.54 MB."""
    exact = resolve(
        "10 models + 2000 exemplars", model_bytes=RESNET32_BYTES, sample_bytes=CIFAR_SAMPLE_BYTES
    )
    assert exact == 10 * 463_504 * 4 + 2000 * 3072
    assert round(exact / MB, 2) == 23.54


def test_memo_23_54_mb_arithmetic_written_as_a_sum() -> None:
    """The same point written with ten 'model' terms: 24,684,160 bytes = 23.54 MB."""
    text = " + ".join(["model"] * 10) + " + 2000 exemplars"
    exact = resolve(text, model_bytes=RESNET32_BYTES, sample_bytes=CIFAR_SAMPLE_BYTES)
    assert exact == 24_684_160
    assert round(exact / MB, 2) == 23.54


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (-1, "-1"),
        (-5, "-5"),
        ("-5MB", "-5MB"),
        ("abc", "abc"),
        ("5 parsecs", "parsecs"),
        ("", "''"),
        ("   ", "'   '"),
        ("1.5 exemplars", "1.5 exemplars"),
        (True, "True"),
        (False, "False"),
        ([1, 2], "[1, 2]"),
        ({"bytes": 5}, "{'bytes': 5}"),
        (7.5, "7.5"),
        (None, "None"),
        (2**51, str(2**51)),
        ("2000000GB", "2000000GB"),
        ("2000000000000000000 exemplars", "2000000000000000000 exemplars"),
        ("+", "'+'"),
        ("model +", "model +"),
        ("+ model", "+ model"),
        ("1KB ++ 2KB", "1KB ++ 2KB"),
        ("5 MB MB", "5 MB MB"),
        ("exemplars", "exemplars"),
    ],
)
def test_bad_budgets_raise_value_error_naming_the_bad_part(value: object, named: str) -> None:
    """Every malformed budget is a ValueError whose message quotes the offending input."""
    with pytest.raises(ValueError) as info:
        Budget.parse(value)
    assert named in str(info.value)


def test_unknown_unit_lists_the_known_units() -> None:
    """An unknown unit is named, with the units that would have been understood."""
    with pytest.raises(ValueError, match="unknown unit 'parsecs'") as info:
        Budget.parse("5 parsecs")
    for unit in ("KB", "MB", "GB", "exemplars", "model"):
        assert unit in str(info.value)


def test_bad_term_in_a_sum_is_named() -> None:
    """In a sum, the message names the term that cannot be read, not just the whole text."""
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        Budget.parse("model + lots + 1KB")


# ---------------------------------------------------------------------------
# format_bytes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.00 KB"),
        (1536, "1.50 KB"),
        (MB, "1.00 MB"),
        (7_998_016, "7.63 MB"),
        (24_684_160, "23.54 MB"),
        (3 * 2**30, "3.00 GB"),
        (2**50, "1048576.00 GB"),
        (-2048, "-2.00 KB"),
    ],
)
def test_format_bytes(n: int | None, text: str) -> None:
    """Human-readable sizes use the budgets' binary units and two decimals."""
    assert format_bytes(n) == text


def test_format_bytes_round_trips_through_parse() -> None:
    """A formatted size parsed back is within half a unit of the last printed digit."""
    for n in (1536, 7_998_016, 24_684_160, 5 * 2**30 + 12345):
        text = format_bytes(n).replace(" ", "")
        unit = {"KB": 2**10, "MB": MB, "GB": 2**30}[text[-2:]]
        assert abs(resolve(text) - n) <= 0.005 * unit


# ---------------------------------------------------------------------------
# through the scenario config
# ---------------------------------------------------------------------------

SCENARIO = """\
data: {{dataset: digits}}
stream: {{n_experiences: 5}}
model: {{name: mlp, hidden: [32]}}
{top}strategies:
  replay:
    plugins:
      - replay
{strategy}"""


def test_config_error_names_strategy_budget_key_and_line() -> None:
    """A bad strategy budget is a ConfigError naming the file, line 8 (the budget key) and
    the key path strategies.replay.budget, with the parser's reason."""
    text = SCENARIO.format(top="", strategy="    budget: '5 parsecs'\n")
    assert text.splitlines()[7] == "    budget: '5 parsecs'"
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, source="scn.yaml")
    err = info.value
    assert err.key_path == "strategies.replay.budget"
    assert err.line == 8
    assert str(err).startswith("scn.yaml:8: strategies.replay.budget: ")
    assert "unknown unit 'parsecs'" in str(err)


def test_config_error_names_top_level_budget() -> None:
    """The scenario-wide default budget is checked the same way, at key 'budget'."""
    text = SCENARIO.format(top="budget: -5MB\n", strategy="")
    assert text.splitlines()[3] == "budget: -5MB"
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, source="scn.yaml")
    assert info.value.key_path == "budget"
    assert info.value.line == 4
    assert str(info.value).startswith("scn.yaml:4: budget: ")
    assert "-5MB" in str(info.value)


@pytest.mark.parametrize("raw", ["7.5", "true", "[1KB]", "''"])
def test_config_rejects_non_budget_values(raw: str) -> None:
    """A YAML float, boolean, list or empty string is not a budget."""
    text = SCENARIO.format(top="", strategy=f"    budget: {raw}\n")
    with pytest.raises(ConfigError) as info:
        parse_scenario(text)
    assert info.value.key_path == "strategies.replay.budget"
    assert info.value.line == 8


def test_config_budget_is_inherited_and_overridden() -> None:
    """A strategy without its own budget takes the scenario's; its own one wins."""
    text = SCENARIO.format(top="budget: model + 100 exemplars\n", strategy="") + (
        "  small:\n    budget: 1KB\n    plugins: [naive]\n"
    )
    scenario = parse_scenario(text)
    assert scenario.strategies["replay"].budget == Budget.parse("model + 100 exemplars")
    assert scenario.strategies["small"].budget == Budget.parse("1KB")
    assert scenario.to_dict()["strategies"]["small"]["budget"] == "1KB"
