"""The package's shape: no import circles between first-party modules, no oversized files."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trl_flow", "reward_funcs")
MAX_LINES = 500


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str | None, level: int, current: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in module ``current``."""
    if level == 0:
        return module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports anywhere (module level, in functions, under
    TYPE_CHECKING). ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    modules = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            modules[module_name(path, root)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(node.module, node.level, name, is_package)
                for alias in node.names:
                    targets.append(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_first_party_module_imports_another_in_a_circle():
    found = cycles(import_graph(ROOT, PACKAGES))
    assert not found, "import circles: " + "; ".join(" <-> ".join(component) for component in found)


def test_the_cycle_check_sees_imports_in_functions_and_under_type_checking(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n")
    (package / "c.py").write_text("from . import a\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b"]]
    (package / "b.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []


def test_no_package_file_is_oversized():
    sizes = {path: len(path.read_text().splitlines()) for path in (ROOT / "trl_flow").rglob("*.py")}
    oversized = {str(path.relative_to(ROOT)): lines for path, lines in sizes.items() if lines > MAX_LINES}
    assert not oversized, f"files over {MAX_LINES} lines: {oversized}"
