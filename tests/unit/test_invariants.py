"""The method test matrix: every invariant for every registered method (``tokvis.list_methods()``).

Token counts follow the schedule, composition equals the dense product, kept/depth are consistent,
each image of a batch is reduced as if alone, and no reduction leaves the unpatched model's output.
The facts each method needs (conventions, class token, learned, ...) are in ``tests.invariants.METHOD_MATRIX``;
a guard fails when a method is registered without an entry.
"""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.invariants import (
    MATRIX_SCHEDULES,
    block_token_counts,
    case_for,
    check_batch_items_independent,
    check_composition_kept_depth,
    check_no_reduction,
    expected_counts,
    matrix_gaps,
    method_for,
    schedule_id,
)
from tests.models import EVA_FLAVOURS, FLAVOURS, make_images, make_model
from tokvis.errors import UnsupportedModelError
from tokvis.methods import get_method_class, register_method
from tokvis.methods.base import Method

METHODS = tokvis.list_methods()  # the registry, not the matrix: a method without entry fails here too
IDS = [f"{m}-{schedule_id(kw)}" for m, kw in MATRIX_SCHEDULES]
NO_REDUCTION_FLAVOURS = list(FLAVOURS) + list(EVA_FLAVOURS)  # every supported family


# -- the guard ---------------------------------------------------------------------------------
def test_matrix_covers_exactly_the_registered_methods():
    missing, extra = matrix_gaps()
    assert not missing, f"registered methods without an entry in tests/invariants.py METHOD_MATRIX: {missing}"
    assert not extra, f"METHOD_MATRIX entries for methods that are not registered: {extra}"


def test_guard_catches_a_method_registered_without_an_entry():
    from tokvis.methods import registry

    @register_method("_matrix_dummy")
    class Dummy(Method):
        pass

    try:
        assert "_matrix_dummy" in tokvis.list_methods()
        missing, _ = matrix_gaps()
        assert missing == ["_matrix_dummy"]
    finally:
        del registry._REGISTRY["_matrix_dummy"]
    assert matrix_gaps() == ([], [])


@pytest.mark.parametrize("name", METHODS)
def test_matrix_entry_states_the_methods_facts(name):
    """The matrix's facts agree with the class (so an invariant is never skipped by a wrong entry)."""
    case, cls = case_for(name), get_method_class(name)
    method, _ = method_for(name)
    assert tuple(case.conventions) == tuple(cls.conventions)
    assert case.needs_class_token == method.requires_class_token
    assert case.learned == (hasattr(method, "mark_fitted") and method.learned)  # dpcknn: merge="learned" only
    assert {next(k for k in ("keep_rate", "r") if k in kw) for kw in case.schedules} == set(case.conventions), (
        "every supported convention has a reducing schedule in the matrix"
    )


# -- the invariants ----------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", NO_REDUCTION_FLAVOURS)
@pytest.mark.parametrize("name", METHODS)
def test_no_reduction_equals_unpatched(name, flavour):
    if flavour in ("avgpool", "eva_rope_reg_gap", "eva02_gap") and case_for(name).needs_class_token:
        model = make_model(flavour)
        with pytest.raises(UnsupportedModelError, match="no class token"):
            tokvis.patch(model, method_for(name)[0], keep_rate=1.0)
        return
    check_no_reduction(name, flavour)


@pytest.mark.parametrize("flavour", ["cls", "registers"])
@pytest.mark.parametrize("method,kw", MATRIX_SCHEDULES, ids=IDS)
def test_token_counts_follow_schedule(flavour, method, kw):
    model, x = make_model(flavour), make_images(flavour)
    obj, sched = method_for(method, kw)
    tokvis.patch(model, obj, **sched)
    counts = block_token_counts(model, x)
    expect = expected_counts(method, kw, 64, 6)
    _, trace = tokvis.run_with_trace(model, x)
    if case_for(method).adaptive:  # the sequence has the budget's length, padded where an image keeps fewer
        assert counts == expect, (counts, expect)
        for layer in trace.layers:
            assert bool((trace.token_counts(layer) <= expect[layer]).all())
            assert trace.decision(layer).n_out == expect[layer]
        return
    assert counts == expect
    for layer in trace.layers:
        d = trace.decision(layer)
        assert d.n_out == counts[layer]
        assert d.kind == obj.kind
        if d.kind != "soft":  # a soft slot may be nobody's arg-max: it holds no patch of its own
            assert trace.token_counts(layer).tolist() == [counts[layer]] * 3


@pytest.mark.parametrize("method,kw", MATRIX_SCHEDULES, ids=IDS)
def test_composition_kept_depth(method, kw):
    for flavour in case_for(method).flavours:
        check_composition_kept_depth(flavour, method, kw)


@pytest.mark.parametrize("method,kw", MATRIX_SCHEDULES, ids=IDS)
def test_batch_items_independent(method, kw):
    check_batch_items_independent(method, kw)


@pytest.mark.parametrize("method,kw", MATRIX_SCHEDULES, ids=IDS)
def test_same_input_same_decisions(method, kw):
    """Deterministic methods: a second forward of the same batch (same shapes) repeats it bit for bit;
    a fresh method object with the same options too (learned ones are seeded)."""
    if not case_for(method).deterministic:
        pytest.skip("the matrix marks this method as stochastic")
    model, x = make_model("registers"), make_images("registers")
    runs = []
    for _ in range(2):
        obj, sched = method_for(method, kw)
        tokvis.patch(model, obj, **sched)
        with torch.no_grad():
            runs.append(tokvis.run_with_trace(model, x))
    (out_a, tr_a), (out_b, tr_b) = runs
    assert torch.equal(out_a, out_b)
    assert tr_a.layers == tr_b.layers
    for layer in tr_a.layers:
        assert torch.equal(tr_a.decision(layer).dst, tr_b.decision(layer).dst)
        assert torch.equal(tr_a.labels(layer), tr_b.labels(layer))


# -- method-specific -----------------------------------------------------------------------------
def test_pruning_keeps_highest_cls_attention():
    """Top-K keeps exactly the tokens with the largest recorded score."""
    model, x = make_model(), make_images()
    tokvis.patch(model, "topk", keep_rate=0.5)
    _, trace = tokvis.run_with_trace(model, x)
    for d in trace.decisions:
        k = d.n_out
        top = d.score.topk(k, dim=1).indices
        expect = torch.zeros_like(d.keep).scatter_(1, top, True)
        assert torch.equal(d.keep, expect)
        assert bool((d.dst[d.keep] >= 0).all()) and bool((d.dst[~d.keep] == -1).all())


def test_evit_fused_token_holds_the_dropped():
    model, x = make_model(), make_images()
    tokvis.patch(model, "evit", keep_rate=0.5)
    _, trace = tokvis.run_with_trace(model, x)
    d = trace.decision(trace.layers[0])
    assert bool((d.dst[~d.keep] == d.n_out - 1).all())
    assert bool((d.dst >= 0).all()), "EViT drops nothing: the rest is fused"
    assert torch.allclose(d.weight[~d.keep], d.score[~d.keep])
    # patches never disappear with EViT: every one is in some token
    assert bool((trace.labels(5) >= 0).all())
