"""No import cycle among fastkern's modules at module level (imports inside functions are free to point anywhere).

An edge A -> B is a module-level `import B` / `from B import name` in A (inside if/try/with at module level too,
not under `if TYPE_CHECKING:`). `from pkg import attribute` depends on pkg's __init__; `from pkg import submodule`
on the submodule only, and the implicit import of A's own parent packages is no edge (they are already running).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level(body):
    for stmt in body:
        if isinstance(stmt, ast.If):
            test = stmt.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                continue
            yield from _top_level(stmt.body)
            yield from _top_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, stmt.orelse, stmt.finalbody, *(h.body for h in stmt.handlers)):
                yield from _top_level(block)
        elif isinstance(stmt, ast.With):
            yield from _top_level(stmt.body)
        else:
            yield stmt


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in (ROOT / "fastkern").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for stmt in _top_level(ast.parse(path.read_text()).body):
            if isinstance(stmt, ast.Import):
                deps |= {a.name for a in stmt.names if a.name in paths}
            elif isinstance(stmt, ast.ImportFrom):
                base = package[:len(package) - stmt.level + 1] if stmt.level else []
                base = ".".join(base + (stmt.module.split(".") if stmt.module else []))
                for alias in stmt.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in paths else base)
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_graph_reads_relative_imports():
    graph = import_graph()
    assert "fastkern.runtime" in graph["fastkern"] and "fastkern.patching.core" in graph["fastkern.patching"]


def test_no_module_level_import_cycle():
    graph = import_graph()
    assert not cycles(graph), "\n".join(f"{c}: " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c)
                                        for c in cycles(graph))
