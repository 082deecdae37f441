"""The house's import graph: no circle anywhere in the package, and the rooms import one way."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

import msnet

PACKAGE = Path(msnet.__file__).parent


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the msnet modules it imports (top level and inside functions alike).

    ``from msnet.a import b`` counts as importing ``msnet.a.b`` where that is a module, else ``msnet.a``.
    """
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        edges: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                edges |= subs or {node.module}
                if len(subs) < len(node.names):
                    edges.add(node.module)
        graph[name] = edges - {name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"msnet.api", "msnet.errors", "msnet.version"} <= graph["msnet"] and "msnet" not in graph["msnet.core.network"]
    assert "msnet.training.distributed" in graph and "msnet.tasks.launch" in graph
    assert cycles(graph) == []


LAYERS = {
    "errors": 0, "version": 0,
    "registry": 1, "config": 1, "data": 1,
    "core": 2,
    "multigrid": 3, "runs": 3,
    "methods": 4,
    "training": 5,
    "tasks": 6,
    "commands": 7,
    "cli": 8, "api": 8, "__main__": 8, "": 8,
}
"""The rooms, lowest first: a module imports only from its own room or a lower one (STYLE.md, "The house")."""


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_rooms_import_one_way():
    """No import runs up the layers: the ground floor (errors, version) imports nothing of msnet, the core
    nothing from multigrid/, runs/, methods/ or above, the methods nothing of the loop, and so on; the DDP
    primitives are a leaf of training/; evaluate and transfer reach neither the trainer nor any method."""
    graph = import_graph()
    assert set(LAYERS) >= {room(m) for m in graph}, "a new room needs its layer in LAYERS"
    upward = sorted(f"{mod} -> {dep}" for mod, deps in graph.items() for dep in deps
                    if LAYERS[room(dep)] > LAYERS[room(mod)])
    assert upward == []
    assert graph["msnet.errors"] == set() and graph["msnet.version"] == set()
    assert not [d for d in graph["msnet.training.distributed"] if d.startswith("msnet.training")]

    def reaches(src: str) -> Set[str]:
        seen, todo = set(), [src]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    for task in ("msnet.tasks.evaluate", "msnet.tasks.transfer"):
        loaded = reaches(task)
        assert not [m for m in loaded if room(m) == "methods"], task
        assert {m for m in loaded if room(m) == "training"} <= {"msnet.training", "msnet.training.evaluation"}, task


def test_the_package_root_imports_only_the_ground_floor_eagerly():
    """Inside the package nothing imports from the front door (``from msnet import X``): every room takes
    the error and the version from the ground floor."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "msnet" and node.level == 0:
                offenders.append(module_name(path))
    assert offenders == []


@pytest.mark.parametrize("module,forbidden", [
    ("msnet.tasks.evaluate", ("msnet.methods", "msnet.training.api", "msnet.training.fit", "msnet.training.loop")),
    ("msnet.tasks.transfer", ("msnet.methods", "msnet.training.api", "msnet.training.fit", "msnet.training.loop")),
    ("msnet.runs.report", ("msnet.methods", "msnet.training")),
    ("msnet", ("torch", "hydra", "msnet.training", "msnet.methods")),
    ("msnet.training", ("msnet.training.api", "msnet.methods")),
])
def test_what_importing_a_room_loads(module, forbidden):
    """What a fresh interpreter has loaded after ``import MODULE`` (``sys.modules``, not the static graph):
    ``msnet evaluate`` and ``transfer`` do not load the trainer or any method, and ``import msnet`` stays cheap."""
    import subprocess
    import sys

    code = (f"import sys, {module}; print('\\n'.join(sorted(m for m in sys.modules "
            f"if m.split('.')[0] in ('msnet', 'torch', 'hydra'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert module in loaded
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert bad == []


def test_every_function_reads_on_one_screen():
    """No function in the package reaches 100 lines (the trainer's route included)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 100:
                long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
