"""How much does clsim's engine cost over a hand-written PyTorch loop doing the same work?

Both sides train the ``naive`` strategy on split MNIST in this one process: 5 experiences
of 2 classes, MLP 400-400, SGD lr 0.01, batch 128, 1 epoch per experience, and after each
experience an evaluation on all 5 test sets. They share the model architecture and its
init seed, the data tensors (uint8, normalised the same way), the batch-order generator,
the thread count and the evaluation batch size, so they do the same arithmetic and must
end at the same accuracy. Dataset loading is done once, outside both timings.

The clsim side calls the library as a user gets it (``parse_scenario`` then
``run_strategy``: hook dispatch, ledger measurement, evaluation, metrics); the bare side
is the loop one would write by hand. The sides alternate, a warm-up round first, and
the medians are compared against the target ratio.

The clsim side counts its compute as a run does by default (``CLSIM_COMPUTE``, on unless
set: :mod:`clsim.compute`). ``--compute`` adds a third side, the same clsim run with
compute accounting off, and reports what counting costs: clsim / clsim without
accounting, against the same target, beside clsim / bare.

    CLSIM_DATA=/path/to/data python benchmarks/overhead.py [--repeats 3] [--threads N] [--check]
        [--compute]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from clsim.assembly import build_stream
from clsim.config import ScenarioConfig, parse_scenario
from clsim.data import Dataset, load_dataset
from clsim.engine import run_strategy
from clsim.errors import ClsimError
from clsim.models import build_model
from clsim.seeding import derive_seed
from clsim.stream import Stream

TARGET_RATIO = 1.05  # clsim / bare, medians

# the work both sides do (mirrors the naive strategy of scenarios/split_mnist.yaml)
SEED = 0
N_EXPERIENCES = 5
HIDDEN = (400, 400)
LR = 0.01
BATCH_SIZE = 128
EPOCHS = 1
EVAL_BATCH_SIZE = 1024


def scenario_yaml(device: str) -> str:
    """The clsim scenario of that work, as a user would write it."""
    return f"""
name: split_mnist_overhead
seed: {SEED}
device: {device}
data:
  dataset: mnist
stream:
  type: class_incremental
  n_experiences: {N_EXPERIENCES}
model:
  name: mlp
  hidden: [{", ".join(map(str, HIDDEN))}]
training:
  epochs: {EPOCHS}
  batch_size: {BATCH_SIZE}
  eval_batch_size: {EVAL_BATCH_SIZE}  # clsim's default, stated so both sides share it
  optimizer: {{name: sgd, lr: {LR}}}
strategies:
  naive:
    budget: model
    plugins: [naive]
"""


# one experience as plain tensors: train_x, train_y, test_x, test_y
Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Normalise = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Timing:
    seconds: float  # wall clock
    cpu_seconds: float  # process CPU time (all threads): less sensitive to a busy machine
    accuracy_matrix: list[list[float]]  # [after experience i][on test set j]
    final_accuracy: float  # on the union of all test sets, as clsim reports it
    eval_seconds: float = 0.0  # bare side only: time spent evaluating


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time clsim's naive strategy on split MNIST against a hand-written "
        "PyTorch loop doing the same work, in one process.",
    )
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds per side, after one warm-up round (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads for both sides (default: torch's "
                        f"current, {torch.get_num_threads()})")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N, used by both sides (default: cpu)")
    parser.add_argument("--data-root", default=os.environ.get("CLSIM_DATA"),
                        help="folder holding mnist/ (default: $CLSIM_DATA)")
    parser.add_argument("--no-bare-initial-eval", dest="bare_initial_eval",
                        action="store_false",
                        help="skip the bare loop's evaluation of the untrained model (clsim "
                        "always does it, for forward transfer); by default both sides do the "
                        "same work, so the ratio isolates the engine's own overhead")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when clsim/bare exceeds the target ({TARGET_RATIO})")
    parser.add_argument("--compute", action="store_true",
                        help="also time clsim with compute accounting off, and report "
                        "clsim / that (the cost of counting) against the target too")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the table, profile one clsim run and print its top N "
                        "functions by own time (default: 0, off)")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    return args


def fail(message: str) -> NoReturn:
    """A setup error (no data, no GPU): one line on stderr, exit status 2."""
    print(f"overhead.py: {message}", file=sys.stderr)
    sys.exit(2)


def load_mnist(data_root: str | None) -> Dataset:
    """MNIST from ``data_root``/mnist, or exit 2 saying which path was tried."""
    hint = "set CLSIM_DATA (or pass --data-root) to the folder holding mnist/ (4 idx files)"
    if not data_root:
        fail(f"MNIST not found: no data root; {hint}")
    folder = Path(data_root).expanduser() / "mnist"
    if not folder.is_dir():
        fail(f"MNIST not found: {folder} does not exist; {hint}")
    try:
        return load_dataset("mnist", root=data_root)
    except ClsimError as exc:
        fail(f"{exc}; {hint}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# clsim side: the library as a user calls it


def run_clsim(scenario: ScenarioConfig, dataset: Dataset, stream: Stream,
              device: torch.device, compute: str | None = None) -> Timing:
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    outcome = run_strategy(scenario, scenario.strategies["naive"], dataset, stream,
                           seed=scenario.seed, device=device, compute=compute)
    outcome.to_dict()  # run_scenario's per-strategy bookkeeping (summary.json entry)
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    metrics = outcome.metrics
    return Timing(seconds, cpu_seconds, metrics["accuracy_matrix"], metrics["final_accuracy"])


# -----------------------------------------------------------------------------
# bare side: the same work in plain PyTorch


def bare_mlp(in_features: int, n_classes: int) -> nn.Sequential:
    """Flatten, Linear-ReLU per hidden width, then the head (clsim's mlp, same init order)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for hidden in HIDDEN:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def make_normalise(scale: float, mean: float, std: float) -> Normalise:
    """uint8 -> float32 model input: clsim's fused multiply-add with the dataset's constants."""
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).mul_(scale / std).add_(-mean / std)
    return normalise


@torch.no_grad()
def bare_evaluate(model: nn.Module, splits: list[Split], normalise: Normalise,
                  device: torch.device) -> list[int]:
    """Correct predictions on each experience's test set."""
    model.eval()
    correct = []
    for _, _, test_x, test_y in splits:
        hits = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, len(test_y), EVAL_BATCH_SIZE):
            x = normalise(test_x[start : start + EVAL_BATCH_SIZE].to(device))
            y = test_y[start : start + EVAL_BATCH_SIZE].to(device)
            hits += (model(x).argmax(dim=1) == y).sum()
        correct.append(int(hits))
    model.train()
    return correct


def run_bare(splits: list[Split], dataset: Dataset, device: torch.device,
             initial_eval: bool) -> Timing:
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    # model and batch order: the seeds clsim derives for "model" and "batches"
    torch.manual_seed(derive_seed(SEED, "model"))
    in_features = dataset.x_train[0].numel()
    model = bare_mlp(in_features, dataset.n_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # stateless: one is enough
    generator = torch.Generator().manual_seed(derive_seed(SEED, "batches"))
    normalise = make_normalise(dataset.scale, dataset.mean[0], dataset.std[0])
    eval_seconds = 0.0
    if initial_eval:
        tick = time.perf_counter()
        bare_evaluate(model, splits, normalise, device)
        eval_seconds += time.perf_counter() - tick
    correct = []
    for train_x, train_y, _, _ in splits:
        # train: shuffled mini-batches, cross-entropy, SGD
        model.train()
        n = len(train_y)
        for _ in range(EPOCHS):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, BATCH_SIZE):
                index = order[start : start + BATCH_SIZE]
                x = normalise(train_x[index].to(device))
                y = train_y[index].to(device)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        # evaluate on every experience's test set
        tick = time.perf_counter()
        correct.append(bare_evaluate(model, splits, normalise, device))
        eval_seconds += time.perf_counter() - tick
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    counts = [len(test_y) for _, _, _, test_y in splits]
    matrix = [[c / n for c, n in zip(row, counts, strict=True)] for row in correct]
    return Timing(seconds, cpu_seconds, matrix, sum(correct[-1]) / sum(counts), eval_seconds)


# -----------------------------------------------------------------------------
# checks and report


def same_init(dataset: Dataset, scenario: ScenarioConfig) -> bool:
    """Does the bare model start from exactly clsim's initial weights?"""
    torch.manual_seed(derive_seed(SEED, "model"))
    ours = bare_mlp(dataset.x_train[0].numel(), dataset.n_classes)
    torch.manual_seed(derive_seed(SEED, "model"))
    theirs = build_model("mlp", dataset.sample_shape, dataset.n_classes, scenario.model.options)
    return all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(),
                                                   strict=True))


def profile_clsim(scenario: ScenarioConfig, dataset: Dataset, stream: Stream, device: torch.device,
                  top: int) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run_clsim(scenario, dataset, stream, device)
    profiler.disable()
    print(f"\ncProfile of one clsim run, top {top} by own time:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asked for, but torch sees no CUDA device")

    # setup (untimed): data loaded once, one stream shared by both sides
    dataset = load_mnist(args.data_root)
    scenario = parse_scenario(scenario_yaml(args.device), source="overhead.py")
    stream = build_stream(scenario, dataset, scenario.seed)
    splits = [(e.train_x, e.train_y, e.test_x, e.test_y) for e in stream]
    print(f"clsim overhead: split MNIST ({len(stream)} x 2 classes), naive, MLP "
          f"{'-'.join(map(str, HIDDEN))}, SGD lr {LR}, batch {BATCH_SIZE}, {EPOCHS} epoch, "
          f"eval batch {EVAL_BATCH_SIZE}")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats + 1 warm-up, MNIST from {dataset.source}")
    print(f"bare loop evaluates before training too: {'yes' if args.bare_initial_eval else 'no'}"
          f"; same initial weights: {'yes' if same_init(dataset, scenario) else 'NO'}\n")

    # timed rounds: warm-up first, then the sides alternate who goes first
    sides: dict[str, Callable[[], Timing]] = {
        "clsim": lambda: run_clsim(scenario, dataset, stream, device),
        "bare": lambda: run_bare(splits, dataset, device, args.bare_initial_eval),
    }
    if args.compute:  # the same run, counting nothing: what accounting costs
        sides["nocount"] = lambda: run_clsim(scenario, dataset, stream, device, compute="off")
    times: dict[str, list[Timing]] = {name: [] for name in sides}
    extra = f" {'nocount s':>9} {'/nocount':>8}" if args.compute else ""
    print(f"{'round':<8} {'clsim s':>9} {'bare s':>9} {'ratio':>7}{extra}")
    for round_ in range(args.repeats + 1):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        result = {}
        for name in order:
            gc.collect()
            result[name] = sides[name]()
        label = "warm-up" if round_ == 0 else str(round_)
        shown = (f" {result['nocount'].seconds:>9.3f} "
                 f"{result['clsim'].seconds / result['nocount'].seconds:>8.3f}"
                 if args.compute else "")
        print(f"{label:<8} {result['clsim'].seconds:>9.3f} {result['bare'].seconds:>9.3f} "
              f"{result['clsim'].seconds / result['bare'].seconds:>7.3f}{shown}", flush=True)
        if round_ > 0:
            for name in times:
                times[name].append(result[name])

    # summary: medians, ratios, how noisy the rounds were, accuracy agreement
    def med(name: str, key: str) -> float:
        return statistics.median(getattr(t, key) for t in times[name])

    def low(name: str) -> float:
        return min(t.seconds for t in times[name])

    ratio = med("clsim", "seconds") / med("bare", "seconds")
    print(f"\n{'':<6} {'median s':>9} {'min s':>9} {'cpu s':>9} {'final acc':>10}")
    for name in times:
        print(f"{name:<6} {med(name, 'seconds'):>9.3f} {low(name):>9.3f} "
              f"{med(name, 'cpu_seconds'):>9.3f} {times[name][-1].final_accuracy:>10.4f}")
    print(f"{'ratio':<6} {ratio:>9.3f} {low('clsim') / low('bare'):>9.3f} "
          f"{med('clsim', 'cpu_seconds') / med('bare', 'cpu_seconds'):>9.3f}")
    eval_s = med("bare", "eval_seconds")
    passes = len(stream) + (1 if args.bare_initial_eval else 0)
    print(f"\nbare time spent evaluating: {eval_s:.3f} s for {passes} passes "
          f"({eval_s / passes:.3f} s a pass)")
    if not args.bare_initial_eval:
        print(f"clsim also evaluates the untrained model once (forward-transfer baseline): "
              f"about {eval_s / passes:.3f} s, {eval_s / passes / med('bare', 'seconds'):.1%} "
              "of bare; drop --no-bare-initial-eval to give the bare loop that pass too")
    spread = max(max(t.seconds for t in ts) / low(name) - 1 for name, ts in times.items())
    if spread > 0.10:
        print(f"note: a side's wall time varied by up to {spread:.0%} between rounds (a busy "
              "machine?); trust the ratio less, rerun idle or with more --repeats")
    reference = times["clsim"][0].accuracy_matrix
    same = all(t.accuracy_matrix == reference for ts in times.values() for t in ts)
    print(f"accuracy matrices ({len(stream)}x{len(stream)}), every timed run of both sides: "
          + ("identical" if same else "DIFFERENT (the two sides did not do the same work)"))
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"ratio clsim/bare (median wall times): {ratio:.3f}   "
          f"target <= {TARGET_RATIO}: {verdict}")
    counting = None
    if args.compute:
        counting = med("clsim", "seconds") / med("nocount", "seconds")
        cpu = med("clsim", "cpu_seconds") / med("nocount", "cpu_seconds")
        print(f"ratio clsim/clsim without compute accounting (median wall times): "
              f"{counting:.3f} (cpu {cpu:.3f})   target <= {TARGET_RATIO}: "
              + ("met" if counting <= TARGET_RATIO else "NOT met"))

    if args.profile:
        profile_clsim(scenario, dataset, stream, device, args.profile)
    over = ratio > TARGET_RATIO or (counting is not None and counting > TARGET_RATIO)
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
