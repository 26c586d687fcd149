"""The model zoo: exact parameter counts, shapes, the features/head contract, errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import DIGITS_SCENARIO
from torch import nn

from clsim.config import parse_scenario
from clsim.errors import ConfigError
from clsim.models import (
    MODELS,
    ClassifierModel,
    ConvNet2Options,
    MLPOptions,
    ModelOptionError,
    ResNetOptions,
    SlimResNetOptions,
    SmallCNNOptions,
    build_model,
    model_names,
    parameter_count,
)
from clsim.models.base import has_feature_head
from clsim.models.resnet import BasicBlock, ShortcutA

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
ALL_SHAPES = {
    "mlp": IMAGE_SHAPES + [(64,)],
    "small_cnn": IMAGE_SHAPES,
    "convnet2": IMAGE_SHAPES,
    "resnet": IMAGE_SHAPES,
    "resnet14": IMAGE_SHAPES,
    "resnet20": IMAGE_SHAPES,
    "resnet26": IMAGE_SHAPES,
    "resnet32": IMAGE_SHAPES,
    "resnet44": [(3, 32, 32)],
    "resnet56": [(3, 32, 32)],
    "slim_resnet18": IMAGE_SHAPES,
}


def _conv_bn(c_in: int, c_out: int) -> int:
    """Parameters of a bias-free conv3x3 plus its BatchNorm (weight and bias)."""
    return 9 * c_in * c_out + 2 * c_out


# ------------------------------------------------------------------ exact parameter counts


def test_resnet32_counts_match_memo() -> None:
    model = build_model("resnet32", (3, 32, 32), 100)
    f = model.features
    assert parameter_count(f) == 463_504
    assert parameter_count(f.stem) + parameter_count(f.stage1) + parameter_count(f.stage2) == (
        112_016
    )
    assert parameter_count(f.stage3) + parameter_count(f.pool) == 351_488
    assert parameter_count(f.pool) == 0
    # the whole model adds a 64 -> 100 head
    assert parameter_count(model) == 463_504 + 64 * 100 + 100


def test_memo_exemplar_arithmetic() -> None:
    # one ResNet-32 in float32 = 603.5 CIFAR exemplars of 32 x 32 x 3 bytes (METHODS.md)
    params = parameter_count(build_model("resnet32", (3, 32, 32), 10).features)
    assert params * 4 / (32 * 32 * 3) == pytest.approx(603.52, abs=0.01)


def test_resnet20_count_computed_from_layers() -> None:
    # n = 3 blocks per stage
    stem = _conv_bn(3, 16)  # 464
    stage1 = 3 * 2 * _conv_bn(16, 16)  # 14,016
    stage2 = _conv_bn(16, 32) + _conv_bn(32, 32) + 2 * 2 * _conv_bn(32, 32)  # 51,072
    stage3 = _conv_bn(32, 64) + _conv_bn(64, 64) + 2 * 2 * _conv_bn(64, 64)  # 203,520
    expected = stem + stage1 + stage2 + stage3
    assert expected == 269_072
    assert parameter_count(build_model("resnet20", (3, 32, 32), 10).features) == expected


@pytest.mark.parametrize(
    ("depth", "count"),
    [(14, 171_856), (20, 269_072), (26, 366_288), (32, 463_504), (44, 657_936), (56, 852_368)],
)
def test_resnet_depths(depth: int, count: int) -> None:
    via_option = build_model("resnet", (3, 32, 32), 10, ResNetOptions(depth=depth))
    via_alias = build_model(f"resnet{depth}", (3, 32, 32), 10)
    assert parameter_count(via_option.features) == count
    assert parameter_count(via_alias.features) == count
    n = (depth - 2) // 6
    for stage in ("stage1", "stage2", "stage3"):
        assert len(getattr(via_option.features, stage)) == n


def test_default_resnet_is_resnet32() -> None:
    assert parameter_count(build_model("resnet", (3, 32, 32), 10).features) == 463_504


def test_convnet2_count() -> None:
    f = build_model("convnet2", (3, 32, 32), 10).features
    block1 = (9 * 3 * 64 + 64) + 2 * 64  # conv with bias + BN = 1,920
    block2 = (9 * 64 * 64 + 64) + 2 * 64  # 37,056
    assert parameter_count(f.block1) == block1
    assert parameter_count(f.block2) == block2
    assert parameter_count(f) == block1 + block2 == 38_976


def test_mlp_count() -> None:
    model = build_model("mlp", (1, 28, 28), 10)
    assert parameter_count(model.features) == (784 * 400 + 400) + (400 * 400 + 400)
    assert parameter_count(model.head) == 400 * 10 + 10


def _slim_resnet18_count(c_in: int, nf: int) -> int:
    """Features of GEM's reduced ResNet-18 counted from its layers: the stem, then per
    stage a first block (with a 1x1 conv + BN shortcut where the shape changes) and a
    second block of two conv-BNs."""
    total = _conv_bn(c_in, nf)
    channels = nf
    for stride, out in [(1, nf), (2, 2 * nf), (2, 4 * nf), (2, 8 * nf)]:
        projection = channels * out + 2 * out if stride != 1 or channels != out else 0
        total += _conv_bn(channels, out) + _conv_bn(out, out) + projection
        total += 2 * _conv_bn(out, out)
        channels = out
    return total


def test_slim_resnet18_count_at_width_20() -> None:
    model = build_model("slim_resnet18", (3, 32, 32), 10)
    f = model.features
    assert _slim_resnet18_count(3, 20) == 1_093_140  # GEM's "1.09M" with its 10-way head
    assert parameter_count(f) == 1_093_140
    assert [parameter_count(getattr(f, part)) for part in
            ("stem", "stage1", "stage2", "stage3", "stage4", "pool")] == [
        580, 14_560, 51_600, 205_600, 820_800, 0]
    assert parameter_count(model.head) == 160 * 10 + 10
    assert parameter_count(model) == 1_094_750
    # the shortcuts that change the shape are a strided 1x1 conv and a BN, three of them
    shortcuts = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in shortcuts] == [
        (20, 40, (2, 2)), (40, 80, (2, 2)), (80, 160, (2, 2))]
    assert all(c.bias is None for c in model.modules() if isinstance(c, nn.Conv2d))
    # other widths and one channel follow the same closed form
    for c_in, nf in [(1, 20), (3, 8), (1, 1)]:
        options = SlimResNetOptions(width=nf)
        small = build_model("slim_resnet18", (c_in, 28, 28), 5, options)
        assert parameter_count(small.features) == _slim_resnet18_count(c_in, nf)
        assert small.feature_dim == 8 * nf


def test_slim_resnet18_shapes_on_cifar_and_mnist() -> None:
    torch.manual_seed(0)
    cifar = build_model("slim_resnet18", (3, 32, 32), 10).eval()
    assert cifar.feature_dim == 160 and has_feature_head(cifar)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f = cifar.features
        h = f.stem(x)
        sizes = []
        for stage in (f.stage1, f.stage2, f.stage3, f.stage4):
            h = stage(h)
            sizes.append(tuple(h.shape[1:]))
        # the last map is 4x4: the adaptive pool equals GEM's avg_pool2d(out, 4) here
        assert sizes == [(20, 32, 32), (40, 16, 16), (80, 8, 8), (160, 4, 4)]
        torch.testing.assert_close(f.pool(h), F.avg_pool2d(h, 4).flatten(1))
        assert cifar.features(x).shape == (4, 160)
        assert cifar(x).shape == (4, 10)
    mnist = build_model("slim_resnet18", (1, 28, 28), 10)
    out = mnist(torch.randn(3, 1, 28, 28))  # 28 -> 28, 14, 7, 4: pooled to 1x1 as well
    assert out.shape == (3, 10) and mnist.features[0][0].in_channels == 1
    out.sum().backward()
    assert all(p.grad is not None for p in mnist.parameters())


def test_slim_resnet18_options_in_a_scenario() -> None:
    text = DIGITS_SCENARIO.replace("name: mlp, hidden: [32]", "name: slim_resnet18, width: 4")
    assert parse_scenario(text).model.options == SlimResNetOptions(width=4)
    with pytest.raises(ConfigError) as err:
        parse_scenario(text.replace("width: 4", "width: 0"))
    assert err.value.key_path == "model.width"
    with pytest.raises(ModelOptionError, match="'width'.*Got 0 instead"):
        build_model("slim_resnet18", (3, 32, 32), 10, SlimResNetOptions(width=0))


# ------------------------------------------------------------------------ option-A shortcut


def test_shortcut_a_has_no_parameters_or_buffers() -> None:
    block = BasicBlock(16, 32, stride=2)
    assert isinstance(block.shortcut, ShortcutA)
    assert parameter_count(block.shortcut) == 0
    assert list(block.shortcut.buffers()) == []
    # the block is exactly its two convs and two BNs
    assert parameter_count(block) == _conv_bn(16, 32) + _conv_bn(32, 32)


def test_shortcut_a_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 7, 7)
    y = ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_no_projection_shortcuts_anywhere() -> None:
    for module in build_model("resnet56", (3, 32, 32), 10).modules():
        if isinstance(module, nn.Conv2d):
            assert module.kernel_size == (3, 3)
            assert module.bias is None


# ------------------------------------------------------------------ shapes and the contract


@pytest.mark.parametrize(
    ("name", "shape"), [(n, s) for n, shapes in ALL_SHAPES.items() for s in shapes]
)
def test_forward_contract(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 7)
    model.eval()
    assert isinstance(model, ClassifierModel)
    assert isinstance(model.head, nn.Linear)
    assert model.head.in_features == model.feature_dim
    assert model.n_classes == 7
    x = torch.randn(5, *shape)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (5, model.feature_dim)
    assert feats.dtype == torch.float32
    assert logits.shape == (5, 7)
    assert torch.equal(logits, model.head(feats))


def test_training_mode_backward() -> None:
    for name in ("mlp", "small_cnn", "convnet2", "resnet20"):
        model = build_model(name, (1, 28, 28), 3)
        loss = nn.functional.cross_entropy(
            model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 0])
        )
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())


def test_feature_dims() -> None:
    assert build_model("mlp", (64,), 10).feature_dim == 400
    assert build_model("mlp", (64,), 10, MLPOptions(hidden=[])).feature_dim == 64
    assert build_model("mlp", (64,), 10, MLPOptions(hidden=[100, 50])).feature_dim == 50
    assert build_model("small_cnn", (1, 8, 8), 10).feature_dim == 64
    opts = SmallCNNOptions(channels=[8, 16, 24, 32, 40])  # deeper than 8x8 can pool
    assert build_model("small_cnn", (1, 8, 8), 10, opts).feature_dim == 40
    assert build_model("convnet2", (3, 32, 32), 10).feature_dim == 64
    assert build_model("convnet2", (3, 32, 32), 10, ConvNet2Options(channels=16)).feature_dim == 16
    assert build_model("resnet", (3, 32, 32), 10).feature_dim == 64


def test_deep_small_cnn_runs_on_8x8() -> None:
    model = build_model("small_cnn", (1, 8, 8), 10, SmallCNNOptions(channels=[8] * 6))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_small_cnn_without_batch_norm() -> None:
    model = build_model("small_cnn", (3, 32, 32), 10, SmallCNNOptions(batch_norm=False))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert parameter_count(model.features) == (27 * 32 + 32) + (9 * 32 * 64 + 64)


def test_mlp_dropout_layers() -> None:
    model = build_model("mlp", (64,), 10, MLPOptions(hidden=[32, 32], dropout=0.5))
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.Dropout) for m in build_model("mlp", (64,), 10).modules())


def test_mlp_tanh_activation_replaces_every_relu() -> None:
    tanh = build_model("mlp", (64,), 10, MLPOptions(hidden=[32, 16], activation="tanh"))
    assert sum(isinstance(m, nn.Tanh) for m in tanh.modules()) == 2
    assert not any(isinstance(m, nn.ReLU) for m in tanh.modules())
    # the default is the ReLU net it always was: same modules, same parameters
    torch.manual_seed(0)
    default = build_model("mlp", (64,), 10, MLPOptions(hidden=[32, 16]))
    torch.manual_seed(0)
    relu = build_model("mlp", (64,), 10, MLPOptions(hidden=[32, 16], activation="relu"))
    assert MLPOptions().activation == "relu"
    assert [type(m) for m in default.features] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear,
                                                   nn.ReLU]
    assert str(default) == str(relu)
    assert parameter_count(default) == parameter_count(tanh) == (
        (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10))
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(),
                                                 relu.state_dict().values(), strict=True))


def test_mlp_activation_in_a_scenario() -> None:
    text = DIGITS_SCENARIO.replace("hidden: [32]", "hidden: [8], activation: tanh")
    assert parse_scenario(text).model.options.activation == "tanh"
    with pytest.raises(ConfigError) as err:
        parse_scenario(DIGITS_SCENARIO.replace("hidden: [32]", "hidden: [8], activation: sigmoid"))
    assert err.value.key_path == "model.activation"
    assert "expected one of 'relu', 'tanh'; got 'sigmoid'" in str(err.value)


def test_resnet_stages_compose_in_order() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10).eval()
    f = model.features
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = f.stem(x)
        assert h.shape == (3, 16, 32, 32)
        h = f.stage1(h)
        assert h.shape == (3, 16, 32, 32)
        h = f.stage2(h)
        assert h.shape == (3, 32, 16, 16)
        h = f.stage3(h)
        assert h.shape == (3, 64, 8, 8)
        manual = f.pool(h)
        assert torch.equal(manual, f(x))
        # slicing gives MEMO's shared part G and specialised part S
        assert torch.equal(f[3:](f[:3](x)), manual)
    assert f[:3].stem is f.stem and f[3:].stage3 is f.stage3
    assert isinstance(f[0], nn.Sequential) and f[0] is f.stem
    assert [name for name, _ in f.named_children()] == [
        "stem",
        "stage1",
        "stage2",
        "stage3",
        "pool",
    ]


def test_construction_uses_torch_default_rng() -> None:
    torch.manual_seed(123)
    a = build_model("resnet20", (3, 32, 32), 10)
    torch.manual_seed(123)
    b = build_model("resnet20", (3, 32, 32), 10)
    c = build_model("resnet20", (3, 32, 32), 10)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sb[k], sc[k]) for k in sb)


# ------------------------------------------------------------------------------- registry


def test_registry_names_and_options() -> None:
    assert model_names() == sorted(MODELS)
    assert {"mlp", "small_cnn", "convnet2", "resnet", "resnet32"} <= set(MODELS)
    for name, spec in MODELS.items():
        assert dataclasses.is_dataclass(spec.options), name
        spec.options()  # every field has a default
        for f in dataclasses.fields(spec.options):
            assert isinstance(f.metadata.get("help"), str) and f.metadata["help"], (name, f.name)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("resnet33", (3, 32, 32), 10)
    message = str(err.value)
    assert "resnet33" in message
    for name in model_names():
        assert name in message


def test_bad_depth_rejected() -> None:
    with pytest.raises(ModelOptionError, match=r"6n\+2.*Got 30 instead") as err:
        build_model("resnet", (3, 32, 32), 10, ResNetOptions(depth=30))
    assert isinstance(err.value, ConfigError)
    assert isinstance(err.value, ValueError)
    assert err.value.key_path == "depth"
    with pytest.raises(ConfigError, match="6n\\+2"):
        build_model("resnet", (3, 32, 32), 10, ResNetOptions(depth=2))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("mlp", MLPOptions(hidden=[0]), "'hidden'"),
        ("mlp", MLPOptions(dropout=1.0), "'dropout'"),
        ("mlp", MLPOptions(dropout=-0.1), "'dropout'"),
        ("mlp", MLPOptions(activation="sigmoid"), "'activation'.*relu, tanh.*'sigmoid'"),
        ("small_cnn", SmallCNNOptions(channels=[]), "'channels'"),
        ("small_cnn", SmallCNNOptions(channels=[16, -1]), "'channels'"),
        ("convnet2", ConvNet2Options(channels=0), "'channels'"),
    ],
)
def test_bad_options_rejected(name: str, options: object, match: str) -> None:
    with pytest.raises(ModelOptionError, match=match):
        build_model(name, (1, 28, 28), 10, options)


def test_image_models_reject_flat_inputs() -> None:
    for name in ("small_cnn", "convnet2", "resnet", "resnet32", "slim_resnet18"):
        with pytest.raises(ConfigError, match="channels, height, width"):
            build_model(name, (64,), 10)
    with pytest.raises(ConfigError, match="at least 4x4"):
        build_model("convnet2", (1, 2, 2), 10)


def test_wrong_options_type_and_bad_n_classes() -> None:
    with pytest.raises(TypeError, match="ResNetOptions"):
        build_model("resnet", (3, 32, 32), 10, MLPOptions())
    with pytest.raises(ConfigError, match="n_classes"):
        build_model("mlp", (64,), 0)
