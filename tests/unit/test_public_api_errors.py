"""Every public function of ``tokvis``, ``tokvis.analysis`` and ``tokvis.plotting`` called with wrong types and
out-of-range values, generated from its signature: it returns, or raises a TokvisError (issue 20 §3).

Two passes: every required argument given a wrong value; then, from a valid call found among sample arguments
named like the parameters, each keyword argument in turn given a wrong value.
"""

from __future__ import annotations

import inspect
import itertools
import warnings

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import tokvis  # noqa: E402
import tokvis.analysis  # noqa: E402
import tokvis.plotting  # noqa: E402
from tests.unit.test_compare import _trace  # noqa: E402
from tokvis.errors import TokvisError  # noqa: E402

BAD = ["bogus", -1, 2.5, float("nan"), None, [], {}, object()]
#: side effects or long work even with valid arguments: only the required-argument pass
NO_KEYWORD_PASS = {
    "fit", "list_methods", "register_method", "report", "record", "run_with_trace", "patch", "unpatch", "is_patched",
    "save_figure", "load_run", "load_trace", "create_method", "make_schedule",
}  # fmt: skip


def _public():
    out = []
    for module in (tokvis, tokvis.analysis, tokvis.plotting):
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in names:
            f = getattr(module, name)
            if inspect.isfunction(f) and name != "list_methods":
                out.append(pytest.param(f, id=f"{module.__name__}.{name}"))
    return out


PUBLIC = _public()


def _call(f, args, kw):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return f(*args, **kw)
    finally:
        plt.close("all")


def _required(f):
    ps = inspect.signature(f).parameters.values()
    return [
        p for p in ps if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]  # fmt: skip


def test_the_public_surface_is_found():
    names = {p.id for p in PUBLIC}
    assert len(names) > 60 and "tokvis.analysis.compare" in names and "tokvis.plotting.global_map" in names


@pytest.mark.parametrize("f", PUBLIC)
def test_wrong_required_arguments_raise_typed_errors(f):
    req = _required(f)
    for value in BAD:
        args = [value for p in req if p.kind != p.KEYWORD_ONLY]
        kw = {p.name: value for p in req if p.kind == p.KEYWORD_ONLY}
        try:
            _call(f, args, kw)
        except TokvisError:
            pass
        except Exception as e:  # noqa: BLE001 - the point: nothing but TokvisError
            pytest.fail(f"{f.__name__}({value!r} for every required argument) raised {type(e).__name__}: {e}")


def _pool():
    a = _trace([[0, 1, 2, -1], [0, 1, 2, -1]], keep_rate=0.75)
    b = _trace([[-1, 0, 1, 2], [0, 1, 2, -1]], keep_rate=0.5)
    rng = np.random.default_rng(0)
    return {
        "trace": [a], "trace_a": [a], "trace_b": [b], "traces": [[a, b]], "X": [rng.random((12, 4))],
        "Y": [rng.random((12, 4))], "p": [rng.random((4, 4)) + 0.1], "q": [rng.random((4, 4)) + 0.1],
        "labels_true": [np.array([[0, 0, 1, 1]])], "labels_pred": [np.array([[0, 1, 1, 1]])],
        "kept_a": [np.array([[1, 1, 0, 0]], bool)], "kept_b": [np.array([[1, 0, 1, 0]], bool)],
        "kept": [np.array([[1, 1, 0, 0]], bool)], "scores": [rng.random((2, 8))], "reference": [rng.random((2, 8))],
        "x": [rng.random(10)], "y": [rng.random(10)], "depth": [np.array([[1, 2, 3, 0]])],
        "labels": [np.array([[0, 0, 1, 1]])], "grid_size": [(2, 2)], "k": [2], "layer": [1],
        "image": [rng.random((16, 16, 3))], "weights": [rng.random(4)], "values": [rng.random((6, 4))],
        "maps": [{"a": rng.random((2, 2))}], "data": [rng.random((2, 2))], "by": ["keep_rate"],
    }  # fmt: skip


@pytest.mark.parametrize("f", [p for p in PUBLIC if p.values[0].__name__ not in NO_KEYWORD_PASS])
def test_wrong_keyword_arguments_raise_typed_errors(f):
    import signal

    pool = _pool()
    req = _required(f)
    if any(p.name not in pool for p in req):
        pytest.skip(f"no sample value for {[p.name for p in req if p.name not in pool]}")
    base = None
    for combo in itertools.product(*[pool[p.name] for p in req]):
        args = [v for p, v in zip(req, combo, strict=True) if p.kind != p.KEYWORD_ONLY]
        kw = {p.name: v for p, v in zip(req, combo, strict=True) if p.kind == p.KEYWORD_ONLY}
        try:
            _call(f, args, kw)
        except TokvisError:
            continue
        base = (args, kw)
        break
    if base is None:
        pytest.skip("no valid call among the sample arguments")
    params = inspect.signature(f).parameters.values()
    optional = [p for p in params if p.default is not p.empty and p.name not in ("ax", "axes")]

    def slow(*_):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, slow)
    fails = []
    try:
        for p in optional:
            for value in BAD:
                signal.alarm(5)  # a wrong value that makes a loop long (n_boot=2.5 ...) is not what this tests
                try:
                    _call(f, base[0], {**base[1], p.name: value})
                except (TokvisError, TimeoutError):
                    pass
                except Exception as e:  # noqa: BLE001
                    fails.append(f"{f.__name__}(..., {p.name}={value!r}) raised {type(e).__name__}: {str(e)[:100]}")
                finally:
                    signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not fails, "\n".join(fails)
