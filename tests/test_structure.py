"""The engine's structure: dependencies point one way, with no import cycle among its modules,
counting imports inside functions (which would otherwise hide a cycle)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the engine modules it imports anywhere in its source. `from engine.a import b`
    counts as importing engine.a, and engine.a.b too where b is a module."""
    modules = {module_name(p): p for p in ENGINE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                # importing engine.a.b runs engine/__init__, engine/a/__init__, then engine/a/b
                parts = t.split(".")
                edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
        # A module inside a package runs that package's __init__ before it runs: no edge.
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        graph[name] = edges - own
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_engine_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The layers, lowest first: a module may import its own layer and those below it, never above.
LAYERS = [("engine.errors", "engine.config"), ("engine.runtime", "engine.ops"), ("engine.data",),
          ("engine.models",), ("engine.generation", "engine.training"), ("engine.evaluation",),
          ("engine.toyworld", "engine.recipe"), ("engine.cli",)]


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} belongs to no layer; add its package to LAYERS")


def test_dependencies_point_one_way():
    upward = [f"{m} imports {d}" for m, deps in import_graph().items() for d in sorted(deps)
              if layer_of(d) > layer_of(m)]
    assert not upward, "imports against the layering: " + "; ".join(upward)


def test_jobs_are_not_imported_by_the_engine():
    graph_sources = [p for p in ENGINE.rglob("*.py") if "jobs" in p.read_text()]
    for path in graph_sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "jobs" or n.startswith("jobs.") for n in names), f"{path} imports {names}"
