"""The package as a distribution sees it: its import graph, metadata, sdist, and a shadowed `daemon`."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO


def _daemon_imports(path: Path) -> set[str]:
    """The ``daemon.*`` modules a module imports, at run time or for type checking alike."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("daemon."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("daemon."))
    return out


def test_the_module_graph_has_no_circle() -> None:
    """service and notify read the live parts from daemon.live; nothing below the CLI reaches back
    into the lifecycle (daemon.runner), not even for type checking."""
    graph = {f"daemon.{p.stem}": _daemon_imports(p) for p in (REPO / "daemon").glob("*.py")}
    assert sorted(m for m, deps in graph.items() if "daemon.runner" in deps) == ["daemon.cli"]

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen
    assert [m for m in graph if m in reachable(m)] == []
