"""MCTF: multi-criteria weights, bidirectional matching, one-step-ahead attention, ToMe reduction."""

from __future__ import annotations

import math

import pytest
import torch

import tokvis
from tests.invariants import (
    block_token_counts,
)
from tests.models import make_images, make_model
from tokvis.errors import MethodOptionError, ScheduleError
from tokvis.methods.mctf import MCTF, bidirectional_matching, multi_criteria_weights
from tokvis.methods.ops import bipartite_matching
from tokvis.schedule import make_schedule


def _groups(dst: torch.Tensor) -> list[set[frozenset[int]]]:
    """Partition of the tokens of each image, by output slot (independent of slot numbering)."""
    out = []
    for row in dst.tolist():
        g: dict[int, set[int]] = {}
        for i, d in enumerate(row):
            g.setdefault(d, set()).add(i)
        out.append({frozenset(v) for v in g.values()})
    return out


def _loop_weights(metric, received, size, tau_sim, tau_info, tau_size):
    B, n, _ = metric.shape
    na, nb = (n + 1) // 2, n // 2
    w = torch.ones(B, na, nb, dtype=torch.float64)
    for b in range(B):
        inv_a = [1 / received[b, i].item() for i in range(n)]
        inv_s = [1 / size[b, i].item() for i in range(n)]
        for i in range(na):
            for j in range(nb):
                u, v = metric[b, 2 * i], metric[b, 2 * j + 1]
                val = 1.0
                if tau_sim:
                    cos = (u @ v / (u.norm() * v.norm())).item()
                    val *= ((cos + 1) / 2) ** (1 / tau_sim)
                if tau_info:
                    val *= (inv_a[2 * i] * inv_a[2 * j + 1] / max(inv_a) ** 2) ** (1 / tau_info)
                if tau_size:
                    val *= (inv_s[2 * i] * inv_s[2 * j + 1] / max(inv_s) ** 2) ** (1 / tau_size)
                w[b, i, j] = val
    return w


def _loop_matching(w, n, r, bidirectional):
    """Slow reference of bidirectional bipartite matching: groups of original positions."""
    out = []
    for wb in w.tolist():
        na, nb = len(wb), len(wb[0])
        r1 = r // 2 if bidirectional else r
        best = [(max(wb[i]), i) for i in range(na)]
        order = sorted(range(na), key=lambda i: (-best[i][0], i))
        groups = {("b", j): {2 * j + 1} for j in range(nb)}
        groups.update({("a", i): {2 * i} for i in range(na)})
        merged_a = set(order[:r1])
        for i in order[:r1]:
            j = max(range(nb), key=lambda j: (wb[i][j], -j))
            groups[("b", j)] |= groups.pop(("a", i))
        if bidirectional and r - r1:
            left = [i for i in range(na) if i not in merged_a]
            best2 = {j: max(wb[i][j] for i in left) for j in range(nb)}
            order2 = sorted(range(nb), key=lambda j: (-best2[j], j))
            for j in order2[: r - r1]:
                i = max(left, key=lambda i: (wb[i][j], -i))
                groups[("a", i)] |= groups.pop(("b", j))
        out.append({frozenset(v) for v in groups.values()})
    return out


@pytest.mark.parametrize("n", [10, 11])
def test_weights_match_loop_reference(n):
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    received = torch.rand(2, n, generator=g, dtype=torch.float64) + 0.05
    size = torch.randint(1, 5, (2, n), generator=g).double()
    got = multi_criteria_weights(metric, received, size, tau_sim=1.0, tau_info=20.0, tau_size=40.0)
    torch.testing.assert_close(got, _loop_weights(metric, received, size, 1.0, 20.0, 40.0))
    only_sim = multi_criteria_weights(metric, None, None, tau_sim=2.0, tau_info=None, tau_size=None)
    torch.testing.assert_close(only_sim, _loop_weights(metric, received, size, 2.0, None, None))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("n,r", [(12, 6), (12, 5), (13, 3), (9, 4), (8, 1)])
def test_matching_matches_loop_reference(n, r, bidirectional):
    g = torch.Generator().manual_seed(n * 10 + r)
    w = torch.rand(3, (n + 1) // 2, n // 2, generator=g, dtype=torch.float64)
    dst, keep, score = bidirectional_matching(w, n, r, bidirectional=bidirectional, order="original")
    assert _groups(dst) == _loop_matching(w, n, r, bidirectional)
    assert int(dst.max()) == n - r - 1 and bool((keep.sum(1) == n - r).all())
    # the survivor of each group is its kept token; kept tokens keep their order
    for b in range(3):
        assert torch.equal(dst[b][keep[b]], torch.arange(n - r))
    torch.testing.assert_close(score[:, ::2], w.max(-1).values)


def test_similarity_only_one_direction_is_tome_matching():
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(4, 30, 8, generator=g)
    w = multi_criteria_weights(metric, None, None, tau_sim=1.0, tau_info=None, tau_size=None)
    for r in (1, 7, 15):
        dst, keep, _ = bidirectional_matching(w, 30, r, bidirectional=False)
        d_ref, k_ref = bipartite_matching(metric, r)
        assert torch.equal(keep, k_ref) and torch.equal(dst, d_ref)


class _Spy(MCTF):
    """MCTF that keeps the contexts it decided on."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def decide(self, ctx):
        d = super().decide(ctx)
        self.seen.append((ctx.x[:, ctx.num_prefix :].clone(), d))
        return d


@pytest.mark.parametrize("one_step_ahead", [True, False])
def test_model_decisions_reduce_to_tome(one_step_ahead):
    """In the model, similarity-only one-direction MCTF partitions the tokens as ToMe's matching does."""
    model, x = make_model("registers"), make_images("registers")
    spy = _Spy(criteria=("similarity",), bidirectional=False, one_step_ahead=one_step_ahead)
    tokvis.patch(model, spy, r=6, locations=list(range(6)))
    with torch.no_grad():
        model(x)
    assert len(spy.seen) == 6
    for metric, d in spy.seen:
        d_ref, k_ref = bipartite_matching(metric, 6, num_prefix=model.num_prefix_tokens)
        assert torch.equal(d.keep, k_ref) and torch.equal(d.dst, d_ref)


@pytest.mark.parametrize(
    "kw,expect",
    [
        ({"r": 5}, [64, 59, 54, 49, 44, 39]),  # a count: blocks 1.. (the authors' scripts)
        ({"r": 20}, [64, 44, 24, 12, 6, 3]),  # capped at half the tokens
        ({"r": 0.25}, [64, 48, 48, 36, 27, 27]),  # a fraction of the tokens entering blocks [1, 3, 4]
        ({"keep_rate": 0.7}, [64, 44, 44, 31, 21, 21]),  # default locations [1, 3, 4]
    ],
)
def test_token_counts(kw, expect):
    model, x = make_model("distilled"), make_images("distilled")
    tokvis.patch(model, "mctf", **kw)
    assert block_token_counts(model, x) == expect


def test_one_step_ahead_block_matches_dense_reference():
    """The reducing block's output, rebuilt from dense merge matrices (an independent path)."""
    model, x = make_model("registers", dtype=torch.float64), make_images("registers", dtype=torch.float64)
    ref = make_model("registers", dtype=torch.float64)
    tokvis.patch(model, "mctf", keep_rate=0.5, locations=[2])
    cap = {}
    h = model.blocks[2].register_forward_hook(lambda m, i, o: cap.update(inp=i[0], out=o))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
        h.remove()
        d = trace.decision(2)
        blk, inp, p = ref.blocks[2], cap["inp"], model.num_prefix_tokens
        B, T, C = inp.shape
        H = blk.attn.num_heads
        n, n_out = d.n_in, d.n_out

        def qkv(t):
            q, k, v = blk.attn.qkv(blk.norm1(t)).reshape(B, t.shape[1], 3, H, -1).permute(2, 0, 3, 1, 4)
            return q, k, v

        q, k, v = qkv(inp)
        A = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # sizes are 1: no proportional bias yet
        received = A.mean((1, 2))[:, p:]
        S = d.assignment_matrix().to(inp.dtype)  # [B, n_out, n] 0/1
        W = S * received[:, None, :]  # attention x size (size 1) pooling
        W = W / W.sum(-1, keepdim=True)
        eye = torch.eye(p, dtype=inp.dtype).expand(B, p, p)
        Wf = torch.stack([torch.block_diag(eye[b], W[b]) for b in range(B)])  # rows: pooled queries / tokens
        Sf = torch.stack([torch.block_diag(eye[b], S[b]) for b in range(B)])  # columns: summed keys
        x_hat = Wf @ inp
        A_hat = Wf[:, None] @ A @ Sf.transpose(1, 2)[:, None]
        _, _, v_hat = qkv(x_hat)
        a = blk.attn.proj((A_hat @ v_hat).transpose(1, 2).reshape(B, p + n_out, C))
        y = x_hat + blk.ls1(a)
        y = y + blk.ls2(blk.mlp(blk.norm2(y)))
    assert n_out == 32 and n == 64
    torch.testing.assert_close(cap["out"], y)
    torch.testing.assert_close(A_hat.sum(-1), torch.ones(B, H, p + n_out, dtype=inp.dtype))


def test_pooling_weights_are_attention_times_size():
    model, x = make_model(), make_images()
    spy = _Spy()
    tokvis.patch(model, spy, r=8, locations=list(range(6)))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    assert trace.decision(1).weight is not None
    # block 0: every size is 1, so the weight is the attention received (positive, < 1)
    w0 = trace.decision(0).weight
    assert bool((w0 > 0).all()) and bool((w0 < 1).all())
    # later blocks: weight / attention = size, which counts patches (integers >= 1)
    sizes = trace.decision(1).weight / spy_received(model, x, layer=1)
    torch.testing.assert_close(sizes, sizes.round(), atol=1e-4, rtol=1e-4)
    assert bool((sizes.round() >= 1).all()) and int(sizes.round().max()) >= 2


def spy_received(model, x, *, layer):
    got = {}
    method = model.tokvis_method
    orig = method.attention_received

    def grab(ctx):
        a = orig(ctx)
        if ctx.layer == layer:
            got["a"] = a
        return a

    method.attention_received = grab
    try:
        with torch.no_grad():
            model(x)
    finally:
        del method.attention_received
    return got["a"]


@pytest.mark.parametrize(
    "kw",
    [
        {"criteria": ()},
        {"criteria": ("similarity", "colour")},
        {"criteria": ("size", "size")},
        {"tau_sim": 0},
        {"tau_info": -1.0},
        {"tau_size": math.inf},
        {"pooling": "max"},
        {"metric": "values"},
        {"one_step_ahead": "yes"},
    ],
)
def test_bad_options(kw):
    with pytest.raises(MethodOptionError):
        MCTF(**kw)


def test_keep_rate_needing_more_than_half_meets_the_budget():
    model, x = make_model(), make_images()
    tokvis.patch(model, "mctf", keep_rate=0.3)
    assert block_token_counts(model, x)[-1] == 1  # floor(64 * 0.3**3); the rounds: tests/unit/test_study_grid.py


def test_fractional_r_schedule():
    s = make_schedule(12, r=0.1)
    assert s.target(0, 256, 256) == 231 and s.target(5, 100, 256) == 90
    assert make_schedule(4, r=[0.5, 0, 3, 0.0]).target(3, 10, 16) is None
    for bad in (1.5, -0.2, float("nan"), [0.1, "x", 0, 0]):
        with pytest.raises(ScheduleError):
            make_schedule(4, r=bad)


@pytest.mark.slow
def test_real_backbone():
    model = tokvis.zoo.create("dinov2_small_offline")
    images, _ = tokvis.data.load_images(model)
    images = images[:2]
    with torch.no_grad():
        ref = model(images)
        tokvis.patch(model, "mctf", keep_rate=0.7)
        out, trace = tokvis.run_with_trace(model, images)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    assert [trace.decision(layer).n_out for layer in trace.layers] == [179, 125, 87]
    assert float(torch.nn.functional.cosine_similarity(out, ref).min()) > 0.5


def test_down_to_one_token_then_nothing_to_fuse():
    """r capped at half reaches a single patch token: later blocks leave it alone (was an IndexError)."""
    model, x = make_model("patch14", img_size=56), make_images("patch14")[:, :, :56, :56]  # 16 patches
    every = list(range(model.depth if hasattr(model, "depth") else len(model.blocks)))
    tokvis.patch(model, "mctf", r=5, locations=every)  # MCTF's own default skips block 0
    counts = block_token_counts(model, x)
    assert counts[-2:] == [1, 1]
    tokvis.patch(model, "tome", r=5, locations=every)
    assert block_token_counts(model, x) == counts  # as ToMe does
