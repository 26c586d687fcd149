"""Does a `clsim compare` grid compute a frozen encoder's features once per worker?

A grid of nmc (nearest class mean on frozen features) on split CIFAR-10, 3 budgets x 3
seeds, with the encoder loaded from a checkpoint: every cell puts the same 60,000 images
through the same frozen weights, so the process-wide feature cache
(``clsim/feature_cache.py``) should compute each image's features once per worker
process and hand them to every later cell. This script builds the checkpoint (convnet2,
32 channels, briefly trained on CIFAR-10, or its seeded initial weights with
``--no-train``), writes the scenario, runs ``python -m clsim compare`` in a subprocess as a
user would, then reads the cells' records (``cells.jsonl``: each cell's ``feature_cache``
counts and its worker's pid) and checks, per worker:

* each cell computes exactly the (sample, input, call height) keys its worker has not
  met in an earlier cell: the training images at nmc's ``feature_batch`` (raw samples,
  padded calls), the test images at the height of the evaluation batch they fall in
  (every evaluation point, the first one through the model's own head, the later ones
  through nmc's predictions). An experience's last test batch is shorter, and which
  images it holds depends on the seed's class order, so a later cell of another seed
  computes those few rows and nothing else;
* so the rows a worker computed, summed over its cells, equal its distinct keys;
* and, since nmc keeps no budget-dependent state, a seed's accuracy is the same at every
  budget.

    CLSIM_DATA=/path/to/data python benchmarks/frozen_features.py [--limit N] [--no-train]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NoReturn

import cifar10_data  # benchmarks/, the script's folder
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from clsim.assembly import build_scenario_model, build_stream, evaluation_batch_size
from clsim.config import ScenarioConfig, parse_scenario
from clsim.data import Dataset, load_dataset
from clsim.seeding import derive_seed

BUDGETS = ["model + 1MB", "model + 4MB", "model + 16MB"]
SEEDS = [0, 1, 2]
FEATURE_BATCH = 256  # nmc's default feature_batch, the call height of its feature passes
TRAIN = {"lr": 0.05, "momentum": 0.9, "batch": 128}  # as plugins_split_cifar10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a clsim compare grid of nmc on a frozen checkpointed encoder and "
        "check that each worker computes every feature once.",
    )
    parser.add_argument("--executor", choices=["inline", "local", "ray"], default="local",
                        help="clsim compare's executor (default: local, a process pool)")
    parser.add_argument("--workers", type=int, default=2,
                        help="clsim compare --workers (default: 2)")
    parser.add_argument("--train-samples", type=int, default=10_000, metavar="N",
                        help="train the encoder one epoch on N random CIFAR-10 training "
                        "images (default: 10000)")
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="save the model's seeded initial weights, untrained")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="smoke run: the grid reads only the first N/2 training and test "
                        "images of each class, N per experience (an npz written next to the "
                        "scenario); the encoder then trains on those training images")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder for the checkpoint, the scenario and the results, kept "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--data-root", default=os.environ.get("CLSIM_DATA"),
                        help="folder holding cifar10/ (default: $CLSIM_DATA)")
    args = parser.parse_args()
    if args.workers < 1 or args.train_samples < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--workers, --train-samples and --limit must be >= 1")
    return args


def fail(message: str) -> NoReturn:
    """A setup error (no data, a failed compare run): one line on stderr, exit status 2."""
    cifar10_data.fail("frozen_features.py", message)


# -----------------------------------------------------------------------------
# the scenario and its checkpoint


def scenario_dict(data: dict[str, Any], checkpoint: Path | None) -> dict[str, Any]:
    """The grid's scenario; without ``checkpoint`` a naive stand-in to build the model."""
    plugin = ({"nmc": {"backbone_checkpoint": str(checkpoint)}} if checkpoint else "naive")
    return {
        "name": "frozen_features",
        "seed": 0,
        "threads": 1,
        "data": data,
        "stream": {"type": "class_incremental", "n_experiences": 5},
        "model": {"name": "convnet2", "channels": 32},
        "training": {"epochs": 1, "batch_size": TRAIN["batch"],
                     "optimizer": {"name": "sgd", "lr": TRAIN["lr"],
                                   "momentum": TRAIN["momentum"]}},
        "budget": BUDGETS[0],
        "strategies": {"nmc": {"plugins": [plugin]}},
        "compare": {"budgets": BUDGETS, "seeds": SEEDS},
    }


def parse(raw: dict[str, Any], folder: Path) -> ScenarioConfig:
    return parse_scenario(yaml.safe_dump(raw, sort_keys=False), source=str(folder / "grid.yaml"),
                          base_dir=str(folder))


def grid_data(dataset: Dataset, data_root: str, limit: int | None, folder: Path) -> dict:
    """The scenario's data section: CIFAR-10 itself, or with ``--limit`` an npz of the
    first ``limit`` training and test images of each experience's 2 classes, as
    ``clsim run --limit`` keeps them (``clsim compare`` has no --limit)."""
    if limit is None:
        return {"dataset": "cifar10", "root": str(Path(data_root).expanduser().resolve())}
    path = folder / f"cifar10_first_{limit}.npz"
    per_class = -(-limit // 2)
    train, test = first_per_class(dataset.y_train, per_class), first_per_class(
        dataset.y_test, per_class)
    np.savez(path, x=dataset.x_train[train].numpy(), y=dataset.y_train[train].numpy(),
             x_test=dataset.x_test[test].numpy(), y_test=dataset.y_test[test].numpy(),
             class_names=np.array(dataset.class_names), scale=np.float64(dataset.scale),
             mean=np.array(dataset.mean), std=np.array(dataset.std))
    return {"dataset": "npz", "path": str(path)}


def first_per_class(y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first ``k`` samples of every class (the loader sorts by class, so
    the first N overall would hold one class only)."""
    return torch.cat([torch.nonzero(y == c).squeeze(1)[:k] for c in torch.unique(y)])


def build_checkpoint(scenario: ScenarioConfig, dataset: Dataset, n_train: int | None,
                     path: Path) -> str:
    """Save the encoder (``model.features``' state_dict) the grid freezes: the model as
    the grid's seed 0 builds it, trained one epoch on ``n_train`` images unless None."""
    torch.manual_seed(derive_seed(scenario.seed, "model"))
    model = build_scenario_model(scenario, dataset, device=torch.device("cpu"))
    if n_train is None:
        how = "seeded initial weights, untrained"
    else:
        started = time.perf_counter()
        train_one_epoch(model, dataset, n_train, scenario.seed)
        how = (f"trained 1 epoch on {n_train} random training images "
               f"({time.perf_counter() - started:.1f} s)")
    torch.save(model.features.state_dict(), path)
    return how


def train_one_epoch(model: torch.nn.Module, dataset: Dataset, n: int, seed: int) -> None:
    """One epoch of SGD on ``n`` training images drawn evenly from every class (the loader
    sorts by class), so a briefly trained encoder gives nmc features better than chance."""
    pick = torch.randperm(len(dataset.y_train), generator=torch.Generator().manual_seed(seed))
    x, y = dataset.x_train[pick[:n]], dataset.y_train[pick[:n]]
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN["lr"], momentum=TRAIN["momentum"])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    model.train()
    for start in range(0, len(y), TRAIN["batch"]):
        index = order[start : start + TRAIN["batch"]]
        loss = F.cross_entropy(model(dataset.to_input(x[index])), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# -----------------------------------------------------------------------------
# what each worker should compute


def digests(x: torch.Tensor) -> list[bytes]:
    """A digest of each sample's bytes (the cache keys a sample by its bytes)."""
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x]


def seed_keys(scenario: ScenarioConfig, dataset: Dataset, seed: int) -> set[tuple]:
    """The cache keys one cell of ``seed`` meets: every training image at nmc's
    ``feature_batch`` (padded calls: the height never changes), and every test image at
    the height of the evaluation batch it falls in. The evaluation cuts each
    experience's test set into batches of the evaluation batch, so an experience's last
    batch is shorter (2000 = 62 x 32 + 16), and which images it holds depends on the
    seed's class order."""
    stream = build_stream(scenario, dataset, seed)
    height = evaluation_batch_size(scenario, torch.device("cpu"))
    keys: set[tuple] = set()
    for exp in stream:
        keys.update(("train", FEATURE_BATCH, d) for d in digests(exp.train_x))
        for start in range(0, exp.n_test, height):
            batch = exp.test_x[start : start + height]
            keys.update(("test", len(batch), d) for d in digests(batch))
    return keys


def expected_keys(scenario: ScenarioConfig, dataset: Dataset) -> dict[int, set[tuple]]:
    """Each seed's keys; the keys of a worker are the union over the seeds it ran."""
    return {seed: seed_keys(scenario, dataset, seed) for seed in SEEDS}


def describe_keys(keys: set[tuple]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for split, height, _ in keys:
        counts[f"{split} at {height}"] += 1
    return " + ".join(f"{n} {what}" for what, n in sorted(counts.items())) + f" = {len(keys)}"


# -----------------------------------------------------------------------------
# the grid run and its records


def workers(args: argparse.Namespace) -> str:
    """How many processes run cells (inline: the CLI's own, whatever --workers says)."""
    return "1 worker" if args.executor == "inline" else f"{args.workers} workers"


def run_compare(scenario_path: Path, out: Path, args: argparse.Namespace) -> float:
    """``clsim compare`` in a subprocess; its wall seconds, or exit 2 with its output's tail."""
    command = [sys.executable, "-m", "clsim", "compare", str(scenario_path), "--out", str(out),
               "--executor", args.executor, "--workers", str(args.workers), "--no-progress"]
    print("$ " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        fail(f"clsim compare exited {done.returncode}:\n{tail}")
    return seconds


def read_cells(out: Path) -> list[dict[str, Any]]:
    """The cells' records, in the order they finished."""
    lines = (out / "cells.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def cache_counts(cell: dict[str, Any]) -> dict[str, int]:
    counts = cell.get("feature_cache") or {}
    return {key: int(counts.get(key, 0)) for key in ("rows_computed", "rows_reused",
                                                      "rows_uncached")}


def report_workers(cells: list[dict[str, Any]], keys: dict[int, set[tuple]]) -> bool:
    """Per worker: cells and cache counts against the distinct keys of the seeds it ran;
    True when every cell computed exactly the keys the worker had not met before (its
    cells run one after another, in the order cells.jsonl lists them)."""
    by_pid: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        by_pid[cell["pid"]].append(cell)
    print(f"\n{'worker pid':>10} {'cells':>6} {'computed':>9} {'reused':>9} {'uncached':>9} "
          f"{'distinct':>9}  computed per cell (new keys expected)  check")
    ok = True
    for pid, mine in by_pid.items():
        counts = [cache_counts(cell) for cell in mine]
        met: set[tuple] = set()
        per_cell, good = [], True
        for cell, count in zip(mine, counts, strict=True):
            new = keys[cell["seed"]] - met
            met |= new
            per_cell.append(f"{count['rows_computed']}({len(new)})")
            good &= count["rows_computed"] == len(new) and count["rows_uncached"] == 0
        computed = sum(c["rows_computed"] for c in counts)
        reused = sum(c["rows_reused"] for c in counts)
        uncached = sum(c["rows_uncached"] for c in counts)
        good &= computed == len(met)
        ok &= good
        print(f"{pid:>10} {len(mine):>6} {computed:>9} {reused:>9} {uncached:>9} "
              f"{len(met):>9}  {' '.join(per_cell):<37} {'once' if good else 'NOT ONCE'}")
    return ok


def report_accuracy(cells: list[dict[str, Any]]) -> bool:
    """Final accuracy per seed and budget; True when each seed's is the same at every
    budget (nmc's class means do not depend on the budget)."""
    table: dict[int, dict[str, Any]] = defaultdict(dict)
    for cell in cells:
        table[cell["seed"]][cell["budget"]] = cell.get("final_accuracy")
    print(f"\n{'seed':>4} " + " ".join(f"{b:>14}" for b in BUDGETS) + "  same")
    ok = True
    for seed in sorted(table):
        row = [table[seed].get(b) for b in BUDGETS]
        same = len(set(row)) == 1 and row[0] is not None
        ok &= same
        print(f"{seed:>4} " + " ".join(f"{'-' if a is None else f'{a:.4f}':>14}" for a in row)
              + f"  {'yes' if same else 'NO'}")
    return ok


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    dataset = cifar10_data.load_cifar10(args.data_root, "frozen_features.py")
    holder = None if args.out else tempfile.TemporaryDirectory(prefix="clsim-frozen-")
    folder = (args.out or Path(holder.name)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        data = grid_data(dataset, args.data_root, args.limit, folder)
        scenario = parse(scenario_dict(data, None), folder)
        grid_dataset = dataset if args.limit is None else load_dataset("npz", path=data["path"])
        checkpoint = folder / "encoder.pt"
        n_train = None if not args.train else min(args.train_samples, len(grid_dataset.y_train))
        how = build_checkpoint(scenario, grid_dataset, n_train, checkpoint)
        raw = scenario_dict(data, checkpoint)
        scenario_path = folder / "grid.yaml"
        scenario_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        keys = expected_keys(parse(raw, folder), grid_dataset)
        print(f"frozen features: nmc on convnet2 (32 channels) from a checkpoint ({how}), "
              f"split CIFAR-10 5 x 2 classes, budgets {BUDGETS} x seeds {SEEDS}; executor "
              f"{args.executor}, {workers(args)}, 1 thread per cell; load average "
              f"{os.getloadavg()[0]:.2f}")
        for seed, seed_set in keys.items():
            print(f"distinct keys of a seed-{seed} cell: {describe_keys(seed_set)}")
        print(f"distinct keys of all seeds: {describe_keys(set().union(*keys.values()))}")
        wall = run_compare(scenario_path, folder / "results", args)
        cells = read_cells(folder / "results")
        failed = [c for c in cells if c.get("status") != "ok"]
        if failed:
            fail(f"{len(failed)} cell(s) failed, e.g. {failed[0].get('error')}")
        once = report_workers(cells, keys)
        same = report_accuracy(cells)
        print(f"\n{len(cells)} cells, clsim compare wall {wall:.1f} s (cells' own seconds: "
              + ", ".join(f"{c['wall_seconds']:.1f}" for c in cells) + f"); load average "
              f"{os.getloadavg()[0]:.2f}")
        print("each feature computed once per worker: " + ("yes" if once else "NO")
              + "; accuracy the same across budgets for every seed: " + ("yes" if same else "NO"))
        if args.out:
            print(f"kept: {folder}")
        return 0 if once and same else 1
    finally:
        if holder is not None:
            holder.cleanup()


if __name__ == "__main__":
    sys.exit(main())
