"""Issue 21's speed work, measured: CIFAR-10 scenarios on the previous code path and now.

For each (scenario, strategy) row, two runs of the bundled scenario in this one process:

* **previous**: what clsim did before issue 21's second pass: ``training.memory_format:
  contiguous`` (NCHW), ``training.eval_batch_size: 1024``, every test set predicted whole
  (``clsim.evaluation.plan_of`` patched to return ``EvaluationPlan.every_row``), and the
  feature cache off (``FeatureCache(0)``: a frozen encoder's features recomputed at every
  call, counted as ``rows_uncached``);
* **current**: the scenario as shipped (``auto`` layout and evaluation batch, evaluation
  plans, the feature cache on). The cache is cleared before every current run, so a run
  never profits from features an earlier run of this process computed.

The patches are benchmark-only: they reproduce the previous path in-process so both sides
share the data, the stream and the thread count. Each run's wall seconds are split into
evaluation (``clsim.engine.evaluate``, the name the engine imported, wrapped with a timer
here: benchmark-only too) and the rest (training and the strategy's own work). The
sides alternate which goes first; with ``--repeats N`` the medians count.

For plugins_split_cifar10 naive the training part is also set against a hand-written
PyTorch loop in the same process (same convnet2 and initial weights, SGD, batch order and
normalisation; no evaluation), in the layout each side trains in (``auto`` trains
contiguous and only evaluates channels_last, so today both sides train NCHW).

    CLSIM_DATA=/path/to/data python benchmarks/speed.py [--limit N] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cifar10_data  # benchmarks/, the script's folder
import torch
import torch.nn.functional as F
import yaml

import clsim.engine
import clsim.evaluation
import clsim.feature_cache
from clsim.assembly import (
    MEMORY_FORMATS,
    build_scenario_model,
    build_stream,
    limit_stream,
    memory_format_names,
)
from clsim.config import ScenarioConfig, parse_scenario
from clsim.data import Dataset
from clsim.engine import run_strategy
from clsim.evaluation import EvaluationPlan
from clsim.feature_cache import FeatureCache, feature_cache
from clsim.models import build_model
from clsim.seeding import derive_seed
from clsim.stream import Stream

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
# (scenario, strategy) rows, in the order they run
ROWS = (
    ("plugins_split_cifar10", "naive"),
    ("plugins_split_cifar10", "replay"),
    ("hle_cifar10", "naive"),
    ("hle_cifar10", "replay"),
    ("plugins_split_cifar10", "analytic"),
)
BARE_ROW = ("plugins_split_cifar10", "naive")  # the row timed against a hand-written loop
PREVIOUS_TRAINING = {"memory_format": "contiguous", "eval_batch_size": 1024}
WARMUP_LIMIT = 256  # samples per experience in the untimed warm-up runs
# metrics that differ between runs of the same work by design, left out of the comparison
UNCOMPARED = ("seconds", "feature_cache", "execution")


def parse_args() -> argparse.Namespace:
    scenarios = sorted({name for name, _ in ROWS})
    parser = argparse.ArgumentParser(
        description="Time CIFAR-10 scenarios on clsim's previous code path (NCHW, eval "
        "batch 1024, every test row, no feature cache) and as shipped, in one process.",
    )
    parser.add_argument("--scenarios", nargs="+", choices=scenarios, default=scenarios,
                        metavar="NAME", help=f"which scenarios (default: all: {scenarios})")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="keep the first N training and test samples per experience "
                        "(a smoke run; default: all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per side and row; medians count (default: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads for every run (default: 1, as the "
                        "scenarios pin)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help=f"skip the untimed warm-up (both sides of each row on the first "
                        f"{WARMUP_LIMIT} samples per experience)")
    parser.add_argument("--data-root", default=os.environ.get("CLSIM_DATA"),
                        help="folder holding cifar10/ (default: $CLSIM_DATA)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the table (and every run's timings) as JSON")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--repeats, --threads and --limit must be >= 1")
    return args


# -----------------------------------------------------------------------------
# the two sides


def scenario_variant(name: str, strategy: str, data_root: str, previous: bool) -> ScenarioConfig:
    """The bundled scenario with only ``strategy``, reading data from ``data_root``; for
    the previous path with its training settings pinned to what clsim ran before."""
    path = SCENARIO_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["strategies"] = {strategy: raw["strategies"][strategy]}
    raw["data"]["root"] = str(Path(data_root).expanduser().resolve())
    if previous:
        raw.setdefault("training", {}).update(PREVIOUS_TRAINING)
    side = "previous" if previous else "current"
    return parse_scenario(yaml.safe_dump(raw, sort_keys=False), source=f"{path} ({side})",
                          base_dir=str(SCENARIO_DIR))


@contextmanager
def previous_path() -> Iterator[None]:
    """Benchmark-only: every test set predicted whole and no feature cache, as before."""
    plan_of, cache = clsim.evaluation.plan_of, clsim.feature_cache._CACHE
    clsim.evaluation.plan_of = EvaluationPlan.every_row
    clsim.feature_cache._CACHE = FeatureCache(0)
    try:
        yield
    finally:
        clsim.evaluation.plan_of, clsim.feature_cache._CACHE = plan_of, cache


@contextmanager
def fresh_cache() -> Iterator[None]:
    """The current path with an empty feature cache: nothing carried over from earlier runs."""
    feature_cache().clear()
    yield


class EvalTimer:
    """Benchmark-only: wraps the engine's ``evaluate`` to sum the seconds it takes, so a
    run's wall time splits into evaluation and everything else."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    @contextmanager
    def installed(self) -> Iterator[EvalTimer]:
        original = clsim.engine.evaluate

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        clsim.engine.evaluate = timed
        try:
            yield self
        finally:
            clsim.engine.evaluate = original


@dataclass
class Run:
    """One timed run of one side."""

    wall: float
    eval_seconds: float
    eval_points: int
    metrics: dict[str, Any] = field(repr=False)

    @property
    def train_seconds(self) -> float:
        return self.wall - self.eval_seconds


def run_side(scenario: ScenarioConfig, dataset: Dataset, stream: Stream,
             previous: bool) -> Run:
    """One run of the scenario's only strategy, on the previous path or the current one."""
    gc.collect()
    strategy = next(iter(scenario.strategies.values()))
    timer = EvalTimer()
    with (previous_path() if previous else fresh_cache()), timer.installed():
        started = time.perf_counter()
        outcome = run_strategy(scenario, strategy, dataset, stream, seed=scenario.seed,
                               device=torch.device("cpu"))
        wall = time.perf_counter() - started
    if outcome.error:
        raise SystemExit(f"speed.py: {scenario.source}: the run failed: {outcome.error}")
    return Run(wall, timer.seconds, timer.calls, outcome.metrics)


# -----------------------------------------------------------------------------
# bare side: plugins_split_cifar10 naive's training, by hand


def bare_train(scenario: ScenarioConfig, dataset: Dataset, stream: Stream,
               layout: torch.memory_format) -> float:
    """Seconds to train the scenario's model as clsim's naive strategy does (1 epoch per
    experience, a fresh SGD each, the same batch order), no evaluation, in ``layout``."""
    gc.collect()
    training = scenario.training
    started = time.perf_counter()
    torch.manual_seed(derive_seed(scenario.seed, "model"))
    model = build_model(scenario.model.name, dataset.sample_shape, stream.labels.n_classes,
                        scenario.model.options).to(memory_format=layout)
    model.train()
    generator = torch.Generator().manual_seed(derive_seed(scenario.seed, "batches"))
    size = training.batch_size
    for exp in stream:
        optimizer = torch.optim.SGD(model.parameters(), lr=training.optimizer.lr,
                                    momentum=training.optimizer.momentum)
        for _ in range(training.epochs):
            order = torch.randperm(exp.n_train, generator=generator)
            for start in range(0, exp.n_train, size):
                index = order[start : start + size]
                loss = F.cross_entropy(model(dataset.to_input(exp.train_x[index])),
                                       exp.train_y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return time.perf_counter() - started


def same_init(scenario: ScenarioConfig, dataset: Dataset, stream: Stream) -> bool:
    """Does the bare model start from exactly the weights clsim's run starts from?"""
    torch.manual_seed(derive_seed(scenario.seed, "model"))
    ours = build_model(scenario.model.name, dataset.sample_shape, stream.labels.n_classes,
                       scenario.model.options)
    torch.manual_seed(derive_seed(scenario.seed, "model"))
    theirs = build_scenario_model(scenario, dataset, stream)
    pairs = list(zip(ours.state_dict().values(), theirs.state_dict().values(), strict=False))
    return len(pairs) == len(theirs.state_dict()) and all(torch.equal(a, b) for a, b in pairs)


# -----------------------------------------------------------------------------
# comparing results


def flatten(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs of a nested metrics structure, so two runs compare leaf by leaf."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from flatten(item, f"{path}[{i}]")
    elif hasattr(value, "tolist") and not isinstance(value, (int, float)):
        yield from flatten(value.tolist(), path)
    elif hasattr(value, "__dataclass_fields__"):
        yield from flatten(asdict(value), path)
    else:
        yield path, value


def metric_difference(a: dict[str, Any],
                      b: dict[str, Any]) -> tuple[int, float, int, dict[str, int]]:
    """(values compared, max absolute difference, values that differ, differing values
    per top-level metric) over every metric but those that vary by design (times, cache
    counts, execution settings). A leaf that is not a number, or present on one side
    only, differs by inf."""
    left, right = ({path: leaf for path, leaf in flatten(m)
                    if not any(word in path for word in UNCOMPARED)} for m in (a, b))
    worst, differing, where = 0.0, 0, {}
    for path in sorted(left.keys() | right.keys()):
        x, y = left.get(path, "<absent>"), right.get(path, "<absent>")
        if x == y or (isinstance(x, float) and isinstance(y, float)
                      and math.isnan(x) and math.isnan(y)):
            continue
        differing += 1
        metric = path[1:].split(".")[0].split("[")[0]
        where[metric] = where.get(metric, 0) + 1
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        worst = max(worst, abs(x - y) if numeric else math.inf)
    return len(left), worst, differing, where


# -----------------------------------------------------------------------------
# one row: alternate the sides, then the summary


@dataclass
class Row:
    scenario: str
    strategy: str
    previous: list[Run]
    current: list[Run]
    plan_rows: int  # test rows scored per evaluation point
    plan_predicted: int  # distinct test inputs predicted per evaluation point (current)
    train_rows: int
    layouts: dict[str, dict[str, str]] = field(default_factory=dict)  # side -> resolved
    bare: dict[str, list[float]] = field(default_factory=dict)  # training layout -> seconds

    def median(self, side: str, what: str) -> float:
        return statistics.median(getattr(run, what) for run in getattr(self, side))

    def summary(self) -> dict[str, Any]:
        prev, cur = self.median("previous", "wall"), self.median("current", "wall")
        prev_eval = self.median("previous", "eval_seconds")
        cur_eval = self.median("current", "eval_seconds")
        prev_train, cur_train = prev - prev_eval, cur - cur_eval
        compared, worst, differing, where = metric_difference(self.previous[-1].metrics,
                                                       self.current[-1].metrics)
        out = {
            "scenario": self.scenario, "strategy": self.strategy,
            "previous_s": prev, "current_s": cur, "speedup": prev / cur,
            "previous_eval_s": prev_eval, "current_eval_s": cur_eval,
            "previous_eval_share": prev_eval / prev, "current_eval_share": cur_eval / cur,
            "training_ratio": cur_train / prev_train,
            "evaluation_ratio": cur_eval / prev_eval if prev_eval else math.nan,
            "eval_points": self.current[-1].eval_points,
            "rows_per_point_previous": self.plan_rows,
            "rows_per_point_current": self.plan_predicted,
            "metrics_compared": compared, "metrics_differing": differing,
            "max_abs_difference": worst, "differing_metrics": where,
            "final_accuracy": [self.previous[-1].metrics.get("final_accuracy"),
                               self.current[-1].metrics.get("final_accuracy")],
        }
        out["layouts"] = self.layouts
        if self.bare:
            bare = {layout: statistics.median(times) for layout, times in self.bare.items()}
            prev_bare = bare[self.layouts["previous"]["training"]]
            cur_bare = bare[self.layouts["current"]["training"]]
            out.update(bare_s=bare, previous_vs_bare=prev_train / prev_bare,
                       current_vs_bare=cur_train / cur_bare)
        passes = self.feature_passes()
        if passes:
            out["feature_passes"] = passes
        return out

    def feature_passes(self) -> dict[str, Any] | None:
        """Rows through the frozen encoder over the distinct rows (training + test)."""
        prev = self.previous[-1].metrics.get("feature_cache")
        cur = self.current[-1].metrics.get("feature_cache")
        if not prev and not cur:
            return None
        distinct = self.train_rows + self.plan_predicted
        prev, cur = prev or {}, cur or {}
        return {"distinct_rows": distinct, "previous": prev, "current": cur,
                "previous_passes": prev.get("rows_uncached", 0) / distinct,
                "current_passes": cur.get("rows_computed", 0) / distinct}


def run_row(name: str, strategy: str, dataset: Dataset, args: argparse.Namespace) -> Row:
    """Both sides of one row, alternating who goes first; the bare loop for BARE_ROW."""
    sides = {previous: scenario_variant(name, strategy, args.data_root, previous)
             for previous in (True, False)}
    stream = build_stream(sides[False], dataset, sides[False].seed)
    if args.limit:
        stream = limit_stream(stream, args.limit)
    plan = EvaluationPlan.of(stream)
    row = Row(name, strategy, [], [], plan.n_rows, plan.n_predicted,
              sum(exp.n_train for exp in stream.seen_by_strategy()))
    cpu = torch.device("cpu")
    row.layouts = {("previous" if previous else "current"):
                   memory_format_names(scenario, dataset.sample_shape, cpu)
                   for previous, scenario in sides.items()}
    print("  layouts (training / evaluation): " + "; ".join(
        f"{side} {names['training']} / {names['evaluation']}"
        for side, names in row.layouts.items()))
    with_bare = (name, strategy) == BARE_ROW
    if with_bare:  # the bare loop in each layout a side trains in
        row.bare = {names["training"]: [] for names in row.layouts.values()}
        print(f"  bare model starts from clsim's initial weights: "
              f"{'yes' if same_init(sides[False], dataset, stream) else 'NO'}")
    if args.warmup:
        small = limit_stream(stream, WARMUP_LIMIT)
        for previous in (True, False):
            run_side(sides[previous], dataset, small, previous)
    for round_ in range(args.repeats):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for previous in order:
            run = run_side(sides[previous], dataset, stream, previous)
            (row.previous if previous else row.current).append(run)
            print(f"  round {round_ + 1} {'previous' if previous else 'current ':<8} "
                  f"wall {run.wall:8.2f} s  eval {run.eval_seconds:7.2f} s "
                  f"({run.eval_points} points)", flush=True)
        if with_bare:
            layouts = list(row.bare) if round_ % 2 == 0 else list(row.bare)[::-1]
            for key in layouts:
                seconds = bare_train(sides[False], dataset, stream, MEMORY_FORMATS[key])
                row.bare[key].append(seconds)
                print(f"  round {round_ + 1} bare {key:<13} train {seconds:8.2f} s", flush=True)
    return row


# -----------------------------------------------------------------------------
# report


def print_table(summaries: list[dict[str, Any]]) -> None:
    header = (f"{'scenario / strategy':<31} {'prev s':>8} {'cur s':>8} {'speed-up':>8} "
              f"{'eval share':>13} {'train x':>7} {'eval x':>7} {'rows/point':>13} metrics")
    print("\n" + header)
    for s in summaries:
        share = f"{s['previous_eval_share']:.0%}->{s['current_eval_share']:.0%}"
        rows = f"{s['rows_per_point_previous']}->{s['rows_per_point_current']}"
        same = ("identical" if s["metrics_differing"] == 0 else
                f"{s['metrics_differing']}/{s['metrics_compared']} differ, "
                f"max |d| {s['max_abs_difference']:.2g}")
        print(f"{s['scenario'] + ' / ' + s['strategy']:<31} {s['previous_s']:>8.1f} "
              f"{s['current_s']:>8.1f} {s['speedup']:>7.2f}x {share:>13} "
              f"{s['training_ratio']:>7.2f} {s['evaluation_ratio']:>7.2f} {rows:>13} {same}")


def print_details(summaries: list[dict[str, Any]]) -> None:
    for s in summaries:
        label = f"{s['scenario']} / {s['strategy']}"
        prev_acc, cur_acc = s["final_accuracy"]
        if prev_acc is not None:
            print(f"{label}: final accuracy previous {prev_acc:.4f}, current {cur_acc:.4f}; "
                  f"{s['eval_points']} evaluation points")
        if s["differing_metrics"]:
            print(f"{label}: values that differ, per metric: " + ", ".join(
                f"{name} {n}" for name, n in s["differing_metrics"].items()))
        if "bare_s" in s:
            parts = []
            for side in ("previous", "current"):
                layout = s["layouts"][side]["training"]
                parts.append(f"{side} {s[side + '_s'] - s[side + '_eval_s']:.1f} s / bare "
                             f"{layout} {s['bare_s'][layout]:.1f} s = "
                             f"{s[side + '_vs_bare']:.3f}")
            print(f"{label}: training against a bare PyTorch loop: " + "; ".join(parts))
        passes = s.get("feature_passes")
        if passes:
            prev, cur = passes["previous"], passes["current"]
            print(f"{label}: frozen-encoder rows over {passes['distinct_rows']} distinct "
                  f"(training + test) rows: previous {prev.get('rows_uncached', 0)} uncached "
                  f"= {passes['previous_passes']:.2f} passes; current "
                  f"{cur.get('rows_computed', 0)} computed = {passes['current_passes']:.2f} "
                  f"passes, {cur.get('rows_reused', 0)} reused")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dataset = cifar10_data.load_cifar10(args.data_root, "speed.py")
    rows = [row for row in ROWS if row[0] in args.scenarios]
    print(f"issue 21 speed: previous path (NCHW, eval batch 1024, every test row, no feature "
          f"cache) vs current (as shipped), {len(rows)} rows")
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, {args.repeats} "
          f"repeat(s), warm-up {'on' if args.warmup else 'off'}, limit "
          f"{args.limit or 'none'}, CIFAR-10 from {dataset.source}, load average "
          f"{os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    summaries, runs = [], []
    for name, strategy in rows:
        print(f"\n{name} / {strategy}", flush=True)
        row = run_row(name, strategy, dataset, args)
        summaries.append(row.summary())
        runs.append({"scenario": name, "strategy": strategy,
                     "previous": [(r.wall, r.eval_seconds) for r in row.previous],
                     "current": [(r.wall, r.eval_seconds) for r in row.current],
                     "bare": row.bare})
    print_table(summaries)
    print()
    print_details(summaries)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": summaries, "runs": runs, "threads":
                                         args.threads, "limit": args.limit}, indent=1,
                                        default=str) + "\n")
        print(f"table written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
