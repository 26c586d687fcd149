"""Tell the user's Ctrl-C apart from a ``BaseException`` raised by a plugin.

Python raises ``KeyboardInterrupt`` both when the user presses Ctrl-C and when code
(a plugin, a library it calls) raises it itself. Only the first may stop clsim; the
second, like ``SystemExit`` or any other ``BaseException`` from a plugin, is that
plugin's fault and fails only its strategy. :func:`track_user_interrupts` installs a
SIGINT handler that records the signal before raising, so :func:`is_contained` can decide.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_user_interrupted = threading.Event()
_tracking = threading.Event()
_previous_handler: list = []  # the SIGINT handler to restore when tracking stops


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _user_interrupted.set()
    raise KeyboardInterrupt


def track_user_interrupts() -> None:
    """Record every SIGINT from now on (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    if current is signal.default_int_handler:
        _previous_handler[:] = [current]
        signal.signal(signal.SIGINT, _on_sigint)
    if signal.getsignal(signal.SIGINT) is _on_sigint:
        _tracking.set()


def stop_tracking() -> None:
    """Undo :func:`track_user_interrupts` (the end of ``clsim.cli.main``), so code that
    uses clsim as a library afterwards, in the same process, sees plain interrupts."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _previous_handler and signal.getsignal(signal.SIGINT) is _on_sigint:
        signal.signal(signal.SIGINT, _previous_handler.pop())
    _tracking.clear()
    _user_interrupted.clear()


def user_interrupted() -> bool:
    """Whether the user pressed Ctrl-C (or sent SIGINT): always assumed when nothing
    tracks the signal (clsim used as a library), so an interrupt is never swallowed."""
    return _user_interrupted.is_set() or not _tracking.is_set()


def is_contained(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault to contain (fail one strategy or cell) rather than a
    request to stop clsim: everything but the user's own interrupt."""
    return not (isinstance(exc, KeyboardInterrupt) and user_interrupted())
