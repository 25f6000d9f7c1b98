"""The architecture as DESIGN.md draws it, checked on the source: one-way layers, no import cycles.

Every import counts, the ones inside functions too: a lazy import hides a cycle from the
interpreter, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("targets", "export", "runtimes", "compress")  # each may import only the ones before it


def _modules() -> dict[str, Path]:
    mods = {"edgecompress": ROOT / "edgecompress" / "__init__.py"}
    for folder in LAYERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(["edgecompress", *parts])] = path
    return mods


def _imports(path: Path, modules: dict[str, Path] | frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    """``(line, module)`` for every absolute import in the file. ``from package import name`` is an
    import of the sub-module ``package.name`` when there is one (among ``modules``), else of the
    package (a name its ``__init__`` defines or re-exports)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((node.lineno, sub if sub in modules else node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {name for _, name in _imports(p, mods) if name in mods and name != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycle() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    detail = ["; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layers_import_one_way() -> None:
    bad = []
    mods = _modules()
    for module, path in mods.items():
        layer = module.split(".")[1] if module.count(".") else None
        if layer is None:
            continue
        allowed = {f"edgecompress.{name}" for name in LAYERS[: LAYERS.index(layer) + 1]}
        for line, name in _imports(path, mods):
            if name.startswith("edgecompress") and name.count(".") and ".".join(name.split(".")[:2]) not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            elif name == "edgecompress" and layer != "compress":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the top-level package")
    assert not bad, "imports against the layering (targets < export < runtimes < compress):\n" + "\n".join(bad)


def test_no_old_top_level_imports() -> None:
    """Everything imports ``edgecompress.<layer>``: the folders are not top-level packages once installed."""
    bad = []
    for folder in (*LAYERS, "tests", "bench", "tools", "edgecompress"):
        for path in (ROOT / folder).rglob("*.py"):
            for line, name in _imports(path):
                if name.split(".")[0] in LAYERS:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)
