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
    close = difflib.get_close_matches(value, names, n=1) or difflib.get_close_matches(value.lower(), names, n=1)
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
