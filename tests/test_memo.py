"""MEMO (METHODS.md section 2): the backbone split, the memory-aligned arithmetic of the
paper exactly, block expansion and freezing, head growth, weight alignment, the aux head,
and an end-to-end run on digits within its budget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from clsim_plugins.memo import (
    CIFAR_SAMPLE_BYTES,
    RESNET32_BLOCK_PARAMETERS,
    RESNET32_PARAMETERS,
    RESNET32_SHARED_PARAMETERS,
    MemoFeatures,
    MemoHead,
    MemoOptions,
    MemoPlugin,
    align_weights,
    memo_exemplar_arithmetic,
    memory_mb,
    model_as_exemplars,
    parameter_bytes,
    split_backbone,
)
from clsim_plugins.replay import ReplayOptions, ReplayPlugin
from helpers import bare_context
from torch import nn

from clsim.budget import Budget
from clsim.config import parse_scenario
from clsim.context import RunContext
from clsim.data import load_dataset
from clsim.data.dataset import Dataset
from clsim.errors import ConfigError
from clsim.labels import LabelSpace
from clsim.loop_types import ForwardOutput
from clsim.memory import measure
from clsim.models import (
    ConvNet2Options,
    MLPOptions,
    ResNetOptions,
    SmallCNNOptions,
    build_model,
    parameter_count,
)
from clsim.models.heads import MASK_VALUE, target_head
from clsim.runner import run_scenario
from clsim.stream import Experience

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "memo_quick.yaml"
# The paper's memory-aligned budget: ten ResNet-32s (float32 parameters) + 2000 CIFAR
# exemplars = 10 * 463,504 * 4 + 2000 * 3072 = 18,540,160 + 6,144,000 bytes.
PAPER_BUDGET = 24_684_160


# ---------------------------------------------------------------------------
# the paper's arithmetic, exactly
# ---------------------------------------------------------------------------


def test_one_resnet32_is_603_cifar_exemplars() -> None:
    """463,504 x 4 bytes / 3072 bytes per 32x32x3 image = 603.52: the title's 603."""
    assert CIFAR_SAMPLE_BYTES == 3072
    assert round(RESNET32_PARAMETERS * 4 / CIFAR_SAMPLE_BYTES, 2) == 603.52
    assert model_as_exemplars(RESNET32_PARAMETERS, CIFAR_SAMPLE_BYTES) == 603
    assert RESNET32_SHARED_PARAMETERS + RESNET32_BLOCK_PARAMETERS == RESNET32_PARAMETERS


def test_memory_points_in_mb() -> None:
    """(parameters x 4 + exemplars x 3072) / 2^20: one ResNet-32 + 2000 = 7.63 MB, ten
    ResNet-32s + 2000 = 23.54 MB (the ends of the CIFAR budget axis)."""
    assert round(memory_mb(RESNET32_PARAMETERS, 2000, 3072), 2) == 7.63
    assert round(memory_mb(10 * RESNET32_PARAMETERS, 2000, 3072), 2) == 23.54
    assert 10 * RESNET32_PARAMETERS * 4 + 2000 * 3072 == PAPER_BUDGET


def test_memo_and_single_backbone_exemplars_at_the_largest_budget() -> None:
    """At ten ResNet-32s + 2000 exemplars, MEMO after ten tasks (G + 10 S) keeps 3312
    exemplars, a single ResNet-32 7431 (parameters only, the paper's convention)."""
    memo = memo_exemplar_arithmetic(
        PAPER_BUDGET, RESNET32_SHARED_PARAMETERS, RESNET32_BLOCK_PARAMETERS, 10, 3072
    )
    single = memo_exemplar_arithmetic(
        PAPER_BUDGET, RESNET32_SHARED_PARAMETERS, RESNET32_BLOCK_PARAMETERS, 1, 3072
    )
    assert (memo, single) == (3312, 7431)
    # (24,684,160 - 4 * 3,626,896) / 3072 = 3312.68; (24,684,160 - 1,854,016) / 3072 = 7431.69
    assert PAPER_BUDGET - 4 * (112_016 + 10 * 351_488) == 10_176_576


@pytest.mark.parametrize("text", ["18540160 + 2000 exemplars", "10 models + 2000 exemplars"])
def test_the_paper_budget_in_clsim_syntax(text: str) -> None:
    """Written in clsim's budget syntax ('model' = the paper's ResNet-32 bytes)."""
    budget = Budget.parse(text).resolve(model_bytes=RESNET32_PARAMETERS * 4, sample_bytes=3072)
    assert budget == PAPER_BUDGET


def test_resnet32_split_matches_the_paper() -> None:
    """clsim's ResNet-32 splits into G = stem + stage1 + stage2 (112,016 parameters) and
    S = stage3 + pool (351,488); the 100-class head (6,500) is separate."""
    model = build_model("resnet", (3, 32, 32), 100, ResNetOptions(depth=32))
    shared, block = split_backbone(model.features)
    assert list(dict(shared.named_children())) == ["stem", "stage1", "stage2"]
    assert list(dict(block.named_children())) == ["stage3", "pool"]
    assert parameter_count(shared) == RESNET32_SHARED_PARAMETERS
    assert parameter_count(block) == RESNET32_BLOCK_PARAMETERS
    assert parameter_count(model.features) == RESNET32_PARAMETERS
    assert parameter_count(model.head) == 64 * 100 + 100
    assert block(shared(torch.zeros(2, 3, 32, 32))).shape == (2, 64)


# ---------------------------------------------------------------------------
# the plugin's own capacity computation on the paper's setting
# ---------------------------------------------------------------------------


def cifar_dataset() -> Dataset:
    """CIFAR-100-shaped data: one random image per class."""
    names = tuple(f"c{i}" for i in range(100))
    x = torch.randint(
        0, 256, (100, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    y = torch.arange(100)
    return Dataset("cifar-shaped", x, y, x, y, names)


def dataset_of(ctx: RunContext) -> Dataset:
    """The samples behind a hand-built context (a plugin's ``ctx.data`` holds none)."""
    return cifar_dataset() if ctx.data.name == "cifar-shaped" else load_dataset("digits")


def cifar_context(budget: int) -> RunContext:
    """A CIFAR-100-shaped context (one random image per class) with clsim's ResNet-32."""
    dataset = cifar_dataset()
    torch.manual_seed(0)
    model = build_model("resnet", (3, 32, 32), 100, ResNetOptions(depth=32))
    return bare_context(
        model,
        dataset,
        strategy="memo",
        batch_size=8,
        budget_bytes=budget,
        labels=LabelSpace.flat(dataset.class_names),
    )


def experience_of(ctx: RunContext, index: int, classes: tuple[int, ...]) -> Experience:
    """The experience of ``classes`` as training hooks see it (no test samples)."""
    ds = dataset_of(ctx)
    train = torch.isin(ds.y_train, torch.tensor(classes))
    return Experience(
        index, classes, ds.x_train[train], ds.y_train[train], ds.x_test[:0], ds.y_test[:0]
    )


def set_up(plugin: MemoPlugin | ReplayPlugin, ctx: RunContext) -> None:
    """What the engine does before the first experience: every plugin sets up, then the
    stores sized from the budget are sized."""
    plugin.clsim_setup(ctx=ctx)
    plugin.clsim_size_stores(ctx=ctx)


def begin(plugin: MemoPlugin, ctx: RunContext, exp: Experience) -> None:
    """What the engine does before training an experience."""
    ctx.seen_classes.extend(c for c in exp.classes if c not in ctx.seen_classes)
    ctx.experience = exp
    plugin.clsim_before_experience(ctx=ctx, experience=exp)


def ten_tasks_without_training(parameters_only: bool) -> tuple[list[int], RunContext, MemoPlugin]:
    """Capacities at setup and after each of ten expansions of B0-Inc10 on CIFAR-100."""
    ctx = cifar_context(
        Budget.parse("18540160 + 2000 exemplars").resolve(
            model_bytes=0, sample_bytes=CIFAR_SAMPLE_BYTES
        )
    )
    plugin = MemoPlugin(MemoOptions(parameters_only=parameters_only))
    set_up(plugin, ctx)
    capacities = [plugin.buffer.capacity]
    for t in range(10):
        exp = experience_of(ctx, t, tuple(range(10 * t, 10 * t + 10)))
        begin(plugin, ctx, exp)
        capacities.append(plugin.buffer.capacity)
        plugin.clsim_after_experience(ctx=ctx, experience=exp)
        if not parameters_only:  # the ledger's reading fits, and one more would not
            total = measure(ctx.model, [("memo", plugin)]).total_bytes
            assert total <= ctx.budget_bytes < total + CIFAR_SAMPLE_BYTES + 1
    return capacities, ctx, plugin


def test_plugin_capacity_is_the_papers_in_parameters_only_mode() -> None:
    """With the budget of ten ResNet-32s + 2000 exemplars, the plugin's own sizing gives
    7431 exemplars with G + S_1 (a single ResNet-32) and 3312 with G + 10 blocks."""
    capacities, ctx, plugin = ten_tasks_without_training(parameters_only=True)
    assert capacities[1] == 7431
    assert capacities[-1] == 3312
    assert len(ctx.model.features.blocks) == 10
    features = ctx.model.features  # G and the blocks (the aux head is not the paper's)
    assert parameter_bytes(features.shared) + parameter_bytes(features.blocks) == 4 * (
        112_016 + 10 * 351_488
    )
    # every step in between is the same formula with one block more
    for n_blocks, capacity in enumerate(capacities[1:], start=1):
        assert capacity == memo_exemplar_arithmetic(PAPER_BUDGET, 112_016, 351_488, n_blocks, 3072)
    # the exemplars kept: an even share per seen class (one image per class here)
    assert len(plugin.buffer) == 100


def test_ledger_mode_counts_slightly_more() -> None:
    """Counted as the ledger does (BatchNorm buffers, the grown head and the aux head,
    one label byte per exemplar, bookkeeping), MEMO keeps 3207 after ten tasks; a
    single-backbone replay (ResNet-32 + 100-class head) under the same budget 7417."""
    capacities, ctx, plugin = ten_tasks_without_training(parameters_only=False)
    assert capacities[-1] == 3207
    assert capacities[1] == 7424  # G + S_1 with a 10-class head
    replay_ctx = cifar_context(PAPER_BUDGET)
    replay = ReplayPlugin(ReplayOptions(selection="herding"))
    set_up(replay, replay_ctx)
    assert replay.buffer.capacity == 7417
    # the head: 100 classes over 10 x 64 features, and an aux head of 10 new + 1 outputs
    head = ctx.model.head
    assert tuple(head.weight.shape) == (100, 640)
    assert tuple(plugin.aux_head.weight.shape) == (11, 64)
    # the plugin's account of its parts adds up to the ledger's model and exemplars
    parts = plugin.memory_parts(ctx)
    bn_buffers = 9336  # running mean / var and counters of all 31 BatchNorms of ResNet-32
    assert parts["shared"] + parts["block_0"] == 4 * RESNET32_PARAMETERS + bn_buffers
    assert all(parts[f"block_{i}"] == parts["block_0"] for i in range(10))
    assert parts["head"] == 4 * (100 * 640 + 100) + 8 * 100  # + the class-id buffer
    assert parts["aux_head"] == 4 * (11 * 64 + 11)
    # the aux head is the plugin's, charged under memo, not in the model
    model_parts = sum(v for k, v in parts.items() if k not in ("exemplars", "aux_head"))
    assert model_parts == measure(ctx.model).total_bytes
    ledger = measure(ctx.model, [("memo", plugin)]).parts
    assert ledger["memo.aux_head.parameters"] == parts["aux_head"]
    assert parts["exemplars"] == 3207 * (3072 + 1)


# ---------------------------------------------------------------------------
# the network: split, expansion, freezing, heads
# ---------------------------------------------------------------------------


def test_split_of_the_small_backbones() -> None:
    """convnet2: G = block1, S = block2 + pool; small_cnn: S = the last conv block;
    mlp: S = the last hidden layer; an mlp without hidden layers cannot be split."""
    convnet = build_model("convnet2", (1, 8, 8), 10, ConvNet2Options(channels=8))
    shared, block = split_backbone(convnet.features)
    assert list(dict(shared.named_children())) == ["block1"]
    assert list(dict(block.named_children())) == ["block2", "pool"]
    cnn = build_model("small_cnn", (1, 8, 8), 10, SmallCNNOptions(channels=[4, 6, 8]))
    shared, block = split_backbone(cnn.features)
    assert len(shared) == 2 and len(block) == 2
    assert block(shared(torch.zeros(1, 1, 8, 8))).shape == (1, 8)
    mlp = build_model("mlp", (1, 8, 8), 10, MLPOptions(hidden=[32, 16]))
    shared, block = split_backbone(mlp.features)
    assert parameter_count(shared) == 64 * 32 + 32
    assert parameter_count(block) == 32 * 16 + 16
    with pytest.raises(ConfigError, match="hidden layer"):
        split_backbone(build_model("mlp", (1, 8, 8), 10, MLPOptions(hidden=[])).features)
    with pytest.raises(ConfigError, match="Sequential"):
        split_backbone(nn.Linear(3, 3))


def digits_context(budget: int | None = None, channels: int = 8) -> RunContext:
    dataset = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("convnet2", dataset.sample_shape, 10, ConvNet2Options(channels=channels))
    return bare_context(
        model,
        dataset,
        strategy="memo",
        batch_size=32,
        budget_bytes=budget,
        labels=LabelSpace.flat(dataset.class_names),
    )


def test_old_blocks_are_frozen_and_stay_in_eval_mode() -> None:
    """add_block: the old block loses requires_grad and stays in eval mode through
    model.train(); the new one is an exact, trainable copy."""
    ctx = digits_context()
    plugin = MemoPlugin(MemoOptions(capacity=40))
    set_up(plugin, ctx)
    features = ctx.model.features
    assert isinstance(features, MemoFeatures)
    features.add_block()
    old, new = features.blocks
    ctx.model.train()
    assert not old.training and new.training and features.shared.training
    assert not any(p.requires_grad for p in old.parameters())
    assert all(p.requires_grad for p in new.parameters())
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr()
    x_train = dataset_of(ctx).x_train
    ctx.features(x_train[:4])  # eval and back
    assert ctx.model.training and not old.training
    # the features are the concatenation [S_1(G(x)); S_2(G(x))]
    ctx.model.eval()
    x = ctx.to_input(x_train[:4])
    g = features.shared(x)
    assert torch.equal(features(x), torch.cat([old(g), new(g)], dim=1))


def test_head_grows_copying_old_weights_and_the_aux_head_has_new_plus_one() -> None:
    """At task 1 the head covers old + new classes over both blocks' features, its
    old-class x old-feature block is the old head exactly, the aux head has 2 + 1 outputs
    (old classes collapse to label 0), and unseen classes get masked logits."""
    ctx = digits_context(budget=None)
    plugin = MemoPlugin(MemoOptions(capacity=40))
    set_up(plugin, ctx)
    exp0 = experience_of(ctx, 0, (3, 7))
    begin(plugin, ctx, exp0)
    head0 = ctx.model.head
    assert tuple(head0.weight.shape) == (2, 8) and plugin.aux_head is None
    assert plugin.clsim_trainable(ctx=ctx) is None
    with torch.no_grad():
        head0.weight.normal_()
        head0.bias.normal_()
    old_w, old_b = head0.weight.detach().clone(), head0.bias.detach().clone()
    plugin.clsim_after_experience(ctx=ctx, experience=exp0)
    exp1 = experience_of(ctx, 1, (1, 5))
    begin(plugin, ctx, exp1)
    head = ctx.model.head
    assert isinstance(head, MemoHead)
    assert head.classes.tolist() == [3, 7, 1, 5]
    assert tuple(head.weight.shape) == (4, 16) and ctx.model.feature_dim == 16
    assert torch.equal(head.weight[:2, :8], old_w)
    assert torch.equal(head.bias[:2], old_b)
    aux = plugin.aux_head
    assert aux.out_features == 3 and aux.in_features == 8
    assert plugin.clsim_trainable(ctx=ctx) is aux
    assert plugin.aux_labels.tolist() == [0, 1, 0, 0, 0, 2, 0, 0, 0, 0]
    logits = ctx.model(ctx.to_input(dataset_of(ctx).x_test[:5]))
    assert logits.shape == (5, 10)
    unseen = [c for c in range(10) if c not in (1, 3, 5, 7)]
    assert bool((logits[:, unseen] == MASK_VALUE).all())
    assert bool((logits[:, [1, 3, 5, 7]] != MASK_VALUE).all())


def test_aux_loss_is_cross_entropy_on_the_newest_block() -> None:
    """clsim_loss = aux_weight x CE(aux(S_t(G(x))), y_aux) with old classes as label 0,
    read from the last block_dim columns of the forward's features; nothing is kept on
    the model between forwards; no aux loss at the first task."""
    ctx = digits_context()
    plugin = MemoPlugin(MemoOptions(capacity=40, aux_weight=0.5, augment=False))
    set_up(plugin, ctx)
    exp0 = experience_of(ctx, 0, (0, 1))
    begin(plugin, ctx, exp0)
    x = dataset_of(ctx).x_train[:16]
    y = torch.tensor([0, 1, 2, 3] * 4)

    def forward() -> ForwardOutput:
        inputs = ctx.to_input(x)
        features = ctx.model.features(inputs)
        return ForwardOutput(inputs, features, ctx.model.head(features), y)

    ctx.model.train()
    assert plugin.clsim_loss(ctx=ctx, output=forward()) is None  # task 0: no aux head
    plugin.clsim_after_experience(ctx=ctx, experience=exp0)
    begin(plugin, ctx, experience_of(ctx, 1, (2, 3)))
    features = ctx.model.features
    output = forward()
    newest = output.features[:, -8:]
    assert torch.equal(newest, features.blocks[1](features.shared(ctx.to_input(x))))
    loss = plugin.clsim_loss(ctx=ctx, output=output)
    expected = 0.5 * F.cross_entropy(plugin.aux_head(newest), torch.tensor([0, 0, 1, 2] * 4))
    assert torch.equal(loss, expected)
    loss.backward()  # reaches the aux head and the newest block, not the frozen one
    assert plugin.aux_head.weight.grad is not None
    assert all(p.grad is None for p in features.blocks[0].parameters())
    assert not any(isinstance(v, torch.Tensor) for v in vars(features).values())


def test_augmentation_is_an_input_hook_with_its_own_generator() -> None:
    """clsim_inputs crops and flips image batches (padding 1 on 8x8 digits) from the
    plugin's generator, the same rows in the same order; augment: false leaves them."""
    from clsim.augment import crop_flip

    ctx = digits_context()
    plugin = MemoPlugin(MemoOptions(capacity=40))
    set_up(plugin, ctx)
    inputs = ctx.to_input(dataset_of(ctx).x_train[:32])
    out = plugin.clsim_inputs(ctx=ctx, inputs=inputs)
    expected = crop_flip(inputs, ctx.torch_generator("memo", "augment"), padding=1)
    assert out.shape == inputs.shape and torch.equal(out, expected)
    assert not torch.equal(out, inputs)
    off = MemoPlugin(MemoOptions(capacity=40, augment=False))
    set_up(off, digits_context())
    assert off.clsim_inputs(ctx=ctx, inputs=inputs) is None


def test_weight_alignment_equalises_mean_row_norms() -> None:
    """After alignment the mean norm of the new rows equals that of the old rows; the old
    rows are untouched and the factor is the ratio of the two means."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(10, 32, generator=g)
    weight[6:] *= 5.0
    before = weight.clone()
    norms = torch.linalg.vector_norm(before, dim=1)
    gamma = align_weights(weight, 6)
    assert gamma == pytest.approx(float(norms[:6].mean() / norms[6:].mean()), rel=1e-6)
    after = torch.linalg.vector_norm(weight, dim=1)
    assert float(after[6:].mean()) == pytest.approx(float(after[:6].mean()), rel=1e-6)
    assert torch.equal(weight[:6], before[:6])
    assert torch.allclose(weight[6:], before[6:] * gamma)
    assert align_weights(weight, 0) == 1.0 and align_weights(weight, 10) == 1.0


# ---------------------------------------------------------------------------
# budget errors
# ---------------------------------------------------------------------------


def test_a_budget_that_cannot_hold_the_next_block_names_the_exact_minimum() -> None:
    """A budget that fits G + S_1 but not S_2 fails at task 1 naming the minimum; at that
    minimum the task starts, one byte less fails again."""

    def run_two_tasks(budget: int) -> MemoPlugin:
        ctx = digits_context(budget)
        plugin = MemoPlugin()
        set_up(plugin, ctx)
        exp0 = experience_of(ctx, 0, (0, 1))
        begin(plugin, ctx, exp0)
        plugin.clsim_after_experience(ctx=ctx, experience=exp0)
        begin(plugin, ctx, experience_of(ctx, 1, (2, 3)))
        return plugin

    model = digits_context().model
    budget = Budget.parse("model + 5 exemplars").resolve(
        model_bytes=measure(model).total_bytes, sample_bytes=64
    )
    with pytest.raises(ConfigError, match="minimum budget is") as info:
        run_two_tasks(budget)
    assert "2 specialized block(s) for experience 1" in str(info.value)
    minimum = int(re.search(r"minimum budget is (\d+) bytes", str(info.value))[1])
    assert run_two_tasks(minimum).buffer.capacity == 4  # one exemplar per seen class
    with pytest.raises(ConfigError, match=f"minimum budget is {minimum} bytes"):
        run_two_tasks(minimum - 1)


def test_setup_errors() -> None:
    """No budget and no capacity; expected_tasks beyond the budget; too small a capacity."""
    with pytest.raises(ConfigError, match="needs 'capacity' or a budget"):
        MemoPlugin().clsim_setup(ctx=digits_context())
    ctx = digits_context(budget=20_000)
    with pytest.raises(ConfigError, match="expected_tasks=10.*at least"):
        set_up(MemoPlugin(MemoOptions(expected_tasks=10)), ctx)
    set_up(MemoPlugin(MemoOptions(expected_tasks=2)), digits_context(budget=20_000))
    ctx = digits_context()
    plugin = MemoPlugin(MemoOptions(capacity=1))
    set_up(plugin, ctx)
    with pytest.raises(ConfigError, match="cannot give each of the 2 seen classes"):
        begin(plugin, ctx, experience_of(ctx, 0, (0, 1)))
    hidden = experience_of(ctx, 0, (0, 1))
    with pytest.raises(ConfigError, match="visible experience boundaries"):
        plugin.clsim_before_experience(
            ctx=ctx,
            experience=Experience(
                0, (), hidden.train_x, hidden.train_y, hidden.test_x[:0], hidden.test_y[:0]
            ),
        )


# ---------------------------------------------------------------------------
# end to end on digits: the scenario file, with a recording subclass
# ---------------------------------------------------------------------------


# Test instrumentation outside the plugin (state on the plugin would count in the ledger).
HISTORY: list[dict] = []


def _states(blocks) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in b.state_dict().items()} for b in blocks]


class RecordingMemo(MemoPlugin):
    """MemoPlugin recording heads and block states around each experience."""

    def clsim_before_experience(self, ctx, experience) -> None:
        head = ctx.model.head
        before = (head.weight.detach().clone(), head.bias.detach().clone())
        super().clsim_before_experience(ctx, experience)
        HISTORY.append(
            {
                "event": "before",
                "head_before": before,
                "head_after": (
                    ctx.model.head.weight.detach().clone(),
                    ctx.model.head.bias.detach().clone(),
                ),
                "blocks": _states(ctx.model.features.blocks),
            }
        )

    def clsim_after_batch(self, ctx) -> None:
        features = ctx.model.features
        frozen = list(features.blocks)[:-1]
        HISTORY.append(
            {
                "event": "batch",
                "model": ctx.model.training,
                "newest": features.blocks[-1].training,
                "frozen_training": any(b.training for b in frozen),
                "frozen_grad": any(p.requires_grad for b in frozen for p in b.parameters()),
            }
        )

    def clsim_after_experience(self, ctx, experience) -> None:
        super().clsim_after_experience(ctx, experience)
        HISTORY.append(
            {
                "event": "after",
                "blocks": _states(ctx.model.features.blocks),
                "shared": _states([ctx.model.features.shared])[0],
                "weight": ctx.model.head.weight.detach().clone(),
                "n_old": self.n_old,
                "stored": self.buffer.stored()[1].bincount(minlength=10).tolist(),
                "capacity": self.buffer.capacity,
                "seen": list(ctx.seen_classes),
            }
        )


@pytest.fixture(scope="module")
def e2e():
    """scenarios/memo_quick.yaml made smaller (8 channels, 1 epoch), with MEMO recorded
    and augmenting (its default)."""
    scenario = yaml.safe_load(SCENARIO.read_text())
    scenario["model"]["channels"] = 8
    scenario["training"]["epochs"] = 1
    scenario["threads"] = 1
    scenario["strategies"]["memo"]["plugins"] = [{f"{__name__}:RecordingMemo": {}}]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent))
        HISTORY.clear()
        summary = run_scenario(parse_scenario(yaml.safe_dump(scenario)), None).summary
        return {"strategies": summary["strategies"], "history": list(HISTORY)}


def test_the_quick_scenario_compares_memo_and_replay_at_one_budget() -> None:
    """The shipped YAML parses; both strategies get the same budget text."""
    config = parse_scenario(SCENARIO.read_text())
    assert set(config.strategies) == {"memo", "replay"}
    budgets = {str(s.budget) for s in config.strategies.values()}
    assert budgets == {"5 models + 200 exemplars"}
    assert config.strategies["memo"].plugins[0].cls is MemoPlugin


def test_e2e_runs_within_budget_and_the_ledger_names_its_parts(e2e) -> None:
    """Both strategies finish within the same budget; MEMO's ledger holds exactly G, five
    blocks, the grown head and the last aux head (as parameters), plus its exemplars,
    filling the budget to less than one exemplar (64 B + 1 label byte)."""
    memo, replay = e2e["strategies"]["memo"], e2e["strategies"]["replay"]
    for s in (memo, replay):
        assert s["status"] == "ok", s["error"]
        assert not s["over_budget"]
    assert memo["final_accuracy"] > 0.2  # chance is 0.1; one epoch per task
    assert memo["budget_bytes"] == replay["budget_bytes"]
    budget = memo["budget_bytes"]
    for record in memo["ledger"]:
        assert record["total_bytes"] <= budget < record["total_bytes"] + 65
    parts = memo["ledger"][-1]["parts"]
    # 8 channels: G = conv 1*9*8 + 8 and BN 16 = 96; S = 8*8*9 + 8 + 16 = 600;
    # head 10 x (5 x 8) + 10 = 410; aux (2 new + 1) x 8 + 3 = 27, charged under memo
    assert parts["model.parameters"] == 4 * (96 + 5 * 600 + 410)
    assert parts["RecordingMemo.aux_head.parameters"] == 4 * 27
    # BN running mean / var (8 + 8 floats) and num_batches_tracked (int64) per BN,
    # one BN in G and one per block; the head's class-id buffer (10 int64)
    assert parts["model.buffers"] == 6 * (16 * 4 + 8) + 10 * 8
    capacity = e2e["history"][-1]["capacity"]
    assert parts["RecordingMemo.buffer.x"] == capacity * 64
    assert parts["RecordingMemo.buffer.y"] == capacity
    assert capacity < replay["ledger"][-1]["parts"]["replay.buffer.x"] // 64


def test_e2e_old_blocks_and_their_batchnorm_statistics_do_not_change(e2e) -> None:
    """Block i, trained in task i, is bit-identical (weights, BN running statistics and
    counters) at the end of every later task; G keeps training; S_t starts as a copy of
    S_{t-1}; during training the frozen blocks are in eval mode without gradients."""
    history = e2e["history"]
    before = [h for h in history if h["event"] == "before"]
    after = [h for h in history if h["event"] == "after"]
    batches = [h for h in history if h["event"] == "batch"]
    assert len(before) == len(after) == 5
    for t in range(1, 5):
        for key, value in before[t]["blocks"][t].items():
            assert torch.equal(value, after[t - 1]["blocks"][t - 1][key]), key
        for i in range(t):
            for key, value in after[i]["blocks"][i].items():
                assert torch.equal(after[t]["blocks"][i][key], value), (t, i, key)
        trained = after[t]["blocks"][t]
        key = "block2.1.running_mean"
        assert not torch.equal(trained[key], before[t]["blocks"][t][key])
        assert not torch.equal(
            after[t]["shared"]["block1.0.weight"], after[t - 1]["shared"]["block1.0.weight"]
        )
    assert all(b["model"] and b["newest"] for b in batches)
    assert not any(b["frozen_training"] or b["frozen_grad"] for b in batches)


def test_e2e_head_growth_alignment_and_exemplars(e2e) -> None:
    """Each growth copies the old head exactly; after each later task the new rows' mean
    norm equals the old rows'; exemplars are an even herding share per seen class."""
    history = e2e["history"]
    before = [h for h in history if h["event"] == "before"]
    after = [h for h in history if h["event"] == "after"]
    for t in range(1, 5):
        old_w, old_b = before[t]["head_before"]
        new_w, new_b = before[t]["head_after"]
        rows, cols = old_w.shape
        assert torch.equal(new_w[:rows, :cols], old_w) and torch.equal(new_b[:rows], old_b)
        assert new_w.shape == (rows + 2, cols + 8)
        norms = torch.linalg.vector_norm(after[t]["weight"], dim=1)
        n_old = after[t]["n_old"]
        assert n_old == 2 * t
        assert float(norms[n_old:].mean()) == pytest.approx(float(norms[:n_old].mean()), rel=1e-5)
    digits = load_dataset("digits")
    available = digits.y_train.bincount(minlength=10).tolist()
    for t, h in enumerate(after):
        seen = h["seen"]
        assert len(seen) == 2 * (t + 1)
        share = h["capacity"] // len(seen)
        assert h["stored"] == [min(share, available[c]) if c in seen else 0 for c in range(10)]


# ---------------------------------------------------------------------------
# training runs in the standard loop
# ---------------------------------------------------------------------------

LOOP: list[dict] = []  # test instrumentation, outside every plugin
POISON: dict[str, int] = {"left": 0}  # batches of experience 1 whose aux loss turns NaN

LOOP_SCENARIO = """\
name: loop
seed: 0
threads: 1
data: {{dataset: digits}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {{name: convnet2, channels: 8}}
training: {{epochs: 1, batch_size: 32, nonfinite_loss: {policy},
           optimizer: {{name: adam, lr: 0.003}}}}
strategies:
  memo:
    plugins:
      - memo_loop_test:{memo}: {{capacity: 40, augment: false, first_epochs: 2,
                                  later_epochs: 1}}
      - memo_loop_test:LoopRecorder
"""


class HandleMemo(MemoPlugin):
    """MEMO that shows the test its aux head and its stored exemplars at each task."""

    def clsim_before_experience(self, ctx, experience) -> None:
        super().clsim_before_experience(ctx, experience)
        LOOP.append({"event": "memo", "aux": self.aux_head,
                     "stored": self.buffer.stored()[1].bincount(minlength=10).tolist()})


class PoisonedMemo(MemoPlugin):
    """MEMO whose aux loss is NaN for the first ``POISON['left']`` batches of task 1."""

    def clsim_loss(self, ctx, output):
        loss = super().clsim_loss(ctx, output)
        if loss is not None and POISON["left"] > 0:
            POISON["left"] -= 1
            return loss * float("nan")
        return loss


class LoopRecorder:
    """Listed after memo: the plan memo left, and the optimizer each batch stepped with."""

    def clsim_plan_experience(self, ctx, experience, plan) -> None:
        LOOP.append({"event": "plan", "experience": experience.index,
                     "classes": list(experience.classes), "n_task": experience.n_train,
                     "n": plan.n_samples, "epochs": plan.epochs,
                     "appended": plan.y[experience.n_train:].bincount(minlength=10).tolist()})

    def clsim_after_batch(self, ctx) -> None:
        optimizer = ctx.optimizer
        features = ctx.model.features
        LOOP.append({
            "event": "batch",
            "experience": ctx.experience.index,
            "optimizer": type(optimizer),
            "lr": {id(p): group["lr"] for group in optimizer.param_groups
                   for p in group["params"]},
            "newest": [id(p) for p in features.blocks[-1].parameters()],
            "frozen": [id(p) for b in list(features.blocks)[:-1] for p in b.parameters()],
            "model": [id(p) for p in ctx.model.parameters() if p.requires_grad],
        })


def run_loop(monkeypatch, memo: str = "HandleMemo", policy: str = "stop") -> dict:
    monkeypatch.setitem(__import__("sys").modules, "memo_loop_test",
                        __import__("sys").modules[__name__])
    LOOP.clear()
    text = LOOP_SCENARIO.format(memo=memo, policy=policy)
    return run_scenario(parse_scenario(text), None).summary["strategies"]["memo"]


def test_memo_trains_in_the_standard_loop(monkeypatch) -> None:
    """The scenario's optimizer (Adam, lr 0.003) steps the blocks, G, the head and the
    plugin's aux head, not the frozen blocks; each later task trains on its samples
    followed by the stored exemplars (capacity 40: 40 // seen classes each); 2 epochs at
    the first task, 1 later, one loop batch per 32 planned samples."""
    outcome = run_loop(monkeypatch)
    assert outcome["status"] == "ok", outcome["error"]
    plans = [r for r in LOOP if r["event"] == "plan"]
    memos = [r for r in LOOP if r["event"] == "memo"]
    assert [p["experience"] for p in plans] == [0, 1, 2, 3, 4]
    for t, (plan, memo) in enumerate(zip(plans, memos, strict=True)):
        assert plan["n"] == plan["n_task"] + sum(memo["stored"])
        assert plan["appended"] == memo["stored"]
        seen = {c for p in plans[:t] for c in p["classes"]}
        assert memo["stored"] == [40 // len(seen) if c in seen else 0 for c in range(10)]
        assert plan["epochs"] == (2 if t == 0 else 1)
        batches = [r for r in LOOP if r["event"] == "batch" and r["experience"] == t]
        assert len(batches) == plan["epochs"] * -(-plan["n"] // 32)
        for batch in batches[:1]:
            assert batch["optimizer"] is torch.optim.Adam
            assert set(batch["lr"].values()) == {0.003}
            aux = [] if memo["aux"] is None else [id(p) for p in memo["aux"].parameters()]
            assert (memo["aux"] is None) == (t == 0)
            assert set(batch["lr"]) == set(batch["model"]) | set(aux)
            assert set(batch["newest"]) <= set(batch["lr"])
            assert not set(batch["frozen"]) & set(batch["lr"])
            assert len(batch["frozen"]) == t * len(batch["newest"])


def test_a_nan_aux_loss_meets_the_scenarios_nonfinite_policy(monkeypatch) -> None:
    """MEMO's aux loss turning NaN on task 1's first two batches: ``skip_batch`` drops
    exactly those two batches and the run finishes; ``stop`` ends the strategy naming
    the experience and the first bad batch."""
    POISON["left"] = 2
    outcome = run_loop(monkeypatch, memo="PoisonedMemo", policy="skip_batch")
    assert outcome["status"] == "ok", outcome["error"]
    assert outcome["skipped_batches"] == 2 and POISON["left"] == 0
    trained = [r for r in LOOP if r["event"] == "batch" and r["experience"] == 1]
    plan = next(r for r in LOOP if r["event"] == "plan" and r["experience"] == 1)
    assert len(trained) == -(-plan["n"] // 32) - 2
    POISON["left"] = 2
    outcome = run_loop(monkeypatch, memo="PoisonedMemo", policy="stop")
    assert outcome["status"] == "failed"
    assert "the loss became nan" in outcome["error"]
    assert "of experience 1 (first at batch 1)" in outcome["error"]


# ---------------------------------------------------------------------------
# MEMO hosting the language-guided head
# ---------------------------------------------------------------------------

LINGO: list[dict] = []  # test instrumentation, outside every plugin


class WideningRecorder:
    """Listed after memo: sees the head memo widened at each task, and the one trained,
    and adds a loss term of its own."""

    def clsim_before_experience(self, ctx) -> None:
        head = ctx.model.head
        LINGO.append({"event": "before", "projection": _projection(head),
                      "active": head.active.clone(), "targets": head.targets.clone(),
                      "blocks": len(ctx.model.features.blocks)})

    def clsim_loss(self, ctx, output):
        """A user's term through the general contract: pull each sample's embedding
        towards its class target, read via target_head (whoever installed the head)."""
        head = target_head(ctx.model)
        LINGO.append({"event": "loss", "width": output.features.shape[1],
                      "masked": bool((output.logits == MASK_VALUE).any())})
        cosine = (head.embed(output.features) * head.targets[output.targets]).sum(1)
        return 0.01 * (1 - cosine).mean()

    def clsim_after_experience(self, ctx) -> None:
        LINGO.append({"event": "after", "projection": _projection(ctx.model.head)})


def _projection(head) -> tuple[torch.Tensor, torch.Tensor]:
    return head.projection.weight.detach().clone(), head.projection.bias.detach().clone()


def test_widened_semantic_head_keeps_the_old_projection_exactly() -> None:
    """The old projection fills the old input columns; an identity becomes [I 0]."""
    from clsim.models.heads import SemanticHead

    targets = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    head = SemanticHead(4, targets, init_scale=3.0, learn_scale=True,
                        generator=torch.Generator().manual_seed(1))
    wide = head.widened(7, generator=torch.Generator().manual_seed(2),
                        active=torch.tensor([True, False, True, False, False]))
    assert torch.equal(wide.projection.weight[:, :4], head.projection.weight)
    assert torch.equal(wide.projection.bias, head.projection.bias)
    assert torch.equal(wide.targets, head.targets) and float(wide.scale.detach()) == 3.0
    features = torch.randn(3, 7)
    features[:, 4:] = 0  # the new inputs silent: the widened head scores as the old one
    assert torch.allclose(wide(features)[:, [0, 2]], head(features[:, :4])[:, [0, 2]])
    assert bool((wide(features)[:, [1, 3, 4]] == MASK_VALUE).all())
    to_text_width = head.widened(6)  # now as wide as the text space: still the trained map
    assert isinstance(to_text_width.projection, nn.Linear)
    assert torch.equal(to_text_width.projection.weight[:, :4], head.projection.weight)
    same = SemanticHead(6, targets, init_scale=1.0, learn_scale=False)  # identity projection
    wide = same.widened(9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(wide.projection.weight[:, :6], torch.eye(6))
    assert not bool(wide.projection.bias.any())
    with pytest.raises(ValueError, match=">= 6 inputs"):
        same.widened(5)


def test_memo_hosts_the_language_head(monkeypatch) -> None:
    """memo + language_head (the real MiniLM targets) + a user's loss plugin: memo widens
    the semantic head's projection at each task, copying the trained one exactly into the
    old columns; the targets stay bit-identical; only seen classes are switched on; the
    user's term sees the concatenated features of every block and masked logits until
    all classes are seen; the run (weight alignment skipped: the rows are fixed targets)
    stays within budget, with the projection and targets charged in the model."""
    from clsim.text_encoder import encode_class_names

    monkeypatch.setitem(__import__("sys").modules, "memo_lingo_test", __import__("sys").modules[
        __name__])
    text = """\
name: t
seed: 0
threads: 1
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: convnet2, channels: 8}
training: {epochs: 1, batch_size: 32, optimizer: {name: sgd, lr: 0.05}}
budget: 200KB
strategies:
  memo_lingo:
    plugins: [{memo: {augment: false}}, language_head, memo_lingo_test:WideningRecorder]
"""
    LINGO.clear()
    result = run_scenario(parse_scenario(text), None)
    outcome = result.summary["strategies"]["memo_lingo"]
    assert outcome["status"] == "ok", outcome["error"]
    assert not outcome["over_budget"]
    before = [r for r in LINGO if r["event"] == "before"]
    after = [r for r in LINGO if r["event"] == "after"]
    assert [r["blocks"] for r in before] == [1, 2, 3, 4, 5]
    names = load_dataset("digits").class_names
    expected_targets = encode_class_names(names, "a photo of a {name}.")
    order = result.summary["class_order"]
    for t, record in enumerate(before):
        assert torch.equal(record["targets"], expected_targets)
        assert record["active"].nonzero().squeeze(1).tolist() == sorted(order[: 2 * (t + 1)])
        weight = record["projection"][0]
        assert weight.shape == (384, 8 * (t + 1))  # convnet2's block is 8 wide
        if t:
            old_weight, old_bias = after[t - 1]["projection"]
            assert torch.equal(weight[:, : 8 * t], old_weight)
            assert torch.equal(record["projection"][1], old_bias)
    losses = [r for r in LINGO if r["event"] == "loss"]
    assert {r["width"] for r in losses} == {8, 16, 24, 32, 40}
    assert losses[0]["masked"] and not losses[-1]["masked"]
    parts = outcome["ledger"][-1]["parts"]
    assert parts["model.buffers"] >= 10 * 384 * 4  # the targets, charged with the model
    assert outcome["final_accuracy"] > 0.3
