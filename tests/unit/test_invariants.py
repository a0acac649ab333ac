"""Invariants of every method and schedule: token counts, composition, kept/depth, batch independence."""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.invariants import (
    block_token_counts,
    check_batch_items_independent,
    check_composition_kept_depth,
    expected_counts,
)
from tests.models import make_images, make_model

CASES = [
    ("tome", {"r": 5}),
    ("tome", {"r": 20}),  # capped at half the tokens per block
    ("tome", {"r": [0, 8, 0, 30, 2, 1]}),
    ("tome", {"keep_rate": 0.7}),
    ("tome", {"keep_rate": 0.3}),  # needs several matching rounds per block
    ("topk", {"keep_rate": 0.7}),
    ("topk", {"keep_rate": 0.5, "locations": [0, 2, 5]}),
    ("topk", {"r": 6}),
    ("evit", {"keep_rate": 0.7}),
    ("evit", {"keep_rate": 0.25}),
    ("evit", {"r": 4, "locations": [1, 4]}),
]
FLAVOURS = ["cls", "registers", "distilled"]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("method,kw", CASES)
def test_token_counts_follow_schedule(flavour, method, kw):
    model, x = make_model(flavour), make_images(flavour)
    tokvis.patch(model, method, **kw)
    counts = block_token_counts(model, x)
    assert counts == expected_counts(method, kw, 64, 6)
    _, trace = tokvis.run_with_trace(model, x)
    for layer in trace.layers:
        assert trace.decision(layer).n_out == counts[layer]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("method,kw", CASES)
def test_composition_kept_depth(flavour, method, kw):
    check_composition_kept_depth(flavour, method, kw)


@pytest.mark.parametrize("method,kw", CASES)
def test_batch_items_independent(method, kw):
    check_batch_items_independent(method, kw)


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
