"""EViT: Top-K pruning plus one fused token carrying the dropped tokens."""

from __future__ import annotations

from typing import ClassVar

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import ReductionContext
from tokvis.methods.ops import rank_keep
from tokvis.methods.registry import register_method
from tokvis.methods.topk import _AttentionRanked, attention_score
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice

FUSED = ("sum", "mean")


@register_method("evit")
class EViT(_AttentionRanked):
    """EViT (Liang et al., ICLR 2022): keep the most attended tokens, fuse the rest.

    The ``target`` highest-scoring patch tokens are kept in their original
    order; every other token is fused into one extra token (the last output
    slot), weighted by its score ``a_i`` (the class token's attention averaged
    over heads).  A block therefore outputs ``target + 1`` patch tokens, and the
    fused token of one stage competes like any other token at the next.  When
    nothing is dropped (``keep_rate=1``) no fused token is made.

    What the study does (``models/evit.py`` of JoakimHaurum/TokenReduction, as
    EViT's own code): after the attention residual, before the MLP, it keeps the
    ``int(196 * rho**s)`` tokens of highest head-averaged class attention
    (``evit.py:78,82-84``; no reduction when that is the current count,
    ``:79``) and appends one token, the *unnormalised* sum of the dropped tokens
    weighted by their class attention, ``sum_i a_i x_i`` (``evit.py:119-121``).
    The kept tokens are in the order of decreasing attention there, in their
    original order here; the model's output does not depend on the order.

    Parameters
    ----------
    score : {"cls", "mean"}
        Ranking (and fusion weight) signal; "cls" needs a class token.
    fused : {"sum", "mean"}
        The fused token.  ``"sum"`` (default): ``sum_i a_i x_i``, the study's
        and EViT's.  ``"mean"``: the attention-weighted mean
        ``sum_i a_i x_i / sum_i a_i`` (tokvis's default before issue 17): a
        token of the same scale as the others, where the sum's norm shrinks
        with the dropped tokens' share of the attention.  Either way the
        fused token's size is the sum of the dropped tokens' sizes.
    """

    kind = "fuse"
    #: 2: the fused token became the study's unnormalised sum (issue 17)
    decisions_version: ClassVar[int] = 2

    def __init__(self, *, score: str = "cls", fused: str = "sum") -> None:
        super().__init__(score=score)
        self.fused = check_choice("fused", fused, FUSED, error=MethodOptionError)

    def options(self) -> dict:
        return {**super().options(), "fused": self.fused}

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        s = attention_score(ctx, self.score)
        k = ctx.target
        dst, keep = rank_keep(s, k)
        if k >= ctx.n_in:
            return LayerDecision(ctx.layer, "fuse", dst, keep, n_out=ctx.n_in, score=s)
        dst = torch.where(keep, dst, k)
        weight = torch.where(keep, torch.ones_like(s), s)
        return LayerDecision(
            ctx.layer, "fuse", dst, keep, n_out=k + 1, weight=weight, score=s, weighted_sum=self.fused == "sum"
        )
