"""One family of errors for everything a user can cause.

The CLI prints a :class:`ClsimError` as a one-paragraph message and exits non-zero;
anything else is a bug in clsim and keeps its traceback.
"""

from __future__ import annotations


class ClsimError(Exception):
    """Base of every error a user can cause (bad YAML, missing data, plugin faults)."""

    exit_code = 1


class ConfigError(ClsimError):
    """A scenario file, a CLI flag or a plugin option is not what clsim expects.

    The message starts with the file (and line when known) and the key path, so the
    user can go straight to the mistake.
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        key_path: str | None = None,
        line: int | None = None,
    ) -> None:
        self.source = source
        self.key_path = key_path
        self.line = line
        self.detail = message
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.source:
            where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.key_path:
            where = f"{where}: {self.key_path}" if where else self.key_path
        return f"{where}: {self.detail}" if where else self.detail


class DataError(ClsimError):
    """A dataset is missing or malformed: the message names the path and the files."""

    exit_code = 2


class PluginError(ClsimError):
    """A plugin cannot be found, loaded or registered (bad hook name or signature)."""

    exit_code = 2


class PluginRuntimeError(ClsimError):
    """A plugin raised inside a hook; names the plugin, the hook and the experience."""


class ResourceError(ConfigError):
    """The run would need more memory than the machine (or a set limit) allows; raised
    before the data is loaded, naming the estimate, what is available and how to fix it."""


class ResultsWriteError(ClsimError):
    """A results file or folder could not be written (disk full, a name the file system
    refuses): names it and the system's reason; what was written before is kept."""

    exit_code = 2


class BudgetExceededError(ClsimError):
    """A strict run held more bytes than its budget after an experience."""


class TrainingError(ClsimError):
    """Training diverged (a NaN or infinite loss) or could not proceed."""


class OptionError(ValueError):
    """An option value that does not fit (raised by builders and ``check`` methods).

    ``key`` is the option's name, or a dotted path below the section being checked
    (``"shots"``, ``"hierarchy.tree.animal"``), so the config layer can name the full
    key path. Being a ValueError, plain-Python callers can catch what they expect.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)
