"""No import cycle inside the package: the graph of ``fusionkit`` modules importing each other, built from
the source with ``ast`` (imports at module level and inside functions alike), has no cycle.

An edge ``a -> b`` means a statement of module ``a`` imports module ``b``: ``import fusionkit.b``,
``from fusionkit.b import x`` (or ``fusionkit.b.x`` when ``x`` is itself a module), relative imports
resolved. Importing a module also runs its parent packages' ``__init__``; those implicit edges are left
out, or every module would form a cycle through ``fusionkit/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "fusionkit"

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, name: str, is_package: bool, known: set[str]) -> list[str]:
    """The fusionkit modules (of ``known``) that one statement of module ``name`` imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: the package of ``name`` (``name`` itself for an __init__), ``level - 1`` up
        parts = name.split(".")
        base = ".".join([*parts[: len(parts) - node.level + is_package], *([base] if base else [])])
    names = [f"{base}.{a.name}" for a in node.names]
    submodules = [n for n in names if n in known]
    return submodules + ([base] if base in known and len(submodules) < len(names) else [])


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {t for node in ast.walk(tree) for t in imported(node, name, is_package, known) if t != name}
    return graph


def components(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def shortest_cycle(graph: dict[str, set[str]], component: frozenset[str]) -> list[str]:
    """A shortest cycle ``[a, ..., a]`` from the first module of ``component``, inside it (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def describe(graph: dict[str, set[str]], found: list[frozenset[str]]) -> str:
    return "import cycles:\n" + "\n".join(" -> ".join(shortest_cycle(graph, c)) for c in found)


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "fusionkit.engine.distributed" in graph["fusionkit.engine.trainer"]   # from fusionkit.engine import x
    assert "fusionkit.recipes" in graph["fusionkit.engine.trainer"]              # inside a method
    known = {"fusionkit.engine", "fusionkit.engine.optim", "fusionkit.errors"}
    relative = ast.parse("from .optim import x\nfrom .. import errors").body
    assert [imported(n, "fusionkit.engine.trainer", False, known) for n in relative] == [
        ["fusionkit.engine.optim"], ["fusionkit.errors"]]
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert components(toy) == [frozenset("abc")] and shortest_cycle(toy, frozenset("abc")) == ["a", "b", "c", "a"]


def test_no_import_cycle_inside_fusionkit():
    graph = import_graph()
    found = components(graph)
    assert not found, describe(graph, found)
