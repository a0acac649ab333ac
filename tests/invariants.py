"""Invariants every reduction method must meet, as plain functions the method tests call.

Kept out of the test modules so that importing them never makes pytest collect (and run) a
parametrised test a second time under another module.
"""

from __future__ import annotations

import math

import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.schedule import default_locations


def check_no_reduction(method):
    """``r=0`` gives exactly the unpatched output; ``keep_rate=1.0`` the same up to float rounding."""
    model, x = make_model(), make_images()
    with torch.no_grad():
        ref = model(x)
        tokvis.patch(model, method, r=0)
        assert torch.equal(model(x), ref)
        tokvis.patch(model, method, keep_rate=1.0)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)


def block_token_counts(model, x) -> list[int]:
    """Patch tokens leaving each block in one forward of ``model`` on ``x``."""
    p = model.num_prefix_tokens
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1] - p)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def expected_counts(method, kw, n, depth):
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


def dense_labels(trace, layer):
    """Labels from the dense product of per-layer assignment matrices (independent of the gather path)."""
    B, N = trace.num_images, trace.num_patches
    M = torch.eye(N, dtype=torch.float64).expand(B, N, N)
    for d in trace.decisions:
        if d.layer > layer:
            break
        M = d.assignment_matrix() @ M  # [B, n_out, N]
    col = M.sum(1)  # 1 if the patch is in some token, 0 if dropped
    return torch.where(col > 0, M.argmax(1), -1), col


def check_composition_kept_depth(flavour, method, kw):
    """Composition equals the dense product; each patch in one token or dropped; kept/depth consistent."""
    model, x = make_model(flavour), make_images(flavour, n=4)
    tokvis.patch(model, method, **kw)
    _, trace = tokvis.run_with_trace(model, x)
    assert trace.layers, "a reducing schedule records decisions"
    depth = trace.depth()
    prev_kept = torch.ones(4, 64, dtype=torch.bool)
    for layer in range(-1, 6):
        labels, kept = trace.labels(layer), trace.kept(layer)
        dense, col = dense_labels(trace, layer)
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


def check_batch_items_independent(method, kw):
    """A trace of a batch equals the traces of its images one by one (float64 model)."""
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
