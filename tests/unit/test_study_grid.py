"""The study's whole keep-rate grid runs with every registered method (issue 10 §3).

"Which Tokens to Use?" reduces at blocks 3, 6, 9 of 12 with keep rates 0.9 / 0.7 / 0.5 / 0.25:
stage ``s`` keeps ``floor(N * rho**s)`` patch tokens.  At 0.5 and 0.25 a stage removes more than
half of a block's tokens, beyond one round of bipartite matching (ToMe, MCTF): MCTF (and ToMe with
``budget="exact"``) repeats the matching inside the block; ToMe by default caps each stage's removals
at half, as the study's ``tome.py`` does.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokvis
from tests.invariants import block_token_counts, expected_counts
from tests.models import make_model, warns_if_unfitted
from tokvis.methods.base import ReductionContext
from tokvis.methods.mctf import MCTF
from tokvis.methods.ops import apply_decision, compose

STUDY_KEEP_RATES = (0.9, 0.7, 0.5, 0.25)
STUDY_LOCATIONS = (3, 6, 9)
IMG, PATCH = 56, 4  # a 14 x 14 grid: N = 196 patches, as DeiT-S at 224 px in the study


def _expected(rho: float, n: int) -> list[int]:
    return [math.floor(n * rho**s + 1e-9) for s in (1, 2, 3)]


def test_grid_covers_every_registered_method():
    assert len(tokvis.list_methods()) >= 13
    assert {"tome", "mctf", "vomix", "ats", "evit", "topk"} <= set(tokvis.list_methods())


@pytest.mark.parametrize("rho", STUDY_KEEP_RATES)
@pytest.mark.parametrize("method", tokvis.list_methods())
def test_every_method_runs_the_study_schedule(method, rho):
    model = make_model("cls", depth=12, img_size=IMG, patch_size=PATCH)
    n = (IMG // PATCH) ** 2
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    tokvis.patch(model, method, keep_rate=rho)
    with warns_if_unfitted(model):  # learned methods warn while unfitted
        out, trace = tokvis.run_with_trace(model, x)
        counts = block_token_counts(model, x)
    assert bool(torch.isfinite(out).all())
    assert trace.layers == STUDY_LOCATIONS
    # per block, from the schedule's definition: EViT's fused token takes one more slot; ToMe keeps the study's
    # per-stage removals capped at half (more than the budget at 0.5 and 0.25); ATS's sequence is its levels
    want = expected_counts(method, {"keep_rate": rho}, n, 12)
    budgets = _expected(rho, n)
    for layer, budget in zip(STUDY_LOCATIONS, budgets, strict=True):
        per_image = trace.token_counts(layer)
        assert trace.decision(layer).n_out == want[layer]
        if method == "ats":  # adaptive: at most its levels (tokens hit by several levels count once)
            assert bool((per_image <= want[layer]).all()) and bool((per_image >= 1).all())
        elif trace.decision(layer).kind != "soft":  # soft: a slot may be no patch's arg-max
            assert per_image.tolist() == [want[layer]] * 2, (layer, per_image.tolist(), want[layer])
        if method not in ("tome", "evit"):
            assert want[layer] == budget  # the others meet the study's budgets exactly
    # the blocks really run on the reduced sets: constant between reductions (ATS's sequence padded)
    assert counts == want


# -- MCTF: rounds inside a block ------------------------------------------------------------------
def _context(num_prefix: int, n: int, *, seed: int = 0, sizes: bool = False) -> ReductionContext:
    g = torch.Generator().manual_seed(seed)
    B, H, C = 2, 3, 16
    T = num_prefix + n
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    size = torch.ones(B, T, dtype=torch.float64)
    if sizes:
        size[:, num_prefix:] = torch.randint(1, 5, (B, n), generator=g).double()
    attn = torch.randn(B, H, T, T, generator=g, dtype=torch.float64).softmax(-1)
    return ReductionContext(layer=3, x=x, size=size, num_prefix=num_prefix, target=n, n_patches=n, attn=attn)


def _column_sum(attn: torch.Tensor, dst: torch.Tensor, p: int, n_out: int) -> torch.Tensor:
    """Attention map with key columns summed per output slot (rows: the block's original queries)."""
    B, H, T, _ = attn.shape
    cols = attn[..., p:]
    idx = dst[:, None, None, :].expand(B, H, T, -1)
    summed = cols.new_zeros(B, H, T, n_out).scatter_add_(3, idx, cols)
    return torch.cat([attn[..., :p], summed], -1)


def _two_steps(method: MCTF, ctx: ReductionContext, first_target: int, target: int):
    """The same reduction as two decisions: ``n -> first_target`` (half at most), then ``-> target``."""
    p = ctx.num_prefix
    ctx.target = first_target
    d1 = method.decide(ctx)
    x1, s1 = apply_decision(ctx.x, ctx.size, d1, num_prefix=p)
    ctx2 = ReductionContext(
        layer=ctx.layer,
        x=x1,
        size=s1,
        num_prefix=p,
        target=target,
        n_patches=ctx.n_patches,
        attn=_column_sum(ctx.attn, d1.dst, p, d1.n_out),
    )
    d2 = method.decide(ctx2)
    x2, s2 = apply_decision(x1, s1, d2, num_prefix=p)
    return d1, d2, x2, s2


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize(
    "options",
    [{}, {"bidirectional": False}, {"pooling": "size"}, {"order": "original"}, {"criteria": ("similarity", "size")}],
)
@pytest.mark.parametrize("target", [20, 9])  # 64 -> 32 -> 20 (two rounds); 64 -> 32 -> 16 -> 9 (three)
def test_mctf_rounds_equal_successive_decisions(num_prefix, options, target):
    """One decision removing more than half == the first half-round, then the rest on the fused tokens."""
    n = 64
    method = MCTF(**options)
    ctx = _context(num_prefix, n, sizes=True)
    ctx.target = target
    d = method.decide(ctx)
    assert d.n_out == target
    assert sorted(set(d.dst[0].tolist())) == list(range(target))
    x, s = apply_decision(ctx.x, ctx.size, d, num_prefix=num_prefix)

    d1, d2, x2, s2 = _two_steps(method, _context(num_prefix, n, sizes=True), n - n // 2, target)
    assert torch.equal(d.dst, compose(d1.dst, d2.dst))
    assert torch.equal(d.keep, d1.keep & d2.keep.gather(1, d1.dst))
    assert torch.allclose(x, x2, atol=1e-10, rtol=1e-10)
    assert torch.allclose(s, s2)
    # sizes are conserved: every patch is in exactly one output token
    assert torch.allclose(s[:, num_prefix:].sum(1), ctx.size[:, num_prefix:].sum(1))


def test_mctf_half_or_less_is_one_round():
    """Budgets up to half are the single official round: weights are the inputs' own pooling weights."""
    method = MCTF()
    ctx = _context(1, 64)
    ctx.target = 32
    d = method.decide(ctx)
    received = ctx.attn.mean(dim=(1, 2))[:, 1:]
    assert torch.equal(d.weight, ctx.size[:, 1:] * received)


@pytest.mark.parametrize("rho", [0.5, 0.25])
@pytest.mark.parametrize("kw", [{}, {"one_step_ahead": False}])
@pytest.mark.parametrize("flavour", ["distilled", "registers", "avgpool"])
def test_mctf_more_than_half_on_every_flavour(flavour, kw, rho):
    model = make_model(flavour, depth=12)
    n = model.patch_embed.num_patches
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tokvis.patch(model, "mctf", keep_rate=rho, **kw)
    out, trace = tokvis.run_with_trace(model, x)
    assert bool(torch.isfinite(out).all())
    assert [trace.decision(layer).n_out for layer in trace.layers] == _expected(rho, n)
    labels = trace.labels(trace.layers[-1])
    assert bool((labels >= 0).all())  # fusion drops nothing
