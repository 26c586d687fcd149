"""Plugins that fail on purpose, for tests/test_plugin_faults.py.

One class per hook of :mod:`clsim.hookspecs`, generated from the spec module so that a
hook added there gets its faulty plugin (and its test) without anyone writing it:
``FaultInAfterBatch`` raises RuntimeError("fault in clsim_after_batch") from that hook.
The module lives beside the tests (not in a test file) so worker processes of
``clsim compare`` can import it by its dotted path.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

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


class SignalsInAfterBatch:
    """Sends a real SIGINT to its own process, as the user's Ctrl-C does: clsim must stop
    (exit 130) after the plugin's teardown, which appends a line to $CLSIM_TEST_TEARDOWNS."""

    def clsim_after_batch(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    def clsim_teardown(self) -> None:
        with open(os.environ["CLSIM_TEST_TEARDOWNS"], "a", encoding="utf-8") as file:
            file.write("teardown\n")


class Boom(BaseException):
    """A BaseException of a plugin's own (not an Exception)."""


# what a plugin may raise that is not an Exception, by a short name used in test ids
BASE_EXCEPTIONS = {
    "SystemExit": lambda: SystemExit(0),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "Boom": lambda: Boom("boom"),
}


def _base_raiser(kind: str):
    def method(self, *args) -> None:
        raise BASE_EXCEPTIONS[kind]()

    return method


for _kind in BASE_EXCEPTIONS:  # RaisesSystemExitInAfterBatch, RaisesBoomInInit, ...
    globals()[f"Raises{_kind}InAfterBatch"] = type(f"Raises{_kind}InAfterBatch", (), {
        "clsim_after_batch": _base_raiser(_kind), "__module__": __name__,
        "__doc__": f"Raises {_kind} in clsim_after_batch."})
    globals()[f"Raises{_kind}InInit"] = type(f"Raises{_kind}InInit", (), {
        "__init__": _base_raiser(_kind), "clsim_setup": lambda self: None,
        "__module__": __name__, "__doc__": f"Raises {_kind} in its constructor."})
del _kind


class BoomInForwardHook:
    """Installs a torch forward hook on the model that raises a BaseException: the hook
    runs outside clsim's hook calls, so only the engine's containment can catch it."""

    def clsim_setup(self, ctx) -> None:
        ctx.model.register_forward_hook(self._on_forward)

    def _on_forward(self, module, inputs, output) -> None:
        raise Boom("in a forward hook")


class OptionsIsADict:
    """Declares its options as a dict instead of a dataclass."""

    Options = {"lr": 0.1}

    def clsim_setup(self) -> None:
        pass


class OptionsIsAPlainClass:
    """Declares its options as a plain class (the @dataclass decorator forgotten)."""

    class Options:
        lr: float = 0.1

    def clsim_setup(self) -> None:
        pass


@dataclasses.dataclass
class _SomeOptions:
    lr: float = 0.1


class OptionsIsAnInstance:
    """Declares its options as an instance of a dataclass, not the dataclass."""

    Options = _SomeOptions()

    def clsim_setup(self) -> None:
        pass


class NoHooks:
    """Has methods, but none is a clsim hook: would run as plain fine-tuning."""

    def setup(self) -> None:
        pass

    def after_batch(self) -> None:
        pass


class SlowCell:
    """Marks its cell as running (a file named after its process in $CLSIM_TEST_RUNNING)
    and then trains slowly, so a test can kill clsim while cells are in flight."""

    def clsim_setup(self) -> None:
        folder = os.environ["CLSIM_TEST_RUNNING"]
        with open(os.path.join(folder, str(os.getpid())), "w", encoding="utf-8"):
            pass

    def clsim_after_batch(self) -> None:
        time.sleep(0.5)
