"""The method registry: ``register_method``, ``create_method``, ``list_methods``, ``parse_method_spec``."""

from __future__ import annotations

import difflib
import inspect
import json
from typing import Any, Callable, TypeVar

from tokvis.errors import MethodOptionError, UnknownMethodError
from tokvis.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`Method` subclass under ``name``.

    Parameters
    ----------
    name : str
        The name ``tokvis.patch(model, name)`` and ``tokvis methods`` will use.
    """

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method expects a Method subclass: got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    if not isinstance(name, str):
        from tokvis.errors import ArgumentTypeError

        raise ArgumentTypeError(f"a method name must be a string (tokvis.list_methods()): got {name!r}")
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownMethodError(
            f"unknown reduction method {name!r}{hint} Registered methods: {', '.join(list_methods())}"
        ) from None


def create_method(name: str, **options) -> Method:
    """Instantiate the method registered as ``name`` with ``options``.

    Parameters
    ----------
    name : str
        A registered name (:func:`list_methods`).
    **options
        The method's options (keyword arguments of its class).

    Raises
    ------
    UnknownMethodError
        No method has that name.
    MethodOptionError
        An option is unknown or out of range.
    """
    cls = get_method_class(name)
    valid = option_defaults(cls)
    unknown = [k for k in options if k not in valid]
    if unknown:
        from tokvis.validate import did_you_mean

        raise MethodOptionError(
            f"method {name!r} has no option {unknown[0]!r}{did_you_mean(unknown[0], valid)}; {describe_options(name)}"
        )
    try:
        return cls(**options)
    except TypeError as e:
        raise MethodOptionError(f"bad options for method {name!r} ({e}); {describe_options(name)}") from e


def option_defaults(method: str | type[Method]) -> dict[str, Any]:
    """The options of a method (keyword arguments of its constructor) and their defaults.

    Parameters
    ----------
    method : str or Method class
        A registered name or the class.
    """
    cls = get_method_class(method) if isinstance(method, str) else method
    params = inspect.signature(cls.__init__).parameters.values()
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: p.default for p in params if p.name != "self" and p.kind in kinds}


def describe_options(method: str | type[Method]) -> str:
    """``its options (defaults): k=5, merge='average'`` or ``it has no options``, for messages and listings.

    Parameters
    ----------
    method : str or Method class
    """
    defaults = option_defaults(method)
    if not defaults:
        return "it has no options"
    shown = ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k for k, v in defaults.items())
    return f"its options (defaults): {shown}"


def parse_option(text: str) -> tuple[str, object]:
    """``"eps=0.1"`` -> ``("eps", 0.1)``: the value is parsed as JSON, or kept as a string.

    Raises
    ------
    MethodOptionError
        ``text`` is not ``KEY=VALUE``.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise MethodOptionError(f"method options are KEY=VALUE (e.g. eps=0.1): got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """A method with options in one string: ``"sinkhorn:eps=0.1,iters=5"`` -> ``("sinkhorn", {...})``.

    The name alone (``"tome"``) gives no options.  Values are parsed as JSON
    (numbers, ``true`` / ``false``, quoted strings), other text stays a string.
    """
    name, _, opts = spec.partition(":")
    return name, dict(parse_option(item) for item in opts.split(",") if item)
