"""GDumb (plugins/gdumb.py): the greedy class-balanced sampler of the paper's Algorithm 1,
the model re-initialised before it trains on the memory only, and the ledger."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clsim_plugins.buffers import ExemplarBuffer
from clsim_plugins.gdumb import GdumbOptions, GdumbPlugin
from helpers import digits_scenario

from clsim.config import parse_scenario
from clsim.runner import run_scenario

# ---------------------------------------------------------------------------
# the sampler, on hand-made streams
# ---------------------------------------------------------------------------


def sampler(capacity: int, n_classes: int, seed: int = 0) -> GdumbPlugin:
    plugin = GdumbPlugin(GdumbOptions(capacity=capacity))
    plugin.buffer = ExemplarBuffer(capacity, (1,), torch.int64, n_classes,
                                   torch.Generator().manual_seed(seed))
    return plugin


def unbalanced_stream(seed: int) -> torch.Tensor:
    """Labels of 4 classes arriving over time (class 0 alone first, then 1, ...) and then
    mixed with frequencies 50/25/15/10 %; every class offers over 60 samples."""
    rng = np.random.default_rng(seed)
    head = [0] * 30 + [1] * 8 + [0] * 5 + [2] * 3 + [3] * 12
    tail = rng.choice(4, size=700, p=[0.5, 0.25, 0.15, 0.1]).tolist()
    return torch.tensor(head + tail)


def spread(counts: np.ndarray, seen: list[int]) -> int:
    return int(counts[seen].max() - counts[seen].min())


@pytest.mark.parametrize("capacity", [3, 4, 7, 10, 13, 40])
def test_memory_is_class_balanced_at_every_size(capacity: int) -> None:
    """Sample by sample: the memory never exceeds k and each admission while not full adds
    one sample; no class ever grows past its share k/|Y| when it is admitted; once full,
    a sample of a class met before never makes the imbalance (max - min count over the
    classes met) worse, and once every class is met and the memory balanced (max - min
    <= 1) it stays so after every later sample; at the end every class holds floor(k/4)
    or ceil(k/4). The counters always equal the labels stored, and every stored sample
    is one the stream offered, once."""
    labels = unbalanced_stream(capacity)
    items = torch.arange(len(labels)).unsqueeze(1)  # the item index is the sample
    plugin = sampler(capacity, 4)
    buffer, seen, balanced = plugin.buffer, [], False
    for i, label in enumerate(labels.tolist()):
        before = buffer.class_counts.copy()
        size_before, met = buffer.size, label in seen
        seen += [] if met else [label]
        (admitted,) = plugin.sample(items[i : i + 1], labels[i : i + 1])
        counts = buffer.class_counts
        assert buffer.size <= capacity
        assert np.array_equal(counts, np.bincount(buffer.y[: buffer.size].numpy(), minlength=4))
        assert admitted == (before[label] * len(seen) < capacity)  # n_y < k / |Y|
        if admitted:
            assert counts[label] == before[label] + 1
            assert buffer.size == min(size_before + 1, capacity)
        else:
            assert np.array_equal(counts, before)
        if size_before == capacity and met:
            assert spread(counts, seen) <= spread(before, seen)
        if buffer.size == capacity and len(seen) == 4:
            balanced = balanced or spread(counts, seen) <= 1
            if balanced:
                assert spread(counts, seen) <= 1, (i, counts)
    assert balanced
    assert sorted(counts.tolist()) == sorted([capacity // 4 + (j < capacity % 4) for j in range(4)])
    stored = buffer.x[: buffer.size, 0]
    assert len(set(stored.tolist())) == buffer.size
    assert torch.equal(labels[stored], buffer.y[: buffer.size].long())


def test_a_rare_class_keeps_all_it_offers_and_the_rest_stay_balanced() -> None:
    """A class offering fewer samples than its share keeps every one of them; the others
    are capped at their share k/|Y| = 5 even though room is left (Algorithm 1 admits a
    sample only while its class is below the share, full memory or not)."""
    rng = np.random.default_rng(1)
    labels = torch.tensor([2, 2] + rng.choice([0, 1, 3], size=400, p=[0.6, 0.3, 0.1]).tolist())
    plugin = sampler(20, 4)
    plugin.sample(torch.arange(len(labels)).unsqueeze(1), labels)
    counts = plugin.buffer.class_counts
    assert counts.tolist() == [5, 5, 2, 5] and plugin.buffer.size == 17


def test_sampling_in_one_call_equals_sample_by_sample() -> None:
    """The sampler's decisions do not depend on how the stream is cut."""
    labels = unbalanced_stream(5)
    items = torch.arange(len(labels)).unsqueeze(1)
    whole, parts = sampler(10, 4, seed=3), sampler(10, 4, seed=3)
    whole.sample(items, labels)
    for start in range(0, len(labels), 37):
        parts.sample(items[start : start + 37], labels[start : start + 37])
    assert torch.equal(whole.buffer.x, parts.buffer.x)


# ---------------------------------------------------------------------------
# end to end on digits: re-initialisation, training on the memory, the ledger
# ---------------------------------------------------------------------------

# Test instrumentation, outside the plugin (the ledger charges what a plugin holds)
INITIAL: list[dict[str, torch.Tensor]] = []
PLANS: list[dict] = []


class Recorder:
    """Listed after gdumb: the model's weights once set up, and at each plan (after
    gdumb's re-initialisation) with the samples the loop is about to train on."""

    def clsim_size_stores(self, ctx) -> None:
        INITIAL.append({k: v.clone() for k, v in ctx.model.state_dict().items()})

    def clsim_plan_experience(self, ctx, plan) -> None:
        PLANS.append({"state": {k: v.clone() for k, v in ctx.model.state_dict().items()},
                      "y": plan.y.clone(), "x": plan.x.clone(), "epochs": plan.epochs})


CAPACITY = 200
HEAD = digits_scenario("", hidden=32, epochs=3, batch_size=16, lr=0.1)


@pytest.fixture(scope="module")
def e2e():
    INITIAL.clear()
    PLANS.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent))
        result = run_scenario(parse_scenario(
            HEAD + "  naive:\n    plugins: [naive]\n"
            f"  gdumb:\n    plugins:\n      - gdumb: {{capacity: {CAPACITY}}}\n"
            "      - test_gdumb:Recorder\n"), None)
    return result.summary["strategies"]


def test_end_to_end_beats_naive(e2e) -> None:
    """Five class-incremental experiences on digits finish, above naive's final accuracy."""
    assert e2e["gdumb"]["status"] == "ok", e2e["gdumb"]["error"]
    assert e2e["gdumb"]["final_accuracy"] > e2e["naive"]["final_accuracy"] + 0.2


def test_each_experience_retrains_the_initial_model_on_the_memory_only(e2e) -> None:
    """Before every experience's training the weights (and buffers) are exactly those the
    run started with, and the loop trains on the memory: at most k samples, class-balanced
    over the seen classes (digits offers every class more than its share), not the
    stream's, for the scenario's epochs."""
    assert len(INITIAL) == 1 and len(PLANS) == 5
    initial = INITIAL[0]
    for number, plan in enumerate(PLANS):
        assert plan["state"].keys() == initial.keys()
        for key, value in initial.items():
            assert torch.equal(plan["state"][key], value), (number, key)
        counts = np.bincount(plan["y"].numpy(), minlength=10)
        seen = counts[counts > 0]
        assert len(seen) == 2 * (number + 1)
        assert counts.sum() == CAPACITY and seen.max() - seen.min() <= 1
        assert plan["epochs"] == 3
    assert not torch.equal(PLANS[-1]["x"], PLANS[-2]["x"])


def test_ledger_is_exact_for_a_fixed_capacity(e2e) -> None:
    """The ledger charges the memory (k samples of 64 bytes, k uint8 labels, two int64
    counters per class) and one copy of the initial model, at every point, and nothing
    else beyond a few scalar counters."""
    s = e2e["gdumb"]
    model_bytes = 9640  # the 64-32-10 MLP, float32
    for record in s["ledger"]:
        parts = record["parts"]
        assert parts["gdumb.buffer.x"] == CAPACITY * 64
        assert parts["gdumb.buffer.y"] == CAPACITY
        assert parts["gdumb.buffer.class_counts"] == parts["gdumb.buffer.class_seen"] == 80
        assert parts["gdumb.initial"] == parts["model.parameters"] == model_bytes
        assert set(parts) - {"model.parameters"} <= {f"gdumb.{p}" for p in (
            "buffer.x", "buffer.y", "buffer.class_counts", "buffer.class_seen", "initial",
            "buffer.capacity", "buffer.size", "buffer.n_seen")}
        assert record["total_bytes"] == sum(parts.values())
    assert s["peak_bytes"] == 2 * model_bytes + CAPACITY * 65 + 160 + 3 * 8
