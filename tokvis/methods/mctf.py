"""MCTF: Multi-Criteria Token Fusion with one-step-ahead attention (Lee et al., CVPR 2024)."""

from __future__ import annotations

import math

import torch

from tokvis.errors import MethodOptionError, ScheduleError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import apply_decision, merge_mean, slots_from_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice, check_float

CRITERIA = ("similarity", "informativeness", "size")


def multi_criteria_weights(
    metric: torch.Tensor,
    attn_received: torch.Tensor | None,
    size: torch.Tensor | None,
    *,
    tau_sim: float | None,
    tau_info: float | None,
    tau_size: float | None,
) -> torch.Tensor:
    """MCTF's multi-criteria weights between the two halves of a bipartite split.

    Tokens are split alternately: set A = even positions, set B = odd positions.
    Each criterion gives a weight in ``(0, 1]`` that is raised to ``1 / tau`` and
    the criteria are multiplied (a criterion whose ``tau`` is ``None`` is left out):

    - similarity ``((cos(m_a, m_b) + 1) / 2) ** (1 / tau_sim)``
    - informativeness ``(u_a u_b) ** (1 / tau_info)`` with ``u = (1 / attn) / max(1 / attn)``:
      tokens that receive little attention are fused first
    - size ``(v_a v_b) ** (1 / tau_size)`` with ``v = (1 / size) / max(1 / size)``: large
      tokens are fused last

    The per-image maxima only rescale every weight of an image by the same factor,
    so they change no matching.

    Parameters
    ----------
    metric : Tensor [B, n, c]
        Features compared by cosine similarity.
    attn_received : Tensor [B, n] or None
        Mean attention each token receives (> 0); needed when ``tau_info`` is set.
    size : Tensor [B, n] or None
        Patches per token; needed when ``tau_size`` is set.
    tau_sim, tau_info, tau_size : float > 0 or None
        Temperatures.

    Returns
    -------
    Tensor [B, ceil(n / 2), floor(n / 2)]
        Weight of fusing A token ``i`` with B token ``j``, in ``(0, 1]``.
    """
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]
    w = a.new_ones(a.shape[0], a.shape[1], b.shape[1])
    if tau_sim is not None:
        w = w * ((a @ b.transpose(1, 2) + 1) / 2).clamp_min(0) ** (1.0 / tau_sim)
    for tau, value in ((tau_info, attn_received), (tau_size, size)):
        if tau is None:
            continue
        assert value is not None
        inv = 1.0 / value.clamp_min(torch.finfo(value.dtype).tiny)
        inv = inv / inv.amax(dim=1, keepdim=True)
        w = w * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1.0 / tau)
    return w


def bidirectional_matching(weights: torch.Tensor, n: int, r: int, *, bidirectional: bool = True):
    """MCTF's (bidirectional) bipartite soft matching on precomputed weights.

    Step 1 (A -> B): every A token (even position) finds its highest-weight B token
    (odd position); the ``r1`` A tokens with the highest weights are fused into
    their partners.  Step 2 (B -> A, only if ``bidirectional``): every B token (with
    what it received) finds its highest-weight partner among the A tokens left,
    using the same weights; the ``r2`` best are fused into them.  ``r1 = r // 2``,
    ``r2 = r - r1`` when bidirectional, else ``r1 = r``.  Ties go to the lowest
    position.  The cap ``r <= n // 2`` is the caller's.

    Parameters
    ----------
    weights : Tensor [B, ceil(n / 2), floor(n / 2)]
        A-to-B weights (:func:`multi_criteria_weights`).
    n : int
        Number of tokens.
    r : int
        Tokens to remove.
    bidirectional : bool

    Returns
    -------
    dst : LongTensor [B, n]
        Output slot of each token; survivors keep their original order.
    keep : BoolTensor [B, n]
        False for the fused tokens.
    score : Tensor [B, n]
        Best weight of each A token to B (step 1) and of each B token to the A
        tokens left (step 2; to every A token when not bidirectional).
    """
    B = weights.shape[0]
    dev = weights.device
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    best, partner = weights.max(dim=-1)  # [B, na]
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged_a = order[:, :r1]
    keep = torch.ones(B, n, dtype=torch.bool, device=dev)
    keep.scatter_(1, merged_a * 2, False)
    w2 = weights.transpose(1, 2)  # [B, nb, na]
    if bidirectional:
        w2 = w2.masked_fill(~keep[:, ::2][:, None, :], -math.inf)  # only A tokens left can receive
    best2, partner2 = w2.max(dim=-1)  # [B, nb]
    score = torch.empty(B, n, dtype=weights.dtype, device=dev)
    score[:, ::2], score[:, 1::2] = best, best2
    merged_b = best2.argsort(dim=-1, descending=True, stable=True)[:, :r2]
    keep.scatter_(1, merged_b * 2 + 1, False)
    dst = slots_from_keep(keep)
    # B -> A first: a B token that received A tokens carries them along
    dst.scatter_(1, merged_b * 2 + 1, dst.gather(1, partner2.gather(1, merged_b) * 2))
    dst.scatter_(1, merged_a * 2, dst.gather(1, partner.gather(1, merged_a) * 2 + 1))
    return dst, keep, score


def _group_sum(values: torch.Tensor, dst: torch.Tensor, n_out: int) -> torch.Tensor:
    """Sum of ``values [B, n, c]`` per output slot ``dst [B, n]`` (every token has a slot)."""
    B, n, c = values.shape
    return values.new_zeros(B, n_out, c).scatter_add_(1, dst[..., None].expand(B, n, c), values)


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
    through the block's own ``norm1`` / ``qkv``.  This follows the authors'
    released code (``one_step_ahead=1``).  With ``one_step_ahead=False`` the
    decision is taken after the attention and before the MLP of the block
    (tokvis's convention, as for ToMe; the released code fuses after the MLP),
    using this block's attention map; nothing else changes.

    Choices (from the authors' released code where the paper is silent):

    - ``metric="tokens"``: similarity of the tokens themselves (the block input with
      one-step-ahead, else the tokens after the attention residual); ``"keys"``: the
      attention keys averaged over heads (ToMe's metric).
    - the bidirectional split removes ``r // 2`` tokens A -> B and the rest B -> A,
      and step 2 reuses the weights of step 1 (they are not recomputed for the B
      tokens that received A tokens).
    - tokens are split alternately over the patch tokens only (prefix tokens
      excluded), so A/B parity differs from the released code, where the class
      token is position 0 of set A (as for tokvis's ToMe).
    - proportional attention (``+log(size)`` on the attention logits) is on by
      default, as in the released evaluation scripts.
    - attention dropout is not applied to the merged map (evaluation only).
    - at most half of a block's tokens are fused (bipartite matching): under the
      ``r`` convention ``r`` is capped at half; a ``keep_rate`` stage that asks
      for more raises :class:`ScheduleError` (use keep_rate >= 0.5 or ``r``).
      ``r`` may be a count or a fraction ``0 < r < 1`` of the tokens entering a
      block (``tokvis.patch(model, "mctf", r=0.1)``).

    With ``criteria=("similarity",)`` and ``bidirectional=False`` the matching is
    ToMe's (the similarity weight is a monotone function of the cosine).

    Parameters
    ----------
    one_step_ahead : bool
        Decide inside the attention and merge the attention map (default True).
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
    ) -> None:
        self.one_step_ahead = bool(
            check_choice("one_step_ahead", one_step_ahead, (True, False), error=MethodOptionError)
        )
        self.stage = "in_attention" if self.one_step_ahead else "after_attn"
        self.metric = check_choice("metric", metric, ("tokens", "keys"), error=MethodOptionError)
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
            self.taus[name] = check_float(
                name, tau, low=0.0, high=math.inf, low_open=True, high_open=True, error=MethodOptionError
            )
        self.bidirectional = bool(check_choice("bidirectional", bidirectional, (True, False), error=MethodOptionError))
        self.pooling = check_choice("pooling", pooling, ("attn_size", "size"), error=MethodOptionError)
        self.proportional_attention = bool(check_choice("prop_attn", prop_attn, (True, False), error=MethodOptionError))

    def options(self) -> dict:
        return {
            "one_step_ahead": self.one_step_ahead,
            "criteria": list(self.criteria),
            **self.taus,
            "bidirectional": self.bidirectional,
            "pooling": self.pooling,
            "metric": self.metric,
            "prop_attn": self.proportional_attention,
        }

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
        r = max(n - ctx.target, 0)
        if r > n // 2:
            raise ScheduleError(
                f"mctf fuses at most half of a block's tokens (bipartite matching), but the schedule asks to go "
                f"from {n} to {ctx.target} tokens at block {ctx.layer}; use keep_rate >= 0.5 or the r convention"
            )
        size = ctx.patch_size
        if r == 0:  # nothing to fuse (e.g. a single token left): the identity, no matching of an empty set
            B = size.shape[0]
            dst = torch.arange(n, device=size.device).expand(B, n).clone()
            keep = torch.ones(B, n, dtype=torch.bool, device=size.device)
            return LayerDecision(ctx.layer, "merge", dst, keep, n_out=n, weight=size)
        received = self.attention_received(ctx)
        if self.metric == "tokens":
            metric = ctx.x[:, p:]
        else:
            assert ctx.keys is not None
            metric = ctx.keys[:, :, p:].mean(1)
        weights = multi_criteria_weights(
            metric.float() if metric.dtype in (torch.float16, torch.bfloat16) else metric,
            received,
            size,
            tau_sim=self.taus["tau_sim"] if "similarity" in self.criteria else None,
            tau_info=self.taus["tau_info"] if "informativeness" in self.criteria else None,
            tau_size=self.taus["tau_size"] if "size" in self.criteria else None,
        )
        dst, keep, score = bidirectional_matching(weights, n, r, bidirectional=self.bidirectional)
        pool = size * received if self.pooling == "attn_size" else size
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=n - r, weight=pool, score=score.to(size.dtype))

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
        assert A is not None and ctx.values is not None and ctx.project is not None
        if decision.n_out == decision.n_in and bool(decision.keep.all()):
            return A @ ctx.values
        B, H, T, _ = A.shape
        n, n_out = decision.n_in, decision.n_out
        dst = decision.dst
        # key columns: sum per group
        cols = A[..., p:].permute(0, 3, 1, 2).reshape(B, n, H * T)
        cols = _group_sum(cols, dst, n_out).reshape(B, n_out, H, T).permute(0, 2, 3, 1)
        A1 = torch.cat([A[..., :p], cols], dim=-1)  # [B, H, T, T']
        # query rows: pooled with the decision's weights
        Tn = p + n_out
        rows = A1[:, :, p:].permute(0, 2, 1, 3).reshape(B, n, H * Tn)
        w = decision.weight.to(A.dtype) if decision.weight is not None else torch.ones_like(rows[..., 0])
        rows = merge_mean(rows, dst, n_out, w).reshape(B, n_out, H, Tn).transpose(1, 2)
        A_hat = torch.cat([A1[:, :, :p], rows], dim=2)  # [B, H, T', T']
        x_hat, _ = apply_decision(ctx.x, ctx.size, decision, num_prefix=p)
        _, _, v_hat = ctx.project(x_hat)
        return A_hat @ v_hat
