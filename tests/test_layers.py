"""The package is a one-way house: every import points down a declared layer (or across it), and none closes a circle.

The imports are read from the source (nothing is executed), lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "gptlab"

# Lowest first. A module may import its own layer or any layer below, never one above.
LAYERS = [
    ["errors", "fsutil", "folders", "cpu_memory", "muon", "synthetic_chats", "quantize"],
    ["config", "distributed", "sizing", "cores"],
    ["rundir", "tokenizer", "device", "cpu_bf16"],
    ["data", "model", "copycheck", "chat"],
    ["optim", "checkpoint", "engine", "batching"],
    ["generation", "evaluate", "report", "experiment_logs"],
    ["train", "hf"],
    ["pipeline", "serve"],
    ["ui"],
    ["cli", "__main__", "__init__"],
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def room(module: str) -> str:
    """The layer entry a module belongs to: a top-level module, or the package it sits in."""
    return module.split(".")[0]


def imports_of(path: Path) -> set[str]:
    """gptlab modules that `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gptlab":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("gptlab."):
                found.add(node.module.removeprefix("gptlab."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("gptlab.") for a in node.names if a.name.startswith("gptlab."))
    return found


def graph() -> dict[str, set[str]]:
    """Each module and the package modules it imports (`from gptlab import __version__` names no module)."""
    edges = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in targets if t in edges} for m, targets in edges.items()}


def test_every_module_has_a_layer():
    declared = {name for layer in LAYERS for name in layer}
    rooms = {room(m) for m in graph()}
    assert rooms - declared == set(), "declare these modules' layer in LAYERS"


def test_no_import_points_up_a_layer():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if level[room(target)] > level[room(module)]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_cycle():
    resolved = graph()
    modules = set(resolved)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in resolved[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert cycles == []
