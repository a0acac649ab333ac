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
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tokvis":
                edges |= resolve("tokvis", [node.attr])  # `import tokvis; tokvis.patch(...)` uses tokvis.patching
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


# The layers of docs/architecture.md ("Layers and imports"), lowest first. A module may import modules of its own
# layer or of a lower one; `analysis` and `plotting` sit beside the torch stack and import only the foundation
# (and plotting: analysis). A new top-level module gets a row here and in docs/architecture.md.
LAYERS = {
    "foundation": ("tokvis", "tokvis.errors", "tokvis.validate", "tokvis.fileio"),
    "core": (
        "tokvis.trace",
        "tokvis.methods.ops",
        "tokvis.model",
        "tokvis.backbones",
        "tokvis.schedule",
        "tokvis.data",
    ),
    "methods": ("tokvis.methods",),
    "patching": ("tokvis.recording", "tokvis.patching"),
    "tools": (
        "tokvis.identity",
        "tokvis.attention",
        "tokvis.bench",
        "tokvis.fitting",
        "tokvis.zoo",
        "tokvis.hf_zoo",
        "tokvis.datasets",
        "tokvis.adapters",
    ),
    "runs": ("tokvis.store", "tokvis.distributed", "tokvis.evaluate"),
    "viewer": ("tokvis.viewer",),
    "command line": ("tokvis.commands", "tokvis.cli", "tokvis.__main__"),
}
SIDE_LAYERS = {"analysis": ("tokvis.analysis",), "plotting": ("tokvis.plotting",)}
SIDE_MAY_IMPORT = {"analysis": {"foundation"}, "plotting": {"foundation", "analysis"}}


def _layer_of(module: str) -> str:
    for table in (LAYERS, SIDE_LAYERS):
        for layer, prefixes in table.items():
            if any(module == p or (p != "tokvis" and module.startswith(p + ".")) for p in prefixes):
                return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/architecture.md")


def _may_import(src: str, dst: str) -> bool:
    order = list(LAYERS)
    if src == dst:
        return True
    if src in SIDE_MAY_IMPORT:
        return dst in SIDE_MAY_IMPORT[src]
    if dst in SIDE_LAYERS:
        return src in ("viewer", "command line")  # the library never draws or analyses on its own
    return order.index(dst) <= order.index(src)


def test_layers_import_only_downwards():
    """The import rule of docs/architecture.md, on the package's import graph (function-level imports count)."""
    graph = _tokvis_import_graph()
    assert "tokvis.patching" in graph["tokvis.fitting"]  # attribute use of the top package counts too
    offenders = sorted(
        f"{src} ({_layer_of(src)}) imports {dst} ({_layer_of(dst)})"
        for src, edges in graph.items()
        for dst in edges
        if not _may_import(_layer_of(src), _layer_of(dst))
    )
    assert offenders == []


def test_layer_rule_can_fail():
    assert not _may_import("core", "patching")
    assert not _may_import("analysis", "core")
    assert not _may_import("runs", "plotting")
    assert _may_import("plotting", "analysis") and _may_import("command line", "plotting")
