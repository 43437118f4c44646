"""The package's import graph, read from the source (``ast``), never by importing it.

Rules it holds the code to:

1. **No import cycle anywhere in** ``chatnode/``. Every ``import`` counts, at module level, in
   a function (a lazy import still runs) or under ``TYPE_CHECKING`` (mypy follows it, and a
   cycle there becomes a runtime one the day the import is needed at run time).
   ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``.
2. **Adapters take plain values.** A module under ``chatnode/adapters/`` imports, of chatnode,
   only ``chatnode.core``, ``chatnode.wire``, ``chatnode.fdio`` and other adapters: never
   ``config``, ``node``, ``edge``, ``app``, ``wiring`` or ``cli`` (``wiring.py`` is the
   composition root that reads ``Config`` and builds them).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTER_MAY_IMPORT = ("chatnode.core", "chatnode.wire", "chatnode.fdio", "chatnode.adapters")
ADAPTER_MUST_NOT_IMPORT = (
    "chatnode.config",
    "chatnode.node",
    "chatnode.edge",
    "chatnode.app",
    "chatnode.wiring",
    "chatnode.cli",
)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``root``'s ``chatnode`` package, by its dotted name."""

    def name(path: Path) -> str:
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)

    return {name(path): path for path in sorted((root / "chatnode").rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> Iterator[str]:
    """The chatnode modules the module ``name`` at ``path`` imports (rule 1's edges)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield submodule if submodule in known else source


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {
        name: {target for target in imported(path, name, known) if target in known}
        for name, path in found.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_there_is_no_import_cycle_in_chatnode() -> None:
    edges = graph()
    assert len(edges) > 50  # the walk found the package
    assert cycles(edges) == []


def test_adapters_import_only_core_wire_fdio_and_other_adapters() -> None:
    edges = graph()
    wrong = {
        name: sorted(t for t in targets if not t.startswith(ADAPTER_MAY_IMPORT))
        for name, targets in edges.items()
        if name.startswith("chatnode.adapters")
    }
    assert {name: targets for name, targets in wrong.items() if targets} == {}
    forbidden = {
        name: sorted(t for t in targets if t.startswith(ADAPTER_MUST_NOT_IMPORT))
        for name, targets in edges.items()
        if name.startswith("chatnode.adapters")
    }
    assert all(not targets for targets in forbidden.values())


def test_the_checks_see_cycles_and_forbidden_imports(tmp_path: Path) -> None:
    """The rules fail where they should: a cycle through a lazy import, a relative import
    and a ``from package import module``; an adapter importing ``Config``."""
    package = tmp_path / "chatnode"
    (package / "adapters").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("")
    (package / "adapters" / "__init__.py").write_text("")
    (package / "adapters" / "a.py").write_text("def f():\n    from chatnode.adapters import b\n")
    (package / "adapters" / "b.py").write_text("from . import c\nfrom chatnode.config import X\n")
    (package / "adapters" / "c.py").write_text("import chatnode.adapters.a\n")

    edges = graph(tmp_path)
    assert cycles(edges) == [["chatnode.adapters.a", "chatnode.adapters.b", "chatnode.adapters.c"]]
    assert "chatnode.config" in edges["chatnode.adapters.b"]
