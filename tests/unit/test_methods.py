"""Methods and shared ops against independent, straightforward (loop-based) implementations."""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import apply_decision, bipartite_matching, rank_keep
from tokvis.trace import LayerDecision


def _partition(dst_row: list[int]) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, j in enumerate(dst_row):
        if j >= 0:
            groups.setdefault(j, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def slow_tome_round(metric: torch.Tensor, r: int) -> list[set[frozenset[int]]]:
    """ToMe's bipartite matching written with Python loops, image by image."""
    out = []
    for m in metric.tolist():
        n = len(m)
        norm = [sum(v * v for v in row) ** 0.5 for row in m]
        A, Bs = list(range(0, n, 2)), list(range(1, n, 2))
        best = {}
        for a in A:
            sims = [(sum(x * y for x, y in zip(m[a], m[b], strict=True)) / (norm[a] * norm[b]), b) for b in Bs]
            s, b = max(sims, key=lambda t: t[0])  # first maximum, as argmax
            best[a] = (s, b)
        order = sorted(A, key=lambda a: -best[a][0])
        merged = order[:r]
        groups = {b: {b} for b in Bs}
        groups.update({a: {a} for a in A if a not in merged})
        for a in merged:
            groups[best[a][1]].add(a)
        out.append({frozenset(g) for g in groups.values()})
    return out


@pytest.mark.parametrize("n,r", [(16, 3), (17, 8), (64, 20), (9, 4)])
def test_tome_matching_equals_loop_reference(n, r):
    g = torch.Generator().manual_seed(n * 100 + r)
    metric = torch.randn(4, n, 8, generator=g, dtype=torch.float64)
    dst, keep = bipartite_matching(metric, r, order="original")
    ref = slow_tome_round(metric, r)
    for b in range(4):
        assert _partition(dst[b].tolist()) == ref[b]
        # survivors: every B token and the unmerged A tokens, in order
        assert dst[b][keep[b]].tolist() == list(range(n - r))
    assert int(keep.sum()) == 4 * (n - r)


def _ctx(x, size, target, keys=None, cls_attn=None, num_prefix=1, layer=0):
    return ReductionContext(
        layer=layer,
        x=x,
        size=size,
        num_prefix=num_prefix,
        target=target,
        n_patches=x.shape[1] - num_prefix,
        keys=keys,
        cls_attn=cls_attn,
    )


def test_tome_multi_round_equals_sequential_rounds():
    """A keep-rate stage removing more than half equals successive ToMe rounds, applied one by one."""
    g = torch.Generator().manual_seed(0)
    B, n, H, d, C = 2, 20, 3, 5, 7
    keys = torch.randn(B, H, n + 1, d, generator=g, dtype=torch.float64)
    x = torch.randn(B, n + 1, C, generator=g, dtype=torch.float64)
    size = torch.ones(B, n + 1, dtype=torch.float64)
    tome = tokvis.create_method("tome")
    dec = tome.decide(_ctx(x, size, target=4, keys=keys))
    assert dec.n_out == 4
    out, out_size = apply_decision(x, size, dec, num_prefix=1)
    # sequential: rounds of r = min(excess, n // 2) on the size-weighted keys
    metric, cur_x, cur_size = keys[:, :, 1:].mean(1), x[:, 1:], size[:, 1:]
    cur = n
    while cur > 4:
        r = min(cur - 4, cur // 2)
        dd, _ = bipartite_matching(metric, r, num_prefix=1)
        step = LayerDecision(0, "merge", dd, torch.ones_like(dd, dtype=torch.bool), n_out=cur - r, weight=cur_size)
        prefix = torch.zeros(B, 1, C, dtype=torch.float64)
        both = torch.cat([prefix, cur_x], 1), torch.cat([torch.ones(B, 1, dtype=torch.float64), cur_size], 1)
        nx, ns = apply_decision(both[0], both[1], step, num_prefix=1)
        padded_metric = torch.cat([torch.zeros(B, 1, d, dtype=torch.float64), metric], 1)
        metric = apply_decision(padded_metric, both[1], step, num_prefix=1)[0][:, 1:]
        cur_x, cur_size, cur = nx[:, 1:], ns[:, 1:], cur - r
    torch.testing.assert_close(out[:, 1:], cur_x)
    torch.testing.assert_close(out_size[:, 1:], cur_size)
    assert torch.equal(out[:, :1], x[:, :1]), "prefix tokens pass through unchanged"


def test_apply_decision_equals_loop():
    g = torch.Generator().manual_seed(1)
    B, n, C, n_out, P = 3, 12, 4, 5, 2
    x = torch.randn(B, P + n, C, generator=g, dtype=torch.float64)
    size = torch.rand(B, P + n, generator=g, dtype=torch.float64) + 0.5
    size[:, :P] = 1
    dst = torch.randint(-1, n_out, (B, n), generator=g)
    weight = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1
    dec = LayerDecision(3, "merge", dst, dst >= 0, n_out=n_out, weight=weight)
    out, out_size = apply_decision(x, size, dec, num_prefix=P)
    for b in range(B):
        for j in range(n_out):
            members = [i for i in range(n) if dst[b, i] == j]
            if not members:
                assert torch.equal(out[b, P + j], torch.zeros(C, dtype=torch.float64))
                continue
            num = sum(weight[b, i] * x[b, P + i] for i in members)
            den = sum(weight[b, i] for i in members)
            torch.testing.assert_close(out[b, P + j], num / den)
            torch.testing.assert_close(out_size[b, P + j], sum(size[b, P + i] for i in members))
    assert torch.equal(out[:, :P], x[:, :P])


def test_soft_decision_is_a_matrix_product():
    g = torch.Generator().manual_seed(2)
    B, n, C, n_out = 2, 6, 3, 4
    soft = torch.rand(B, n_out, n, generator=g, dtype=torch.float64)
    soft = soft / soft.sum(-1, keepdim=True)
    x = torch.randn(B, 1 + n, C, generator=g, dtype=torch.float64)
    size = torch.ones(B, 1 + n, dtype=torch.float64)
    dec = LayerDecision(0, "soft", soft.argmax(1), torch.zeros(B, n, dtype=torch.bool), n_out=n_out, soft=soft)
    out, out_size = apply_decision(x, size, dec, num_prefix=1)
    torch.testing.assert_close(out[:, 1:], soft @ x[:, 1:])
    torch.testing.assert_close(out_size[:, 1:], soft.sum(-1))


def test_rank_keep_matches_sorting():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(5, 30, generator=g)
    dst, keep = rank_keep(s, 11)
    for b in range(5):
        top = sorted(range(30), key=lambda i: -float(s[b, i]))[:11]
        assert sorted(top) == keep[b].nonzero().flatten().tolist()
        assert dst[b][sorted(top)].tolist() == list(range(11))


def test_tome_merged_tokens_are_size_weighted_means_in_model():
    """In a real forward, each merged token equals the size-weighted mean of its inputs (recorded decision applied)."""
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    tokvis.patch(model, "tome", r=10)
    seen = {}
    blk = model.blocks[2]

    def pre_mlp(mod, inp):
        seen["after"] = inp[0]

    h = blk.norm2.register_forward_pre_hook(pre_mlp)
    captured = {}
    orig = tokvis.methods.ops.apply_decision

    def spy(xx, size, decision, *, num_prefix):
        if decision.layer == 2:
            captured["x"], captured["size"], captured["d"] = xx, size, decision
        return orig(xx, size, decision, num_prefix=num_prefix)

    import tokvis.patching as P

    P.apply_decision = spy
    try:
        with torch.no_grad():
            _, trace = tokvis.run_with_trace(model, x)
    finally:
        P.apply_decision = orig
        h.remove()
    d = trace.decision(2)
    assert torch.equal(d.dst, captured["d"].dst), "what is recorded is what was applied"
    xin, sz = captured["x"][:, 1:], captured["size"][:, 1:]
    for b in range(3):
        for j in range(d.n_out):
            members = (d.dst[b] == j).nonzero().flatten()
            ref = (xin[b, members] * sz[b, members, None]).sum(0) / sz[b, members].sum()
            torch.testing.assert_close(seen["after"][b, 1 + j], ref)


def test_proportional_attention_changes_output():
    model, x = make_model(), make_images()
    with torch.no_grad():
        tokvis.patch(model, "tome", r=8)
        with_prop = model(x)
        tokvis.patch(model, "tome", r=8, prop_attn=False)
        without = model(x)
    assert not torch.allclose(with_prop, without)


class _AttentionSpy(Method):
    """Merges the first ``2 m`` patch tokens pairwise (sizes 2 next to sizes 1: a proportional-attention bias
    that is not uniform) and keeps what the block handed it for the asked ``needs``."""

    kind = "merge"
    proportional_attention = True

    def __init__(self, stage: str, needs: set[str]) -> None:
        super().__init__()
        self.stage, self.needs = stage, frozenset(needs)
        self.seen: list[ReductionContext] = []

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        self.seen.append(ctx)
        B, n = ctx.x.shape[0], ctx.n_in
        m = n - ctx.target
        j = torch.arange(n, device=ctx.x.device)
        dst = torch.where(j < 2 * m, j // 2, j - m).expand(B, n).clone()
        keep = ((j % 2 == 0) | (j >= 2 * m)).expand(B, n).clone()
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=n - m)


@pytest.mark.parametrize("stage", ["after_attn", "in_attention", "after_block"])
def test_cls_attn_heads_is_the_class_row_of_the_full_map(stage):
    """``needs={"cls_attn_heads"}``: the per-head class-token row ``[B, H, n]`` from the one-row path equals the
    explicit map's row (proportional bias included), and its head mean is ``cls_attn``, at every stage."""
    model, x = make_model("registers"), make_images("registers")
    spy = _AttentionSpy(stage, {"attn", "cls_attn", "cls_attn_heads"})
    tokvis.patch(model, spy, r=6, locations=[1, 3])
    with torch.no_grad():
        model(x)
    assert len(spy.seen) == 2 and not bool((spy.seen[1].size == 1).all())  # the second block has a real bias
    for ctx in spy.seen:
        p, H = ctx.num_prefix, model.blocks[0].attn.num_heads
        heads = ctx.cls_attn_heads
        assert heads.shape == (x.shape[0], H, ctx.n_in) and heads.dtype == torch.float32
        torch.testing.assert_close(heads, ctx.attn[:, :, 0, p:])
        torch.testing.assert_close(ctx.cls_attn, heads.mean(1))


@pytest.mark.parametrize("stage", ["after_attn", "in_attention"])
def test_cls_attn_heads_alone_builds_no_map_and_is_float32_on_a_bf16_model(stage):
    model, x = make_model("cls").bfloat16(), make_images("cls").bfloat16()
    spy = _AttentionSpy(stage, {"cls_attn_heads"})
    tokvis.patch(model, spy, r=6, locations=[1, 3])
    with torch.no_grad():
        model(x)
    for ctx in spy.seen:
        assert ctx.attn is None and ctx.cls_attn is None
        heads = ctx.cls_attn_heads
        assert heads.dtype == torch.float32 and bool(torch.isfinite(heads).all())
        assert bool((heads.sum(-1) < 1).all())  # the class token's attention to itself and the prefix is not in it
