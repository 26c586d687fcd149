"""Values and exceptions shown in messages: bounded in length and in the work it takes.

A hostile input can put a 10 MB string, a 10^9-element shared list or an exception whose
``__str__`` raises into any message. Every message that quotes something a user or a
plugin gave goes through these helpers, so showing it costs the same whatever it is.
"""

from __future__ import annotations

import contextlib
import itertools
import reprlib
import traceback
from pathlib import Path
from typing import Any

from clsim.interrupts import is_contained


class _BoundedRepr(reprlib.Repr):
    """reprlib with small limits: the work done for a message does not grow with the value
    (a string is cut before it is quoted; lists, mappings and nesting show a few items)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 6
        self.maxdict = 4
        self.maxstring = self.maxother = 50
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 1000:  # repr() of a huge int is slow, or refused by Python
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    repr_bytearray = repr_bytes

    def repr_dict(self, x: dict, level: int) -> str:
        """The first items in the user's order (reprlib would sort every key first)."""
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in itertools.islice(x.items(), self.maxdict)]
        return "{" + ", ".join(items + (["..."] if len(x) > self.maxdict else [])) + "}"


_REPR = _BoundedRepr()


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters so a pasted blob does not flood the message;
    bounded work whatever the value (a huge string, list or nested structure)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose own __repr__ fails is still shown
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bounded_message(message: str, limit: int = 1500) -> str:
    """A message cut in the middle when a quoted value made it longer than ``limit``."""
    if len(message) <= limit:
        return message
    keep = limit // 2
    return f"{message[:keep]} [... {len(message) - 2 * keep} characters cut ...] " \
        f"{message[-keep:]}"


def bounded_str(value: object, limit: int = 300) -> str:
    """``str(value)`` cut in the middle when longer than ``limit``; one line."""
    try:
        text = " ".join(str(value).split())
    except BaseException as exc:  # an exception whose __str__ raises
        if not is_contained(exc):
            raise
        text = f"<unprintable: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2:]


def describe_fault(exc: BaseException) -> str:
    """``Type: message`` for an exception a plugin raised, bounded in length; a
    BaseException that is not an Exception says what a plugin should raise instead."""
    if isinstance(exc, SystemExit):
        return (f"SystemExit({bounded_str(repr(exc.code))}): a plugin may not exit the program; "
                "raise an exception instead")
    message = bounded_str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return f"{text} (raised by the plugin, not by Ctrl-C); raise an exception instead"
    if not isinstance(exc, Exception):
        return f"{text} (a BaseException); a plugin must raise an Exception"
    return text


def format_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` as Python prints it, for events.jsonl, summary.json and
    ``--debug``; even when its ``__str__`` raises a BaseException (which the traceback
    module does not catch)."""
    try:
        return "".join(traceback.format_exception(exc))
    except BaseException as failure:
        if not is_contained(failure):
            raise
        return f"{type(exc).__name__} (its traceback could not be formatted: " \
               f"{type(failure).__name__})"


def shown_path(path: str | Path, limit: int = 200) -> str:
    """A path quoted, cut in the middle when it is very long."""
    return repr(_cut_path(str(path), limit))


def source_line(path: str | Path, line: int, limit: int = 200) -> str:
    """``path:line`` as editors and terminals open it (the form of a scenario error's
    ``file:line``): relative to the working folder when inside it, cut like
    :func:`shown_path`."""
    shown = Path(path)
    with contextlib.suppress(OSError, ValueError):  # no working folder, another drive
        shown = shown.relative_to(Path.cwd())
    return f"{_cut_path(str(shown), limit)}:{line}"


def _cut_path(shown: str, limit: int) -> str:
    if len(shown) > limit:
        shown = shown[: limit // 2] + "..." + shown[-limit // 2 :]
    return shown
