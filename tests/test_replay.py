"""The replay family: reservoir, class-balanced and herding memories, and the replay plugin
sized from its budget (METHODS.md section 1)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from clsim_plugins.buffers import ExemplarBuffer, herding_order, label_dtype
from clsim_plugins.replay import ReplayPlugin

from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.runner import run_scenario

try:
    from scipy.stats import chi2
except ImportError:  # pragma: no cover - scipy is optional
    chi2 = None


# ---------------------------------------------------------------------------
# reservoir
# ---------------------------------------------------------------------------

K, N, BATCH, RUNS = 20, 200, 7, 400
# 0.999 quantile of chi-square with N - 1 = 199 degrees of freedom,
# computed as scipy.stats.chi2.ppf(0.999, 199) = 266.3858953762...
CHI2_199_Q999 = 266.38589537626206


def reservoir_buffer(
    seed: int,
    *,
    capacity: int = K,
    n: int = N,
    batch: int = BATCH,
    labels: torch.Tensor | None = None,
    n_classes: int = 1,
    check=None,
) -> ExemplarBuffer:
    """Offer items 0..n-1 (the item index is the sample) in batches; labels default to 0."""
    generator = torch.Generator().manual_seed(seed)
    buffer = ExemplarBuffer(capacity, (1,), torch.int64, n_classes, generator)
    items = torch.arange(n)
    labels = torch.zeros(n, dtype=torch.long) if labels is None else labels
    for start in range(0, n, batch):
        buffer.add_reservoir(
            items[start : start + batch].unsqueeze(1), labels[start : start + batch]
        )
        if check is not None:
            check(buffer)
    return buffer


def test_reservoir_inclusion_is_uniform_chi_square() -> None:
    """Every item offered is kept with probability K/N: over 400 independently seeded
    runs, per-item inclusion counts fit the uniform expectation R*K/N = 40 (Pearson
    chi-square below its 0.999 quantile for N-1 dof). Each run keeps K distinct items."""
    counts = np.zeros(N, dtype=np.int64)
    for seed in range(RUNS):
        buffer = reservoir_buffer(seed)
        stored = buffer.x[: buffer.size, 0]
        assert buffer.size == K
        assert len(set(stored.tolist())) == K
        counts[stored.numpy()] += 1
    expected = RUNS * K / N
    statistic = float(((counts - expected) ** 2 / expected).sum())
    threshold = chi2.ppf(0.999, N - 1) if chi2 is not None else CHI2_199_Q999
    assert threshold == pytest.approx(CHI2_199_Q999, rel=1e-9)
    assert statistic < threshold, (statistic, counts.min(), counts.max())
    # the late items (offered when the reservoir was long full) are not starved
    assert counts[: N // 2].sum() == pytest.approx(counts[N // 2 :].sum(), rel=0.1)


def test_chi_square_detects_a_biased_memory() -> None:
    """The chi-square above has teeth: a memory that keeps the last K items fails it."""
    counts = np.zeros(N, dtype=np.int64)
    counts[N - K :] = RUNS
    expected = RUNS * K / N
    assert float(((counts - expected) ** 2 / expected).sum()) > CHI2_199_Q999


@pytest.mark.parametrize("batch", [7, 5, 1, 30])
def test_reservoir_holds_the_first_items_until_full(batch: int) -> None:
    """While fewer than K items were offered, the buffer is exactly items 0..n-1 in order."""
    seen_sizes = []

    def check(buffer: ExemplarBuffer) -> None:
        if buffer.n_seen <= K:
            seen_sizes.append(buffer.n_seen)
            assert buffer.size == buffer.n_seen
            assert torch.equal(buffer.x[: buffer.size, 0], torch.arange(buffer.n_seen))
        else:
            assert buffer.size == K

    reservoir_buffer(3, batch=batch, check=check)
    assert seen_sizes == list(range(batch, K + 1, batch))


def test_reservoir_crossing_the_capacity_inside_a_batch() -> None:
    """A batch that crosses K still puts items up to K-1 into slots 0..K-1; the rest can
    only replace them."""
    buffer = reservoir_buffer(11, n=K + 1, batch=K + 1)
    stored = buffer.x[:K, 0]
    assert buffer.size == K
    assert torch.equal(stored[stored != K], torch.arange(K)[stored != K])


def test_reservoir_is_deterministic_for_a_seed() -> None:
    """The same generator seed gives the same memory; another seed a different one."""
    labels = torch.arange(N) % 3
    a = reservoir_buffer(42, labels=labels, n_classes=3)
    b = reservoir_buffer(42, labels=labels, n_classes=3)
    c = reservoir_buffer(43, labels=labels, n_classes=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert np.array_equal(a.class_counts, b.class_counts)
    assert not torch.equal(a.x, c.x)


def test_reservoir_class_bookkeeping() -> None:
    """class_counts is the bincount of stored labels after every batch; class_seen counts
    what was offered; labels travel with their samples."""
    labels = torch.arange(N) % 3

    def check(buffer: ExemplarBuffer) -> None:
        x, y = buffer.stored()
        assert np.array_equal(buffer.class_counts, np.bincount(y.numpy(), minlength=3))
        assert torch.equal(y, labels[x[:, 0]])

    buffer = reservoir_buffer(5, labels=labels, n_classes=3, check=check)
    assert np.array_equal(buffer.class_seen, np.bincount(labels.numpy(), minlength=3))
    assert buffer.n_seen == N


def test_sample_draws_stored_pairs_without_replacement() -> None:
    """sample(n) returns n distinct stored pairs (all of them when n >= size), labels as
    int64."""
    buffer = reservoir_buffer(1, labels=torch.arange(N) % 3, n_classes=3)
    x, y = buffer.sample(8)
    assert y.dtype == torch.int64 and len(set(x[:, 0].tolist())) == 8
    assert set(x[:, 0].tolist()) <= set(buffer.x[:K, 0].tolist())
    x_all, _ = buffer.sample(10 * K)
    assert sorted(x_all[:, 0].tolist()) == sorted(buffer.x[:K, 0].tolist())


# ---------------------------------------------------------------------------
# class-balanced
# ---------------------------------------------------------------------------

CB_SIZES = (600, 300, 100)
CB_CAPACITY = 90


def cb_stream(interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ids 0..999, class 0 first 600, class 1 next 300, class 2 last 100."""
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(CB_SIZES)])
    ids = torch.arange(len(y))
    if interleave:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(7))
        ids, y = ids[order], y[order]
    return ids, y


@pytest.mark.parametrize("interleave", [False, True])
def test_class_balanced_memory(interleave: bool) -> None:
    """After every batch: class_counts is the bincount of stored labels, class_seen what was
    offered, the buffer fills to capacity, and every stored sample is a distinct sample
    already offered with its own label. At the end the classes are balanced (all three
    offered at least capacity / 3): 30 / 30 / 30."""
    ids, labels = cb_stream(interleave)
    true_label = torch.cat([torch.full((n,), c) for c, n in enumerate(CB_SIZES)])
    buffer = ExemplarBuffer(CB_CAPACITY, (1,), torch.int64, 3, torch.Generator().manual_seed(0))
    for start in range(0, len(ids), 10):
        buffer.add_class_balanced(ids[start : start + 10].unsqueeze(1), labels[start : start + 10])
        offered = ids[: start + 10]
        x, y = buffer.stored()
        stored = x[:, 0]
        assert buffer.size == min(len(offered), CB_CAPACITY)
        assert np.array_equal(buffer.class_counts, np.bincount(y.numpy(), minlength=3))
        assert np.array_equal(
            buffer.class_seen, np.bincount(labels[: start + 10].numpy(), minlength=3)
        )
        assert torch.equal(y, true_label[stored])
        assert len(set(stored.tolist())) == len(stored)
        assert set(stored.tolist()) <= set(offered.tolist())
    counts = buffer.class_counts
    eligible = [c for c, n in enumerate(CB_SIZES) if n >= CB_CAPACITY / 3]
    assert max(counts[eligible]) - min(counts[eligible]) <= 1
    assert counts.tolist() == [30, 30, 30]


def test_class_balanced_blocks_exact_trajectory() -> None:
    """Classes in blocks: class 0 fills the memory (90), class 1 takes half (45 / 45),
    class 2 a third (30 / 30 / 30); a full class then only swaps its own samples."""
    ids, labels = cb_stream(interleave=False)
    buffer = ExemplarBuffer(CB_CAPACITY, (1,), torch.int64, 3, torch.Generator().manual_seed(0))
    ends = np.cumsum(CB_SIZES)
    after = []
    start = 0
    for end in ends:
        buffer.add_class_balanced(ids[start:end].unsqueeze(1), labels[start:end])
        after.append(buffer.class_counts.tolist())
        start = end
    assert after == [[90, 0, 0], [45, 45, 0], [30, 30, 30]]


# ---------------------------------------------------------------------------
# herding
# ---------------------------------------------------------------------------


def brute_force_herding(features: np.ndarray, m: int) -> list[int]:
    """iCaRL herding, written out: at step k try every unpicked sample and keep the one
    whose addition brings the running mean closest to the class mean."""
    phi = features / np.linalg.norm(features, axis=1, keepdims=True)
    mu = phi.mean(axis=0)
    picked: list[int] = []
    for k in range(1, min(m, len(phi)) + 1):
        best_i, best_d = -1, np.inf
        for i in range(len(phi)):
            if i in picked:
                continue
            d = np.linalg.norm(mu - (phi[picked].sum(axis=0) + phi[i]) / k)
            if d < best_d:
                best_i, best_d = i, d
        picked.append(best_i)
    return picked


def random_features(seed: int, n: int = 60, d: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("seed", range(5))
def test_herding_matches_brute_force(seed: int) -> None:
    """On tiny examples (7 samples in 3-d), the greedy order is the brute-force one."""
    features = random_features(seed, n=7, d=3)
    assert herding_order(features, 7).tolist() == brute_force_herding(features.numpy(), 7)


def test_herding_is_not_just_nearest_to_the_mean() -> None:
    """Herding differs from ranking samples by distance to the mean (so the brute-force
    comparison above checks the running-mean rule, not a simpler one)."""
    differs = 0
    for seed in range(5):
        features = random_features(seed, n=7, d=3)
        phi = torch.nn.functional.normalize(features, dim=1)
        nearest = torch.argsort(torch.linalg.vector_norm(phi - phi.mean(0), dim=1)).tolist()
        differs += herding_order(features, 7).tolist() != nearest
    assert differs > 0


def test_herding_picks_have_no_repeats() -> None:
    """m picks are m distinct indices; asking for all samples gives a permutation; asking
    for more than exist gives each sample once."""
    features = random_features(1)
    picks = herding_order(features, 25)
    assert picks.dtype == torch.int64 and len(picks) == 25 and len(set(picks.tolist())) == 25
    assert sorted(herding_order(features, 60).tolist()) == list(range(60))
    assert sorted(herding_order(features, 500).tolist()) == list(range(60))
    assert herding_order(features, 0).tolist() == []


def test_herding_is_prefix_stable() -> None:
    """The first m' picks of an m-selection are the m'-selection (shrinking keeps a prefix)."""
    features = random_features(2)
    full = herding_order(features, 40).tolist()
    for m in (1, 2, 5, 17, 39, 40):
        assert herding_order(features, m).tolist() == full[:m]


def test_herding_ignores_feature_scale_and_input_dtype() -> None:
    """Features are L2-normalised: scaling a row by a power of two or passing float32
    does not change the order."""
    features = random_features(3)
    scales = 2.0 ** torch.randint(-4, 5, (60, 1), generator=torch.Generator().manual_seed(0))
    base = herding_order(features, 30).tolist()
    assert herding_order(features * scales, 30).tolist() == base
    f32 = features.float()
    assert herding_order(f32, 30).tolist() == herding_order(f32.double(), 30).tolist()


def test_herding_mean_tracks_the_class_mean_better_than_random() -> None:
    """The mean of the first m herding picks is closer to the class mean than the mean of a
    random m-subset, on average over 200 subsets, in each of 10 classes."""
    for seed in range(10):
        features = random_features(100 + seed, n=100, d=16)
        phi = torch.nn.functional.normalize(features, dim=1)
        mu = phi.mean(0)
        g = torch.Generator().manual_seed(seed)
        for m in (5, 10, 20):
            herd = torch.linalg.vector_norm(mu - phi[herding_order(features, m)].mean(0))
            random = torch.stack(
                [
                    torch.linalg.vector_norm(mu - phi[torch.randperm(100, generator=g)[:m]].mean(0))
                    for _ in range(200)
                ]
            ).mean()
            assert herd < random


# ---------------------------------------------------------------------------
# label dtype
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_classes", "dtype"),
    [
        (1, torch.uint8),
        (10, torch.uint8),
        (256, torch.uint8),
        (257, torch.int16),
        (1000, torch.int16),
        (32768, torch.int16),
    ],
)
def test_label_dtype_widths(n_classes: int, dtype: torch.dtype) -> None:
    """One byte up to 256 classes, two up to 32768: the narrow type at each boundary."""
    assert label_dtype(n_classes) == dtype


@pytest.mark.parametrize("n_classes", [1, 10, 256, 257, 32768, 32769, 100_000, 2**31])
def test_label_dtype_holds_every_class_id(n_classes: int) -> None:
    """The label type holds ids 0..n_classes-1: the largest id survives a round trip."""
    dtype = label_dtype(n_classes)
    info = torch.iinfo(dtype)
    assert info.min <= 0 and n_classes - 1 <= info.max
    y = torch.tensor([0, n_classes - 1]).to(dtype)
    assert y.long().tolist() == [0, n_classes - 1]


def test_buffer_labels_cost_one_byte_for_ten_classes() -> None:
    """A digits buffer of 50 stores 50 * 64 sample bytes and 50 label bytes."""
    buffer = ExemplarBuffer(50, (1, 8, 8), torch.uint8, 10, torch.Generator())
    assert buffer.x.untyped_storage().nbytes() == 50 * 64
    assert buffer.y.untyped_storage().nbytes() == 50


def test_label_dtype_is_narrowest_above_int16() -> None:
    """40,000 class ids fit int32 (4 bytes); int64 doubles every stored label."""
    assert torch.empty((), dtype=label_dtype(40_000)).element_size() == 4


# ---------------------------------------------------------------------------
# the replay plugin, end to end on digits
# ---------------------------------------------------------------------------


# Test instrumentation, outside the plugin: the ledger charges what the plugin object and
# its class hold, so a record kept there would (rightly) count against the budget.
HISTORY: list[dict] = []


class RecordingReplay(ReplayPlugin):
    """ReplayPlugin that records its memory after each experience into HISTORY."""

    def clsim_after_experience(self, ctx, experience) -> None:
        super().clsim_after_experience(ctx, experience)
        x, y = self.buffer.stored()
        HISTORY.append(
            {
                "seen": list(ctx.seen_classes),
                "capacity": self.buffer.capacity,
                "size": self.buffer.size,
                "per_class": {c: x[y == c].clone() for c in ctx.seen_classes},
            }
        )


HEAD = (
    "data: {dataset: digits}\n"
    "stream: {n_experiences: 5}\n"
    "model: {name: mlp, hidden: [32]}\n"
    "training: {epochs: 1, batch_size: 64}\n"
    "strategies:\n"
)
BUDGET = "'model + 100 exemplars'"
SAMPLE_BYTES = 64  # one 8x8 uint8 digit
LABEL_BYTES = 1  # uint8 for 10 classes
DIGITS_MLP_BYTES = 9640  # 2410 float32 parameters


def run(strategies: str) -> dict:
    result = run_scenario(parse_scenario(HEAD + strategies), None)
    assert result.summary["dataset"]["sample_bytes"] == SAMPLE_BYTES
    return result.summary["strategies"]


@pytest.fixture(scope="module")
def e2e():
    """One digits run with every replay flavour under 'model + 100 exemplars', a budget
    below the model, and herding + NME with fewer slots than classes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).parent))
        ref = f"{__name__}:RecordingReplay"
        HISTORY.clear()
        strategies = run(
            f"  reservoir:\n    budget: {BUDGET}\n    plugins: [replay]\n"
            f"  balanced:\n    budget: {BUDGET}\n"
            "    plugins:\n      - replay: {selection: class_balanced}\n"
            f"  herding:\n    budget: {BUDGET}\n"
            f"    plugins:\n      - {ref}: {{selection: herding}}\n"
            f"  nme:\n    budget: {BUDGET}\n"
            "    plugins:\n      - replay: {selection: herding, nme: true}\n"
            "  tiny:\n    budget: 1KB\n    plugins: [replay]\n"
            "  nme_small:\n"
            "    plugins:\n      - replay: {selection: herding, nme: true, capacity: 5}\n"
        )
        return {"strategies": strategies, "history": list(HISTORY)}


@pytest.mark.parametrize("name", ["reservoir", "balanced", "herding", "nme"])
def test_budget_is_used_as_fully_as_possible(e2e, name: str) -> None:
    """Without 'capacity', the buffer is sized from the budget: the ledger stays within it
    at every experience, and one more stored sample (64 + 1 label byte) would not fit."""
    s = e2e["strategies"][name]
    assert s["status"] == "ok", s["error"]
    assert s["budget_bytes"] == DIGITS_MLP_BYTES + 100 * SAMPLE_BYTES
    assert not s["over_budget"]
    totals = {r["total_bytes"] for r in s["ledger"]}
    assert len(totals) == 1  # allocated once at full capacity: constant cost
    total = totals.pop()
    assert total <= s["budget_bytes"] < total + SAMPLE_BYTES + LABEL_BYTES
    assert s["peak_bytes"] == total
    prefix = "RecordingReplay" if name == "herding" else "replay"
    parts = s["ledger"][-1]["parts"]
    capacity = parts[f"{prefix}.buffer.x"] // SAMPLE_BYTES
    assert parts[f"{prefix}.buffer.y"] == capacity * LABEL_BYTES
    assert parts["model.parameters"] == DIGITS_MLP_BYTES


def test_budget_below_the_model_fails_naming_the_minimum(e2e) -> None:
    """A budget smaller than the model leaves no room: the strategy fails at setup with a
    message giving the minimum budget."""
    s = e2e["strategies"]["tiny"]
    assert s["status"] == "failed"
    assert "minimum budget" in s["error"]
    assert "1024 bytes" in s["error"]


def test_the_stated_minimum_budget_is_exact(e2e) -> None:
    """The minimum the error states holds exactly one exemplar: at that budget the run
    succeeds and the ledger equals the budget to the byte; one byte less fails. The
    reservoir strategy, run again beside others, repeats its first run exactly."""
    error = e2e["strategies"]["tiny"]["error"]
    minimum = int(re.search(r"minimum budget is (\d+) bytes", error)[1])
    assert minimum > DIGITS_MLP_BYTES + SAMPLE_BYTES
    again = run(
        f"  at_min:\n    budget: {minimum}\n    plugins: [replay]\n"
        f"  below_min:\n    budget: {minimum - 1}\n    plugins: [replay]\n"
        f"  reservoir:\n    budget: {BUDGET}\n    plugins: [replay]\n"
    )
    at_min = again["at_min"]
    assert at_min["status"] == "ok", at_min["error"]
    # the same at every point of every experience (start, end of training, end): the
    # buffer is allocated whole at setup
    assert [r["total_bytes"] for r in at_min["ledger"]] == [minimum] * 3 * 5
    assert at_min["ledger"][-1]["parts"]["replay.buffer.x"] == SAMPLE_BYTES
    assert again["below_min"]["status"] == "failed"
    assert "minimum budget" in again["below_min"]["error"]
    first = e2e["strategies"]["reservoir"]
    for key in ("accuracy_matrix", "ledger", "final_accuracy"):
        assert again["reservoir"][key] == first[key]


def test_online_momentum_is_reserved_so_the_peak_fits_the_budget() -> None:
    """On an online stream the loop carries SGD's momentum (one float32 buffer per
    parameter) through each experience, and the ledger charges it at the peak: the buffer
    is sized from the budget less the model, the plugin's bookkeeping and that momentum,
    so the peak (model + buffer + momentum) fits the budget and one more exemplar would
    not, to the byte."""
    text = HEAD.replace("stream: {n_experiences: 5}",
                        "stream: {online: true, n_experiences: 5, eval_every: 100}")
    text = text.replace("training: {epochs: 1, batch_size: 64}",
                        "training: {batch_size: 16, optimizer: {name: sgd, lr: 0.05, "
                        "momentum: 0.9}}")
    budget = 2 * DIGITS_MLP_BYTES + 100 * SAMPLE_BYTES  # 'model + 100 exemplars' is too small
    s = run_scenario(parse_scenario(text + f"  er:\n    budget: {budget}\n"
                                    "    plugins: [replay]\n"), None).summary["strategies"]["er"]
    assert s["status"] == "ok", s["error"]
    momentum = DIGITS_MLP_BYTES  # a buffer the size of each parameter
    for r in s["ledger"]:
        carried = momentum if r["point"] in ("anytime", "trained") else 0
        assert r["parts"].get("loop.optimizer", 0) == carried, r
    assert s["peak_bytes"] == s["kept_bytes"] + momentum
    assert not s["over_budget"]
    item = SAMPLE_BYTES + LABEL_BYTES
    assert s["peak_bytes"] <= budget < s["peak_bytes"] + item
    parts = s["ledger"][-1]["parts"]
    capacity = parts["replay.buffer.x"] // SAMPLE_BYTES
    assert parts["replay.buffer.y"] == capacity * LABEL_BYTES
    # the same arithmetic by hand: what the budget leaves beside the model, the momentum
    # and the empty buffer's bookkeeping, in whole exemplars
    without_items = s["kept_bytes"] - capacity * item
    assert capacity == (budget - without_items - momentum) // item
    assert capacity < (budget - without_items) // item  # fewer than between experiences


def test_herding_keeps_an_even_share_per_seen_class(e2e) -> None:
    """After each experience, herding keeps exactly capacity // (seen classes) samples of
    every seen class (digits has over 120 training samples per class, enough for each)."""
    history = e2e["history"]
    assert len(history) == 5
    capacity = history[0]["capacity"]
    s = e2e["strategies"]["herding"]
    assert s["ledger"][-1]["parts"]["RecordingReplay.buffer.x"] == capacity * SAMPLE_BYTES
    for i, h in enumerate(history):
        assert len(h["seen"]) == 2 * (i + 1)
        share = capacity // len(h["seen"])
        assert {c: len(x) for c, x in h["per_class"].items()} == {c: share for c in h["seen"]}
        assert h["size"] == share * len(h["seen"]) <= capacity


def test_herding_shrinks_old_classes_to_a_prefix(e2e) -> None:
    """An old class keeps the first m' of its previous m exemplars (herding order is
    prefix-stable), and every exemplar is a training sample of its class."""
    history = e2e["history"]
    digits = load_dataset("digits")
    for before, after in zip(history, history[1:], strict=False):
        for c in before["seen"]:
            kept = after["per_class"][c]
            assert torch.equal(kept, before["per_class"][c][: len(kept)])
    for c, stored in history[-1]["per_class"].items():
        pool = {tuple(r) for r in digits.x_train[digits.y_train == c].flatten(1).tolist()}
        assert all(tuple(r) in pool for r in stored.flatten(1).tolist())


def test_nme_runs_and_charges_the_class_means(e2e) -> None:
    """nme: true predicts by nearest mean of exemplars and gives a final accuracy; the
    ledger charges the class means (10 classes x 32 features x float32)."""
    s = e2e["strategies"]["nme"]
    assert s["status"] == "ok", s["error"]
    assert 0.0 <= s["final_accuracy"] <= 1.0
    assert s["final_accuracy"] > 0.2  # far above chance (0.1); a broken readout is not
    for record in s["ledger"]:
        assert record["parts"]["replay.class_means"] == 10 * 32 * 4
    # the class means are paid for by fewer exemplars than plain herding keeps
    per_sample = SAMPLE_BYTES + LABEL_BYTES
    herding = e2e["strategies"]["herding"]
    herding_capacity = e2e["history"][0]["capacity"]
    overhead = herding["ledger"][-1]["total_bytes"] - herding_capacity * per_sample
    nme_capacity = s["ledger"][-1]["parts"]["replay.buffer.x"] // SAMPLE_BYTES
    assert nme_capacity == (s["budget_bytes"] - overhead - 10 * 32 * 4) // per_sample
    assert nme_capacity < herding_capacity


def test_herding_with_fewer_slots_than_classes_fails_clearly(e2e) -> None:
    """Herding with capacity 5 keeps 2 per class for 2 classes, 1 for 4, and cannot give
    6 classes one each: the strategy stops with a message saying so (rather than silently
    keeping an empty memory), and its ledger up to then is kept."""
    s = e2e["strategies"]["nme_small"]
    assert s["status"] == "failed"
    assert "capacity of 5 exemplars cannot give each of the 6 seen classes one" in s["error"]
    assert "experience 2" in s["error"]
    assert [r["experience"] for r in s["ledger"] if r["point"] == "end"] == [0, 1]


# ---------------------------------------------------------------------------
# update: experience_end (the schedule of Avalanche's Replay)
# ---------------------------------------------------------------------------

REPLAYED: list[tuple[int, list[int]]] = []  # (experience, labels replayed in a batch)
STORED: list[tuple[torch.Tensor, torch.Tensor]] = []  # memory after each experience


class WatchedReplay(ReplayPlugin):
    """ReplayPlugin that records what each batch replays and what the memory holds."""

    def clsim_before_batch(self, ctx, batch):
        mixed = super().clsim_before_batch(batch)
        replayed = [] if mixed is None else mixed.y[batch.n_stream:].tolist()
        REPLAYED.append((ctx.experience.index, replayed))
        return mixed

    def clsim_after_experience(self, ctx, experience) -> None:
        super().clsim_after_experience(ctx, experience)
        x, y = self.buffer.stored()
        STORED.append((x.clone(), y.clone()))


def test_experience_end_updates_replay_only_what_earlier_experiences_left(monkeypatch):
    from clsim.assembly import build_stream, load_scenario_data
    from clsim.seeding import torch_generator

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    REPLAYED.clear()
    STORED.clear()
    scenario = parse_scenario(
        HEAD + "  late:\n    plugins:\n      - test_replay:WatchedReplay: "
        "{selection: class_balanced, update: experience_end, capacity: 100}\n")
    result = run_scenario(scenario, None)
    assert result.summary["strategies"]["late"]["status"] == "ok"
    stream = build_stream(scenario, load_scenario_data(scenario), scenario.seed)
    classes = [set(exp.classes) for exp in stream]
    assert all(not labels for exp, labels in REPLAYED if exp == 0)  # nothing to replay yet
    for exp, labels in REPLAYED:
        if exp > 0:
            earlier = set().union(*classes[:exp])
            assert labels and set(labels) <= earlier  # never the current experience
    # the memory after experience 0 is exactly experience 0's samples offered at once
    first = stream.experiences[0]
    reference = ExemplarBuffer(100, first.train_x.shape[1:], first.train_x.dtype, 10,
                               torch_generator(scenario.seed, "late", "replay"))
    reference.add_class_balanced(first.train_x, first.train_y)
    x, y = reference.stored()
    assert torch.equal(STORED[0][0], x) and torch.equal(STORED[0][1], y)
    assert [set(y.tolist()) for _, y in STORED] == [
        set().union(*classes[: k + 1]) for k in range(len(stream))]


def test_experience_end_needs_boundaries():
    text = HEAD.replace("stream: {n_experiences: 5}",
                        "stream: {n_experiences: 5, online: true, boundaries: hidden}")
    result = run_scenario(parse_scenario(
        text + "  late:\n    plugins:\n      - replay: {update: experience_end, capacity: 50}\n"),
        None)
    late = result.summary["strategies"]["late"]
    assert late["status"] == "failed"
    assert "update: experience_end" in late["error"] and "hidden boundaries" in late["error"]
