"""``clsim run``: every strategy of a scenario on one stream, results written as they finish."""

from __future__ import annotations

import platform
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import clsim
from clsim.config import ScenarioConfig
from clsim.engine import (
    StrategyOutcome,
    build_stream,
    limit_stream,
    load_scenario_data,
    resolve_device,
    run_strategy,
)
from clsim.errors import ClsimError, ConfigError
from clsim.logging.console import progress_factory
from clsim.logging.events import EventLog
from clsim.logging.tensorboard import TensorBoardLogger
from clsim.results import prepare_out_dir, write_json_atomic


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
) -> RunResult:
    """Run the scenario's strategies (or ``only`` those) and write results to ``out_dir``.

    A strategy that fails is recorded with its error and the others still run; the
    summary is rewritten after every strategy, so a crash loses at most the one in flight.
    """
    seed = scenario.seed if seed is None else seed
    names = list(scenario.strategies) if not only else only
    unknown = [n for n in names if n not in scenario.strategies]
    if unknown:
        raise ConfigError(
            f"unknown strategy {unknown[0]!r}; the scenario defines "
            f"{', '.join(scenario.strategies)}",
            source=scenario.source,
        )
    device = resolve_device(scenario.device)
    if scenario.threads:
        torch.set_num_threads(scenario.threads)
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, seed)
    if limit is not None:
        stream = limit_stream(stream, limit)
    if out_dir is not None:
        prepare_out_dir(out_dir)
    events = EventLog(None if out_dir is None else out_dir / "events.jsonl")
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
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "strategies": {},
    }
    result = RunResult(out_dir, summary)
    events.write(
        "run_start",
        scenario=scenario.name,
        seed=seed,
        strategies=names,
        class_order=list(stream.class_order),
    )
    make_progress = progress_factory() if progress else None
    try:
        for name in names:
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
                )
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
            if out_dir is not None:
                write_json_atomic(out_dir / "summary.json", summary)
    finally:
        events.write("run_end", failed=[o.name for o in result.failed])
        events.close()
    return result
