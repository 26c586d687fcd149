"""One root seed, split into independent, named streams of randomness.

Each component asks for its own generator by name (``"model"``, ``"batches"``,
``"plugin:replay"``), so adding a plugin or a random draw in one place never shifts
the numbers another component sees. Nothing here seeds a global generator.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(name: str | int) -> int:
    return name if isinstance(name, int) else zlib.crc32(name.encode("utf-8"))


def derive_seed(root: int, *names: str | int) -> int:
    """A 63-bit seed for the component ``names`` under ``root``; stable across runs."""
    sequence = np.random.SeedSequence([root & 0xFFFFFFFFFFFFFFFF, *map(_key, names)])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def torch_generator(
    root: int, *names: str | int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A torch generator seeded for the component ``names``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(root, *names))
    return generator


def numpy_generator(root: int, *names: str | int) -> np.random.Generator:
    """A numpy generator seeded for the component ``names``."""
    return np.random.default_rng(derive_seed(root, *names))
