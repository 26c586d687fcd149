"""A run that cannot fit in memory stops before loading its data, saying why.

The estimate must be exact where the files tell (the loaded dataset's bytes), the limit
must come from the tightest real source (MemAvailable, the cgroup, ``ulimit -v``,
``$CLSIM_MEMORY_LIMIT``), and the check must run before anything large is read: a dataset
whose files hold only their headers is refused for memory, not reported as truncated.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from clsim.budget import format_bytes
from clsim.config import parse_scenario
from clsim.data import load_dataset
from clsim.data.sizes import estimate_dataset
from clsim.errors import ConfigError, ResourceError
from clsim.resources import (
    MEMORY_ENV,
    MemoryLimit,
    available_memory,
    cgroup_limits,
    env_limit,
    env_room,
    meminfo_limit,
    resident_bytes,
)
from clsim.runner import run_scenario

MNIST_BYTES = 70000 * (28 * 28 + 8)  # uint8 images and int64 labels, train and test

SCENARIO = """\
name: mem
data: {dataset: mnist, root: ROOT}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: [100]}
strategies:
  naive: {plugins: [naive]}
"""


def loaded_bytes(dataset) -> int:
    tensors = [dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
               dataset.coarse_train, dataset.coarse_test]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.fixture
def no_cap(monkeypatch):
    monkeypatch.delenv(MEMORY_ENV, raising=False)


@pytest.fixture
def headers_only_mnist(tmp_path) -> Path:
    """An MNIST folder whose four gzipped idx files hold their headers and no values."""
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    for name, n, dims in (("train-images-idx3-ubyte", 60000, (28, 28)),
                          ("train-labels-idx1-ubyte", 60000, ()),
                          ("t10k-images-idx3-ubyte", 10000, (28, 28)),
                          ("t10k-labels-idx1-ubyte", 10000, ())):
        header = bytes([0, 0, 0x08, 1 + len(dims)]) + np.array((n, *dims), ">u4").tobytes()
        (folder / f"{name}.gz").write_bytes(gzip.compress(header))
    return folder.parent


# ---------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------


def test_dataset_estimates_are_the_loaded_bytes(shared_data_root, tmp_path):
    x = np.arange(150 * 3 * 5, dtype=np.float32).reshape(150, 3, 5)
    y = np.arange(150) % 4
    np.savez(tmp_path / "split.npz", x=x, y=y)  # 20% held out for test at load time
    np.savez(tmp_path / "given.npz", x=x[:100], y=y[:100], x_test=x[100:], y_test=y[100:],
             class_names=np.array(["a", "b", "c", "d"]))
    cases = [("digits", {}), ("mnist", {"root": shared_data_root}),
             ("npz", {"path": tmp_path / "split.npz"}), ("npz", {"path": tmp_path / "given.npz"})]
    for name, options in cases:
        estimate = estimate_dataset(name, **options)
        assert estimate.total_bytes == loaded_bytes(load_dataset(name, **options)), name
    assert estimate_dataset("mnist", root=shared_data_root).total_bytes == MNIST_BYTES
    assert estimate_dataset("npz", path=tmp_path / "given.npz").n_classes == 4


def test_missing_files_leave_the_error_to_the_loader(tmp_path, no_cap):
    assert estimate_dataset("mnist", root=tmp_path) is None
    assert estimate_dataset("npz", path=tmp_path / "nope.npz") is None
    text = SCENARIO.replace("ROOT", str(tmp_path))
    with pytest.raises(ConfigError, match="MNIST not found") as info:
        run_scenario(parse_scenario(text, source="s.yaml"), None)
    assert not isinstance(info.value, ResourceError)


# ---------------------------------------------------------------------------
# the limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "nbytes"), [("20MiB", 20 * 2**20), ("1.5 GB", 3 * 2**29),
                                              ("4096", 4096)])
def test_the_env_cap_reads_sizes_as_budgets_do(text, nbytes):
    assert env_limit({MEMORY_ENV: text}) == MemoryLimit(nbytes, f"${MEMORY_ENV}={text}")
    assert env_limit({}) is None and env_limit({MEMORY_ENV: "  "}) is None


@pytest.mark.parametrize(("text", "fragment"), [
    ("20 parsecs", "unknown unit 'parsecs'"),
    ("500 exemplars", "a positive size in bytes"),
    ("model", "a positive size in bytes"),
    ("0", "a positive size in bytes"),
])
def test_a_bad_env_cap_is_a_config_error_naming_the_variable(text, fragment):
    with pytest.raises(ConfigError) as info:
        env_limit({MEMORY_ENV: text})
    assert str(info.value).startswith(f"${MEMORY_ENV}: expected ") and fragment in str(info.value)


def test_the_env_cap_covers_the_whole_process(tmp_path):
    """The cap bounds the process, so its room is the cap less the resident memory
    already held (a 200 MB cap once let a 516 MiB run through: the interpreter and torch
    were not counted)."""
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmSize:\t 900000 kB\nVmRSS:\t  300000 kB\n")
    assert resident_bytes(status) == 300000 * 1024
    room = env_room({MEMORY_ENV: "1GiB"}, status)
    assert room.bytes == 2**30 - 300000 * 1024
    assert room.source == (f"${MEMORY_ENV}=1GiB less the 292.97 MB this process already holds "
                           "(the interpreter, torch, loaded modules)")
    assert env_room({MEMORY_ENV: "200MB"}, status).bytes == 0  # less than is held: no room
    assert env_room({}, status) is None
    status.write_text("Name:\tpython\n")  # no VmRSS: the cap as given
    assert env_room({MEMORY_ENV: "1GiB"}, status) == MemoryLimit(2**30, f"${MEMORY_ENV}=1GiB")


def test_the_tightest_limit_wins(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "1 KB")
    found = available_memory()
    assert found.bytes == 0 and found.source.startswith(f"${MEMORY_ENV}=1 KB less the ")
    monkeypatch.delenv(MEMORY_ENV)
    found = available_memory()
    assert found is not None and found.bytes <= meminfo_limit().bytes


def test_cgroup_v2_and_v1_room_is_limit_minus_usage(tmp_path):
    membership = tmp_path / "cgroup"
    for relative, limit, usage in (("app", "1000000", "250000"), ("free", "max", "5")):
        (tmp_path / "fs" / relative).mkdir(parents=True)
        (tmp_path / "fs" / relative / "memory.max").write_text(limit + "\n")
        (tmp_path / "fs" / relative / "memory.current").write_text(usage + "\n")
    membership.write_text("0::/app\n")
    assert [m.bytes for m in cgroup_limits(tmp_path / "fs", membership)] == [750000]
    membership.write_text("0::/free\n")  # 'max': no limit
    assert cgroup_limits(tmp_path / "fs", membership) == []
    v1 = tmp_path / "fs" / "memory" / "box"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2000000\n")
    (v1 / "memory.usage_in_bytes").write_text("500000\n")
    membership.write_text("5:cpu:/other\n4:memory:/box\n")
    (found,) = cgroup_limits(tmp_path / "fs", membership)
    assert found.bytes == 1500000 and "memory.limit_in_bytes minus memory.usage_in_bytes" in \
        found.source
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's 'unlimited'
    assert cgroup_limits(tmp_path / "fs", membership) == []


# ---------------------------------------------------------------------------
# the check, in the code paths of clsim run and clsim compare
# ---------------------------------------------------------------------------


def test_the_check_runs_before_the_data_is_read(headers_only_mnist, monkeypatch, tmp_path):
    """The files hold headers only: loading them would fail as truncated, so a memory
    error proves the check came first; without the cap, the loader's error is seen."""
    text = SCENARIO.replace("ROOT", str(headers_only_mnist))
    scenario = parse_scenario(text, source="s.yaml")
    monkeypatch.setenv(MEMORY_ENV, "20MiB")
    with pytest.raises(ResourceError) as info:
        run_scenario(scenario, tmp_path / "out")
    assert str(info.value).startswith("s.yaml:2: data.dataset: not enough memory for this run")
    assert str(info.value).endswith("a batch's activations come on top")
    assert not (tmp_path / "out").exists()
    monkeypatch.delenv(MEMORY_ENV)
    with pytest.raises(ConfigError, match="the file is truncated or damaged"):
        run_scenario(scenario, tmp_path / "out")


def test_clsim_compare_stops_before_any_cell(headers_only_mnist, monkeypatch, tmp_path):
    from clsim.compare import run_compare

    path = tmp_path / "g.yaml"
    path.write_text(SCENARIO.replace("ROOT", str(headers_only_mnist))
                    + "compare: {budgets: ['1MB'], seeds: [0]}\n", encoding="utf-8")
    monkeypatch.setenv(MEMORY_ENV, "20MiB")
    with pytest.raises(ResourceError, match=r"0 B is available \(\$CLSIM_MEMORY_LIMIT=20MiB less"):
        run_compare(path, tmp_path / "out", executor="inline")
    assert not (tmp_path / "out").exists()


def test_clsim_run_over_the_env_cap_fails_early_with_one_message(shared_data_root, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO.replace("ROOT", str(shared_data_root)), encoding="utf-8")
    proc = run_cli("run", str(path), "--out", str(tmp_path / "out"), "--no-progress",
                   env={MEMORY_ENV: "20MiB"})
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.splitlines()[-1]
    weights = (784 * 100 + 100 + 100 * 10 + 10) * 4
    held = re.search(r"less the (.+?) this process already holds", error).group(1)
    assert error == (
        f"clsim: error: {path}:2: data.dataset: not enough memory for this run: it needs about "
        f"{format_bytes(2 * MNIST_BYTES + 2 * weights)} (dataset 'mnist', 70000 samples of "
        f"1x28x28 at 1 byte a value with labels: {format_bytes(MNIST_BYTES)}; its copies in the "
        f"stream: {format_bytes(MNIST_BYTES)}; model 'mlp' with gradients and optimizer state: "
        f"{format_bytes(2 * weights)}; strategy state beyond the model (the largest budget): "
        f"0 B) but 0 B is available ($CLSIM_MEMORY_LIMIT=20MiB less the {held} this process "
        "already holds (the interpreter, torch, loaded modules)); stopped before loading "
        "the data: use a subset of the data (an npz file of fewer samples), a smaller model "
        "or smaller budgets, or raise $CLSIM_MEMORY_LIMIT. The estimate counts the data, the "
        "model with its training state and each strategy's budget; a strategy without a "
        "budget (joint) may keep more, and a batch's activations come on top"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # no results folder, no event of any experience


def test_an_address_space_limit_is_a_real_limit(shared_data_root, tmp_path):
    """``ulimit -v`` set to what the process has mapped plus 64 MiB: the 106 MB run is
    refused before loading, instead of dying inside the loader."""
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO.replace("ROOT", str(shared_data_root)), encoding="utf-8")
    wrapper = tmp_path / "limited.py"
    wrapper.write_text(textwrap.dedent("""\
        import resource, sys
        import clsim.cli, clsim.engine, clsim.runner, torch  # map what a run maps first
        mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                      if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 64 * 2**20, resource.RLIM_INFINITY))
        sys.exit(clsim.cli.main(sys.argv[1:]))
    """))
    env = {k: v for k, v in os.environ.items() if k != MEMORY_ENV}
    proc = subprocess.run([sys.executable, str(wrapper), "run", str(path), "--out",
                           str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.splitlines()[-1]
    assert error.startswith(f"clsim: error: {path}:2: data.dataset: not enough memory")
    assert "is available (the address-space limit (ulimit -v) minus what the process has " \
        "mapped)" in error
    assert not (tmp_path / "out").exists()


def test_an_absurd_model_is_refused_before_it_is_built(no_cap):
    """Widths of a million: about 8 TB of weights, measured on the meta device."""
    text = SCENARIO.replace("mnist, root: ROOT", "digits").replace("[100]", "[1000000, 1000000]")
    weights = (64 * 10**6 + 10**6 + 10**12 + 10**6 + 10**7 + 10) * 4
    with pytest.raises(ResourceError) as info:
        run_scenario(parse_scenario(text, source="s.yaml"), None)
    message = str(info.value)
    assert message.startswith("s.yaml:4: model: not enough memory for this run: it needs about ")
    assert f"model 'mlp' with gradients and optimizer state: {format_bytes(2 * weights)}" in \
        message
