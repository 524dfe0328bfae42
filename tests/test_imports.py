"""The package's import structure: the core loads no adapter, and no module imports itself in a circle.

Both read the source (ast) or a fresh interpreter, not the running test process, whose sys.modules holds
whatever earlier tests imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_runtime"
ABOVE_THE_CORE = ("moe_runtime.arch", "moe_runtime.bench", "moe_runtime.sim", "moe_runtime.loading")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The package modules `name` imports anywhere in its file (functions included), by full name."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(filter(None, (base, node.module)))
            submodules = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules or {target})
    return {module for module in found if module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module -> modules it imports) as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            cycle = visit(target, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_the_package_has_no_import_circle():
    graph = {name: imported_modules(name) - {name} for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_resolve_to_package_modules():
    assert {"moe_runtime.quant", "moe_runtime.kernels.cpu"} <= imported_modules("moe_runtime.kernels.forms")
    assert "moe_runtime.store" in imported_modules("moe_runtime.store.build")


def test_the_core_never_imports_the_adapters():
    core = [name for name in MODULES if name != "moe_runtime" and not name.startswith(ABOVE_THE_CORE)]
    assert "moe_runtime.types" in core and "moe_runtime.engine" in core
    offenders = {name: sorted(m for m in imported_modules(name) if m.startswith("moe_runtime.arch"))
                 for name in core}
    assert not {name: found for name, found in offenders.items() if found}


@pytest.mark.parametrize("module", ["moe_runtime.store", "moe_runtime.cache", "moe_runtime.quant",
                                    "moe_runtime.types"])
def test_importing_a_core_module_loads_no_family_and_no_transformers(module):
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.split()
    assert module in loaded
    assert not [name for name in loaded if name.startswith(("moe_runtime.arch", "transformers"))]
