"""SiT: soft token assignment by a learned MLP (the study's token slimming module)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.errors import MethodOptionError
from tokvis.methods._learned import LearnedMethod, init_linear, layer_norm_in, linear_in, soft_decision
from tokvis.methods.base import ReductionContext, check_placement
from tokvis.methods.ops import decision_dtype
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_float


class SlotMLP(nn.Module):
    """Per-token logits over ``n_out`` output slots: ``scale * fc2(GELU(fc1(norm(x))))``.

    Parameters
    ----------
    dim : int
        Token width ``C``.
    hidden : int
        Hidden width.
    n_out : int
        Output slots.
    """

    def __init__(self, dim: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, n_out)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Row-normalised assignment ``[B, n_out, n]`` from tokens ``x [B, n, C]``: softmax over the tokens.

        ``norm`` runs in ``x``'s dtype, ``fc1`` in ``dtype`` (the model's compute dtype, default ``x``'s),
        ``fc2`` and the softmax in float32 (float64 for float64 tokens): the assignment's arg-max labels
        the tokens, and half-precision logits tie."""
        dt = dtype or x.dtype
        out = decision_dtype(x.dtype, dt)
        h = F.gelu(linear_in(self.fc1, layer_norm_in(self.norm, x), dt))
        logits = linear_in(self.fc2, h, out) * self.scale.to(out)  # [B, n, n_out]
        return logits.softmax(1).transpose(1, 2)


@register_method("sit")
class SiT(LearnedMethod):
    """SiT token slimming (Zong et al., "Self-slimmed Vision Transformer", ECCV 2022), as in the study.

    The study's ``models/sit.py`` reduces the *input* of each reducing block,
    before the block (``sit.py:115-119``); that is the default here
    (``placement="before_block"``).  A :class:`SlotMLP` (the study's
    ``TokenSlimmingModule``, ``sit.py:25-40``: LayerNorm, Linear, GELU, Linear, and
    a learned ``scale``) gives every patch token a logit for each of the ``target``
    output slots; a softmax over the *tokens* (``:38``) makes each slot a convex
    combination of the input tokens: ``x_out = soft @ x`` with ``soft [B, target,
    n_in]``, rows summing to 1 (``:39``; kind ``"soft"``).  The recorded ``dst`` of a
    token is the slot taking the largest share of it (the study's hard assignment,
    ``sit.py:122``), ``keep`` marks the largest contributor of each slot (see
    :func:`~tokvis.methods._learned.soft_decision`).  A block whose budget keeps
    every token is skipped (identity, kind "prune").

    ``placement="after_attn"`` keeps tokvis's former placement: after the block's
    attention residual and before its MLP, on those tokens.

    Parameters
    ----------
    hidden_ratio : float in (0, 4]
        Hidden width of the MLP as a fraction of the embedding width (study: 0.5).
    placement : {"before_block", "after_attn"}
        Where the block reduces (default "before_block", the study's).
    seed : int >= 0
        Seeds the initial weights.  ``fc1`` / ``fc2`` start at std ``1/sqrt(fan_in)``
        (not timm's 0.02) so that the initial assignment is random but not
        uniform; a uniform start makes every slot the same mean token and fits slowly.

    Study checkpoints: ``cluster_layers.{i}.weight.0`` -> ``norm``, ``weight.1`` ->
    ``fc1``, ``weight.3`` -> ``fc2``, ``scale`` (``[1, 1, 1]``) -> ``scale`` (scalar).
    """

    kind = "soft"
    decisions_version: ClassVar[int] = 2
    former_options: ClassVar[dict] = {"placement": "after_attn"}
    float32_tokens = False  # fc1 runs in the model's compute dtype, fc2 and the softmax in float32

    def __init__(self, *, hidden_ratio: float = 0.5, placement: str = "before_block", seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.hidden_ratio = check_float(
            "hidden_ratio", hidden_ratio, low=0.0, high=4.0, low_open=True, error=MethodOptionError
        )
        self.stage = check_placement(placement)

    def options(self) -> dict:
        return {"hidden_ratio": self.hidden_ratio, "placement": self.stage, "seed": self.seed}

    def make_reducer(self, dim: int, n_out: int, g: torch.Generator) -> nn.Module:
        hidden = max(1, int(dim * self.hidden_ratio))
        mod = SlotMLP(dim, hidden, n_out)
        init_linear(mod.fc1, g, std=1 / math.sqrt(dim))
        init_linear(mod.fc2, g, std=1 / math.sqrt(hidden))
        return mod

    def reducer_shape(self, entries: dict[str, torch.Tensor]) -> tuple[int, int]:
        return int(entries["norm.weight"].shape[0]), int(entries["fc2.weight"].shape[0])

    def study_key_map(self) -> dict[str, str]:
        names = {"weight.0": "norm", "weight.1": "fc1", "weight.3": "fc2"}
        out = {f"{s}.{t}": f"{o}.{t}" for s, o in names.items() for t in ("weight", "bias")}
        out["scale"] = "scale"
        return out

    def reduce(self, module: nn.Module, ctx: ReductionContext) -> LayerDecision:
        soft = module(ctx.x[:, ctx.num_prefix :], dtype=ctx.compute_dtype)
        return soft_decision(ctx.layer, soft)
