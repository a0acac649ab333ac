"""VoMix: Vote & Mix, plug-and-play token reduction (Peng et al., 2024)."""

from __future__ import annotations

import functools
import math

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import mix_into_kept, mix_matrix, slots_from_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice, check_float, check_int


def key_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B, n, n]`` of keys ``[B, H, n, d]`` averaged over heads, diagonal ``-inf``."""
    k = keys.mean(1)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = k @ k.transpose(1, 2)
    sim = (sim + sim.transpose(1, 2)) / 2  # exactly symmetric: a mutual pair's votes tie exactly, on any batch
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


def neutral_rank(n: int, device=None) -> torch.Tensor:
    """A fixed pseudo-random permutation of ``0..n-1`` (the last tie-break: spatially neutral, deterministic).

    Do not modify the result in place: in eager mode it is one cached tensor per ``(n, device)``, so that a
    forward copies nothing from the host (a copy to a GPU waits for the device); under ``torch.compile`` it
    is a constant of the graph.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        return torch.tensor(_neutral_order_constant(n), dtype=torch.long, device=device)
    return _neutral_rank_on(n, device)


@functools.lru_cache(maxsize=64)
def _neutral_rank_on(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(_neutral_order(n), dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def _neutral_order(n: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(20240830 + n)).tolist())


@torch.compiler.assume_constant_result  # torch.compile takes the permutation as a constant (no graph break) and
def _neutral_order_constant(n: int) -> tuple[int, ...]:  # runs it eagerly: it never traces the cache wrapper
    return _neutral_order(n)


def _quantise(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 rounded to 1e-6: values equal up to round-off compare equal (then tie-breaks decide)."""
    return torch.round(t.to(torch.float64) * 1e6)


def select_removed(score: torch.Tensor, m: int, ties=()) -> torch.Tensor:
    """Positions ``[B, m]`` of the ``m`` tokens with the highest ``score``.

    Ties are broken by each tensor of ``ties`` in turn (higher first), then by a
    fixed pseudo-random order of the positions (:func:`neutral_rank`), never by
    position: integer vote counts tie often, and a positional tie-break removes
    the top of the image first.
    """
    B, n = score.shape
    idx = neutral_rank(n, score.device).expand(B, n)
    for key in (*reversed(tuple(ties)), score):  # stable sorts: the last one is the primary key
        idx = idx.gather(1, key.gather(1, idx).argsort(dim=1, descending=True, stable=True))
    return idx[:, :m]


def mixing_weights(sim: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, *, tau: float) -> torch.Tensor:
    """Mass ``[B, m, k]`` each removed token sends to each kept token: ``softmax_j(sim[s, j] / tau)``."""
    B = sim.shape[0]
    rows = sim.gather(1, removed[..., None].expand(-1, -1, sim.shape[2]))  # [B, m, n]
    return (
        (rows.gather(2, kept[:, None, :].expand(-1, removed.shape[1], -1)) / tau)
        .softmax(dim=-1)
        .reshape(B, removed.shape[1], kept.shape[1])
    )


def mixing_matrix(sim: torch.Tensor, keep: torch.Tensor, *, tau: float) -> torch.Tensor:
    """Soft assignment ``[B, n_out, n]`` of every token to the retained ones, rows summing to 1.

    A retained token contributes weight 1 to its own output; a removed token ``s``
    spreads a unit mass over the retained tokens ``j`` with
    ``softmax_j(sim[s, j] / tau)``.  Each row (output token) is then normalised:
    ``q_j' = (q_j + sum_s w_sj q_s) / (1 + sum_s w_sj)``.  The dense form of
    :func:`tokvis.methods.ops.mix_into_kept` (which the model uses).

    Parameters
    ----------
    sim : Tensor [B, n, n]
        Similarities (diagonal ignored).
    keep : BoolTensor [B, n]
        Retained tokens; the same number in every row.
    tau : float > 0
        Softmax temperature.
    """
    n = keep.shape[1]
    n_out = int(keep[0].sum())
    order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    kept, removed = order[:, :n_out], order[:, n_out:]
    return mix_matrix(kept, removed, mixing_weights(sim, kept, removed, tau=tau), n)


@register_method("vomix")
class VoMix(Method):
    """Vote & Mix (Peng et al., 2024), implemented from the paper (no public code).

    Inside the attention of each reducing block (stage ``"in_attention"``):

    1. **Vote.** Cosine similarity of the keys (averaged over heads) between the
       patch tokens; every token votes for its ``votes`` most similar other
       tokens.  The ``m = n_in - target`` tokens with the most votes (the most
       homogeneous ones) are selected for removal.  Vote counts are integers and
       tie often (a third to a half of the removals at ``r=0.1`` on DINOv2), so
       ties are broken by the similarity of the votes received, then by the
       token's similarity to its nearest neighbour, then by a fixed
       pseudo-random order of the positions (:func:`select_removed`); equal
       similarities (to 1e-6) also pick vote targets in that order.  Never by
       position: a positional tie-break removes the top of the image first.
       ``m`` follows the schedule: ``r`` a fraction (``N * r`` of the ``N`` tokens
       entering the block, ``tokvis.patch(model, "vomix", r=0.1)``) or a count, or
       ``keep_rate``.
    2. **Mix.** Only the selected tokens' queries are mixed into the retained
       tokens: a selected token ``s`` spreads a unit mass over the retained
       tokens by ``w_s = softmax_j(similarity[s, j] / tau)``, a retained token keeps
       weight 1 for itself, and each retained token's mixed query is
       ``(q_j + sum_s w_sj q_s) / (1 + sum_s w_sj)``.  Computed sparsely
       (:func:`tokvis.methods.ops.mix_into_kept`: ``[B, m] -> [B, k]`` weights,
       ``m * k * D`` per product, the paper's ``r (1 - r) N^2 D``), once per block:
       :meth:`decide` plans the votes and weights and :meth:`reduced_attention`
       reuses them.  With ``residual="mix"`` the decision is a ``"soft"``
       :class:`LayerDecision` whose ``soft [B, n_out, n_in]`` is this matrix (rows
       sum to 1; recorded densely, applied sparsely by ``ops.apply_decision``),
       ``dst`` a retained token's own slot and a selected token's largest
       mixing recipient (its most similar retained token), ``keep`` the retained
       tokens, ``score`` the votes, and ``size_scale`` ``1 / column sum`` so that
       each input's size is shared among its outputs in proportion to its column:
       the sizes still total the number of patches.
    3. **Attention.** The mixed queries attend to the full, vanilla keys and
       values of all ``n_in`` tokens, so the block outputs one token per retained
       token.

    Choices the paper leaves open (all options; the defaults chosen by measurement, below):

    - ``residual="drop"`` (default): the selected tokens' residual is dropped
      and only their queries are mixed; the recorded decision is then a
      ``"prune"`` (what is applied to the tokens) whose ``query_soft
      [B, n_out, n_in]`` records the query mixing (the matrix ``soft`` holds
      under ``"mix"``, rows summing to 1; descriptive, nothing applies it).
      ``"mix"``: the residual stream is mixed by the same weights as the
      queries (the paper tracks each retained token's "feature source" as a
      mixture of regions, i.e. the removed tokens live on in the retained
      ones); the decision is then ``"soft"``.
    - ``votes=1``: votes cast per token; ``vote_weight="count"`` (default) counts
      votes, ``"similarity"`` weights each vote by the pair's similarity.  With
      ties broken by similarity the two removed the same tokens on every image
      and schedule measured.
    - ``tau=0.01`` (default): temperature of the mixing softmax over cosine
      similarities (1 spreads a token almost evenly over every retained token;
      small values send it to its nearest retained token).
    - prefix tokens neither vote nor are voted for nor receive mixed queries; they
      attend to nothing different (their attention is unchanged).
    - no proportional attention (the paper has none).

    Measured (``benchmarks/vomix_defaults.py``): cosine similarity of the pooled
    feature to the unreduced model's, DINOv2 ViT-S/14 (``dinov2_small_offline``,
    12.25 GFLOPs = 6.12 GMACs unreduced), 26 photos (6 bundled + 20 foolbox ImageNet),
    mean over images; GFLOPs per image by ``tokvis.bench.count_flops``, which counts
    a multiply-add as 2 FLOPs (twice the GMACs that papers call "GFLOPs").  "ToMe @ same
    GF": ToMe's fidelity interpolated at VoMix's FLOPs from ToMe runs over a
    range of ``r`` / ``keep_rate``.  VoMix reduces inside a block's attention, so
    at the same schedule it costs fewer FLOPs than ToMe (8.34 vs 9.06 GF at
    ``r=0.05``).  ``vote_weight="similarity"`` gave the same numbers as ``"count"``
    in every row.

    ==============================  ==============  ==============  ==============
    setting                         r=0.05/block    r=0.10/block    keep_rate 0.7
    ==============================  ==============  ==============  ==============
    ToMe, same schedule             .9966 @ 9.06    .9814 @ 6.82    .9856 @ 7.88
    ToMe @ VoMix's GFLOPs           .9930 @ 8.34    .9791 @ 6.32    .9833 @ 7.69
    drop, tau 0.003                 .9869           .9648           .9644
    **drop, tau 0.01 (default)**    .9865           .9648           .9622
    drop, tau 0.03                  .9847           .9661           .9598
    drop, tau 0.1                   .9847           .9648           .9599
    drop, tau 0.3                   .9858           .9615           .9505
    drop, tau 1                     .9845           .9572           .9427
    mix, tau 0.003                  .9854           .9544           .9698
    mix, tau 0.01                   .9870           .9543           .9505
    mix, tau 0.03                   .9849           .9349           .9391
    mix, tau 0.1 (former default)   .9703           .9008           .9161
    mix, tau 0.3                    .9629           .8656           .8597
    mix, tau 1                      .9548           .8177           .8178
    ==============================  ==============  ==============  ==============

    ``"drop"`` is the more robust (its fidelity moves by < 0.005 for tau in
    0.003..0.1; ``"mix"`` is erratic below 0.03 and falls fast above); tau 0.01 is
    within 0.001 of the best mean (0.003) and still mixes softly.  Without
    training, tokvis's VoMix does **not** beat ToMe at matched FLOPs on this
    backbone in any setting measured (the paper's claim is for its own
    implementation and ImageNet accuracy on other backbones).  Removals at
    ``r=0.10`` after the last block: 78% of the top quarter's patches, 76% of
    the bottom quarter's (no spatial bias).

    Parameters
    ----------
    votes : int >= 1
    vote_weight : {"count", "similarity"}
    tau : float > 0
    residual : {"mix", "drop"}
    """

    kind = "prune"  # the default residual="drop"; "soft" with residual="mix"
    stage = "in_attention"
    needs = frozenset({"keys"})

    def __init__(
        self, *, votes: int = 1, vote_weight: str = "count", tau: float = 0.01, residual: str = "drop"
    ) -> None:
        super().__init__()
        self.votes = check_int("votes (votes cast per token)", votes, minimum=1, error=MethodOptionError)
        tau = check_float("tau", tau, low=0.0, high=math.inf, low_open=True, high_open=True, error=MethodOptionError)
        self.vote_weight = check_choice("vote_weight", vote_weight, ("count", "similarity"), error=MethodOptionError)
        self.tau = float(tau)
        self.residual = check_choice("residual", residual, ("mix", "drop"), error=MethodOptionError)
        self.kind = "soft" if residual == "mix" else "prune"
        self._pending = None  # decide() -> reduced_attention() of the same block: the mixing plan

    def options(self) -> dict:
        return {"votes": self.votes, "vote_weight": self.vote_weight, "tau": self.tau, "residual": self.residual}

    def _plan(self, ctx: ReductionContext):
        """Votes [B, n], kept [B, k] and removed [B, m] positions, mixing weights [B, m, k] of a block."""
        assert ctx.keys is not None
        n = ctx.n_in
        if self.votes >= n:
            raise MethodOptionError(f"votes={self.votes} needs more than {self.votes} tokens; the block has {n}")
        sim = key_similarity(ctx.keys[:, :, ctx.num_prefix :])
        B = sim.shape[0]
        # each token's choices; equal similarities (to round-off) go to a fixed neutral order, not to positions
        rank = neutral_rank(n, sim.device).to(torch.float64)
        idx = (_quantise(sim) * (n + 1) + rank).topk(self.votes, dim=-1).indices  # [B, n, votes]
        val = sim.gather(2, idx)

        def received(w):
            return sim.new_zeros(B, n).scatter_add_(1, idx.reshape(B, -1), w.reshape(B, -1))

        by_sim = received(val)
        score = received(torch.ones_like(val)) if self.vote_weight == "count" else by_sim
        # ties: similarity of the votes received, then the token's similarity to its nearest neighbour
        ties = (by_sim, val[..., 0]) if self.vote_weight == "count" else (val[..., 0],)
        m = min(max(n - ctx.target, 0), n - 1)
        removed = select_removed(_quantise(score), m, tuple(_quantise(t) for t in ties))
        keep = torch.ones(B, n, dtype=torch.bool, device=sim.device).scatter_(1, removed, False)
        kept = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, : n - m]  # by position
        return score, keep, kept, removed, mixing_weights(sim, kept, removed, tau=self.tau)

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        score, keep, kept, removed, w = self._plan(ctx)
        self._pending = (ctx, kept, removed, w)  # for reduced_attention of the same block: vote once
        B, n = keep.shape
        n_out = kept.shape[1]
        if self.residual == "drop":
            # the tokens are pruned; the queries are mixed: recorded as query_soft (descriptive, never applied)
            query_soft = mix_matrix(kept, removed, w, n)
            return LayerDecision(
                ctx.layer, "prune", slots_from_keep(keep), keep, n_out=n_out, score=score, query_soft=query_soft
            )
        # dst: a retained token's own slot; a removed token's largest mixing recipient
        dst = slots_from_keep(keep)
        if removed.shape[1]:
            dst.scatter_(1, removed, w.argmax(dim=-1))
        soft = mix_matrix(kept, removed, w, n).to(ctx.x.dtype)
        # sizes: each input's size is shared among its outputs in proportion to its column of soft
        col = soft.sum(1)
        size_scale = 1.0 / col.clamp_min(torch.finfo(col.dtype).tiny)
        return LayerDecision(
            ctx.layer,
            "soft",
            dst,
            keep,
            n_out=n_out,
            soft=soft,
            score=score.to(ctx.x.dtype),
            size_scale=size_scale,
            soft_kept_own=True,  # exactly n_out = n - m kept per image, each only in its own row (mix_matrix)
        )

    def reduced_attention(
        self,
        ctx: ReductionContext,
        decision: LayerDecision,
        *,
        scale: float,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mixed queries ``[B, H, p + n_out, d]`` attending to the full keys and values.

        The removed tokens' queries are mixed into the retained ones sparsely
        (:func:`tokvis.methods.ops.mix_into_kept`, ``m * k * d`` per head), with
        the weights :meth:`decide` computed for this block.
        """
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is ctx:
            _, kept, removed, w = pending
        else:  # called without decide() on this context: plan again
            _, _, kept, removed, w = self._plan(ctx)
        q, k, v = ctx.queries, ctx.keys, ctx.values
        assert q is not None and k is not None and v is not None
        B, H, T, d = q.shape
        p = ctx.num_prefix
        flat = q.transpose(1, 2).reshape(B, T, H * d)
        mixed = mix_into_kept(flat[:, p:], kept, removed, w)
        q_red = torch.cat([flat[:, :p], mixed], 1).reshape(B, -1, H, d).transpose(1, 2)
        mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q_red, k, v, attn_mask=mask, scale=scale)
