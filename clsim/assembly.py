"""Scenario assembly: a validated scenario becomes its device, dataset, stream and model.

Everything here runs before a strategy trains and knows nothing of the loop
(:mod:`clsim.engine`); errors are ConfigErrors naming the scenario file and the key at
fault.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
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
    :func:`memory_formats` chooses for training."""
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
        layouts = memory_formats(scenario, model, dataset.sample_shape, device)
        model = model.to(device, memory_format=layouts.training)
    return model


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass(frozen=True)
class Layouts:
    """The memory formats a run's model computes in: ``training`` (the model's own, set
    when it is built) and ``evaluation`` (test batches are converted to it; a convolution
    then computes in it whatever the weights' layout)."""

    training: torch.memory_format
    evaluation: torch.memory_format

    def names(self) -> dict[str, str]:
        return {"training": _layout_name(self.training),
                "evaluation": _layout_name(self.evaluation)}


def memory_formats(scenario: ScenarioConfig, model: nn.Module, sample_shape: tuple[int, ...],
                   device: torch.device) -> Layouts:
    """The layouts ``training.memory_format`` asks for, ``auto`` resolved for ``model``.

    ``auto`` evaluates in channels_last a model holding an ``nn.Conv2d`` that reads images
    (``(C, H, W)`` samples, so 4-D batches) on the CPU, where oneDNN's convolutions run it
    faster: the CIFAR-10 ConvNet (convnet2, 32 channels) at one thread evaluates 10,000
    images at batch 32 in 1.3-1.6 s against 7.6-8.4 s in NCHW at the old batch of 1024
    (clsim/models/__init__.py). Only the test batches are converted, so a logit differs
    from NCHW's by float rounding (about 1e-7) and an argmax flips only on such a tie.
    ``auto`` trains in the contiguous layout: a training step in channels_last is only
    10-20% faster, and rounds otherwise at every step, so the trajectory, like one at
    another thread count, ends elsewhere (on plugins_split_cifar10's naive run, up to 0.2
    apart in one accuracy-matrix entry); with ``auto`` a run's results stay those of
    earlier clsim versions. ``channels_last`` converts the model too (training included;
    parameters a plugin creates later are contiguous, which only costs speed) and
    ``contiguous`` converts nothing. CUDA keeps the contiguous layout under ``auto``:
    channels_last was not measured there.
    """
    setting = scenario.training.memory_format
    if setting != "auto":
        return Layouts(MEMORY_FORMATS[setting], MEMORY_FORMATS[setting])
    images = len(sample_shape) == 3
    convolutional = any(isinstance(module, nn.Conv2d) for module in model.modules())
    evaluation = torch.channels_last if images and convolutional and device.type == "cpu" \
        else torch.contiguous_format
    return Layouts(torch.contiguous_format, evaluation)


def memory_format_names(scenario: ScenarioConfig, sample_shape: tuple[int, ...],
                        device: torch.device) -> dict[str, str]:
    """``training.memory_format`` resolved (training and evaluation) without building the
    model a run trains: the model is built on the meta device (no weights, no draw from
    any generator), for summary.json. A model that cannot be built is reported as such by
    the run itself; here it is contiguous."""
    setting = scenario.training.memory_format
    if setting != "auto":
        return {"training": setting, "evaluation": setting}
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_model(scenario.model.name, sample_shape, 1, scenario.model.options)
    except (ClsimError, RuntimeError, MemoryError, ValueError):
        return {"training": "contiguous", "evaluation": "contiguous"}
    return memory_formats(scenario, model, sample_shape, device).names()


def _layout_name(layout: torch.memory_format) -> str:
    return "channels_last" if layout == torch.channels_last else "contiguous"


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
    return {"memory_format": memory_format_names(scenario, sample_shape, device),
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
