"""K-Medoids token clustering: each cluster is replaced by its medoid token (the study's start and update)."""

from __future__ import annotations

from typing import ClassVar

import torch

from tokvis.errors import MethodOptionError, ScheduleError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import decision_dtype, slots_from_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice, check_int

METRICS = ("euclidean", "cosine")
SNAP_ULPS = 32  # Gram-form squared distances up to this many ulps of |x_i|^2 + |x_j|^2 are rounding noise: 0


def pairwise_distance(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Pairwise token distances.

    Parameters
    ----------
    x : Tensor [B, n, C]
    metric : {"euclidean", "cosine"}
        ``"euclidean"``: ``||x_i - x_j||``, from one batched matrix product on the centred
        tokens (``|x_i|^2 + |x_j|^2 - 2 x_i . x_j``; ten times faster on the CPU than
        ``torch.cdist`` from the differences); a squared distance within the rounding error
        of that form (``SNAP_ULPS`` ulps of ``|x_i|^2 + |x_j|^2``) is 0, so identical tokens
        are at distance exactly 0, as before.  ``"cosine"``: ``1 - cos(x_i, x_j)``.  Both are
        made exactly symmetric with an exactly zero diagonal, so exact ties stay ties.

    Returns
    -------
    Tensor [B, n, n]
    """
    x = x.to(decision_dtype(x.dtype))  # float32 distances for fp16 / bf16 tokens keep partitions stable
    if metric == "euclidean":
        x = x - x.mean(1, keepdim=True)  # distances are translation-invariant; centred tokens cancel less
        sq = x.pow(2).sum(-1)
        total = sq[:, :, None] + sq[:, None, :]  # exactly symmetric
        d = torch.baddbmm(total, x, x.transpose(1, 2), alpha=-2.0)
        d = 0.5 * (d + d.transpose(1, 2))  # exactly symmetric (a matmul need not be), so exact ties stay ties
        # within the Gram form's rounding error a squared distance is noise: 0, as for identical tokens
        d = d.masked_fill_(d <= SNAP_ULPS * torch.finfo(x.dtype).eps * total, 0.0)
    else:
        u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        d = (1.0 - u @ u.transpose(1, 2)).clamp_min(0.0)
        d = 0.5 * (d + d.transpose(1, 2))  # exactly symmetric (a matmul need not be), so exact ties stay ties
    d = d.diagonal_scatter(torch.zeros_like(d.diagonal(dim1=1, dim2=2)), dim1=1, dim2=2)
    return d.sqrt_() if metric == "euclidean" else d


def assign_to_medoids(dist: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """Cluster of every token: its nearest medoid (first one on ties); a medoid is its own cluster.

    Parameters
    ----------
    dist : Tensor [B, n, n]
    medoids : LongTensor [B, K]
        Distinct token indices.

    Returns
    -------
    LongTensor [B, n]
        Index ``0 .. K-1`` into ``medoids``.
    """
    B, n, _ = dist.shape
    K = medoids.shape[1]
    to_med = dist.gather(2, medoids[:, None, :].expand(B, n, K))  # [B, n, K]
    cluster = to_med.argmin(dim=2)
    cluster.scatter_(1, medoids, torch.arange(K, device=dist.device).expand(B, K))
    return cluster


def kmedoids(
    dist: torch.Tensor, init: torch.Tensor, iterations: int, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating K-Medoids (Voronoi iteration) from given initial medoids.

    One iteration: assign every token to its nearest medoid, then make each
    cluster's medoid the member with the smallest cost (first one on ties).
    The cost is, with ``weight`` (the study's rule, ``kmedoids.py:68-69,76-79``),
    the token's weight times its summed distance to *all* tokens, whatever their
    cluster; without it (``None``), the summed distance to the other members of
    its own cluster (the textbook medoid).  After ``iterations`` updates the
    tokens are assigned once more to the final medoids.

    Parameters
    ----------
    dist : Tensor [B, n, n]
        Symmetric distances with a zero diagonal.
    init : LongTensor [B, K]
        Distinct initial medoids.
    iterations : int, >= 1
    weight : Tensor [B, n], optional
        Token weights of the study's update rule.

    Returns
    -------
    medoids : LongTensor [B, K]
        Token index of each cluster's medoid.
    cluster : LongTensor [B, n]
        Cluster (index into ``medoids``) of every token.
    """
    B, n, _ = dist.shape
    K = init.shape[1]
    medoids = init
    if weight is not None:  # the same for every iteration: row i of the distances scaled by w_i, summed
        total = (dist * weight.to(dist.dtype)[:, :, None]).sum(2)
    for _ in range(iterations):
        cluster = assign_to_medoids(dist, medoids)
        if weight is None:
            same = cluster[:, :, None] == cluster[:, None, :]  # [B, n, n]
            cost = torch.where(same, dist, 0.0).sum(2)  # [B, n] sum of distances within the own cluster
        else:
            cost = total
        member = cluster[:, None, :] == torch.arange(K, device=dist.device)[None, :, None]  # [B, K, n]
        medoids = torch.where(member, cost[:, None, :], float("inf")).argmin(2)  # first minimum: lowest index
    return medoids, assign_to_medoids(dist, medoids)


INITS = ("attn_received", "cls_attn")
UPDATES = ("weighted_total", "within_cluster")


@register_method("kmedoids")
class KMedoids(Method):
    """K-Medoids clustering of the patch tokens; each cluster becomes its medoid (the study's rule by default).

    The study (``models/kmedoids.py`` of the TokenReduction repository) clusters
    the *input* of each reducing block ``L``, before the block
    (``kmedoids.py:237-251``), on the tokens' features under Euclidean distance:

    - start: the ``K = target`` tokens that *received* the most attention in block
      ``L - 1`` (its attention map summed over heads and queries,
      ``kmedoids.py:240``; top-K, ``:63``), by decreasing attention;
    - ``iterations`` rounds of: assign every token to its nearest medoid
      (``:72-73``), then in each cluster take the member that minimises its
      attention weight times its summed distance to *all* tokens (``:68-69,76-79``);
    - a last assignment to the final medoids (``:81-82``); each cluster's output
      token is its medoid's features (``:84``).

    That is the default here (``init="attn_received"``, ``update="weighted_total"``):
    stage ``"before_block"``, and the block before each reducing block hands on the
    attention its tokens received (need ``"prev_attn_received"``; that block
    computes its explicit attention map).  A reduction at block 0 has no block
    before it (the study's model cannot run there either): ``ScheduleError`` when
    the model runs; a count ``r`` without ``locations`` therefore reduces at every
    block but the first.

    Named options keep tokvis's former rule:

    ``init="cls_attn"``
        start from the ``K`` tokens the class token attends to most (head mean) in
        block ``L`` itself, deciding after block ``L``'s attention residual and
        before its MLP (stage ``"after_attn"``); needs a class token.
    ``update="within_cluster"``
        a medoid is the member with the smallest summed distance to the other
        members of its cluster (the textbook medoid; no weights).

    With ``update="weighted_total"`` the weights are the start scores (the attention
    received, or the class attention under ``init="cls_attn"``).  Ties go to the
    lower index; a medoid always belongs to its own cluster, and a cluster's new
    medoid is one of its members (the study masks non-members with a large
    constant, ``:77``, which only differs when a cost exceeds it).

    The decision gives the medoid weight 1 and the other members weight 0, so
    :func:`~tokvis.methods.ops.apply_decision` returns exactly the medoid's
    features, while the output token's size is the sum of the cluster's sizes.
    ``keep`` marks the medoids; output slots follow the medoids' original order
    (the study's follow its medoid list; later blocks are permutation-equivariant).
    The recorded score is the start score.

    Parameters
    ----------
    iterations : int, >= 1
        Medoid updates (default 3, the study's ``--cluster_iters``).
    metric : {"euclidean", "cosine"}
        Token distance (default "euclidean", the study's).
    init : {"attn_received", "cls_attn"}
        Start medoids (default "attn_received", the study's).
    update : {"weighted_total", "within_cluster"}
        Medoid update rule (default "weighted_total", the study's).
    """

    kind = "merge"
    decisions_version: ClassVar[int] = 2
    class_token_use = "initialises its medoids from the class token's attention (init='cls_attn')"
    no_class_token_hint = "use init='attn_received' (the study's start), or a method such as 'tome' or 'dpcknn'"

    def __init__(
        self,
        *,
        iterations: int = 3,
        metric: str = "euclidean",
        init: str = "attn_received",
        update: str = "weighted_total",
    ) -> None:
        super().__init__()
        self.iterations = check_int("iterations", iterations, minimum=1, error=MethodOptionError)
        self.metric = check_choice("metric", metric, METRICS, error=MethodOptionError)
        self.init = check_choice("init", init, INITS, error=MethodOptionError)
        self.update = check_choice("update", update, UPDATES, error=MethodOptionError)
        study_start = init == "attn_received"
        self.stage = "before_block" if study_start else "after_attn"
        self.needs = frozenset({"prev_attn_received" if study_start else "cls_attn"})
        self.requires_class_token = not study_start

    def options(self) -> dict:
        return {"iterations": self.iterations, "metric": self.metric, "init": self.init, "update": self.update}

    def default_locations(self, depth: int, *, keep_rate=None, r=None) -> list[int] | None:
        """``r`` at every block but the first under the study's start (block 0 has no block before it)."""
        if self.init != "attn_received" or isinstance(r, (bool, list, tuple)) or not isinstance(r, (int, float)):
            return None  # keep_rate (the quarter points), a per-block r list, or the former start: the schedule's own
        return list(range(1, depth)) if depth > 1 else None

    def _start_score(self, ctx: ReductionContext) -> torch.Tensor:
        score = ctx.prev_attn_received if self.init == "attn_received" else ctx.cls_attn
        if score is None and self.init == "attn_received":
            raise ScheduleError(
                f"kmedoids starts from the attention received in the block before the reducing block, but block "
                f"{ctx.layer} has none before it; reduce at blocks >= 1, or use init='cls_attn'"
            )
        assert score is not None
        return score

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        x = ctx.x[:, ctx.num_prefix :]
        B, n, _ = x.shape
        if ctx.target >= n:  # nothing to reduce (the block before computed nothing for it)
            ar = torch.arange(n, device=x.device).expand(B, n).clone()
            score = ctx.cls_attn if self.init == "cls_attn" else None
            return LayerDecision(ctx.layer, "merge", ar, torch.ones_like(ar, dtype=torch.bool), n_out=n, score=score)
        score = self._start_score(ctx)
        K = ctx.target
        init = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :K]
        dist = pairwise_distance(x.detach(), self.metric)
        weight = score if self.update == "weighted_total" else None
        medoids, cluster = kmedoids(dist, init, self.iterations, weight)
        keep = torch.zeros(B, n, dtype=torch.bool, device=x.device)
        keep.scatter_(1, medoids, True)
        slot_of_token = slots_from_keep(keep)  # slot of each medoid by original position
        dst = slot_of_token.gather(1, medoids).gather(1, cluster)
        weight = keep.to(x.dtype)
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=K, weight=weight, score=score)
