"""The product's modules keep their promises to each other, read from the ast of every module: a leading
underscore is private to its module, and engine/ has no import cycle (function-level imports included, since
they only hide a cycle from the import system, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("engine", "app", "widgets")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return found


def _runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Every import the module can execute: at the top, in functions, in try blocks; not under TYPE_CHECKING."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def _targets(node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module] if node.module and node.level == 0 else []


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    found = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in modules and node.module != name:
                found += [f"{name} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, "\n".join(found)


def test_the_engine_has_no_import_cycle():
    modules = _modules()
    graph = {
        name: sorted(
            {
                t
                for node in _runtime_imports(tree)
                for t in _targets(node)
                if t in modules and t.startswith("engine") and t != name
            }
        )
        for name, tree in modules.items()
        if name.startswith("engine")
    }
    cycles = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in graph:
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_what_they_look_for():
    """Guard against a check that cannot fail: the parser finds a function-level import and skips TYPE_CHECKING."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import engine.a\n"
        "def f():\n    from engine.b import _x\n"
    )
    assert [t for node in _runtime_imports(tree) for t in _targets(node)] == ["typing", "engine.b"]
