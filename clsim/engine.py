"""The event loop: replay a stream into a strategy's plugins, measure, evaluate, record.

``run_strategy`` is the whole loop for one strategy; read it top to bottom. Everything
random comes from generators derived from the run seed (model init, batch order,
each plugin's own), so the same config and seed give the same metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clsim.config import ScenarioConfig, StrategyConfig, resolve_path
from clsim.context import RunContext
from clsim.data import Dataset, load_dataset
from clsim.errors import BudgetExceededError, ClsimError, ConfigError, PluginError
from clsim.evaluation import evaluate
from clsim.logging.events import EventLog
from clsim.logging.tensorboard import TensorBoardLogger
from clsim.memory import Ledger, measure, model_bytes
from clsim.metrics import AccuracyMatrix, seen_accuracy, summarize
from clsim.models import build_model
from clsim.plugin_manager import HookRunner, build_plugin_manager
from clsim.seeding import derive_seed, torch_generator
from clsim.stream import Stream
from clsim.streams import STREAM_BUILDERS
from clsim.training import Trainer


@dataclass
class StrategyOutcome:
    """What one strategy's run produced; ``error`` is set when it failed part-way."""

    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    budget: str | None = None
    budget_bytes: int | None = None
    ledger: Ledger | None = None
    wall_seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        ledger = self.ledger or Ledger(self.budget_bytes)
        return {
            "status": "failed" if self.error else "ok",
            "error": self.error,
            **self.metrics,
            "budget": self.budget,
            "budget_bytes": self.budget_bytes,
            "ledger": ledger.to_list(),
            "peak_bytes": ledger.peak_bytes,
            "over_budget": ledger.over_budget,
            "memory_estimated": ledger.estimated,
            "wall_seconds": round(self.wall_seconds, 3),
        }


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


def load_scenario_data(scenario: ScenarioConfig) -> Dataset:
    data = scenario.data
    options = {} if data.path is None else {"path": resolve_path(scenario, data.path)}
    return load_dataset(data.dataset, root=resolve_path(scenario, data.root), **options)


def build_scenario_model(scenario: ScenarioConfig, dataset: Dataset):
    """The scenario's model for ``dataset``; a model that cannot be built is a ConfigError."""
    try:
        return build_model(scenario.model.name, dataset.sample_shape, dataset.n_classes,
                           scenario.model.options)
    except ClsimError:
        raise
    except (RuntimeError, MemoryError, ValueError) as exc:  # e.g. an absurd layer width
        raise ConfigError(f"model {scenario.model.name!r} could not be built for samples of "
                          f"shape {dataset.sample_shape}: {exc}", source=scenario.source,
                          key_path="model") from None


def build_stream(scenario: ScenarioConfig, dataset: Dataset, seed: int) -> Stream:
    """The scenario's stream; option errors become ConfigErrors at ``stream``."""
    options = {k: v for k, v in vars(scenario.stream).items() if k != "type"}
    try:
        stream = STREAM_BUILDERS[scenario.stream.type](dataset, seed=seed, **options)
    except ValueError as exc:
        raise ConfigError(str(exc), source=scenario.source, key_path="stream") from None
    for exp in stream:  # every experience must be trainable and testable
        if exp.n_train == 0 or exp.n_test == 0:
            split = "training" if exp.n_train == 0 else "test"
            raise ConfigError(f"experience {exp.index} (classes {list(exp.classes)}) has no "
                              f"{split} samples in dataset {dataset.name!r}",
                              source=scenario.source, key_path="stream")
    return stream


def run_strategy(
    scenario: ScenarioConfig,
    strategy: StrategyConfig,
    dataset: Dataset,
    stream: Stream,
    *,
    seed: int,
    device: torch.device,
    events: EventLog | None = None,
    tensorboard: TensorBoardLogger | None = None,
    progress: Callable[[str, int], Any] | None = None,
) -> StrategyOutcome:
    """Train ``strategy`` on ``stream`` and score it.

    A failure a user can cause (bad plugin option, over budget in strict mode, a plugin
    raising, a diverging loss) is returned as the outcome's ``error``, with the budget and
    the ledger recorded up to that point; anything else is a bug and propagates.
    """
    started = time.perf_counter()
    outcome = StrategyOutcome(
        strategy.name, budget=None if strategy.budget is None else str(strategy.budget)
    )
    events = events or EventLog(None)
    tensorboard = tensorboard or TensorBoardLogger(None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # setup: model, plugins (first listed is called first), budget, context
        torch.manual_seed(derive_seed(seed, "model"))
        model = build_scenario_model(scenario, dataset).to(device)
        torch.manual_seed(derive_seed(seed, strategy.name, "torch-global"))
        plugins = [(spec.name, _instantiate(spec)) for spec in strategy.plugins]
        where = {"experience": None}
        hooks = HookRunner(build_plugin_manager(plugins), lambda: _where(strategy.name, where))
        if strategy.budget is not None:
            outcome.budget_bytes = strategy.budget.resolve(
                model_bytes=model_bytes(model), sample_bytes=dataset.sample_bytes
            )
        outcome.ledger = ledger = Ledger(outcome.budget_bytes)
        ctx = RunContext(
            strategy=strategy.name,
            model=model,
            device=device,
            dataset=dataset,
            seed=seed,
            epochs=scenario.training.epochs,
            batch_size=scenario.training.batch_size,
            budget_bytes=outcome.budget_bytes,
            log=lambda event, **f: events.write(event, strategy=strategy.name, **f),
        )
        trainer = Trainer(ctx, hooks, scenario.training, torch_generator(seed, "batches"))
        ctx._fit = lambda x, y, epochs=None, **kw: trainer.fit(x, y, epochs=epochs, **kw)
        matrix = AccuracyMatrix(
            correct=np.zeros((len(stream), len(stream)), dtype=np.int64),
            counts=np.array([exp.n_test for exp in stream], dtype=np.int64),
        )
        eval_bs = scenario.training.eval_batch_size
        try:
            hooks.call("clsim_setup", ctx=ctx)
            matrix.initial_correct = evaluate(ctx, hooks, stream, eval_bs)
            for exp in stream:
                where["experience"] = exp.index
                ctx.experience = exp
                ctx.seen_classes.extend(c for c in exp.classes if c not in ctx.seen_classes)
                events.write(
                    "experience_start",
                    strategy=strategy.name,
                    experience=exp.index,
                    classes=list(exp.classes),
                    n_train=exp.n_train,
                )
                # train: a plugin may own this experience, else the standard loop runs
                hooks.call("clsim_before_experience", ctx=ctx, experience=exp)
                trainer.progress = (
                    progress(
                        f"{strategy.name} {exp.index + 1}/{len(stream)}",
                        trainer.n_batches(exp.n_train),
                    )
                    if progress
                    else None
                )
                loss = float("nan")
                owner, _ = hooks.first("clsim_train_experience", ctx=ctx, experience=exp)
                if owner is None:
                    task_ids = (
                        None if exp.task_id is None else torch.full_like(exp.train_y, exp.task_id)
                    )
                    loss = trainer.fit(exp.train_x, exp.train_y, task_ids=task_ids)
                if trainer.progress is not None:
                    trainer.progress.close()
                hooks.call("clsim_after_experience", ctx=ctx, experience=exp)
                # measure what is held now, then check the budget
                record = ledger.record(
                    exp.index, measure(ctx.model, plugins, skip_types=(RunContext,))
                )
                # evaluate on every experience's test data
                matrix.correct[exp.index] = evaluate(ctx, hooks, stream, eval_bs)
                row = (matrix.correct[exp.index] / np.maximum(matrix.counts, 1)).tolist()
                seen = seen_accuracy(matrix, exp.index)
                events.write(
                    "experience_end",
                    strategy=strategy.name,
                    experience=exp.index,
                    loss=None if loss != loss else loss,  # NaN is not JSON
                    accuracy_row=row,
                    seen_accuracy=seen,
                    ledger_bytes=record.measurement.total_bytes,
                    over_budget=record.over_budget,
                )
                tensorboard.experience(
                    exp.index,
                    seen,
                    row,
                    loss,
                    record.measurement.total_bytes,
                    record.measurement.parts,
                )
                if record.over_budget and strategy.strict:
                    raise BudgetExceededError(
                        f"strategy {strategy.name!r} holds {record.measurement.total_bytes} bytes "
                        f"after experience {exp.index}, over its budget of {outcome.budget_bytes} "
                        f"bytes ({outcome.budget}); largest parts: "
                        + _largest_parts(record.measurement.parts)
                    )
            outcome.metrics = summarize(matrix)
        except ClsimError as exc:
            outcome.error = str(exc)
        finally:
            where["experience"] = None
            outcome.wall_seconds = time.perf_counter() - started
            ctx._fit = None
            try:  # a failing teardown must not hide the error that ended the run
                hooks.call("clsim_teardown", ctx=ctx)
            except ClsimError as exc:
                outcome.error = f"{outcome.error}; then {exc}" if outcome.error else str(exc)
    return outcome


def _instantiate(spec) -> object:
    """A plugin instance; a constructor that raises is reported as the plugin's fault."""
    try:
        return spec.cls() if spec.options is None else spec.cls(spec.options)
    except ClsimError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {spec.name!r} ({spec.ref}) could not be created: "
                          f"{type(exc).__name__}: {exc}") from exc


def _where(strategy: str, where: dict) -> str:
    exp = where.get("experience")
    return f"strategy {strategy!r}" + ("" if exp is None else f", experience {exp}")


def _largest_parts(parts: dict[str, int], n: int = 3) -> str:
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {nbytes} B" for name, nbytes in top)


def default_out_dir(scenario: ScenarioConfig) -> Path:
    return Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
