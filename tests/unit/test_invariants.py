"""Invariants of every method and schedule: token counts, composition, kept/depth, batch independence."""

from __future__ import annotations

import math

import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.schedule import default_locations

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


def _block_token_counts(model, x, num_prefix):
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1] - num_prefix)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def _expected_counts(method, kw, n, depth):
    counts, cur = [], n
    if "keep_rate" in kw:
        locs = kw.get("locations", default_locations(depth))
        for layer in range(depth):
            if layer in locs:
                s = locs.index(layer) + 1
                budget = math.floor(n * kw["keep_rate"] ** s + 1e-9)
                cur = budget + (1 if method == "evit" and budget < cur else 0)
            counts.append(cur)
        return counts
    r = kw["r"]
    per = (
        r if isinstance(r, list) else [r if layer in kw.get("locations", range(depth)) else 0 for layer in range(depth)]
    )
    for layer in range(depth):
        rr = per[layer]
        if method == "tome":
            rr = min(rr, cur // 2)
        if rr:
            cur = cur - rr + (1 if method == "evit" else 0)
        counts.append(cur)
    return counts


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("method,kw", CASES)
def test_token_counts_follow_schedule(flavour, method, kw):
    model, x = make_model(flavour), make_images(flavour)
    tokvis.patch(model, method, **kw)
    counts = _block_token_counts(model, x, model.num_prefix_tokens)
    assert counts == _expected_counts(method, kw, 64, 6)
    _, trace = tokvis.run_with_trace(model, x)
    for layer in trace.layers:
        assert trace.decision(layer).n_out == counts[layer]


def _dense_labels(trace, layer):
    """Labels from the dense product of per-layer assignment matrices (independent of the gather path)."""
    B, N = trace.num_images, trace.num_patches
    M = torch.eye(N, dtype=torch.float64).expand(B, N, N)
    for d in trace.decisions:
        if d.layer > layer:
            break
        M = d.assignment_matrix() @ M  # [B, n_out, N]
    col = M.sum(1)  # 1 if the patch is in some token, 0 if dropped
    return torch.where(col > 0, M.argmax(1), -1), col


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("method,kw", CASES)
def test_composition_kept_depth(flavour, method, kw):
    model, x = make_model(flavour), make_images(flavour, n=4)
    tokvis.patch(model, method, **kw)
    _, trace = tokvis.run_with_trace(model, x)
    assert trace.layers, "a reducing schedule records decisions"
    depth = trace.depth()
    prev_kept = torch.ones(4, 64, dtype=torch.bool)
    for layer in range(-1, 6):
        labels, kept = trace.labels(layer), trace.kept(layer)
        dense, col = _dense_labels(trace, layer)
        # each original patch belongs to exactly one token or is dropped
        assert set(col.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(labels, dense)
        if layer in trace.layers:
            assert int(labels.max()) < trace.decision(layer).n_out
        assert bool((labels >= -1).all())
        assert not bool((kept & (labels < 0)).any()), "kept implies labels >= 0"
        assert not bool((kept & ~prev_kept).any()), "a patch never becomes its own token again"
        # depth is the first block after which the patch is not its own token
        assert torch.equal(kept, depth > layer)
        # kept patches hold distinct tokens
        for b in range(4):
            own = labels[b][kept[b]]
            assert own.unique().numel() == own.numel()
        prev_kept = kept


@pytest.mark.parametrize("method,kw", CASES)
def test_batch_items_independent(method, kw):
    model, x = make_model("registers", dtype=torch.float64), make_images("registers", n=3, dtype=torch.float64)
    tokvis.patch(model, method, **kw)
    _, batch = tokvis.run_with_trace(model, x)
    for i in range(3):
        _, single = tokvis.run_with_trace(model, x[i : i + 1])
        assert single.layers == batch.layers
        for layer in batch.layers:
            assert torch.equal(single.labels(layer)[0], batch.labels(layer)[i])
            assert torch.equal(single.kept(layer)[0], batch.kept(layer)[i])
            assert torch.equal(single.decision(layer).dst[0], batch.decision(layer).dst[i])


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
