"""K-Medoids token clustering: each cluster is replaced by its medoid token."""

from __future__ import annotations

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import decision_dtype, slots_from_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice, check_int

METRICS = ("euclidean", "cosine")


def pairwise_distance(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Pairwise token distances.

    Parameters
    ----------
    x : Tensor [B, n, C]
    metric : {"euclidean", "cosine"}
        ``"euclidean"``: ``||x_i - x_j||`` (computed from the differences, not from
        the Gram matrix, so the diagonal is exactly 0); ``"cosine"``: ``1 - cos(x_i, x_j)``
        (made exactly symmetric with a zero diagonal).

    Returns
    -------
    Tensor [B, n, n]
    """
    x = x.to(decision_dtype(x.dtype))  # no fp16 / bf16 cdist kernel, and float32 distances keep partitions stable
    if metric == "euclidean":
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = (1.0 - u @ u.transpose(1, 2)).clamp_min(0.0)
    d = 0.5 * (d + d.transpose(1, 2))  # exactly symmetric (a matmul need not be), so exact ties stay ties
    return d.diagonal_scatter(torch.zeros_like(d.diagonal(dim1=1, dim2=2)), dim1=1, dim2=2)


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


def kmedoids(dist: torch.Tensor, init: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating K-Medoids (Voronoi iteration) from given initial medoids.

    One iteration: assign every token to its nearest medoid, then make each
    cluster's medoid the member with the smallest sum of distances to the other
    members (first one on ties).  After ``iterations`` updates the tokens are
    assigned once more to the final medoids.

    Parameters
    ----------
    dist : Tensor [B, n, n]
        Symmetric distances with a zero diagonal.
    init : LongTensor [B, K]
        Distinct initial medoids.
    iterations : int, >= 1

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
    for _ in range(iterations):
        cluster = assign_to_medoids(dist, medoids)
        same = cluster[:, :, None] == cluster[:, None, :]  # [B, n, n]
        cost = torch.where(same, dist, 0.0).sum(2)  # [B, n] sum of distances within the own cluster
        member = cluster[:, None, :] == torch.arange(K, device=dist.device)[None, :, None]  # [B, K, n]
        medoids = torch.where(member, cost[:, None, :], float("inf")).argmin(2)  # first minimum: lowest index
    return medoids, assign_to_medoids(dist, medoids)


@register_method("kmedoids")
class KMedoids(Method):
    """K-Medoids clustering of the patch tokens; each cluster becomes its medoid.

    At each reducing block, after the attention residual and before the MLP, the
    patch tokens are clustered into ``target`` clusters by K-Medoids on their
    features (the block's tokens at that point), under ``metric`` distance.
    Initial medoids are the ``target`` patch tokens the class token attends to
    most (head-mean attention); then ``iterations`` rounds of assignment and
    medoid update (:func:`kmedoids`).  Each cluster's output token is the medoid
    token itself: the decision gives the medoid weight 1 and the other members
    weight 0, so :func:`~tokvis.methods.ops.apply_decision` returns exactly the
    medoid's features, while the output token's size is the sum of the cluster's
    sizes.  ``keep`` marks the medoids; output slots follow the medoids' original
    order.  The recorded score is the class attention used for initialisation.

    Needs a class token (``UnsupportedModelError`` on average-pooling models).

    Parameters
    ----------
    iterations : int, >= 1
        Medoid updates (default 3).
    metric : {"euclidean", "cosine"}
        Token distance (default "euclidean").
    """

    kind = "merge"
    needs = frozenset({"cls_attn"})
    requires_class_token = True
    class_token_use = "initialises its medoids from the class token's attention"

    def __init__(self, *, iterations: int = 3, metric: str = "euclidean") -> None:
        super().__init__()
        self.iterations = check_int("iterations", iterations, minimum=1, error=MethodOptionError)
        self.metric = check_choice("metric", metric, METRICS, error=MethodOptionError)

    def options(self) -> dict:
        return {"iterations": self.iterations, "metric": self.metric}

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        assert ctx.cls_attn is not None
        x = ctx.x[:, ctx.num_prefix :]
        B, n, _ = x.shape
        score = ctx.cls_attn
        if ctx.target >= n:
            ar = torch.arange(n, device=x.device).expand(B, n).clone()
            return LayerDecision(ctx.layer, "merge", ar, torch.ones_like(ar, dtype=torch.bool), n_out=n, score=score)
        K = ctx.target
        init = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :K]
        dist = pairwise_distance(x.detach(), self.metric)
        medoids, cluster = kmedoids(dist, init, self.iterations)
        keep = torch.zeros(B, n, dtype=torch.bool, device=x.device)
        keep.scatter_(1, medoids, True)
        slot_of_token = slots_from_keep(keep)  # slot of each medoid by original position
        dst = slot_of_token.gather(1, medoids).gather(1, cluster)
        weight = keep.to(x.dtype)
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=K, weight=weight, score=score)
