"""CIFAR-10 for a benchmark script, or one line on stderr and exit status 2 naming the
path tried: the benchmarks that need it (speed.py, frozen_features.py) fail alike."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from clsim.data import Dataset, load_dataset
from clsim.errors import ClsimError

HINT = "set CLSIM_DATA (or pass --data-root) to the folder holding cifar10/"


def fail(script: str, message: str) -> NoReturn:
    """A setup error of ``script``: one line on stderr, exit status 2."""
    print(f"{script}: {message}", file=sys.stderr)
    sys.exit(2)


def load_cifar10(data_root: str | None, script: str) -> Dataset:
    """CIFAR-10 from ``data_root`` (the folder holding ``cifar10/``) as scenarios read it."""
    if not data_root:
        fail(script, f"CIFAR-10 not found: no data root; {HINT}")
    folder = Path(data_root).expanduser() / "cifar10"
    if not folder.is_dir():
        fail(script, f"CIFAR-10 not found: {folder} does not exist; {HINT}")
    try:
        return load_dataset("cifar10", root=str(Path(data_root).expanduser()))
    except ClsimError as exc:
        fail(script, f"CIFAR-10 could not be read: {exc}; {HINT}")
