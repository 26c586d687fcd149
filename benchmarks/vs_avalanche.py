"""clsim against Avalanche on the same strategy and stream: wall time and peak memory.

For naive fine-tuning and experience replay (500 stored samples), on split MNIST (5
experiences of 2 classes in clsim's class order, MLP 400-400 from the same initial
weights, SGD lr 0.01, batch 128, 1 epoch), each library runs the strategy its own way,
in this one process, in interleaved rounds (a warm-up round first, then the side that
goes first alternates):

* **clsim**: the scenario as a user writes it (``parse_scenario``) and ``run_strategy``
  with clsim's ``naive`` or ``replay`` plugin (class-balanced memory of 500 updated at
  each experience's end, as Avalanche's ``Replay`` does, and half of every batch
  replayed from the second experience on): evaluation of the untrained model and after
  every experience on all 5 test sets (batches of 1024), the memory ledger, the metrics,
  the summary entry (``to_dict``).
* **Avalanche** (avalanche-lib): what its user writes: ``Naive`` or ``Replay(mem_size=
  500)`` (experience-balanced memory, a batch of 128 memory samples beside every batch
  of 128), an ``EvaluationPlugin`` with experience and stream accuracy and no logger,
  ``strategy.eval(test_stream)`` once before training and after every
  ``strategy.train(experience)``, eval batches of 1024.

Untimed on both sides: loading MNIST, building clsim's stream, and building Avalanche's
benchmark over the same stream (``benchmark_from_stream``), whose samples are given
already converted to the model's float input, so Avalanche reads them without a
per-sample transform (clsim converts uint8 batches inside its timed loop).

Peak memory is measured apart from the timings, once per side and strategy, each in a
fresh interpreter that sets up the same way and then runs once: the peak of the
process's resident set during the run over its size right before (sampled from /proc
every 2 ms), and, in a second fresh interpreter, the peak of the Python heap during the
run (``tracemalloc``, which sees Python objects, not tensor storage); on a GPU, the peak
of ``torch.cuda.max_memory_allocated``.

    CLSIM_DATA=/path/to/data .venv-avalanche/bin/python benchmarks/vs_avalanche.py \
        [--repeats 3] [--threads N] [--device cpu] [--no-memory] [--check]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from clsim.assembly import build_stream
from clsim.config import ScenarioConfig, parse_scenario
from clsim.data import Dataset, load_dataset
from clsim.engine import run_strategy
from clsim.errors import ClsimError
from clsim.interop.avalanche import AvalancheMissing, benchmark_from_stream, import_avalanche
from clsim.models import build_model
from clsim.seeding import derive_seed
from clsim.stream import Stream

TARGET_RATIO = 0.75  # clsim / Avalanche, median wall times, for each strategy

SEED = 0
N_EXPERIENCES = 5
HIDDEN = (400, 400)
LR = 0.01
BATCH_SIZE = 128
EPOCHS = 1
EVAL_BATCH_SIZE = 1024
MEMORY = 500
STRATEGIES = ("naive", "replay")
AVALANCHE_NAMES = {"naive": "Naive", "replay": "Replay"}


def scenario_yaml(device: str, replay_update: str = "experience_end") -> str:
    """clsim's side of the work, as a user would write it."""
    return f"""
name: vs_avalanche
seed: {SEED}
device: {device}
data: {{dataset: mnist}}
stream: {{type: class_incremental, n_experiences: {N_EXPERIENCES}}}
model: {{name: mlp, hidden: [{", ".join(map(str, HIDDEN))}]}}
training:
  epochs: {EPOCHS}
  batch_size: {BATCH_SIZE}
  eval_batch_size: {EVAL_BATCH_SIZE}
  optimizer: {{name: sgd, lr: {LR}}}
strategies:
  naive:
    plugins: [naive]
  replay:
    plugins:
      - replay: {{selection: class_balanced, capacity: {MEMORY}, update: {replay_update}}}
"""


@dataclass
class Timing:
    seconds: float
    cpu_seconds: float
    final_accuracy: float


@dataclass
class Setup:
    """What both sides share, built once and untimed."""

    scenario: ScenarioConfig
    dataset: Dataset
    stream: Stream
    benchmark: Any
    device: torch.device


def fail(message: str) -> NoReturn:
    print(f"vs_avalanche.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time clsim and Avalanche on naive and replay over the same split MNIST "
        "stream, in one process, and measure each one's peak memory.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds, after one warm-up round (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch.set_num_threads for both (default: torch's, "
                        f"{torch.get_num_threads()})")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--data-root", default=os.environ.get("CLSIM_DATA"),
                        help="folder holding mnist/ (default: $CLSIM_DATA)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated, of naive, replay (default: both)")
    parser.add_argument("--replay-update", choices=["experience_end", "batch"],
                        default="experience_end",
                        help="when clsim's replay memory takes samples: at experience end, "
                        "as Avalanche's Replay (default), or after every batch (ER, clsim's "
                        "default)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory runs (4 fresh interpreters per strategy)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when a ratio exceeds the target ({TARGET_RATIO})")
    parser.add_argument("--memory-child", nargs=3, metavar=("SIDE", "STRATEGY", "PROBE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.strategies = [s for s in args.strategies.split(",") if s]
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    if not args.strategies or any(s not in STRATEGIES for s in args.strategies):
        parser.error(f"--strategies: choose among {', '.join(STRATEGIES)}")
    return args


def set_up(args: argparse.Namespace) -> Setup:
    try:
        import_avalanche()
    except AvalancheMissing as exc:
        fail(str(exc))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asked for, but torch sees no CUDA device")
    hint = "set CLSIM_DATA (or pass --data-root) to the folder holding mnist/"
    if not args.data_root or not (Path(args.data_root).expanduser() / "mnist").is_dir():
        fail(f"MNIST not found under {args.data_root!r}; {hint}")
    try:
        dataset = load_dataset("mnist", root=args.data_root)
    except ClsimError as exc:
        fail(f"{exc}; {hint}")
    scenario = parse_scenario(scenario_yaml(args.device, args.replay_update),
                              source="vs_avalanche.py")
    stream = build_stream(scenario, dataset, scenario.seed)
    return Setup(scenario, dataset, stream, benchmark_from_stream(stream, dataset), device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# the two sides


def run_clsim(setup: Setup, strategy: str) -> Timing:
    sync(setup.device)
    started, cpu_started = time.perf_counter(), time.process_time()
    scenario = setup.scenario
    outcome = run_strategy(scenario, scenario.strategies[strategy], setup.dataset,
                           setup.stream, seed=scenario.seed, device=setup.device)
    outcome.to_dict()
    sync(setup.device)
    if outcome.error:
        raise RuntimeError(f"clsim {strategy} failed: {outcome.error}")
    return Timing(time.perf_counter() - started, time.process_time() - cpu_started,
                  outcome.metrics["final_accuracy"])


def run_avalanche(setup: Setup, strategy: str) -> Timing:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import supervised
    from avalanche.training.plugins import EvaluationPlugin

    sync(setup.device)
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(derive_seed(SEED, "model"))  # clsim's initial weights
    model = build_model("mlp", setup.dataset.sample_shape, setup.dataset.n_classes,
                        setup.scenario.model.options)
    torch.manual_seed(derive_seed(SEED, strategy, "torch-global"))
    options = {"mem_size": MEMORY} if strategy == "replay" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                     loggers=[])
    learner = getattr(supervised, AVALANCHE_NAMES[strategy])(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=BATCH_SIZE,
        train_epochs=EPOCHS, eval_mb_size=EVAL_BATCH_SIZE, device=setup.device,
        evaluator=evaluator, **options)
    test_stream = setup.benchmark.test_stream
    with warnings.catch_warnings(record=True):  # its deprecated internals, each experience
        learner.eval(test_stream)  # the untrained model, as clsim evaluates it
        for experience in setup.benchmark.train_stream:
            learner.train(experience)
            results = learner.eval(test_stream)
    sync(setup.device)
    accuracy = next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream/"))
    return Timing(time.perf_counter() - started, time.process_time() - cpu_started,
                  float(accuracy))


SIDES: dict[str, Callable[[Setup, str], Timing]] = {"clsim": run_clsim,
                                                    "avalanche": run_avalanche}


# -----------------------------------------------------------------------------
# peak memory, each run in a fresh interpreter


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """The largest resident set seen while running, sampled every 2 ms by a thread."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def memory_child(args: argparse.Namespace) -> int:
    """One side's one run after the shared setup; prints its peak as JSON."""
    side, strategy, probe = args.memory_child
    setup = set_up(args)
    run = SIDES[side]
    gc.collect()
    result: dict[str, Any] = {}
    if probe == "rss":
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(setup.device)
            before_cuda = torch.cuda.memory_allocated(setup.device)
        before = rss_bytes()
        with RssPeak() as peak:
            run(setup, strategy)
        result["rss_peak_delta"] = peak.peak - before
        if setup.device.type == "cuda":
            result["cuda_peak_delta"] = torch.cuda.max_memory_allocated(setup.device) \
                - before_cuda
    else:
        import tracemalloc

        tracemalloc.start()
        run(setup, strategy)
        result["python_heap_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(json.dumps(result))
    return 0


def measure_memory(args: argparse.Namespace, side: str, strategy: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for probe in ("rss", "tracemalloc"):
        command = [sys.executable, __file__, "--memory-child", side, strategy, probe,
                   "--threads", str(args.threads), "--device", args.device,
                   "--replay-update", args.replay_update,
                   "--data-root", str(args.data_root)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"the memory run of {side} {strategy} failed:\n{out.stderr}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


# -----------------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    setup = set_up(args)
    import avalanche

    print(f"clsim vs Avalanche {avalanche.__version__}: split MNIST ({len(setup.stream)} x 2 "
          f"classes), MLP {'-'.join(map(str, HIDDEN))}, SGD lr {LR}, batch {BATCH_SIZE}, "
          f"{EPOCHS} epoch, replay memory {MEMORY} (clsim updated: {args.replay_update}), "
          "evaluation before training and after "
          f"every experience on all test sets (batches of {EVAL_BATCH_SIZE})")
    print(f"torch {torch.__version__}, device {setup.device}, {torch.get_num_threads()} "
          f"threads, {args.repeats} repeats + 1 warm-up, interleaved\n")

    times: dict[tuple[str, str], list[Timing]] = {
        (side, s): [] for s in args.strategies for side in SIDES}
    print(f"{'round':<8} {'strategy':<8} {'clsim s':>9} {'avalanche s':>12} {'ratio':>7}")
    for round_ in range(args.repeats + 1):
        for strategy in args.strategies:
            order = list(SIDES) if round_ % 2 == 0 else list(SIDES)[::-1]
            result = {}
            for side in order:
                gc.collect()
                result[side] = SIDES[side](setup, strategy)
            label = "warm-up" if round_ == 0 else str(round_)
            print(f"{label:<8} {strategy:<8} {result['clsim'].seconds:>9.3f} "
                  f"{result['avalanche'].seconds:>12.3f} "
                  f"{result['clsim'].seconds / result['avalanche'].seconds:>7.3f}", flush=True)
            if round_ > 0:
                for side in SIDES:
                    times[side, strategy].append(result[side])

    def med(side: str, strategy: str, key: str = "seconds") -> float:
        return statistics.median(getattr(t, key) for t in times[side, strategy])

    print(f"\n{'strategy':<8} {'side':<10} {'median s':>9} {'min s':>8} {'cpu s':>8} "
          f"{'final acc':>10}")
    ratios = {}
    for strategy in args.strategies:
        for side in SIDES:
            ts = times[side, strategy]
            print(f"{strategy:<8} {side:<10} {med(side, strategy):>9.3f} "
                  f"{min(t.seconds for t in ts):>8.3f} {med(side, strategy, 'cpu_seconds'):>8.3f} "
                  f"{ts[-1].final_accuracy:>10.4f}")
        ratios[strategy] = med("clsim", strategy) / med("avalanche", strategy)
    print()
    for strategy, ratio in ratios.items():
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        cpu = med("clsim", strategy, "cpu_seconds") / med("avalanche", strategy, "cpu_seconds")
        print(f"ratio clsim/avalanche, {strategy} (median wall times): {ratio:.3f}   "
              f"target <= {TARGET_RATIO}: {verdict}   (median CPU seconds: {cpu:.3f})")
    busy = max(t.seconds / t.cpu_seconds for ts in times.values() for t in ts)
    if busy > 1.1:
        print(f"note: a run took up to {busy:.1f}x its CPU seconds in wall time (a busy "
              "machine?); the CPU-second ratios move less")

    if args.memory:
        print("\npeak memory of one run, each in a fresh interpreter after the same setup "
              "(MiB): resident set over its size before the run; Python heap (tracemalloc)")
        cuda = setup.device.type == "cuda"
        print(f"{'strategy':<8} {'side':<10} {'RSS peak':>9} {'Py heap':>8}"
              + (f" {'CUDA peak':>10}" if cuda else ""))
        for strategy in args.strategies:
            for side in SIDES:
                m = measure_memory(args, side, strategy)
                print(f"{strategy:<8} {side:<10} {mib(m['rss_peak_delta']):>9} "
                      f"{mib(m['python_heap_peak']):>8}"
                      + (f" {mib(m['cuda_peak_delta']):>10}" if cuda else ""), flush=True)
    return 1 if args.check and any(r > TARGET_RATIO for r in ratios.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
