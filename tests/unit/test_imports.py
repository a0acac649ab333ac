"""Import hygiene: analysis works without torch; the public API is reachable from the top package."""

import subprocess
import sys


def test_analysis_does_not_load_torch():
    code = (
        "import sys, tokvis, tokvis.analysis.patterns, tokvis.analysis.maps, tokvis.analysis.features, "
        "tokvis.analysis.correlation; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_public_api_names():
    import tokvis

    for name in tokvis.__all__:
        assert getattr(tokvis, name) is not None
    assert callable(tokvis.zoo.create)


def _tokvis_import_graph() -> dict[str, set[str]]:
    """Module -> tokvis modules it imports, at top level or inside functions (``TYPE_CHECKING`` blocks skipped).

    ``from tokvis import patch`` resolves through the package's lazy export table to the module
    defining ``patch``, so the lazy top-level API hides no edge.
    """
    import ast
    from pathlib import Path

    import tokvis

    root = Path(tokvis.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path

    def resolve(module: str, names: list[str]) -> set[str]:
        out = set()
        for n in names:
            sub = f"{module}.{n}"
            if sub in modules:
                out.add(sub)
            elif module == "tokvis" and n in tokvis._EXPORTS:
                out.add(tokvis._EXPORTS[n])
            else:
                out.add(module)
        return out

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for b in node.body for n in ast.walk(b))
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == "tokvis"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tokvis":
                edges |= resolve(node.module, [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative import
                base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
                edges |= resolve(mod, [a.name for a in node.names])
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_cycle_in_tokvis():
    """No two tokvis modules import each other, directly or through others (function-level imports count)."""
    graph = _tokvis_import_graph()
    assert "tokvis.recording" in graph["tokvis.patching"]  # the graph sees imports at all
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_library_modules_do_not_import_the_command_line():
    """``tokvis.commands`` (and its private ``_run``) serve the CLI; the library (evaluate, store, plotting, ...)
    rebuilds run models through the public ``tokvis.store.build_model`` / ``patch_for``."""
    graph = _tokvis_import_graph()
    assert "tokvis.distributed" in graph["tokvis.evaluate"]  # the graph sees function-level imports
    cli = {"tokvis.cli", "tokvis.__main__"}
    offenders = {
        mod: sorted(e for e in edges if e.startswith("tokvis.commands"))
        for mod, edges in graph.items()
        if not mod.startswith("tokvis.commands") and mod not in cli
    }
    assert {m: e for m, e in offenders.items() if e} == {}
