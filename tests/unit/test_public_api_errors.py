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
from tests.models import make_images, make_model  # noqa: E402
from tests.unit.test_compare import _trace  # noqa: E402
from tokvis.errors import TokvisError  # noqa: E402

BAD = ["bogus", -1, 2.5, float("nan"), None, [], {}, object()]
#: only the required-argument pass, for a reason: fit trains (minutes); report is the hook a method calls with a
#: LayerDecision while a model runs; patch and make_schedule need keep_rate or r, so their required arguments alone
#: are no valid call (their keywords: tests/unit/test_patching.py, tests/unit/test_schedule.py)
NO_KEYWORD_PASS = {"fit", "report", "patch", "make_schedule"}


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


class Fresh:
    """A sample value made anew for every call (a model that patch changes)."""

    def __init__(self, make):
        self.make = make


def _call(f, args, kw):
    args = [a.make() if isinstance(a, Fresh) else a for a in args]
    kw = {k: v.make() if isinstance(v, Fresh) else v for k, v in kw.items()}
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


KWARGS = '{"img_size": 32, "patch_size": 8, "depth": 4, "num_classes": 10}'


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Tiny recorded runs (random weights, 6 digits images, CLS features) and the frames tokvis makes of them."""
    import pandas as pd

    from tokvis.analysis import compare
    from tokvis.cli import main
    from tokvis.plotting import map_correlations, pair_performance

    out = tmp_path_factory.mktemp("runs") / "runs"
    common = ["--no-pretrained", "--model-kwargs", KWARGS, "--data", "digits", "--limit", "6", "--batch-size", "6",
              "--cls", "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    tiny = ["record", "--model", "vit_tiny_patch16_224", "--method", "topk", "tome", "--keep-rate", "1.0", "0.5"]
    assert main([*tiny, *common]) == 0
    assert main(["record", "--model", "vit_small_patch16_224", "--method", "topk", "--keep-rate", "0.5", *common]) == 0
    loaded = [tokvis.load_run(p) for p in sorted(out.iterdir())]
    runs = {(r.meta.method, r.meta.keep_rate): r for r in loaded if r.meta.backbone.startswith("vit_tiny")}
    small = next(r for r in loaded if r.meta.backbone.startswith("vit_small"))
    topk = [runs["topk", 1.0], runs["topk", 0.5]]
    pairs = compare(topk, by="keep_rate")
    performance = pd.DataFrame([{**{f: getattr(r.meta, f) for f in ("backbone", "method", "keep_rate", "dataset")},
                                 "top1": 0.5 + 0.1 * i} for i, r in enumerate(runs.values())])  # fmt: skip
    perf_pairs = pair_performance(pairs, performance, by="keep_rate", measure="top1", metric="iou")
    trace_path = topk[0].trace().save(out.parent / "trace.tokvis")
    fig = plt.figure()
    fig.add_subplot().plot([0, 1])
    return {
        "runs": topk, "half": [runs["topk", 0.5], runs["tome", 0.5]], "pairs": pairs, "performance": performance,
        "perf_pairs": perf_pairs, "backbones": compare([runs["topk", 0.5], small], by="backbone"),
        "map_pairs": map_correlations([runs["topk", 0.5], runs["tome", 0.5]]),
        "images": np.random.default_rng(1).random((6, 32, 32, 3)),
        "tensor_images": make_images("cls", n=2), "run_path": topk[0].path, "trace_path": trace_path, "fig": fig,
    }  # fmt: skip


def _pool(recorded):
    a = _trace([[0, 1, 2, -1], [0, 1, 2, -1]], keep_rate=0.75)
    b = _trace([[-1, 0, 1, 2], [0, 1, 2, -1]], keep_rate=0.5)
    rng = np.random.default_rng(0)
    r = recorded
    frames = [r[k].copy() for k in ("pairs", "map_pairs", "perf_pairs", "backbones")]
    return {
        "trace": [a], "trace_a": [a], "trace_b": [b], "traces": [[a, b]], "X": [rng.random((12, 4))],
        "Y": [rng.random((12, 4))], "p": [rng.random((4, 4)) + 0.1], "q": [rng.random((4, 4)) + 0.1],
        "labels_true": [np.array([[0, 0, 1, 1]])], "labels_pred": [np.array([[0, 1, 1, 1]])],
        "kept_a": [np.array([[1, 1, 0, 0]], bool)], "kept_b": [np.array([[1, 0, 1, 0]], bool)],
        "kept": [np.array([[1, 1, 0, 0]], bool), np.array([1, 1, 0, 0], bool)], "scores": [rng.random((2, 8))],
        "reference": [rng.random((2, 8))], "x": [rng.random(10), "similarity"], "y": [rng.random(10), "delta"],
        "depth": [np.array([[1, 2, 3, 0]])], "labels": [np.array([[0, 0, 1, 1]]), np.array([0, 0, 1, 1])],
        "grid_size": [(2, 2)], "k": [2], "layer": [1], "image": [rng.random((16, 16, 3))], "weights": [rng.random(4)],
        "values": [rng.random((6, 4))], "maps": [{"a": rng.random((2, 2))}], "data": [rng.random((2, 2)), *frames],
        "by": ["keep_rate"], "runs": [r["runs"]], "runs_or_traces": [r["half"]], "df": [r["perf_pairs"].copy()],
        "pairs": [r["pairs"].copy()], "performance": [r["performance"].copy()], "measure": ["top1"],
        "images": [rng.random((2, 16, 16, 3)), r["images"], r["tensor_images"]],
        "path": [r["run_path"], r["trace_path"]], "name": ["topk", "s3b_test_method"], "method": ["topk"],
        "model": [Fresh(lambda: make_model("cls"))],
        "fig": [r["fig"]],
    }  # fmt: skip


def test_every_public_function_has_sample_arguments(recorded):
    pool = _pool(recorded)
    missing = {p.id: [q.name for q in _required(p.values[0]) if q.name not in pool] for p in PUBLIC}
    assert not {k: v for k, v in missing.items() if v and k.rsplit(".", 1)[1] not in NO_KEYWORD_PASS}


def _keyword_pass():
    out = []
    for p in PUBLIC:
        name = p.values[0].__name__
        if name not in NO_KEYWORD_PASS:
            out.append(p)
    return out


@pytest.mark.parametrize("f", _keyword_pass())
def test_wrong_keyword_arguments_raise_typed_errors(f, recorded):
    import signal

    pool = _pool(recorded)
    req = _required(f)
    assert all(p.name in pool for p in req), f"no sample value for {[p.name for p in req if p.name not in pool]}"
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
    assert base is not None, "no valid call among the sample arguments: add one to _pool (no function is skipped)"
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
