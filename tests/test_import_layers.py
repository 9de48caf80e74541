"""lattice's modules import each other without cycles, and each folder imports only the layers DESIGN.md allows below
it. The graph is read from the sources (every `import lattice...` / `from lattice... import`, module level or not),
so a cycle hidden in a function-level import counts too."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "lattice")

# What each room may import (besides itself and the lattice package root). DESIGN.md's layout.
_BOTTOM = {"ops", "sparse", "batch", "metrics", "dotted"}
ALLOWED = {
    "ops": {"ops"},
    "sparse": {"ops"},
    "batch": {"sparse", "ops"},
    "metrics": set(),
    "dotted": set(),
    "data": _BOTTOM,
    "nn": _BOTTOM | {"data"},
    "models": _BOTTOM | {"data", "nn"},
    "train": _BOTTOM | {"data", "nn", "models"},
    "distill": _BOTTOM | {"data", "nn", "models", "train"},
    "select": _BOTTOM | {"data", "nn", "models", "train"},
}


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != "lattice":
                targets.add(name)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package __init__ re-exporting its own modules is not a cycle between rooms.
            if nxt.startswith(node + ".") or node.startswith(nxt + ".") and nxt in graph and _is_init(nxt):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _is_init(module: str) -> bool:
    return os.path.isfile(os.path.join(ROOT, *module.split("."), "__init__.py"))


def test_rooms_import_only_the_layers_below():
    bad = []
    for module, targets in _graph().items():
        room = _room(module)
        if room not in ALLOWED:
            continue  # serve, sketch, cli and commands sit above everything else
        for target in targets:
            other = _room(target)
            if other != room and other not in ALLOWED[room]:
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(sorted(bad))
