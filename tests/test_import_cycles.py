"""Layers import only downward: no import cycle between any two modules of ``src/visionmoe``.

The graph is read with ``ast`` (nothing is imported). Every ``import`` statement counts, at module
level, inside functions (a late import only postpones a cycle to the first call) and under
``TYPE_CHECKING`` (a type-only import that points upward is still a layering inversion). An edge
goes to the module named, or to ``pkg.name`` when ``from pkg import name`` names a submodule. The
parent packages Python initialises on the way (``visionmoe/__init__.py`` for every import) are not
edges: the package roots only re-export from below, and an explicit ``from visionmoe.data import
X`` does count as an edge to ``visionmoe.data``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "visionmoe"


def _module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The innermost module of ``name`` that is part of the package (None for third parties)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, set[str]]:
    """``module -> modules it imports`` for every module under the package directory ``root``."""
    modules = _module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [_target(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [
                    f"{base}.{alias.name}"
                    if f"{base}.{alias.name}" in modules
                    else _target(base, modules)
                    for alias in node.names
                ]
            else:
                continue
            graph[name].update(t for t in targets if t is not None and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return cycles


def _describe(cycles: list[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for members in cycles:
        inside = set(members)
        lines += [f"{m} -> {sorted(graph[m] & inside)}" for m in members] + [""]
    return "\n".join(lines)


def test_no_import_cycles_in_visionmoe():
    graph = import_graph(SRC)
    assert "visionmoe.loading.sources" in graph and "visionmoe.cli.main" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module -> its imports inside the cycle):\n" + _describe(
        cycles, graph
    )


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from pkg.high import g\n    return g\n",
            "high.py": "from pkg import low\n",
            "sub/__init__.py": "",
            "sub/leaf.py": "import json\nfrom ..low import f\n",
        },
    )
    graph = import_graph(root)
    # Hand-derived: low -> high (late import), high -> low (from pkg import <submodule>),
    # sub.leaf -> low (relative import, level 2); json is not part of the package.
    assert graph["pkg.low"] == {"pkg.high"}
    assert graph["pkg.high"] == {"pkg.low"}
    assert graph["pkg.sub.leaf"] == {"pkg.low"}
    assert find_cycles(graph) == [["pkg.high", "pkg.low"]]


def test_a_layered_package_has_no_cycle(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.top import run\n",
            "base.py": "X = 1\n",
            "mid.py": "from pkg.base import X\n",
            "top.py": "from pkg import mid\n\ndef run():\n    from pkg.base import X\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg"] == {"pkg.top"} and graph["pkg.top"] == {"pkg.mid", "pkg.base"}
    assert find_cycles(graph) == []
