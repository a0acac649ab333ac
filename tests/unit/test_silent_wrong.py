"""Issue 20 §2 and §3, the Python API: what gave a silent wrong result, or an untyped exception, now raises a
typed error (a TokvisError subclass of the matching built-in) that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tests.unit.test_compare import _trace
from tokvis.analysis import compare, compare_maps, global_maps, importance_agreement
from tokvis.errors import TokvisError, TraceMismatchError


def _prune_and_merge():
    a = _trace([[0, 1, 2, -1], [0, 1, 2, -1]], method="topk")
    b = _trace([[0, 0, 1, 1], [0, 0, 1, 1]], kind="merge", keep=[[1, 0, 1, 0]] * 2, method="tome")
    return a, b


def test_compare_layers_as_a_string_is_refused_not_iterated():
    a = _trace([[0, 1, 2, -1], [0, 1, 2, -1]], keep_rate=0.75)
    b = _trace([[-1, 0, 1, 2], [0, 1, 2, -1]], keep_rate=0.5)
    with pytest.raises(TypeError, match=r"layers must be a list of block indices, e.g. layers=\[12\]") as e:
        compare([a, b], by="keep_rate", layers="12")
    assert isinstance(e.value, TokvisError)
    assert set(compare([a, b], by="keep_rate", layers=[1]).layer) == {1}  # the list form works


def test_compare_of_a_pruning_and_a_merging_method_raises_instead_of_an_empty_frame():
    with pytest.raises(TraceMismatchError, match="mixes a pruning and a merging pattern"):
        compare(list(_prune_and_merge()), by="method")


def test_duplicate_image_ids_are_refused_when_recording():
    model = make_model()
    tokvis.patch(model, "topk", keep_rate=0.5)
    x = make_images(n=3)
    with pytest.raises(TraceMismatchError, match="more than once") as e:
        tokvis.run_with_trace(model, x, image_ids=["a", "b", "a"])
    assert "'a'" in str(e.value)
    with pytest.raises(TraceMismatchError, match="more than once"):
        with tokvis.record(model, image_ids=["a", "a", "b"]):
            model(x)
    _, trace = tokvis.run_with_trace(model, x, image_ids=["a", "b", "c"])  # unique ids work
    assert trace.image_ids == ["a", "b", "c"]


def test_duplicate_ids_in_compare_are_named_as_duplicates():
    a = _trace([[0, 1, 2, -1], [0, 1, 2, -1]], keep_rate=0.75, ids=("a", "b"))
    b = _trace([[-1, 0, 1, 2], [0, 1, 2, -1]], keep_rate=0.5, ids=("a", "a"))
    with pytest.raises(TraceMismatchError, match="holds image id 'a' more than once"):
        compare([a, b], by="keep_rate")


@pytest.mark.parametrize("value", ["no", "yes", 1, 0, None])
def test_load_run_check_takes_only_booleans(tmp_path, value):
    with pytest.raises(TypeError, match="check must be True or False") as e:
        tokvis.load_run(tmp_path, check=value)
    assert isinstance(e.value, TokvisError)


# -- §3: each listed call gets a typed error, with "did you mean" where a name is close ---------------------------
def _pair():
    a = _trace([[0, 1, 2, -1], [0, 1, 2, -1]], keep_rate=0.75)
    b = _trace([[-1, 0, 1, 2], [0, 1, 2, -1]], keep_rate=0.5)
    return a, b


@pytest.mark.parametrize(
    "call, builtin, match",
    [
        (lambda a, b: compare([a, b], by="keeprate"), ValueError, "did you mean 'keep_rate'"),
        (lambda a, b: compare([a, b], by="keep_rate", metric="iouu"), ValueError, "did you mean 'iou'"),
        (lambda a, b: compare([a, b], by="keep_rate", dropped="drop"), ValueError, "one of 'exclude', 'group'"),
        (lambda a, b: compare_maps(a, b, metrics="kll"), ValueError, "did you mean 'kl'"),
        (lambda a, b: compare_maps(a, b, metrics="KLD12"), ValueError, "convention='study'"),
        (lambda a, b: compare_maps(a, b, maps="dept"), ValueError, "did you mean 'depth'"),
        (lambda a, b: compare([1, 2], by="keep_rate"), TypeError, "traces[0] is not a Trace"),
        (lambda a, b: compare(["runs/x", "runs/x"], by="keep_rate"), TypeError, "tokvis.load_run(path)"),
        (lambda a, b: global_maps([a]), TypeError, "not a list"),
        (lambda a, b: global_maps(None), TypeError, "trace must be a Trace"),
        (lambda a, b: global_maps(a, layer=9), IndexError, "layer must be an integer in [-1, 2]"),
        (lambda a, b: a.labels(9), IndexError, "layer must be in [-1, 2]"),
        (lambda a, b: tokvis.load_run(5), TypeError, "path must be a run directory"),
        (lambda a, b: importance_agreement(np.ones((1, 4)), np.ones((1, 4)), k=0), ValueError, "k must be"),
        (
            lambda a, b: importance_agreement(np.array([[np.nan, 1, 2, 3.0]]), np.ones((1, 4)), k=2),
            ValueError,
            "NaN",
        ),
    ],
)
def test_listed_api_calls_raise_typed_errors(call, builtin, match):
    a, b = _pair()
    with pytest.raises(builtin) as e:
        call(a, b)
    assert isinstance(e.value, TokvisError), type(e.value).__mro__
    assert match in str(e.value), str(e.value)


def test_patch_with_a_number_or_an_object_with_options_is_typed():
    model = make_model()
    with pytest.raises(TypeError) as e:
        tokvis.patch(model, 3, keep_rate=0.5)
    assert isinstance(e.value, TokvisError) and "method must be" in str(e.value)
    with pytest.raises(TypeError) as e:
        tokvis.patch(model, tokvis.create_method("topk"), keep_rate=0.5, score="cls")
    assert isinstance(e.value, TokvisError) and "create_method('topk'" in str(e.value)
    assert not tokvis.is_patched(model)


def test_run_labels_out_of_range_is_typed():
    t = _trace([[0, 1, 2, -1], [0, 1, 2, -1]])
    with pytest.raises(IndexError) as e:
        t.labels(9)
    assert isinstance(e.value, TokvisError)
    with pytest.raises(TypeError) as e:
        t.labels("1")
    assert isinstance(e.value, TokvisError)
    assert torch.equal(t.labels(1), t.labels(np.int64(1)))
