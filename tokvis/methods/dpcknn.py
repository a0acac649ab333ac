"""DPC-KNN: density-peak clustering with k-nearest-neighbour density (as in TCFormer and the study)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from tokvis.errors import MethodOptionError, UnsupportedModelError
from tokvis.methods.base import Method, ModelInfo, ReductionContext
from tokvis.methods.ops import decision_dtype, slots_from_keep
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
    x = x.to(decision_dtype(x.dtype))  # no fp16 / bf16 cdist kernel, and float32 distances keep partitions stable
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(C)
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
class DPCKNN(Method):
    """DPC-KNN token clustering (TCFormer's clustering, as compared in the study).

    At each reducing block, after the attention residual and before the MLP, on
    the patch tokens' features: the density ``rho`` of each token comes from its
    ``k`` nearest neighbours, the distance indicator ``delta`` is its distance to
    the nearest denser token (:func:`dpc_knn`), the ``target`` tokens with the
    largest ``rho * delta`` are the cluster centres, and every token joins its
    nearest centre (:func:`dpc_centres`).  Deterministic: ties are broken by
    index, where TCFormer adds tiny random noise to the density.

    Each cluster becomes one token, the weighted mean of its members:

    ``merge="average"``
        equal weights (the plain mean of the members' features).
    ``merge="learned"``
        weights ``exp(s_i)`` with ``s_i = w . x_i + b`` from a learned
        ``nn.Linear(dim, 1)`` (TCFormer's token-importance weights).  The layer is
        initialised deterministically from ``seed`` (weights ``N(0, 0.02^2)``, bias
        0) and created when the method is patched into a model (or at
        construction with ``dim=``); it is trained through the weighted mean
        (``tokvis.fit``) or loaded with ``load_state_dict``.  Running with the
        untrained initialisation emits a ``UserWarning``.

    ``keep`` marks the centres; output slots follow the centres' original order;
    the recorded score is ``rho * delta``.  Works with and without a class token.

    Parameters
    ----------
    k : int, >= 1
        Neighbours for the density (default 5).
    merge : {"average", "learned"}
    seed : int
        Initialisation of the learned weights.
    dim : int, optional
        Token dimension, to create the learned layer before patching (e.g. to load
        a state dict first).
    """

    kind = "merge"

    def __init__(self, *, k: int = 5, merge: str = "average", seed: int = 0, dim: int | None = None) -> None:
        super().__init__()
        self.k = check_int("k (neighbours for the density)", k, minimum=1, error=MethodOptionError)
        self.seed = check_int("seed", seed, error=MethodOptionError)
        if dim is not None:
            dim = check_int("dim (the model's embed_dim)", dim, minimum=1, error=MethodOptionError)
        self.merge = check_choice("merge", merge, MERGES, error=MethodOptionError)
        self.score_layer: nn.Linear | None = None
        self._warned = False
        if merge == "learned" and dim is not None:
            self._build(dim)

    def options(self) -> dict:
        return {"k": self.k, "merge": self.merge, "seed": self.seed}

    # -- learned weights --------------------------------------------------------------------------
    def _build(self, dim: int) -> None:
        g = torch.Generator().manual_seed(self.seed)
        layer = nn.Linear(dim, 1)
        with torch.no_grad():
            layer.weight.copy_(0.02 * torch.randn(1, dim, generator=g))
            layer.bias.zero_()
        self.score_layer = layer
        # the initial values, to tell untrained parameters apart (not saved in the state dict)
        self.register_buffer("_init_weight", layer.weight.detach().clone(), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # learned weights saved from a patched method load into a fresh one (the layer is created lazily)
        w = state_dict.get(prefix + "score_layer.weight")
        if self.merge == "learned" and self.score_layer is None and w is not None and w.dim() == 2:
            self._build(int(w.shape[1]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_model(self, info: ModelInfo) -> None:
        super().check_model(info)
        if self.merge != "learned":
            return
        if self.score_layer is None:
            self._build(info.embed_dim)
        elif self.score_layer.in_features != info.embed_dim:
            raise UnsupportedModelError(
                f"dpcknn's learned weights take {self.score_layer.in_features}-dim tokens but the model's tokens "
                f"have {info.embed_dim} dims; create the method with dim={info.embed_dim} (or load matching weights)"
            )

    def is_trained(self) -> bool:
        """Whether the learned layer differs from its seeded initialisation (fitted or loaded)."""
        if self.score_layer is None:
            return False
        w = self.score_layer.weight
        return not torch.equal(w.detach(), self._init_weight.to(w.dtype))

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge == "average":
            return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        if self.score_layer is None:
            self._build(x.shape[-1])
            self.score_layer.to(x.device)  # type: ignore[union-attr]
            self._init_weight = self._init_weight.to(x.device)
        if not self._warned and not self.is_trained():
            warnings.warn(
                "dpcknn with merge='learned' is running with untrained merge weights (seeded initialisation); "
                "fit them with tokvis.fit or load a state dict, or use merge='average'",
                UserWarning,
                stacklevel=2,
            )
            self._warned = True
        layer = self.score_layer
        assert layer is not None
        s = nn.functional.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype)).squeeze(-1)
        return s.exp()

    # -- decision ---------------------------------------------------------------------------------
    def decide(self, ctx: ReductionContext) -> LayerDecision:
        x = ctx.x[:, ctx.num_prefix :]
        B, n, _ = x.shape
        if ctx.target >= n:
            ar = torch.arange(n, device=x.device).expand(B, n).clone()
            return LayerDecision(ctx.layer, "merge", ar, torch.ones_like(ar, dtype=torch.bool), n_out=n)
        density, delta, dist = dpc_knn(x.detach(), self.k)
        score = density * delta
        centres, cluster = dpc_centres(score, dist, ctx.target)
        keep = torch.zeros(B, n, dtype=torch.bool, device=x.device)
        keep.scatter_(1, centres, True)
        dst = slots_from_keep(keep).gather(1, centres).gather(1, cluster)
        return LayerDecision(ctx.layer, "merge", dst, keep, n_out=ctx.target, weight=self._weights(x), score=score)
