"""The clsim command as a user meets it: exit codes, one-paragraph errors, results on disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import DIGITS_SCENARIO, REPO_ROOT, run_cli


def write(tmp_path, text: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """Non-zero exit, a 'clsim: error:' message holding each fragment, and no traceback."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "clsim: error:" in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "out"
    proc = run_cli("run", "quickstart", "--out", str(out), "--no-progress")
    return proc, out


def test_quickstart_prints_the_table(quickstart_run):
    proc, _ = quickstart_run
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header[:3] == ["strategy", "final", "acc"]
    for column in ("peak held", "kept between", "budget", "over budget", "avg inc acc"):
        assert column in proc.stdout.splitlines()[0]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[2:4]}
    assert set(rows) == {"naive", "replay"}


def test_quickstart_results_folder(quickstart_run):
    _, out = quickstart_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strategies"]) == {"naive", "replay"}
    replay = summary["strategies"]["replay"]
    for key in (
        "accuracy_matrix",
        "final_accuracy",
        "average_incremental_accuracy",
        "forgetting",
        "budget_bytes",
        "ledger",
        "peak_bytes",
        "over_budget",
        "compute",
        "wall_seconds",
    ):
        assert key in replay
    # what the strategy computed, counted (clsim.compute): training, replay's work, tests
    assert replay["compute"]["flops_total"] == sum(replay["compute"]["parts"].values()) > 0
    assert replay["compute"]["steps"] > 0
    assert replay["budget_bytes"] == 48 * 1024
    assert replay["peak_bytes"] <= replay["budget_bytes"] and not replay["over_budget"]
    assert len(replay["accuracy_matrix"]) == 5
    # three readings per experience: start, end of training, end (kept between)
    assert [r["point"] for r in replay["ledger"]] == ["start", "trained", "end"] * 5
    assert summary["config"]["strategies"]["replay"]["budget"] == "48KB"
    assert len(summary["class_order"]) == 10
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    ends = [e for e in events if e["event"] == "experience_end" and e["strategy"] == "replay"]
    assert [e["seen_accuracy"] for e in ends] == pytest.approx(replay["seen_accuracy"])


def test_quickstart_tensorboard_event_files_are_real(quickstart_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = quickstart_run
    summary = json.loads((out / "summary.json").read_text())
    for name in ("naive", "replay"):
        acc = EventAccumulator(str(out / "tensorboard" / name))
        acc.Reload()
        seen = acc.Scalars("accuracy/seen")
        assert [e.step for e in seen] == [0, 1, 2, 3, 4]
        expected = summary["strategies"][name]["seen_accuracy"]
        assert [e.value for e in seen] == pytest.approx(expected, rel=1e-6)
        total = acc.Scalars("memory/total_bytes")
        assert [int(e.value) for e in total] == [  # logged at each experience's end
            r["total_bytes"] for r in summary["strategies"][name]["ledger"] if r["point"] == "end"
        ]


def test_out_folder_with_results_is_never_overwritten(quickstart_run):
    _, out = quickstart_run
    before = (out / "summary.json").read_bytes()
    proc = run_cli("run", "quickstart", "--out", str(out), "--no-progress")
    assert_clean_failure(proc, 2, "already holds results")
    assert (out / "summary.json").read_bytes() == before


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ("seed: 0", "sead: 0", ["s.yaml:2", "unknown key 'sead'", "did you mean 'seed'?"]),
        ("epochs: 1", "epochs: many", ["training.epochs", "expected an integer"]),
        ("plugins: [naive]", "plugins: [navie]", ["strategies.naive.plugins[0]", "unknown plugin"]),
        ("{dataset: digits}", "{dataset: npz, path: missing.npz}", ["missing.npz"]),
        ("{dataset: digits}", "{dataset: mnist, root: empty}", ["train-images-idx3-ubyte"]),
    ],
    ids=["unknown-key", "wrong-type", "unknown-plugin", "missing-npz", "missing-mnist"],
)
def test_bad_scenarios_fail_cleanly(tmp_path, old, new, fragments):
    (tmp_path / "empty" / "mnist").mkdir(parents=True)
    path = write(tmp_path, DIGITS_SCENARIO.replace(old, new))
    proc = run_cli("run", str(path), "--out", str(tmp_path / "o"), "--no-progress")
    assert_clean_failure(proc, 2, *fragments)
    assert not (tmp_path / "o" / "summary.json").exists()


def test_validate_reports_the_same_errors(tmp_path):
    path = write(tmp_path, DIGITS_SCENARIO.replace("epochs: 1", "epochs: many"))
    assert_clean_failure(run_cli("validate", str(path)), 2, "s.yaml:6", "training.epochs")


def test_usage_errors_exit_2():
    proc = run_cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = run_cli("run", "quickstart", "--seed", "-3")
    assert proc.returncode == 2 and "expected a seed: an integer from 0 to 2**63 - 1" in proc.stderr


def test_unknown_bundled_scenario_lists_the_bundled_ones():
    assert_clean_failure(run_cli("run", "quickstrat"), 2, "no bundled scenario", "quickstart")


def test_validate_ok(tmp_path):
    proc = run_cli("validate", str(write(tmp_path, DIGITS_SCENARIO)))
    assert proc.returncode == 0
    assert "ok" in proc.stdout and "5 experiences" in proc.stdout


def test_list_shows_plugins_options_and_scenarios():
    proc = run_cli("list")
    assert proc.returncode == 0, proc.stderr
    for fragment in (
        "naive",
        "joint",
        "replay",
        "selection: one of 'reservoir'",
        "from clsim",
        "quickstart",
        "split_mnist",
        "resnet32",
        "digits",
    ):
        assert fragment in proc.stdout


LOOP = "(experiences: the standard loop trains them)"


def test_list_order_follows_the_yaml_and_names_who_trains(tmp_path):
    text = DIGITS_SCENARIO.replace(
        "plugins: [naive]", "plugins: [naive, {replay: {capacity: 5}}, joint]"
    ) + "  means:\n    plugins: [nmc]\n"
    path = write(tmp_path, text)
    proc = run_cli("list", "--order", "clsim_after_batch", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"naive: replay  {LOOP}",
        "means: (no plugin implements it)  (experiences: 'nmc' owns those it learns itself "
        "(clsim_train_experience); the standard loop trains the others)",
    ]
    proc = run_cli("list", "--order", "clsim_after_bach", str(path))
    assert_clean_failure(proc, 2, "unknown hook 'clsim_after_bach'")


def test_list_order_all_prints_every_hook_in_the_order_a_run_fires_them(tmp_path):
    from clsim.hookspecs import RUN_ORDER
    from clsim.plugin_manager import HOOK_NAMES

    assert sorted(RUN_ORDER) == sorted(HOOK_NAMES)  # every hook of hookspecs, once
    text = DIGITS_SCENARIO.replace(
        "plugins: [naive]", "plugins: [{replay: {capacity: 5}}, joint, "
        "{language_head: {encoder: random_fallback}}]"
    )
    proc = run_cli("list", "--order", "all", str(write(tmp_path, text)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"naive:  {LOOP}",
        "  clsim_setup              language_head -> replay",  # tryfirst: the head first
        "  clsim_size_stores        replay",
        "  clsim_plan_experience    joint",
        "  clsim_before_batch       replay",
        "  clsim_after_batch        replay",
        "  clsim_after_experience   replay -> language_head",
        "  clsim_predict            replay",
    ]


def test_list_order_names_a_refused_strategy(tmp_path):
    text = DIGITS_SCENARIO + "  bad:\n    plugins: [nmc, {replay: {capacity: 5}}]\n"
    proc = run_cli("list", "--order", "clsim_before_batch", str(write(tmp_path, text)))
    assert proc.stdout.splitlines() == [f"naive: (no plugin implements it)  {LOOP}",
                                        "bad: refused at start-up"]
    assert_clean_failure(proc, 2, "strategy 'bad': plugin 'nmc' owns the training",
                         "plugin 'replay' (clsim_before_batch, clsim_after_batch)")


def test_a_failing_strategy_keeps_the_others_results(tmp_path):
    text = DIGITS_SCENARIO + "  tiny_replay:\n    budget: 10\n    plugins: [replay]\n"
    out = tmp_path / "out"
    proc = run_cli("run", str(write(tmp_path, text)), "--out", str(out), "--no-progress")
    assert proc.returncode == 1
    assert "minimum budget" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategies"]["naive"]["status"] == "ok"
    assert summary["strategies"]["tiny_replay"]["status"] == "failed"
    assert "replay" in summary["strategies"]["tiny_replay"]["error"]


def test_new_plugin_scaffold_installs_and_runs_by_entry_point_and_dotted_path(tmp_path):
    """The tutorial's path: scaffold, install, use by name, use by dotted path, its test."""
    proc = run_cli("new-plugin", "anchor_pull", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    package = tmp_path / "clsim-anchor_pull"
    site = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(package),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    env = {"PYTHONPATH": str(site)}
    listing = run_cli("list", env=env)
    assert "anchor_pull" in listing.stdout and "from clsim-anchor_pull" in listing.stdout
    quickstart = (REPO_ROOT / "scenarios" / "quickstart.yaml").read_text(encoding="utf-8")
    for ref in ("anchor_pull", "clsim_anchor_pull.plugin:AnchorPullPlugin"):
        # the quickstart with the plugin's strategy beside its own (two models: the
        # weights and the anchor)
        text = quickstart + f"  anchored:\n    budget: 2 models\n    plugins: ['{ref}']\n"
        path = write(tmp_path, text)
        plugin_name = ref.rpartition(":")[2] or ref  # a dotted path is named by its class
        order = run_cli("list", "--order", "all", str(path), env=env)
        assert order.returncode == 0, order.stderr
        assert f"  clsim_loss               {plugin_name}" in order.stdout.splitlines()
        out = tmp_path / f"out-{ref.split(':')[0]}"
        proc = run_cli(
            "run", str(path), "--out", str(out), "--no-progress", "--strategy", "anchored",
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        outcome = json.loads((out / "summary.json").read_text())["strategies"]["anchored"]
        parts = outcome["ledger"][-1]["parts"]
        assert parts[f"{plugin_name}.anchor"] == parts["model.parameters"]
        assert not outcome["over_budget"]
        assert outcome["ledger"][-1]["total_bytes"] == 2 * parts["model.parameters"]
    test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        cwd=package,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **env},
        timeout=300,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_scaffold_refuses_bad_names(tmp_path):
    assert_clean_failure(
        run_cli("new-plugin", "My-Plugin", "--dir", str(tmp_path)),
        2,
        "lower-case Python identifier",
    )



def test_thread_and_seed_flags_accept_exactly_what_the_scenario_keys_do(tmp_path):
    """--threads and --seed share their bounds with the YAML keys 'threads' and 'seed'
    (one constant each, in clsim.config); --workers has its own bound."""
    from clsim.bounds import SEED_MAX, THREADS_MAX, WORKERS_MAX
    from clsim.cli import build_parser
    from clsim.config import parse_scenario
    from clsim.errors import ConfigError

    parse = build_parser().parse_args
    args = parse(["compare", "g.yaml", "--threads", str(THREADS_MAX),
                  "--workers", str(WORKERS_MAX)])
    assert (args.threads, args.workers) == (THREADS_MAX, WORKERS_MAX)
    assert parse(["run", "s.yaml", "--seed", str(SEED_MAX)]).seed == SEED_MAX
    for argv in (["compare", "g.yaml", "--threads", str(THREADS_MAX + 1)],
                 ["compare", "g.yaml", "--workers", str(WORKERS_MAX + 1)],
                 ["run", "s.yaml", "--seed", str(SEED_MAX + 1)]):
        with pytest.raises(SystemExit) as stopped:
            parse(argv)
        assert stopped.value.code == 2
    def scenario(seed: int, threads: int):
        return parse_scenario(DIGITS_SCENARIO.replace("seed: 0\n",
                                                      f"seed: {seed}\nthreads: {threads}\n"))

    assert (scenario(SEED_MAX, THREADS_MAX).seed, scenario(0, THREADS_MAX).threads) == (
        SEED_MAX, THREADS_MAX)
    for seed, threads, key in ((SEED_MAX + 1, 1, "seed"), (0, THREADS_MAX + 1, "threads")):
        with pytest.raises(ConfigError, match=f"{key}: "):
            scenario(seed, threads)
