"""The house's import graph: no circle anywhere in the package, and the rooms import one way."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import msnet

PACKAGE = Path(msnet.__file__).parent


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def root_leaves() -> Set[str]:
    """Names the package root defines itself, importing nothing: its classes and constants (``MsnetError``).

    The root's functions are the Python entry point (``msnet.train``), which imports the whole house
    when called; the error every room raises is a leaf. ``from msnet import MsnetError`` is therefore
    not an edge to the root, or the entry point would close a circle through every room.
    """
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    return names | {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the msnet modules it imports (top level and inside functions alike).

    ``from msnet.a import b`` counts as importing ``msnet.a.b`` where that is a module, else ``msnet.a``;
    ``from msnet import MsnetError`` (a :func:`root_leaves` name) counts as nothing.
    """
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    leaves = root_leaves()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        edges: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif node_is_leaf_import(node, leaves):
                continue
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                edges |= subs or {node.module}
                if len(subs) < len(node.names):
                    edges.add(node.module)
        graph[name] = edges - {name}
    return graph


def node_is_leaf_import(node: ast.AST, leaves: Set[str]) -> bool:
    """``from msnet import X, Y`` with every name a leaf of the root."""
    return (isinstance(node, ast.ImportFrom) and node.module == "msnet" and node.level == 0
            and all(a.name in leaves for a in node.names))


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
    assert "MsnetError" in root_leaves() and "train" not in root_leaves()
    assert {"msnet.api"} <= graph["msnet"] and "msnet" not in graph["msnet.core.network"]
    assert "msnet.training.distributed" in graph and "msnet.tasks.launch" in graph
    assert cycles(graph) == []


def test_rooms_import_one_way():
    """The core imports nothing from training/, runs/, tasks/ or multigrid/; multigrid never trains;
    the DDP primitives are a leaf of training/; evaluate and transfer do not load the trainer."""
    graph = import_graph()

    def reaches(src: str, prefix: str) -> List[str]:
        return sorted(d for d in graph[src] if d == prefix or d.startswith(prefix + "."))

    def room(module: str) -> str:
        return module.split(".")[1] if "." in module else ""

    for mod, deps in graph.items():
        if room(mod) == "core":
            assert not [d for d in deps if room(d) in ("training", "runs", "tasks", "multigrid", "commands")], mod
        if room(mod) in ("multigrid", "data", "runs"):
            assert not [d for d in deps if room(d) in ("training", "tasks", "commands")], mod
    assert not [d for d in graph["msnet.training.distributed"] if d.startswith("msnet.training")]
    for task in ("msnet.tasks.evaluate", "msnet.tasks.transfer"):
        assert reaches(task, "msnet.training.api") == [] and reaches(task, "msnet.training") == ["msnet.training.loop"], task


def test_every_function_reads_on_one_screen():
    """No function in the package reaches 100 lines (the trainer's route included)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 100:
                long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
