"""PL-FMS (METHODS.md section 5): the flexible-sampling probability, importance-based
class-balanced eviction, hierarchy-aware pseudo-labels, the importance EMA, and runs on the
digits HLE scenario within budget, repeatably."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clsim_plugins.pl_fms import (
    HierarchyMemory,
    PlFmsOptions,
    PlFmsPlugin,
    fms_probability,
    hierarchy_targets,
    parents_of,
)
from helpers import bare_context, without_measurements

from clsim.assembly import build_scenario_model, build_stream
from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.errors import ConfigError
from clsim.labels import LabelSpace
from clsim.loop_types import ForwardOutput
from clsim.models.heads import expose_labels
from clsim.runner import run_scenario
from clsim.stream import Batch

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK = (REPO_ROOT / "scenarios" / "pl_fms_quick.yaml").read_text()

# three levels: 2 -> 4 -> 8 classes, each node with two children
TREE = LabelSpace(("a", "b", "c"), (("a0", "a1"), tuple(f"b{i}" for i in range(4)),
                                    tuple(f"c{i}" for i in range(8))),
                  ((), (0, 0, 1, 1), (0, 0, 1, 1, 2, 2, 3, 3)), masked=True)


def quick(**changes: str):
    text = QUICK
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    return parse_scenario(text)


def plugin_on_digits(options: PlFmsOptions, *, stream_length: int | None = None):
    """The plugin set up by hand on the digits HLE stream (the engine's model and labels)."""
    scenario = quick()
    dataset = load_dataset("digits")
    stream = build_stream(scenario, dataset, 0)
    torch.manual_seed(0)
    model = build_scenario_model(scenario, dataset, stream)
    ctx = bare_context(model, dataset, labels=stream.labels, batch_size=16)
    plugin = PlFmsPlugin(replace(options, stream_length=stream_length))
    plugin.clsim_setup(ctx=ctx)
    plugin.clsim_size_stores(ctx=ctx)
    return plugin, ctx, stream


# ---------------------------------------------------------------------------
# flexible memory sampling
# ---------------------------------------------------------------------------


def test_admission_probability_is_the_published_formula_by_hand() -> None:
    assert fms_probability(5, 3, 2, 100) == 2 * 2 / 100
    assert fms_probability(3, 3, 7, 10) == 0.0  # a class's first sample
    assert fms_probability(40, 0, 3, 100) == 1.0  # capped at 1
    plugin, _, _ = plugin_on_digits(PlFmsOptions(capacity=50), stream_length=20)
    # positions 0..5: labels 0 0 1 0 1 2; n_c = 0, 2, 5; |C_seen| grows 1, 1, 2, 2, 2, 3
    first = plugin.admission_probabilities(torch.tensor([0, 0, 1, 0, 1, 2]))
    expected = [0.0, 1 * 1 / 20, 0.0, 3 * 2 / 20, 2 * 2 / 20, 0.0]
    assert first.tolist() == expected
    # the next batch continues the count: positions 6, 7
    assert plugin.admission_probabilities(torch.tensor([2, 0])).tolist() == [1 * 3 / 20, 1.0]
    assert int(plugin.position) == 8
    assert plugin.first_seen[:4].tolist() == [0, 2, 5, -1]


def test_stream_length_defaults_to_the_end_of_the_experience_or_the_samples_so_far() -> None:
    plugin, ctx, stream = plugin_on_digits(PlFmsOptions(capacity=50))
    plugin.clsim_before_experience(ctx=ctx, experience=stream[0])
    assert int(plugin.stream_end) == stream[0].n_train
    p = plugin.admission_probabilities(torch.tensor([3, 3]))
    assert p.tolist() == [0.0, 1 * 1 / stream[0].n_train]
    # hidden boundaries: the experience shows no data; N is the samples seen so far (n + 1)
    hidden = replace(stream[0], train_x=stream[0].train_x[:0], train_y=stream[0].train_y[:0])
    plugin.clsim_before_experience(ctx=ctx, experience=hidden)
    assert int(plugin.stream_end) == 0
    assert plugin.admission_probabilities(torch.tensor([3])).tolist() == [2 * 1 / 3]


def test_a_new_class_is_kept_out_of_the_batch_and_memory_fills_it() -> None:
    """Every label of the first batch is new (probability 0): no stream row is trained on,
    yet all were stored, and the batch is made of memory rows (at most 2 x 16)."""
    plugin, ctx, stream = plugin_on_digits(PlFmsOptions(capacity=50), stream_length=10_000)
    exp = stream[0]
    x, y = exp.train_x[:2], exp.train_y[:2]
    assert y[0] != y[1]
    batch = plugin.clsim_before_batch(ctx=ctx, batch=Batch(x, y))
    assert batch.n_stream == 0 and len(batch) == 2
    assert len(plugin.memory) == 2
    assert sorted(batch.y.tolist()) == sorted(y.tolist())
    plugin.clsim_after_batch()
    # the next batch of 16: the stream part holds exactly the admitted samples, first,
    # and memory rows fill it (up to 32), never repeating a just-admitted sample
    x, y = exp.train_x[2:18], exp.train_y[2:18]
    before = int(plugin.admitted)
    batch = plugin.clsim_before_batch(ctx=ctx, batch=Batch(x, y))
    admitted = int(plugin.admitted) - before
    assert batch.n_stream == admitted
    assert len(plugin.memory) == 18
    assert len(batch) == 18  # every stored sample: admitted once, or drawn from memory


# ---------------------------------------------------------------------------
# memory: class-balanced, importance-based eviction
# ---------------------------------------------------------------------------


def flat_memory(capacity: int) -> HierarchyMemory:
    return HierarchyMemory(capacity, (1,), torch.int64, n_classes=5, n_levels=1)


def offer(memory: HierarchyMemory, value: int, label: int, *, by_importance: bool = True,
          generator: torch.Generator | None = None) -> int:
    return memory.add(torch.tensor([value]), torch.tensor([label]), 0, by_importance=by_importance,
                      generator=generator or torch.Generator().manual_seed(0))


def test_eviction_takes_the_least_important_sample_of_the_largest_class() -> None:
    memory = flat_memory(6)
    for value, label in enumerate([0, 0, 0, 1, 1, 2]):
        offer(memory, value, label)
    memory.importance[:6] = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.05, 0.3])
    # a class-1 sample: counts with it 3, 3, 1 -> the tie goes to class 0, whose least
    # important sample is slot 1; the newcomer starts at its class's mean importance
    assert offer(memory, 10, 1) == 1
    assert memory.x[:6, 0].tolist() == [0, 10, 2, 3, 4, 5]
    assert memory.importance[1] == pytest.approx((0.2 + 0.05) / 2)
    # a class-2 sample: counts 2, 3+1... class 1 is largest; its least important is slot 4
    assert offer(memory, 11, 2) == 4
    assert memory.keys().tolist() == [0, 1, 0, 1, 2, 2]
    assert memory.importance[4] == pytest.approx(0.3)
    # a sample of the largest class itself replaces that class's least important sample
    memory.importance[:6] = torch.tensor([0.5, 0.7, 0.9, 0.6, 0.3, 0.4])
    offer(memory, 12, 2)  # counts with it 2, 2, 3: class 2 gives up slot 4 (0.3 < 0.4)
    assert memory.x[4, 0] == 12 and memory.keys().tolist() == [0, 1, 0, 1, 2, 2]
    # random eviction (the ablation) still takes from the largest class
    offer(memory, 13, 0, by_importance=False)  # counts with it 3, 2, 2: class 0 loses one
    assert sorted(memory.keys().tolist()) == [0, 0, 1, 1, 2, 2]
    assert 13 in memory.x[:6, 0].tolist()


@pytest.mark.parametrize("by_importance", [True, False])
def test_memory_is_class_balanced(by_importance: bool) -> None:
    """Once full, the largest class never grows; classes that each offered at least the
    capacity end within one sample of each other; a class that offered fewer keeps them
    all (it is never the largest). Counts do not depend on which sample a class gives up."""
    generator = torch.Generator().manual_seed(1)
    memory = flat_memory(10)
    largest = 10
    for label in [0] * 12 + [1] * 12 + [2] * 12:
        offer(memory, 0, label, by_importance=by_importance, generator=generator)
        memory.importance[: memory.size] = torch.rand(memory.size, generator=generator)
        counts = torch.bincount(memory.keys(), minlength=3)
        if memory.size == 10:
            assert int(counts.max()) <= largest
            largest = int(counts.max())
    # by hand: [10, 0, 0] -> [5, 5, 0] -> class 2 takes from 0, 1, 0, 1 (ties: lowest id)
    assert counts.tolist() == [3, 3, 4]
    memory = flat_memory(10)
    for label in [0] * 3 + [1] * 30:
        offer(memory, 0, label, by_importance=by_importance, generator=generator)
    assert torch.bincount(memory.keys()).tolist() == [3, 7]


# ---------------------------------------------------------------------------
# hierarchy-aware pseudo-labels
# ---------------------------------------------------------------------------


def test_pseudo_labels_are_children_below_and_exact_ancestors_above() -> None:
    parent = parents_of(TREE)
    assert parent.tolist() == [-1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    ancestors = torch.tensor(TREE.ancestors())
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        y = torch.randint(TREE.n_classes, (16,), generator=generator)
        logits = torch.randn(16, TREE.n_classes, generator=generator)
        active = torch.rand(TREE.n_classes, generator=generator) < (0.5 if trial % 2 else 1.1)
        targets = hierarchy_targets(TREE, y, logits, active)
        level = torch.tensor(TREE.level_of())[y]
        for i in range(16):
            h = int(level[i])
            # its own level and every coarser one: exactly the hierarchy's ancestors
            assert targets[i, : h + 1].tolist() == ancestors[y[i], : h + 1].tolist()
            # finer levels: the argmax over the active children of the label above
            for lv in range(h + 1, TREE.n_levels):
                above = int(targets[i, lv - 1])
                children = [c for c in range(TREE.n_classes)
                            if above >= 0 and parent[c] == above and active[c]]
                if not children:
                    assert targets[i, lv] == -1
                    continue
                best = max(children, key=lambda c: float(logits[i, c]))
                assert int(targets[i, lv]) == best
                assert int(parent[targets[i, lv]]) == above


def test_pseudo_label_loss_is_the_weighted_cross_entropy_at_the_other_levels() -> None:
    plugin, ctx, stream = plugin_on_digits(PlFmsOptions(capacity=50, pseudo_weight=0.5))
    labels = stream.labels
    expose_labels(ctx.model, torch.arange(labels.n_classes))
    y = torch.tensor([0, 1, 2, 7, 11])  # parity ids 0-1, digit ids 2-11
    logits = torch.randn(5, labels.n_classes, generator=torch.Generator().manual_seed(3))
    loss = plugin.clsim_loss(ctx=ctx, batch=Batch(torch.zeros(5, 1, 8, 8), y), logits=logits,
                             output=one_view(logits, y))
    parity, digit = logits[:, :2], logits[:, 2:]
    even = [2, 4, 6, 8, 10]  # flat ids of digits 0, 2, 4, 6, 8
    odd = [3, 5, 7, 9, 11]
    terms = [
        F.cross_entropy(digit[0:1], torch.tensor([max(even, key=lambda c: logits[0, c]) - 2])),
        F.cross_entropy(digit[1:2], torch.tensor([max(odd, key=lambda c: logits[1, c]) - 2])),
        F.cross_entropy(parity[2:3], torch.tensor([0])),  # digit 0 is even
        F.cross_entropy(parity[3:4], torch.tensor([1])),  # digit 5 is odd
        F.cross_entropy(parity[4:5], torch.tensor([1])),  # digit 9 is odd
    ]
    assert float(loss) == pytest.approx(0.5 * float(sum(terms)) / 5, rel=1e-6)
    # two views of the batch (another plugin's clsim_inputs): the labels of the loop's
    # output, repeated per view, give each row its targets; the mean is the same
    batch = Batch(torch.zeros(5, 1, 8, 8), y)
    output = ForwardOutput(torch.zeros(10, 64), None, logits.repeat(2, 1), y.repeat(2), 2)
    views = plugin.clsim_loss(ctx=ctx, batch=batch, logits=output.logits, output=output)
    assert float(views) == pytest.approx(float(loss), rel=1e-6)
    plugin.options.pseudo_labels = False
    assert plugin.clsim_loss(ctx=ctx, batch=Batch(torch.zeros(5, 1, 8, 8), y),
                             logits=logits, output=one_view(logits, y)) is None


def one_view(logits: torch.Tensor, y: torch.Tensor) -> ForwardOutput:
    """The loop's output of a one-view batch, as far as the pseudo-label loss reads it."""
    return ForwardOutput(torch.zeros(len(y), 64), None, logits, y, 1)


def step(plugin: PlFmsPlugin, ctx, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """One step of the engine's loop by hand: expose labels, per-level cross-entropy plus
    the plugin's pseudo-label term, update, then the plugin's after-update hook."""
    model = ctx.model
    expose_labels(model, batch.y)
    logits = model(ctx.to_input(batch.x))
    loss = ctx.labels.cross_entropy(logits, batch.y) + plugin.clsim_loss(
        ctx=ctx, batch=batch, logits=logits, output=one_view(logits, batch.y))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    plugin.clsim_after_update(ctx=ctx)


def test_importance_is_the_moving_average_of_each_replayed_samples_loss_decrease() -> None:
    plugin, ctx, stream = plugin_on_digits(PlFmsOptions(capacity=40, importance_decay=0.75),
                                           stream_length=100_000)
    model, exp = ctx.model, stream[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for start in range(0, 64, 16):
        batch = plugin.clsim_before_batch(ctx=ctx, batch=Batch(exp.train_x[start:start + 16],
                                                               exp.train_y[start:start + 16]))
        slots = plugin._replayed.clone()
        old = plugin.memory.importance[slots].clone()
        before = plugin._sample_losses(ctx, slots)
        step(plugin, ctx, optimizer, batch)
        after = plugin._sample_losses(ctx, slots)
        assert torch.allclose(plugin.memory.importance[slots],
                              0.75 * old + 0.25 * (before - after), atol=1e-6)
        assert bool((before != after).any())
        plugin.clsim_after_batch()
    assert bool((plugin.memory.importance[: plugin.memory.size] != 0).any())


# ---------------------------------------------------------------------------
# end to end on the digits HLE scenario
# ---------------------------------------------------------------------------


def test_quick_scenario_runs_within_budget_and_the_memory_is_consistent() -> None:
    result = run_scenario(parse_scenario(QUICK), None)
    summary = result.summary
    for name in ("er", "pl_fms"):
        strategy = summary["strategies"][name]
        assert strategy["status"] == "ok", strategy["error"]
        # while an experience trains, the loop also carries SGD's momentum (one buffer per
        # parameter), which the peak charges; the stores are sized from the budget less the
        # model and the momentum, so the peak fits, and what is kept between experiences too
        momentum = strategy["ledger"][-1]["parts"]["model.parameters"]
        assert strategy["peak_bytes"] == strategy["kept_bytes"] + momentum
        assert strategy["peak_bytes"] <= strategy["budget_bytes"]
        assert strategy["over_budget"] is False
        for level in ("parity", "digit"):
            assert 0.0 <= strategy["anytime"][level]["a_last"] <= 1.0
    strategy = summary["strategies"]["pl_fms"]
    assert not strategy["memory_estimated"]  # every byte held is a measured tensor
    report = strategy["plugins"]["pl_fms"]
    capacity, n_classes = report["capacity"], 12
    assert report["stored"] == capacity
    assert sum(report["stored_by_level"].values()) == capacity
    assert report["stream_samples"] == sum(t["n_train"] for t in summary["stream"]["tasks"])
    assert 0 < report["admitted_to_batches"] < report["stream_samples"]
    parts = strategy["ledger"][-1]["parts"]
    assert {k: v for k, v in parts.items() if k.startswith("pl_fms.memory")} == {
        "pl_fms.memory.x": capacity * 64,  # 8x8 uint8 digits
        "pl_fms.memory.labels": capacity * 2,  # one uint8 label per level
        "pl_fms.memory.level": capacity,
        "pl_fms.memory.importance": capacity * 4,
        "pl_fms.memory.stored": 8,
    }
    assert parts["pl_fms.first_seen"] == n_classes * 8
    # the capacity is what the budget leaves beside the momentum: one more sample would not
    # fit at the peak
    assert strategy["peak_bytes"] <= strategy["budget_bytes"] < strategy["peak_bytes"] + 71


def test_stored_pseudo_labels_follow_the_hierarchy_after_a_run() -> None:
    """Drive the plugin through the digits stream with the engine's loop; every stored
    sample's labels form a path of the tree: its true label's ancestors above it, and
    each pseudo-label below it a child of the label above."""
    plugin, ctx, stream = plugin_on_digits(PlFmsOptions(capacity=60))
    parent = parents_of(stream.labels)
    ancestors = torch.tensor(stream.labels.ancestors())
    model = ctx.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for exp in stream:
        plugin.clsim_before_experience(ctx=ctx, experience=exp)
        for start in range(0, min(exp.n_train, 160), 16):
            batch = plugin.clsim_before_batch(
                ctx=ctx, batch=Batch(exp.train_x[start:start + 16], exp.train_y[start:start + 16]))
            step(plugin, ctx, optimizer, batch)
            plugin.clsim_after_batch()
    memory = plugin.memory
    rows, level = memory.label_rows(), memory.level[: memory.size].long()
    true = rows.gather(1, level.unsqueeze(1)).squeeze(1)
    pseudo_below = 0
    for i in range(memory.size):
        h = int(level[i])
        assert rows[i, : h + 1].tolist() == ancestors[true[i], : h + 1].tolist()
        if h == 0 and rows[i, 1] >= 0:
            assert parent[rows[i, 1]] == rows[i, 0]
            pseudo_below += 1
    assert pseudo_below > 0  # coarse samples did get digit pseudo-labels
    # balancing counts them under their pseudo digit
    assert int((memory.keys() >= 2).sum()) == int((rows[:, 1] >= 0).sum())


def test_same_seed_same_metrics() -> None:
    def run(seed: int) -> dict:
        scenario = quick(**{"seed: 0": f"seed: {seed}"})
        summary = run_scenario(scenario, None, only=["pl_fms"], limit=150).summary
        return without_measurements(summary["strategies"]["pl_fms"])

    first = run(0)
    assert first["status"] == "ok", first["error"]
    assert run(0) == first
    assert run(1)["anytime"] != first["anytime"]


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="importance_decay"):
        quick(**{"plugins: [pl_fms]": "plugins: [{pl_fms: {importance_decay: 1.5}}]"})
    with pytest.raises(ConfigError, match="pseudo_weigth.*did you mean 'pseudo_weight'"):
        quick(**{"plugins: [pl_fms]": "plugins: [{pl_fms: {pseudo_weigth: 1.0}}]"})
    with pytest.raises(ConfigError, match="flexible_sampling"):
        quick(**{"plugins: [pl_fms]": "plugins: [{pl_fms: {flexible_sampling: 3}}]"})
    # a budget the model alone fills leaves no room: the error gives the minimum
    result = run_scenario(quick(**{"budget: 80000": "budget: 30KB"}), None, only=["pl_fms"])
    assert "leaves no room for 1 stored sample" in result.summary["strategies"]["pl_fms"]["error"]
    assert "minimum budget" in result.summary["strategies"]["pl_fms"]["error"]
    plugin = PlFmsPlugin(PlFmsOptions())
    dataset = load_dataset("digits")
    ctx = bare_context(build_scenario_model(quick(), dataset), dataset)
    with pytest.raises(ConfigError, match="'capacity' or a budget"):
        plugin.clsim_setup(ctx=ctx)
