"""Tell the user's Ctrl-C apart from a ``BaseException`` raised by a plugin.

Python raises ``KeyboardInterrupt`` both when the user presses Ctrl-C and when code
(a plugin, a library it calls) raises it itself. Only the first may stop clsim; the
second, like ``SystemExit`` or any other ``BaseException`` from a plugin, is that
plugin's fault and fails only its strategy. :func:`track_user_interrupts` makes sure every
SIGINT is recorded before it can raise, so :func:`is_contained` can decide:

* Python's own handler (``default_int_handler``): replaced by one that records the
  signal, then raises ``KeyboardInterrupt`` as Python's does.
* ``SIG_IGN`` (``nohup``, a background job of a script, a parent that ignores it; spawned
  workers inherit it) or ``SIG_DFL`` (the process dies at once): no SIGINT can ever raise,
  so the handler stays and every ``KeyboardInterrupt`` is a plugin's.
* A handler of a program that embeds clsim (calls ``clsim.cli.main``): wrapped, so a
  SIGINT is recorded and then handed to that handler unchanged (whatever it does: raise,
  set a flag). A ``KeyboardInterrupt`` that comes with no SIGINT is a plugin's.
* A handler not installed from Python (``getsignal`` gives None): left alone, and every
  ``KeyboardInterrupt`` counts as the user's, as when nothing tracks.

:func:`stop_tracking` puts back the handler found.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

_user_interrupted = threading.Event()
_tracking = threading.Event()
_previous_handler: list = []  # the SIGINT handler to restore when tracking stops
_installed: list = []  # the handler track_user_interrupts installed


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _user_interrupted.set()
    raise KeyboardInterrupt


def _recording(handler: Callable) -> Callable:
    """``handler`` (an embedding program's), called after the SIGINT is recorded."""

    def on_sigint(signum: int, frame: FrameType | None):
        _user_interrupted.set()
        return handler(signum, frame)

    return on_sigint


def track_user_interrupts() -> None:
    """Record every SIGINT from now on (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    if _installed and current is _installed[0]:  # already tracking
        _tracking.set()
        return
    if current in (signal.SIG_IGN, signal.SIG_DFL):  # no SIGINT can raise
        _tracking.set()
        return
    if current is None:  # set outside Python: cannot be wrapped
        return
    handler = _on_sigint if current is signal.default_int_handler else _recording(current)
    signal.signal(signal.SIGINT, handler)
    _previous_handler[:] = [current]
    _installed[:] = [handler]
    _tracking.set()


def stop_tracking() -> None:
    """Undo :func:`track_user_interrupts` (the end of ``clsim.cli.main``), so code that
    uses clsim as a library afterwards, in the same process, sees plain interrupts."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _installed and signal.getsignal(signal.SIGINT) is _installed[0]:
        signal.signal(signal.SIGINT, _previous_handler[0])
    _previous_handler.clear()
    _installed.clear()
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
