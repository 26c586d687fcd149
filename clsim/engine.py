"""The event loop: replay a stream into a strategy's plugins, measure, evaluate, record.

``run_strategy`` is the whole loop for one strategy; read it top to bottom. Everything
random comes from generators derived from the run seed (model init, batch order,
each plugin's own), so the same config and seed give the same metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from clsim.assembly import build_scenario_model, evaluation_batch_size, memory_formats
from clsim.checkpoint import Checkpointing, restore
from clsim.compute import ComputeMeter, check_mode, mode_from_env, without_clocks
from clsim.compute_budget import ComputeAllowance, allowance_for
from clsim.config import ScenarioConfig, StrategyConfig
from clsim.context import RunContext
from clsim.data import Dataset
from clsim.errors import BudgetExceededError, ClsimError, ConfigError, TrainingError
from clsim.evaluation import evaluate, label_counts, plan_of
from clsim.feature_cache import CacheCounts, feature_cache
from clsim.interrupts import is_contained
from clsim.logging.events import EventLog
from clsim.logging.tensorboard import TensorBoardLogger
from clsim.loop_types import ExperiencePlan
from clsim.memory import Ledger, Measurement, measure, model_bytes
from clsim.models.heads import expose_labels
from clsim.plugin_manager import (
    HookRunner,
    blame,
    build_plugin_manager,
    create_plugin,
)
from clsim.scoring import AnytimePoint, RunRecord, per_label, score
from clsim.seeding import derive_seed, torch_generator
from clsim.snapshot import SnapshotError
from clsim.stream import Experience, Stream
from clsim.text import bounded_str, describe_fault
from clsim.training import Trainer


@dataclass
class StrategyOutcome:
    """What one strategy's run produced; ``error`` is set when it failed part-way.

    With ``run_strategy(..., keep=True)`` it also holds what the run built, for
    inspection: ``model``, the final model, and ``plugins``, the strategy's plugin objects
    by their names in the YAML, in its order. Neither is part of :meth:`to_dict` (nor of
    summary.json); the engine adds no reference to the dataset or the stream.
    """

    # fields that measure the process that ran the strategy, not the strategy: identical
    # runs differ in them (the feature cache's counts depend on what the process computed
    # before, e.g. an earlier cell of the same compare worker)
    PROCESS_MEASUREMENTS = ("wall_seconds", "feature_cache")

    @classmethod
    def comparable(cls, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` (:meth:`to_dict`, a summary.json entry) without the process's
        measurements and the compute meter's clocks: what two runs that computed the same
        thing share (a resumed run and an uninterrupted one, two executors)."""
        kept = {k: v for k, v in record.items() if k not in cls.PROCESS_MEASUREMENTS}
        return without_clocks(kept)

    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    budget: str | None = None
    budget_bytes: int | None = None
    ledger: Ledger | None = None
    wall_seconds: float = 0.0
    error: str | None = None
    compute: ComputeMeter | None = None  # None: compute accounting off
    compute_allowance: ComputeAllowance | None = None  # a compute budget, resolved
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    plugins: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

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
            "kept_bytes": ledger.kept_bytes,
            "budget_check": ledger.check,
            "over_budget": ledger.over_budget,
            "memory_estimated": ledger.estimated,
            "compute": None if self.compute is None else {
                **self.compute.to_dict(),
                "budget": None if self.compute_allowance is None
                else self.compute_allowance.to_dict()},
            "wall_seconds": round(self.wall_seconds, 3),
        }


def stream_parts(exp: Experience, position: int, every: int | None) -> Iterator[Experience]:
    """``exp`` cut where the stream's sample count crosses a multiple of ``every``
    (online: an anytime evaluation follows each part); the whole experience offline."""
    if every is None:
        yield exp
        return
    start = 0
    while start < exp.n_train:
        stop = min(exp.n_train, start + every - (position + start) % every)
        yield replace(exp, train_x=exp.train_x[start:stop], train_y=exp.train_y[start:stop])
        start = stop


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
    checkpoint: Checkpointing | None = None,
    keep: bool = False,
    compute: str | None = None,
) -> StrategyOutcome:
    """Train ``strategy`` on ``stream`` and score it.

    A failure a user can cause (bad plugin option, over budget in strict mode, a plugin
    raising, a diverging loss) is returned as the outcome's ``error``, with the budget and
    the ledger recorded up to that point; anything else is a bug and propagates. With
    ``checkpoint``, the state is saved after every experience, and a run given a
    checkpoint to resume from continues from it after the usual setup. With ``keep``, the
    outcome also holds the final model and the plugin objects (``outcome.model``,
    ``outcome.plugins``), failed runs included, for tests of a plugin's state.
    ``compute`` is the compute meter's mode (:mod:`clsim.compute`; ``CLSIM_COMPUTE`` when
    None): what the strategy computed is counted into ``outcome.compute`` unless ``off``.
    """
    meter = ComputeMeter(mode_from_env() if compute is None else check_mode(compute))
    started = time.perf_counter()
    outcome = StrategyOutcome(
        strategy.name, budget=None if strategy.budget is None else str(strategy.budget),
        compute=None if meter.mode == "off" else meter,
    )
    events = events or EventLog(None)
    tensorboard = tensorboard or TensorBoardLogger(None)
    cache_before = feature_cache().counts
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # setup: model, plugins (first listed is called first), budget, context
        torch.manual_seed(derive_seed(seed, "model"))
        model = build_scenario_model(scenario, dataset, stream, device=device)
        torch.manual_seed(derive_seed(seed, strategy.name, "torch-global"))
        plugins = [(spec.name, create_plugin(spec)) for spec in strategy.plugins]
        where = {"experience": None}
        hooks = HookRunner(build_plugin_manager(plugins), lambda: _where(strategy.name, where))
        hooks.meter = meter  # a plugin's FLOPs inside a hook go to <plugin>.<hook>
        if strategy.budget is not None:
            outcome.budget_bytes = strategy.budget.resolve(
                model_bytes=model_bytes(model), sample_bytes=dataset.sample_bytes
            )
        outcome.ledger = Ledger(outcome.budget_bytes, check=strategy.budget_check)
        ctx = RunContext(
            strategy=strategy.name,
            model=model,
            device=device,
            data=dataset.info(),
            seed=seed,
            epochs=1 if stream.online else scenario.training.epochs,
            batch_size=scenario.training.batch_size,
            budget_bytes=outcome.budget_bytes,
            labels=stream.labels,
            log=lambda event, **f: events.write(event, strategy=strategy.name, **f),
        )
        ctx._meter = meter
        if strategy.compute_budget is not None:  # learnt in setup, as the memory budget
            if meter.mode == "off":
                raise ConfigError(f"strategy {strategy.name!r} has a compute budget "
                                  f"({strategy.compute_budget}), which needs compute "
                                  "accounting: unset CLSIM_COMPUTE=off")
            ctx.compute_budget = allowance_for(strategy.compute_budget, strategy.compute_share,
                                               ctx.model, stream.seen_by_strategy(),
                                               ctx.to_input)
            outcome.compute_allowance = ctx.compute_budget
        trainer = Trainer(ctx, hooks, scenario.training, torch_generator(seed, "batches"))
        trainer.meter = meter
        trainer.online = stream.online
        ctx._trainer = trainer
        ctx._plugins = plugins  # what ctx.held_bytes measures (a store's neighbours)
        del model  # ctx holds it; a resume replaces it with the checkpoint's
        loop = _Loop(scenario, strategy, stream, ctx, hooks, trainer, plugins, outcome,
                     events, tensorboard, progress, where, checkpoint, started)
        try:
            with meter.active():  # FLOPs counted (clsim.compute)
                hooks.call("clsim_setup", ctx=ctx)
                # every plugin has set up: stores sized from the budget see all of them
                hooks.call("clsim_size_stores", ctx=ctx)
                loop.at_setup = loop.reading()  # what a strict failure reports growth against
                start = 0
                if checkpoint is not None and checkpoint.resume_from is not None:
                    start = restore(loop, checkpoint.resume_from, checkpoint.path)
                    started -= checkpoint.resume_from["wall_seconds"]  # time before the kill
                    loop.started = started
                    checkpoint.resume_from = None  # restored: free it
                    events.write("strategy_resumed", strategy=strategy.name, experience=start)
                loop.run(start)
                outcome.metrics = score(stream, loop.record)
                outcome.metrics.update(trainer.metrics())  # skipped_batches, with skip_batch
                cached = feature_cache().counts.since(cache_before)
                if cached != CacheCounts():  # a frozen encoder's features (not charged)
                    outcome.metrics["feature_cache"] = cached.to_dict()
                where["experience"] = None
                meter.begin("report")
                reports = plugin_reports(hooks, ctx, stream)
                if reports:
                    outcome.metrics["plugins"] = reports
                if ctx.compute_budget is not None:
                    ctx.compute_budget.close(meter)
        except SnapshotError:  # a checkpoint that cannot be restored: not the strategy's fault
            raise
        except ClsimError as exc:
            outcome.error = bounded_str(exc, 4000)  # a plugin may raise a ClsimError too
        except BaseException as exc:  # SystemExit, GeneratorExit, ... from code a plugin
            if isinstance(exc, Exception) or not is_contained(exc):  # ran outside its hooks
                raise  # (a torch hook): fails only this strategy; the user's Ctrl-C stops
            outcome.error = escaped_message(exc, plugins, _where(strategy.name, where))
        finally:
            where["experience"] = None
            meter.finish()
            outcome.wall_seconds = time.perf_counter() - started
            ctx._trainer = None
            try:  # a failing teardown must not hide the error that ended the run
                hooks.call("clsim_teardown", ctx=ctx)
            except ClsimError as exc:
                outcome.error = f"{outcome.error}; then {exc}" if outcome.error else str(exc)
    if keep:  # what the run built, for inspection; never serialised
        outcome.model, outcome.plugins = ctx.model, dict(plugins)
    return outcome


class _Loop:
    """The stream loop of one run; its state is what :func:`score` reads."""

    def __init__(self, scenario, strategy, stream, ctx, hooks, trainer, plugins, outcome,
                 events, tensorboard, progress, where, checkpoint: Checkpointing | None,
                 started: float) -> None:
        self.scenario, self.strategy, self.stream = scenario, strategy, stream
        self.ctx, self.hooks, self.trainer, self.plugins = ctx, hooks, trainer, plugins
        self.outcome, self.events, self.tensorboard = outcome, events, tensorboard
        self.progress, self.where = progress, where
        self.record = RunRecord(counts=label_counts(stream))
        # test samples per label, each test set once (a recurring task tests them again)
        self.label_totals = per_label(self.record.counts, self.record.counts)
        self.seen = np.zeros(stream.labels.n_classes, dtype=bool)  # labels met in training
        self.position = 0  # training samples delivered so far
        self.checkpoint = checkpoint  # saves the state after each experience, when given
        self.started = started  # perf_counter at the start, less the time before a resume
        self.at_setup: Measurement | None = None  # the reading once every store is sized

    def state_dict(self) -> dict[str, Any]:
        """The stream loop's progress, for a checkpoint: the scores so far, the labels met
        (in order of first appearance, as plugins read them from ``ctx.seen_classes``), the
        tasks met and their classes (``ctx.task_classes``),
        the training samples delivered and the ledger."""
        return {"record": self.record, "seen": self.seen,
                "seen_classes": self.ctx.seen_classes, "task_classes": self.ctx.task_classes,
                "position": self.position,
                "ledger": self.outcome.ledger,
                "compute": self.ctx._meter.state_dict(),
                "compute_budget": None if self.ctx.compute_budget is None
                else self.ctx.compute_budget.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state``."""
        self.record, self.seen = state["record"], state["seen"]
        self.ctx.seen_classes = state["seen_classes"]
        self.ctx.task_classes = dict(state.get("task_classes", {}))
        self.position = int(state["position"])
        self.outcome.ledger = state["ledger"]
        if "compute" in state:  # a checkpoint written before compute accounting has none
            self.ctx._meter.load_state_dict(state["compute"])
        if self.ctx.compute_budget is not None and state.get("compute_budget") is not None:
            self.ctx.compute_budget.load_state_dict(state["compute_budget"])

    def evaluate(self) -> np.ndarray:
        ctx = self.ctx
        batch_size = evaluation_batch_size(self.scenario, ctx.device)
        layout = memory_formats(self.scenario, ctx.model, ctx.sample_shape, ctx.device)
        feature_cache().forget_weights()  # an edit through .data bumps no version counter
        with ctx._meter.evaluating():
            hits = evaluate(ctx, self.hooks, self.stream, batch_size, layout=layout.evaluation)
        ctx._meter.evaluation_rows(plan_of(self.stream).n_predicted)
        return hits

    def run(self, start: int = 0) -> None:
        """Train on the shown experiences from number ``start`` (past 0 when resumed)."""
        stream = self.stream
        if start == 0:
            self.record.initial = self.evaluate()
        shown = stream.seen_by_strategy()
        total = sum(exp.n_train for exp in shown)
        for number, exp in enumerate(shown[start:], start):
            self.where["experience"] = exp.index
            self.ctx._meter.begin("experience", exp.index)
            if self.ctx.compute_budget is not None:  # the experience's share opens
                self.ctx.compute_budget.begin_experience(number, exp.index, self.ctx._meter)
            # the hooks never see test data; with hidden boundaries not even the training
            # data: samples arrive part by part, and nothing about what is to come is shown
            told = training_view(exp, hidden=stream.boundaries_hidden)
            self.ctx.experience = told
            if not stream.boundaries_hidden:
                self._meet(exp.classes)
            if exp.task_id is not None:  # the task's head: its outputs in the loop's loss
                self.ctx.task_classes[exp.task_id] = tuple(exp.classes)
            self.events.write("experience_start", strategy=self.strategy.name,
                              experience=exp.index, classes=list(exp.classes),
                              n_train=exp.n_train)
            feature_cache().forget_weights()
            self.hooks.call("clsim_before_experience", ctx=self.ctx, experience=told)
            self._check_budget(self._measure(exp.index, "start"),
                               f"after clsim_before_experience of experience {exp.index}")
            loss = self._train(exp, total, len(shown))
            self.ctx.experience = told
            self.hooks.call("clsim_after_experience", ctx=self.ctx, experience=told)
            self._check_compute(exp.index)
            record = self._measure(exp.index, "end")
            hits = self.evaluate()
            if not stream.boundaries_hidden:
                self.record.after_experience.append(hits)
            if stream.online and exp is shown[-1]:  # the last anytime point: the end
                self.record.anytime.append(AnytimePoint(
                    self.position, per_label(hits, self.record.counts), self.seen.copy()))
            self._report_experience(exp, hits, loss, record)
            if self.checkpoint is not None and number + 1 < len(shown):  # none after the last
                self.checkpoint.save(self, number + 1, time.perf_counter() - self.started)

    def _meet(self, labels) -> None:
        """Record labels as seen (in order of first appearance) for ctx and scoring."""
        seen_classes = self.ctx.seen_classes
        for label in labels:
            if not self.seen[label]:
                self.seen[label] = True
                seen_classes.append(int(label))

    def _train(self, exp: Experience, total: int, n_shown: int) -> float:
        """Deliver ``exp`` to the strategy (in parts when online); the last loss."""
        stream, trainer = self.stream, self.trainer
        parts = list(stream_parts(exp, self.position, stream.eval_every))
        trainer.progress = None
        if self.progress:
            label = (f"{self.strategy.name} stream" if stream.boundaries_hidden
                     else f"{self.strategy.name} {exp.index + 1}/{n_shown}")
            batches = sum(trainer.n_batches(part.n_train, 1 if stream.online else None)
                          for part in parts)
            trainer.progress = self.progress(label, batches)
        loss = float("nan")
        for number, part in enumerate(parts):
            part = training_view(part)
            if stream.boundaries_hidden:
                self.ctx.experience = part
            if self.hooks.implemented("clsim_train_experience"):
                expose_labels(self.ctx.model, part.train_y)  # an owner learns them all
            ticks = getattr(trainer.progress, "n", None)
            owner, _ = self.hooks.first("clsim_train_experience", ctx=self.ctx, experience=part)
            if owner is None:
                plan = self._plan(part)
                if plan.train:
                    self._resize_progress(part, plan)
                    loss = trainer.fit(plan, shuffle=not stream.online,
                                       keep_optimizer=number > 0)
            if ticks is not None and trainer.progress.n == ticks:
                # learned without a gradient step of the loop: count the part as done
                trainer.progress.update(trainer.n_batches(part.n_train,
                                                          1 if stream.online else None))
            if stream.online:  # labels count as seen once their samples were trained on
                self._meet(dict.fromkeys(part.train_y.tolist()))
            self.position += part.n_train
            if stream.online and self.position % stream.eval_every == 0 \
                    and self.position < total:
                self._anytime(exp.index)
        # what training built and the plugins drop in clsim_after_experience, and the
        # optimizer the loop carried over the parts, are all still held here
        self._check_budget(self._measure(exp.index, "trained"),
                           f"at the end of experience {exp.index}'s training (before "
                           "clsim_after_experience)")
        trainer.end_experience()
        if trainer.progress is not None:
            trainer.progress.close()
            trainer.progress = None
        return loss

    def _plan(self, part: Experience) -> ExperiencePlan:
        """What the standard loop trains on for ``part``: its samples and the run's epochs,
        as the plugins' ``clsim_plan_experience`` leave it."""
        task_ids = None if part.task_id is None else torch.full_like(part.train_y, part.task_id)
        plan = ExperiencePlan(part.train_x, part.train_y, task_ids, self.ctx.epochs)
        if self.hooks.implemented("clsim_plan_experience"):
            plan = self.hooks.chain("clsim_plan_experience", "plan", plan, ExperiencePlan,
                                    ctx=self.ctx, experience=part)
            if self.stream.online and plan.train and plan.epochs != 1:
                names = ", ".join(self.hooks.order("clsim_plan_experience"))
                raise TrainingError(
                    f"strategy {self.strategy.name!r}: a plan asks for {plan.epochs} epochs "
                    f"on an online stream, which shows each sample once (plugins with "
                    f"clsim_plan_experience: {names})")
        return plan

    def _resize_progress(self, part: Experience, plan: ExperiencePlan) -> None:
        """Count the plan's batches on the progress bar instead of the part's (a plan may
        add exemplars or epochs)."""
        progress, trainer = self.trainer.progress, self.trainer
        if progress is None or not hasattr(progress, "total"):
            return
        planned = trainer.n_batches(plan.n_samples, plan.epochs)
        shown = trainer.n_batches(part.n_train, 1 if self.stream.online else None)
        if planned != shown:
            progress.total += planned - shown
            refresh = getattr(progress, "refresh", None)
            if callable(refresh):
                refresh()

    def _anytime(self, experience: int) -> None:
        """An evaluation in the middle of an online stream, with a ledger check."""
        record = self._measure(experience, "anytime")
        hits = per_label(self.evaluate(), self.record.counts)
        self.record.anytime.append(AnytimePoint(self.position, hits, self.seen.copy()))
        accuracy = float(hits[self.seen].sum() / max(1, self.label_totals[self.seen].sum()))
        self.events.write("evaluation", strategy=self.strategy.name, position=self.position,
                          seen_accuracy=accuracy, ledger_bytes=record.measurement.total_bytes,
                          over_budget=record.over_budget)
        self.tensorboard.anytime(self.position, accuracy)
        self._check_budget(record, f"after {self.position} training samples")

    def reading(self) -> Measurement:
        """What the strategy holds now: the model, every plugin object and what the loop
        itself carries (an online experience's optimizer)."""
        return measure(self.ctx.model, self.plugins, skip_types=(RunContext,),
                       held=self.trainer.held())

    def _measure(self, experience: int, point: str):
        """A ledger reading at ``point`` (memory.POINTS)."""
        return self.outcome.ledger.record(experience, self.reading(), position=self.position,
                                          point=point)

    def _report_experience(self, exp: Experience, hits: np.ndarray, loss: float, record) -> None:
        counts = self.record.counts
        row = (hits.sum(1) / np.maximum(counts.sum(1), 1)).tolist()
        seen_hits = per_label(hits, counts)[self.seen].sum()
        seen = float(seen_hits / max(1, self.label_totals[self.seen].sum()))
        self.events.write(
            "experience_end",
            strategy=self.strategy.name,
            experience=exp.index,
            position=self.position,
            loss=None if loss != loss else loss,  # NaN is not JSON
            accuracy_row=row,
            seen_accuracy=seen,
            ledger_bytes=record.measurement.total_bytes,
            over_budget=record.over_budget,
        )
        self.tensorboard.experience(exp.index, seen, row, loss, record.measurement.total_bytes,
                                    record.measurement.parts)
        if self.outcome.compute is not None:  # accounting on: what it computed so far
            self.tensorboard.compute(exp.index, [r.to_dict() for r in self.outcome.compute.rows])
        self._check_budget(record, f"after experience {exp.index}")

    def _check_compute(self, experience: int) -> None:
        """Close the experience's compute share; a strict strategy over it fails."""
        allowance = self.ctx.compute_budget
        if allowance is None:
            return
        spending = allowance.end_experience(self.ctx._meter)
        self.events.write("compute_share", strategy=self.strategy.name, **spending.to_dict())
        if spending.over and self.strategy.strict:
            if allowance.kind == "steps":
                unit, parts = "optimizer steps", ""
            else:
                learning = {part: flops for part, flops in self.ctx._meter.row.flops.items()
                            if not part.startswith("evaluation.")}
                unit, parts = "FLOPs", f"; largest parts: {_largest_parts(learning, unit='FLOP')}"
            raise BudgetExceededError(
                f"strategy {self.strategy.name!r} spent {spending.spent} {unit} learning "
                f"experience {experience}, over its share of {spending.share} "
                f"(compute budget {allowance.budget}, shared {allowance.share_rule}). The "
                "standard loop takes a step only if its predicted cost fits the share: work "
                "outside its steps (a hook around the experience, a plugin's own loop), or "
                f"a step costlier than predicted, went over{parts}")

    def _check_budget(self, record, when: str) -> None:
        if record.over_budget and self.strategy.strict:
            check = self.outcome.ledger.check
            checked = "the peak held during training" if check == "peak" \
                else "the bytes kept between experiences"
            raise BudgetExceededError(
                f"strategy {self.strategy.name!r} holds {record.measurement.total_bytes} bytes "
                f"{when}, over its budget of {self.outcome.budget_bytes} bytes "
                f"({self.outcome.budget}), checked against {checked} (budget_check: {check}); "
                f"{_grown_parts(record.measurement, self.at_setup)}; largest parts: "
                + _largest_parts(record.measurement.parts)
            )


def training_view(exp: Experience, hidden: bool = False) -> Experience:
    """``exp`` as training hooks see it: without its test samples (and, ``hidden``, without
    its training samples too: a hidden-boundary stream delivers them part by part)."""
    def nothing(t: torch.Tensor) -> torch.Tensor:  # no view: its storage would hold it all
        return t.new_empty((0, *t.shape[1:]))

    empty = {"test_x": nothing(exp.test_x), "test_y": nothing(exp.test_y)}
    if hidden:
        empty.update(train_x=nothing(exp.train_x), train_y=nothing(exp.train_y))
    return replace(exp, **empty)


def plugin_reports(hooks: HookRunner, ctx: RunContext, stream: Stream) -> dict[str, Any]:
    """Each plugin's ``clsim_report`` dict, checked to be JSON-ready plain data."""
    reports = {}
    for name, report in hooks.collect("clsim_report", ctx=ctx, stream=stream):
        problem = _not_plain(report, "the report")
        if problem:
            raise hooks.fault(name, "clsim_report", problem)
        reports[name] = report
    return reports


def _not_plain(value: Any, where: str) -> str | None:
    """Why ``value`` is not JSON-ready plain data (a dict at the top), or None."""
    if where == "the report" and not isinstance(value, dict):
        return f"returned a {type(value).__name__}; expected a dict or None"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has a non-string key {key!r}"
            problem = _not_plain(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = _not_plain(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return None
    return f"{where} is a {type(value).__name__}; expected plain data (numbers, strings, " \
        "bools, None, lists, dicts)"


def escaped_message(exc: BaseException, plugins: list[tuple[str, object]], where: str) -> str:
    """The strategy's error for a BaseException raised outside any hook call (in a forward
    or tensor hook a plugin installed on the model): the plugin whose code raised it."""
    culprit = blame(exc, plugins)
    described = describe_fault(exc)
    if culprit is None:
        return f"{where}: {described}, raised outside any plugin hook"
    return f"plugin {culprit!r} failed outside its hooks ({where}; e.g. in a torch hook it " \
        f"installed): {described}"


def _where(strategy: str, where: dict) -> str:
    exp = where.get("experience")
    return f"strategy {strategy!r}" + ("" if exp is None else f", experience {exp}")


def _grown_parts(now: Measurement, at_setup: Measurement | None) -> str:
    """Every part holding more now than once the stores were sized at setup, with its
    bytes then and now, the largest growth first."""
    if at_setup is None:
        return "no reading at setup to compare with"
    grown = now.grown_since(at_setup)
    if not grown:
        return f"no part grew since setup (it held {at_setup.total_bytes} bytes then)"
    return "grown since setup: " + ", ".join(
        f"{part} +{after - before} B ({before} -> {after})"
        for part, (before, after) in grown.items())


def _largest_parts(parts: dict[str, int], n: int = 3, unit: str = "B") -> str:
    """The ``n`` largest parts (bytes, or FLOPs with ``unit="FLOP"``), for a message."""
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {amount} {unit}" for name, amount in top) or "none"
