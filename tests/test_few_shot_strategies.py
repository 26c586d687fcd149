"""The few-shot continual strategies (METHODS.md section 8): prototype_fscil, fast_slow, nmc.

Exact properties: nmc's means and predictions do not depend on class order or batching;
prototype_fscil freezes everything after the base session and adds each class as the
normalised mean of exactly its shots; fast_slow's slow weights follow the interpolation
formula bit for bit and reduce to the prototype baseline at step 0; the ledger names
what each one holds; bad options name their key. One loop: prototype_fscil's base and
fast_slow's sessions train in the standard loop (the scenario's optimizer class and
learning rate reach their parameters, a NaN loss meets training.nonfinite_loss), and
prototype_fscil's sessions run no batch at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clsim_plugins.fast_slow import FastSlowOptions, FastSlowPlugin
from clsim_plugins.nmc import NmcOptions, NmcPlugin, nearest_mean
from clsim_plugins.prototype_fscil import PrototypeFscilOptions
from clsim_plugins.prototypes import class_prototypes, fixed_chunk_features, frozen
from helpers import bare_context

from clsim.config import OptimizerConfig, TrainingConfig, parse_scenario
from clsim.data import load_dataset
from clsim.errors import ConfigError
from clsim.loop_types import ExperiencePlan
from clsim.models import MLPOptions, build_model
from clsim.plugin_manager import HookRunner, build_plugin_manager
from clsim.runner import run_scenario
from clsim.stream import Experience
from clsim.streams.few_shot import few_shot
from clsim.training import Trainer

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
SPY = f"{__name__}:Spy"
SNAPSHOTS = f"{__name__}:Snapshots"
SPY_RECORD: dict = {}  # filled by Spy during an engine run (kept off the ledger)


class Snapshots:
    """A test plugin listed after the plugin under test: snapshots the model before and
    after each experience, and the prototypes expected of its classes. No loop hook, so
    it may sit beside a plugin that owns experiences (nmc)."""

    def clsim_before_experience(self, ctx, experience) -> None:
        SPY_RECORD.setdefault("before", []).append(
            {k: v.detach().clone() for k, v in ctx.model.state_dict().items()})

    def clsim_after_experience(self, ctx, experience) -> None:
        SPY_RECORD.setdefault("after", []).append(
            {k: v.detach().clone() for k, v in ctx.model.state_dict().items()})
        expected = {}
        for c in experience.classes:  # what prototype_fscil should hold for class c
            shots = experience.train_x[experience.train_y == c]
            features = fixed_chunk_features(ctx, shots, PrototypeFscilOptions().feature_batch)
            labels = torch.full((len(shots),), c)
            row = class_prototypes(features, labels, torch.tensor([c]))
            drop_one = class_prototypes(features[1:], labels[1:], torch.tensor([c]))
            expected[c] = (len(shots), F.normalize(row.float(), dim=1)[0],
                           F.normalize(drop_one.float(), dim=1)[0])
        SPY_RECORD.setdefault("expected", []).append(expected)


class Spy(Snapshots):
    """:class:`Snapshots`, and counts the optimizer steps of each experience."""

    def clsim_after_update(self, ctx, batch) -> None:
        steps = SPY_RECORD.setdefault("steps", {})
        steps[ctx.experience.index] = steps.get(ctx.experience.index, 0) + 1


@pytest.fixture
def spy():
    SPY_RECORD.clear()
    yield SPY_RECORD
    SPY_RECORD.clear()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def fscil_yaml(strategies: str, *, stream: str | None = None, extra: str = "") -> str:
    """The fscil_quick stream (4 base digits, 3 sessions of 2-way 5-shot), mlp [32];
    another ``stream`` may be given (an online one trains 1 epoch)."""
    epochs = 1 if stream and "online: true" in stream else 3
    stream = stream or "{type: few_shot, base_classes: 4, ways: 2, shots: 5, sessions: 3}"
    return f"""\
name: t
seed: 0
threads: 1
data: {{dataset: digits}}
stream: {stream}
model: {{name: mlp, hidden: [32]}}
training: {{epochs: {epochs}, batch_size: 32, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}
{extra}strategies:
{strategies}"""


def run(yaml_text: str) -> dict:
    return run_scenario(parse_scenario(yaml_text), None).summary["strategies"]


def ok(result: dict) -> dict:
    assert result["status"] == "ok", result["error"]
    return result


def test_published_defaults() -> None:
    assert PrototypeFscilOptions().scale == 16.0
    assert NmcOptions().metric == "cosine" and not NmcOptions().base_training
    assert NmcOptions().backbone_checkpoint is None
    fs = FastSlowOptions()
    assert (fs.adapt, fs.scale, fs.fast_epochs, fs.fast_lr_scale) == ("last_block", 16.0, 10, 0.2)
    assert (fs.fast_consolidation, fs.slow_step, fs.slow_consolidation) == (1.0, 0.1, 1.0)


# ---------------------------------------------------------------------------
# nmc: order and batching invariance
# ---------------------------------------------------------------------------


def random_encoder(dataset):
    torch.manual_seed(0)
    return build_model("mlp", dataset.sample_shape, dataset.n_classes, MLPOptions(hidden=[48]))


def feed(plugin: NmcPlugin, ctx, x: torch.Tensor, y: torch.Tensor, cuts: list[int]) -> None:
    bounds = [0, *cuts, len(y)]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = Experience(0, (), x[start:stop], y[start:stop], x[:0], y[:0])
        assert plugin.clsim_train_experience(ctx=ctx, experience=part) is True


def test_nmc_means_and_predictions_ignore_class_order_and_batching(digits) -> None:
    """Class-sorted, reversed-class and shuffled orders; parts of 1, 7, 300 samples and
    random cuts: the counts are equal, the float64 means equal the batch-free class means
    of the frozen features to 1e-12, and every test prediction is the same."""
    model = random_encoder(digits)
    ctx = bare_context(model, digits, strategy="n")
    x, y = digits.x_train, digits.y_train
    features = fixed_chunk_features(ctx, x, NmcOptions().feature_batch)  # all at once
    assert torch.allclose(features, ctx.features(x), atol=1e-5)  # = the model's features
    reference = torch.stack([features[y == c].double().mean(0) for c in range(10)])
    test_x = ctx.to_input(digits.x_test)
    g = torch.Generator().manual_seed(3)
    orders = {
        "class sorted": torch.argsort(y, stable=True),
        "classes reversed": torch.argsort(-y, stable=True),
        "shuffled": torch.randperm(len(y), generator=g),
    }
    cut_sets = {
        "one part": [],
        "parts of 7": list(range(7, len(y), 7)),
        "parts of 300": list(range(300, len(y), 300)),
        "random cuts": sorted(set(torch.randint(1, len(y), (40,), generator=g).tolist())),
    }
    predictions = []
    for order in orders.values():
        for cuts in cut_sets.values():
            plugin = NmcPlugin()
            plugin.clsim_setup(ctx)
            feed(plugin, ctx, x[order], y[order], cuts)
            stats = plugin.class_stats
            assert torch.equal(stats.counts, torch.bincount(y, minlength=10))
            assert torch.allclose(stats.means(), reference, rtol=0, atol=1e-12)
            predictions.append(plugin.clsim_predict(ctx=ctx, x=test_x))
    # one sample at a time, in the shuffled order: the extreme batching
    plugin = NmcPlugin()
    plugin.clsim_setup(ctx)
    feed(plugin, ctx, x[orders["shuffled"]][:300], y[orders["shuffled"]][:300],
         list(range(1, 300)))
    feed(plugin, ctx, x[orders["shuffled"]][300:], y[orders["shuffled"]][300:], [])
    assert torch.allclose(plugin.class_stats.means(), reference, rtol=0, atol=1e-12)
    predictions.append(plugin.clsim_predict(ctx=ctx, x=test_x))
    for p in predictions[1:]:
        assert torch.equal(p, predictions[0])
    accuracy = float((predictions[0] == digits.y_test).double().mean())
    assert accuracy > 0.8  # random 48-wide ReLU features of digits separate well
    for p in model.parameters():
        assert not p.requires_grad  # frozen: nmc never trains the model as built


def test_nmc_same_final_accuracy_for_any_stream_shape() -> None:
    """Through the engine: 5 experiences in index order; 2 experiences in a reversed class
    order; one online stream with hidden boundaries delivered in parts of 37 samples; the
    same digits, so the same final accuracy, exactly."""
    streams = [
        "{type: class_incremental, n_experiences: 5}",
        "{type: class_incremental, n_experiences: 2, class_order: [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]}",
        "{type: class_incremental, n_experiences: 5, online: true, eval_every: 37, "
        "boundaries: hidden}",
        "{type: class_incremental, n_experiences: 10, class_order: [3, 1, 4, 0, 5, 9, 2, 6, "
        "8, 7], online: true, eval_every: 101}",
    ]
    finals = []
    for stream in streams:
        result = ok(run(fscil_yaml("  nmc:\n    plugins: [nmc]\n", stream=stream))["nmc"])
        assert result["ledger"][-1]["parts"]["nmc.class_stats.counts"] == 10 * 8
        finals.append(result["final_accuracy"])
    assert finals == [finals[0]] * len(finals), finals
    assert finals[0] > 0.7


def test_nmc_euclidean_is_the_nearest_mean_by_distance() -> None:
    g = torch.Generator().manual_seed(0)
    f, m = torch.randn(200, 16, generator=g), torch.randn(7, 16, generator=g, dtype=torch.float64)
    assert torch.equal(nearest_mean(f, m, "euclidean"), torch.cdist(f.double(), m).argmin(1))
    cosine = F.normalize(f.double(), dim=1) @ F.normalize(m, dim=1).T
    assert torch.equal(nearest_mean(f, m, "cosine"), cosine.argmax(1))


def test_nmc_base_training_on_few_shot_stream(spy) -> None:
    """base_training: the base session trains the model (and only it); then nothing moves;
    the per-class counts are the base samples and exactly K shots per novel class."""
    result = ok(run(fscil_yaml(f"""\
  nmc:
    plugins:
      - nmc: {{base_training: true}}
      - {SNAPSHOTS}
""", extra="budget: model + 8KB\n"))["nmc"])
    before, after = spy["before"], spy["after"]
    assert not torch.equal(before[0]["features.1.weight"], after[0]["features.1.weight"])
    for state in after[1:]:
        assert all(torch.equal(state[k], after[0][k]) for k in state)
    assert not result["over_budget"] and not result["memory_estimated"]
    parts = result["ledger"][-1]["parts"]
    assert set(parts) == {"model.parameters", "nmc.class_stats.sums", "nmc.class_stats.counts"}
    assert parts["nmc.class_stats.sums"] == 10 * 32 * 8
    fs = result["few_shot"]
    assert len(fs["session_accuracy"]) == 4 and fs["novel_accuracy"][0] is None


def test_nmc_backbone_checkpoint(tmp_path, digits) -> None:
    """A features state_dict or a whole model's loads into the encoder, frozen; a missing
    file, a wrong width and a non-state-dict name the key backbone_checkpoint."""
    torch.manual_seed(5)
    donor = build_model("mlp", digits.sample_shape, 10, MLPOptions(hidden=[32]))
    torch.save(donor.features.state_dict(), tmp_path / "features.pt")
    torch.save(donor.state_dict(), tmp_path / "model.pt")
    for name in ("features.pt", "model.pt"):
        plugin = NmcPlugin(NmcOptions(backbone_checkpoint=str(tmp_path / name)))
        model = build_model("mlp", digits.sample_shape, 10, MLPOptions(hidden=[32]))
        ctx = bare_context(model, digits)
        plugin.clsim_setup(ctx)
        for key, value in donor.features.state_dict().items():
            assert torch.equal(model.features.state_dict()[key], value)
        assert frozen(model)
    wider = build_model("mlp", digits.sample_shape, 10, MLPOptions(hidden=[40]))
    torch.save(wider.features.state_dict(), tmp_path / "wider.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    strategies = "".join(
        f"  {name}:\n    plugins:\n      - nmc: {{backbone_checkpoint: {tmp_path / file}}}\n"
        for name, file in (("good", "model.pt"), ("wider", "wider.pt"), ("list", "list.pt")))
    summary = run(fscil_yaml(strategies))
    assert ok(summary["good"])["final_accuracy"] > 0.3
    assert "backbone_checkpoint" in summary["wider"]["error"]
    assert "shape mismatches" in summary["wider"]["error"]
    assert "backbone_checkpoint" in summary["list"]["error"]
    assert "expected a state_dict" in summary["list"]["error"]
    with pytest.raises(ConfigError, match=r"nmc\.backbone_checkpoint.*does not exist"):
        parse_scenario(fscil_yaml(
            f"  s:\n    plugins:\n      - nmc: {{backbone_checkpoint: {tmp_path / 'no.pt'}}}\n"))


# ---------------------------------------------------------------------------
# prototype_fscil
# ---------------------------------------------------------------------------


def test_prototype_fscil_freezes_after_base_and_adds_exact_shot_means(spy) -> None:
    """Gradient steps in the base session only; after it every model tensor is bit-identical
    through all sessions except the rows of the classes each session adds, and each such
    row is the normalised mean embedding of exactly its 5 shots."""
    result = ok(run(fscil_yaml(f"""\
  proto:
    plugins: [prototype_fscil, {SPY}]
""", extra="budget: model\n"))["proto"])
    n_base = len(few_shot(load_dataset("digits"), seed=0, base_classes=4, ways=2, shots=5,
                          sessions=3)[0].train_y)
    assert spy["steps"] == {0: 3 * -(-n_base // 32)}  # 3 epochs of batches of 32, base only
    after, expected = spy["after"], spy["expected"]
    base_state = after[0]
    active = base_state["head.active"]
    assert active.nonzero().squeeze(1).tolist() == [0, 1, 2, 3]
    for session in range(1, 4):
        state = after[session]
        for key in state:
            if key.startswith("features."):
                assert torch.equal(state[key], base_state[key]), key
        added = sorted(expected[session])
        assert state["head.active"].nonzero().squeeze(1).tolist() == list(range(4 + 2 * session))
        weight, before = state["head.weight"], after[session - 1]["head.weight"]
        keep = [c for c in range(10) if c not in added]
        assert torch.equal(weight[keep], before[keep])  # nothing else moves
        for c in added:
            shots, row, drop_one = expected[session][c]
            assert shots == 5
            assert torch.equal(weight[c], row)
            assert float(weight[c] @ drop_one) < 1 - 1e-4  # 4 of the shots give another row
    # the base rows are the class means too (of every base training sample)
    assert float(base_state["head.weight"][:4].norm(dim=1).sub(1).abs().max()) < 1e-6
    assert not result["over_budget"] and not result["memory_estimated"]
    assert set(result["ledger"][-1]["parts"]) == {"model.parameters", "model.buffers"}
    assert result["ledger"][-1]["parts"]["model.buffers"] == 10  # the active mask


# ---------------------------------------------------------------------------
# fast_slow
# ---------------------------------------------------------------------------


def by_hand(dataset, options: FastSlowOptions):
    """fast_slow driven without the engine on a 4-base, 2 x 2-way 5-shot digits stream,
    its sessions trained by the standard loop (:class:`Trainer`, SGD lr 0.05 momentum 0.9,
    batches of 8); the base is not trained: its end only sets the prototypes, the Fisher
    and the copy."""
    stream = few_shot(dataset, seed=0, base_classes=4, ways=2, shots=5, sessions=2)
    torch.manual_seed(0)
    model = build_model("mlp", dataset.sample_shape, 10, MLPOptions(hidden=[24, 16]))
    ctx = bare_context(model, dataset, strategy="f", batch_size=8)
    plugin = FastSlowPlugin(options)
    plugin.clsim_setup(ctx)
    config = TrainingConfig(epochs=1, batch_size=8,
                            optimizer=OptimizerConfig(lr=0.05, momentum=0.9))
    hooks = HookRunner(build_plugin_manager([("fast_slow", plugin)]))
    trainer = Trainer(ctx, hooks, config, torch.Generator().manual_seed(0))
    plugin.clsim_before_experience(ctx=ctx, experience=stream[0])
    plugin.clsim_after_experience(ctx=ctx, experience=stream[0])
    return plugin, ctx, stream, trainer


def plastic(plugin) -> dict[str, torch.Tensor]:
    """The model's plastic weights, by name: its last hidden layer and class rows."""
    return dict(plugin.plastic.named_parameters())


def session(plugin, ctx, trainer, experience, check_anchor=None) -> tuple[dict, dict, dict]:
    """Run one session as the engine does; the slow weights before the step (the model's
    plastic weights once the new rows are in), the fast ones (the model's after the
    loop), the slow ones after the step."""
    ctx.experience = experience
    plugin.clsim_before_experience(ctx=ctx, experience=experience)
    if check_anchor is not None:
        check_anchor(dict(plugin.fast.named_parameters()))
    slow_before = {k: v.detach().clone() for k, v in plastic(plugin).items()}
    plan = ExperiencePlan(experience.train_x, experience.train_y, None, ctx.epochs)
    plan = trainer.hooks.chain("clsim_plan_experience", "plan", plan, ExperiencePlan,
                               ctx=ctx, experience=experience)
    assert plan.epochs == plugin.options.fast_epochs and plan.train
    trainer.fit(plan)
    fast = {k: v.detach().clone() for k, v in plastic(plugin).items()}
    plugin.clsim_after_experience(ctx=ctx, experience=experience)
    assert all(torch.equal(p, fast[k]) for k, p in plugin.fast.named_parameters())  # kept
    slow_after = {k: v.detach().clone() for k, v in plastic(plugin).items()}
    assert frozen(ctx.model) and plugin.slow is None
    return slow_before, fast, slow_after


def test_fast_slow_slow_weights_follow_the_interpolation_formula(digits) -> None:
    """S <- S + eps / (1 + mu * Omega) * (F - S), bit for bit, in both sessions; the shared
    layer never moves; Omega has mean 1; the second session's anchor is the first
    session's fast weights (new rows: their prototypes)."""
    options = FastSlowOptions(slow_step=0.3, slow_consolidation=2.0, fast_epochs=4)
    plugin, ctx, stream, trainer = by_hand(digits, options)
    assert set(plastic(plugin)) == {"block.3.weight", "block.3.bias", "head.weight"}
    assert plastic(plugin)["block.3.weight"] is ctx.model.features[3].weight  # the model's
    omega = plugin.importance
    assert set(omega) == set(plastic(plugin))
    mean = sum(float(o.sum()) for o in omega.values()) / sum(o.numel() for o in omega.values())
    assert abs(mean - 1) < 1e-6
    shared = ctx.model.features[1].weight.detach().clone()
    previous_fast: dict = {}

    def check_anchor(anchor: dict) -> None:
        if not previous_fast:
            return
        new = list(stream[2].classes)
        keep = [c for c in range(10) if c not in new]
        for name, value in previous_fast.items():
            if name == "head.weight":
                assert torch.equal(anchor[name][new], ctx.model.head.weight[new])
                assert torch.equal(anchor[name][keep], value[keep])
            else:
                assert torch.equal(anchor[name], value)

    for experience in stream[1:]:
        slow_before, fast, slow_after = session(plugin, ctx, trainer, experience, check_anchor)
        for name in slow_before:
            assert not torch.equal(fast[name], slow_before[name])  # the fast weights learned
            step = 0.3 / (1 + 2.0 * omega[name])
            assert torch.equal(slow_after[name], torch.lerp(slow_before[name], fast[name], step))
            formula = slow_before[name] + step * (fast[name] - slow_before[name])
            assert torch.allclose(slow_after[name], formula, rtol=0, atol=1e-7), name
        previous_fast.update(fast)
        assert torch.equal(ctx.model.features[1].weight, shared)


def test_fast_slow_degenerate_steps(digits) -> None:
    """slow_step 1 with no slow consolidation copies the fast weights into the slow ones;
    slow_step 0 keeps them bit-identical (the new class rows apart)."""
    plugin, ctx, stream, trainer = by_hand(
        digits, FastSlowOptions(slow_step=1.0, slow_consolidation=0))
    _, fast, slow_after = session(plugin, ctx, trainer, stream[1])
    assert all(torch.equal(slow_after[k], fast[k]) for k in fast)
    plugin, ctx, stream, trainer = by_hand(digits, FastSlowOptions(slow_step=0.0))
    slow_before, fast, slow_after = session(plugin, ctx, trainer, stream[1])
    assert all(torch.equal(slow_after[k], slow_before[k]) for k in fast)
    assert not torch.equal(fast["head.weight"], slow_before["head.weight"])


def test_fast_slow_at_step_zero_is_the_prototype_baseline_and_ledger_names_both_copies() -> None:
    """Same seed, same base training: fast_slow with slow_step 0 scores exactly as
    prototype_fscil; with the defaults it is charged for the fast copy and the importance
    (the plastic part: the last hidden layer and the class rows); it keeps within budget
    between sessions, and its peak adds the slow copy a session holds."""
    summary = run(fscil_yaml("""\
  proto:
    plugins: [prototype_fscil]
  step0:
    plugins:
      - fast_slow: {slow_step: 0}
  fast_slow:
    plugins: [fast_slow]
""", extra="budget: 3 models\n"))
    proto, step0, default = ok(summary["proto"]), ok(summary["step0"]), ok(summary["fast_slow"])
    assert step0["accuracy_matrix"] == proto["accuracy_matrix"]
    assert step0["few_shot"] == proto["few_shot"]
    assert default["accuracy_matrix"] != proto["accuracy_matrix"]
    parts = default["ledger"][-1]["parts"]
    assert set(parts) == {"model.parameters", "model.buffers", "fast_slow.fast.parameters",
                          "fast_slow.fast.buffers", "fast_slow.importance"}
    plastic_bytes = (32 * 64 + 32 + 10 * 32) * 4  # mlp [32]: the hidden layer + class rows
    assert parts["fast_slow.fast.parameters"] == parts["fast_slow.importance"] == plastic_bytes
    assert parts["fast_slow.fast.buffers"] == 10
    assert not default["memory_estimated"]
    # between sessions it fits its 3-model budget; while a session trains it also holds a
    # copy of the slow weights (fast_slow.slow), which the peak charges: over by the peak
    assert default["kept_bytes"] <= default["budget_bytes"] < default["peak_bytes"]
    start = next(r for r in default["ledger"] if (r["experience"], r["point"]) == (1, "start"))
    assert default["peak_bytes"] == default["kept_bytes"] + start["parts"]["fast_slow.slow"]
    assert default["over_budget"] is True


# ---------------------------------------------------------------------------
# one loop: the scenario's optimizer and non-finite policy reach every gradient step
# ---------------------------------------------------------------------------

RECORDER = f"{__name__}:Recorder"


class Recorder:
    """A test plugin: per experience, the batches the loop ran (``clsim_before_batch``)
    and each step's optimizer as ``clsim_after_backward`` sees it: its class and its
    parameter groups (the model's parameter names, the learning rate)."""

    def clsim_before_batch(self, ctx, batch) -> None:
        key = (ctx.strategy, ctx.experience.index)
        batches = SPY_RECORD.setdefault("batches", {})
        batches[key] = batches.get(key, 0) + 1

    def clsim_after_backward(self, ctx, batch, loss) -> None:
        names = {id(p): name for name, p in ctx.model.named_parameters()}
        groups = [(sorted(names[id(p)] for p in group["params"]), group["lr"])
                  for group in ctx.optimizer.param_groups]
        steps = SPY_RECORD.setdefault("optimizers", {})
        steps.setdefault((ctx.strategy, ctx.experience.index), []).append(
            (type(ctx.optimizer), groups))


class NanFirstBatch:
    """A test plugin: a NaN loss term on the first batch of every experience from
    ``FIRST`` on (once per strategy and experience)."""

    FIRST = 0

    def clsim_loss(self, ctx, batch, logits) -> torch.Tensor | None:
        key = (ctx.strategy, ctx.experience.index)
        poisoned = SPY_RECORD.setdefault("poisoned", set())
        if key[1] < self.FIRST or key in poisoned:
            return None
        poisoned.add(key)
        return torch.tensor(float("nan"), device=logits.device)


class NanInSessions(NanFirstBatch):
    FIRST = 1


def loop_yaml(strategies: str, extra: str = "") -> str:
    """fscil_yaml with Adam at lr 0.01 and an mlp [32, 16] (its last hidden layer is
    fast_slow's plastic block, the first is not)."""
    return fscil_yaml(strategies, extra=extra).replace(
        "optimizer: {name: sgd, lr: 0.05, momentum: 0.9}", "optimizer: {name: adam, lr: 0.01}"
    ).replace("hidden: [32]", "hidden: [32, 16]")


def test_training_runs_in_the_standard_loop_under_the_scenarios_optimizer(spy) -> None:
    """Adam at lr 0.01: both base sessions train every model parameter with Adam at 0.01;
    each fast_slow session trains exactly the plastic weights (last hidden layer and class
    rows) with Adam at 0.01 * fast_lr_scale, fast_epochs batches (10 shots: one batch per
    epoch); prototype_fscil's sessions run no batch at all."""
    summary = run(loop_yaml(f"""\
  fs:
    plugins:
      - fast_slow: {{fast_epochs: 4, fast_lr_scale: 0.5}}
      - {RECORDER}
  proto:
    plugins: [prototype_fscil, {RECORDER}]
"""))
    ok(summary["fs"]), ok(summary["proto"])
    optimizers, batches = spy["optimizers"], spy["batches"]
    every = ["features.1.bias", "features.1.weight", "features.3.bias", "features.3.weight",
             "head.weight"]
    plastic_names = ["features.3.bias", "features.3.weight", "head.weight"]
    for strategy in ("fs", "proto"):
        base = optimizers[(strategy, 0)]
        assert len(base) == batches[(strategy, 0)] > 0
        assert all(step == (torch.optim.Adam, [(every, 0.01)]) for step in base)
    for index in (1, 2, 3):
        steps = optimizers[("fs", index)]
        assert len(steps) == batches[("fs", index)] == 4
        assert all(step == (torch.optim.Adam, [(plastic_names, 0.005)]) for step in steps)
    assert {key for key in batches if key[0] == "proto"} == {("proto", 0)}
    assert {key for key in optimizers if key[0] == "proto"} == {("proto", 0)}


@pytest.mark.parametrize("policy", ["skip_batch", "stop"])
def test_a_nan_loss_meets_training_nonfinite_loss(spy, policy) -> None:
    """A NaN loss term in each fast_slow session's first batch, in prototype_fscil's
    base session's first batch: skip_batch skips exactly those batches (3 and 1) and the
    runs end ok; stop fails each strategy naming the experience."""
    summary = run(loop_yaml(f"""\
  fs:
    plugins: [fast_slow, {__name__}:NanInSessions]
  proto:
    plugins: [prototype_fscil, {__name__}:NanFirstBatch]
""").replace("batch_size: 32,", f"batch_size: 32, nonfinite_loss: {policy},"))
    if policy == "skip_batch":
        assert ok(summary["fs"])["skipped_batches"] == 3
        assert ok(summary["proto"])["skipped_batches"] == 1
    else:
        for name, index in (("fs", 1), ("proto", 0)):
            error = summary[name]["error"]
            assert "loss became nan" in error and f"of experience {index}" in error, error


def test_fast_slow_sessions_keep_the_base_batchnorm_statistics(spy) -> None:
    """small_cnn, BatchNorm in both blocks, the second plastic: the loop sets the model
    to train mode in each session, yet every buffer is bit-identical across the sessions
    (the frozen model runs in eval mode) while the plastic conv weights move."""
    yaml = fscil_yaml(f"  fs:\n    plugins: [fast_slow, {SNAPSHOTS}]\n").replace(
        "model: {name: mlp, hidden: [32]}", "model: {name: small_cnn, channels: [8, 8]}")
    ok(run(yaml)["fs"])
    for before, after in zip(spy["before"][1:], spy["after"][1:], strict=True):
        buffers = [k for k in before if "running" in k or "num_batches" in k]
        assert len(buffers) == 6  # two BatchNorms: mean, var, count
        assert all(torch.equal(before[k], after[k]) for k in buffers)
        assert torch.equal(before["features.0.0.weight"], after["features.0.0.weight"])
        assert not torch.equal(before["features.1.0.weight"], after["features.1.0.weight"])


# ---------------------------------------------------------------------------
# the shipped scenarios and bad input
# ---------------------------------------------------------------------------


def test_quick_scenario_runs_every_strategy_within_budget() -> None:
    """scenarios/fscil_strategies_quick.yaml: every strategy ok and within its budget, each
    ledger naming its own parts; the frozen-mean strategies keep far more of the base
    classes than naive fine-tuning."""
    summary = run((SCENARIOS / "fscil_strategies_quick.yaml").read_text())
    expected_parts = {
        "naive": {"model.parameters"},
        "prototype_fscil": {"model.parameters", "model.buffers"},
        "fast_slow": {"model.parameters", "model.buffers", "fast_slow.fast.parameters",
                      "fast_slow.fast.buffers", "fast_slow.importance"},
        "nmc": {"model.parameters", "nmc.class_stats.sums", "nmc.class_stats.counts"},
        "nmc_random": {"model.parameters", "nmc.class_stats.sums", "nmc.class_stats.counts"},
    }
    for name, parts in expected_parts.items():
        result = ok(summary[name])
        # fast_slow's slow copy, held while a session trains, is over its budget by the
        # peak (test_fast_slow_at_step_zero_...); what it keeps between sessions fits
        assert result["kept_bytes"] <= result["budget_bytes"], name
        assert result["over_budget"] is (name == "fast_slow"), name
        assert set(result["ledger"][-1]["parts"]) == parts, name
        assert len(result["few_shot"]["session_accuracy"]) == 4
    naive_base = summary["naive"]["few_shot"]["base_accuracy"][-1]
    for name in ("prototype_fscil", "fast_slow", "nmc"):
        assert summary[name]["few_shot"]["base_accuracy"][-1] > naive_base + 0.5, name


@pytest.mark.parametrize(
    ("plugin", "key"),
    [
        ("nmc: {metric: manhattan}", "nmc.metric"),
        ("nmc: {feature_batch: 0}", "nmc.feature_batch"),
        ("prototype_fscil: {scale: 0}", "prototype_fscil.scale"),
        ("fast_slow: {slow_step: 1.5}", "fast_slow.slow_step"),
        ("fast_slow: {adapt: encoder}", "fast_slow.adapt"),
        ("fast_slow: {fast_lr_scale: -1}", "fast_slow.fast_lr_scale"),
        ("fast_slow: {fast_lr: 0.01}", "fast_slow.fast_lr"),  # the private SGD's, gone
        ("fast_slow: {fast_consolidaton: 1}", "fast_slow.fast_consolidaton"),
    ],
)
def test_bad_options_name_the_key(plugin: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(fscil_yaml(f"  s:\n    plugins:\n      - {plugin}\n"))
    assert f"strategies.s.plugins[0].{key}" in str(info.value)


def test_unsupported_streams_are_refused_with_the_reason() -> None:
    """Hidden boundaries: prototype_fscil and fast_slow need the base session to end; nmc
    with base_training names that key. An mlp without hidden layers has no block to adapt."""
    hidden = "{type: class_incremental, n_experiences: 5, online: true, boundaries: hidden}"
    summary = run(fscil_yaml("""\
  proto:
    plugins: [prototype_fscil]
  fast_slow:
    plugins: [fast_slow]
  nmc_base:
    plugins:
      - nmc: {base_training: true}
  nmc:
    plugins: [nmc]
""", stream=hidden))
    for name in ("proto", "fast_slow"):
        assert "needs task boundaries" in summary[name]["error"]
    assert "base_training" in summary["nmc_base"]["error"]
    ok(summary["nmc"])
    linear = fscil_yaml("  fs:\n    plugins: [fast_slow]\n").replace("hidden: [32]", "hidden: []")
    assert "use adapt: head" in run(linear)["fs"]["error"]
