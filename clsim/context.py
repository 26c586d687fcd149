"""The run context: the public state a plugin may read, and the services it may call."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clsim.data.dataset import DataInfo
from clsim.feature_cache import feature_cache, is_frozen
from clsim.labels import LabelSpace
from clsim.memory import measure, model_bytes
from clsim.models.heads import MASK_VALUE
from clsim.seeding import numpy_generator, torch_generator
from clsim.stream import Experience


@dataclass(eq=False)
class RunContext:
    """What a plugin sees of a run. The engine updates it; plugins read it.

    Attributes a plugin may rely on: ``strategy`` (its name), ``model``, ``optimizer``
    (the standard loop's, set while it trains, None otherwise), ``device``, ``data`` (the
    dataset described without its samples: names, shape, normalisation; no test data
    reaches a plugin while it trains), ``labels`` (the stream's
    :class:`~clsim.labels.LabelSpace`: levels of class ids), ``n_classes`` (size of the label
    space: the model's outputs), ``sample_shape`` / ``sample_dtype`` / ``sample_bytes``
    (one raw sample),
    ``budget_bytes`` (None when the strategy has no budget), ``compute_budget`` (its
    compute budget resolved for the stream, a :class:`~clsim.compute_budget.ComputeAllowance`
    with ``kind``, ``total`` and each experience's ``shares``; None without one; the
    standard loop keeps to it), ``seen_classes`` (class ids
    met so far, in order of first appearance), ``task_classes`` (when the stream gives task
    ids: each task met so far and its classes, the outputs of its head), ``experience``
    (the current one, or None),
    ``epochs`` / ``batch_size`` (the standard loop's settings), ``seed`` and ``log``
    (a function taking an event name and fields, written to events.jsonl).

    Services: ``to_input``, ``features``, ``task_loss`` (the loop's default loss), the
    plugin's own generators, ``held_bytes`` (what the model and each plugin of the
    strategy hold now) and ``loop_state_bytes`` (what the loop's optimizer will hold),
    for sizing a store, and for a plugin that owns an experience
    ``new_optimizer`` / ``backward_step`` (the scenario's optimizer and non-finite policy).
    """

    strategy: str
    model: nn.Module
    device: torch.device
    data: DataInfo
    seed: int
    epochs: int
    batch_size: int
    budget_bytes: int | None = None
    compute_budget: Any = None  # clsim.compute_budget.ComputeAllowance, set by the engine
    labels: LabelSpace | None = None
    optimizer: torch.optim.Optimizer | None = None
    experience: Experience | None = None
    seen_classes: list[int] = field(default_factory=list)
    task_classes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    log: Callable[..., None] = lambda event, **fields: None
    _trainer: Any = None  # the standard loop (clsim.training.Trainer), set by the engine
    _heads: Any = None  # (key, label -> head-outputs table) of task_loss, built as tasks come
    _meter: Any = None  # the compute meter (clsim.compute.ComputeMeter), set by the engine
    # the strategy's (name, plugin) pairs in its order, set by the engine: measured by
    # held_bytes, never handed to a plugin
    _plugins: list[tuple[str, Any]] = field(default_factory=list, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        # Nothing may be parked on the context: the ledger charges plugin objects, not ctx.
        if name not in _FIELDS:
            raise AttributeError(
                f"RunContext has no attribute {name!r}; a plugin keeps its state on itself "
                f"(self.{name} = ...), where the memory ledger charges it"
            )
        object.__setattr__(self, name, value)

    @property
    def n_classes(self) -> int:
        return self.data.n_classes if self.labels is None else self.labels.n_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.data.sample_shape

    @property
    def sample_dtype(self) -> torch.dtype:
        return self.data.sample_dtype

    @property
    def sample_bytes(self) -> int:
        return self.data.sample_bytes

    def model_bytes(self) -> int:
        """Bytes of the model's parameters and buffers right now."""
        return model_bytes(self.model)

    def held_bytes(self, also: tuple[str, Any] | None = None) -> dict[str, int]:
        """Bytes the strategy holds now, by holder, as the ledger measures them:
        ``"model"``, then every plugin of the strategy under its name in the YAML, in the
        strategy's order (what the loop's optimizer carries is not here:
        :meth:`loop_state_bytes`). ``also``, a ``(name, plugin)`` pair, is measured after
        them when that plugin is not one of the strategy's (a plugin driven by hand outside
        a run). A store sized from the budget reads it through
        :func:`clsim.capacity.held_beside`."""
        plugins = list(self._plugins)
        if also is not None and self.name_of(also[1]) is None:
            plugins.append(also)
        reading = measure(self.model, plugins, skip_types=(RunContext,))
        return {"model": reading.bytes_of("model"),
                **{name: reading.bytes_of(name) for name, _ in plugins}}

    def name_of(self, plugin: Any) -> str | None:
        """``plugin``'s name in the strategy (its key in the YAML), or None when it is not
        one of the strategy's plugins."""
        return next((name for name, p in self._plugins if p is plugin), None)

    def loop_state_bytes(self) -> int:
        """Bytes of the optimizer state the standard loop will carry through an online
        experience for the model's trainable parameters as they are now (a momentum
        buffer per parameter for SGD with momentum; Adam's two moments and step counts),
        as the ledger charges it at the peak (``loop.optimizer``); 0 offline, for a
        stateless optimizer, and outside a run. A store sized from the budget reserves
        it (:func:`clsim.capacity.held_beside`)."""
        return 0 if self._trainer is None else self._trainer.carried_state_bytes()

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw samples (storage dtype, any device) -> the model's float input on ``device``."""
        return self.data.to_input(x.to(self.device, non_blocking=True))

    def torch_generator(
        self, *names: str | int, device: str | torch.device = "cpu"
    ) -> torch.Generator:
        """A generator private to the caller, derived from the run's seed and ``names``."""
        return torch_generator(self.seed, self.strategy, *names, device=device)

    def numpy_generator(self, *names: str | int) -> np.random.Generator:
        return numpy_generator(self.seed, self.strategy, *names)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The standard loop's task loss: cross-entropy over the label space (per level,
        for hierarchical labels). When the stream gives task ids (``task_classes``), each
        row's softmax is over the outputs of the task its label belongs to: a multi-headed
        output layer, the same for stream rows, replayed rows and any plugin's use of this
        loss (a label of no task met keeps every output)."""
        y = y.to(logits.device, non_blocking=True)
        if self.task_classes:
            logits = logits.masked_fill(~self._own_head(y, logits.shape[1]), MASK_VALUE)
        if self.labels is None:
            return F.cross_entropy(logits, y)
        return self.labels.cross_entropy(logits, y)

    def _own_head(self, y: torch.Tensor, n_outputs: int) -> torch.Tensor:
        """``(N, n_outputs)`` bool: the outputs of the task each label belongs to. The
        label -> head table is built once per set of tasks met, not at every batch."""
        key = (tuple(self.task_classes.items()), n_outputs, y.device)
        if self._heads is None or self._heads[0] != key:
            head_of = torch.ones(n_outputs, n_outputs, dtype=torch.bool)  # row: a label's head
            for classes in self.task_classes.values():
                index = torch.tensor(classes, dtype=torch.long)
                head = torch.zeros(n_outputs, dtype=torch.bool)
                head[index] = True
                head_of[index] = head
            self._heads = (key, head_of.to(y.device))
        return self._heads[1][y]

    def new_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The scenario's optimizer (``training.optimizer``) over ``params`` (a module,
        parameters or :class:`clsim.loop_types.Trainable` items), for a plugin that owns
        an experience and still takes gradient steps."""
        return self._loop("new_optimizer").new_optimizer(params)

    def backward_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
        """Backward and step under the scenario's non-finite policy; False when the
        batch was skipped (``training.nonfinite_loss: skip_batch``)."""
        return self._loop("backward_step").backward_step(optimizer, loss)

    def compute_part(self, label: str) -> AbstractContextManager[None]:
        """A context manager: what the calling plugin computes inside is charged to
        ``<plugin>.<label>`` in the strategy's compute (``replay.herding``, ``lwf.teacher``)
        instead of ``<plugin>.<hook>``. Harmless outside a run or with accounting off."""
        if not isinstance(label, str) or not label or "." in label:
            raise ValueError(f"ctx.compute_part takes a non-empty name without dots; got "
                             f"{label!r}")
        return nullcontext() if self._meter is None else self._meter.plugin_part(label)

    def compute_step(self, *signature: Any) -> AbstractContextManager[None]:
        """A context manager around one step of a plugin's own training loop: the first
        step of each ``signature`` (hashable values from which the step's FLOPs follow:
        input shapes, which module) in an experience is counted, later ones are charged
        the same, as the standard loop's steps are (:mod:`clsim.compute`;
        ``CLSIM_COMPUTE=every_step`` counts every step, to check the signature). Inside a
        hook of the standard loop's batch it marks work whose FLOPs the loop's signature
        cannot know (a random number of rows): memoised and charged on its own."""
        return nullcontext() if self._meter is None else self._meter.plugin_step(signature)

    def _loop(self, service: str) -> Any:
        if self._trainer is None:
            raise RuntimeError(f"ctx.{service} is only available while a run is in progress")
        return self._trainer

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """``model.features`` of raw samples, in eval mode, batched; the mode is restored.
        A frozen encoder's features come from the simulator's feature cache, computed in
        calls of ``min(batch_size, len(x))`` rows, the last one zero-padded (so a few
        shots are not padded to a whole batch; :mod:`clsim.feature_cache`)."""
        was_training = self.model.training
        self.model.eval()
        try:
            encoder = self.model.features
            if len(x) and is_frozen(encoder):
                return feature_cache().features(encoder, x, min(batch_size, len(x)),
                                                self.to_input, self.input_key())
            parts = [
                encoder(self.to_input(x[i : i + batch_size]))
                for i in range(0, len(x), batch_size)
            ]
        finally:
            self.model.train(was_training)
        if not parts:
            return torch.empty(0, getattr(self.model, "feature_dim", 0), device=self.device)
        return torch.cat(parts)

    def input_key(self) -> tuple:
        """What :meth:`to_input` does to raw samples, for a feature cache key."""
        data = self.data
        return ("to_input", data.scale, data.mean, data.std, str(self.device))


_FIELDS = frozenset(f.name for f in fields(RunContext))
