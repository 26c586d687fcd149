"""Scenario assembly: a validated scenario becomes its device, dataset, stream and model.

Everything here runs before a strategy trains and knows nothing of the loop
(:mod:`clsim.engine`); errors are ConfigErrors naming the scenario file and the key at
fault.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clsim.config import ScenarioConfig, resolve_path
from clsim.data import Dataset, load_dataset
from clsim.errors import ClsimError, ConfigError, DataError, OptionError
from clsim.interop.avalanche_classic import CLASSIC_BENCHMARKS
from clsim.models import MODELS, build_model
from clsim.models.heads import ActiveHead
from clsim.resources import check_run_memory
from clsim.seeding import torch_generator
from clsim.stream import Stream
from clsim.streams import STREAM_TYPES, TIMING_KEYS
from clsim.streams.avalanche import read_benchmark
from clsim.streams.common import DEFAULT_EVAL_EVERY

# stream options naming a file or folder: resolved relative to the scenario file
_PATH_OPTIONS = ("hierarchy", "index_dir")


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; asking for an absent GPU is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {spec!r} was asked for, but torch sees no CUDA device "
            "(use device: auto or cpu)",
            key_path="device",
        )
    return device


def default_out_dir(scenario: ScenarioConfig) -> Path:
    """``runs/<scenario>-<timestamp>``: where a run writes when no --out is given."""
    return Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_scenario_data(scenario: ScenarioConfig) -> Dataset:
    """The scenario's dataset; missing or damaged files are a ConfigError naming the
    scenario file and the key that points at them (data.path for npz, else data.root)."""
    data = scenario.data
    options = {} if data.path is None else {"path": resolve_path(scenario, data.path)}
    check_run_memory(scenario, resolve_path(scenario, data.root), **options)  # before loading
    benchmark = benchmark_data(scenario)  # a classic Avalanche benchmark reads its own data
    if benchmark is not None:
        return benchmark
    try:
        return load_dataset(data.dataset, root=resolve_path(scenario, data.root), **options)
    except ClsimError as exc:
        key = "path" if data.dataset.strip().lower() == "npz" else "root"
        raise scenario.error(("data", key), getattr(exc, "detail", str(exc))) from None


def benchmark_data(scenario: ScenarioConfig) -> Dataset | None:
    """The data of the classic Avalanche benchmark the scenario's stream names (SplitMNIST
    reads its own files), read with the run seed; None when the stream names none.
    ``data.dataset`` must name the dataset the benchmark reads (mnist for SplitMNIST);
    errors are ConfigErrors at their key."""
    stream = scenario.stream
    if stream.type != "avalanche" or stream.options.benchmark not in CLASSIC_BENCHMARKS:
        return None
    name, options = stream.options.benchmark, stream.options
    expected = CLASSIC_BENCHMARKS[name].dataset
    if scenario.data.dataset.strip().lower().replace("-", "_") != expected:
        raise scenario.error(("data", "dataset"), f"stream.benchmark {name} reads "
                             f"{expected}; data.dataset says {scenario.data.dataset!r} "
                             f"(set it to {expected})")
    try:
        return read_benchmark(name, options.args, resolve_path(scenario, options.dataset_root),
                              resolve_path(scenario, scenario.data.root), scenario.seed)
    except OptionError as exc:
        raise scenario.error(("stream", *exc.key.split(".")), str(exc)) from None
    except DataError as exc:  # no data root to arrange clsim's files from
        raise scenario.error(("data", "root"), str(exc)) from None
    except ConfigError as exc:  # no avalanche-lib here: the way to get it
        raise scenario.error(("stream", "benchmark"), str(exc)) from None


def build_scenario_model(scenario: ScenarioConfig, dataset: Dataset,
                         stream: Stream | None = None,
                         device: torch.device | None = None) -> nn.Module:
    """The scenario's model for ``dataset``, with one output per label id of ``stream``
    (a growing head when its label space is masked); a model that cannot be built is a
    ConfigError. With ``device``, the model is moved there in the memory format
    :func:`memory_format` chooses (the one a run trains in)."""
    n_outputs = dataset.n_classes if stream is None else stream.labels.n_classes
    try:
        model = build_model(scenario.model.name, dataset.sample_shape, n_outputs,
                            scenario.model.options)
    except ClsimError:
        raise
    except (RuntimeError, MemoryError, ValueError) as exc:  # e.g. an absurd layer width
        raise ConfigError(f"model {scenario.model.name!r} could not be built for samples of "
                          f"shape {dataset.sample_shape}: {exc}", source=scenario.source,
                          key_path="model") from None
    if stream is not None and stream.labels.masked:
        model.head = ActiveHead.replacing(model.head)
    if device is not None:
        model = model.to(device, memory_format=memory_format(scenario, model,
                                                             dataset.sample_shape, device))
    return model


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def memory_format(scenario: ScenarioConfig, model: nn.Module, sample_shape: tuple[int, ...],
                  device: torch.device) -> torch.memory_format:
    """The layout ``training.memory_format`` asks for, ``auto`` resolved for ``model``.

    ``auto`` is channels_last for a model holding an ``nn.Conv2d`` that reads images
    (``(C, H, W)`` samples, so 4-D batches) on the CPU, where oneDNN's convolutions run
    it faster: the CIFAR-10 ConvNet (convnet2, 32 channels) at one thread evaluates 10,000
    images at batch 64 in 1.4-1.7 s against 3.4-4.1 s in NCHW, and trains a step of 128
    images 10-20% faster (81-95 ms against 89-119 ms, on a busy 2-core machine); the other
    conv nets gain alike (clsim/models/__init__.py). Everything else keeps the default
    (contiguous) layout, CUDA included: channels_last was not measured there, so a GPU run
    gets it only when the scenario sets it. Only the model is converted: its first
    convolution returns channels_last activations from a contiguous batch, and converting
    the batch first (in ``to_input``) was measured no faster. Parameters a plugin creates
    later (MEMO's new blocks, a grown head) are contiguous; convolutions accept either
    layout, so that only costs speed.
    """
    setting = scenario.training.memory_format
    if setting != "auto":
        return MEMORY_FORMATS[setting]
    images = len(sample_shape) == 3
    convolutional = any(isinstance(module, nn.Conv2d) for module in model.modules())
    if images and convolutional and device.type == "cpu":
        return torch.channels_last
    return torch.contiguous_format


def memory_format_name(scenario: ScenarioConfig, sample_shape: tuple[int, ...],
                       device: torch.device) -> str:
    """``training.memory_format`` resolved without building the model a run trains: the
    model is built on the meta device (no weights, no draw from any generator), for
    summary.json. A model that cannot be built is reported as such by the run itself;
    here it is contiguous."""
    if scenario.training.memory_format != "auto":
        return scenario.training.memory_format
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_model(scenario.model.name, sample_shape, 1, scenario.model.options)
    except (ClsimError, RuntimeError, MemoryError, ValueError):
        return "contiguous"
    chosen = memory_format(scenario, model, sample_shape, device)
    return "channels_last" if chosen == torch.channels_last else "contiguous"


def evaluation_batch_size(scenario: ScenarioConfig, device: torch.device | None = None) -> int:
    """Test samples per forward pass in an evaluation on ``device`` (default: the
    scenario's): ``training.eval_batch_size``, or for ``auto`` the batch measured fastest
    for the model's kind on the CPU (``ModelSpec.eval_batch``), 1024 on other devices."""
    return evaluation_batch(scenario, device)[0]


AUTO_EVAL_BATCH_OFF_CPU = 1024
"""``eval_batch_size: auto`` on a GPU: clsim's earlier default (the per-kind batches were
measured on the CPU only, and small ones would starve a GPU)."""


def evaluation_batch(scenario: ScenarioConfig,
                     device: torch.device | None = None) -> tuple[int, str]:
    """:func:`evaluation_batch_size` and where it came from, ``"scenario"``, ``"model kind
    NAME"`` or ``"default for DEVICE"`` (recorded in summary.json)."""
    setting = scenario.training.eval_batch_size
    if setting != "auto":
        return int(setting), "scenario"
    device = resolve_device(scenario.device) if device is None else device
    if device.type != "cpu":
        return AUTO_EVAL_BATCH_OFF_CPU, f"default for {device.type}"
    name = scenario.model.name
    return MODELS[name].eval_batch, f"model kind {name}"


def execution_settings(scenario: ScenarioConfig, sample_shape: tuple[int, ...],
                       device: torch.device) -> dict[str, Any]:
    """How the scenario's runs execute, its ``auto`` settings resolved (summary.json's
    ``execution``): nothing here changes a result beyond float rounding."""
    batch, origin = evaluation_batch(scenario, device)
    return {"memory_format": memory_format_name(scenario, sample_shape, device),
            "eval_batch_size": batch, "eval_batch_size_from": origin}


def build_stream(scenario: ScenarioConfig, dataset: Dataset, seed: int) -> Stream:
    """The scenario's stream; option errors become ConfigErrors naming the key."""
    options = dict(vars(scenario.stream.options))
    timing = {key: options.pop(key) for key in TIMING_KEYS}
    for key in _PATH_OPTIONS:
        if isinstance(options.get(key), str):
            options[key] = resolve_path(scenario, options[key])
    try:
        stream = STREAM_TYPES[scenario.stream.type].build(dataset, seed=seed, **options)
    except OptionError as exc:
        raise scenario.error(("stream", *exc.key.split(".")), str(exc)) from None
    except ValueError as exc:
        raise scenario.error(("stream",), str(exc)) from None
    except ConfigError as exc:  # e.g. an optional dependency the stream type needs
        raise scenario.error(("stream", "type"), str(exc)) from None
    for exp in stream:  # every experience must be trainable and testable
        if exp.n_train == 0 or exp.n_test == 0:
            split = "training" if exp.n_train == 0 else "test"
            raise scenario.error(("stream",), f"experience {exp.index} (classes "
                                 f"{list(exp.classes)}) has no {split} samples in dataset "
                                 f"{dataset.name!r}")
    online = timing["online"]
    if online and not stream.ordered:  # fix one arrival order, drawn from the seed
        stream = _shuffle_within_experiences(stream, seed)
    return replace(
        stream,
        online=online,
        eval_every=(timing["eval_every"] or DEFAULT_EVAL_EVERY) if online else None,
        boundaries_hidden=timing["boundaries"] == "hidden",
        # heads grow as classes appear in online and hierarchical protocols
        labels=replace(stream.labels, masked=stream.labels.masked or online
                       or stream.family == "hierarchical"),
    )


def _shuffle_within_experiences(stream: Stream, seed: int) -> Stream:
    """Each experience's training samples in a seeded random order (an online stream
    sees them once, in that order)."""
    generator = torch_generator(seed, "online-order")
    experiences = []
    for exp in stream:
        order = torch.randperm(exp.n_train, generator=generator)
        experiences.append(replace(exp, train_x=exp.train_x[order], train_y=exp.train_y[order]))
    return replace(stream, experiences=tuple(experiences), ordered=True)


def limit_stream(stream: Stream, n: int) -> Stream:
    """A smoke-test copy of ``stream``: the first ``n`` training and test samples of each
    experience (order kept), so a long scenario can be checked end to end in seconds."""
    experiences = tuple(
        replace(exp, train_x=exp.train_x[:n], train_y=exp.train_y[:n],
                test_x=exp.test_x[:n], test_y=exp.test_y[:n])
        for exp in stream
    )
    return replace(stream, experiences=experiences,
                   eval_every=None if stream.eval_every is None else min(stream.eval_every, n))
