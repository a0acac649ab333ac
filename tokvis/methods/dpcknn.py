"""DPC-KNN: density-peak clustering with k-nearest-neighbour density (as in TCFormer and the study)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from tokvis.errors import MethodOptionError
from tokvis.methods._learned import LearnedMethod, identity_decision, init_linear
from tokvis.methods.base import ReductionContext, check_placement
from tokvis.methods.kmedoids import pairwise_distance
from tokvis.methods.ops import slots_from_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice, check_int

MERGES = ("average", "learned")


def dpc_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density, distance indicator and pairwise distances of DPC-KNN.

    Parameters
    ----------
    x : Tensor [B, n, C]
        Token features.
    k : int, >= 1
        Neighbours for the density (capped at ``n``).

    Returns
    -------
    density : Tensor [B, n]
        ``exp(-mean of the squared distances to the k nearest tokens)``; the
        token itself is one of them (distance 0), as in TCFormer.
    delta : Tensor [B, n]
        Distance to the nearest token of higher density; ties in density are
        broken by index (the lower index counts as higher), so exactly one token
        per image has no higher token and gets the largest pairwise distance of
        the image instead.
    dist : Tensor [B, n, n]
        ``||x_i - x_j|| / sqrt(C)`` (TCFormer's scaling).
    """
    B, n, C = x.shape
    dist = pairwise_distance(x, "euclidean") / math.sqrt(C)  # float32 for fp16 / bf16 tokens
    near = dist.topk(min(k, n), dim=2, largest=False).values
    density = (-(near**2).mean(2)).exp()
    idx = torch.arange(n, device=x.device)
    higher = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, None, :] < idx[None, :, None])
    )  # higher[b, i, j]: token j is above token i
    dmax = dist.flatten(1).max(1).values[:, None]
    delta = torch.where(higher, dist, torch.inf).min(2).values
    delta = torch.where(higher.any(2), delta, dmax)
    return density, delta, dist


def dpc_centres(score: torch.Tensor, dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (the ``k`` highest scores, ties to the lower index) and the nearest centre of every token.

    Returns
    -------
    centres : LongTensor [B, k]
        Token index of each centre, by decreasing score.
    cluster : LongTensor [B, n]
        Index into ``centres`` of every token's nearest centre (first one on ties;
        a centre is its own cluster).
    """
    B, n = score.shape
    centres = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    to_c = dist.gather(2, centres[:, None, :].expand(B, n, k))
    cluster = to_c.argmin(2)
    cluster.scatter_(1, centres, torch.arange(k, device=score.device).expand(B, k))
    return centres, cluster


@register_method("dpcknn")
class DPCKNN(LearnedMethod):
    """DPC-KNN token clustering (TCFormer's clustering, as in the study's ``models/dpcknn.py``).

    The study clusters the *input* of each reducing block, before the block
    (``dpcknn.py:256-268``); that is the default here (``placement="before_block"``).
    On the patch tokens' features: the density ``rho`` of each token comes from
    its ``k`` nearest neighbours, the distance indicator ``delta`` is its distance
    to the nearest denser token (:func:`dpc_knn`, ``dpcknn.py:59-84``), the
    ``target`` tokens with the largest ``rho * delta`` are the cluster centres, and
    every token joins its nearest centre (:func:`dpc_centres`, ``:87-98``).
    Deterministic: ties are broken by index, where TCFormer and the study add
    noise below ``1e-6`` to the density (``:73-74``).

    Each cluster becomes one token, the weighted mean of its members
    (``merge_tokens``, ``dpcknn.py:103-133``):

    ``merge="average"`` (default, parameter-free)
        equal weights: the plain mean of the members' features.  This is the
        study's ``--equal_weight`` mode (``CTM.equal_weight``, ``dpcknn.py:150,158-159``).
    ``merge="learned"``
        the study's default mode (``dpcknn.py:150-157``): weights ``exp(s_i)`` with
        ``s_i = w . x_i + b`` from a learned ``nn.Linear(dim, 1)``, *one per reduction
        location* (the study's ``cluster_layers.{i}.score``).  Each layer is
        initialised from ``(seed, block)`` (weights ``N(0, 0.02^2)`` clipped at two
        standard deviations, bias 0, as timm initialises the study's) when the
        block first reduces; it is trained through the weighted mean
        (:func:`tokvis.fit`), or loaded (:func:`tokvis.fitting.load_method`,
        :func:`~tokvis.fitting.load_study_checkpoint`).  Running it unfitted warns once.

    ``placement="after_attn"`` keeps tokvis's former placement: after the block's
    attention residual and before its MLP, on those tokens (the block's attention
    then runs on all tokens).

    The study adds ``1e-6`` to each cluster's summed weight (``:125``); tokvis
    divides by the exact sum (a relative difference below ``1e-6`` per cluster).
    ``keep`` marks the centres; output slots follow the centres' original order
    (the study's follow the centres' score order; later blocks are
    permutation-equivariant); the recorded score is ``rho * delta``.  Works with
    and without a class token.

    Parameters
    ----------
    k : int, >= 1
        Neighbours for the density (default 5, the study's ``--k_neighbors``).
    merge : {"average", "learned"}
    placement : {"before_block", "after_attn"}
        Where the block reduces (default "before_block", the study's).
    seed : int >= 0
        Initialisation of the learned weights.

    Study checkpoints (``merge="learned"``): ``cluster_layers.{i}.score.weight`` /
    ``.bias`` -> ``reducers.{block}.weight`` / ``.bias``.
    """

    kind = "merge"
    decisions_version: ClassVar[int] = 2
    slots_in_shape = False

    def __init__(self, *, k: int = 5, merge: str = "average", placement: str = "before_block", seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.k = check_int("k (neighbours for the density)", k, minimum=1, error=MethodOptionError)
        self.merge = check_choice("merge", merge, MERGES, error=MethodOptionError)
        self.stage = check_placement(placement)
        self.learned = merge == "learned"

    def options(self) -> dict:
        return {"k": self.k, "merge": self.merge, "placement": self.stage, "seed": self.seed}

    # -- learned weights (merge="learned") --------------------------------------------------------
    def make_reducer(self, dim: int, n_out: int, g: torch.Generator) -> nn.Module:
        layer = nn.Linear(dim, 1)
        init_linear(layer, g)
        return layer

    def reducer_shape(self, entries: dict[str, torch.Tensor]) -> tuple[int, int]:
        return int(entries["weight"].shape[1]), 0

    def study_key_map(self) -> dict[str, str]:
        return {"score.weight": "weight", "score.bias": "bias"}

    # -- decision ---------------------------------------------------------------------------------
    def decide(self, ctx: ReductionContext) -> LayerDecision:
        if self.learned:  # the per-block score layer (created, checked, warned about by LearnedMethod)
            return super().decide(ctx)
        if ctx.target >= ctx.n_in:
            return identity_decision(ctx)
        x = ctx.x[:, ctx.num_prefix :]
        return self._cluster(ctx, x, torch.ones(x.shape[:2], dtype=x.dtype, device=x.device))

    def reduce(self, module: nn.Module, ctx: ReductionContext) -> LayerDecision:
        x = ctx.x[:, ctx.num_prefix :]
        s = nn.functional.linear(x, module.weight.to(x.dtype), module.bias.to(x.dtype)).squeeze(-1)
        return self._cluster(ctx, x, s.exp())

    def _cluster(self, ctx: ReductionContext, x: torch.Tensor, weight: torch.Tensor) -> LayerDecision:
        B, n, _ = x.shape
        density, delta, dist = dpc_knn(x.detach(), self.k)
        score = density * delta
        centres, cluster = dpc_centres(score, dist, ctx.target)
        keep = torch.zeros(B, n, dtype=torch.bool, device=x.device)
        keep.scatter_(1, centres, True)
        dst = slots_from_keep(keep).gather(1, centres).gather(1, cluster)
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=ctx.target, weight=weight, score=score)
