"""Small shared helpers for tests: scenario text, running the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

DIGITS_SCENARIO = """\
name: tiny
seed: 0
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [32]}
training: {epochs: 1, batch_size: 64, optimizer: {name: sgd, lr: 0.1}}
strategies:
  naive:
    plugins: [naive]
"""

def without_measurements(record: dict) -> dict:
    """A strategy's summary record without what measures the process rather than the
    strategy (wall time, the feature cache's counts, the compute meter's clocks:
    StrategyOutcome.comparable)."""
    from clsim.engine import StrategyOutcome

    return StrategyOutcome.comparable(record)


def comparable_outcome(outcome) -> str:
    """A strategy outcome as JSON without its process measurements: equal for runs that
    computed the same thing (a resumed run against an uninterrupted one)."""
    return json.dumps(without_measurements(outcome.to_dict()), sort_keys=True)


def digits_scenario(strategies: str, *, hidden: int, epochs: int, batch_size: int, lr: float,
                    name: str | None = None) -> str:
    """A split-digits scenario (5 x 2 classes, an MLP of one hidden layer, plain SGD) with
    ``strategies`` (YAML lines under ``strategies:``); ``name`` adds a name, seed 0 and one
    thread."""
    head = f"name: {name}\nseed: 0\nthreads: 1\n" if name else ""
    return (f"{head}data: {{dataset: digits}}\n"
            "stream: {type: class_incremental, n_experiences: 5}\n"
            f"model: {{name: mlp, hidden: [{hidden}]}}\n"
            f"training: {{epochs: {epochs}, batch_size: {batch_size}, "
            f"optimizer: {{name: sgd, lr: {lr}}}}}\n"
            f"strategies:\n{strategies}")


# the agreement protocol with Avalanche: split MNIST, 5 x 2 classes, MLP 400-400,
# SGD lr 0.01, batch 128, one epoch (append the strategies)
SPLIT_MNIST_PROTOCOL = """\
name: agree
seed: 0
threads: 1
data: {dataset: mnist}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [400, 400]}
training: {epochs: 1, batch_size: 128, optimizer: {name: sgd, lr: 0.01}}
strategies:
"""


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``clsim ARGS`` in a fresh interpreter, as a user would from a shell."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "clsim.cli", *args],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def bare_context(model, dataset, **fields):
    """A run context outside a run (plugins driven by hand): CPU, seed 0, one epoch,
    the dataset's flat labels unless ``labels`` is given; ``fields`` override the rest."""
    import torch

    from clsim.context import RunContext
    from clsim.labels import LabelSpace

    values = {"strategy": "s", "device": torch.device("cpu"), "seed": 0, "epochs": 1,
              "batch_size": 32, "labels": LabelSpace.flat(dataset.class_names), **fields}
    return RunContext(model=model, data=dataset.info(), **values)


def stream_hash(stream) -> str:
    """SHA-256 of everything a stream delivers: class order, each experience's classes,
    level and tensors (sample order included), for byte-for-byte determinism checks."""
    import hashlib

    digest = hashlib.sha256(repr(stream.class_order).encode())
    for exp in stream:
        digest.update(repr((exp.classes, exp.level)).encode())
        for t in (exp.train_x, exp.train_y, exp.test_x, exp.test_y):
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()
