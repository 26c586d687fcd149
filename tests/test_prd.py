"""PRD, prototype-sample relation distillation (METHODS.md section 6): the distillation is
exactly zero at a task's first batch, nothing of a sample is stored, old prototypes are
moved by the distillation only, and runs on digits are finite and repeatable."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from clsim_plugins.prd import PrdOptions, PrdPlugin, supcon_loss
from helpers import bare_context

from clsim.config import parse_scenario
from clsim.context import RunContext
from clsim.data import load_dataset
from clsim.data.dataset import Dataset
from clsim.errors import ConfigError
from clsim.memory import measure
from clsim.models import build_model
from clsim.models.mlp import MLPOptions
from clsim.runner import run_scenario
from clsim.stream import Experience
from clsim.streams import class_incremental

REPO_ROOT = Path(__file__).resolve().parents[1]
REF = "clsim_plugins.prd:PrdPlugin"
# widths chosen so that no state dimension equals a flattened digit (64 values)
SMALL = PrdOptions(projector_hidden=16, projector_dim=8, crop_padding=1, flip=False, lr=0.05)

SCENARIO = """\
name: prd_test
seed: {seed}
data: {{dataset: digits}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {model}
training: {{epochs: 2, batch_size: 64, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}
strategies:
  prd:
    plugins:
      - {ref}: {{projector_hidden: 16, projector_dim: 8, crop_padding: 1, flip: false, lr: 0.05}}
"""


def scenario(model: str = "{name: mlp, hidden: [32]}", seed: int = 0) -> str:
    return SCENARIO.format(model=model, seed=seed, ref=REF)


# ---------------------------------------------------------------------------
# a minimal driver: the engine's experience loop, with the plugin in reach
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def flat(dataset: Dataset) -> Dataset:
    """The digits as flat (N, 64) uint8 vectors: the non-image augmentation path."""
    return replace(dataset, x_train=dataset.x_train.flatten(1), x_test=dataset.x_test.flatten(1))


def make_plugin(dataset: Dataset, options: PrdOptions = SMALL, model=None, events=None):
    stream = class_incremental(dataset, seed=0, n_experiences=5)
    torch.manual_seed(0)
    model = model or build_model(
        "mlp", dataset.sample_shape, dataset.n_classes, MLPOptions(hidden=[32])
    )
    log = (
        (lambda event, **f: events.append((event, f)))
        if events is not None
        else (lambda event, **f: None)
    )
    ctx = bare_context(
        model,
        dataset,
        strategy="prd",
        batch_size=64,
        labels=stream.labels,
        log=log,
    )
    plugin = PrdPlugin(options)
    plugin.clsim_setup(ctx=ctx)
    return plugin, ctx, stream


def begin(plugin: PrdPlugin, ctx: RunContext, exp: Experience) -> None:
    ctx.experience = exp
    ctx.seen_classes.extend(c for c in exp.classes if c not in ctx.seen_classes)
    plugin.clsim_before_experience(ctx=ctx, experience=exp)


def train(plugin: PrdPlugin, ctx: RunContext, exp: Experience) -> None:
    begin(plugin, ctx, exp)
    assert plugin.clsim_train_experience(ctx=ctx, experience=exp) is True
    plugin.clsim_after_experience(ctx=ctx)


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
    encoder's own weights (the teacher, momentum), which must match them shape for shape."""
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
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    first = {e["experience"]: e for e in events if e["event"] == "prd_first_batch"}
    epochs = [e for e in events if e["event"] == "prd_epoch"]
    assert sorted(first) == [0, 1, 2, 3, 4]
    for index in range(1, 5):
        assert first[index]["distill"] == 0.0
        assert first[index]["supcon"] > 0 and first[index]["proto"] > 0
        # the total is the published weighting of its parts
        parts = first[index]
        assert parts["total"] == pytest.approx(
            parts["supcon"] + 2.0 * parts["proto"] + 4.0 * parts["distill"], rel=1e-6
        )
    later = [e["distill"] for e in epochs if e["experience"] >= 1]
    assert all(math.isfinite(v) for v in later)
    assert max(later) > 1e-4  # the teacher and the student do part ways
    assert all(e["distill"] == 0.0 for e in epochs if e["experience"] == 0)  # no earlier task


def test_distillation_is_zero_on_the_first_batch_with_flat_inputs(digits) -> None:
    """The same property on flat vectors (noise and input-dropout views)."""
    events: list = []
    plugin, ctx, stream = make_plugin(flat(digits), events=events)
    for exp in stream[:3]:
        train(plugin, ctx, exp)
    first = [f for event, f in events if event == "prd_first_batch"]
    assert [f["experience"] for f in first] == [0, 1, 2]
    assert [f["distill"] for f in first] == [0.0, 0.0, 0.0]
    assert all(f["supcon"] > 0 for f in first)


# ---------------------------------------------------------------------------
# memory: prototypes, projector, model; the teacher only while a task trains
# ---------------------------------------------------------------------------


def test_no_sample_is_stored_and_the_ledger_holds_only_the_expected_parts(digits) -> None:
    plugin, ctx, stream = make_plugin(digits)
    feature_dim = ctx.model.feature_dim
    projector = sum(p.numel() for p in plugin.projector.parameters()) * 4
    for exp in stream:
        begin(plugin, ctx, exp)
        plugin.clsim_train_experience(ctx=ctx, experience=exp)
        # mid-task (an online stream's anytime check measures here): the teacher is held
        assert_holds_no_sample(plugin, ctx)
        during = measure(ctx.model, [("prd", plugin)])
        allowed = (
            "model.",
            "prd.projector.",
            "prd.prototypes.",
            "prd.old_encoder.",
            "prd.old_prototypes",
        )
        assert all(part.startswith(allowed) for part in during.parts), during.parts
        if exp.index > 0:
            assert during.bytes_of("prd.old_encoder") == ctx.model_bytes() - 4 * (
                ctx.model.head.weight.numel() + ctx.model.head.bias.numel()
            )
        plugin.clsim_after_experience(ctx=ctx)
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
    result = run_scenario(parse_scenario(scenario()), None)
    strategy = result.summary["strategies"]["prd"]
    assert strategy["status"] == "ok", strategy["error"]
    for record in strategy["ledger"]:
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
    plugin, ctx, stream = make_plugin(digits)
    train(plugin, ctx, stream[0])
    begin(plugin, ctx, stream[1])
    exp = stream[1]
    losses = plugin.batch_losses(ctx, exp.train_x[:32], exp.train_y[:32])
    old, current = plugin.prototypes.groups
    grad_old, grad_current = torch.autograd.grad(losses["proto"], [old, current], allow_unused=True)
    assert grad_old is None
    assert grad_current is not None and bool(grad_current.abs().sum() > 0)
    # the current group holds exactly the classes this experience introduced
    assert sorted(plugin.prototypes.classes[-len(current) :].tolist()) == sorted(exp.classes)


@pytest.mark.parametrize("distill_weight", [0.0, 4.0])
def test_old_prototypes_move_only_through_the_distillation(digits, distill_weight) -> None:
    """Training a later task without the distillation leaves earlier prototypes
    bit-identical (the prototype loss never reaches them, nor does weight decay); with it,
    they follow the encoder."""
    plugin, ctx, stream = make_plugin(digits, replace(SMALL, distill_weight=distill_weight))
    train(plugin, ctx, stream[0])
    before = plugin.prototypes.groups[0].detach().clone()
    train(plugin, ctx, stream[1])
    after = plugin.prototypes.groups[0].detach()
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


def test_prediction_is_the_nearest_prototype_by_cosine(digits) -> None:
    plugin, ctx, stream = make_plugin(digits)
    assert plugin.clsim_predict(ctx=ctx, x=torch.zeros(2, 1, 8, 8), task_id=None) is None
    begin(plugin, ctx, stream[0])
    begin(plugin, ctx, stream[1])
    plugin.clsim_after_experience(ctx=ctx)
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
    plugin, ctx, _ = make_plugin(flat(digits), replace(SMALL, noise_std=0.0, drop_prob=0.5))
    x = ctx.to_input(flat(digits).x_train[:20])
    view = plugin._view(x)
    assert view.shape == x.shape
    kept = view == x
    assert 0.3 < float(kept.float().mean()) < 0.7
    assert bool((view[~kept] == 0).all())
    plugin, ctx, _ = make_plugin(flat(digits), replace(SMALL, augment=False))
    assert torch.equal(plugin._view(x), x)


def test_bad_options_and_hidden_boundaries_are_refused(digits) -> None:
    bad = scenario().replace("flip: false", "flip: false, drop_prob: 1.0")
    with pytest.raises(ConfigError, match="drop_prob"):
        parse_scenario(bad)
    with pytest.raises(ConfigError, match="temprature"):
        parse_scenario(scenario().replace("flip: false", "flip: false, temprature: 0.1"))
    plugin, ctx, stream = make_plugin(digits)
    hidden = replace(stream[0], train_x=stream[0].train_x[:0], train_y=stream[0].train_y[:0])
    with pytest.raises(ConfigError, match="boundaries"):
        plugin.clsim_before_experience(ctx=ctx, experience=hidden)


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
        strategy = dict(outcome["strategies"]["prd"])
        strategy.pop("wall_seconds")
        return strategy

    first = run(0)
    assert first["status"] == "ok", first["error"]
    assert run(0) == first
    assert run(1)["accuracy_matrix"] != first["accuracy_matrix"]


# ---------------------------------------------------------------------------
# with the language-guided head: the class-name targets are the prototypes
# ---------------------------------------------------------------------------


def test_with_a_language_head_the_targets_are_the_prototypes(tmp_path) -> None:
    """prd + language_head (real MiniLM targets): no prototype is learned (the bank keeps
    class ids only), the distillation is exactly 0.0 at each task's first batch, the
    targets stay bit-identical, and a prediction is the nearest target by cosine in the
    projected space: the argmax of the semantic head's logits over the seen classes."""
    from clsim.models.heads import SemanticHead
    from clsim.text_encoder import encode_class_names

    plugins = (
        f"[language_head, {{{REF}: {{projector_hidden: 16, projector_dim: 8, crop_padding: 1,"
        " flip: false, lr: 0.05}}]"
    )
    text = scenario().replace(
        f"    plugins:\n      - {REF}: {{projector_hidden: 16, projector_dim: 8, crop_padding: 1,"
        " flip: false, lr: 0.05}\n",
        f"    plugins: {plugins}\n",
    )
    assert "language_head" in text
    result = run_scenario(parse_scenario(text), tmp_path)
    strategy = result.summary["strategies"]["prd"]
    assert strategy["status"] == "ok", strategy["error"]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    first = [e for e in events if e["event"] == "prd_first_batch"]
    assert [e["distill"] for e in first] == [0.0] * 5
    assert all(e["proto"] > 0 for e in first)
    parts = strategy["ledger"][-1]["parts"]
    assert not any("groups" in name for name in parts)  # no learned prototype rows
    assert parts["model.buffers"] == 10 * 384 * 4  # the targets, charged with the model

    # the same composition driven by hand, to compare predictions with the head's logits
    from clsim_plugins.language_head import LanguageHeadOptions, LanguageHeadPlugin

    dataset = load_dataset("digits")
    stream = class_incremental(dataset, seed=0, n_experiences=5)
    torch.manual_seed(0)
    model = build_model("mlp", dataset.sample_shape, 10, MLPOptions(hidden=[32]))
    ctx = bare_context(model, dataset, strategy="prd", batch_size=64, labels=stream.labels)
    LanguageHeadPlugin(LanguageHeadOptions()).clsim_setup(ctx=ctx)
    plugin = PrdPlugin(SMALL)
    plugin.clsim_setup(ctx=ctx)
    head = ctx.model.head
    assert isinstance(head, SemanticHead)
    targets = encode_class_names(dataset.class_names, "a photo of a {name}.")
    projection = head.projection.weight.detach().clone()
    for exp in stream[:2]:
        train(plugin, ctx, exp)
    assert len(plugin.prototypes.groups) == 0 and len(plugin.prototypes) == 4
    assert torch.equal(head.targets, targets)
    assert not torch.equal(head.projection.weight, projection)  # the projection learns
    seen = plugin.prototypes.classes
    x = ctx.to_input(torch.cat([exp.test_x for exp in stream[:2]]))
    ctx.model.eval()
    with torch.no_grad():
        logits = ctx.model(x)[:, seen]
        predicted = plugin.clsim_predict(ctx=ctx, x=x, task_id=None)
    assert torch.equal(predicted, seen[logits.argmax(1)])
