"""MCTF: Multi-Criteria Token Fusion with one-step-ahead attention (Lee et al., CVPR 2024)."""

from __future__ import annotations

import math

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import (
    ORDERS,
    apply_decision,
    compose,
    decision_dtype,
    merge_mean,
    sub_into,
)
from tokvis.methods.registry import register_method
from tokvis.schedule import default_locations
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice, check_float

CRITERIA = ("similarity", "informativeness", "size")
_E = MethodOptionError


def multi_criteria_weights(
    metric: torch.Tensor,
    attn_received: torch.Tensor | None,
    size: torch.Tensor | None,
    *,
    tau_sim: float | None,
    tau_info: float | None,
    tau_size: float | None,
    num_prefix: int = 0,
) -> torch.Tensor:
    """MCTF's multi-criteria weights between the two halves of a bipartite split.

    The inputs cover the whole sequence: ``num_prefix`` prefix tokens, then the
    ``n`` patch tokens.  The patch tokens are split into sets A and B as ToMe's
    official code does (:func:`tokvis.methods.ops.bipartite_split`: alternately
    over the whole sequence, so a class token is position 0 of A).  Each
    criterion gives a weight in ``(0, 1]`` that is raised to ``1 / tau`` and the
    criteria are multiplied (a criterion whose ``tau`` is ``None`` is left out):

    - similarity ``((cos(m_a, m_b) + 1) / 2) ** (1 / tau_sim)``
    - informativeness ``(u_a u_b) ** (1 / tau_info)`` with ``u = (1 / attn) / max(1 / attn)``:
      tokens that receive little attention are fused first
    - size ``(v_a v_b) ** (1 / tau_size)`` with ``v = (1 / size) / max(1 / size)``: large
      tokens are fused last

    The maxima run over the whole sequence, prefix tokens included, as in the
    official code; they rescale every weight of an image by the same factor.

    Parameters
    ----------
    metric : Tensor [B, num_prefix + n, c]
        Features compared by cosine similarity.
    attn_received : Tensor [B, num_prefix + n] or None
        Mean attention each token receives (> 0); needed when ``tau_info`` is set.
    size : Tensor [B, num_prefix + n] or None
        Patches per token; needed when ``tau_size`` is set.
    tau_sim, tau_info, tau_size : float > 0 or None
        Temperatures.
    num_prefix : int
        Prefix tokens at the front (never fused; they only set the split parity
        and take part in the maxima).

    Returns
    -------
    Tensor [B, n_a, n_b]
        Weight of fusing A token ``i`` with B token ``j`` (A and B in position
        order, as given by ``bipartite_split``), in ``(0, 1]``.
    """
    fa = num_prefix + num_prefix % 2  # sequence positions of A: fa, fa + 2, ...; of B: the others (strided views)
    fb = 2 * num_prefix + 1 - fa
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, fa::2], m[:, fb::2]
    w = None  # the product of the criteria (1 * x is x: no ones to start from)
    if tau_sim is not None:
        w = _power(((a @ b.transpose(1, 2) + 1) / 2).clamp_min(0), 1.0 / tau_sim)
    for tau, value in ((tau_info, attn_received), (tau_size, size)):
        if tau is None:
            continue
        assert value is not None
        inv = 1.0 / value.clamp_min(torch.finfo(value.dtype).tiny)
        inv = inv / inv.amax(dim=1, keepdim=True)
        term = _power(inv[:, fa::2, None] * inv[:, None, fb::2], 1.0 / tau)
        w = term if w is None else w * term
    return a.new_ones(a.shape[0], a.shape[1], b.shape[1]) if w is None else w


def _power(x: torch.Tensor, e: float) -> torch.Tensor:
    """``x ** e``; ``x`` itself for ``e == 1`` (the same values, one kernel fewer)."""
    return x if e == 1.0 else x**e


def bidirectional_matching(
    weights: torch.Tensor, n: int, r: int, *, bidirectional: bool = True, num_prefix: int = 0, order: str = "official"
):
    """MCTF's (bidirectional) bipartite soft matching on precomputed weights.

    Step 1 (A -> B): every A token finds its highest-weight B token; the ``r1`` A
    tokens with the highest weights are fused into their partners.  Step 2
    (B -> A, only if ``bidirectional``): every B token (with what it received)
    finds its highest-weight partner among the A tokens left, using the same
    weights; the ``r2`` best are fused into them.  ``r1 = r // 2``, ``r2 = r - r1``
    when bidirectional, else ``r1 = r``.  Ties go to the lowest position.  The cap
    ``r <= n // 2`` is the caller's.  Sets A and B are those of
    :func:`tokvis.methods.ops.bipartite_split` for ``num_prefix`` prefix tokens.

    Output order (``order="official"``, as the official code concatenates the
    tokens): the A tokens left (by position when there are prefix tokens, else in
    the order of decreasing step-1 weight, as the official code leaves them),
    then the B tokens left: by decreasing step-2 weight when bidirectional, by
    position otherwise.  ``order="original"``: survivors keep their order.

    Parameters
    ----------
    weights : Tensor [B, n_a, n_b]
        A-to-B weights (:func:`multi_criteria_weights`).
    n : int
        Number of patch tokens.
    r : int
        Tokens to remove.
    bidirectional : bool
    num_prefix : int
        Prefix tokens before the patch tokens (they set the split parity).
    order : {"official", "original"}

    Returns
    -------
    dst : LongTensor [B, n]
        Output slot of each token.
    keep : BoolTensor [B, n]
        False for the fused tokens.
    score : Tensor [B, n]
        Best weight of each A token to B (step 1) and of each B token to the A
        tokens left (step 2; to every A token when not bidirectional).
    """
    check_choice("order", order, ORDERS)
    B, na, nb = weights.shape
    dev = weights.device
    fa = num_prefix % 2  # patches of A: fa, fa + 2, ...; of B: the others (bipartite_split, as strided views)
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    best, partner = weights.max(dim=-1)  # [B, na]
    edges = best.argsort(dim=-1, descending=True, stable=True)
    merged_a = edges[:, :r1]  # indices within A
    keep = torch.ones(B, n, dtype=torch.bool, device=dev)
    left_a = keep[:, fa::2].scatter_(1, merged_a, False)  # in place, through the view
    w2 = weights.transpose(1, 2)  # [B, nb, na]
    if bidirectional:
        w2 = w2.masked_fill(~left_a[:, None, :], -math.inf)  # only A tokens left can receive
    best2, partner2 = w2.max(dim=-1)  # [B, nb]
    score = torch.empty(B, n, dtype=weights.dtype, device=dev)
    score[:, fa::2], score[:, 1 - fa :: 2] = best, best2
    edges2 = best2.argsort(dim=-1, descending=True, stable=True)
    merged_b = edges2[:, :r2]  # indices within B
    keep[:, 1 - fa :: 2].scatter_(1, merged_b, False)
    dst = torch.empty(B, n, dtype=torch.long, device=dev)
    dst_a, dst_b = dst[:, fa::2], dst[:, 1 - fa :: 2]
    n_a = na - r1  # A tokens left
    if order == "original":  # survivors in position order (the fused tokens' slots are set below)
        torch.sub(keep.cumsum(1), 1, out=dst)
    else:
        if num_prefix > 0:  # the A tokens left by position (slot = rank among them)
            sub_into(dst_a, left_a.cumsum(1), 1)
        else:  # in the order of decreasing step-1 weight
            dst_a.scatter_(1, edges[:, r1:], torch.arange(n_a, device=dev).expand(B, -1))
        slots_b = torch.arange(n_a, n_a + nb - r2, device=dev)
        if bidirectional:  # the B tokens left by decreasing step-2 weight
            dst_b.scatter_(1, edges2[:, r2:], slots_b.expand(B, -1))
        else:  # by position
            dst_b.copy_(slots_b)
    # B -> A first: a B token that received A tokens carries them along
    dst_b.scatter_(1, merged_b, dst_a.gather(1, partner2.gather(1, merged_b)))
    dst_a.scatter_(1, merged_a, dst_b.gather(1, partner.gather(1, merged_a)))
    return dst, keep, score


@register_method("mctf")
class MCTF(Method):
    """Multi-Criteria Token Fusion (Lee et al., CVPR 2024).

    At each reducing block, patch tokens are fused by bidirectional bipartite soft
    matching (:func:`bidirectional_matching`) on multi-criteria weights
    (:func:`multi_criteria_weights`): similarity, informativeness (inverse of the
    mean attention a token receives, over heads and every query) and size, each
    raised to ``1 / tau`` and multiplied.  Each fused token is the pooled mean of
    its group weighted by attention x size, ``sum_i a_i s_i x_i / sum_i a_i s_i``.
    Prefix tokens are never fused.

    One-step-ahead attention (``one_step_ahead=True``, the paper's default): the
    decision is taken *inside* the block's attention (stage ``"in_attention"``),
    on the block's input tokens, using the attention map ``A`` this block computes
    on them (the "next layer's" attention from the previous block's point of
    view) for the informativeness and the pooling weights.  After fusing the
    residual stream, the attention is not recomputed: ``A`` is merged, its key
    columns summed per group and its query rows pooled with the same attention x
    size weights, and the block's output is ``x_fused + proj(A_merged @ V(x_fused))``
    followed by the MLP, where ``V(x_fused)`` are the values of the fused tokens
    through the block's own ``norm1`` / ``qkv``.  With ``one_step_ahead=False``
    the block runs unchanged and the decision is taken on its *output*, after the
    MLP (stage ``"after_block"``), using this block's attention map, as the
    authors' code does.

    Identical to the authors' code (mlvlab/MCTF ``utils/mctf.py`` with its DeiT,
    set up as its evaluation scripts): the same partitions and token order at
    every block, logits within float round-off.  Their conventions:

    - split: alternately over the *whole* sequence, prefix tokens included
      (:func:`tokvis.methods.ops.bipartite_split`): the class token is position 0
      of set A, so patch ``j`` is in A when ``j`` is odd.  Prefix tokens are never
      fused; those at odd positions (distillation, some register tokens; the
      authors' DeiT has none) receive nothing, as in ToMe's official code.
    - token order after fusion: prefix tokens, the unmerged A tokens by position,
      then the B tokens left by decreasing step-2 weight (bidirectional) or by
      position (one direction); this order sets the next block's split.  The
      decision's ``dst`` records it, so trace labels keep their meaning.
    - the informativeness and size criteria are normalised by their maxima over
      the whole sequence (class token included).
    - ``r``: a count, or a fraction ``0 < r < 1`` of the patch tokens entering a
      block (``floor(r * n)``), capped at half of them.  Default locations under
      ``r`` follow the authors' scripts: a count reduces at every block but the
      first (``r=16`` at blocks 1-11 for DeiT-S: the paper's setting), a fraction
      at the quarter points (``r=0.35`` at blocks 3, 6, 9: MCTF-Fast).  Under
      ``keep_rate`` the study's default locations apply.  Not reproduced: the
      authors' extra cap that leaves at least 10 tokens (class token included)
      in a block, which never binds at their settings.
    - ``metric="tokens"``: similarity of the tokens themselves (the block input
      with one-step-ahead, else the block output); ``"keys"``: the attention keys
      averaged over heads (ToMe's metric; not in the authors' code).
    - the bidirectional split removes ``r // 2`` tokens A -> B and the rest B -> A,
      and step 2 reuses the weights of step 1.
    - proportional attention (``+log(size)`` on the attention logits) is on by
      default, as in the released evaluation scripts.
    - attention dropout is not applied to the merged map (evaluation only).
    - one round of bipartite matching fuses at most half of a block's tokens:
      under ``r`` the count is capped there (as in the authors' code).  Not in
      the paper: a ``keep_rate`` stage that asks for more (the study's
      ``keep_rate=0.25``, or 49 -> 24 at ``0.5``) repeats the matching inside the
      block on the fused tokens, as ToMe does here, until the budget is met.
      Each round takes half of the tokens left (the last one the remainder) with
      the split and order rules above; a fused token enters the next round with
      its pooled features (the metric), its summed size and its summed received
      attention (the column sum of the merged attention map over the block's
      queries), and its pooling weight recomputed from them.  The rounds are
      recorded as one decision: ``dst`` composed, ``keep`` the tokens never fused
      away, ``weight`` per input token such that one weighted mean equals the
      rounds' nested means, ``score`` the first round's.  One-step-ahead
      attention then merges the map once with that decision.  The first round is
      exactly the single round of every budget up to half.

    ``order="original"`` keeps tokvis's former split and order (patch tokens only,
    patch ``j`` in A when ``j`` is even; survivors in their original order).

    With ``criteria=("similarity",)`` and ``bidirectional=False`` the matching is
    ToMe's (the similarity weight is a monotone function of the cosine).

    Parameters
    ----------
    one_step_ahead : bool
        Decide inside the attention and merge the attention map (default True);
        False: fuse the block's output.
    criteria : sequence of {"similarity", "informativeness", "size"}
        Criteria multiplied into the weights (default: all three).
    tau_sim, tau_info, tau_size : float > 0
        Temperatures (defaults 1, 20, 40 as in the paper).
    bidirectional : bool
        A -> B then B -> A matching (default True); False = A -> B only.
    pooling : {"attn_size", "size"}
        Fused-token weights: attention received x size (default, paper) or size
        only (ToMe's size-weighted average).
    metric : {"tokens", "keys"}
        Features compared for similarity.
    prop_attn : bool
        Proportional attention (default True).
    order : {"official", "original"}
        Split parity and token order (default ``"official"``, see above).
    """

    kind = "merge"
    conventions = ("keep_rate", "r")

    def __init__(
        self,
        *,
        one_step_ahead: bool = True,
        criteria=CRITERIA,
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        bidirectional: bool = True,
        pooling: str = "attn_size",
        metric: str = "tokens",
        prop_attn: bool = True,
        order: str = "official",
    ) -> None:
        self.one_step_ahead = bool(check_choice("one_step_ahead", one_step_ahead, (True, False), error=_E))
        self.stage = "in_attention" if self.one_step_ahead else "after_block"
        self.input_values = False  # one-step-ahead: only the fused tokens' values are projected
        self.metric = check_choice("metric", metric, ("tokens", "keys"), error=_E)
        self.needs = frozenset({"attn"} | ({"keys"} if self.metric == "keys" else set()))
        super().__init__()
        if isinstance(criteria, str):
            criteria = (criteria,)
        try:
            crit = tuple(criteria)
        except TypeError:
            raise MethodOptionError(f"criteria must be a sequence of {list(CRITERIA)}: got {criteria!r}") from None
        bad = [c for c in crit if c not in CRITERIA]
        if bad or not crit or len(set(crit)) != len(crit):
            raise MethodOptionError(
                f"criteria must be a non-empty sequence of distinct names from {list(CRITERIA)}: got {list(crit)}"
            )
        self.criteria = tuple(c for c in CRITERIA if c in crit)
        self.taus = {}
        for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
            self.taus[name] = check_float(name, tau, low=0.0, high=math.inf, low_open=True, high_open=True, error=_E)
        self.bidirectional = bool(check_choice("bidirectional", bidirectional, (True, False), error=_E))
        self.pooling = check_choice("pooling", pooling, ("attn_size", "size"), error=_E)
        self.proportional_attention = bool(check_choice("prop_attn", prop_attn, (True, False), error=_E))
        self.order = check_choice("order", order, ORDERS, error=_E)

    def options(self) -> dict:
        return {
            "one_step_ahead": self.one_step_ahead,
            "criteria": list(self.criteria),
            **self.taus,
            "bidirectional": self.bidirectional,
            "pooling": self.pooling,
            "metric": self.metric,
            "prop_attn": self.proportional_attention,
            "order": self.order,
        }

    def default_locations(self, depth: int, *, keep_rate=None, r=None) -> list[int] | None:
        """The authors' scripts: a count ``r`` at blocks 1..depth-1, a fraction at the quarter points."""
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            return None  # keep_rate, or a per-block r list: the schedule's own rules
        if isinstance(r, float) and 0 < r < 1:
            return default_locations(depth)
        return list(range(1, depth)) if depth > 1 else None

    def max_removal(self, n_in: int, convention: str) -> int:
        # under keep_rate the budget must be met: decide() raises if it needs more than half
        return n_in // 2 if convention == "r" else max(n_in - 1, 0)

    # -- decision ---------------------------------------------------------------------------------
    def attention_received(self, ctx: ReductionContext) -> torch.Tensor:
        """Mean attention ``[B, n]`` each patch token receives, over heads and every query."""
        assert ctx.attn is not None
        return ctx.attn.mean(dim=(1, 2))[:, ctx.num_prefix :]

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        p, n = ctx.num_prefix, ctx.n_in
        r_total = max(n - ctx.target, 0)
        assert ctx.attn is not None
        received_all = ctx.attn.mean(dim=(1, 2))  # [B, T]: over heads and every query
        if self.metric == "tokens":
            metric = ctx.x
        else:
            assert ctx.keys is not None
            metric = ctx.keys.mean(1)
        if metric.dtype in (torch.float16, torch.bfloat16):
            metric = metric.float()
        # official: the split and the criteria's maxima run over the whole sequence; "original": patch tokens only
        q = 0 if self.order == "original" else p
        metric, received_all, size_all = metric[:, p - q :], received_all[:, p - q :], ctx.size[:, p - q :]
        r = min(r_total, n // 2)
        if r == 0:  # nothing to fuse (e.g. one token left): the tokens stay where they are, as in the official code
            B = ctx.x.shape[0]
            dst = torch.arange(n, device=ctx.x.device).expand(B, n).clone()
            keep = torch.ones(B, n, dtype=torch.bool, device=ctx.x.device)
            return LayerDecision(ctx.layer, "merge", dst, keep, n_out=n, weight=ctx.patch_size)
        dst, keep, score = self._match(metric, received_all, size_all, n, r, q)
        size, received = ctx.patch_size, self.attention_received(ctx)
        pool = size * received if self.pooling == "attn_size" else size
        if r < r_total:  # keep_rate asks for more than half: repeat the matching on the fused tokens
            dst, keep, pool = self._more_rounds(metric, received_all, size_all, q, dst, keep, pool, n - r, ctx.target)
        n_out = n - r_total
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=n_out, weight=pool, score=score.to(size.dtype))

    def _match(self, metric, received, size, n: int, r: int, q: int):
        """One round of multi-criteria bidirectional matching on ``q`` prefix + ``n`` patch tokens."""
        weights = multi_criteria_weights(
            metric,
            received,
            size,
            tau_sim=self.taus["tau_sim"] if "similarity" in self.criteria else None,
            tau_info=self.taus["tau_info"] if "informativeness" in self.criteria else None,
            tau_size=self.taus["tau_size"] if "size" in self.criteria else None,
            num_prefix=q,
        )
        return bidirectional_matching(weights, n, r, bidirectional=self.bidirectional, num_prefix=q, order=self.order)

    def _more_rounds(self, metric, received, size, q: int, dst, keep, pool, cur_n: int, target: int):
        """Rounds 2, 3, ... of one block's fusion, until ``target`` patch tokens are left.

        The fused tokens of a round are the inputs of the next: metric pooled with
        the round's weights, received attention (a column sum, as the merged
        attention map has it) and size summed, pooling weight recomputed from them.
        Returns the composed ``dst`` and ``keep`` and, per input token, the weight
        that makes one weighted mean equal the rounds' nested means:
        ``w_i * W_g / sum_{k in g} w_k`` for input ``i`` in round token ``g`` of
        weight ``W_g``.
        """
        B = dst.shape[0]
        pre_m, pre_r, pre_s = metric[:, :q], received[:, :q], size[:, :q]
        m, rec, siz = metric[:, q:], received[:, q:], size[:, q:]
        eff, w = pool, pool  # per-input weights; weights of the current tokens

        def fuse(d, new_n):
            nonlocal m, rec, siz, w
            m = merge_mean(m, d, new_n, w.to(m.dtype))
            rec = rec.new_zeros(B, new_n).scatter_add_(1, d, rec)
            siz = siz.new_zeros(B, new_n).scatter_add_(1, d, siz)
            w = siz * rec if self.pooling == "attn_size" else siz

        first = dst
        fuse(first, cur_n)
        # per-input weights after round 1 are the inputs' own (eff = pool); fold in each later round's
        total = first
        while cur_n > target:
            r = min(cur_n - target, cur_n // 2)
            d, k, _ = self._match(
                torch.cat([pre_m, m], 1), torch.cat([pre_r, rec], 1), torch.cat([pre_s, siz], 1), cur_n, r, q
            )
            new_n = cur_n - r
            group = eff.new_zeros(B, cur_n).scatter_add_(1, total, eff)  # sum of input weights per current token
            eff = eff * (w.gather(1, total) / group.gather(1, total).clamp_min(torch.finfo(eff.dtype).tiny))
            keep = keep & k.gather(1, total)
            total = compose(total, d)
            fuse(d, new_n)
            cur_n = new_n
        return total, keep, eff

    # -- one-step-ahead attention -----------------------------------------------------------------
    def reduced_attention(
        self,
        ctx: ReductionContext,
        decision: LayerDecision,
        *,
        scale: float,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Merged attention map applied to the values of the fused tokens.

        ``A [B, H, T, T]`` (the map computed for the decision, proportional bias
        included) becomes ``A_hat [B, H, T', T']``: key columns summed per group
        (rows still sum to 1), query rows pooled with the decision's weights;
        prefix rows and columns unchanged.  Returns ``A_hat @ V(x_fused)``
        ``[B, H, T', d]``.
        """
        A, p = ctx.attn, ctx.num_prefix
        assert A is not None and ctx.project_values is not None
        if decision.n_out == decision.n_in and bool(
            (decision.dst == torch.arange(decision.n_in, device=A.device)).all()
        ):
            return A @ ctx.project_values(ctx.x)
        B, H, T, _ = A.shape
        n, n_out = decision.n_in, decision.n_out
        dst, Tn = decision.dst, p + n_out
        # key columns: summed per group, along the last (contiguous) dim of the map; rows still sum to 1
        A1 = A.new_empty(B, H, T, Tn)  # [B, H, T, T']
        A1[..., :p] = A[..., :p]
        A1[..., p:].zero_().view(B, H * T, n_out).scatter_add_(
            2, dst[:, None, :].expand(B, H * T, n), A[..., p:].reshape(B, H * T, n)
        )
        # query rows: the weighted mean per group (float32 sums for fp16 / bf16 maps, as merge_mean)
        acc = decision_dtype(A.dtype)
        w = decision.weight.to(acc) if decision.weight is not None else A.new_ones(B, n, dtype=acc)
        num = A1.new_zeros(B, H, n_out, Tn, dtype=acc).scatter_add_(
            2, dst[:, None, :, None].expand(B, H, n, Tn), A1[:, :, p:] * w[:, None, :, None]
        )
        den = w.new_zeros(B, n_out).scatter_add_(1, dst, w).clamp_min(torch.finfo(acc).tiny)
        A_hat = A.new_empty(B, H, Tn, Tn)  # [B, H, T', T']
        A_hat[:, :, :p] = A1[:, :, :p]
        A_hat[:, :, p:] = num / den[:, None, :, None]
        x_hat, _ = apply_decision(ctx.x, ctx.size, decision, num_prefix=p)
        return A_hat @ ctx.project_values(x_hat)
