"""Scenario YAML -> a validated, typed :class:`ScenarioConfig`; defaults live here.

Only ``yaml.safe_load`` semantics are used (no tag can construct an object). Every
error names the file, the line where known, the key path, what was expected and what
was got, and suggests the nearest valid key for a typo.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clsim.bounds import (
    MAX_DESCRIPTION,
    MAX_EPOCHS,
    MAX_NAME,
    MAX_PLUGIN_REF,
    SEED_MAX,
    THREADS_MAX,
)
from clsim.budget import Budget, BudgetPoint
from clsim.compute_budget import ComputeBudget
from clsim.data.registry import dataset_names
from clsim.errors import ClsimError, ConfigError, OptionError
from clsim.files import require_file
from clsim.interrupts import is_contained
from clsim.models import MODELS
from clsim.plugin_manager import load_plugin_class, options_class
from clsim.streams import STREAM_TYPES
from clsim.text import describe_fault, short_repr
from clsim.validation import KeyPath, Source, build, closest, load_yaml


@dataclass
class DataConfig:
    dataset: str = field(
        metadata={"help": "digits, mnist, fashion_mnist, cifar10, cifar100, omniglot or npz"}
    )
    root: str | None = field(
        default=None,
        metadata={
            "help": "folder holding the datasets; default: $CLSIM_DATA (relative to the YAML)"
        },
    )
    path: str | None = field(default=None, metadata={"help": "the .npz file, for dataset: npz"})

    def check(self) -> None:
        known = dataset_names()
        if self.dataset.strip().lower().replace("-", "_") not in known:
            hint = closest(self.dataset, known)
            raise OptionError("dataset", f"unknown dataset {short_repr(self.dataset)} (known: "
                              f"{', '.join(known)})"
                              + (f"; did you mean {hint!r}?" if hint else ""))


@dataclass
class StreamConfig:
    """The stream section: a type from :data:`clsim.streams.STREAM_TYPES` and its options."""

    type: str
    options: Any


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = field(default=0.01, metadata={"min": 0, "min_exclusive": True, "max": 1e4})
    momentum: float = field(default=0.0, metadata={"min": 0, "max": 1})
    weight_decay: float = field(default=0.0, metadata={"min": 0})


@dataclass
class TrainingConfig:
    epochs: int = field(
        default=1, metadata={"min": 1, "max": MAX_EPOCHS, "help": "passes over each experience"}
    )
    batch_size: int = field(default=128, metadata={"min": 1})
    eval_batch_size: int | Literal["auto"] = field(
        default="auto",
        metadata={"help": "test samples per forward pass when evaluating: an integer >= 1, "
                  "or auto: on the CPU the fastest measured for the model's kind "
                  "(ModelSpec.eval_batch), 1024 on a GPU"},
    )
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    nonfinite_loss: Literal["stop", "skip_batch"] = field(
        default="stop",
        metadata={"help": "a NaN or infinite loss: stop the strategy with an error, or "
                  "skip_batch (no backward, no step; counted as metrics.skipped_batches)"},
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = field(
        default="auto",
        metadata={"help": "layout a conv model computes in: auto (on the CPU, test batches "
                  "of images in channels_last, measured faster, and training contiguous, "
                  "so results stay as they were), channels_last (training too) or "
                  "contiguous"},
    )

    def check(self) -> None:
        # checked here, not by a bound in the metadata: an int-or-'auto' field that failed
        # as an int would be answered with the generic "an integer or one of 'auto'"
        if self.eval_batch_size != "auto" and self.eval_batch_size < 1:
            raise OptionError("eval_batch_size", "expected 'auto' or an integer >= 1; got "
                              f"{short_repr(self.eval_batch_size)}")


@dataclass
class CompareConfig:
    """The grid of ``clsim compare``: every strategy x every budget x every seed."""

    budgets: list[BudgetPoint] = field(
        metadata={"min_items": 1, "help": "budget axis: memory budgets, compute budgets, "
                  "{aligned: BUDGET}, or {memory: BUDGET, compute: COMPUTE_BUDGET}"}
    )
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"min": 0, "max": SEED_MAX, "min_items": 1, "max_items": 10_000,
                  "help": "seeds to run every cell with, each as 'seed' (0 .. 2**63-1)"},
    )
    strategies: list[str] | None = field(
        default=None, metadata={"help": "strategies to compare; default: all of the scenario's"}
    )

    def check(self) -> None:
        for index, point in enumerate(self.budgets):
            _check_not_zero(point.budget, f"budgets[{index}]")  # None: the strategy's own
        labels = [b.label for b in self.budgets]
        repeated = sorted({b for b in labels if labels.count(b) > 1})
        if repeated:
            raise OptionError("budgets", f"budgets must differ; repeated: {', '.join(repeated)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise OptionError("seeds", f"seeds must differ; got {short_repr(self.seeds)}")


@dataclass
class PluginSpec:
    """One resolved plugin of a strategy: its name in the YAML, class and options."""

    name: str
    ref: str
    cls: type
    options: Any


@dataclass
class StrategyConfig:
    name: str
    plugins: list[PluginSpec]
    budget: Budget | None = None
    strict: bool = False
    budget_check: Literal["peak", "between"] = "peak"
    compute_budget: ComputeBudget | None = None
    compute_share: Literal["proportional", "even"] = "proportional"


@dataclass
class ModelConfig:
    name: str
    options: Any = None


@dataclass
class _ScenarioFields:
    """The top-level keys; strategies and model are validated by their own rules."""

    data: DataConfig
    stream: dict
    model: dict
    strategies: dict
    name: str | None = field(
        default=None,
        metadata={"max_length": MAX_NAME, "text": "line",
                  "help": f"used in folder names: at most {MAX_NAME} letters, digits, '.', "
                  "'_' and '-', not starting with '.'; default: the file's name"},
    )
    description: str = field(
        default="",
        metadata={"max_length": MAX_DESCRIPTION,
                  "help": f"free text of at most {MAX_DESCRIPTION:,} characters"},
    )
    seed: int = field(default=0, metadata={"min": 0, "max": SEED_MAX})
    threads: int | None = field(
        default=None,
        metadata={"min": 1, "max": THREADS_MAX,
                  "help": "torch threads per run; metrics repeat exactly at a fixed "
                  "thread count (default: torch's own choice)"},
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    training: TrainingConfig = field(default_factory=TrainingConfig)
    budget: Budget | None = field(
        default=None, metadata={"help": "default budget of every strategy (bytes, '7.6MB', ...)"}
    )
    strict: bool = field(
        default=False, metadata={"help": "stop a strategy that exceeds its budget"}
    )
    budget_check: Literal["peak", "between"] = field(
        default="peak",
        metadata={"help": "what the budget bounds: peak, the most bytes held at any point "
                  "(during training included: a teacher, the optimizer an online "
                  "experience carries), or between, the bytes kept between experiences"},
    )
    compute_budget: ComputeBudget | None = field(
        default=None,
        metadata={"help": "default compute budget of every strategy ('2 TFLOP', '5000 "
                  "steps', '1.0 passes')"},
    )
    compute_share: Literal["proportional", "even"] = field(
        default="proportional",
        metadata={"help": "how a compute budget is shared among the experiences: "
                  "proportional to their training samples, or even"},
    )
    compare: CompareConfig | None = field(
        default=None, metadata={"help": "the grid for 'clsim compare'"}
    )

    def check(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or _is_cuda_index(self.device)):
            raise OptionError("device", "'device' must be auto, cpu, cuda or cuda:N; "
                              f"got {short_repr(self.device)}")
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise OptionError("name", "'name' is used in folder names: letters, digits, '.', "
                              f"'_' and '-' only, not starting with '.'; got "
                              f"{short_repr(self.name)}")
        _check_not_zero(self.budget, "budget")


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def _check_not_zero(budget: Budget | None, key: str) -> None:
    """A scenario budget of 0 bytes cannot hold even the model: a slip, never a plan."""
    if budget is not None and not (budget.bytes or budget.exemplars or budget.models):
        raise OptionError(key, f"a budget of 0 bytes cannot hold even the model; got "
                          f"{short_repr(budget.text)} (give bytes, a size such as '48KB', or "
                          "'model + N exemplars')")


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


@dataclass
class _StrategyFields:
    plugins: list = field(metadata={"min_items": 1})
    budget: Budget | None = None
    strict: bool | None = None
    budget_check: Literal["peak", "between"] | None = None
    compute_budget: ComputeBudget | None = None

    def check(self) -> None:
        _check_not_zero(self.budget, "budget")


@dataclass
class ScenarioConfig:
    """A validated scenario. ``source`` is the YAML file it came from (for messages)."""

    name: str
    description: str
    seed: int
    threads: int | None
    device: str
    data: DataConfig
    stream: StreamConfig
    model: ModelConfig
    training: TrainingConfig
    strategies: dict[str, StrategyConfig]
    compare: CompareConfig | None = None
    source: str = "<config>"
    base_dir: str = "."
    raw: dict = field(default_factory=dict)
    lines: dict[KeyPath, int] = field(default_factory=dict, repr=False)

    def error(self, key_path: KeyPath, message: str) -> ConfigError:
        """A ConfigError at ``key_path`` of this scenario's file, with its line if known."""
        return Source(self.source, self.lines).error(key_path, message)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (saved beside the results)."""
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "threads": self.threads,
            "device": self.device,
            "data": dataclasses.asdict(self.data),
            "stream": {"type": self.stream.type, **_plain(self.stream.options)},
            "model": {"name": self.model.name, **_plain(self.model.options)},
            "training": dataclasses.asdict(self.training),
            "strategies": {
                s.name: {
                    "budget": None if s.budget is None else str(s.budget),
                    "strict": s.strict,
                    "budget_check": s.budget_check,
                    "compute_budget": None if s.compute_budget is None
                    else str(s.compute_budget),
                    "compute_share": s.compute_share,
                    "plugins": [{p.ref: _plain(p.options)} for p in s.plugins],
                }
                for s in self.strategies.values()
            },
            "compare": None
            if self.compare is None
            else {
                "budgets": [b.to_plain() for b in self.compare.budgets],
                "seeds": self.compare.seeds,
                "strategies": self.compare.strategies,
            },
        }


def _plain(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Read and validate a scenario file."""
    path = Path(path)
    text = read_scenario_text(path)
    return parse_scenario(text, source=str(path), base_dir=str(path.parent),
                          default_name=path.stem)


def read_scenario_text(path: Path) -> str:
    """The file's text; a missing, unreadable or non-UTF-8 file is a ConfigError, and so is
    a named pipe, a device or a symlink loop (refused before opening: reading would block
    or never end)."""
    name = str(path)
    if not path.is_dir() and (path.exists() or path.is_symlink()):
        require_file(path, "scenario file")
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("scenario file not found", source=name) from None
    except IsADirectoryError:
        raise ConfigError("expected a YAML file; got a directory", source=name) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", source=name) from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw_bytes[exc.start : exc.start + 1]
        raise ConfigError(
            f"the file is not valid UTF-8 (byte {exc.start}: {bad!r}); save it as UTF-8",
            source=name,
        ) from None
    return text


def parse_scenario(
    text: str, *, source: str = "<config>", base_dir: str = ".", default_name: str = "scenario"
) -> ScenarioConfig:
    """Validate scenario YAML given as text."""
    data, lines = load_yaml(text, source)
    src = Source(source, lines)
    if data is None:
        raise src.error(
            (),
            "the file is empty; expected a scenario mapping with data, stream, "
            "model and strategies",
        )
    if not isinstance(data, dict):
        raise src.error((), f"expected a mapping at the top level; got a {type(data).__name__}")
    top = build(_ScenarioFields, data, (), src)
    stream = _stream_config(top.stream, src)
    if getattr(stream.options, "online", False) and top.training.epochs != 1:
        raise src.error(("training", "epochs"), f"the stream is online (each sample is seen "
                        f"once), so epochs must be 1; got {top.training.epochs}")
    model = _model_config(top.model, src)
    strategies = _strategies(top, src)
    for index, name in enumerate((top.compare and top.compare.strategies) or []):
        if name not in strategies:
            hint = closest(name, strategies)
            raise src.error(
                ("compare", "strategies", index),
                f"unknown strategy {short_repr(name)} (defined: {', '.join(strategies)})"
                + (f"; did you mean {hint!r}?" if hint else ""),
            )
    return ScenarioConfig(
        name=top.name or default_name,
        description=top.description,
        seed=top.seed,
        threads=top.threads,
        device=top.device,
        data=top.data,
        stream=stream,
        model=model,
        training=top.training,
        strategies=strategies,
        compare=top.compare,
        source=source,
        base_dir=base_dir,
        raw=data,
        lines=src.lines,
    )


def _stream_config(raw: dict, src: Source) -> StreamConfig:
    path: KeyPath = ("stream",)
    raw = dict(raw)
    kind = raw.pop("type", "class_incremental")
    if not isinstance(kind, str) or kind not in STREAM_TYPES:
        hint = closest(str(kind), STREAM_TYPES)
        raise src.error(
            path + ("type",),
            f"unknown stream type {short_repr(kind)} (known: {', '.join(STREAM_TYPES)})"
            + (f"; did you mean {hint!r}?" if hint else ""),
        )
    return StreamConfig(kind, build(STREAM_TYPES[kind].options, raw, path, src))


def _model_config(raw: dict, src: Source) -> ModelConfig:
    path: KeyPath = ("model",)
    raw = dict(raw)
    name = raw.pop("name", None)
    if not isinstance(name, str):
        raise src.error(
            path + ("name",),
            f"expected a model name, one of {', '.join(MODELS)}; got {short_repr(name)}",
        )
    if name not in MODELS:
        hint = closest(name, MODELS)
        raise src.error(
            path + ("name",),
            f"unknown model {short_repr(name)} (known: {', '.join(MODELS)})"
            + (f"; did you mean {hint!r}?" if hint else ""),
        )
    options = build(MODELS[name].options, raw, path, src)
    return ModelConfig(name, options)


def _strategies(top: _ScenarioFields, src: Source) -> dict[str, StrategyConfig]:
    if not top.strategies:
        raise src.error(("strategies",), "expected at least one strategy")
    out: dict[str, StrategyConfig] = {}
    for name, body in top.strategies.items():
        path: KeyPath = ("strategies", str(name))
        _check_strategy_name(name, path, src)
        fields = build(_StrategyFields, body, path, src)
        plugins = [
            _plugin(entry, path + ("plugins", i), src) for i, entry in enumerate(fields.plugins)
        ]
        counts: dict[str, int] = {}
        for spec in plugins:  # two instances of one plugin get distinct names
            counts[spec.name] = counts.get(spec.name, 0) + 1
            if counts[spec.name] > 1:
                spec.name = f"{spec.name}#{counts[spec.name]}"
        out[name] = StrategyConfig(
            name=name,
            plugins=plugins,
            budget=fields.budget if fields.budget is not None else top.budget,
            strict=top.strict if fields.strict is None else fields.strict,
            budget_check=top.budget_check if fields.budget_check is None
            else fields.budget_check,
            compute_budget=fields.compute_budget if fields.compute_budget is not None
            else top.compute_budget,
            compute_share=top.compute_share,
        )
    return out


def _check_strategy_name(name: Any, path: KeyPath, src: Source) -> None:
    """A strategy name lands in tables, logs and checkpoint file names: short, one word."""
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise src.error(path, "strategy names use letters, digits, '_' and '-' only; got "
                        f"{short_repr(name)}")
    if len(name) > MAX_NAME:
        raise src.error(path, f"a strategy name has at most {MAX_NAME} characters; got "
                        f"{len(name):,}: {short_repr(name)}")


def _plugin(entry: Any, path: KeyPath, src: Source) -> PluginSpec:
    if isinstance(entry, str):
        ref, options = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        ref, options = next(iter(entry.items()))
        path = path + (str(ref),)
    else:
        raise src.error(
            path,
            "expected a plugin name, or a mapping with one key (the plugin "
            f"name) to its options, e.g. '- replay: {{selection: herding}}'; got "
            f"{short_repr(entry)}",
        )
    if not isinstance(ref, str):
        raise src.error(path, f"expected a plugin name; got {short_repr(ref)}")
    if len(ref) > MAX_PLUGIN_REF:
        raise src.error(path, f"a plugin name (or package.module:Class) has at most "
                        f"{MAX_PLUGIN_REF} characters; got {len(ref):,}: {short_repr(ref)}")
    try:
        cls = load_plugin_class(ref)
    except ClsimError as exc:
        raise src.error(path, str(exc)) from None
    declared = options_class(cls)
    if declared is None:
        if options not in (None, {}):
            raise src.error(path, f"plugin {short_repr(ref)} takes no options; got "
                            f"{short_repr(options)}")
        parsed = None
    else:
        parsed = _plugin_options(declared, options, ref, path, src)
    short = ref.rsplit(":", 1)[-1].rsplit(".", 1)[-1] if ":" in ref else ref
    return PluginSpec(name=short, ref=ref, cls=cls, options=parsed)


def _plugin_options(declared: type, options: Any, ref: str, path: KeyPath, src: Source) -> Any:
    """The plugin's ``Options`` built from its YAML entry. The plugin's own code runs here
    (its dataclass's ``__init__``, ``__post_init__`` and ``check``): anything it raises
    besides a ValueError is that plugin's fault, named at the entry's key path."""
    try:
        return build(declared, options, path, src)
    except ClsimError:
        raise
    except BaseException as exc:
        if not is_contained(exc):
            raise
        raise src.error(path, f"the options of plugin {short_repr(ref)} "
                        f"({declared.__module__}:{declared.__qualname__}) could not be built: "
                        f"{describe_fault(exc)}") from None


def resolve_path(scenario: ScenarioConfig, value: str | None) -> str | None:
    """A path from the YAML, relative to the YAML's folder unless absolute."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (Path(scenario.base_dir) / path).absolute())
