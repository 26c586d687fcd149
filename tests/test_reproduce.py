"""The reproduction registry and `clsim reproduce`: published numbers as a regression guard.

Every target marked ``ci`` in scenarios/reproduce/targets.yaml runs here in full (each
under a minute), on real MNIST: its verdict must be the expected one, and its score must
stay within 0.01 of the value pinned when it was measured, so a change that moves a
published number fails the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clsim.cli import main
from clsim.errors import ConfigError
from clsim.reproduce import (
    NOT_REPRODUCED,
    REPRODUCED,
    Outcome,
    Target,
    TargetSpec,
    default_registry,
    load_targets,
    markdown_table,
    run_target,
    skipped_reason,
)

PIN_TOLERANCE = 0.01
TARGETS = load_targets(default_registry())
CI_TARGETS = [name for name, t in TARGETS.items() if t.spec.ci]


def test_the_registry_holds_the_published_targets_the_issue_names():
    """CLB's split and permuted MNIST targets, and a split CIFAR-10 one marked gpu."""
    assert {"smnist_online_replay", "smnist_gdumb", "smnist_lwf", "pmnist_ewc",
            "smnist_si_task", "pmnist_si", "pmnist_agem"} <= set(TARGETS)
    assert [t.spec.device for n, t in TARGETS.items() if n.startswith("scifar10")] == ["gpu"]
    for target in TARGETS.values():
        assert target.scenario_path.is_file() and target.spec.source
        assert 0 < target.spec.published <= 1
    assert CI_TARGETS, "no target guards CI"
    for name in CI_TARGETS:  # a pinned score must itself pass its verdict
        spec = TARGETS[name].spec
        passes = spec.pinned >= spec.published - spec.tolerance
        assert passes == (spec.expected == REPRODUCED), name


@pytest.mark.parametrize("name", CI_TARGETS)
def test_ci_target_reproduces_and_stays_at_its_pinned_score(name, shared_data_root, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("CLSIM_DATA", str(shared_data_root))
    target = TARGETS[name]
    outcome = run_target(target, tmp_path)
    assert outcome.error is None
    assert outcome.verdict == target.spec.expected, markdown_table([outcome])
    assert abs(outcome.scores[0] - target.spec.pinned) <= PIN_TOLERANCE, (
        f"{name}: {outcome.scores[0]:.4f} moved from the pinned {target.spec.pinned:.4f}")


LONG_TARGETS = [n for n, t in TARGETS.items() if not t.spec.ci and t.spec.device == "cpu"]


@pytest.mark.parametrize("name", LONG_TARGETS)
def test_every_long_target_runs_end_to_end_on_a_few_samples(name, shared_data_root, tmp_path,
                                                            monkeypatch):
    """The targets too long for the suite still build and train (their plugins' setup
    included, which validation does not reach) on 30 samples of each experience."""
    monkeypatch.setenv("CLSIM_DATA", str(shared_data_root))
    outcome = run_target(TARGETS[name], tmp_path, limit=30)
    assert outcome.error is None and outcome.scores[0] is not None
    assert outcome.as_expected and outcome.verdict.startswith("smoke test")


def test_gpu_target_runs_as_a_smoke_test_on_cpu(shared_data_root, tmp_path, monkeypatch,
                                                capsys):
    monkeypatch.setenv("CLSIM_DATA", str(shared_data_root))
    out = tmp_path / "out"
    assert main(["reproduce", "scifar10_er_ace", "--limit", "60", "--out", str(out),
                 "--no-progress"]) == 0, capsys.readouterr().err
    record = json.loads((out / "reproduce.json").read_text())["targets"][0]
    assert record["verdict"] == "smoke test (--limit 60): no verdict"
    assert record["scores"][0] is not None and record["as_expected"]
    assert "| scifar10_er_ace | er_ace | 45.0 |" in (out / "reproduce.md").read_text()


def test_gpu_targets_are_skipped_unless_named_limited_or_on_a_gpu():
    gpu = TARGETS["scifar10_er_ace"]
    assert "marked gpu" in skipped_reason(gpu, named=False, limit=None, cuda=False)
    assert skipped_reason(gpu, named=True, limit=None, cuda=False) is None
    assert skipped_reason(gpu, named=False, limit=10, cuda=False) is None
    assert skipped_reason(gpu, named=False, limit=None, cuda=True) is None
    assert skipped_reason(TARGETS["smnist_gdumb"], named=False, limit=None, cuda=False) is None


def _outcome(scores, expected=REPRODUCED, limit=None, error=None) -> Outcome:
    spec = TargetSpec(scenario="x.yaml", strategy="s", published=0.9, source="src",
                      tolerance=0.03, expected=expected, note="why")
    return Outcome(Target("t", spec, Path("x.yaml")), scores, 1.0, limit, error)


def test_verdict_is_the_mean_over_seeds_against_published_less_tolerance():
    assert _outcome([0.87]).verdict == REPRODUCED  # exactly at the bound
    assert _outcome([0.8699]).verdict == NOT_REPRODUCED
    assert _outcome([0.99]).verdict == REPRODUCED  # above passes, as in CLB
    assert _outcome([0.86, 0.90]).verdict == REPRODUCED  # mean 0.88
    assert _outcome([0.86, None]).verdict == "failed"
    assert _outcome([0.5], limit=10).verdict.startswith("smoke test")
    assert not _outcome([0.5]).as_expected
    assert _outcome([0.5], expected=NOT_REPRODUCED).as_expected
    assert not _outcome([0.95], expected=NOT_REPRODUCED).as_expected
    assert not _outcome([0.95], error="boom").as_expected


def test_the_table_says_when_a_verdict_is_expected_or_not():
    table = markdown_table([_outcome([0.5], expected=NOT_REPRODUCED), _outcome([0.5])],
                           {"gpu_one": "marked gpu"})
    rows = table.splitlines()
    assert len(rows) == 2 + 3
    assert "not reproduced (expected)" in rows[2] and "why" in rows[2]
    assert "not reproduced (expected: reproduced)" in rows[3]
    assert "skipped: marked gpu" in rows[4]


REGISTRY = """\
targets:
  one:
    scenario: {scenario}
    strategy: {strategy}
    published: {published}
    source: here
{extra}"""


def _registry(tmp_path: Path, *, strategy="naive", published="0.5", extra="") -> Path:
    scenario = Path(__file__).parents[1] / "scenarios" / "quickstart.yaml"
    path = tmp_path / "targets.yaml"
    path.write_text(REGISTRY.format(scenario=scenario, strategy=strategy,
                                    published=published, extra=extra))
    return path


@pytest.mark.parametrize("change, key, words", [
    (dict(strategy="naiv"), "targets.one.strategy", "did you mean 'naive'"),
    (dict(published="1.5"), "targets.one.published", "<= 1"),
    (dict(extra="    tolerence: 0.1\n"), "targets.one.tolerence", "did you mean 'tolerance'"),
    (dict(extra="    expected: not reproduced\n"), "targets.one.note", "needs a note"),
    (dict(extra="    ci: true\n"), "targets.one.pinned", "measured here"),
    (dict(extra="    device: tpu\n"), "targets.one.device", "'cpu', 'gpu'"),
])
def test_a_bad_registry_names_file_line_and_key(tmp_path, change, key, words):
    path = _registry(tmp_path, **change)
    with pytest.raises(ConfigError) as info:
        load_targets(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and key in message and words in message


def test_a_failed_run_and_an_unexpected_verdict_exit_1_and_keep_every_row(
        tmp_path, capsys, monkeypatch):
    """Targets run on: one whose data is missing fails (a row saying why), the next one
    misses its number (exit 1); the folder then refuses a second run into it."""
    monkeypatch.delenv("CLSIM_DATA", raising=False)
    scenarios = Path(__file__).parents[1] / "scenarios"
    registry = tmp_path / "targets.yaml"
    registry.write_text(f"""\
targets:
  needs_mnist:
    scenario: {scenarios / "split_mnist.yaml"}
    strategy: naive
    published: 0.2
    source: here
  too_high:
    scenario: {scenarios / "quickstart.yaml"}
    strategy: naive
    published: 0.99
    source: here
""")
    out = tmp_path / "out"
    argv = ["reproduce", "--targets", str(registry), "--out", str(out), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "needs_mnist failed to run" in err
    assert "too_high: the verdict is not the one expected" in err
    records = json.loads((out / "reproduce.json").read_text())["targets"]
    assert [(r["target"], r["verdict"]) for r in records] == [
        ("needs_mnist", "failed"), ("too_high", NOT_REPRODUCED)]
    assert "no data root" in records[0]["error"]
    assert main(argv) == 2
    assert f"--out {out} already holds a reproduce run" in capsys.readouterr().err
    assert len(json.loads((out / "reproduce.json").read_text())["targets"]) == 2  # kept


def test_cli_names_an_unknown_target_and_a_missing_registry(tmp_path, capsys):
    assert main(["reproduce", "smnist_gdum", "--list"]) == 2
    assert "no reproduction target 'smnist_gdum'; did you mean 'smnist_gdumb'?" in \
        capsys.readouterr().err
    assert main(["reproduce", "--targets", str(tmp_path / "none.yaml")]) == 2
    assert "registry of reproduction targets not found" in capsys.readouterr().err
