"""EViT: Top-K pruning plus one fused token carrying the dropped tokens."""

from __future__ import annotations

import torch

from tokvis.methods.base import ReductionContext
from tokvis.methods.ops import rank_keep
from tokvis.methods.registry import register_method
from tokvis.methods.topk import _AttentionRanked, attention_score
from tokvis.trace import LayerDecision


@register_method("evit")
class EViT(_AttentionRanked):
    """EViT (Liang et al., ICLR 2022): keep the most attended tokens, fuse the rest.

    The ``target`` highest-scoring patch tokens are kept in their original
    order; every other token is fused into one extra token (the last output
    slot), weighted by its score: ``fused = sum_i a_i x_i / sum_i a_i``.  A block
    therefore outputs ``target + 1`` patch tokens, and the fused token of one
    stage competes like any other token at the next.  When nothing is dropped
    (``keep_rate=1``) no fused token is made.

    Parameters
    ----------
    score : {"cls", "mean"}
        Ranking (and fusion weight) signal; "cls" needs a class token.
    """

    kind = "fuse"

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        s = attention_score(ctx, self.score)
        k = ctx.target
        dst, keep = rank_keep(s, k)
        if k >= ctx.n_in:
            return LayerDecision(ctx.layer, "fuse", dst, keep, n_out=ctx.n_in, score=s)
        dst = torch.where(keep, dst, k)
        weight = torch.where(keep, torch.ones_like(s), s)
        return LayerDecision(ctx.layer, "fuse", dst, keep, n_out=k + 1, weight=weight, score=s)
