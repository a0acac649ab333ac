"""PatchMerger: K learned queries, each output token a softmax-weighted mix of the tokens."""

from __future__ import annotations

import torch
from torch import nn

from tokvis.methods._learned import LearnedMethod, soft_decision
from tokvis.methods.base import ReductionContext
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision


class QueryMerger(nn.Module):
    """``softmax_over_tokens(queries @ norm(x)^T * scale)``: ``[B, n_out, n]`` from ``x [B, n, C]``.

    Parameters
    ----------
    dim : int
        Token width ``C``.
    n_out : int
        Number of learned queries (output tokens).
    scale : float
        Logit scale (1, or ``C**-0.5`` for scaled logits).
    """

    def __init__(self, dim: int, n_out: int, scale: float = 1.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.zeros(n_out, dim))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.matmul(self.queries, self.norm(x).transpose(1, 2)) * self.scale  # [B, n_out, n]
        return logits.softmax(-1)


@register_method("patchmerger")
class PatchMerger(LearnedMethod):
    """PatchMerger (Renggli et al., 2022) as evaluated in the study.

    At each reducing block (after the attention, before the MLP), ``K = target``
    learned queries score the layer-normalised patch tokens; a softmax over the
    tokens gives ``soft [B, K, n_in]`` and the output tokens are ``soft @ x``
    (kind ``"soft"``).  Unlike the study's module, which outputs a mix of the
    *normalised* tokens, tokvis mixes the residual-stream tokens (the one
    :func:`~tokvis.methods.ops.apply_decision` path); the assignment is the same.
    ``dst`` / ``keep`` as in :func:`~tokvis.methods._learned.soft_decision`.  A
    block whose budget keeps every token is skipped (identity, kind "prune").

    Parameters
    ----------
    scaled : bool
        Multiply the logits by ``C**-0.5`` (study default: False).
    seed : int >= 0
        Seeds the queries (standard normal, as in the study).

    Study checkpoints: ``cluster_layers.{i}.norm`` -> ``norm``,
    ``cluster_layers.{i}.queries`` -> ``queries`` ``[K, C]``.
    """

    kind = "soft"

    #: the queries are unscaled standard normals, so the softmax over tokens starts almost one-hot
    #: (largest weight per slot 0.86 on average on DINOv2 block 3 at keep 0.5) and its gradients are
    #: small: a larger step is needed to move it (benchmarks/fit_patterns.py)
    fit_lr = 3e-2

    def __init__(self, *, scaled: bool = False, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if not isinstance(scaled, bool):
            from tokvis.errors import MethodOptionError

            raise MethodOptionError(f"scaled must be True or False: got {scaled!r}")
        self.scaled = scaled

    def options(self) -> dict:
        return {"scaled": self.scaled, "seed": self.seed}

    def make_reducer(self, dim: int, n_out: int, g: torch.Generator) -> nn.Module:
        mod = QueryMerger(dim, n_out, dim**-0.5 if self.scaled else 1.0)
        with torch.no_grad():
            mod.queries.copy_(torch.randn(n_out, dim, generator=g))
        return mod

    def reducer_shape(self, entries: dict[str, torch.Tensor]) -> tuple[int, int]:
        q = entries["queries"]
        return int(q.shape[1]), int(q.shape[0])

    def study_key_map(self) -> dict[str, str]:
        return {"norm.weight": "norm.weight", "norm.bias": "norm.bias", "queries": "queries"}

    def reduce(self, module: nn.Module, ctx: ReductionContext) -> LayerDecision:
        return soft_decision(ctx.layer, module(ctx.x[:, ctx.num_prefix :]))
