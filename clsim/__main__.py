"""``python -m clsim``: the ``clsim`` command, for environments without its script on PATH."""

import sys

from clsim.cli import main

sys.exit(main())
