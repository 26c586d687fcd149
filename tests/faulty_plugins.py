"""Plugins that fail on purpose, for tests/test_plugin_faults.py.

One class per hook of :mod:`clsim.hookspecs`, generated from the spec module so that a
hook added there gets its faulty plugin (and its test) without anyone writing it:
``FaultInAfterBatch`` raises RuntimeError("fault in clsim_after_batch") from that hook.
The module lives beside the tests (not in a test file) so worker processes of
``clsim compare`` can import it by its dotted path.
"""

from __future__ import annotations

import sys

from clsim.plugin_manager import HOOK_NAMES


def class_name(hook: str) -> str:
    """'clsim_after_batch' -> 'FaultInAfterBatch'."""
    return "FaultIn" + "".join(part.title() for part in hook.removeprefix("clsim_").split("_"))


def _raiser(hook: str):
    def method(self) -> None:  # takes no hook argument: any subset of a spec's is allowed
        raise RuntimeError(f"fault in {hook}")

    method.__name__ = method.__qualname__ = hook
    return method


for _hook in HOOK_NAMES:
    _name = class_name(_hook)
    globals()[_name] = type(_name, (), {
        _hook: _raiser(_hook),
        "__module__": __name__,
        "__doc__": f"Raises RuntimeError in {_hook}.",
    })
del _hook, _name


class ExitsInAfterBatch:
    """Calls sys.exit(3) in the middle of training: blamed on the plugin, not obeyed."""

    def clsim_after_batch(self) -> None:
        sys.exit(3)


class InterruptsInAfterBatch:
    """Raises KeyboardInterrupt, as Ctrl-C would: it must still stop the program, after
    the plugin's teardown has run."""

    teardowns = 0

    def clsim_after_batch(self) -> None:
        raise KeyboardInterrupt

    def clsim_teardown(self) -> None:
        type(self).teardowns += 1
