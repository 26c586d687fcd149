"""An environment without avalanche-lib (the main one, by design): a scenario naming one
of Avalanche's classic benchmarks stops at its key with the way to get avalanche-lib.

Collected in both environments: avalanche's absence is simulated in a fresh interpreter
(the main environment lacks it anyway), so the check holds wherever the suite runs.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import REPO_ROOT

SCENARIO = REPO_ROOT / "scenarios" / "extra" / "avalanche_split_mnist.yaml"


def test_a_classic_benchmark_without_avalanche_names_the_key_and_the_install() -> None:
    """`clsim validate` on the shipped SplitMNIST scenario: exit 2, no traceback, the
    file and line of stream.benchmark, and `make venv-avalanche`; neither avalanche nor
    torchvision was imported on the way."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["avalanche"] = None  # import avalanche -> ImportError
        from clsim.cli import main
        status = main(["validate", {str(SCENARIO)!r}])
        print("torchvision" in sys.modules)
        sys.exit(status)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = next(i for i, text in enumerate(SCENARIO.read_text().splitlines(), 1)
                if text.strip().startswith("benchmark:"))
    assert f"{SCENARIO}:{line}: stream.benchmark: avalanche-lib is not installed" \
        in out.stderr, out.stderr
    assert "make venv-avalanche" in out.stderr
    assert out.stdout.strip() == "False"
