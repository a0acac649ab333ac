"""mkdocs hook: pages built from files outside ``docs/`` (README, notebooks) and the API reference pages.

* ``index.md`` is README.md, its ``docs/...`` links made relative to the site;
* ``notebooks/*.ipynb`` are the committed notebooks (rendered with their outputs by mkdocs-jupyter, not run);
* ``api/<package>.md`` hold one mkdocstrings block per public name of ``tokvis``, ``tokvis.analysis`` and
  ``tokvis.plotting`` (the names of their ``__all__``, each at the module that defines it), so a new public
  name appears in the reference without editing a page.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
API = {"tokvis": "tokvis", "analysis": "tokvis.analysis", "plotting": "tokvis.plotting"}


def defining_module(package: str, name: str) -> str:
    """Dotted path of the module that defines ``package.name`` (a module itself for a public submodule)."""
    pkg = importlib.import_module(package)
    exports = getattr(pkg, "_EXPORTS", {})
    if name in exports:
        return exports[name]
    obj = getattr(pkg, name)
    if type(obj).__name__ == "module":
        return obj.__name__
    module = getattr(obj, "__module__", None)
    if module and module.startswith("tokvis"):
        return module
    for path in sorted(Path(pkg.__file__).parent.glob("*.py")):  # a constant: the submodule assigning it
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return f"{package}.{path.stem}"
    raise LookupError(f"{package}.{name}: no defining module found")


def api_page(package: str) -> str:
    """Markdown of the reference page of ``package``: one mkdocstrings block per name of its ``__all__``."""
    pkg = importlib.import_module(package)
    doc = (pkg.__doc__ or "").strip().split("\n\n")[0]
    lines = [f"# `{package}`", "", doc, ""]
    for name in pkg.__all__:
        if name.startswith("__"):
            continue
        module = defining_module(package, name)
        target = module if module == f"{package}.{name}" else f"{module}.{name}"
        lines += [f"::: {target}", "    options:", "      show_root_heading: true", ""]
    return "\n".join(lines)


def readme_page() -> str:
    """README.md with its links into ``docs/`` made relative to the site's root."""
    text = (ROOT / "README.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)


@event_priority(100)  # before mkdocs-jupyter's on_files, so that it renders the notebooks added here
def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "index.md", content=readme_page()))
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        # a plain File rooted at the repository (not a generated one), as mkdocs-jupyter expects
        files.append(File(f"notebooks/{nb.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    for page, package in API.items():
        files.append(File.generated(config, f"api/{page}.md", content=api_page(package)))
    return files
