"""Hostile files for the config area's cases (tests/bad_inputs/cases_config.yaml), written
into each case's tmp folder at test time: named pipes, devices, symlink loops, and
scenarios too big to commit (a 1 MB name, 100,000 hidden layers). A key over 1024
characters must be written as an explicit YAML key (``? key``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

SCENARIO = """\
name: NAME
seed: 0
data: {dataset: digits}
stream: {type: class_incremental, n_experiences: 5}
model: {name: mlp, hidden: HIDDEN}
training: {epochs: 1, batch_size: 64}
DESCRIPTION
strategies:
  STRATEGY: {plugins: [naive]}
"""


def _scenario(tmp: Path, file: str, **parts: str) -> None:
    """``tmp/file``: a valid scenario with some of its parts replaced."""
    values = {"NAME": "ok", "HIDDEN": "[32]", "DESCRIPTION": "", "STRATEGY": "naive", **parts}
    text = SCENARIO
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    (tmp / file).write_text(text, encoding="utf-8")


def _bomb(levels: int = 9) -> str:
    """Anchors t0..t8 of nine of the previous each: 9^9 values if expanded."""
    lines = ["t0: &t0 [0, 1, 2, 3, 4, 5, 6, 7, 8]"]
    lines += [f"t{i}: &t{i} [" + ", ".join([f"*t{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


SETUPS: dict[str, Callable[[Path], None]] = {
    "config_scenario_is_a_fifo": lambda tmp: os.mkfifo(tmp / "pipe.yaml"),
    "config_scenario_is_a_symlink_loop":
        lambda tmp: (tmp / "loop.yaml").symlink_to("loop.yaml"),
    "config_hierarchy_is_a_fifo": lambda tmp: os.mkfifo(tmp / "tree.yaml"),
    "config_hierarchy_is_dev_zero": lambda tmp: (tmp / "tree.yaml").symlink_to("/dev/zero"),
    "config_hierarchy_is_a_symlink_loop":
        lambda tmp: (tmp / "tree.yaml").symlink_to("tree.yaml"),
    "config_hierarchy_alias_bomb": lambda tmp: (tmp / "tree.yaml").write_text(
        "levels: [parity, digit]\n" + _bomb() + "tree: {even: *t8}\n", encoding="utf-8"),
    "config_hierarchy_long_node_name": lambda tmp: (tmp / "tree.yaml").write_text(
        "levels: [parity, digit]\ntree:\n  ? " + "e" * 100_000 + "\n  : [0, 2, 4, 6, 8]\n"
        "  odd: [1, 3, 5, 7, 9]\n", encoding="utf-8"),
    "config_megabyte_name": lambda tmp: _scenario(tmp, "long.yaml", NAME="n" * 1_000_000),
    "config_megabyte_strategy_name":
        lambda tmp: _scenario(tmp, "long.yaml", STRATEGY="? " + "s" * 1_000_000 + "\n  "),
    "config_megabyte_description":
        lambda tmp: _scenario(tmp, "long.yaml", DESCRIPTION="description: " + "d" * 1_000_000),
    "config_megabyte_unknown_key":
        lambda tmp: _scenario(tmp, "long.yaml", DESCRIPTION="? " + "k" * 1_000_000 + "\n: 1"),
    "config_hundred_thousand_layers":
        lambda tmp: _scenario(tmp, "long.yaml", HIDDEN="[" + ", ".join(["8"] * 100_000) + "]"),
}
