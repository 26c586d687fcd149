"""Shared fixtures. Tests that need ../shared/data fail loudly when it is missing."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# avalanche-lib needs torchvision, so it lives in .venv-avalanche (DEVELOPERS.md); `make
# test` runs the interop tests there, and the main environment, which has no avalanche
# by design, does not collect them.
AVALANCHE_TESTS = ["test_avalanche_interop.py", "test_avalanche_plugin.py",
                   "test_avalanche_benchmarks.py"]
collect_ignore = [] if importlib.util.find_spec("avalanche") else AVALANCHE_TESTS


def _shared_data_root() -> Path:
    env = os.environ.get("CLSIM_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The real datasets beside the project; a missing folder is a failure, not a skip."""
    root = _shared_data_root()
    if not (root / "mnist").is_dir():
        pytest.fail(
            f"real datasets not found at {root} (expected mnist/, fashion-mnist/, cifar10/, "
            "omniglot/ there); set CLSIM_DATA to the folder that holds them",
            pytrace=False,
        )
    return root


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Small models run fastest on one thread, and a busy 2-core CI box does not
    oversubscribe; no test result depends on the thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
