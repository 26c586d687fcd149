"""``clsim run``: every strategy of a scenario on one stream, results written as they finish."""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import clsim
from clsim.assembly import (
    build_stream,
    execution_settings,
    limit_stream,
    load_scenario_data,
    resolve_device,
)
from clsim.checkpoint import (
    Checkpointing,
    checkpoint_path,
    fingerprint,
    read_checkpoint,
    remove_partial_writes,
)
from clsim.config import ScenarioConfig
from clsim.engine import StrategyOutcome, run_strategy
from clsim.errors import ClsimError, ConfigError, ResultsWriteError
from clsim.interrupts import is_contained
from clsim.lock import FolderLock
from clsim.logging.console import progress_factory
from clsim.logging.events import EventLog
from clsim.logging.tensorboard import TensorBoardLogger
from clsim.plugin_manager import joined_tracebacks, recorded_tracebacks
from clsim.results import (
    check_out_path,
    open_out_dir,
    read_json_file,
    safe_name,
    write_json_atomic,
)
from clsim.run_figure import write_run_figure
from clsim.snapshot import SnapshotError
from clsim.text import bounded_str, describe_fault, format_traceback, short_repr


@dataclass
class RunResult:
    out_dir: Path | None
    summary: dict[str, Any]
    outcomes: list[StrategyOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[StrategyOutcome]:
        return [o for o in self.outcomes if o.error]


def run_scenario(
    scenario: ScenarioConfig,
    out_dir: Path | None,
    *,
    seed: int | None = None,
    only: list[str] | None = None,
    progress: bool = False,
    limit: int | None = None,
    checkpoint_every: str | None = None,
    resume: bool = False,
    debug: bool = False,
) -> RunResult:
    """Run the scenario's strategies (or ``only`` those) and write results to ``out_dir``.

    A strategy that fails is recorded with its error and the others still run; the
    summary is rewritten after every strategy, so a crash loses at most the one in flight.
    With ``checkpoint_every="experience"`` even that one is saved after each experience;
    ``resume`` continues a run in ``out_dir``: finished strategies are kept as written,
    the one in flight continues from its checkpoint, the rest run.

    A failed strategy's record keeps ``error``, one line naming the plugin, hook,
    experience and the plugin's ``file:line``, and ``traceback``, the plugin's own
    traceback (also in its ``strategy_failed`` event); ``debug`` prints it to stderr too.
    """
    if resume and out_dir is None:
        raise ConfigError("--resume needs --out: the folder of the run to continue")
    seed = scenario.seed if seed is None else seed
    names = list(scenario.strategies) if not only else only
    unknown = [n for n in names if n not in scenario.strategies]
    if unknown:
        raise ConfigError(
            f"unknown strategy {unknown[0]!r}; the scenario defines "
            f"{', '.join(scenario.strategies)}",
            source=scenario.source, key_path="--strategy",
        )
    if out_dir is not None:  # an --out the OS would refuse fails before anything runs
        check_out_path(out_dir)
    device = resolve_device(scenario.device)
    if scenario.threads:
        torch.set_num_threads(scenario.threads)
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, seed)
    if limit is not None:
        stream = limit_stream(stream, limit)
    summary: dict[str, Any] = {
        "clsim_version": clsim.__version__,
        "scenario": scenario.name,
        "source": scenario.source,
        "seed": seed,
        "device": str(device),
        "dataset": {
            "name": dataset.name,
            "n_classes": dataset.n_classes,
            "sample_shape": list(dataset.sample_shape),
            "sample_dtype": str(dataset.x_train.dtype).removeprefix("torch."),
            "sample_bytes": dataset.sample_bytes,
            "n_train": int(dataset.y_train.shape[0]),
            "n_test": int(dataset.y_test.shape[0]),
        },
        "class_order": list(stream.class_order),
        "limit": limit,
        "stream": {
            **stream.description,
            "family": stream.family,
            "online": stream.online,
            "eval_every": stream.eval_every,
            "boundaries_hidden": stream.boundaries_hidden,
            "true_boundaries": list(stream.boundaries()),
            "label_levels": [
                {"name": name, "n_classes": size, "first_id": first}
                for name, size, first in zip(stream.labels.level_names, stream.labels.sizes,
                                             stream.labels.offsets, strict=True)
            ],
            "n_experiences": len(stream),
            "experience_classes": [list(e.classes) for e in stream],
            "experience_test_sizes": [e.n_test for e in stream],
        },
        "config": scenario.to_dict(),
        # the auto settings as resolved (a kind's measured eval batch may change between
        # versions; results differ only by float rounding)
        "execution": execution_settings(scenario, dataset.sample_shape, device),
        "strategies_requested": names,
        "checkpoint_every": checkpoint_every,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "strategies": {},
    }
    lock = None if out_dir is None else _lock_out_dir(out_dir, resume)
    try:
        if resume:
            summary = resumable_summary(out_dir, summary)
            checkpoint_every = summary["checkpoint_every"]
            remove_partial_writes(out_dir)
        elif out_dir is not None:  # from the start, so a run killed early can be resumed
            write_json_atomic(out_dir / "summary.json", summary)
        events = EventLog(None if out_dir is None else out_dir / "events.jsonl")
        try:
            events.write(
                "run_resumed" if resume else "run_start",
                scenario=scenario.name,
                seed=seed,
                strategies=names,
                class_order=list(stream.class_order),
            )
            runs = _Strategies(scenario, dataset, stream, seed, device, events, out_dir, limit,
                               checkpoint_every, resume, progress, debug)
            result = runs.run(names, RunResult(out_dir, summary))
            if out_dir is not None:
                _draw_run_figure(out_dir, result.summary, events)
            return result
        finally:
            events.close()
    finally:
        if lock is not None:
            lock.release()


def _lock_out_dir(out_dir: Path, resume: bool) -> FolderLock:
    """The results folder, created (a fresh run) and locked for this run alone."""
    if not resume:
        return open_out_dir(out_dir, "run", fresh=True)
    if not out_dir.is_dir():
        raise ConfigError(f"--resume: {out_dir / 'summary.json'} does not exist; there is no "
                          "run to continue in that folder")
    return open_out_dir(out_dir, "run --resume", fresh=False)


@dataclass
class _Strategies:
    """The strategies of one run, each run (or kept, when resumed) in turn."""

    scenario: ScenarioConfig
    dataset: Any
    stream: Any
    seed: int
    device: torch.device
    events: EventLog
    out_dir: Path | None
    limit: int | None
    checkpoint_every: str | None
    resume: bool
    progress: bool
    debug: bool = False

    def run(self, names: list[str], result: RunResult) -> RunResult:
        """Every strategy of ``names``; ``run_end`` says whether the run was cut short."""
        make_progress = progress_factory() if self.progress else None
        in_flight = None
        try:
            for number, name in enumerate(names):
                in_flight = name
                self._one(number, name, result, make_progress)
                in_flight = None
        except BaseException as exc:
            _run_end(self.events, result, stopped_by=exc, in_flight=in_flight)
            raise
        _run_end(self.events, result)
        return result

    def _one(self, number: int, name: str, result: RunResult, make_progress) -> None:
        summary, out_dir = result.summary, self.out_dir
        if name in summary["strategies"]:  # finished before an interruption
            result.outcomes.append(kept_outcome(name, summary["strategies"][name]))
            if out_dir is not None:  # a kill may have come before its checkpoint went
                checkpoint_path(out_dir, number, name).unlink(missing_ok=True)
            return
        checkpoint = None
        if self.checkpoint_every is not None and out_dir is not None:
            checkpoint = _checkpointing(out_dir, number, name, summary, self.limit,
                                        self.resume)
        outcome, trace = self._outcome(name, checkpoint, make_progress)
        if outcome.error:
            self.events.write("strategy_failed", strategy=name, error=outcome.error,
                              **({"traceback": trace} if trace else {}))
            print(f"clsim: strategy {name!r} failed: {outcome.error}", file=sys.stderr)
            if trace and self.debug:
                print(trace, end="", file=sys.stderr)
        result.outcomes.append(outcome)
        record = outcome.to_dict()
        if outcome.error and trace:  # right after the one-line error, as the event has it
            status_and_error = dict(list(record.items())[:2])
            record = {**status_and_error, "traceback": trace, **record}
        summary["strategies"][name] = record
        if checkpoint is not None and checkpoint.unavailable:
            summary["strategies"][name]["checkpoint"] = f"unavailable: {checkpoint.unavailable}"
            print(f"clsim: warning: strategy {name!r} ran without checkpoints: "
                  f"{checkpoint.unavailable}", file=sys.stderr)
        if out_dir is not None:
            write_json_atomic(out_dir / "summary.json", summary)
        if checkpoint is not None:  # its results are written: the checkpoint is spent
            checkpoint.discard()

    def _outcome(self, name: str, checkpoint: Checkpointing | None,
                 make_progress) -> tuple[StrategyOutcome, str | None]:
        """Run one strategy: its outcome, and the traceback of what failed it (None when
        it did not, or when no code of a plugin's raised). Whatever it raises fails only
        it, except a checkpoint that cannot be restored, a results file that cannot be
        written and the user's Ctrl-C, which stop the run."""
        tb_dir = None if self.out_dir is None else \
            self.out_dir / "tensorboard" / safe_name(name)
        tensorboard = TensorBoardLogger(tb_dir)
        tracebacks: list[str] = []
        try:
            with recorded_tracebacks() as tracebacks:  # the engine keeps one line only
                outcome = run_strategy(
                    self.scenario, self.scenario.strategies[name], self.dataset, self.stream,
                    seed=self.seed, device=self.device, events=self.events,
                    tensorboard=tensorboard, progress=make_progress, checkpoint=checkpoint,
                )
            self.events.check()  # the engine records a ClsimError as the strategy's own
            tensorboard.check()
        except (SnapshotError, ResultsWriteError):  # not the strategy's fault: stop
            raise
        except ClsimError as exc:  # failed before its first experience
            outcome = StrategyOutcome(name, error=bounded_str(exc, 2000))
        except BaseException as exc:  # a bug in clsim or a plugin: record it, run the rest
            if not is_contained(exc):
                raise
            prefix = "internal error: " if isinstance(exc, Exception) else ""
            outcome = StrategyOutcome(
                name, error=f"{prefix}{describe_fault(exc)} (traceback in events.jsonl)")
            tracebacks = [format_traceback(exc)]
            self.events.write("internal_error", strategy=name, traceback=tracebacks[0])
        finally:
            tensorboard.close()
        return outcome, (joined_tracebacks(tracebacks) if outcome.error and tracebacks else None)


def _draw_run_figure(out_dir: Path, summary: dict[str, Any], events: EventLog) -> None:
    """run.png, from summary.json alone. Every result is written by now, so a figure that
    cannot be drawn or saved (a full disk, a plotting error) is a warning, not a failure."""
    try:
        write_run_figure(out_dir, summary)
    except Exception as exc:  # noqa: BLE001 - the run's results stand without the picture
        message = f"run.png not drawn: {describe_fault(exc)}"
        print(f"clsim: warning: {message}", file=sys.stderr)
        with contextlib.suppress(ResultsWriteError):
            events.write("figure_failed", error=message)


def _run_end(events: EventLog, result: RunResult, stopped_by: BaseException | None = None,
             in_flight: str | None = None) -> None:
    """The last event: the failed strategies, and whether (and how) the run was cut
    short, with the strategy in flight; never hides the error that stopped it."""
    fields: dict[str, Any] = {"failed": [o.name for o in result.failed]}
    if stopped_by is not None:
        fields.update(interrupted=True, in_flight=in_flight,
                      reason=f"{type(stopped_by).__name__}: {bounded_str(stopped_by)}")
    try:
        events.write("run_end", **fields)
    except ResultsWriteError:
        if stopped_by is None:
            raise


# what a resumed run must share with the run it continues
_RESUME_KEYS = ("scenario", "config", "seed", "limit", "strategies_requested", "device",
                "class_order", "dataset")


def resumable_summary(out_dir: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The summary of the run in ``out_dir``, checked to be the run ``fresh`` describes."""
    written = read_summary(out_dir / "summary.json")
    path = out_dir / "summary.json"
    for key in _RESUME_KEYS:
        if key not in written:
            raise ConfigError(f"--resume: {path} has no {key!r}: it was written by an older "
                              "clsim, which cannot be resumed; start a new --out")
        if written.get(key) != json.loads(json.dumps(fresh[key], default=str)):
            raise ConfigError(
                f"--resume: {path} was written by a run with a different {key!r} "
                f"({short_repr(written.get(key))} there, {short_repr(fresh[key])} now); "
                "resume with the same scenario file, data, --seed, --limit, --strategy and "
                "--device, or start a new --out"
            )
    return {**fresh, "strategies": written["strategies"],
            "checkpoint_every": fresh["checkpoint_every"] or written.get("checkpoint_every")}


def read_summary(path: Path) -> dict[str, Any]:
    """The summary.json of a run to continue, checked to hold what a resume reads.

    A damaged summary stops the resume naming the file (and line, for broken JSON):
    it is the only record of the strategies already finished, so clsim neither guesses
    nor rewrites it.
    """
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"--resume: {path} does not exist; there is no run to continue "
                          "in that folder")
    advice = "restore it from a copy, or start a new --out"
    written = read_json_file(path, "--resume: the run summary", advice)
    if not isinstance(written, dict) or not isinstance(written.get("strategies"), dict):
        raise ConfigError(f"--resume: {path} is not a clsim run summary")
    for name, record in written["strategies"].items():
        problem = _record_problem(record)
        if problem:
            raise ConfigError(f"--resume: {problem}; {advice}", source=str(path),
                              key_path=f"strategies.{name}")
    return written


# what the results table reads from the record of a finished strategy
_OK_FIELDS = {"peak_bytes": (int, "an integer"), "budget_bytes": ((int, type(None)),
                                                                  "an integer or null"),
              "over_budget": (bool, "true or false")}


def _record_problem(record: Any) -> str | None:
    """Why ``record`` is not the record of a finished strategy, or None."""
    if not isinstance(record, dict) or record.get("status") not in ("ok", "failed"):
        return ("expected the record of a finished strategy (a mapping with 'status' ok "
                f"or failed); got {short_repr(record)}")
    if record["status"] == "failed":
        return None
    for key, (kind, words) in _OK_FIELDS.items():
        if not isinstance(record.get(key), kind):
            return f"{key}: expected {words}; got {short_repr(record.get(key))}"
    return None


def kept_outcome(name: str, record: dict[str, Any]) -> StrategyOutcome:
    """A strategy finished before a resume, as the summary recorded it."""
    return StrategyOutcome(name, error=record.get("error"))


def _checkpointing(out_dir: Path, number: int, name: str, summary: dict[str, Any],
                   limit: int | None, resume: bool) -> Checkpointing:
    key = fingerprint(summary["config"], summary["seed"], limit, name)
    path = checkpoint_path(out_dir, number, name)
    resume_from = read_checkpoint(path, key) if resume and path.exists() else None
    return Checkpointing(path, key, resume_from=resume_from)
