"""Sinkhorn clustering: balanced soft assignment of tokens to learned unit-norm centres."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.errors import MethodOptionError
from tokvis.methods._learned import LearnedMethod, soft_decision
from tokvis.methods.base import ReductionContext, check_placement
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice, check_float, check_int


def log_sinkhorn(
    scores: torch.Tensor, *, eps: float, iters: int, marginal: float | None = None, scale: float = 1.0
) -> torch.Tensor:
    """Entropic optimal transport plan between the rows and columns of ``scores``, in the log domain.

    Parameters
    ----------
    scores : Tensor [B, n, K]
        Similarity of each row item to each column item (the negative cost).
    eps : float > 0
        Entropic regularisation (temperature of ``exp(scores / eps)``).
    iters : int >= 1
        Sinkhorn iterations; each rescales the rows, then the columns.
    marginal : float, optional
        The mass of every row and every column item (the study's ``1 / (n + K)``,
        ``sinkhorn.py:47-49``); default ``1/n`` per row and ``1/K`` per column
        (a balanced plan).
    scale : float
        Multiplies the plan (the study's ``n + K``, ``sinkhorn.py:54``), inside the exponential.

    Returns
    -------
    plan : Tensor [B, n, K]
        The plan times ``scale``; the column sums are exact (the last step rescales
        the columns), the row sums converge with ``iters``.
    """
    B, n, K = scores.shape
    z = scores / eps
    log_a = -math.log(n) if marginal is None else math.log(marginal)
    log_b = -math.log(K) if marginal is None else math.log(marginal)
    g = z.new_zeros(B, 1, K)
    f = z.new_zeros(B, n, 1)
    for _ in range(iters):
        f = log_a - torch.logsumexp(z + g, dim=2, keepdim=True)
        g = log_b - torch.logsumexp(z + f, dim=1, keepdim=True)
    return (z + f + g + math.log(scale)).exp()


OUTPUTS = ("study", "mean")


class Centres(nn.Module):
    """Learned centres ``[K, C]``, used unit-normalised."""

    def __init__(self, dim: int, n_out: int) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.zeros(n_out, dim))

    def forward(
        self, x: torch.Tensor, *, eps: float, iters: int, output: str = "study"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Assignment ``soft [B, K, n]`` of tokens ``x [B, n, C]`` to the centres, and the tokens it mixes.

        ``output="study"``: the study's plan (slots rescaled first, marginals
        ``1/(n+K)``, times ``n+K``: every token's column sums to 1) and the
        L2-normalised tokens it mixes; ``"mean"``: the balanced plan (tokens
        first, marginals ``1/n`` and ``1/K``) normalised per slot, mixing the tokens
        themselves (``None``)."""
        c = F.normalize(self.centres, dim=-1)
        u = F.normalize(x, dim=-1)
        scores = u @ c.t()  # cosine similarity [B, n, K]
        if output == "study":
            n, K = scores.shape[1], scores.shape[2]
            return log_sinkhorn(scores.transpose(1, 2), eps=eps, iters=iters, marginal=1 / (n + K), scale=n + K), u
        soft = log_sinkhorn(scores, eps=eps, iters=iters).transpose(1, 2)
        return soft / soft.sum(-1, keepdim=True), None


@register_method("sinkhorn")
class Sinkhorn(LearnedMethod):
    """Sinkhorn token clustering, as in the study's ``models/sinkhorn.py``.

    The study reduces the *input* of each reducing block, before the block
    (``sinkhorn.py:164-168``); that is the default here (``placement="before_block"``).
    The patch tokens and ``K = target`` learned centres are L2-normalised
    (``sinkhorn.py:70,73-76``); their cosine similarities (``:79``) go through
    ``iters`` log-domain Sinkhorn iterations (:func:`log_sinkhorn`) with, as in the
    study (``output="study"``, the default):

    - the slots rescaled first, then the tokens (``:35-37``, on the slots x tokens matrix),
    - every slot's and every token's mass ``1/(n + K)`` (``:47-50``),
    - the plan multiplied by ``n + K`` (``:54``), so each token's weights over the
      slots sum to 1 (the slots' sums are not balanced when ``n != K``);

    slot ``j``'s output token is ``sum_i plan[j, i] * x_i / ||x_i||``: the plan mixes
    the *L2-normalised* tokens, unnormalised per slot (``:84``; kind ``"soft"``,
    the normalised tokens handed to :func:`~tokvis.methods.ops.apply_decision` as
    the decision's ``mix``).  Sizes are ``plan @ size`` (each token's size is shared
    out over the slots).  ``dst`` / ``keep`` as in
    :func:`~tokvis.methods._learned.soft_decision` (``dst``: the study's hard
    assignment, ``sinkhorn.py:171``).  A block whose budget keeps every token is
    skipped (identity, kind "prune").

    Named options keep tokvis's former variant:

    ``output="mean"``
        a balanced plan (tokens rescaled first, marginals ``1/n`` per token and
        ``1/K`` per slot); slot ``j``'s output token is the plan-weighted *mean* of
        the residual-stream tokens, ``plan[:, j] / sum(plan[:, j])`` (norms kept).
    ``placement="after_attn"``
        decide after the block's attention residual, before its MLP, on those tokens.

    The centres are normalised inside the forward (differentiably) instead of
    being renormalised in place (``:73-76``); the values used are the same.

    With the study's ``eps=1`` and cosine scores in ``[-1, 1]`` the kernel
    ``exp(scores / eps)`` spans at most a factor ``e**2``, so every slot mixes
    nearly all tokens; the study trained the backbone with the module.  On a
    frozen backbone (:func:`tokvis.fit`) a smaller ``eps`` fits better (measured
    with the former ``output="mean"``: on DINOv2 ViT-S/14 at keep rate 0.5 the
    fitted feature fidelity is 0.41 with ``eps=1`` and 0.49 with ``eps=0.1``,
    ``benchmarks/fit_patterns.py --save``, then ``benchmarks/bench_methods.py --fitted``).

    Parameters
    ----------
    eps : float > 0
        Entropic regularisation (study default 1.0; smaller is sharper).
    iters : int >= 1
        Sinkhorn iterations (study default 3, its ``--cluster_iters``).
    output : {"study", "mean"}
        Plan and mixed tokens (default "study").
    placement : {"before_block", "after_attn"}
        Where the block reduces (default "before_block", the study's).
    seed : int >= 0
        Seeds the centres (standard normal, then normalised).

    Study checkpoints: ``cluster_layers.{i}.v`` -> ``centres`` ``[K, C]``.
    """

    kind = "soft"
    decisions_version: ClassVar[int] = 2
    former_options: ClassVar[dict] = {"placement": "after_attn", "output": "mean"}

    def __init__(
        self, *, eps: float = 1.0, iters: int = 3, output: str = "study", placement: str = "before_block", seed: int = 0
    ) -> None:
        super().__init__(seed=seed)
        self.eps = check_float("eps", eps, low=0.0, low_open=True, error=MethodOptionError)
        self.iters = check_int("iters", iters, minimum=1, error=MethodOptionError)
        self.output = check_choice("output", output, OUTPUTS, error=MethodOptionError)
        self.stage = check_placement(placement)

    def options(self) -> dict:
        return {"eps": self.eps, "iters": self.iters, "output": self.output, "placement": self.stage, "seed": self.seed}

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
        soft, mix = module(ctx.x[:, ctx.num_prefix :], eps=self.eps, iters=self.iters, output=self.output)
        return soft_decision(ctx.layer, soft, mix=mix)
