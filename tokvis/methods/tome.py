"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023)."""

from __future__ import annotations

from typing import ClassVar

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import ORDERS, bipartite_matching, merge_tokens
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice

BUDGETS = ("study", "exact")


@register_method("tome")
class ToMe(Method):
    """Token merging with bipartite soft matching, as the official code does it.

    At each reducing block, after the attention and before the MLP, the tokens
    are split into sets A and B alternately over the *whole* sequence, prefix
    tokens included (sequence position ``t`` is in A when ``t`` is even), as in
    facebookresearch/ToMe: with a class token it is position 0 of A, so patch
    ``j`` is in A when ``j`` is odd.  Each A token is paired with its most
    similar B token by cosine similarity of the keys averaged over heads; the
    ``r`` best-matched A tokens are merged into their partners by a
    size-weighted average (sizes = number of patches a token holds).  With
    proportional attention the attention logits get ``+log(size)`` per key in
    every block after the first merge.

    Token order (``order="official"``, the default): after a merge the tokens
    are reordered as the official code concatenates them -- prefix tokens, the
    unmerged A tokens, then the B tokens -- which sets the next block's split.
    The recorded decision says where each token goes (``dst`` = output slot), so
    trace labels keep their meaning (patch -> token slot) whatever the order.

    Prefix tokens are never merged:

    - class token: position 0, in A, never merged (official ``class_token``);
    - distillation token: position 1, in B, receives no A token, and the output
      is class, distillation token, unmerged A, B (official ``distill_token``);
    - register tokens (timm ``reg_tokens``; unknown to the official code, which
      would merge them): the same rule for every prefix token -- those at even
      positions are A tokens without partners, those at odd positions are B
      tokens that receive nothing, and all stay first, in order;
    - no prefix token (global average pooling): nothing is protected, and the
      unmerged A tokens come in the order of decreasing best similarity, as the
      official code leaves them (it sorts them by position only with a class
      token); with prefix tokens they come by position.

    ``order="original"`` keeps tokvis's former convention instead: patch tokens
    only are split (patch ``j`` in A when ``j`` is even) and survivors keep their
    original relative order.

    Under the ``r`` convention ``r`` is capped at half the patch tokens of the
    block, as in ToMe (``budget`` does not apply).

    Under ``keep_rate``, ``budget="study"`` (the default) does what the study does
    (``models/tome.py`` of JoakimHaurum/TokenReduction): the keep rate becomes
    removals, ``int(196 rho**(s-1)) - int(196 rho**s)`` at stage ``s``
    (``tome.py:146,152-156``), each capped at half the block's patch tokens,
    ``min(r, (t - 1) // 2)`` with ``t`` counting the class token (``:252-253``).
    Until a cap binds the budgets are met; after, every stage keeps more than its
    budget: at ``rho=0.5`` 98, 49, 25 tokens for 196 patches (budgets 98, 49, 24),
    at ``rho=0.25`` 98, 61, 52 (budgets 49, 12, 3).  ``budget="exact"`` (tokvis
    before issue 17) meets every budget: where a stage must remove more than half,
    the matching is repeated within the block (the keys of merged tokens are
    size-weighted averages, the split and order rules above apply to each round)
    until the budget is met, recorded as one decision.

    Parameters
    ----------
    prop_attn : bool
        Proportional attention (default True).
    order : {"official", "original"}
        Split parity and token order (default ``"official"``, see above).
    budget : {"study", "exact"}
        Under ``keep_rate``: the study's capped per-stage removals (default) or
        the exact budget by repeated matching (see above).
    """

    kind = "merge"
    needs = frozenset({"keys"})
    #: 2: under keep_rate the study's capped removals became the default (issue 17); r= is unchanged
    decisions_version: ClassVar[int] = 2

    def __init__(self, *, prop_attn: bool = True, order: str = "official", budget: str = "study") -> None:
        super().__init__()
        self.proportional_attention = bool(check_choice("prop_attn", prop_attn, (True, False), error=MethodOptionError))
        self.order = check_choice("order", order, ORDERS, error=MethodOptionError)
        self.budget = check_choice("budget", budget, BUDGETS, error=MethodOptionError)
        #: read by the patched model: a keep rate becomes the study's capped per-stage removals
        self.keep_rate_removals = self.budget == "study"

    def options(self) -> dict:
        return {"prop_attn": self.proportional_attention, "order": self.order, "budget": self.budget}

    def max_removal(self, n_in: int, convention: str) -> int:
        return n_in // 2 if convention == "r" or self.budget == "study" else max(n_in - 1, 0)

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        p = ctx.num_prefix
        assert ctx.keys is not None
        metric = ctx.keys[:, :, p:].mean(1)  # [B, n, d]
        size = ctx.patch_size
        B, n = size.shape
        split_prefix = p if self.order == "official" else 0
        dst = keep = None
        cur_n, cur_metric, cur_size = n, metric, size
        while cur_n > ctx.target and cur_n > 1:  # cur_n // 2 > 0 tokens can go
            r = min(cur_n - ctx.target, cur_n // 2)
            d, k = bipartite_matching(cur_metric, r, num_prefix=split_prefix, order=self.order)
            # ToMe drops nothing (every dst >= 0): composing is one gather
            dst, keep = (d, k) if dst is None else (d.gather(1, dst), keep & k.gather(1, dst))
            cur_n -= r
            if cur_n > ctx.target and cur_n > 1:  # another round: the keys and sizes of the merged tokens
                cur_metric, cur_size = merge_tokens(cur_metric, d, cur_n, cur_size, cur_size)
        if dst is None:
            dst = torch.arange(n, device=size.device).expand(B, n).clone()
            keep = torch.ones(B, n, dtype=torch.bool, device=size.device)
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=cur_n, weight=size)
