"""PRD, prototype-sample relation distillation (METHODS.md section 6): it trains through
the standard loop (the scenario's optimizer and non-finite policy), composes with replay,
the distillation is exactly zero at a task's first batch, nothing of a sample is stored,
old prototypes are moved by the distillation only, and runs on digits are finite and
repeatable."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from clsim_plugins.prd import TEACHER, PrdOptions, PrdPlugin, supcon_loss
from helpers import bare_context, without_measurements

from clsim.config import OptimizerConfig, TrainingConfig, parse_scenario
from clsim.context import RunContext
from clsim.data import load_dataset
from clsim.data.dataset import Dataset
from clsim.errors import ConfigError, TrainingError
from clsim.loop_types import ExperiencePlan
from clsim.memory import measure
from clsim.models import build_model
from clsim.models.mlp import MLPOptions
from clsim.plugin_manager import HookRunner, build_plugin_manager
from clsim.runner import run_scenario
from clsim.stream import Batch, Experience
from clsim.streams import class_incremental
from clsim.training import Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
REF = "clsim_plugins.prd:PrdPlugin"
# widths chosen so that no state dimension equals a flattened digit (64 values)
SMALL = PrdOptions(projector_hidden=16, projector_dim=8, crop_padding=1, flip=False)
PRD_OPTIONS = "{projector_hidden: 16, projector_dim: 8, crop_padding: 1, flip: false}"
SGD = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)

SCENARIO = """\
name: prd_test
seed: {seed}
data: {{dataset: digits}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {model}
training: {{epochs: 2, batch_size: 64, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}
strategies:
  prd:
    plugins: {plugins}
"""


def scenario(model: str = "{name: mlp, hidden: [32]}", seed: int = 0,
             plugins: str = f"[{{{REF}: {PRD_OPTIONS}}}]") -> str:
    return SCENARIO.format(model=model, seed=seed, plugins=plugins)


def events_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------
# a minimal driver: the engine's experience loop over the standard Trainer
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def flat(dataset: Dataset) -> Dataset:
    """The digits as flat (N, 64) uint8 vectors: the non-image augmentation path."""
    return replace(dataset, x_train=dataset.x_train.flatten(1), x_test=dataset.x_test.flatten(1))


@dataclass
class Harness:
    """prd (and any plugins listed after it) over the standard loop, driven by hand."""

    plugin: PrdPlugin
    ctx: RunContext
    stream: list[Experience]
    trainer: Trainer
    hooks: HookRunner

    def begin(self, exp: Experience) -> None:
        self.ctx.experience = exp
        self.ctx.seen_classes.extend(c for c in exp.classes if c not in self.ctx.seen_classes)
        self.hooks.call("clsim_before_experience", ctx=self.ctx, experience=exp)

    def fit(self, exp: Experience) -> None:
        self.trainer.fit(ExperiencePlan(exp.train_x, exp.train_y, None, self.ctx.epochs))
        self.trainer.end_experience()

    def end(self, exp: Experience) -> None:
        self.hooks.call("clsim_after_experience", ctx=self.ctx, experience=exp)

    def train(self, exp: Experience) -> None:
        self.begin(exp)
        self.fit(exp)
        self.end(exp)


def make_harness(dataset: Dataset, options: PrdOptions = SMALL, *, events=None,
                 extra: tuple = (), before: tuple = (), optimizer: OptimizerConfig = SGD,
                 nonfinite: str = "stop", epochs: int = 1) -> Harness:
    stream = class_incremental(dataset, seed=0, n_experiences=5)
    torch.manual_seed(0)
    model = build_model("mlp", dataset.sample_shape, dataset.n_classes, MLPOptions(hidden=[32]))
    log = (lambda event, **f: events.append((event, f))) if events is not None else \
        (lambda event, **f: None)
    ctx = bare_context(model, dataset, strategy="prd", batch_size=64, epochs=epochs,
                       labels=stream.labels, log=log)
    plugin = PrdPlugin(options)
    hooks = HookRunner(build_plugin_manager([*before, ("prd", plugin), *extra]))
    config = TrainingConfig(epochs=epochs, batch_size=64, optimizer=optimizer,
                            nonfinite_loss=nonfinite)
    trainer = Trainer(ctx, hooks, config, torch.Generator().manual_seed(0))
    ctx._trainer = trainer
    hooks.call("clsim_setup", ctx=ctx)
    return Harness(plugin, ctx, list(stream), trainer, hooks)


def tensors(obj, seen=None):
    """Every tensor reachable from ``obj`` (attributes, containers, modules, optimizer)."""
    seen = {} if seen is None else seen  # id -> object: keeps temporaries alive, ids unique
    if id(obj) in seen or obj is None or isinstance(obj, (str, int, float, bool, torch.Generator)):
        return
    seen[id(obj)] = obj
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
        return
    if isinstance(obj, torch.nn.Module):
        yield from tensors(list(obj.parameters()) + list(obj.buffers()), seen)
        return
    if isinstance(obj, torch.optim.Optimizer):
        yield from tensors(list(obj.state.values()), seen)
        return
    if isinstance(obj, dict):
        yield from tensors(list(obj.values()), seen)
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from tensors(item, seen)
    elif hasattr(obj, "__dict__"):
        yield from tensors(list(vars(obj).values()), seen)


def assert_holds_no_sample(plugin: PrdPlugin, ctx: RunContext) -> None:
    """No raw (uint8) tensor, and no tensor shaped like samples: none with a dimension of
    a flattened sample's size or ending in the sample shape, except copies of the
    encoder's own weights (the teacher), which must match them shape for shape."""
    shape = tuple(ctx.sample_shape)
    flat_size = math.prod(shape)
    encoder = {name: tuple(t.shape) for name, t in ctx.model.features.state_dict().items()}
    if plugin.old_encoder is not None:
        assert {n: tuple(t.shape) for n, t in plugin.old_encoder.state_dict().items()} == encoder
    found = list(tensors(plugin))
    assert found
    for t in found:
        assert t.dtype != torch.uint8, t.shape
        if tuple(t.shape) in encoder.values():
            continue
        assert flat_size not in t.shape, t.shape
        assert tuple(t.shape[-len(shape) :]) != shape, t.shape


# ---------------------------------------------------------------------------
# the standard loop trains it: the scenario's optimizer and non-finite policy
# ---------------------------------------------------------------------------


class OptimizerRecorder:
    """Listed after prd: the loop's optimizer, as each backward pass leaves it."""

    def __init__(self) -> None:
        self.seen: list[tuple[type, dict[int, float]]] = []

    def clsim_after_backward(self, ctx: RunContext) -> None:
        groups = ctx.optimizer.param_groups
        lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
        self.seen.append((type(ctx.optimizer), lr_of))


def test_the_scenarios_optimizer_trains_the_projector_and_the_prototypes(digits) -> None:
    """AdamW at lr 0.003 from the training config (no optimizer of prd's own) holds the
    encoder, the projector and every prototype group, and moves the latter two."""
    recorder = OptimizerRecorder()
    adamw = OptimizerConfig(name="adamw", lr=0.003, weight_decay=0.01)
    h = make_harness(digits, extra=(("recorder", recorder),), optimizer=adamw)
    projector = [p.detach().clone() for p in h.plugin.projector.parameters()]
    h.train(h.stream[0])
    h.begin(h.stream[1])
    first_group = h.plugin.prototypes.groups[0].detach().clone()
    h.fit(h.stream[1])
    batches = sum(math.ceil(exp.n_train / 64) for exp in h.stream[:2])
    assert len(recorder.seen) == batches
    assert {kind for kind, _ in recorder.seen} == {torch.optim.AdamW}
    lr_of = recorder.seen[-1][1]
    for module in (h.ctx.model.features, h.plugin.projector, h.plugin.prototypes):
        assert all(lr_of[id(p)] == 0.003 for p in module.parameters())
    assert len(h.plugin.prototypes.groups) == 2
    assert not all(torch.equal(a, b) for a, b in
                   zip(projector, h.plugin.projector.parameters(), strict=True))
    assert not torch.equal(first_group, h.plugin.prototypes.groups[0])  # distillation
    assert h.ctx.optimizer is None  # the loop's, for its fit only


@pytest.mark.parametrize("policy", ["skip_batch", "stop"])
def test_a_nan_in_prds_loss_meets_the_loops_nonfinite_policy(digits, policy,
                                                              monkeypatch) -> None:
    """The prototype loss of the second batch is NaN: skip_batch drops that batch alone
    (counted, absent from prd's own sums); stop raises the loop's TrainingError."""
    events: list = []
    h = make_harness(digits, events=events, nonfinite=policy)
    calls = []
    original = h.plugin.prototype_loss

    def poisoned(ctx, output):
        calls.append(None)
        loss = original(ctx, output)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(h.plugin, "prototype_loss", poisoned)
    exp = h.stream[0]
    n_batches = math.ceil(exp.n_train / 64)
    if policy == "stop":
        with pytest.raises(TrainingError, match=r"loss became nan .*first at batch 2"):
            h.train(exp)
        return
    h.train(exp)
    assert h.trainer.skipped_batches == 1
    assert len(calls) == n_batches
    (means,) = [f for event, f in events if event == "prd_experience"]
    assert means["batches"] == n_batches - 1
    assert all(math.isfinite(means[k]) for k in ("supcon", "proto", "distill", "total"))
    for module in (h.ctx.model, h.plugin.projector, h.plugin.prototypes):
        assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


# ---------------------------------------------------------------------------
# replay + prd in one strategy: memory samples in prd's batches, both charged
# ---------------------------------------------------------------------------

BATCHES: list[tuple] = []


class BatchRecorder:
    """What the loop trained on, batch by batch (written to the module's BATCHES)."""

    def clsim_after_batch(self, ctx: RunContext, batch: Batch, output) -> None:
        replayed = sorted(set(batch.y[batch.n_stream :].tolist()))
        BATCHES.append((ctx.experience.index, len(batch), batch.n_stream,
                        int(output.inputs.shape[0]), replayed))


@pytest.fixture
def this_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "prd_test_plugins", sys.modules[__name__])
    BATCHES.clear()
    yield "prd_test_plugins"
    BATCHES.clear()


def test_replay_and_prd_replay_in_prds_batches_and_are_charged_for_both(tmp_path,
                                                                       this_module) -> None:
    plugins = (f"[{{replay: {{capacity: 100}}}}, {{{REF}: {PRD_OPTIONS}}}, "
               f"{this_module}:BatchRecorder]")
    result = run_scenario(parse_scenario(scenario(plugins=plugins)), tmp_path)
    strategy = result.summary["strategies"]["prd"]
    assert strategy["status"] == "ok", strategy["error"]
    stream = class_incremental(load_dataset("digits"), seed=0, n_experiences=5)
    earlier: set[int] = set()
    for exp in stream:
        mine = [b for b in BATCHES if b[0] == exp.index]
        assert len(mine) == 2 * math.ceil(exp.n_train / 64)  # 2 epochs
        assert sum(b[2] for b in mine) == 2 * exp.n_train  # the stream's samples, each once
        for _, size, n_stream, rows, replayed in mine:
            assert rows == 2 * size  # prd's two views hold the replayed samples too
            if exp.index > 0:
                assert size == 2 * n_stream  # replay's draw: as many as the stream's
                assert set(replayed) <= earlier | set(exp.classes)
        if exp.index > 0:  # earlier tasks' samples come back
            assert set().union(*(b[4] for b in mine)) & earlier
        earlier |= set(exp.classes)
    for record in strategy["ledger"]:  # the plugin named by REF is charged as PrdPlugin
        parts = record["parts"]
        assert {"model.parameters", "PrdPlugin.projector.parameters",
                "PrdPlugin.prototypes.parameters"} <= set(parts), parts
        assert parts["replay.buffer.x"] == 100 * 64  # the full memory: 100 uint8 digits
        # the teacher while a later task trains, never between experiences
        teacher = record["experience"] > 0 and record["point"] != "end"
        assert ("PrdPlugin.old_encoder.parameters" in parts) is teacher, record
    assert strategy["ledger"][-1]["parts"]["PrdPlugin.prototypes.parameters"] == 10 * 32 * 4
    # the first batch of every later task: distillation exactly 0, memory samples or not
    first = [e for e in events_of(tmp_path) if e["event"] == "prd_first_batch"]
    assert [e["distill"] for e in first] == [0.0] * 5


def test_replay_language_head_and_prd_compose(tmp_path, this_module) -> None:
    """replay + language_head + prd: the head's targets are the prototypes, memory samples
    are in prd's batches, and the distillation is still exactly 0 at each first batch."""
    plugins = (f"[{{replay: {{capacity: 100}}}}, language_head, {{{REF}: {PRD_OPTIONS}}}, "
               f"{this_module}:BatchRecorder]")
    result = run_scenario(parse_scenario(scenario(plugins=plugins)), tmp_path)
    strategy = result.summary["strategies"]["prd"]
    assert strategy["status"] == "ok", strategy["error"]
    assert all(size > n_stream for index, size, n_stream, _, _ in BATCHES if index > 0)
    first = [e for e in events_of(tmp_path) if e["event"] == "prd_first_batch"]
    assert [e["distill"] for e in first] == [0.0] * 5
    assert all(e["proto"] > 0 for e in first)
    parts = strategy["ledger"][-1]["parts"]
    assert "PrdPlugin.prototypes.parameters" not in parts  # no learned prototype rows
    assert parts["replay.buffer.x"] == 100 * 64


# ---------------------------------------------------------------------------
# the distillation is exactly zero at the first batch of every task
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "{name: mlp, hidden: [32], dropout: 0.2}",  # dropout: the teacher replays the masks
        "{name: small_cnn, channels: [8, 16]}",  # BatchNorm: both use batch statistics
    ],
)
def test_distillation_is_exactly_zero_on_the_first_batch_of_a_task(tmp_path, model) -> None:
    """Through the real engine: events.jsonl holds the exact loss parts of the first batch
    of each experience; from the second task on, the distillation term there is 0.0
    (the teacher is the student at that point), and it is positive later in the task."""
    result = run_scenario(parse_scenario(scenario(model)), tmp_path)
    strategy = result.summary["strategies"]["prd"]
    assert strategy["status"] == "ok", strategy["error"]
    events = events_of(tmp_path)
    first = {e["experience"]: e for e in events if e["event"] == "prd_first_batch"}
    means = {e["experience"]: e for e in events if e["event"] == "prd_experience"}
    assert sorted(first) == sorted(means) == [0, 1, 2, 3, 4]
    for index in range(1, 5):
        assert first[index]["distill"] == 0.0
        assert first[index]["supcon"] > 0 and first[index]["proto"] > 0
        # the total is the published weighting of its parts
        parts = first[index]
        assert parts["total"] == pytest.approx(
            parts["supcon"] + 2.0 * parts["proto"] + 4.0 * parts["distill"], rel=1e-6
        )
    later = [means[index]["distill"] for index in range(1, 5)]
    assert all(math.isfinite(v) for v in later)
    assert min(later) > 0 and max(later) > 1e-4  # the teacher and the student part ways
    assert means[0]["distill"] == 0.0  # no earlier task


def test_distillation_is_zero_on_the_first_batch_with_flat_inputs(digits) -> None:
    """The same property on flat vectors (noise and input-dropout views)."""
    events: list = []
    h = make_harness(flat(digits), events=events)
    for exp in h.stream[:3]:
        h.train(exp)
    first = [f for event, f in events if event == "prd_first_batch"]
    assert [f["experience"] for f in first] == [0, 1, 2]
    assert [f["distill"] for f in first] == [0.0, 0.0, 0.0]
    assert all(f["supcon"] > 0 for f in first)


def test_the_teacher_sees_the_students_inputs_and_scores_the_earlier_prototypes(digits):
    """One forward of the loop: 2N rows (two views), the teacher's scores against the
    earlier tasks' prototypes as an aux output, equal to the student's before any step."""
    h = make_harness(digits)
    h.train(h.stream[0])
    exp = h.stream[1]
    h.begin(exp)
    output = h.trainer.forward(Batch(exp.train_x[:20], exp.train_y[:20]))
    assert output.views == 2 and output.inputs.shape[0] == 40
    assert torch.equal(output.targets, exp.train_y[:20].repeat(2))
    teacher = output.aux[TEACHER]
    assert teacher.shape == (40, len(h.stream[0].classes))
    assert h.plugin.distillation_loss(output).item() == 0.0


# ---------------------------------------------------------------------------
# memory: prototypes, projector, model; the teacher only while a task trains
# ---------------------------------------------------------------------------


def test_no_sample_is_stored_and_the_ledger_holds_only_the_expected_parts(digits) -> None:
    h = make_harness(digits)
    plugin, ctx = h.plugin, h.ctx
    feature_dim = ctx.model.feature_dim
    projector = sum(p.numel() for p in plugin.projector.parameters()) * 4
    for exp in h.stream:
        h.begin(exp)
        h.fit(exp)
        # mid-task (an online stream's anytime check measures here): the teacher is held
        assert_holds_no_sample(plugin, ctx)
        during = measure(ctx.model, [("prd", plugin)])
        allowed = (
            "model.",
            "prd.projector.",
            "prd.prototypes.",
            "prd.old_encoder.",
            "prd.old_prototypes",
            "prd.old_classes",
            "prd.new_classes",
            "prd._sums",
        )
        assert all(part.startswith(allowed) for part in during.parts), during.parts
        assert during.bytes_of("prd._sums") == 5 * 4  # four loss parts and a count
        assert not during.estimated
        if exp.index > 0:
            assert during.bytes_of("prd.old_encoder") == ctx.model_bytes() - 4 * (
                ctx.model.head.weight.numel() + ctx.model.head.bias.numel()
            )
        h.end(exp)
        # between experiences: prototypes and projector, exactly
        after = measure(ctx.model, [("prd", plugin)])
        assert_holds_no_sample(plugin, ctx)
        assert not after.estimated
        n_seen = len(ctx.seen_classes)
        assert after.parts == {
            "model.parameters": ctx.model_bytes(),
            "prd.projector.parameters": projector,
            "prd.prototypes.parameters": n_seen * feature_dim * 4,
            "prd.prototypes.buffers": n_seen * 2 * 8,  # class id and task of every row
        }
    assert sorted(plugin.prototypes.classes.tolist()) == list(range(10))


def test_ledger_of_an_engine_run_names_only_model_prototypes_and_projector() -> None:
    """Between experiences; while a task trains the teacher is charged too
    (test_ledger_peak)."""
    result = run_scenario(parse_scenario(scenario()), None)
    strategy = result.summary["strategies"]["prd"]
    assert strategy["status"] == "ok", strategy["error"]
    assert strategy["peak_bytes"] > strategy["kept_bytes"]
    for record in (r for r in strategy["ledger"] if r["point"] == "end"):
        names = {
            part.split(".")[0] if part.startswith("model") else part.split(".")[1]
            for part in record["parts"]
        }
        assert names == {"model", "projector", "prototypes"}, record["parts"]
        assert not record["estimated"]


# ---------------------------------------------------------------------------
# prototypes: the prototype loss moves the current task's only
# ---------------------------------------------------------------------------


def test_prototype_loss_gives_old_prototypes_no_gradient(digits) -> None:
    h = make_harness(digits)
    h.train(h.stream[0])
    exp = h.stream[1]
    h.begin(exp)
    output = h.trainer.forward(Batch(exp.train_x[:32], exp.train_y[:32]))
    proto = h.plugin.prototype_loss(h.ctx, output)
    old, current = h.plugin.prototypes.groups
    grad_old, grad_current = torch.autograd.grad(proto, [old, current], allow_unused=True)
    assert grad_old is None
    assert grad_current is not None and bool(grad_current.abs().sum() > 0)
    # the current group holds exactly the classes this experience introduced
    assert sorted(h.plugin.prototypes.classes[-len(current) :].tolist()) == sorted(exp.classes)
    # a batch without a sample of those classes has a prototype loss of exactly 0
    output = h.trainer.forward(Batch(h.stream[0].train_x[:8], h.stream[0].train_y[:8]))
    assert h.plugin.prototype_loss(h.ctx, output).item() == 0.0


@pytest.mark.parametrize("distill_weight", [0.0, 4.0])
def test_old_prototypes_move_only_through_the_distillation(digits, distill_weight) -> None:
    """Training a later task without the distillation leaves earlier prototypes
    bit-identical (the prototype loss never reaches them, nor does weight decay); with it,
    they follow the encoder."""
    sgd = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    h = make_harness(digits, replace(SMALL, distill_weight=distill_weight), optimizer=sgd)
    h.train(h.stream[0])
    before = h.plugin.prototypes.groups[0].detach().clone()
    h.train(h.stream[1])
    after = h.plugin.prototypes.groups[0].detach()
    if distill_weight == 0.0:
        assert torch.equal(before, after)
    else:
        assert not torch.equal(before, after)


# ---------------------------------------------------------------------------
# the pieces: SupCon, nearest-prototype readout, options
# ---------------------------------------------------------------------------


def test_supcon_matches_a_direct_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])  # class 2 has no positive: not an anchor
    tau = 0.1
    total, anchors = 0.0, 0
    for i in range(6):
        others = [a for a in range(6) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in others)
        total += -sum(
            math.log(math.exp(float(z[i] @ z[p]) / tau) / denominator) for p in positives
        ) / len(positives)
        anchors += 1
    assert float(supcon_loss(z, labels, tau)) == pytest.approx(total / anchors, rel=1e-5)
    assert float(supcon_loss(z[:3], torch.tensor([0, 1, 2]), tau)) == 0.0  # no anchor


def test_prediction_is_the_nearest_prototype_by_cosine(digits) -> None:
    h = make_harness(digits)
    plugin, ctx, stream = h.plugin, h.ctx, h.stream
    assert plugin.clsim_predict(ctx=ctx, x=torch.zeros(2, 1, 8, 8), task_id=None) is None
    h.begin(stream[0])
    h.begin(stream[1])
    h.end(stream[1])
    x = ctx.to_input(stream[1].test_x[:50])
    with torch.no_grad():
        features = torch.nn.functional.normalize(ctx.model.features(x), dim=1)
        for group in plugin.prototypes.groups:  # cosine ignores a prototype's length
            group.mul_(torch.arange(1, len(group) + 1).unsqueeze(1) * 3.0)
        prototypes = torch.nn.functional.normalize(plugin.prototypes.weights(), dim=1)
        expected = plugin.prototypes.classes[(features @ prototypes.T).argmax(1)]
        predicted = plugin.clsim_predict(ctx=ctx, x=x, task_id=None)
        assert torch.equal(predicted, expected)
        # with a task id, only that task's classes are candidates
        within = plugin.clsim_predict(ctx=ctx, x=x, task_id=0)
        assert set(within.tolist()) <= set(stream[0].classes)


def test_flat_views_are_seeded_noise_and_dropout(digits) -> None:
    h = make_harness(flat(digits), replace(SMALL, noise_std=0.0, drop_prob=0.5))
    x = h.ctx.to_input(flat(digits).x_train[:20])
    view = h.plugin._view(x)
    assert view.shape == x.shape
    kept = view == x
    assert 0.3 < float(kept.float().mean()) < 0.7
    assert bool((view[~kept] == 0).all())
    h = make_harness(flat(digits), replace(SMALL, augment=False))
    assert torch.equal(h.plugin._view(x), x)


def test_bad_options_and_hidden_boundaries_are_refused(digits) -> None:
    bad = scenario().replace("flip: false", "flip: false, drop_prob: 1.0")
    with pytest.raises(ConfigError, match="drop_prob"):
        parse_scenario(bad)
    with pytest.raises(ConfigError, match="temprature"):
        parse_scenario(scenario().replace("flip: false", "flip: false, temprature: 0.1"))
    # the optimizer is the scenario's: prd has no optimizer options of its own
    for private in ("lr: 0.01", "momentum: 0.9", "weight_decay: 0.0001"):
        with pytest.raises(ConfigError, match=private.split(":")[0]):
            parse_scenario(scenario().replace("flip: false", f"flip: false, {private}"))
    h = make_harness(digits)
    exp = h.stream[0]
    hidden = replace(exp, train_x=exp.train_x[:0], train_y=exp.train_y[:0])
    with pytest.raises(ConfigError, match="boundaries"):
        h.plugin.clsim_before_experience(ctx=h.ctx, experience=hidden)


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------


def test_quick_scenario_runs_naive_and_prd_on_digits() -> None:
    text = (REPO_ROOT / "scenarios" / "prd_quick.yaml").read_text()
    summary = run_scenario(parse_scenario(text), None).summary
    naive, prd = summary["strategies"]["naive"], summary["strategies"]["prd"]
    for strategy in (naive, prd):
        assert strategy["status"] == "ok", strategy["error"]
        assert 0.0 <= strategy["final_accuracy"] <= 1.0
    # naive forgets all but the last task; prototypes and distillation keep more
    assert prd["final_accuracy"] > naive["final_accuracy"]


def test_same_seed_same_metrics() -> None:
    def run(seed: int) -> dict:
        outcome = run_scenario(parse_scenario(scenario(seed=seed)), None).summary
        return without_measurements(outcome["strategies"]["prd"])

    first = run(0)
    assert first["status"] == "ok", first["error"]
    assert run(0) == first
    assert run(1)["accuracy_matrix"] != first["accuracy_matrix"]


# ---------------------------------------------------------------------------
# with the language-guided head: the class-name targets are the prototypes
# ---------------------------------------------------------------------------


def test_with_a_language_head_the_targets_are_the_prototypes(tmp_path) -> None:
    """prd + language_head (real MiniLM targets), read through the fixed-target head
    protocol: no prototype is learned (the bank keeps class ids only), the distillation
    is exactly 0.0 at each task's first batch, the targets stay bit-identical, the
    teacher copies the head but shares its targets, and a prediction is the nearest
    target by cosine: the argmax of the head's logits over the seen classes."""
    from clsim.models.heads import target_head
    from clsim.text_encoder import encode_class_names

    text = scenario(plugins=f"[language_head, {{{REF}: {PRD_OPTIONS}}}]")
    result = run_scenario(parse_scenario(text), tmp_path)
    strategy = result.summary["strategies"]["prd"]
    assert strategy["status"] == "ok", strategy["error"]
    first = [e for e in events_of(tmp_path) if e["event"] == "prd_first_batch"]
    assert [e["distill"] for e in first] == [0.0] * 5
    assert all(e["proto"] > 0 for e in first)
    parts = strategy["ledger"][-1]["parts"]
    assert not any("groups" in name for name in parts)  # no learned prototype rows
    assert parts["model.buffers"] == 10 * 384 * 4  # the targets, charged with the model

    # the same composition driven by hand, to compare predictions with the head's logits
    from clsim_plugins.language_head import LanguageHeadOptions, LanguageHeadPlugin

    dataset = load_dataset("digits")
    language = LanguageHeadPlugin(LanguageHeadOptions())
    h = make_harness(dataset, before=(("language_head", language),))
    plugin, ctx = h.plugin, h.ctx
    head = target_head(ctx.model)
    assert head is not None
    targets = encode_class_names(dataset.class_names, "a photo of a {name}.")
    projection = [p.detach().clone() for p in head.parameters()]
    h.train(h.stream[0])
    h.begin(h.stream[1])
    h.fit(h.stream[1])
    # mid-task: the teacher's head is a copy of the head's parameters, not of its targets
    during = measure(ctx.model, [("prd", plugin)])
    assert during.bytes_of("prd.old_head") == 4 * sum(p.numel() for p in head.parameters())
    assert plugin.old_head.targets is head.targets
    h.end(h.stream[1])
    assert plugin.old_head is None
    assert len(plugin.prototypes.groups) == 0 and len(plugin.prototypes) == 4
    assert torch.equal(head.targets, targets)
    assert not all(torch.equal(a, b) for a, b in zip(projection, head.parameters(),
                                                     strict=True))  # the projection learns
    seen = plugin.prototypes.classes
    x = ctx.to_input(torch.cat([exp.test_x for exp in h.stream[:2]]))
    ctx.model.eval()
    with torch.no_grad():
        logits = ctx.model(x)[:, seen]
        predicted = plugin.clsim_predict(ctx=ctx, x=x, task_id=None)
    assert torch.equal(predicted, seen[logits.argmax(1)])
