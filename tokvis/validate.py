"""One set of argument checks, used by the library, the methods and the command line.

Each check returns the value (converted where that is safe) or raises ``error`` (a
:class:`~tokvis.errors.TokvisError` subclass, :class:`~tokvis.errors.ArgumentValueError` by default) with a message that
names the argument, what was expected and what was given.  Booleans are never accepted as
numbers (``True`` is an ``int`` in Python, never what a user meant by a count).  No torch here:
:mod:`tokvis.analysis` uses these too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

from tokvis.errors import ArgumentValueError


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, error: type = ArgumentValueError
) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound optional)."""
    ok = _is_int(value)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            want = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            want = f"an integer >= {minimum}"
        elif maximum is not None:
            want = f"an integer <= {maximum}"
        else:
            want = "an integer"
        raise error(f"{name} must be {want}: got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    error: type = ArgumentValueError,
) -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high``.

    ``low_open`` / ``high_open`` exclude the bound.  NaN is always refused; infinity only
    passes where the interval includes it.
    """
    ok = _is_number(value) and not math.isnan(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise error(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}: got {value!r}")
    return float(value)


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` when a choice is close to ``value`` (difflib), else ``""``."""
    import difflib

    if not isinstance(value, str):
        return ""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.7) or difflib.get_close_matches(
        value.lower(), names, n=1, cutoff=0.7
    )
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, choices: Iterable[Any], *, error: type = ArgumentValueError) -> Any:
    """``value`` if it is one of ``choices`` (the message suggests the nearest one)."""
    choices = list(choices)
    try:
        ok = value in choices
    except TypeError:  # an unhashable or uncomparable value is not a choice
        ok = False
    if not ok:
        hint = did_you_mean(value, choices)
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}: got {value!r}{hint}")
    return value


def _what(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}" if len(text) <= 60 else type(value).__name__


def check_trace(name: str, value: Any) -> Any:
    """``value`` if it is a :class:`~tokvis.trace.Trace` or a loaded run (``meta``, ``labels``, ``kept``)."""
    import os

    from tokvis.errors import ArgumentTypeError

    if isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"{name} is a path ({value!s}): open it first with tokvis.load_run (a run store) or tokvis.load_trace "
            "(a trace file)"
        )
    if not all(hasattr(value, a) for a in ("meta", "labels", "kept")):
        raise ArgumentTypeError(f"{name} must be a Trace or a loaded run (tokvis.load_run): got {_what(value)}")
    return value


def check_traces(name: str, value: Any) -> list:
    """``value`` as a list of traces / loaded runs (:func:`check_trace` for each)."""
    import os

    from tokvis.errors import ArgumentTypeError

    if hasattr(value, "meta") and hasattr(value, "labels"):
        raise ArgumentTypeError(f"{name} must be a list of Traces or runs: got one; pass [trace_a, trace_b, ...]")
    if value is None or isinstance(value, (str, bytes, os.PathLike, dict)) or not hasattr(value, "__iter__"):
        raise ArgumentTypeError(f"{name} must be a list of Traces or loaded runs: got {_what(value)}")
    items = list(value)
    for i, t in enumerate(items):
        check_trace(f"{name}[{i}]", t)
    return items


def check_path(name: str, value: Any) -> Any:
    """``value`` if it is a non-empty path (str or os.PathLike)."""
    import os

    from tokvis.errors import ArgumentTypeError

    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ArgumentTypeError(f"{name} must be a file path (str or pathlib.Path): got {_what(value)}")
    return value


def as_array(name: str, value: Any, *, dtype: Any = float) -> Any:
    """``value`` as a numpy array of ``dtype`` (tensors are detached and moved to the CPU); typed errors."""
    import numpy as np

    from tokvis.errors import ArgumentTypeError

    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy() if dtype is float else value.detach().cpu().numpy()
    if value is None or isinstance(value, (str, bytes, dict)):
        raise ArgumentTypeError(f"{name} must be an array of numbers: got {_what(value)}")
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(f"{name} must be an array of numbers: got {_what(value)} ({e})") from None


def check_names(name: str, value: Any) -> tuple:
    """``value`` (one name or an iterable of names) as a tuple of strings."""
    from tokvis.errors import ArgumentTypeError

    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise ArgumentTypeError(f"{name} must be a name or a list of names: got {_what(value)}")
    items = tuple(value)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise ArgumentTypeError(f"{name} must be a name or a list of names: got {_what(bad[0])} in it")
    return items


def check_seed(name: str, value: Any) -> Any:
    """``value`` if it can seed numpy's random generator: ``None``, an int >= 0, or a ``numpy.random.Generator``."""
    import numpy as np

    from tokvis.errors import ArgumentTypeError

    if value is None or isinstance(value, (np.random.Generator, np.random.SeedSequence)):
        return value
    if not _is_int(value) or value < 0:
        raise ArgumentTypeError(f"{name} must be an integer >= 0 (or None): got {_what(value)}")
    return value


def check_out_file(flag: str, path: Any, *, error: type = ArgumentValueError) -> Any:
    """Raise ``error`` unless a file can be written at ``path``: not a folder, and its folder (or the nearest
    existing one above it) accepts a new file.  Checked before work whose result would be lost."""
    import os
    from pathlib import Path

    from tokvis.fileio import temp_path

    out = Path(path)
    if out.is_dir():
        raise error(f"{flag} {path} is an existing folder: give a file name (e.g. {out / 'out.safetensors'})")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{flag} {path}: {parent} is a file, not a folder")
    probe = temp_path(parent / out.name)
    try:
        with open(probe, "wb"):
            pass
    except OSError as e:
        raise error(f"{flag} {path}: cannot write in {parent} ({e.strerror or e}); give a writable location") from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return path


# ----------------------------------------------------------------------------------------------
# keyword arguments checked against the annotations of a public function's signature
# ----------------------------------------------------------------------------------------------

#: annotation names checked by :func:`checked_keywords` (any other name leaves the argument unchecked)
_SIMPLE = {"int", "float", "str", "bool", "None"}
_CONTAINERS = {"Sequence": "sequence", "list": "sequence", "tuple": "sequence", "Mapping": "mapping", "dict": "mapping"}


def _parse_annotation(node: Any) -> list | None:
    """An annotation (an ``ast`` expression) as a list of alternatives: ``"int"``, ``("sequence", item)``,
    ``("mapping", value)``; None when some alternative is not one this module knows (then nothing is checked)."""
    import ast

    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _parse_annotation(node.left), _parse_annotation(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.Constant) and node.value is None:
        return ["None"]
    if isinstance(node, ast.Name) and node.id in _SIMPLE:
        return [node.id]
    if isinstance(node, ast.Name) and node.id in _CONTAINERS:
        return [(_CONTAINERS[node.id], None)]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in _CONTAINERS:
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        # the items (a mapping's values; its keys are not checked): any, when their annotation is not known here
        return [(_CONTAINERS[node.value.id], _parse_annotation(args[-1]))]
    return None


def _matches(value: Any, kinds: list | None) -> bool:
    """Whether ``value`` is of one of ``kinds`` (:func:`_parse_annotation`; None: anything)."""
    from collections.abc import Mapping

    import numpy as np

    if kinds is None:
        return True
    for kind in kinds:
        if kind == "None" and value is None:
            return True
        if kind == "int" and _is_int(value):
            return True
        if kind == "float" and _is_number(value):
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind == "bool" and isinstance(value, (bool, np.bool_)):
            return True
        if isinstance(kind, tuple) and kind[0] == "mapping" and isinstance(value, Mapping):
            if all(_matches(v, kind[1]) for v in value.values()):
                return True
        if isinstance(kind, tuple) and kind[0] == "sequence" and _is_sequence(value):
            if all(_matches(v, kind[1]) for v in value):
                return True
    return False


def _is_sequence(value: Any) -> bool:
    """A list, tuple, array, ... of items: sized and iterable, not a string or a mapping."""
    from collections.abc import Mapping

    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__") or not hasattr(value, "__len__"):
        return False
    return getattr(value, "ndim", 1) != 0  # a 0-d array has a __len__ that raises


def _describe(kinds: list, *, plural: bool = False) -> str:
    """``kinds`` (:func:`_parse_annotation`) in words: ``"an integer or None"``, ``"a list of strings"``."""
    one = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False", "None": "None"}
    many = {"int": "integers", "float": "numbers", "str": "strings", "bool": "booleans", "None": "None"}
    parts = []
    for kind in kinds:
        if isinstance(kind, tuple):
            if kind[0] == "mapping":  # its keys are not checked
                inner = "" if kind[1] is None else f" of name -> {_describe(kind[1])}"
                parts.append(f"{'mappings' if plural else 'a mapping'}{inner}")
            else:
                inner = "" if kind[1] is None else f" of {_describe(kind[1], plural=True)}"
                parts.append(f"{'lists' if plural else 'a list'}{inner}")
        else:
            parts.append((many if plural else one)[kind])
    return " or ".join(parts)


def checked_keywords(**rules: Any):
    """Decorator: check the arguments a caller gives a public function against its signature's annotations.

    Before the call, each argument given for a parameter annotated with ``int``, ``float`` (a real number, not
    NaN), ``str``, ``bool``, ``None``, ``Sequence[...]`` (a list, tuple or array) or ``Mapping[..., ...]``, or a
    union of these, is checked; any other annotation (``Any``, ``Axes``, ...) leaves it to the function.
    Booleans are not numbers.  A wrong type raises :class:`~tokvis.errors.ArgumentTypeError`.

    Parameters
    ----------
    **rules
        Per parameter: a mapping of bounds, passed to :func:`check_int` (``minimum``, ``maximum``) or
        :func:`check_float` (``low``, ``high``, ...) for a number of that type (out of them:
        :class:`~tokvis.errors.ArgumentValueError`), and ``nan=True`` to let a float be NaN; or a callable
        ``check(name, value)`` that replaces the annotation's check (e.g. :func:`check_seed`,
        :func:`check_colormap`).

    Returns
    -------
    callable
        The decorator; the function it returns keeps the signature and docstring.
    """
    import ast
    import functools
    import inspect

    from tokvis.errors import ArgumentTypeError

    def decorate(func):
        signature = inspect.signature(func)
        unknown = set(rules) - set(signature.parameters)
        if unknown:
            raise TypeError(f"checked_keywords: {func.__name__} has no parameter {sorted(unknown)}")
        kinds = {}
        for p in signature.parameters.values():
            text = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", None)
            if text is None or p.annotation is p.empty:
                continue
            parsed = _parse_annotation(ast.parse(text, mode="eval").body)
            if parsed is not None:
                kinds[p.name] = parsed

        def check(name: str, value: Any) -> None:
            rule = rules.get(name)
            if callable(rule):
                rule(name, value)
                return
            if name not in kinds:
                return
            if not _matches(value, kinds[name]):
                raise ArgumentTypeError(f"{func.__name__}: {name} must be {_describe(kinds[name])}: got {_what(value)}")
            bounds = dict(rule or {})
            if _is_int(value) and "int" in kinds[name]:
                check_int(name, value, **bounds)
            elif _is_number(value) and "float" in kinds[name]:
                if not (bounds.pop("nan", False) and math.isnan(float(value))):
                    check_float(name, value, **bounds)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as e:
                hint = ""
                extra = [k for k in kwargs if k not in signature.parameters]
                if extra:
                    hint = did_you_mean(extra[0], signature.parameters)
                raise ArgumentTypeError(f"{func.__name__}: {e}{hint}") from None
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind not in (
                    inspect.Parameter.VAR_POSITIONAL,
                    inspect.Parameter.VAR_KEYWORD,
                ):
                    check(name, value)
            return func(*args, **kwargs)

        wrapper.__signature__ = signature
        return wrapper

    return decorate


def check_colormap(name: str, value: Any) -> Any:
    """``value`` if matplotlib knows it as a colormap: a registered name or a ``Colormap``."""
    import matplotlib
    from matplotlib.colors import Colormap

    from tokvis.errors import ArgumentTypeError

    if isinstance(value, Colormap):
        return value
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a colormap name (e.g. 'viridis') or a Colormap: got {_what(value)}")
    if value not in matplotlib.colormaps:
        hint = did_you_mean(value, list(matplotlib.colormaps))
        raise ArgumentValueError(f"{name} {value!r} is not a matplotlib colormap{hint}: see matplotlib.colormaps")
    return value


def legend_locations() -> tuple[str, ...]:
    """The ``loc`` strings a matplotlib legend accepts, with the figure legends' ``"outside ..."`` ones.

    Returns
    -------
    tuple of str
    """
    from matplotlib.legend import Legend

    inside = tuple(Legend.codes)
    corners = ("right upper", "right lower", "left upper", "left lower")
    outside = tuple(f"outside {c}" for c in (*inside, *corners) if c not in ("best", "center"))
    return inside + outside


def check_legend_location(name: str, value: Any) -> Any:
    """``value`` if it is one of :func:`legend_locations`."""
    return check_choice(name, value, legend_locations())


def check_figure_or_axes(name: str, value: Any, *, optional: bool = True) -> Any:
    """``value`` if it is a matplotlib Figure, SubFigure or Axes (or None when ``optional``)."""
    from matplotlib.axes import Axes
    from matplotlib.figure import FigureBase

    from tokvis.errors import ArgumentTypeError

    if (value is None and optional) or isinstance(value, (Axes, FigureBase)):
        return value
    raise ArgumentTypeError(f"{name} must be a matplotlib Figure or Axes{' (or None)' if optional else ''}: "
                            f"got {_what(value)}")  # fmt: skip


def check_color(name: str, value: Any) -> Any:
    """``value`` if matplotlib reads it as a colour (``"white"``, ``"#ff0000"``, an RGB(A) tuple in [0, 1])."""
    from matplotlib.colors import is_color_like

    if is_color_like(value):
        return value
    raise ArgumentValueError(
        f"{name} must be a colour ('white', '#rrggbb' or an RGB tuple in [0, 1]): got {_what(value)}"
    )


def check_format_spec(name: str, value: Any) -> Any:
    """``value`` if it is a format spec for a number (``".2f"``, ``".1%"``)."""
    from tokvis.errors import ArgumentTypeError

    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a format spec string such as '.2f': got {_what(value)}")
    try:
        format(0.5, value)
    except (ValueError, TypeError):
        raise ArgumentValueError(f"{name} {value!r} is not a format spec for numbers: e.g. '.2f' or '.0%'") from None
    return value


def optional(check: Any) -> Any:
    """``check`` that also lets ``None`` through (a rule for :func:`checked_keywords`).

    Parameters
    ----------
    check : callable
        ``check(name, value)``.

    Returns
    -------
    callable
    """

    def allow_none(name: str, value: Any) -> Any:
        return value if value is None else check(name, value)

    return allow_none
