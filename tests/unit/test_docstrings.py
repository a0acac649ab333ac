"""Every public name of ``tokvis``, ``tokvis.analysis`` and ``tokvis.plotting`` has a numpydoc docstring whose
Parameters section names each of its parameters (the API reference site is rendered from them)."""

import dataclasses
import importlib
import inspect
import re

import pytest

PACKAGES = ("tokvis", "tokvis.analysis", "tokvis.plotting")


def public_callables() -> list[tuple[str, object]]:
    out = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{package}.{name}", obj))
    return out


def documented_parameters(doc: str) -> set[str] | None:
    """Names listed in the docstring's Parameters section (``a, b : int`` counts both); None without one."""
    m = re.search(r"^Parameters\n-+\n(.*?)(?=^\S[^\n]*\n-+\n|\Z)", inspect.cleandoc(doc), re.S | re.M)
    if m is None:
        return None
    names = set()
    for line in m.group(1).splitlines():
        if line and not line[0].isspace():
            names.update(n.strip().lstrip("*") for n in line.split(":")[0].split(","))
    return names


def docstring_problems(obj) -> list[str]:
    """What the docstring of a public function or class lacks (a class's parameters are its ``__init__``'s)."""
    doc = inspect.getdoc(obj) if inspect.isfunction(obj) else obj.__doc__
    if not doc or not doc.strip():
        return ["no docstring"]
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    params = [p for p in sig.parameters if p not in ("self", "cls")]
    if not params:
        return []
    documented = documented_parameters(doc)
    if documented is None and dataclasses.is_dataclass(obj):  # a dataclass's parameters are its fields
        documented = documented_parameters(doc.replace("Attributes\n", "Parameters\n"))
    if documented is None:
        return [f"no Parameters section (parameters: {', '.join(params)})"]
    missing = [p for p in params if p not in documented]
    return [f"parameters not documented: {', '.join(missing)}"] if missing else []


@pytest.mark.parametrize("qualname,obj", public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_has_numpydoc_parameters(qualname, obj):
    assert docstring_problems(obj) == []


def test_the_check_finds_what_is_missing():
    def undocumented(a):
        pass

    def no_section(a, b):
        """Does something."""

    def one_missing(a, b, *, c=1):
        """Does something.

        Parameters
        ----------
        a, b : int
            Numbers.

        Returns
        -------
        int
        """

    assert docstring_problems(undocumented) == ["no docstring"]
    assert docstring_problems(no_section) == ["no Parameters section (parameters: a, b)"]
    assert docstring_problems(one_missing) == ["parameters not documented: c"]
