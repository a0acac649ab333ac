"""Sinkhorn clustering: balanced soft assignment of tokens to learned unit-norm centres."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.errors import MethodOptionError
from tokvis.methods._learned import LearnedMethod, soft_decision
from tokvis.methods.base import ReductionContext
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_float, check_int


def log_sinkhorn(scores: torch.Tensor, *, eps: float, iters: int) -> torch.Tensor:
    """Entropic optimal transport plan between tokens and slots, in the log domain.

    Parameters
    ----------
    scores : Tensor [B, n, K]
        Similarity of each token to each slot (the negative cost).
    eps : float > 0
        Entropic regularisation (temperature of ``exp(scores / eps)``).
    iters : int >= 1
        Sinkhorn iterations; each rescales the rows, then the columns.

    Returns
    -------
    plan : Tensor [B, n, K]
        Approximately balanced plan with row sums ``1/n`` (tokens) and column
        sums ``1/K`` (slots); the column sums are exact (the last step rescales
        the columns), the row sums converge with ``iters``.
    """
    B, n, K = scores.shape
    z = scores / eps
    log_a = -math.log(n)
    log_b = -math.log(K)
    g = z.new_zeros(B, 1, K)
    f = z.new_zeros(B, n, 1)
    for _ in range(iters):
        f = log_a - torch.logsumexp(z + g, dim=2, keepdim=True)
        g = log_b - torch.logsumexp(z + f, dim=1, keepdim=True)
    return (z + f + g).exp()


class Centres(nn.Module):
    """Learned centres ``[K, C]``, used unit-normalised."""

    def __init__(self, dim: int, n_out: int) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.zeros(n_out, dim))

    def forward(self, x: torch.Tensor, *, eps: float, iters: int) -> torch.Tensor:
        """Row-normalised assignment ``[B, K, n]`` of tokens ``x [B, n, C]`` to the centres."""
        c = F.normalize(self.centres, dim=-1)
        scores = F.normalize(x, dim=-1) @ c.t()  # cosine similarity [B, n, K]
        plan = log_sinkhorn(scores, eps=eps, iters=iters)
        soft = plan.transpose(1, 2)
        return soft / soft.sum(-1, keepdim=True)


@register_method("sinkhorn")
class Sinkhorn(LearnedMethod):
    """Sinkhorn token clustering, as evaluated in the "Which Tokens" study.

    At each reducing block (after the attention, before the MLP), the patch
    tokens and ``K = target`` learned centres are L2-normalised; their cosine
    similarities go through ``iters`` log-domain Sinkhorn iterations
    (:func:`log_sinkhorn`) towards a balanced plan: every token has mass ``1/n``,
    every slot ``1/K``.  Slot ``j``'s output token is the plan-weighted mean of
    the tokens, ``soft[j] = plan[:, j] / sum(plan[:, j])`` (kind ``"soft"``, rows
    of ``soft`` sum to 1).  ``dst`` / ``keep`` as in
    :func:`~tokvis.methods._learned.soft_decision`.  A block whose budget keeps
    every token is skipped (identity, kind "prune").

    Differences from the study's module, by design: the output mixes the
    residual-stream tokens (the study mixes the normalised ones, with the plan
    scaled by ``n + K`` instead of normalised per slot); the marginals are
    ``1/n`` and ``1/K`` (the study uses ``1/(n + K)`` for both, which is
    unbalanced when ``n != K``); the centres are normalised inside the forward
    (differentiably) instead of being renormalised in place.

    With the study's ``eps=1`` and cosine scores in ``[-1, 1]`` the kernel
    ``exp(scores / eps)`` spans at most a factor ``e**2``, so every slot mixes
    nearly all tokens; the study trained the backbone with the module.  On a
    frozen backbone (:func:`tokvis.fit`) a smaller ``eps`` fits better: on
    DINOv2 ViT-S/14 at keep rate 0.5 the fitted feature fidelity is 0.41 with
    ``eps=1`` and 0.49 with ``eps=0.1`` (``benchmarks/fit_patterns.py --save``,
    then ``benchmarks/bench_methods.py --fitted``).

    Parameters
    ----------
    eps : float > 0
        Entropic regularisation (study default 1.0; smaller is sharper).
    iters : int >= 1
        Sinkhorn iterations (study default 3).
    seed : int >= 0
        Seeds the centres (standard normal, then normalised).

    Study checkpoints: ``cluster_layers.{i}.v`` -> ``centres`` ``[K, C]``.
    """

    kind = "soft"

    def __init__(self, *, eps: float = 1.0, iters: int = 3, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.eps = check_float("eps", eps, low=0.0, low_open=True, error=MethodOptionError)
        self.iters = check_int("iters", iters, minimum=1, error=MethodOptionError)

    def options(self) -> dict:
        return {"eps": self.eps, "iters": self.iters, "seed": self.seed}

    def make_reducer(self, dim: int, n_out: int, g: torch.Generator) -> nn.Module:
        mod = Centres(dim, n_out)
        with torch.no_grad():
            mod.centres.copy_(F.normalize(torch.randn(n_out, dim, generator=g), dim=-1))
        return mod

    def reducer_shape(self, entries: dict[str, torch.Tensor]) -> tuple[int, int]:
        c = entries["centres"]
        return int(c.shape[1]), int(c.shape[0])

    def study_key_map(self) -> dict[str, str]:
        return {"v": "centres"}

    def reduce(self, module: nn.Module, ctx: ReductionContext) -> LayerDecision:
        return soft_decision(ctx.layer, module(ctx.x[:, ctx.num_prefix :], eps=self.eps, iters=self.iters))
