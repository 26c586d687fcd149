"""Find, load, register and call strategy plugins.

A plugin is a class. It is found by name through the entry-point group
``clsim.plugins`` (built-ins use the same door as third-party packages) or by a dotted
path ``package.module:ClassName``. Its options are a dataclass named by the class
attribute ``Options``; the constructor receives one instance of it. Registration fails
fast: every ``clsim_*`` method must match a spec in :mod:`clsim.hookspecs` by name and
arguments, so a misspelt hook is an error at start-up rather than a hook that never fires.

A name is one plugin: when two installed distributions register the same name with
different targets, a scenario naming it is refused (naming both distributions and both
``module:Class`` targets) rather than silently getting whichever was found first; the
dotted path of either still works. ``clsim list`` marks such a name, and ``clsim
new-plugin`` refuses to write a package under a name already registered.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import importlib.metadata
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pluggy

from clsim import hookspecs
from clsim.errors import ClsimError, PluginError, PluginRuntimeError
from clsim.interrupts import is_contained
from clsim.text import bounded_str, describe_fault, format_traceback, source_line
from clsim.validation import closest

if TYPE_CHECKING:
    from clsim.config import PluginSpec

ENTRY_POINT_GROUP = "clsim.plugins"
HOOK_NAMES = tuple(n for n in dir(hookspecs) if n.startswith("clsim_"))


def available_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Plugin name -> entry point, for every installed distribution that declares one
    (the first found of a name that several register: :func:`registered_plugins` has
    them all, and :func:`load_plugin_class` refuses such a name)."""
    return {name: eps[0] for name, eps in registered_plugins().items()}


def registered_plugins() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Plugin name -> its registrations, one per distinct target: more than one is a
    clash (two packages claiming one name). A distribution found twice on the path is
    one registration (importlib.metadata keeps the first of each name), and two
    distributions naming the same ``module:Class`` are no clash."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        same_name = found.setdefault(ep.name, [])
        if all(other.value != ep.value for other in same_name):
            same_name.append(ep)
    return dict(sorted(found.items()))


def clash_message(name: str, registrations: list[importlib.metadata.EntryPoint]) -> str:
    """Why ``name`` cannot be used as it is: every distribution and target registering
    it, and how to name the one meant."""
    claims = [registration(ep) for ep in registrations]
    listed = ", ".join(claims[:-1]) + f" and {claims[-1]}"
    return (
        f"plugin name {name!r} is registered by {len(claims)} installed distributions: "
        f"{listed}; name the one you mean by its dotted path module:Class in the scenario "
        f"(e.g. '- {registrations[0].value}: {{...}}' instead of '- {name}: {{...}}'), or "
        "uninstall the one you do not mean"
    )


def registration(ep: importlib.metadata.EntryPoint) -> str:
    """``distribution (module:Class)``: who registers a plugin name, and as what."""
    dist = getattr(ep, "dist", None)
    return f"{dist.name if dist is not None else 'an unnamed distribution'} ({ep.value})"


def load_plugin_class(ref: str) -> type:
    """A registered plugin name, or ``package.module:ClassName``, -> the plugin class.

    Whatever the plugin's module does while importing (raise, ``sys.exit()``, raise a
    ``KeyboardInterrupt`` of its own) is reported as that plugin's fault; the class is
    checked (a class, ``Options`` a dataclass, and, by dotted path, at least one hook)
    so a wrong name fails here rather than running as plain fine-tuning.
    """
    if ":" in ref:
        target = _import_attribute(ref)
        if not inspect.isclass(target):
            raise PluginError(f"plugin {ref!r} must be a class; got {type(target).__name__}")
        _require_a_hook(target, ref)
    else:
        target = _load_entry_point(ref)
        if not inspect.isclass(target):
            raise PluginError(f"plugin {ref!r} must be a class; got {type(target).__name__}")
    options_class(target, ref)
    return target


@contextlib.contextmanager
def plugin_code(fault: str, plugin_class: type | None = None) -> Iterator[None]:
    """Run code a plugin's author wrote (its module, class, constructor): whatever it
    raises, a BaseException too, is a PluginError starting with ``fault`` (and ending
    with the line of ``plugin_class``'s file that raised it, when given); a ClsimError
    passes as it is, and so does the user's own Ctrl-C."""
    try:
        yield
    except ClsimError:
        raise
    except BaseException as exc:
        if not is_contained(exc):
            raise
        _keep_traceback(exc)
        raise PluginError(f"{fault}{_located(exc, plugin_class)}") from exc


# the tracebacks of plugin faults raised while a run_strategy call is recorded
_tracebacks: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "clsim_plugin_tracebacks", default=None)


@contextlib.contextmanager
def recorded_tracebacks() -> Iterator[list[str]]:
    """Collect the traceback of every plugin fault raised inside the block (a hook or a
    constructor that raised). A failed strategy's error is one line; the runner keeps
    these beside it (events.jsonl, summary.json, ``--debug``), so the author can see
    every frame of their code without clsim printing a traceback by default."""
    found: list[str] = []
    token = _tracebacks.set(found)
    try:
        yield found
    finally:
        _tracebacks.reset(token)


def joined_tracebacks(tracebacks: list[str]) -> str:
    """The tracebacks recorded for one failed strategy or cell, as one text (a fault in
    clsim_setup, then one in clsim_teardown, are both kept)."""
    return "\n".join(tracebacks)


def _keep_traceback(exc: BaseException) -> None:
    found = _tracebacks.get()
    if found is not None:
        found.append(format_traceback(exc))


def fault_location(exc: BaseException, plugin_class: type) -> str | None:
    """``file:line`` of the innermost frame of ``exc``'s traceback in the source file of
    ``plugin_class`` (or of a class it inherits from), or None: where the author's own
    code failed, even when the exception came from deeper (torch, a dict lookup)."""
    files = set()
    for cls in getattr(plugin_class, "__mro__", ()):
        module = sys.modules.get(getattr(cls, "__module__", None) or "")
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            files.add(os.path.normcase(os.path.abspath(path)))
    found = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename
        if os.path.normcase(os.path.abspath(path)) in files:
            found = source_line(path, line)
    return found


def _located(exc: BaseException, plugin_class: type | None) -> str:
    """``Type: message (file.py:42)``: the fault, with where the plugin raised it."""
    where = None if plugin_class is None else fault_location(exc, plugin_class)
    return describe_fault(exc) + (f" ({where})" if where else "")


def _import_attribute(ref: str) -> Any:
    """``package.module:Name.attr`` -> that object, every fault named with ``ref``."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError, TypeError) as exc:  # also ':X' and '.relative:X'
        raise PluginError(
            f"cannot import module {module_name!r} for plugin {ref!r}: {bounded_str(exc)}"
        ) from None
    except BaseException as exc:  # the plugin's own module failed while importing
        if not is_contained(exc):
            raise
        raise PluginError(
            f"importing module {module_name!r} for plugin {ref!r} raised "
            f"{describe_fault(exc)}"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        # a module __getattr__ or a descriptor may raise
        with plugin_code(f"reading {attr!r} of module {module_name!r} for plugin {ref!r} "
                         "raised "):
            found = hasattr(target, part)
            target = getattr(target, part) if found else None
        if not found:
            raise PluginError(
                f"module {module_name!r} has no attribute {attr!r} (plugin {ref!r})"
            )
    return target


def _load_entry_point(ref: str) -> Any:
    """The object a registered plugin's entry point names; a package that fails to load
    (its import raises or exits) is named with the entry point's value."""
    registry = registered_plugins()
    if ref not in registry:
        hint = closest(ref, registry)
        known = ", ".join(registry) or "none installed"
        raise PluginError(
            f"unknown plugin {ref!r} (registered: {known})"
            + (f"; did you mean {hint!r}?" if hint else "")
            + "; a plugin outside clsim is named as 'package.module:ClassName'"
        )
    if len(registry[ref]) > 1:
        raise PluginError(clash_message(ref, registry[ref]))
    entry_point = registry[ref][0]
    with plugin_code(f"plugin {ref!r} failed to load ({entry_point.value}): "):
        return entry_point.load()  # a broken third-party package must not crash clsim


def _require_a_hook(cls: type, ref: str) -> None:
    """Refuse a class without any ``clsim_*`` method: named by a dotted path, it is
    almost certainly the wrong class (``collections:OrderedDict``), and would run as
    plain fine-tuning without a word. (Registered plugins are declared as plugins by
    their package; the built-in ``naive`` is one on purpose.)"""
    # a metaclass's __dir__ may raise
    with plugin_code(f"plugin {ref!r}: listing the attributes of its class raised "):
        names = [name for name in dir(cls) if name.startswith("clsim_")]
    if not names:
        raise PluginError(
            f"plugin {_named(ref, cls)} implements no clsim hook; a plugin must "
            "define at least one method named after a hook of clsim/hookspecs.py (e.g. "
            "clsim_before_experience, clsim_loss, clsim_after_batch); for plain "
            "fine-tuning use the plugin 'naive'"
        )


def create_plugin(spec: PluginSpec) -> object:
    """An instance of a strategy's plugin from its YAML entry (class and validated
    options); a constructor that raises, or exits, is reported as the plugin's fault."""
    with plugin_code(f"plugin {spec.name!r} ({spec.ref}) could not be created: ", spec.cls):
        return spec.cls() if spec.options is None else spec.cls(spec.options)


def options_class(plugin_class: type, ref: str | None = None) -> type | None:
    """The dataclass of options a plugin declares, or None for a plugin without options.

    ``Options`` that is not a dataclass (a dict, a plain class, an instance) is the
    plugin author's mistake, named here rather than failing deep inside the config layer.
    """
    # a class property may raise
    with plugin_code(f"plugin {_named(ref, plugin_class)}: reading its Options raised "):
        declared = getattr(plugin_class, "Options", None)
    if declared is None or (inspect.isclass(declared) and dataclasses.is_dataclass(declared)):
        return declared
    got = (f"the class {declared.__qualname__}, which is not a dataclass"
           if inspect.isclass(declared) else f"a {type(declared).__name__} instance")
    raise PluginError(
        f"plugin {_named(ref, plugin_class)} declares "
        f"Options as {bounded_str(got)}; Options must be a dataclass class (decorated with "
        "@dataclasses.dataclass, one field per option) or absent for a plugin without options"
    )


def _named(ref: str | None, cls: type) -> str:
    """``'ref' (module:Class)``, or just the quoted class path when ``ref`` is that."""
    path = _qualified(cls)
    return repr(path) if ref in (None, path) else f"{ref!r} ({path})"


def _qualified(cls: type) -> str:
    return f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', '?')}"


def blame(exc: BaseException, plugins: list[tuple[str, object]]) -> str | None:
    """The name of the plugin whose module holds the innermost frame of ``exc``'s
    traceback, or None: attributes a fault raised outside a hook call (a torch hook)."""
    modules = {type(plugin).__module__: name for name, plugin in plugins}
    culprit = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        culprit = modules.get(frame.f_globals.get("__name__"), culprit)
    return culprit


class ClsimPluginManager(pluggy.PluginManager):
    """A pluggy manager that treats every ``clsim_*`` method as a hook implementation.

    As pytest does for ``pytest_*``: the ``@hookimpl`` decorator is needed only for
    options (tryfirst, trylast, wrapper); a misspelt ``clsim_`` name is caught by
    :meth:`check_pending` instead of silently never firing.
    """

    def parse_hookimpl_opts(self, plugin: object, name: str):  # type: ignore[override]
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("clsim_") and inspect.isroutine(getattr(plugin, name)):
            opts = {
                "wrapper": False,
                "hookwrapper": False,
                "optionalhook": False,
                "tryfirst": False,
                "trylast": False,
                "specname": None,
            }
        return opts


def build_plugin_manager(plugins: list[tuple[str, object]]) -> ClsimPluginManager:
    """Register ``(name, plugin)`` pairs so that the first listed is called first."""
    pm = ClsimPluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name, plugin in reversed(plugins):  # pluggy calls the last registered first
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin {name!r} ({_class_path(plugin)}) is invalid: {exc}"
            ) from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(_unknown_hook_message(pm, exc)) from None
    return pm


def _class_path(plugin: object) -> str:
    cls = type(plugin)
    return f"{cls.__module__}:{cls.__qualname__}"


def _unknown_hook_message(pm: ClsimPluginManager, exc: pluggy.PluginValidationError) -> str:
    name = pm.get_name(exc.plugin) or _class_path(exc.plugin)
    for hook_name in dir(pm.hook):
        caller = getattr(pm.hook, hook_name)
        if hook_name.startswith("clsim_") and not caller.has_spec():
            hint = closest(hook_name, HOOK_NAMES)
            return (
                f"plugin {name!r} ({_class_path(exc.plugin)}) defines {hook_name!r}, which is not "
                "a clsim hook"
                + (f"; did you mean {hint!r}?" if hint else "")
                + " (hooks are listed in clsim/hookspecs.py)"
            )
    return f"plugin {name!r}: {exc}"


class HookRunner:
    """Calls hooks in plugin order and names the plugin, hook and experience of any fault.

    pluggy registers and validates the implementations and sorts them (YAML order,
    tryfirst, trylast); the calls are made here, one implementation at a time, so that an
    exception or a malformed return value is always attributed to the exact plugin
    instance. ``sys.exit()``, a ``KeyboardInterrupt`` the plugin raises itself and any
    other ``BaseException`` are such faults too (a plugin cannot end clsim); only the
    user's own Ctrl-C (:mod:`clsim.interrupts`) passes through. Hook wrappers are not
    part of clsim's contract and are refused.
    """

    def __init__(self, pm: ClsimPluginManager, where: Callable[[], str] = lambda: "") -> None:
        self.pm = pm
        self.where = where
        self.meter: Any = None  # the compute meter: a hook's FLOPs go to <plugin>.<hook>
        self._impls = {  # in call order: pluggy keeps the list last-called-first
            name: list(reversed(getattr(pm.hook, name).get_hookimpls())) for name in HOOK_NAMES
        }
        for hook, impls in self._impls.items():
            for impl in impls:
                if impl.hookwrapper or impl.wrapper:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} declares {hook} as a wrapper; clsim hooks "
                        "take plain implementations (order them with tryfirst / trylast)"
                    )
        self.check_composition()

    def check_composition(self) -> None:
        """Refuse, at start-up, a strategy whose plugins cannot all run: two plugins that
        each own the training of an experience, or an owner beside a plugin whose
        standard-loop hooks (:data:`clsim.hookspecs.LOOP_HOOKS`) would then never fire."""
        owners = self.order("clsim_train_experience")
        if len(owners) > 1:
            raise PluginError(
                f"plugins {owners[0]!r} and {owners[1]!r} both own the training of an "
                "experience (clsim_train_experience); a strategy can hold one such plugin"
            )
        if not owners:
            return
        owner = owners[0]
        silenced: dict[str, list[str]] = {}
        for hook in hookspecs.LOOP_HOOKS:
            for name in self.order(hook):
                if name != owner:
                    silenced.setdefault(name, []).append(hook)
        if silenced:
            name, hooks = next(iter(silenced.items()))
            raise PluginError(
                f"plugin {owner!r} owns the training of an experience "
                f"(clsim_train_experience), so the standard loop's hooks of plugin {name!r} "
                f"({', '.join(hooks)}) would never fire; put them in separate strategies"
            )

    def implemented(self, hook: str) -> bool:
        return bool(self._impls[hook])

    def order(self, hook: str) -> list[str]:
        """Plugin names in the order they are called for ``hook``."""
        return [impl.plugin_name for impl in self._impls[hook]]

    def call(self, hook: str, **kwargs: Any) -> None:
        """Call every implementation; results are ignored."""
        for impl in self._impls[hook]:
            self._invoke(hook, impl, kwargs)

    def collect(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """``(plugin name, result)`` of every implementation that returned something."""
        results = []
        for impl in self._impls[hook]:
            result = self._invoke(hook, impl, kwargs)
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    def first(self, hook: str, **kwargs: Any) -> tuple[str | None, Any]:
        """``(plugin name, result)`` of the first implementation returning non-None."""
        for impl in self._impls[hook]:
            result = self._invoke(hook, impl, kwargs)
            if result is not None:
                return impl.plugin_name, result
        return None, None

    def chain(self, hook: str, key: str, value: Any, expect: type | None = None,
              **kwargs: Any) -> Any:
        """Pass ``value`` through each implementation in order; a non-None result replaces
        it, and must be an instance of ``expect`` when given."""
        for impl in self._impls[hook]:
            result = self._invoke(hook, impl, {**kwargs, key: value})
            if result is None:
                continue
            if expect is not None and not isinstance(result, expect):
                raise self.fault(impl.plugin_name, hook, f"returned a {type(result).__name__}; "
                                 f"expected a {expect.__name__} or None")
            value = result
        return value

    def fault(self, plugin: str, hook: str, detail: str, exit_code: int | None = None
              ) -> PluginRuntimeError:
        """The error for plugin ``plugin`` misbehaving in ``hook``, with where it happened."""
        where = self.where()
        context = f" ({where})" if where else ""
        error = PluginRuntimeError(f"plugin {plugin!r} failed in {hook}{context}: {detail}")
        error.exit_code = exit_code or PluginRuntimeError.exit_code
        error.plugin_name = plugin
        error.hook = hook
        return error

    def _invoke(self, hook: str, impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> Any:
        try:
            if self.meter is not None and not self.meter.idle:
                with self.meter.hook(impl.plugin_name, hook):
                    return impl.function(*[kwargs[name] for name in impl.argnames])
            return impl.function(*[kwargs[name] for name in impl.argnames])
        except ClsimError as exc:  # a message the plugin wrote for the user: as it is
            if not isinstance(exc, PluginRuntimeError):  # (a nested hook kept its own)
                _keep_traceback(exc)
            raise self.fault(impl.plugin_name, hook, str(exc), exc.exit_code) from exc
        except BaseException as exc:  # sys.exit(), a plugin's own KeyboardInterrupt, ... end
            if not is_contained(exc):  # its strategy, not clsim; the user's Ctrl-C does
                raise
            _keep_traceback(exc)
            raise self.fault(impl.plugin_name, hook, _located(exc, type(impl.plugin))) \
                from exc
