"""The upper bounds of what a scenario key or a command-line flag accepts.

Kept apart from :mod:`clsim.config` (which imports torch through the models) so that the
command line can check its flags against the same numbers without loading torch.
"""

from __future__ import annotations

MAX_NAME = 200
"""Characters in a scenario or strategy name: with a time stamp it stays a valid
file name (255 bytes), and it fits a table or a log line."""
MAX_DESCRIPTION = 4000
MAX_EPOCHS = 10_000
"""Passes over each experience: more is a slip (a day per experience), never a plan."""
MAX_PLUGIN_REF = 500
SEED_MAX = 2**63 - 1
"""The largest seed (the key ``seed``, each of ``compare.seeds``, and ``--seed``)."""
THREADS_MAX = 1024
"""Torch threads per run (the key ``threads``, and ``compare --threads``): more is a
slip, and asking torch for millions of threads crashes the process."""
WORKERS_MAX = 1024
"""Cells run at once (``compare --workers``): each is a process with torch loaded (a few
hundred MB), so more is a slip, never a plan; on a Ray cluster it is the local
cluster's CPU count."""
