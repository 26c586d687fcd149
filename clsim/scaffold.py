"""``clsim new-plugin``: write a small installable plugin package for a user to edit."""

from __future__ import annotations

import keyword
from importlib import resources
from pathlib import Path
from string import Template

from clsim.errors import ConfigError
from clsim.plugin_manager import registered_plugins, registration


def write_plugin_package(name: str, parent: Path) -> Path:
    """Write ``parent/clsim-NAME/`` (pyproject with the entry point, plugin, test).

    A name already registered in the entry-point group (a built-in such as ``replay``,
    or an installed package's) is refused: installing the package would make that name
    a clash, which every scenario naming it then fails on.
    """
    if not name.isidentifier() or keyword.iskeyword(name) or name != name.lower():
        raise ConfigError(
            f"plugin name must be a lower-case Python identifier such as "
            f"'my_strategy'; got {name!r}"
        )
    taken = registered_plugins().get(name)
    if taken:  # a second package of that name would make the scenarios naming it fail
        raise ConfigError(
            f"a plugin named {name!r} is already registered, by "
            f"{' and '.join(registration(ep) for ep in taken)}; a second package "
            f"registering {name!r} would make every scenario naming it ambiguous; choose "
            f"another name, e.g. 'my_{name}' ('clsim list' shows the registered names)"
        )
    target = parent / f"clsim-{name}"
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another name or --dir")
    values = {
        "name": name,
        "class_name": "".join(p.capitalize() for p in name.split("_")) + "Plugin",
    }
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        f"clsim_{name}/__init__.py": None,
        f"clsim_{name}/plugin.py": "plugin.py.tmpl",
        "tests/test_plugin.py": "test_plugin.py.tmpl",
    }
    templates = resources.files("clsim") / "templates"
    for relative, template in files.items():
        path = target / relative
        text = "" if template is None else Template((templates / template).read_text("utf-8"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                text if isinstance(text, str) else text.substitute(values), encoding="utf-8"
            )
        except OSError as exc:
            raise ConfigError(f"--dir {parent}: cannot write {path}: {exc.strerror}") from None
    return target
