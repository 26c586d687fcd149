"""training.memory_format and training.eval_batch_size: how a run executes, not what it
computes. ``auto`` resolves per model kind and device, the resolved values reach
summary.json; ``auto`` (channels_last test batches, contiguous training) gives the results
of a contiguous run, and channels_last training differs from it only by float rounding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import comparable_outcome

from clsim.assembly import (
    Layouts,
    build_scenario_model,
    build_stream,
    evaluation_batch,
    execution_settings,
    load_scenario_data,
    memory_formats,
)
from clsim.checkpoint import Checkpointing, fingerprint, read_checkpoint
from clsim.config import parse_scenario
from clsim.engine import run_strategy
from clsim.errors import ConfigError
from clsim.models import MODELS, build_model
from clsim.runner import run_scenario

CPU = torch.device("cpu")


def conv_scenario(training: str = "", model: str = "{name: small_cnn, channels: [8, 16]}",
                  strategies: str = "  naive:\n    plugins: [naive]\n") -> str:
    """Split digits (5 x 2 classes of 8x8 images) on a small conv net, one thread, on the
    CPU (where ``auto`` means channels_last and the kind's eval batch)."""
    return ("name: conv\nseed: 0\nthreads: 1\ndevice: cpu\ndata: {dataset: digits}\n"
            "stream: {type: class_incremental, n_experiences: 5}\n"
            f"model: {model}\n"
            "training: {epochs: 1, batch_size: 32, optimizer: {name: sgd, lr: 0.1}"
            + (f", {training}" if training else "") + "}\n"
            f"strategies:\n{strategies}")


# ------------------------------------------------------------------------------ auto


@pytest.mark.parametrize("name", ["convnet2", "small_cnn", "resnet", "resnet20",
                                  "slim_resnet18"])
def test_auto_is_channels_last_for_conv_models_on_the_cpu(name):
    scenario = parse_scenario(conv_scenario(model=f"{{name: {name}}}"))
    model = build_model(name, (3, 32, 32), 10)
    # training keeps the contiguous layout (its trajectory), test batches go channels_last
    assert memory_formats(scenario, model, (3, 32, 32), CPU) \
        == Layouts(torch.contiguous_format, torch.channels_last)
    # not measured on CUDA: a GPU keeps the default unless the scenario sets it
    assert memory_formats(scenario, model, (3, 32, 32), torch.device("cuda")) \
        == Layouts(torch.contiguous_format, torch.contiguous_format)
    assert execution_settings(scenario, (3, 32, 32), CPU)["memory_format"] \
        == {"training": "contiguous", "evaluation": "channels_last"}


def test_auto_is_contiguous_for_the_mlp():
    scenario = parse_scenario(conv_scenario(model="{name: mlp, hidden: [32]}"))
    model = build_model("mlp", (1, 28, 28), 10)
    assert memory_formats(scenario, model, (1, 28, 28), CPU) \
        == Layouts(torch.contiguous_format, torch.contiguous_format)
    assert execution_settings(scenario, (1, 28, 28), CPU)["memory_format"] \
        == {"training": "contiguous", "evaluation": "contiguous"}


def test_resolving_the_summary_setting_draws_nothing_from_torch():
    """summary.json's value is found by building the model on the meta device; the run's
    model is drawn from torch's generator after, so nothing may have moved it."""
    scenario = parse_scenario(conv_scenario())
    before = torch.random.get_rng_state()
    execution_settings(scenario, (1, 8, 8), CPU)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_every_model_kind_has_a_measured_eval_batch():
    for name, spec in MODELS.items():
        assert isinstance(spec.eval_batch, int) and spec.eval_batch >= 1, name
    scenario = parse_scenario(conv_scenario())
    assert evaluation_batch(scenario, CPU) == (MODELS["small_cnn"].eval_batch,
                                          "model kind small_cnn")
    # measured on the CPU only: a GPU keeps the earlier default
    assert evaluation_batch(scenario, torch.device("cuda")) == (1024, "default for cuda")
    assert evaluation_batch(parse_scenario(conv_scenario("eval_batch_size: 7"))) \
        == (7, "scenario")


# ----------------------------------------------------------------------- the built model


def _built(training: str = ""):
    scenario = parse_scenario(conv_scenario(training))
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, 0)
    return build_scenario_model(scenario, dataset, stream, device=CPU)


def test_conv_weights_are_channels_last_after_build_when_asked():
    weights = [p for p in _built("memory_format: channels_last").parameters() if p.dim() == 4]
    assert len(weights) == 2
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    # the 8 -> 16 conv: a layout that is channels_last and not contiguous
    assert not weights[1].is_contiguous()


@pytest.mark.parametrize("training", ["", "memory_format: contiguous"])
def test_auto_and_contiguous_train_contiguous(training):
    weights = [p for p in _built(training).parameters() if p.dim() == 4]
    assert all(w.is_contiguous() for w in weights)
    assert not weights[1].is_contiguous(memory_format=torch.channels_last)


# -------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(("entry", "key", "says"), [
    ("memory_format: nchw", "training.memory_format",
     "expected one of 'auto', 'channels_last', 'contiguous'; got 'nchw'"),
    ("eval_batch_size: 0", "training.eval_batch_size", "expected 'auto' or an integer >= 1"),
    ("eval_batch_size: -3", "training.eval_batch_size", "expected 'auto' or an integer >= 1"),
    ("eval_batch_size: fast", "training.eval_batch_size",
     "expected an integer or one of 'auto'; got 'fast'"),
    ("eval_batch_size: true", "training.eval_batch_size", "got True (boolean)"),
])
def test_bad_values_name_the_key(entry, key, says):
    with pytest.raises(ConfigError) as info:
        parse_scenario(conv_scenario(entry), source="s.yaml")
    message = str(info.value)
    assert message.startswith(f"s.yaml:8: {key}: ") and says in message, message


# ------------------------------------------------------------------- runs and summaries


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny conv scenario run four ways: auto (channels_last test batches, the kind's
    eval batch), auto with an eval batch of 7, contiguous with an explicit batch of 1024
    (clsim before these settings) and channels_last throughout."""
    out = {}
    for label, training in [("auto", ""), ("batch7", "eval_batch_size: 7"),
                            ("contiguous", "memory_format: contiguous, eval_batch_size: 1024"),
                            ("channels_last", "memory_format: channels_last")]:
        folder = tmp_path_factory.mktemp(label)
        run_scenario(parse_scenario(conv_scenario(training)), folder)
        out[label] = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return out


def test_summary_records_the_resolved_settings(runs):
    assert runs["auto"]["execution"] == {
        "memory_format": {"training": "contiguous", "evaluation": "channels_last"},
        "eval_batch_size": MODELS["small_cnn"].eval_batch,
        "eval_batch_size_from": "model kind small_cnn"}
    assert runs["contiguous"]["execution"] == {
        "memory_format": {"training": "contiguous", "evaluation": "contiguous"},
        "eval_batch_size": 1024, "eval_batch_size_from": "scenario"}
    assert runs["auto"]["config"]["training"]["eval_batch_size"] == "auto"
    assert runs["contiguous"]["config"]["training"]["memory_format"] == "contiguous"


def _matrix(summary) -> np.ndarray:
    record = summary["strategies"]["naive"]
    assert record["status"] == "ok", record["error"]
    return np.array(record["accuracy_matrix"])


def test_auto_gives_the_results_of_the_contiguous_run(runs):
    """auto trains exactly as before and only evaluates in channels_last at another batch:
    a logit moves by float rounding (about 1e-7), which flips no prediction here."""
    assert np.array_equal(_matrix(runs["auto"]), _matrix(runs["contiguous"]))


def test_channels_last_training_agrees_within_rounding(runs):
    """Not bit for bit: channels_last training runs other convolution kernels, which sum in
    another order, so weights drift apart by rounding over the training steps and a test
    image near a decision boundary may flip. 0.035 is three of the ~90 test images of an
    experience."""
    assert np.allclose(_matrix(runs["channels_last"]), _matrix(runs["contiguous"]),
                       atol=0.035, rtol=0)


def test_the_eval_batch_changes_no_prediction(runs):
    """Training is the same run; only the batches the test sets are cut into differ (BN
    evaluates with running statistics, so a sample's logits do not depend on its batch)."""
    assert np.array_equal(_matrix(runs["auto"]), _matrix(runs["batch7"]))


def test_logits_at_two_eval_batches_agree_within_float_tolerance():
    scenario = parse_scenario(conv_scenario())
    dataset = load_scenario_data(scenario)
    model = build_scenario_model(scenario, dataset, device=CPU).eval()
    x = dataset.to_input(dataset.x_test)
    with torch.no_grad():
        whole = model(x)
        pieces = torch.cat([model(x[i : i + 7]) for i in range(0, len(x), 7)])
    assert torch.allclose(whole, pieces, atol=1e-5, rtol=1e-5)
    assert torch.equal(whole.argmax(1), pieces.argmax(1))


# ---------------------------------------------------------------------------- resume


class _KeepEvery(Checkpointing):
    """Keeps a copy of every checkpoint, so a run can be resumed from each boundary."""

    def save(self, loop, next_experience, wall_seconds):
        super().save(loop, next_experience, wall_seconds)
        if not self.unavailable:
            shutil.copy(self.path, self.path.with_suffix(f".{next_experience}.pt"))


def test_a_channels_last_run_resumes_exactly(tmp_path):
    """Weights saved from channels_last parameters are restored into them (copied in
    place), and the momentum buffers restored contiguous compute the same numbers."""
    scenario = parse_scenario(conv_scenario(
        "memory_format: channels_last",
        strategies="  naive:\n    plugins: [naive]\n").replace("lr: 0.1", "lr: 0.1, momentum: 0.9"))
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, 0)
    strategy = scenario.strategies["naive"]
    key = fingerprint(scenario.to_dict(), 0, None, "naive")
    keep = _KeepEvery(tmp_path / "c.pt", key)
    full = run_strategy(scenario, strategy, dataset, stream, seed=0, device=CPU,
                        checkpoint=keep)
    assert full.error is None and keep.written == [1, 2, 3, 4]
    payload = read_checkpoint(tmp_path / "c.2.pt", key)
    resumed = run_strategy(scenario, strategy, dataset, stream, seed=0, device=CPU,
                           checkpoint=Checkpointing(tmp_path / "x.pt", key, resume_from=payload))
    assert comparable_outcome(resumed) == comparable_outcome(full)


# ----------------------------------------------------------- plugins that copy or grow


def test_plugins_that_copy_grow_or_read_features_run_in_channels_last():
    """MEMO adds contiguous blocks to a channels_last backbone, LwF, iCaRL and PRD keep
    deep copies, the prototype readouts call ctx.features: all must simply work."""
    names = ["memo", "lwf", "icarl", "der", "prd", "nmc", "pl_fms",
             "analytic: {buffer_size: 32}"]
    strategies = "".join(f"  s{i}:\n    plugins:\n      - {n}\n" for i, n in enumerate(names))
    text = conv_scenario("memory_format: channels_last", model="{name: convnet2, channels: 8}",
                         strategies=strategies)
    scenario = parse_scenario(text.replace("threads: 1\n",
                                           "threads: 1\nbudget: 3 models + 200 exemplars\n"))
    summary = run_scenario(scenario, None).summary
    assert summary["execution"]["memory_format"]["training"] == "channels_last"
    for i, name in enumerate(names):
        record = summary["strategies"][f"s{i}"]
        assert record["status"] == "ok", (name, record["error"])
