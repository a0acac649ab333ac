"""Top-K pruning: keep the patch tokens the class token attends to most."""

from __future__ import annotations

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import rank_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice


def attention_score(ctx: ReductionContext, mode: str) -> torch.Tensor:
    """Token importance ``[B, n]`` for pruning.

    ``"cls"``: the class token's attention to each patch token, averaged over
    heads (taken after the block's attention).  ``"mean"``: the attention each
    patch token receives, averaged over heads and over every query token (for
    models without a class token).
    """
    if mode == "cls":
        assert ctx.cls_attn is not None
        return ctx.cls_attn
    assert ctx.attn is not None
    return ctx.attn.mean(1).mean(1)[:, ctx.num_prefix :]


class _AttentionRanked(Method):
    """Shared option handling of the methods that rank tokens by attention."""

    def __init__(self, *, score: str = "cls") -> None:
        super().__init__()
        self.score = check_choice("score", score, ("cls", "mean"), error=MethodOptionError)
        self.needs = frozenset({"cls_attn"} if score == "cls" else {"attn"})
        self.requires_class_token = score == "cls"
        self.no_class_token_hint = (
            "pass score='mean' to rank by the mean attention each token receives, "
            "or use a method that needs no class token (e.g. 'tome')"
        )

    def options(self) -> dict:
        return {"score": self.score}


@register_method("topk")
class TopK(_AttentionRanked):
    """Top-K pruning (as in the "Which Tokens" study and EViT without fusion).

    At each reducing block, after the attention and before the MLP, the
    ``target`` patch tokens with the highest score are kept, in their original
    order; the others are dropped.

    Parameters
    ----------
    score : {"cls", "mean"}
        Ranking signal, see :func:`attention_score`.  "cls" needs a class token.
    """

    kind = "prune"

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        s = attention_score(ctx, self.score)
        dst, keep = rank_keep(s, ctx.target)
        return LayerDecision(ctx.layer, "prune", dst, keep, n_out=min(ctx.target, ctx.n_in), score=s)
