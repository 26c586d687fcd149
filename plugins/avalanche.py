"""Avalanche's strategies as clsim peers: a named strategy of avalanche-lib, run inside
clsim's loop, scored by clsim and charged by clsim's memory ledger.

Lomonaco et al., "Avalanche: an End-to-End Library for Continual Learning", CVPR
Workshops 2021 (avalanche-lib 0.6, ``avalanche.training.supervised``). The strategies are
Avalanche's own code, unchanged: Naive, Replay, LwF (Li & Hoiem, TPAMI 2017), EWC
(Kirkpatrick et al., PNAS 2017), GDumb (Prabhu et al., ECCV 2020), iCaRL (Rebuffi et
al., CVPR 2017) and the others of that module. This plugin only feeds them clsim's
experiences, predicts with their model, and makes what they keep measurable.

avalanche-lib is optional (it lives in ``.venv-avalanche``, see DEVELOPERS.md): importing
this module does not import it; validating or running a scenario that uses the plugin
without it fails with a ConfigError that says how to get it.

**Options.** ``strategy`` names a class of ``avalanche.training.supervised``;
``options`` are its constructor's keyword arguments (``mem_size``, ``alpha``,
``temperature``, ``ewc_lambda``...), with Avalanche's defaults for what is left out.
Both are checked when the scenario is read: an unknown strategy or option is named with
the closest match, and a value the constructor refuses is reported with Avalanche's
message. What the plugin sets itself (model, optimizer, criterion, batch size, epochs,
device, evaluator) cannot be passed. The strategy trains with the scenario's optimizer
(``training.optimizer``, built once at setup by ``ctx.new_optimizer`` and stepped by
Avalanche's loop), batch size and epochs (``training.batch_size``, ``training.epochs``,
1 on an online stream), as every other strategy of the comparison does. Avalanche's loop
does not report its losses to clsim, so ``training.nonfinite_loss`` cannot act inside it.

**Training.** The plugin owns each experience (``clsim_train_experience``): the point
of the bridge is to run Avalanche's own training loop (its strategy, plugins and
callbacks) unchanged, which clsim's loop cannot host. It turns each delivered experience
(each part of an online stream) into an Avalanche experience and calls
``strategy.train`` on it. Samples stay raw in the Avalanche dataset (uint8 pixels): the
conversion to the model's input (``ctx.data.to_input``) is the first module of the model
Avalanche trains, so every buffer Avalanche fills holds raw samples, as clsim's own
replay does. The
experience carries what Avalanche's benchmarks give (``current_experience``,
``classes_in_this_experience``, ``previous_classes``, ``classes_seen_so_far``, task
label) and, for iCaRL, a ``benchmark`` with ``n_classes_per_exp`` and ``classes_order``.
Avalanche shuffles with torch's global generator, which the engine seeds per strategy,
so runs repeat exactly.

**Prediction.** The argmax of the strategy's model in eval mode on clsim's converted
test inputs. For strategies that train clsim's model itself this is the engine's own
prediction, so ``clsim_predict`` defers to it; iCaRL predicts with its nearest-mean eval
classifier (before its first class means exist, with the trained classifier).

**Memory.** The ledger charges everything reachable from the plugin. After each
experience the plugin drops what Avalanche keeps only for training (its current
experience, adapted dataset, data loader, mini-batch, output and loss are dropped by
Avalanche itself; the loss and the gradients by the plugin) and *compacts* every
exemplar dataset its storage policies hold: Avalanche's buffers are subsets that keep
the whole experience tensor alive, so each is replaced by a dataset over copies of only
the kept samples (same order, labels and task labels), labels and task labels as
tensors of the narrowest integer type. A buffer that also carries a tensor per sample
(DER's ``logits``, stored after each experience) is compacted with them: its kept
logits are copied into one tensor (their dtype, float32, one row a sample) that the
compact dataset reads back row by row after the task label, as DER's buffer does, so
DER trains on exactly what it trains on uncompacted. The ledger then charges exactly
the kept raw samples (and logits). Parts: ``<name>.buffer.x`` / ``.y`` / ``.task`` (the kept
samples, labels and task labels of every compacted buffer, and iCaRL's exemplars),
``<name>.buffer.logits`` (DER's kept logits), ``<name>.methods.<class>``
(each Avalanche plugin of the strategy: reservoir weights, LwF's old model, EWC's saved
parameters and importances, GDumb's initial model, iCaRL's old model and class means),
``<name>.strategy`` (the strategy object: its optimizer's state, counters, names of
parameters, the reservoir weights of a buffer it keeps itself, ER_ACE's and DER's).
Python numbers and strings Avalanche keeps (counters, buffer sizes, class ids in sets,
iCaRL's exemplar labels) are charged 8 bytes a number and flagged estimated. A dataset
holding any other attribute, or per-sample values that are not tensors of one shape and
dtype, is left as Avalanche keeps it, and charged as such.

**Reconstructed or adapted:**

* GDumb (and any strategy that replaces its model) trains a fresh copy each
  experience; the plugin copies the trained weights back into clsim's model and points
  the strategy and its optimizer at it again, so clsim's model is the learner's.
* A strategy's optimizer state (momentum) is kept between experiences, as Avalanche
  does, and charged.
* ``future_classes`` is not given (clsim shows no future). iCaRL's ``benchmark`` lists
  the classes not met yet as one trailing block, so that ``sum(n_classes_per_exp)`` is
  the label space's size as in a benchmark known in advance.
* Options that a strategy class requires but whose Avalanche plugin has a default take
  that default: LwF ``alpha`` 1, ``temperature`` 2; iCaRL ``buffer_transform`` None,
  ``fixed_memory`` True.
* Task labels are the experience's task id (0 when none); the model is single-headed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from clsim_plugins.buffers import label_dtype
from torch import nn

from clsim.context import RunContext
from clsim.data.dataset import DataInfo, normalise
from clsim.errors import ConfigError, OptionError
from clsim.stream import Experience

EVAL_MB_SIZE = 1024  # Avalanche's own evaluation batches (iCaRL's exemplar pass)

# constructor arguments the plugin fills in, and from what
SET_BY_PLUGIN = {
    "model": "clsim's model, the scenario's 'model' section",
    "feature_extractor": "clsim's model's features",
    "classifier": "clsim's model's head",
    "optimizer": "training.optimizer",
    "criterion": "cross-entropy",
    "train_mb_size": "training.batch_size",
    "train_epochs": "training.epochs",
    "eval_mb_size": f"{EVAL_MB_SIZE}",
    "device": "the scenario's device",
    "evaluator": "a silent evaluator (clsim scores the run)",
    "eval_every": "-1 (clsim evaluates after each experience)",
    "plugins": "the strategy's own",
}

# required constructor arguments whose Avalanche plugin has a default
PLUGIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "LwF": {"alpha": 1, "temperature": 2},
    "ICaRL": {"buffer_transform": None, "fixed_memory": True},
}

# Avalanche's messages about its own machinery, not about the user's scenario
_QUIET = ("No loggers specified", "Call to deprecated function")


def interop() -> ModuleType:
    """:mod:`clsim.interop.avalanche` (which does not import avalanche-lib itself)."""
    from clsim.interop import avalanche

    return avalanche


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------


@dataclass
class AvalancheOptions:
    strategy: str = field(
        default="Naive",
        metadata={"help": "a strategy class of avalanche.training.supervised (Naive, Replay, "
                  "LwF, EWC, GDumb, ICaRL...)"},
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "keyword arguments of the strategy's constructor (mem_size, alpha, "
                  "temperature, ewc_lambda...); Avalanche's defaults otherwise"},
    )

    def check(self) -> None:
        """Strategy and option names, and the constructor's acceptance of the values, at
        the time the scenario is read (``clsim validate`` reports them by key)."""
        cls = strategy_class(self.strategy)
        kwargs = strategy_options(cls, self.strategy, self.options)
        probe = _Probe()
        build_strategy(cls, self.strategy, probe, torch.optim.SGD(probe.parameters(), lr=0.1),
                       batch_size=1, epochs=1, device="cpu", options=kwargs)


def strategy_class(name: str) -> type:
    """Avalanche's strategy class ``name``; OptionError('strategy') naming the closest."""
    bridge = interop()
    try:
        bridge.import_avalanche()
    except bridge.AvalancheMissing as exc:
        raise OptionError("strategy", exc.detail) from None
    from avalanche.training.templates.base import BaseTemplate

    module = importlib.import_module(bridge.STRATEGY_MODULE)
    known = sorted(n for n, v in vars(module).items()
                   if isinstance(v, type) and issubclass(v, BaseTemplate))
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise OptionError("strategy", f"Avalanche has no strategy {name!r} in "
                          f"{bridge.STRATEGY_MODULE}; {hint}(it has {', '.join(known)})")
    return getattr(module, name)


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword arguments ``cls(...)`` accepts: its ``__init__``'s, and, while an
    ``__init__`` forwards ``**kwargs``, those of its bases'."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        signature = inspect.signature(klass.__init__)
        forwards = False
        for p in list(signature.parameters.values())[1:]:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
                params.setdefault(p.name, p)
        if not forwards:
            break
    return params


def strategy_options(cls: type, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over the plugin defaults; OptionError naming a key the strategy does
    not take, one the plugin sets, or a required one left out."""
    params = constructor_parameters(cls)
    for key in options:
        if key in SET_BY_PLUGIN:
            raise OptionError(f"options.{key}", f"is set by the plugin ({SET_BY_PLUGIN[key]}); "
                              "remove it")
        if key not in params:
            takes = sorted(k for k in params if k not in SET_BY_PLUGIN)
            close = difflib.get_close_matches(key, takes, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise OptionError(f"options.{key}", f"Avalanche's {name} takes no option {key!r}; "
                              f"{hint}(its options: {', '.join(takes) or 'none'})")
    kwargs = {**PLUGIN_DEFAULTS.get(name, {}), **options}
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty
               and k not in SET_BY_PLUGIN and k not in kwargs]
    if missing:
        raise OptionError("options", f"Avalanche's {name} needs a value for "
                          f"{', '.join(missing)} (it gives no default)")
    return kwargs


def build_strategy(cls: type, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                   batch_size: int, epochs: int, device: torch.device | str,
                   options: dict[str, Any]) -> Any:
    """``cls`` on ``model`` (or on its features and head, for strategies built from a
    feature extractor and a classifier, like iCaRL), silent; OptionError('options')
    with Avalanche's message when the constructor refuses."""
    from avalanche.training.plugins import EvaluationPlugin

    params = constructor_parameters(cls)
    kwargs: dict[str, Any] = dict(train_mb_size=batch_size, train_epochs=epochs,
                                  eval_mb_size=EVAL_MB_SIZE, device=device, **options)
    if "model" in params:
        kwargs["model"] = model
        if "criterion" in params:
            kwargs["criterion"] = nn.CrossEntropyLoss()
    else:
        kwargs.update(feature_extractor=model.features, classifier=model.head)
    try:
        with _quiet():
            kwargs["evaluator"] = EvaluationPlugin(loggers=[])
            return cls(optimizer=optimizer, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        raise OptionError("options" if options else "strategy",
                          f"Avalanche's {name} could not be built with {given}: "
                          f"{type(exc).__name__}: {exc}") from None


@contextmanager
def _quiet() -> Iterator[None]:
    """Avalanche's notes about its own machinery (no logger given, its internals calling
    its deprecated functions) are not the user's concern; other warnings pass on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if not str(w.message).startswith(_QUIET):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


class _Probe(nn.Module):
    """A stand-in model for checking a strategy's options before the real one exists."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.head = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------
# the model Avalanche trains: raw samples in
# ---------------------------------------------------------------------------


class RawInput(nn.Module):
    """Raw samples -> the model's float input, exactly as ``DataInfo.to_input``; while
    ``converted`` is set (clsim's evaluation, whose inputs are converted already) it
    passes inputs through. Holds the dataset's constants only (no data)."""

    def __init__(self, data: DataInfo) -> None:
        super().__init__()
        self.scale, self.mean, self.std = data.scale, data.mean, data.std
        self.converted = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.converted else normalise(x, self.scale, self.mean, self.std)


class RawInputModel(nn.Module):
    """clsim's model behind :class:`RawInput`: what Avalanche trains and copies. Exposes
    ``features`` (raw samples -> features) and ``head`` for strategies that take them
    apart (iCaRL)."""

    def __init__(self, model: nn.Module, data: DataInfo) -> None:
        super().__init__()
        self.to_input = RawInput(data)
        self.net = model

    @property
    def features(self) -> nn.Module:
        return nn.Sequential(self.to_input, self.net.features)

    @property
    def head(self) -> nn.Module:
        return self.net.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.to_input(x))


@contextmanager
def converted_inputs(model: nn.Module) -> Iterator[None]:
    """Let ``model`` read converted inputs (its RawInput modules pass them through)."""
    raw = [m for m in model.modules() if isinstance(m, RawInput)]
    for m in raw:
        m.converted = True
    try:
        yield
    finally:
        for m in raw:
            m.converted = False


# ---------------------------------------------------------------------------
# compact exemplar datasets
# ---------------------------------------------------------------------------


class TensorColumn:
    """A per-sample attribute read from a tensor (Avalanche keeps labels as Python
    lists; this keeps them at their dtype, and Avalanche reads them as ints)."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> int:
        return int(self.values[index])


class RowColumn:
    """A per-sample tensor attribute (DER's logits) read from the rows of one tensor."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.values[index]


@dataclass
class Exemplars:
    """The kept samples of every compacted buffer (names the ledger's parts); ``logits``:
    the kept per-sample outputs of buffers that carry them (DER's)."""

    x: list[torch.Tensor] = field(default_factory=list)
    y: list[torch.Tensor] = field(default_factory=list)
    task: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(x) for x in self.x)


LABELS = ("targets", "targets_task_labels")
PER_SAMPLE = ("logits",)  # data attributes a buffer may carry besides LABELS (DER's)


def compact_dataset(data: Any, n_classes: int) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """A dataset over copies of ``data``'s samples, labels, task labels and per-sample
    tensor attributes (DER's logits) only, in the same order and read back as ``data``
    reads them, and those tensors by Exemplars field (x, y, task, logits); None when
    ``data`` holds anything else (it is then kept as it is)."""
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset,
    )
    from avalanche.benchmarks.utils.data import make_avalanche_dataset
    from avalanche.benchmarks.utils.data_attribute import DataAttribute
    from avalanche.benchmarks.utils.flat_data import FlatData

    attributes = dict(getattr(data, "_data_attributes", {}))
    extra = [name for name in attributes if name not in LABELS]
    if not set(LABELS) <= set(attributes) or not set(extra) <= set(PER_SAMPLE):
        return None
    n = len(data)
    columns: dict[str, torch.Tensor] = {}
    for name in extra:
        values = list(attributes[name])
        if not all(isinstance(v, torch.Tensor) for v in values) or \
                len({(v.shape, v.dtype, v.device) for v in values}) != 1:
            return None
        columns[name] = torch.stack(values)
    x = torch.stack([data[i][0] for i in range(n)])
    tasks = list(data.targets_task_labels)
    y = torch.tensor(list(data.targets), dtype=label_dtype(n_classes))
    task = torch.tensor(tasks, dtype=label_dtype(max(tasks) + 1))
    compact = _make_taskaware_tensor_classification_dataset(
        x, y, targets=FlatData([TensorColumn(y)]),
        task_labels=DataAttribute(FlatData([TensorColumn(task)]), "targets_task_labels"),
    )
    if columns:  # as DER adds its logits: after the labels, read back as rows
        compact = make_avalanche_dataset(compact, data_attributes=[
            DataAttribute(FlatData([RowColumn(values)]), name,
                          use_in_getitem=attributes[name].use_in_getitem)
            for name, values in columns.items()])
    if list(compact._data_attributes) != list(attributes) or any(
            compact._data_attributes[k].use_in_getitem != a.use_in_getitem
            for k, a in attributes.items()):
        return None  # its samples would not read back in the same layout
    return compact, {"x": x, "y": y, "task": task, **columns}


_NO_DESCENT = (nn.Module, torch.Tensor, torch.optim.Optimizer, type, str, bytes, int, float,
               bool, complex)


def _shows_part(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of a larger storage (which the ledger charges whole)."""
    return t.layout == torch.strided and \
        t.untyped_storage().nbytes() > t.numel() * t.element_size()


def compact_buffers(roots: list[Any], n_classes: int, skip: Any) -> Exemplars:
    """Replace every non-empty Avalanche dataset reachable from ``roots`` (through
    attributes, dicts and lists; not through modules, tensors, optimizers or ``skip``)
    by its compact copy, and every tensor there that is a view of a larger storage (the
    reservoir weights of a whole experience) by a copy of what it shows; the kept
    tensors."""
    from avalanche.benchmarks.utils.data import AvalancheDataset

    kept = Exemplars()
    replaced: dict[int, Any] = {}
    copies: dict[int, torch.Tensor] = {}
    visited: set[int] = {id(skip)}

    def replacement(data: Any) -> Any:
        if id(data) not in replaced:
            result = compact_dataset(data, n_classes) if len(data) else None
            replaced[id(data)] = data if result is None else result[0]
            if result is not None:
                for part, tensor in result[1].items():
                    getattr(kept, part).append(tensor)
        return replaced[id(data)]

    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in visited or isinstance(obj, _NO_DESCENT) or inspect.isroutine(obj):
            continue
        visited.add(id(obj))
        if isinstance(obj, (dict, list)):
            slots, target = (obj if isinstance(obj, dict) else dict(enumerate(obj))), obj
        elif hasattr(obj, "__dict__"):
            slots = target = vars(obj)  # set in the instance dict: no property setter runs
        else:
            continue
        for key, value in list(slots.items()):
            if isinstance(value, AvalancheDataset):
                target[key] = replacement(value)
            elif isinstance(value, torch.Tensor) and _shows_part(value):
                if id(value) not in copies:
                    copies[id(value)] = value.clone()
                target[key] = copies[id(value)]
            elif isinstance(value, (dict, list)) or hasattr(value, "__dict__"):
                stack.append(value)
    return kept


# ---------------------------------------------------------------------------
# the plugin
# ---------------------------------------------------------------------------


@dataclass
class Timeline:
    """What iCaRL reads of a benchmark: new classes per experience and their order (the
    classes not met yet as one trailing block)."""

    n_classes_per_exp: list[int]
    classes_order: list[int]


class Methods:
    """The strategy's Avalanche plugins by class name, so the ledger names their parts."""

    def __init__(self, plugins: list[Any]) -> None:
        for plugin in plugins:
            setattr(self, type(plugin).__name__.lstrip("_"), plugin)


class AvalanchePlugin:
    """A strategy of avalanche-lib trained and scored in clsim's loop."""

    Options = AvalancheOptions

    def __init__(self, options: AvalancheOptions | None = None) -> None:
        self.options = options or AvalancheOptions()
        # attribute order is the ledger's naming order: the exemplars first
        self.buffer = Exemplars()
        self.methods: Methods | None = None
        self.strategy: Any = None
        self.model: nn.Module | None = None  # the module Avalanche was built on
        self.seen: torch.Tensor | None = None  # bool per label: met in training
        self.class_order: torch.Tensor | None = None  # labels in order of first meeting
        self.new_classes: torch.Tensor | None = None  # new labels per Avalanche experience

    # -- setup ----------------------------------------------------------------

    def clsim_setup(self, ctx: RunContext) -> None:
        name = self.options.strategy
        try:
            cls = strategy_class(name)
            kwargs = strategy_options(cls, name, self.options.options)
        except OptionError as exc:
            raise ConfigError(str(exc), key_path=f"avalanche.{exc.key}") from None
        if not hasattr(ctx.model, "features") or not hasattr(ctx.model, "head"):
            raise ConfigError("avalanche: the model needs 'features' and 'head' (every model "
                              "of the clsim zoo has them)")
        wrapped = RawInputModel(ctx.model, ctx.data)
        optimizer = ctx.new_optimizer(wrapped)
        try:
            self.strategy = build_strategy(cls, name, wrapped, optimizer,
                                           batch_size=ctx.batch_size, epochs=ctx.epochs,
                                           device=ctx.device, options=kwargs)
        except OptionError as exc:
            raise ConfigError(str(exc), key_path=f"avalanche.{exc.key}") from None
        self.model = self.strategy.model
        self.methods = Methods(self.strategy.plugins)
        self.seen = torch.zeros(ctx.n_classes, dtype=torch.bool)
        self.class_order = torch.zeros(0, dtype=torch.long)
        self.new_classes = torch.zeros(0, dtype=torch.long)

    # -- training ----------------------------------------------------------------

    def clsim_train_experience(self, ctx: RunContext, experience: Experience) -> Any:
        if experience.n_train == 0:
            return True
        avalanche_exp = self._experience(ctx, experience)
        with _quiet():
            self.strategy.train(avalanche_exp, eval_streams=[])
        self._settle(ctx)
        ctx.log("avalanche_experience", strategy_class=self.options.strategy,
                exemplars=self.buffer.count)
        return True

    def _experience(self, ctx: RunContext, experience: Experience) -> Any:
        """The delivered samples as an Avalanche experience with its classes timeline."""
        from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
        from avalanche.benchmarks.scenarios.generic_scenario import EagerCLStream

        y = experience.train_y
        present = set(y.unique().tolist())
        previous = set(self.class_order.tolist())
        order = [c for c in dict.fromkeys([*experience.classes, *y.tolist()]) if c in present]
        new = [c for c in order if c not in previous]
        if self.options.strategy == "ICaRL" and len(new) < len(present):
            raise ConfigError(
                f"avalanche: Avalanche's ICaRL assumes every class arrives in one experience; "
                f"experience {experience.index} brings back classes "
                f"{sorted(present & previous)} (use a class-incremental stream)")
        index = len(self.new_classes)
        task = experience.task_id or 0
        data = interop().tensor_dataset(experience.train_x, y, task)
        exp = DatasetExperience(dataset=data, current_experience=index)
        EagerCLStream("train", [exp])  # sets the experience's origin stream
        exp.current_experience = index
        exp.classes_in_this_experience = present
        exp.previous_classes = previous
        exp.classes_seen_so_far = present | previous
        self.seen[new] = True
        self.class_order = torch.cat([self.class_order, torch.tensor(new, dtype=torch.long)])
        self.new_classes = torch.cat([self.new_classes, torch.tensor([len(new)])])
        unseen = (~self.seen).nonzero().flatten().tolist()
        exp.benchmark = Timeline(self.new_classes.tolist() + [len(unseen)],
                                 self.class_order.tolist() + unseen)
        return exp

    def _settle(self, ctx: RunContext) -> None:
        """Keep what the method keeps, nothing it needs only while training."""
        strategy = self.strategy
        if strategy.model is not self.model:  # retrained from a copy (GDumb)
            self.model.load_state_dict(strategy.model.state_dict())
            strategy.model = self.model
            strategy.make_optimizer()  # the optimizer follows, by parameter name
        strategy.optimizer.zero_grad(set_to_none=True)
        strategy.loss = None  # reset by Avalanche before every use
        # buffers live in plugins, and in the strategy itself for those that keep their
        # own (ER_ACE's storage_policy; DER's, whose logits are compacted with it)
        roots = [*strategy.plugins, *filter(None, [getattr(strategy, "storage_policy", None)])]
        self.buffer = compact_buffers(roots, ctx.n_classes, skip=strategy)
        icarl = getattr(self.methods, "ICaRLPlugin", None)
        if icarl is not None:  # its exemplars are copies already, on the device
            self.buffer.x.extend(icarl.x_memory)

    # -- evaluation --------------------------------------------------------------

    @torch.no_grad()
    def clsim_predict(self, ctx: RunContext, x: torch.Tensor) -> torch.Tensor | None:
        model = self.model
        if isinstance(model, RawInputModel):
            return None  # the engine's argmax of clsim's model is the strategy's
        means = getattr(getattr(model, "eval_classifier", None), "class_means_dict", None)
        if means is not None and not means:
            return None  # iCaRL before its first class means: the trained classifier
        model.eval()
        with converted_inputs(model):
            return model(x).argmax(dim=1)

    def clsim_report(self, ctx: RunContext) -> dict[str, Any]:
        return {"strategy": self.options.strategy, "exemplars": self.buffer.count}
