"""The clsim package has no import circle: a module's imports (at the top or deferred
into a function) never lead back to it. A circle works only while every import in it
stays deferred, and it hides which of two modules is the lower layer; this test names
the modules of any new one. Imports under ``if TYPE_CHECKING:`` are for type checkers
only and are not counted, nor is a module's import of its own parent package (Python has
already started initialising it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "clsim"


def module_files(package_root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``package_root``."""
    modules = {}
    for path in sorted(package_root.rglob("*.py")):
        parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(module: str, path: Path) -> set[str]:
    """Every absolute dotted name ``module`` imports, at any depth of its code."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the module sits in
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (each with the packages above it, which
    Python initialises first), less its own parent packages."""
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            edges.update(prefix for i in range(1, len(parts) + 1)
                         if (prefix := ".".join(parts[:i])) in modules)
        own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = edges - own_parents - {module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_clsim_has_no_import_circle():
    modules = module_files(PACKAGE_ROOT)
    assert {"clsim.config", "clsim.streams.avalanche", "clsim.engine"} <= set(modules)
    assert import_cycles(import_graph(modules)) == []


def test_config_sits_above_the_stream_types():
    """The circle this test was written for: config reads the stream types' options, so
    no stream module may import config (not even in a function)."""
    graph = import_graph(module_files(PACKAGE_ROOT))
    assert "clsim.streams" in graph["clsim.config"]
    streams = [m for m in graph if m == "clsim.streams" or m.startswith("clsim.streams.")]
    assert [m for m in streams if "clsim.config" in graph[m]] == []


def test_the_check_finds_a_deferred_circle_and_ignores_type_only_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.leaf import X\n")
    (package / "sub" / "leaf.py").write_text(  # a submodule importing its own package: fine
        "from pkg.sub import helper\nX = 1\n"
        "def load():\n    try:\n        from pkg.top import Y\n    except ImportError:\n"
        "        raise\n    return Y\n")
    (package / "sub" / "helper.py").write_text("")
    (package / "top.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .sub import X\nY = X\n"
        "if TYPE_CHECKING:\n    from pkg.other import Z\n")
    (package / "other.py").write_text("from pkg.top import Y\nZ = Y\n")
    graph = import_graph(module_files(package))
    assert graph["pkg.top"] == {"pkg.sub"}  # not pkg.other: a type-only import
    assert graph["pkg.sub.leaf"] == {"pkg.sub.helper", "pkg.top"}
    assert import_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.top"]]
