"""The three places a method can decide: before the block, after the attention, inside the attention."""

from __future__ import annotations

import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import rank_keep
from tokvis.trace import LayerDecision


class _NormPrune(Method):
    """Keep the tokens with the largest norm (a deterministic test method)."""

    kind = "prune"

    def __init__(self, stage: str):
        self.stage = stage
        super().__init__()

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        score = ctx.x[:, ctx.num_prefix :].norm(dim=-1)
        dst, keep = rank_keep(score, ctx.target)
        return LayerDecision(ctx.layer, "prune", dst, keep, n_out=min(ctx.target, ctx.n_in), score=score)


def _keep_rows(x, keep, p):
    return torch.cat([x[:, :p], x[:, p:][keep].reshape(x.shape[0], -1, x.shape[-1])], 1)


def test_before_block_runs_the_block_on_the_reduced_set():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    ref = make_model(dtype=torch.float64)
    tokvis.patch(model, _NormPrune("before_block"), keep_rate=0.5, locations=[2])
    captured = {}
    h = model.blocks[2].register_forward_hook(lambda m, i, o: captured.update(inp=i[0], out=o))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    h.remove()
    keep = trace.decision(2).keep
    expect = ref.blocks[2](_keep_rows(captured["inp"], keep, 1))
    torch.testing.assert_close(captured["out"], expect)


def test_in_attention_default_reduces_queries_and_residual():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    ref = make_model(dtype=torch.float64)
    tokvis.patch(model, _NormPrune("in_attention"), keep_rate=0.5, locations=[2])
    captured = {}
    h = model.blocks[2].register_forward_hook(lambda m, i, o: captured.update(inp=i[0], out=o))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
        h.remove()
        keep = trace.decision(2).keep
        blk = ref.blocks[2]
        inp = captured["inp"]
        # reference: kept queries attend to every key/value; residual of the kept tokens
        hn = blk.norm1(inp)
        B, T, C = hn.shape
        qkv = blk.attn.qkv(hn).reshape(B, T, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        rows = torch.cat([torch.ones(B, 1, dtype=torch.bool), keep], 1)
        q_kept = q.transpose(1, 2)[rows].reshape(B, -1, blk.attn.num_heads, q.shape[-1]).transpose(1, 2)
        a = ((q_kept * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        a = blk.attn.proj(a.transpose(1, 2).reshape(B, -1, C))
        y = _keep_rows(inp, keep, 1) + a
        y = y + blk.mlp(blk.norm2(y))
    torch.testing.assert_close(captured["out"], y)


def test_in_attention_identity_equals_unpatched():
    model, x = make_model(), make_images()
    with torch.no_grad():
        ref = model(x)
        tokvis.patch(model, _NormPrune("in_attention"), keep_rate=1.0)
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
