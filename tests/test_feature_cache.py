"""The feature cache of frozen encoders (clsim/feature_cache.py): each sample through a
frozen encoder once, bit-identical features, nothing charged to the strategy."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import without_measurements
from torch import nn

import clsim.feature_cache as fc
from clsim.config import parse_scenario
from clsim.errors import ConfigError
from clsim.feature_cache import CacheCounts, FeatureCache, fixed_chunk_outputs, max_bytes_from_env
from clsim.runner import run_scenario


def encoder(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(12, 8)] + ([nn.BatchNorm1d(8)] if batch_norm else [])
    net = nn.Sequential(*layers, nn.ReLU()).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def samples(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 4), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def to_input(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def test_features_are_those_computed_directly_and_each_row_is_computed_once():
    cache, net, x = FeatureCache(2**20), encoder(), samples()
    direct = fixed_chunk_outputs(net, to_input(x), 4)
    first = cache.features(net, x, 4, to_input, "scale 1/255")
    assert torch.equal(first, direct)
    assert cache.counts == CacheCounts(computed=10)
    # the same rows again, shuffled and repeated, in another call: nothing computed
    order = torch.tensor([3, 3, 9, 0, 5])
    again = cache.features(net, x[order], 4, to_input, "scale 1/255")
    assert torch.equal(again, direct[order])
    assert cache.counts == CacheCounts(computed=10, reused=5)
    # a copy of the rows elsewhere in memory is the same sample (identity by bytes)
    cache.features(net, x.clone()[:2], 4, to_input, "scale 1/255")
    assert cache.counts.computed == 10
    # what is returned is the caller's: writing to it leaves the cache as it was
    again.zero_()
    assert torch.equal(cache.features(net, x[order], 4, to_input, "scale 1/255"),
                       direct[order])


def test_another_chunk_transform_or_weight_is_another_key():
    cache, net, x = FeatureCache(2**20), encoder(), samples()
    cache.features(net, x, 4, to_input, "a")
    cache.features(net, x, 5, to_input, "a")  # call height: rows may round otherwise
    cache.features(net, x, 4, lambda t: t.float(), "b")  # another input transform
    assert cache.counts.computed == 30
    with torch.no_grad():
        net[1].weight.add_(1.0)  # a parameter changed in place: its version moves
    changed = cache.features(net, x, 4, to_input, "a")
    assert cache.counts.computed == 40
    assert torch.equal(changed, fixed_chunk_outputs(net, to_input(x), 4))


def test_batch_norm_statistics_are_part_of_the_key():
    """BatchNorm updates its running statistics without bumping their version counter:
    buffers are hashed at every lookup."""
    cache, net, x = FeatureCache(2**20), encoder(batch_norm=True), samples()
    cache.features(net, x, 4, to_input, "a")
    net.train()
    net(to_input(x))  # running statistics move
    net.eval()
    fresh = cache.features(net, x, 4, to_input, "a")
    assert cache.counts.computed == 20
    assert torch.equal(fresh, fixed_chunk_outputs(net, to_input(x), 4))


def conv_encoder() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def test_channels_last_rows_do_not_depend_on_what_was_cached():
    """A channels_last batch is padded in its own layout: rows computed in a padded call
    equal rows computed in a full one, whatever the cache held before."""
    net = conv_encoder()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0)
                    ).contiguous(memory_format=torch.channels_last)
    at_once, in_two = FeatureCache(2**24), FeatureCache(2**24)
    first = at_once.features(net, x, 32)
    in_two.features(net, x[8:], 32)
    second = in_two.features(net, x, 32)
    assert torch.equal(first, second)
    assert torch.equal(first, fixed_chunk_outputs(net, x, 32))
    nchw = at_once.features(net, x.contiguous(), 32)  # the same rows in NCHW: another key
    assert at_once.counts.computed == 80
    assert torch.equal(nchw, fixed_chunk_outputs(net, x.contiguous(), 32))


def test_a_new_encoder_at_a_dead_ones_address_is_hashed_again():
    """Parameter digests are remembered per tensor object; a new encoder whose tensors
    reuse a freed one's id and version is not mistaken for it."""
    cache, x = FeatureCache(2**24), samples()
    outputs = []
    for seed in range(6):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8)).eval().requires_grad_(False)
        outputs.append((cache.features(net, x, 4, to_input, "a"),
                        fixed_chunk_outputs(net, to_input(x), 4)))
        del net
    assert all(torch.equal(cached, direct) for cached, direct in outputs)


def test_edits_through_data_are_seen_after_forget_weights():
    cache, net, x = FeatureCache(2**20), encoder(), samples()
    cache.features(net, x, 4, to_input, "a")
    net[1].weight.data.mul_(2)  # no version counter sees this
    cache.forget_weights()  # the engine does this at every experience and evaluation
    assert torch.equal(cache.features(net, x, 4, to_input, "a"),
                       fixed_chunk_outputs(net, to_input(x), 4))


@pytest.mark.parametrize("unfreeze", ["train mode", "forward hook", "trainable"])
def test_what_no_key_can_see_is_not_cached(unfreeze):
    cache, net, x = FeatureCache(2**20), encoder(batch_norm=True), samples()
    if unfreeze == "train mode":
        net[2].train()  # one BatchNorm in training mode: batch statistics
    elif unfreeze == "forward hook":
        net[1].register_forward_hook(lambda module, args, out: out * 2)
    else:
        net[1].weight.requires_grad_(True)
    cache.features(net, x, 4, to_input, "a")
    assert cache.counts == CacheCounts() and cache.nbytes == 0


def test_settings_of_a_module_are_part_of_the_key():
    cache, net, x = FeatureCache(2**20), encoder(), samples()
    cache.features(net, x, 4, to_input, "a")
    net.scale = 3.0  # a plain setting a custom forward might read
    cache.features(net, x, 4, to_input, "a")
    assert cache.counts.computed == 20


def test_trainable_encoders_are_not_cached():
    cache, net, x = FeatureCache(2**20), encoder(), samples()
    net[1].weight.requires_grad_(True)
    out = cache.features(net, x, 4, to_input, "a")
    assert torch.equal(out, fixed_chunk_outputs(net, to_input(x), 4))
    assert cache.counts == CacheCounts() and cache.nbytes == 0


def test_a_full_cache_computes_without_keeping():
    cache, net, x = FeatureCache(100), encoder(), samples()  # 10 x 8 floats: 320 bytes
    out = cache.features(net, x, 4, to_input, "a")
    assert torch.equal(out, fixed_chunk_outputs(net, to_input(x), 4))
    assert cache.counts == CacheCounts(uncached=10) and cache.nbytes == 0


def test_the_least_recently_used_encoder_makes_room():
    x = samples()
    cache = FeatureCache(2000)  # one table: 10 rows x (32 feature bytes + 80 for the entry)
    a, b = encoder(), encoder()
    with torch.no_grad():
        b[1].bias.add_(1)
    cache.features(a, x, 4, to_input, "a")
    cache.features(b, x, 4, to_input, "a")  # 2 x 320 feature bytes and the digests: full
    assert cache.counts.computed == 20
    cache.features(a, x, 4, to_input, "a")
    assert cache.counts.computed == 30  # a was evicted for b


@pytest.mark.parametrize("value, expected", [("", fc.DEFAULT_MAX_BYTES), ("off", 0), ("0", 0),
                                             ("512MB", 512 * 2**20), ("1.5 GB", 3 * 2**29)])
def test_size_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(fc.ENV_VAR, value)
    assert max_bytes_from_env() == expected


@pytest.mark.parametrize("value", ["lots", "2 models", "500 exemplars", "-1MB"])
def test_bad_sizes_name_the_variable(monkeypatch, value):
    monkeypatch.setenv(fc.ENV_VAR, value)
    with pytest.raises(ConfigError, match=fc.ENV_VAR) as info:
        max_bytes_from_env()
    assert "expected a size in bytes such as 512MB or 2GB" in str(info.value)


def test_the_cli_refuses_a_bad_size_before_writing_anything(tmp_path):
    from helpers import run_cli

    scenario = tmp_path / "s.yaml"
    scenario.write_text(NMC_SCENARIO)
    result = run_cli("run", str(scenario), "--out", str(tmp_path / "out"), "--no-progress",
                     env={fc.ENV_VAR: "lots"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "clsim: error: environment variable CLSIM_FEATURE_CACHE='lots': expected a size in "
        "bytes such as 512MB or 2GB (binary units), or off")
    assert not (tmp_path / "out").exists()


NMC_SCENARIO = """\
name: nmc_cache
seed: 0
threads: 1
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [64]}
training: {epochs: 1, batch_size: 32}
strategies:
  nmc:
    plugins: [nmc]
  nmc_again:
    plugins: [nmc]
  analytic:
    plugins:
      - analytic: {buffer_size: 128}
"""


def strategies(summary: dict) -> dict:
    out = {}
    for name, record in summary["strategies"].items():
        record = without_measurements(record)
        out[name] = json.dumps(record, sort_keys=True)
    return out


def test_a_frozen_encoder_sees_each_sample_once_per_process(monkeypatch):
    """nmc on a frozen random encoder: its first run computes each of the 1797 distinct
    digits once (training samples at nmc's feature_batch; test samples in the evaluation's
    one batch of 451, read first by the model's own head before nmc has a class mean, then
    by nmc), a second strategy with the same encoder in the same process computes none,
    and the results, ledger included, are those of a run without the cache."""
    monkeypatch.setattr(fc, "_CACHE", FeatureCache(2**30))
    cached = run_scenario(parse_scenario(NMC_SCENARIO), None).summary
    counts = cached["strategies"]["nmc"]["feature_cache"]
    assert counts["rows_computed"] == 1797 and counts["rows_uncached"] == 0
    assert counts["rows_reused"] > 0  # the test images at the 5 later evaluation points
    again = cached["strategies"]["nmc_again"]["feature_cache"]
    assert again["rows_computed"] == 0
    # analytic trains its encoder on experience 0 first: another encoder, its own rows
    assert 0 < cached["strategies"]["analytic"]["feature_cache"]["rows_computed"] <= 1797
    monkeypatch.setattr(fc, "_CACHE", FeatureCache(0))
    uncached = run_scenario(parse_scenario(NMC_SCENARIO), None).summary
    assert uncached["strategies"]["nmc"]["feature_cache"]["rows_computed"] == 0
    assert strategies(cached) == strategies(uncached)


def test_evaluation_of_a_frozen_encoder_reads_the_cache(monkeypatch):
    """A frozen encoder under a trainable head: evaluation computes the features once and
    gives the logits the model itself gives (the same call height: bit-identical)."""
    from clsim.evaluation import model_logits
    from clsim.models import MLPOptions, build_model

    monkeypatch.setattr(fc, "_CACHE", FeatureCache(2**20))
    torch.manual_seed(0)
    model = build_model("mlp", (3, 4), 5, MLPOptions(hidden=[16])).eval()
    for p in model.features.parameters():
        p.requires_grad_(False)
    x = to_input(samples(8))
    assert torch.equal(model_logits(model, x), model(x))
    model_logits(model, x)
    assert fc.feature_cache().counts == CacheCounts(computed=8, reused=8)
    model.features[1].weight.requires_grad_(True)  # trainable again: no cache
    assert torch.equal(model_logits(model, x), model(x))
    assert fc.feature_cache().counts == CacheCounts(computed=8, reused=8)


def test_the_console_and_compare_say_what_the_cache_did(tmp_path):
    from helpers import run_cli

    from clsim.compare import feature_cache_by_worker

    scenario = tmp_path / "s.yaml"
    scenario.write_text(NMC_SCENARIO.replace("  analytic:\n    plugins:\n"
                                             "      - analytic: {buffer_size: 128}\n", ""))
    result = run_cli("run", str(scenario), "--out", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert ("frozen-encoder features (the simulator's cache, not charged to strategies), "
            "rows: nmc 1797 computed") in result.stdout
    assert "nmc_again 0 computed" in result.stdout
    records = [{"pid": 7, "feature_cache": {"rows_computed": 5, "rows_reused": 1}},
               {"pid": 7, "feature_cache": {"rows_computed": 0, "rows_reused": 6,
                                            "rows_uncached": 2}},
               {"pid": 8}]
    assert feature_cache_by_worker(records).endswith(
        "worker 7: 2 cells, 5 rows computed, 7 reused, 2 not kept")
    assert feature_cache_by_worker([{"pid": 8}]) == ""
