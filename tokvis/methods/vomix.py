"""VoMix: Vote & Mix, plug-and-play token reduction (Peng et al., 2024)."""

from __future__ import annotations

import math

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import slots_from_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice, check_float, check_int


def key_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B, n, n]`` of keys ``[B, H, n, d]`` averaged over heads, diagonal ``-inf``."""
    k = keys.mean(1)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = k @ k.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    return sim


def vote(sim: torch.Tensor, *, votes: int = 1, weighting: str = "count") -> torch.Tensor:
    """Votes ``[B, n]`` each token receives.

    Every token votes for its ``votes`` most similar other tokens (row-wise
    top-k of ``sim``, diagonal excluded); a vote counts 1 (``weighting="count"``)
    or the similarity of the pair (``"similarity"``).
    """
    B, n, _ = sim.shape
    val, idx = sim.topk(votes, dim=-1)  # [B, n, votes]
    w = torch.ones_like(val) if weighting == "count" else val
    return sim.new_zeros(B, n).scatter_add_(1, idx.reshape(B, -1), w.reshape(B, -1))


def mixing_matrix(sim: torch.Tensor, keep: torch.Tensor, *, tau: float) -> torch.Tensor:
    """Soft assignment ``[B, n_out, n]`` of every token to the retained ones, rows summing to 1.

    A retained token contributes weight 1 to its own output; a removed token ``s``
    spreads a unit mass over the retained tokens ``j`` with
    ``softmax_j(sim[s, j] / tau)``.  Each row (output token) is then normalised:
    ``q_j' = (q_j + sum_s w_sj q_s) / (1 + sum_s w_sj)``.

    Parameters
    ----------
    sim : Tensor [B, n, n]
        Similarities (diagonal ignored).
    keep : BoolTensor [B, n]
        Retained tokens; the same number in every row.
    tau : float > 0
        Softmax temperature.
    """
    B, n = keep.shape
    n_out = int(keep[0].sum())
    retained = keep.long().argsort(dim=1, descending=True, stable=True)[:, :n_out]  # positions, ascending
    logits = sim.gather(2, retained[:, None, :].expand(B, n, n_out)) / tau  # [B, n, n_out]
    mix = logits.softmax(dim=-1) * (~keep)[..., None].to(sim.dtype)  # only removed tokens spread mass
    soft = mix.transpose(1, 2).contiguous()  # [B, n_out, n]
    soft.scatter_(2, retained[..., None], 1.0)
    return soft / soft.sum(dim=-1, keepdim=True)


@register_method("vomix")
class VoMix(Method):
    """Vote & Mix (Peng et al., 2024), implemented from the paper (no public code).

    Inside the attention of each reducing block (stage ``"in_attention"``):

    1. **Vote.** Cosine similarity of the keys (averaged over heads) between the
       patch tokens; every token votes for its ``votes`` most similar other
       tokens.  The ``m = n_in - target`` tokens with the most votes (the most
       homogeneous ones; ties to the lowest position) are selected for removal.
       ``m`` follows the schedule: ``r`` a fraction (``N * r`` of the ``N`` tokens
       entering the block, ``tokvis.patch(model, "vomix", r=0.1)``) or a count, or
       ``keep_rate``.
    2. **Mix.** The selected tokens' queries are softly mixed into the retained
       tokens: a selected token spreads a unit mass over the retained tokens by
       ``softmax(similarity / tau)``, a retained token keeps weight 1 for itself,
       and each retained token's mixed query is the normalised weighted mean (see
       :func:`mixing_matrix`).  The decision is a ``"soft"`` :class:`LayerDecision`
       whose ``soft [B, n_out, n_in]`` is this matrix (rows sum to 1), ``dst`` its
       arg-max per input token (a retained token's own slot; a selected token's
       main recipient), ``keep`` the retained tokens, ``score`` the votes.
    3. **Attention.** The mixed queries attend to the full, vanilla keys and
       values of all ``n_in`` tokens, so the block outputs one token per retained
       token.

    Choices the paper leaves open (all options):

    - ``residual="mix"`` (default): the residual stream is mixed by the same soft
      matrix as the queries (the paper tracks each retained token's "feature
      source" as a mixture of regions, i.e. the removed tokens live on in the
      retained ones).  ``"drop"``: the selected tokens' residual is dropped and
      only their queries are mixed; the recorded decision is then a ``"prune"``
      (what is applied to the tokens) and the query mixing is not recorded.
    - ``votes=1``: votes cast per token; ``vote_weight="count"`` counts votes,
      ``"similarity"`` weights each vote by the pair's similarity.
    - ``tau=0.1``: temperature of the mixing softmax over cosine similarities
      (1 spreads a token almost evenly over every retained token; small values
      send it to its nearest retained token).
    - prefix tokens neither vote nor are voted for nor receive mixed queries; they
      attend to nothing different (their attention is unchanged).
    - no proportional attention (the paper has none).

    Parameters
    ----------
    votes : int >= 1
    vote_weight : {"count", "similarity"}
    tau : float > 0
    residual : {"mix", "drop"}
    """

    kind = "soft"
    stage = "in_attention"
    needs = frozenset({"keys"})

    def __init__(self, *, votes: int = 1, vote_weight: str = "count", tau: float = 0.1, residual: str = "mix") -> None:
        super().__init__()
        self.votes = check_int("votes (votes cast per token)", votes, minimum=1, error=MethodOptionError)
        tau = check_float("tau", tau, low=0.0, high=math.inf, low_open=True, high_open=True, error=MethodOptionError)
        self.vote_weight = check_choice("vote_weight", vote_weight, ("count", "similarity"), error=MethodOptionError)
        self.tau = float(tau)
        self.residual = check_choice("residual", residual, ("mix", "drop"), error=MethodOptionError)
        self.kind = "soft" if residual == "mix" else "prune"

    def options(self) -> dict:
        return {"votes": self.votes, "vote_weight": self.vote_weight, "tau": self.tau, "residual": self.residual}

    def _vote_and_mix(self, ctx: ReductionContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Votes [B, n], retained mask [B, n] and mixing matrix [B, n_out, n] of a block."""
        assert ctx.keys is not None
        n = ctx.n_in
        sim = key_similarity(ctx.keys[:, :, ctx.num_prefix :])
        if self.votes >= n:
            raise MethodOptionError(f"votes={self.votes} needs more than {self.votes} tokens; the block has {n}")
        score = vote(sim, votes=self.votes, weighting=self.vote_weight)
        m = min(max(n - ctx.target, 0), n - 1)
        removed = score.argsort(dim=1, descending=True, stable=True)[:, :m]
        keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, removed, False)
        return score, keep, mixing_matrix(sim, keep, tau=self.tau)

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        score, keep, soft = self._vote_and_mix(ctx)
        n_out = soft.shape[1]
        if self.residual == "drop":
            return LayerDecision(ctx.layer, "prune", slots_from_keep(keep), keep, n_out=n_out, score=score)
        dst = soft.argmax(dim=1)
        soft = soft.to(ctx.x.dtype)
        return LayerDecision(ctx.layer, "soft", dst, keep, n_out=n_out, soft=soft, score=score.to(ctx.x.dtype))

    def reduced_attention(
        self,
        ctx: ReductionContext,
        decision: LayerDecision,
        *,
        scale: float,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mixed queries ``[B, H, p + n_out, d]`` attending to the full keys and values."""
        if self.residual == "mix":  # the decision is the mixing matrix: the default mixes the queries with it
            return super().reduced_attention(ctx, decision, scale=scale, bias=bias)
        _, _, soft = self._vote_and_mix(ctx)
        mixed = LayerDecision(ctx.layer, "soft", soft.argmax(dim=1), decision.keep, n_out=soft.shape[1], soft=soft)
        return super().reduced_attention(ctx, mixed, scale=scale, bias=bias)
