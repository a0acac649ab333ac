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
