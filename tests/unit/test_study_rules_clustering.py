"""The study's rules for K-Medoids, DPC-KNN, SiT, PatchMerger and Sinkhorn (issue 17), by plain loops.

Every reference below is written from reading the study's model files (``models/*.py`` of
github.com/JoakimHaurum/TokenReduction; file:line cited at each rule), independent of tokvis's vectorised
code; the study's code is never imported.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.errors import MethodOptionError, ScheduleError
from tokvis.methods import create_method
from tokvis.methods.kmedoids import kmedoids, pairwise_distance
from tokvis.methods.sinkhorn import Centres

DEFAULT_PLACED = ["kmedoids", "dpcknn", "sit", "patchmerger", "sinkhorn"]


def _quiet(method):
    if hasattr(method, "mark_fitted"):
        method.mark_fitted(True)
    return method


def _run_capturing(model, method, x, **schedule):
    """Run the patched model; keep every context the method saw and every block's input."""
    seen, inputs = [], {}
    decide = method.decide

    def wrapped(ctx):
        seen.append(ctx)
        return decide(ctx)

    method.decide = wrapped
    tokvis.patch(model, method, **schedule)
    hooks = [
        blk.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, blk in enumerate(model.blocks)
    ]
    hooks += [
        blk.norm1.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(("norm1", i), a[0]))
        for i, blk in enumerate(model.blocks)
    ]
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    for h in hooks:
        h.remove()
    return {c.layer: c for c in seen}, inputs, trace


# -- placement: the study reduces the block's input --------------------------------------------------
# kmedoids.py:237-251, dpcknn.py:256-268, sit.py:115-128, patchmerger.py:115-128, sinkhorn.py:164-177: at a
# reduction location i the module is applied to x[:, num_tokens:] and only then `x = blk(x)`.
@pytest.mark.parametrize("name", DEFAULT_PLACED)
def test_default_placement_reduces_the_block_input(name):
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    seen, inputs, trace = _run_capturing(model, _quiet(create_method(name)), x, keep_rate=0.5, locations=[1, 3])
    for layer in (1, 3):
        assert seen[layer].stage == "before_block"
        assert torch.equal(seen[layer].x, inputs[layer])  # decided on the block's input
        n_out = trace.decision(layer).n_out
        assert inputs[("norm1", layer)].shape[1] == 1 + n_out  # the block itself runs on the reduced set


@pytest.mark.parametrize("name", ["dpcknn", "sit", "patchmerger", "sinkhorn"])
def test_after_attn_placement_is_an_option(name):
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    method = _quiet(create_method(name, placement="after_attn"))
    seen, inputs, trace = _run_capturing(model, method, x, keep_rate=0.5, locations=[1])
    blk = make_model(dtype=torch.float64).blocks[1]
    with torch.no_grad():
        after_attn = inputs[1] + blk.attn(blk.norm1(inputs[1]))
    torch.testing.assert_close(seen[1].x, after_attn)
    assert inputs[("norm1", 1)].shape[1] == 65  # the attention ran on all tokens
    with pytest.raises(MethodOptionError, match="placement"):
        create_method(name, placement="after_block")


# -- K-Medoids ---------------------------------------------------------------------------------------
def study_kmedoids(x: np.ndarray, weight: np.ndarray, k: int, iterations: int):
    """kmedoids.py:40-85 with token weights (the study's default, equal_weight False):
    start = top-k tokens by weight (:63), dist = cdist (:68), weighted_dist row i = dist[i] * w_i (:69);
    each iteration assigns to the nearest medoid (:72-73), then for every cluster k masks the rows of
    non-members with 1e6 and takes the argmin of the row sums (:75-79); a final assignment (:81-82)."""
    n = len(x)
    dist = [[float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for j in range(n)] for i in range(n)]
    order = sorted(range(n), key=lambda i: (-weight[i], i))
    meds = order[:k]

    def assign(meds):
        out = []
        for i in range(n):
            ds = [dist[i][m] for m in meds]
            out.append(ds.index(min(ds)))
        return out

    for _ in range(iterations):
        cl = assign(meds)
        for c in range(k):
            totals = []
            for i in range(n):
                totals.append(sum(dist[i][j] * weight[i] for j in range(n)) if cl[i] == c else 1e6 * n)
            meds[c] = totals.index(min(totals))
    return meds, assign(meds)


@pytest.mark.parametrize("iterations", [1, 3])
def test_kmedoids_study_update_equals_loop_reference(iterations):
    g = torch.Generator().manual_seed(iterations)
    x = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    w = torch.rand(3, 20, generator=g, dtype=torch.float64) * 3
    init = torch.sort(w, dim=1, descending=True, stable=True).indices[:, :6]
    medoids, cluster = kmedoids(pairwise_distance(x, "euclidean"), init, iterations, w)
    moved = False
    for b in range(3):
        meds, cl = study_kmedoids(x[b].numpy(), w[b].numpy(), 6, iterations)
        assert medoids[b].tolist() == meds
        assert cluster[b].tolist() == cl
        moved |= sorted(meds) != sorted(init[b].tolist())
    assert moved, "the medoids must move from their start in this test"


def _attention_received(blk, tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """kmedoids.py:240 with :105-106 and :129: the block's softmax attention map (its own q, k on norm1 of its
    input), summed over the heads (dim 1) and then the queries (dim 1), patch columns; by a loop over heads."""
    h = blk.norm1(tokens)
    B, T, C = h.shape
    H = blk.attn.num_heads
    d = C // H
    qkv = blk.attn.qkv(h)
    total = torch.zeros(B, T, dtype=h.dtype)
    for head in range(H):
        q = qkv[..., head * d : (head + 1) * d]
        k = qkv[..., C + head * d : C + (head + 1) * d]
        total += ((q @ k.transpose(1, 2)) * d**-0.5).softmax(-1).sum(1)
    return total[:, num_prefix:]


def test_kmedoids_default_is_the_study_model():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    ref = make_model(dtype=torch.float64)
    method = create_method("kmedoids")
    seen, inputs, trace = _run_capturing(model, method, x, keep_rate=0.5, locations=[2, 3])
    for layer in (2, 3):
        ctx, d = seen[layer], trace.decision(layer)
        with torch.no_grad():
            # the start: attention received in the block before, over the same tokens (the block's input)
            received = _attention_received(ref.blocks[layer - 1], inputs[("norm1", layer - 1)], 1)
        torch.testing.assert_close(ctx.prev_attn_received, received)
        torch.testing.assert_close(d.score, received)
        tokens = ctx.x[:, 1:]
        for b in range(3):
            meds, cl = study_kmedoids(tokens[b].numpy(), received[b].numpy(), d.n_out, 3)
            assert torch.nonzero(d.keep[b]).flatten().tolist() == sorted(meds)
            # the same partition: the medoid of each token's cluster
            slot_of = {m: s for s, m in enumerate(sorted(meds))}
            assert d.dst[b].tolist() == [slot_of[meds[c]] for c in cl]
            # kmedoids.py:84: the block's input is the medoids' features (the prefix untouched)
            assert torch.equal(inputs[("norm1", layer)][b, 1:], tokens[b, sorted(meds)])
        assert torch.equal(inputs[("norm1", layer)][:, :1], ctx.x[:, :1])


def test_kmedoids_needs_a_block_before_and_old_options():
    model, x = make_model(), make_images()
    tokvis.patch(model, "kmedoids", keep_rate=0.5, locations=[0])
    with pytest.raises(ScheduleError, match="block 0"):
        with torch.no_grad():
            model(x)
    # a count r without locations: every block but the first (the others are left to the schedule)
    tokvis.patch(model, "kmedoids", r=4)
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    assert list(trace.layers) == [1, 2, 3, 4, 5]
    # the study's start needs no class token; the former one does
    tokvis.patch(make_model("avgpool"), "kmedoids", keep_rate=0.5)
    with pytest.raises(tokvis.errors.UnsupportedModelError):
        tokvis.patch(make_model("avgpool"), "kmedoids", keep_rate=0.5, init="cls_attn")
    method = create_method("kmedoids", init="cls_attn", update="within_cluster")
    assert method.stage == "after_attn" and method.needs == frozenset({"cls_attn"})
    for bad in ({"init": "random"}, {"update": "mean"}):
        with pytest.raises(MethodOptionError):
            create_method("kmedoids", **bad)


# -- DPC-KNN's learned merge ----------------------------------------------------------------------------
def test_dpcknn_learned_merge_is_the_studys_weighted_mean():
    """dpcknn.py:150-157: token_weight = exp(score(x)), one nn.Linear(embed_dim, 1) per location (:220);
    merge_tokens (:116-133): each cluster's token is sum_i w_i x_i / (sum_i w_i + 1e-6)."""
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    method = _quiet(create_method("dpcknn", merge="learned", seed=2))
    seen, inputs, trace = _run_capturing(model, method, x, keep_rate=0.5, locations=[1, 3])
    assert sorted(method.reducers) == ["1", "3"]
    assert not torch.equal(method.reducers["1"].weight, method.reducers["3"].weight)
    for layer in (1, 3):
        lin, d, tokens = method.reducers[str(layer)].requires_grad_(False), trace.decision(layer), seen[layer].x[:, 1:]
        out = inputs[("norm1", layer)][:, 1:]
        for b in range(3):
            for slot in range(d.n_out):
                members = [i for i in range(tokens.shape[1]) if int(d.dst[b, i]) == slot]
                w = [math.exp(float(lin.weight[0] @ tokens[b, i] + lin.bias[0])) for i in members]
                ref = sum(wi * tokens[b, i] for wi, i in zip(w, members, strict=True)) / (sum(w) + 1e-6)
                torch.testing.assert_close(out[b, slot], ref, rtol=1e-5, atol=1e-6)
    # the parameter-free default (--equal_weight) has nothing to fit or load
    with pytest.raises(MethodOptionError, match="merge='learned'"):
        tokvis.fit(make_model(), "dpcknn", make_images(), keep_rate=0.5, epochs=1, progress=False)


def test_dpcknn_learned_fits_and_warns_unfitted():
    model, x = make_model(), make_images()
    method = create_method("dpcknn", merge="learned")
    tokvis.patch(model, method, keep_rate=0.5)
    with pytest.warns(UserWarning, match="neither fitted nor loaded"):
        with torch.no_grad():
            before = model(x)
    tokvis.unpatch(model)
    fitted = tokvis.fit(model, method, make_images(n=6, seed=1), keep_rate=0.5, epochs=2, progress=False)
    assert fitted.is_fitted and sorted(fitted.reducers) == ["1", "3", "4"]
    tokvis.patch(model, fitted, keep_rate=0.5)
    with torch.no_grad():
        assert not torch.equal(model(x), before)


# -- PatchMerger ------------------------------------------------------------------------------------------
def test_patchmerger_mixes_the_layer_normed_tokens():
    """patchmerger.py:35-39: x = norm(x); attn = softmax_over_tokens(queries @ x^T * scale); out = attn @ x."""
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    method = _quiet(create_method("patchmerger"))
    seen, inputs, trace = _run_capturing(model, method, x, keep_rate=0.5, locations=[2])
    mod, tokens, out = method.reducers["2"], seen[2].x[:, 1:], inputs[("norm1", 2)][:, 1:]
    n, C = tokens.shape[1], tokens.shape[2]
    for b in range(3):
        normed = []
        for i in range(n):
            t = tokens[b, i]
            mu, var = t.mean(), ((t - t.mean()) ** 2).mean()
            normed.append((t - mu) / torch.sqrt(var + mod.norm.eps) * mod.norm.weight + mod.norm.bias)
        for j in range(mod.queries.shape[0]):
            logits = torch.stack([mod.queries[j] @ normed[i] for i in range(n)])
            w = logits.softmax(0)
            torch.testing.assert_close(out[b, j], sum(w[i] * normed[i] for i in range(n)))
            torch.testing.assert_close(trace.decision(2).soft[b, j], w)
    assert C == 64


# -- Sinkhorn -----------------------------------------------------------------------------------------------
def study_sinkhorn(tokens: np.ndarray, centres: np.ndarray, eps: float, iters: int):
    """sinkhorn.py:66-86 and :25-56 for one image, by loops: tokens and centres L2-normalised (:70, :75),
    scores [K, n] (:79, transposed at :81), log marginals -log(n + K) for slots and tokens (:47-49),
    each iteration rescales the slots then the tokens (:35-37), the plan times n + K (:54); the output
    token of slot k is sum_i plan[k, i] * normalised token i (:84)."""
    n, K = len(tokens), len(centres)
    u = [t / np.linalg.norm(t) for t in tokens]
    c = [v / np.linalg.norm(v) for v in centres]
    z = [[float(c[k] @ u[i]) / eps for i in range(n)] for k in range(K)]
    log_m = -math.log(n + K)
    a, bb = [0.0] * K, [0.0] * n
    for _ in range(iters):
        a = [log_m - math.log(sum(math.exp(z[k][i] + bb[i]) for i in range(n))) for k in range(K)]
        bb = [log_m - math.log(sum(math.exp(z[k][i] + a[k]) for k in range(K))) for i in range(n)]
    plan = np.array([[math.exp(z[k][i] + a[k] + bb[i] - log_m) for i in range(n)] for k in range(K)])
    out = np.stack([sum(plan[k, i] * u[i] for i in range(n)) for k in range(K)])
    return plan, out


@pytest.mark.parametrize("eps,iters", [(1.0, 3), (0.2, 5)])
def test_sinkhorn_study_plan_equals_loop_reference(eps, iters):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 12, 6, generator=g, dtype=torch.float64) * 3
    mod = Centres(6, 4).double()
    with torch.no_grad():
        mod.centres.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
        soft, mix = mod(x, eps=eps, iters=iters, output="study")
    for b in range(2):
        plan, out = study_sinkhorn(x[b].numpy(), mod.centres.detach().numpy(), eps, iters)
        np.testing.assert_allclose(soft[b].numpy(), plan, rtol=1e-10)
        np.testing.assert_allclose((soft[b] @ mix[b]).numpy(), out, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(plan.sum(0), np.ones(12), rtol=1e-10)  # each token's weights sum to 1


def test_sinkhorn_default_output_in_the_model():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    method = _quiet(create_method("sinkhorn"))
    seen, inputs, trace = _run_capturing(model, method, x, keep_rate=0.5, locations=[1])
    tokens, out = seen[1].x[:, 1:], inputs[("norm1", 1)][:, 1:]
    centres = method.reducers["1"].centres.detach()
    for b in range(3):
        plan, ref = study_sinkhorn(tokens[b].numpy(), centres.numpy(), 1.0, 3)
        np.testing.assert_allclose(out[b].numpy(), ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(trace.decision(1).soft[b].numpy(), plan, rtol=1e-9)
        assert trace.decision(1).dst[b].tolist() == plan.argmax(0).tolist()  # sinkhorn.py:171
    # every token's weights over the slots sum to 1, so the sizes (soft @ size) keep the patch count
    torch.testing.assert_close(trace.decision(1).soft.sum(1), torch.ones(3, 64, dtype=torch.float64))
