"""The ``avalanche`` plugin, against the real avalanche-lib (run in .venv-avalanche by
`make test`): Avalanche's strategies hosted in clsim's loop give exactly what Avalanche
gives when run directly, the ledger charges what they keep (compacted buffers to the
byte), ``clsim compare`` puts them beside clsim's own, bad options name their key, and
an environment without avalanche-lib gets the way to install it."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from clsim_plugins.avalanche import AvalanchePlugin
from helpers import REPO_ROOT, SPLIT_MNIST_PROTOCOL, run_cli

from clsim.assembly import build_stream
from clsim.config import load_scenario, parse_scenario
from clsim.data import load_dataset
from clsim.engine import stream_parts
from clsim.errors import ConfigError
from clsim.interop.avalanche import avalanche_strategy, run_avalanche
from clsim.memory import _attributes, _Walker
from clsim.metrics import final_accuracy
from clsim.models import MLPOptions, build_model
from clsim.runner import run_scenario
from clsim.seeding import derive_seed
from clsim.streams import class_incremental

PEERS = REPO_ROOT / "scenarios" / "extra" / "avalanche_peers_quick.yaml"
HISTORY: list[dict] = []  # what RecordingAvalanche saw after each experience


class TensorBytes(_Walker):
    """The ledger's own walk with Python numbers left out: tensor bytes only, exactly."""

    def charge(self, part: str, nbytes: int, estimated: bool = False) -> None:
        if not estimated:
            super().charge(part, nbytes)


class RecordingAvalanche(AvalanchePlugin):
    """The plugin, recording the tensor bytes it holds where the ledger measures."""

    def clsim_after_experience(self, ctx, experience) -> None:
        walker = TensorBytes()
        walker.module(ctx.model, "model")
        walker._visited.add(id(self))
        for attr, value in _attributes(self):
            if attr != "options":
                walker.value(value, f"avalanche.{attr}")
        HISTORY.append({"strategy": ctx.strategy, "experience": experience.index,
                        "measurement": walker.result,
                        "avalanche_experiences": len(self.new_classes)})


def measured(strategy: str) -> list:
    return [h["measurement"] for h in HISTORY if h["strategy"] == strategy]


# ---------------------------------------------------------------------------
# without avalanche-lib
# ---------------------------------------------------------------------------


def test_an_environment_without_avalanche_is_told_how_to_get_it(tmp_path) -> None:
    """The main environment has no avalanche-lib; here its absence is simulated by
    blocking the import in a fresh interpreter. Loading the plugin does not need it;
    validating a scenario that uses it stops at the plugin's key with the way to get it
    (exit 2, no traceback); so does setting the plugin up from Python."""
    path = tmp_path / "s.yaml"
    path.write_text(PEERS.read_text())
    code = textwrap.dedent(f"""
        import sys
        sys.modules["avalanche"] = None  # import avalanche -> ImportError
        from clsim.plugin_manager import load_plugin_class
        from clsim.errors import ConfigError
        cls = load_plugin_class("avalanche")
        try:
            cls().clsim_setup(None)
        except ConfigError as exc:
            print("setup:", exc)
        from clsim.cli import main
        sys.exit(main(["validate", {str(path)!r}]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.startswith("setup: avalanche.strategy: avalanche-lib is not installed")
    line = next(i for i, text in enumerate(PEERS.read_text().splitlines(), 1)
                if "avalanche_naive:" in text) + 1
    assert f"{path}:{line}: strategies.avalanche_naive.plugins[0].avalanche.strategy: " \
        "avalanche-lib is not installed" in out.stderr
    assert "make venv-avalanche" in out.stderr


def test_loading_the_plugin_imports_no_avalanche() -> None:
    code = "import sys, clsim_plugins.avalanche; print('avalanche' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------
# agreement with Avalanche run directly, on split MNIST
# ---------------------------------------------------------------------------

SPLIT_MNIST = SPLIT_MNIST_PROTOCOL + """\
  naive: {plugins: [{avalanche: {strategy: Naive}}]}
  replay: {plugins: [{avalanche: {strategy: Replay, options: {mem_size: 500}}}]}
"""


def run_directly(name: str, options: dict, dataset, stream, *, hidden, batch_size: int,
                 strategy: str):
    """Avalanche's strategy on ``stream`` as in tests/test_avalanche_interop.py: the
    engine's initial model, SGD lr 0.01, torch's generator seeded as the engine seeds it
    for ``strategy`` (Avalanche shuffles and samples with it)."""
    torch.manual_seed(derive_seed(0, "model"))  # the engine's model initialisation
    model = build_model("mlp", dataset.sample_shape, dataset.n_classes,
                        MLPOptions(hidden=hidden))
    with warnings.catch_warnings(record=True):  # Avalanche's notes about itself
        peer = avalanche_strategy(name, model, torch.optim.SGD(model.parameters(), lr=0.01),
                                  batch_size=batch_size, epochs=1, **options)
        return run_avalanche(peer, stream, dataset,
                             seed=derive_seed(0, strategy, "torch-global"))


@pytest.fixture(scope="module")
def split_mnist(shared_data_root):
    summary = run_scenario(parse_scenario(SPLIT_MNIST), None).summary
    dataset = load_dataset("mnist")
    stream = class_incremental(dataset, seed=0, n_experiences=5)
    assert list(stream.class_order) == summary["class_order"]
    direct = {name: run_directly(name, options, dataset, stream, hidden=[400, 400],
                                 batch_size=128, strategy=name.lower())
              for name, options in (("Naive", {}), ("Replay", {"mem_size": 500}))}
    return summary["strategies"], direct


@pytest.mark.parametrize(("name", "tolerance"), [("Naive", 0.02), ("Replay", 0.05)])
def test_the_plugin_gives_what_avalanche_gives_directly(split_mnist, name, tolerance) -> None:
    """Within the issue's tolerance, and in fact exactly: hosted by clsim, with raw
    samples converted inside the model, the strategy computes what it computes on
    Avalanche's own loop over pre-converted inputs, batch for batch."""
    ours, direct = split_mnist
    run = ours[name.lower()]
    assert run["status"] == "ok", run["error"]
    assert abs(run["final_accuracy"] - final_accuracy(direct[name])) <= tolerance
    assert np.array_equal(np.array(run["accuracy_matrix"]), direct[name].accuracy())


# ---------------------------------------------------------------------------
# several strategies on digits: agreement and the ledger
# ---------------------------------------------------------------------------

MEM = 60  # Replay's memory: 12 samples per experience after the fifth
DIGITS_STRATEGIES = {
    "Naive": {},
    "Replay": {"mem_size": MEM},
    "LwF": {"alpha": 1, "temperature": 2},
    "EWC": {"ewc_lambda": 1.0},
    "GDumb": {"mem_size": 100},
    "ICaRL": {"memory_size": 100},
    "ER_ACE": {"mem_size": MEM},
    "DER": {"mem_size": MEM},
}


def digits_scenario(plugin: str) -> str:
    rows = "\n".join(f"  {name.lower()}: {{plugins: [{{{plugin}: {{strategy: {name}, "
                     f"options: {options}}}}}]}}"
                     for name, options in DIGITS_STRATEGIES.items())
    return f"""\
name: digits_peers
seed: 0
data: {{dataset: digits}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {{name: mlp, hidden: [32]}}
training: {{epochs: 1, batch_size: 64}}
strategies:
{rows}
"""


@pytest.fixture(scope="module")
def digits_runs():
    HISTORY.clear()
    plugin = f"{__name__}:RecordingAvalanche"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent))
        summary = run_scenario(parse_scenario(digits_scenario(plugin)), None).summary
    return summary["strategies"]


@pytest.fixture(scope="module")
def digits_model_bytes():
    dataset = load_dataset("digits")
    model = build_model("mlp", dataset.sample_shape, 10, MLPOptions(hidden=[32]))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_every_strategy_runs_and_reports_its_exemplars(digits_runs) -> None:
    for name, run in digits_runs.items():
        assert run["status"] == "ok", (name, run["error"])
        assert run["plugins"]["RecordingAvalanche"]["strategy"] == \
            next(n for n in DIGITS_STRATEGIES if n.lower() == name)
    exemplars = {name: run["plugins"]["RecordingAvalanche"]["exemplars"]
                 for name, run in digits_runs.items()}
    assert exemplars == {"naive": 0, "replay": MEM, "lwf": 0, "ewc": 0, "gdumb": 100,
                         "icarl": 100, "er_ace": MEM, "der": MEM}


@pytest.mark.parametrize("name", ["Naive", "Replay", "LwF", "EWC", "GDumb", "DER"])
def test_digits_runs_equal_avalanche_run_directly(digits_runs, name) -> None:
    """Every strategy Avalanche can run on a plain benchmark (iCaRL needs one that lists
    classes per experience), accuracy for accuracy; GDumb's retrained copies come back
    into clsim's model; DER trains on its compacted buffer (samples, labels and logits
    copied) exactly what it trains on in its own."""
    dataset = load_dataset("digits")
    stream = class_incremental(dataset, seed=0, n_experiences=5)
    direct = run_directly(name, DIGITS_STRATEGIES[name], dataset, stream, hidden=[32],
                          batch_size=64, strategy=name.lower())
    assert np.array_equal(np.array(digits_runs[name.lower()]["accuracy_matrix"]),
                          direct.accuracy())


def assert_buffer_keeps(m, logit_bytes: int = 0) -> None:
    """``m`` charges the plugin's buffer MEM raw samples (64 uint8 values each), MEM uint8
    labels, MEM uint8 task labels, and ``logit_bytes`` of logits per sample."""
    assert m.parts["avalanche.buffer.x"] == MEM * 64
    assert m.parts["avalanche.buffer.y"] == MEM
    assert m.parts["avalanche.buffer.task"] == MEM
    assert m.parts.get("avalanche.buffer.logits", 0) == MEM * logit_bytes


def test_replay_buffer_is_charged_exactly_its_kept_raw_samples(digits_runs) -> None:
    """After every experience: M raw samples (64 uint8 values each), M uint8 labels and
    M uint8 task labels, and one float32 reservoir weight per sample; besides these the
    plugin holds its class bookkeeping only (seen mask, class order, new classes per
    experience), so no experience's tensor is kept alive by a buffer subset."""
    records = measured("replay")
    assert len(records) == 5
    for m in records:
        assert_buffer_keeps(m)
        assert m.bytes_of("avalanche.methods.ReplayPlugin") == MEM * 4
    bookkeeping = 10 + 10 * 8 + 5 * 8  # after the last experience: 10 classes, 5 experiences
    assert records[-1].bytes_of("avalanche") == MEM * (64 + 1 + 1 + 4) + bookkeeping
    ledger = digits_runs["replay"]["ledger"][-1]["parts"]
    assert ledger["RecordingAvalanche.buffer.x"] == MEM * 64  # the engine's ledger agrees


def test_a_buffer_the_strategy_keeps_itself_is_compacted_too(digits_runs) -> None:
    """ER_ACE keeps its class-balanced buffer on the strategy (storage_policy), not in a
    plugin: it too is copied down to its kept raw samples, so no experience's tensor stays
    alive through it."""
    for m in measured("er_ace"):
        assert_buffer_keeps(m)


def test_ders_buffer_is_compacted_with_its_logits(digits_runs) -> None:
    """DER's buffer (on the strategy) carries each sample's logits besides its label: it
    too is copied down to its kept raw samples, labels and task labels, with the logits
    (10 float32 outputs a sample) charged as their own part; the strategy keeps one
    float32 reservoir weight per sample besides, so no experience's tensor stays alive
    through the buffer."""
    records = measured("der")
    assert len(records) == 5
    for m in records:
        assert_buffer_keeps(m, logit_bytes=10 * 4)
        assert m.bytes_of("avalanche.strategy") == MEM * 4
    bookkeeping = 10 + 10 * 8 + 5 * 8  # after the last experience: 10 classes, 5 experiences
    assert records[-1].bytes_of("avalanche") == MEM * (64 + 1 + 1 + 10 * 4 + 4) + bookkeeping
    ledger = digits_runs["der"]["ledger"][-1]["parts"]
    assert ledger["RecordingAvalanche.buffer.logits"] == MEM * 10 * 4  # the engine agrees


def test_each_method_is_charged_what_it_keeps(digits_runs, digits_model_bytes) -> None:
    """Tensor bytes after experience k (k = 0..4) beside the model: LwF one old model;
    EWC (separate mode) saved parameters and importances for each experience so far;
    GDumb its initial model, 100 raw samples with their labels and weights; iCaRL 100
    exemplars, its old model, and its class means; Naive nothing but the bookkeeping."""
    model = digits_model_bytes
    for m in measured("lwf"):
        assert m.bytes_of("avalanche.methods.LwFPlugin") == model
    for k, m in enumerate(measured("ewc")):
        assert m.bytes_of("avalanche.methods.EWCPlugin") == 2 * (k + 1) * model
    for k, m in enumerate(measured("naive")):
        assert m.bytes_of("avalanche") == 10 + (k + 1) * 2 * 8 + (k + 1) * 8
    gdumb = measured("gdumb")[-1]
    assert gdumb.bytes_of("avalanche.methods.GDumbPlugin.init_model") == model
    assert gdumb.bytes_of("avalanche.buffer") == 100 * (64 + 1 + 1)
    assert gdumb.bytes_of("avalanche.methods.GDumbPlugin.storage_policy") == 100 * 4
    icarl = measured("icarl")[-1]
    assert icarl.bytes_of("avalanche.buffer.x") == 100 * 64
    assert icarl.bytes_of("avalanche.methods.ICaRLLossPlugin.old_model.parameters") == model
    for m in (gdumb, icarl):  # the engine's model is the learner's, charged once
        assert m.parts["model.parameters"] == model


def test_an_online_stream_gives_avalanche_one_experience_per_part(digits_runs) -> None:
    """Each part an online stream delivers is one Avalanche experience."""
    text = digits_scenario(f"{__name__}:RecordingAvalanche").replace(
        "n_experiences: 5}", "n_experiences: 5, online: true, eval_every: 100}")
    scenario = parse_scenario(text)
    HISTORY.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent))
        summary = run_scenario(scenario, None, only=["replay"]).summary
    assert summary["strategies"]["replay"]["status"] == "ok"
    stream = build_stream(scenario, load_dataset("digits"), 0)
    parts, position = [], 0
    for exp in stream:
        parts.append(len(list(stream_parts(exp, position, stream.eval_every))))
        position += exp.n_train
    assert [h["avalanche_experiences"] for h in HISTORY] == list(np.cumsum(parts))


# ---------------------------------------------------------------------------
# clsim compare: Avalanche's strategies beside clsim's
# ---------------------------------------------------------------------------


def test_compare_puts_avalanche_strategies_beside_clsims(tmp_path) -> None:
    out = tmp_path / "cmp"
    proc = run_cli("compare", str(PEERS), "--out", str(out), "--executor", "inline",
                   "--no-progress", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    strategies = ["naive", "replay", "avalanche_naive", "avalanche_replay", "avalanche_lwf"]
    assert sorted((r["strategy"], r["seed"]) for r in rows) == sorted(
        (s, seed) for s in strategies for seed in ("0", "1"))
    assert all(r["status"] == "ok" and r["over_budget"] == "False" for r in rows)
    report = (out / "report.md").read_text()
    table = report.split("## Last accuracy at each budget")[1].split("##")[0]
    assert all(f"| {s} |" in table for s in strategies)
    # a compare cell is the run: same seed, same accuracy
    rerun = run_scenario(load_scenario(PEERS), None, only=["avalanche_replay"]).summary
    cell = next(r for r in rows if r["strategy"] == "avalanche_replay" and r["seed"] == "0")
    assert float(cell["final_accuracy"]) == \
        rerun["strategies"]["avalanche_replay"]["final_accuracy"]


# ---------------------------------------------------------------------------
# bad options name the key
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ("{strategy: Replya}", "strategy",
         "Avalanche has no strategy 'Replya' in avalanche.training.supervised; "
         "did you mean 'Replay'?"),
        ("{strategy: Replay, options: {mem_sise: 10}}", "options.mem_sise",
         "Avalanche's Replay takes no option 'mem_sise'; did you mean 'mem_size'?"),
        ("{strategy: Replay, options: {train_mb_size: 10}}", "options.train_mb_size",
         "is set by the plugin (training.batch_size)"),
        ("{strategy: EWC}", "options", "Avalanche's EWC needs a value for ewc_lambda"),
        ("{strategy: EWC, options: {ewc_lambda: 1.0, mode: bogus}}", "options",
         "Avalanche's EWC could not be built with ewc_lambda=1.0, mode='bogus': "
         "AssertionError: Mode must be separate or online."),
    ],
)
def test_bad_options_name_the_key(options: str, key: str, message: str) -> None:
    text = digits_scenario("avalanche").split("strategies:")[0] + \
        f"strategies:\n  peer:\n    plugins: [{{avalanche: {options}}}]\n"
    with pytest.raises(ConfigError) as info:
        parse_scenario(text, source="s.yaml")
    assert f"s.yaml:9: strategies.peer.plugins[0].avalanche.{key}: {message}" in str(info.value)


def test_icarl_refuses_an_experience_that_brings_classes_back() -> None:
    """iCaRL assumes each class arrives once; a stream that repeats one is refused by
    name (the run records the error, the other strategies would go on)."""
    text = digits_scenario("avalanche").replace(
        "{type: class_incremental, n_experiences: 5}",
        "{type: class_incremental, n_experiences: 5, online: true, eval_every: 100}")
    summary = run_scenario(parse_scenario(text), None, only=["icarl"]).summary
    run = summary["strategies"]["icarl"]
    assert run["status"] == "failed"
    assert "Avalanche's ICaRL assumes every class arrives in one experience" in run["error"]
