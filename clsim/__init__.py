"""clsim: a plugin-based continual-learning simulator with a measured memory budget."""

from clsim.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
