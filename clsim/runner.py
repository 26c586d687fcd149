"""``clsim run``: every strategy of a scenario on one stream, results written as they finish."""

from __future__ import annotations

import json
import platform
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import clsim
from clsim.assembly import build_stream, limit_stream, load_scenario_data, resolve_device
from clsim.checkpoint import (
    Checkpointing,
    checkpoint_path,
    fingerprint,
    read_checkpoint,
    remove_partial_writes,
)
from clsim.config import ScenarioConfig
from clsim.engine import StrategyOutcome, run_strategy
from clsim.errors import ClsimError, ConfigError
from clsim.logging.console import progress_factory
from clsim.logging.events import EventLog
from clsim.logging.tensorboard import TensorBoardLogger
from clsim.results import prepare_out_dir, write_json_atomic
from clsim.snapshot import SnapshotError


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
) -> RunResult:
    """Run the scenario's strategies (or ``only`` those) and write results to ``out_dir``.

    A strategy that fails is recorded with its error and the others still run; the
    summary is rewritten after every strategy, so a crash loses at most the one in flight.
    With ``checkpoint_every="experience"`` even that one is saved after each experience;
    ``resume`` continues a run in ``out_dir``: finished strategies are kept as written,
    the one in flight continues from its checkpoint, the rest run.
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
    device = resolve_device(scenario.device)
    if scenario.threads:
        torch.set_num_threads(scenario.threads)
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, seed)
    if limit is not None:
        stream = limit_stream(stream, limit)
    if out_dir is not None and not resume:
        prepare_out_dir(out_dir)
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
        "strategies_requested": names,
        "checkpoint_every": checkpoint_every,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "strategies": {},
    }
    if resume:
        summary = resumable_summary(out_dir, summary)
        checkpoint_every = summary["checkpoint_every"]
        remove_partial_writes(out_dir)
    elif out_dir is not None:  # from the start, so a run killed early can be resumed
        write_json_atomic(out_dir / "summary.json", summary)
    events = EventLog(None if out_dir is None else out_dir / "events.jsonl")
    result = RunResult(out_dir, summary)
    events.write(
        "run_resumed" if resume else "run_start",
        scenario=scenario.name,
        seed=seed,
        strategies=names,
        class_order=list(stream.class_order),
    )
    make_progress = progress_factory() if progress else None
    try:
        for number, name in enumerate(names):
            if name in summary["strategies"]:  # finished before an interruption
                result.outcomes.append(kept_outcome(name, summary["strategies"][name]))
                if out_dir is not None:  # a kill may have come before its checkpoint went
                    checkpoint_path(out_dir, number, name).unlink(missing_ok=True)
                continue
            checkpoint = None
            if checkpoint_every is not None and out_dir is not None:
                checkpoint = _checkpointing(out_dir, number, name, summary, limit, resume)
            tb_dir = None if out_dir is None else out_dir / "tensorboard" / name
            tensorboard = TensorBoardLogger(tb_dir)
            try:
                outcome = run_strategy(
                    scenario,
                    scenario.strategies[name],
                    dataset,
                    stream,
                    seed=seed,
                    device=device,
                    events=events,
                    tensorboard=tensorboard,
                    progress=make_progress,
                    checkpoint=checkpoint,
                )
            except SnapshotError:  # its checkpoint cannot be restored: stop, keep the file
                raise
            except ClsimError as exc:  # failed before its first experience
                outcome = StrategyOutcome(name, error=str(exc))
            except Exception as exc:  # a bug in clsim or a plugin: record it, run the rest
                outcome = StrategyOutcome(name, error=f"internal error: {type(exc).__name__}: "
                                          f"{exc} (traceback in events.jsonl)")
                events.write("internal_error", strategy=name,
                             traceback="".join(traceback.format_exception(exc)))
            finally:
                tensorboard.close()
            if outcome.error:
                events.write("strategy_failed", strategy=name, error=outcome.error)
                print(f"clsim: strategy {name!r} failed: {outcome.error}", file=sys.stderr)
            result.outcomes.append(outcome)
            summary["strategies"][name] = outcome.to_dict()
            if checkpoint is not None and checkpoint.unavailable:
                summary["strategies"][name]["checkpoint"] = \
                    f"unavailable: {checkpoint.unavailable}"
                print(f"clsim: warning: strategy {name!r} ran without checkpoints: "
                      f"{checkpoint.unavailable}", file=sys.stderr)
            if out_dir is not None:
                write_json_atomic(out_dir / "summary.json", summary)
            if checkpoint is not None:  # its results are written: the checkpoint is spent
                checkpoint.discard()
    finally:
        events.write("run_end", failed=[o.name for o in result.failed])
        events.close()
    return result


# what a resumed run must share with the run it continues
_RESUME_KEYS = ("scenario", "config", "seed", "limit", "strategies_requested", "device",
                "class_order", "dataset")


def resumable_summary(out_dir: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The summary of the run in ``out_dir``, checked to be the run ``fresh`` describes."""
    path = out_dir / "summary.json"
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--resume: {path} does not exist; there is no run to continue "
                          "in that folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--resume: {path} cannot be read: {exc}") from None
    if not isinstance(written, dict) or not isinstance(written.get("strategies"), dict):
        raise ConfigError(f"--resume: {path} is not a clsim run summary")
    for key in _RESUME_KEYS:
        if key not in written:
            raise ConfigError(f"--resume: {path} has no {key!r}: it was written by an older "
                              "clsim, which cannot be resumed; start a new --out")
        if written.get(key) != json.loads(json.dumps(fresh[key], default=str)):
            raise ConfigError(
                f"--resume: {path} was written by a run with a different {key!r} "
                f"({_short(written.get(key))} there, {_short(fresh[key])} now); resume with "
                "the same scenario file, data, --seed, --limit, --strategy and --device, or "
                "start a new --out"
            )
    return {**fresh, "strategies": written["strategies"],
            "checkpoint_every": fresh["checkpoint_every"] or written.get("checkpoint_every")}


def kept_outcome(name: str, record: dict[str, Any]) -> StrategyOutcome:
    """A strategy finished before a resume, as the summary recorded it."""
    return StrategyOutcome(name, error=record.get("error"))


def _checkpointing(out_dir: Path, number: int, name: str, summary: dict[str, Any],
                   limit: int | None, resume: bool) -> Checkpointing:
    key = fingerprint(summary["config"], summary["seed"], limit, name)
    path = checkpoint_path(out_dir, number, name)
    resume_from = read_checkpoint(path, key) if resume and path.exists() else None
    return Checkpointing(path, key, resume_from=resume_from)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
