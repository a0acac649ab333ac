"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023)."""

from __future__ import annotations

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import bipartite_matching, compose, merge_mean
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice


@register_method("tome")
class ToMe(Method):
    """Token merging with bipartite soft matching.

    At each reducing block, after the attention and before the MLP: patch
    tokens are split alternately into sets A (even positions) and B (odd
    positions); each A token is paired with its most similar B token by cosine
    similarity of the keys averaged over heads; the ``r`` best-matched A tokens
    are merged into their partners by a size-weighted average (sizes = number
    of patches a token holds).  Prefix tokens are never merged.  With
    proportional attention the attention logits get ``+log(size)`` per key in
    every block after the first merge.

    Under the ``r`` convention ``r`` is capped at half the patch tokens of the
    block, as in ToMe.  Under ``keep_rate`` a stage may need to remove more than
    half: the matching is then repeated within the block (the keys of merged
    tokens are size-weighted averages) until the budget is met, and recorded as
    one decision.

    Parameters
    ----------
    prop_attn : bool
        Proportional attention (default True).
    """

    kind = "merge"
    needs = frozenset({"keys"})

    def __init__(self, *, prop_attn: bool = True) -> None:
        super().__init__()
        self.proportional_attention = bool(check_choice("prop_attn", prop_attn, (True, False), error=MethodOptionError))

    def options(self) -> dict:
        return {"prop_attn": self.proportional_attention}

    def max_removal(self, n_in: int, convention: str) -> int:
        return n_in // 2 if convention == "r" else max(n_in - 1, 0)

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        p = ctx.num_prefix
        assert ctx.keys is not None
        metric = ctx.keys[:, :, p:].mean(1)  # [B, n, d]
        size = ctx.patch_size
        B, n = size.shape
        dst = torch.arange(n, device=size.device).expand(B, n).clone()
        keep = torch.ones(B, n, dtype=torch.bool, device=size.device)
        cur_n, cur_metric, cur_size = n, metric, size
        while cur_n > ctx.target:
            r = min(cur_n - ctx.target, cur_n // 2)
            if r <= 0:
                break
            d, k = bipartite_matching(cur_metric, r)
            new_n = cur_n - r
            cur_metric = merge_mean(cur_metric, d, new_n, cur_size)
            cur_size = cur_size.new_zeros(B, new_n + 1).scatter_add_(1, d.clamp(min=0), cur_size)[:, :new_n]
            keep = keep & k.gather(1, dst)
            dst = compose(dst, d)
            cur_n = new_n
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=cur_n, weight=size)
