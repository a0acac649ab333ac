"""PatchMerger: K learned queries, each output token a softmax-weighted mix of the tokens."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tokvis.errors import MethodOptionError
from tokvis.methods._learned import LearnedMethod, soft_decision
from tokvis.methods.base import ReductionContext, check_placement
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice


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

    def assign(self, normed: torch.Tensor) -> torch.Tensor:
        """The assignment ``[B, n_out, n]`` of the layer-normalised tokens ``normed [B, n, C]``."""
        logits = torch.matmul(self.queries, normed.transpose(1, 2)) * self.scale  # [B, n_out, n]
        return logits.softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.assign(self.norm(x))


OUTPUTS = ("normed", "residual")


@register_method("patchmerger")
class PatchMerger(LearnedMethod):
    """PatchMerger (Renggli et al., 2022), as in the study's ``models/patchmerger.py``.

    The study reduces the *input* of each reducing block, before the block
    (``patchmerger.py:115-119``); that is the default here (``placement="before_block"``).
    ``K = target`` learned queries score the layer-normalised patch tokens
    (``patchmerger.py:36-37``); a softmax over the tokens gives ``soft [B, K, n_in]``
    (``:38``), and the output tokens are ``soft @ norm(x)``: the study mixes the
    *layer-normalised* tokens (``:39``; ``output="normed"``, the default, hands them
    to :func:`~tokvis.methods.ops.apply_decision` as the decision's ``mix``).
    ``dst`` / ``keep`` as in :func:`~tokvis.methods._learned.soft_decision` (``dst``:
    the study's hard assignment, ``patchmerger.py:122``).  A block whose budget keeps
    every token is skipped (identity, kind "prune").

    Named options keep tokvis's former variant:

    ``output="residual"``
        mix the residual-stream tokens themselves, ``soft @ x`` (same assignment).
    ``placement="after_attn"``
        decide after the block's attention residual, before its MLP, on those tokens.

    Parameters
    ----------
    scaled : bool
        Multiply the logits by ``C**-0.5`` (study default: False).
    output : {"normed", "residual"}
        The tokens the assignment mixes (default "normed", the study's).
    placement : {"before_block", "after_attn"}
        Where the block reduces (default "before_block", the study's).
    seed : int >= 0
        Seeds the queries (standard normal, as in the study).

    Study checkpoints: ``cluster_layers.{i}.norm`` -> ``norm``,
    ``cluster_layers.{i}.queries`` -> ``queries`` ``[K, C]``.
    """

    kind = "soft"
    decisions_version: ClassVar[int] = 2
    former_options: ClassVar[dict] = {"placement": "after_attn", "output": "residual"}

    #: the queries are unscaled standard normals, so the softmax over tokens starts almost one-hot
    #: (largest weight per slot 0.86 on average on DINOv2 block 3 at keep 0.5) and its gradients are
    #: small: a larger step is needed to move it (benchmarks/fit_patterns.py)
    fit_lr = 3e-2

    def __init__(
        self, *, scaled: bool = False, output: str = "normed", placement: str = "before_block", seed: int = 0
    ) -> None:
        super().__init__(seed=seed)
        if not isinstance(scaled, bool):
            raise MethodOptionError(f"scaled must be True or False: got {scaled!r}")
        self.scaled = scaled
        self.output = check_choice("output", output, OUTPUTS, error=MethodOptionError)
        self.stage = check_placement(placement)

    def options(self) -> dict:
        return {"scaled": self.scaled, "output": self.output, "placement": self.stage, "seed": self.seed}

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
        normed = module.norm(ctx.x[:, ctx.num_prefix :])
        return soft_decision(ctx.layer, module.assign(normed), mix=normed if self.output == "normed" else None)
