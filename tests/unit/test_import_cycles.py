"""No import cycle in ``src/ivgr_dist``: every import of the package's own modules counts, at module level or
inside a function (a function-level import only delays a cycle; it is still two modules that need each other).

Edges are read from the source with ``ast`` (nothing is imported): ``import ivgr_dist.a.b`` and
``from ivgr_dist.a import b`` (``b`` a module) point at that module, ``from ivgr_dist.a import name`` at
``ivgr_dist.a``. Imports under ``if TYPE_CHECKING:`` are left out (never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "ivgr_dist"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _edges(name: str, path: Path, files: dict[str, Path]) -> dict[str, int]:
    """{module of the package that ``name`` imports: line of the first such import}."""
    is_pkg = path.name == "__init__.py"
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in files:  # ivgr_dist.a.b.name -> ivgr_dist.a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.setdefault(target, line)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        add(alias.name, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    module = child.module or ""
                if module.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:
                    full = f"{module}.{alias.name}"
                    add(full if full in files else module, child.lineno)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return edges


def import_graph(root: Path = SRC) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    files = {_module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    return {name: _edges(name, path, files) for name, path in files.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    found = cycles(graph)
    lines = []
    for comp in found:
        members = set(comp)
        lines.append(" <-> ".join(comp))
        lines += [f"    {a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in members]
    assert not found, "import cycles in src/ivgr_dist:\n" + "\n".join(lines)


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (
            {"a": "from ivgr_dist import b\n", "b": "def f():\n    from ivgr_dist.a import x\n"},
            [["ivgr_dist.a", "ivgr_dist.b"]],
        ),
        (
            {
                "a": "import ivgr_dist.b\n",
                "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ivgr_dist.a\n",
            },
            [],
        ),
        (
            {"a": "from ivgr_dist.b import y\n", "b": "from ivgr_dist.c import z\n", "c": "from . import a\n"},
            [["ivgr_dist.a", "ivgr_dist.b", "ivgr_dist.c"]],
        ),
        ({"a": "from ivgr_dist.b import y\n", "b": "import os\n"}, []),
    ],
)
def test_the_check_sees_cycles_through_functions_and_relative_imports(tmp_path, sources, expected):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in sources.items():
        (pkg / f"{name}.py").write_text(text)
    assert cycles(import_graph(tmp_path)) == expected
