"""The package's layers point one way: commands → engines → the hub → formats → shared pieces.

Read from the code's own imports (every ``import`` statement, inside functions too), so a new
upward arrow or a cycle fails here, not in a review. docs/design.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tangquant.cli import COMMANDS

pytestmark = pytest.mark.fast

PACKAGE = Path(__file__).resolve().parents[1] / "tangquant"
COMMAND_MODULES = {module for _, module in COMMANDS} | {"tangquant.cli", "tangquant.__main__"}
ENGINES = ("tangquant.quant", "tangquant.measure", "tangquant.server", "tangquant.poet")
HUB = ("tangquant.load", "tangquant.generate", "tangquant.generators")
FORMATS = ("tangquant.ov", "tangquant.gguf", "tangquant.ortgenai")
NAMES = {4: "command", 3: "engine", 2: "hub", 1: "format", 0: "shared"}


def layer(module: str) -> int:
    if module in COMMAND_MODULES:
        return 4
    for level, roots in ((3, ENGINES), (2, HUB), (1, FORMATS)):
        if any(module == r or module.startswith(r + ".") for r in roots):
            return level
    return 0


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        # "from tangquant import files" names a module; "from tangquant.x import f" names x.
        found |= {t for t in targets if t in known and t != name and t != "tangquant"}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_points_up_a_layer():
    upward = [f"{a} ({NAMES[layer(a)]}) imports {b} ({NAMES[layer(b)]})"
              for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == []


def test_no_engine_imports_a_command():
    bad = [(a, b) for a, targets in graph().items() for b in targets
           if layer(a) < 4 and b in COMMAND_MODULES]
    assert bad == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_walk_sees_what_it_must():
    """The checks above are only as good as the graph: it must hold known edges, and a planted
    upward import must be caught."""
    edges = graph()
    assert "tangquant.measure.runner" in edges["tangquant.bench"]
    assert "tangquant.gguf.reader" in edges["tangquant.load"]  # inside a function
    assert layer("tangquant.bench") > layer("tangquant.measure.runner") > layer("tangquant.load") \
        > layer("tangquant.ov.ir") > layer("tangquant.files")
