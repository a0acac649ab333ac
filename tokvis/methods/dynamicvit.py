"""DynamicViT: a learned MLP predicts which tokens to keep, before the block."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.errors import MethodOptionError
from tokvis.methods._learned import LearnedMethod, init_linear, layer_norm_in
from tokvis.methods._learned import linear_in as _linear
from tokvis.methods.base import ModelInfo, ReductionContext
from tokvis.methods.ops import decision_dtype, rank_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_float


class ScorePredictor(nn.Module):
    """DynamicViT's local-global score predictor for one reduction location.

    ``h = GELU(proj(norm(x)))``; the first half of ``h``'s channels stays per token
    (local), the second half is averaged over the tokens (global) and broadcast;
    three linear layers with GELU map the concatenation to two logits (keep,
    drop), turned into log-probabilities.

    Parameters
    ----------
    dim : int
        Token width ``C`` (at least 4).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, dim // 2)
        self.fc2 = nn.Linear(dim // 2, dim // 4)
        self.fc3 = nn.Linear(dim // 4, 2)

    def logits(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The two logits (keep, drop) ``[B, n, 2]`` of tokens ``x [B, n, C]``.

        ``weight [B, n]`` (optional) weights the global mean (DynamicViT's
        policy-weighted mean over the tokens still kept); ``None`` = plain mean.

        Precision: ``norm`` runs in ``x``'s dtype, the feature layers (``proj`` to
        ``fc2``) in ``dtype`` (the model's compute dtype, default ``x``'s: fp16 / bf16
        matmuls for half models and under autocast, whatever the parameters' dtype),
        the last layer and the logits in float32 (float64 for float64 tokens): the
        logits are ranked, and half-precision logits tie.
        """
        dt = dtype or x.dtype
        out = decision_dtype(x.dtype, dt)
        h = F.gelu(_linear(self.proj, layer_norm_in(self.norm, x), dt))
        half = h.shape[-1] // 2
        local, glob = h[..., :half], h[..., half:]
        if weight is None:
            glob = glob.mean(1, keepdim=True)
        else:
            w = weight.to(glob.dtype).unsqueeze(-1)
            glob = (glob * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-6)
        z = torch.cat([local, glob.expand(-1, h.shape[1], -1)], -1)
        z = F.gelu(_linear(self.fc2, F.gelu(_linear(self.fc1, z, dt)), dt))
        return _linear(self.fc3, z, out)

    def forward(self, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Log-probability of keeping each token, ``[B, n]`` from tokens ``x [B, n, C]`` (float32 for
        fp16 / bf16 tokens; ``dtype``: the feature layers' dtype, see :meth:`logits`)."""
        return self.logits(x, dtype=dtype).log_softmax(-1)[..., 0]


@register_method("dynamicvit")
class DynamicViT(LearnedMethod):
    """DynamicViT (Rao et al., NeurIPS 2021) as evaluated in the "Which Tokens" study.

    At each reducing block, *before* the block (stage ``"before_block"``), a
    :class:`ScorePredictor` of that block scores the patch tokens; the ``target``
    tokens with the highest keep log-probability are kept in their original
    order, the others dropped (kind ``"prune"``), and the block runs on the kept
    tokens.  The predictor sees the current tokens only, so its global feature
    is the mean over the tokens still present (DynamicViT's policy-weighted mean
    at inference).

    Fitting (:func:`tokvis.fit`) follows DynamicViT's training scheme: hard
    top-k has no gradient, so while fitting (``_fitting`` with gradients on)
    every token is kept (identity decision) and the predictor gives a relaxed
    keep mask ``m = sigmoid((log p - log(1 - p) + L) / tau)`` (Gumbel-sigmoid,
    ``L`` logistic noise), applied as ``size_scale``: the sizes of the tokens
    are multiplied by ``m`` and, with proportional attention switched on while
    fitting only, every later attention adds ``log(size)`` to its logits, so
    masked tokens stop being attended.  Masks compound over the reducing blocks
    because sizes persist and multiply.  The keep-ratio loss
    ``sum_s mean_b (mean_i M_s[b, i] - target_s / n_patches)^2`` (``M_s`` the
    cumulative mask after block ``s``), times ``ratio_weight``, is returned by
    :meth:`auxiliary_loss` and added to the distillation loss.  At inference
    nothing changes: hard top-k of the keep log-probability.

    Parameters
    ----------
    seed : int >= 0
        Seeds the predictors' initial weights (truncated normal, std 0.02, as
        timm) and the Gumbel noise while fitting.
    ratio_weight : float >= 0
        Weight of the keep-ratio loss while fitting (DynamicViT: 2.0).
    tau : float > 0
        Temperature of the Gumbel-sigmoid keep mask while fitting.

    Study checkpoints (:func:`~tokvis.methods._learned.load_study_checkpoint`):
    ``score_predictor.{i}.in_conv.0`` -> ``norm``, ``in_conv.1`` -> ``proj``,
    ``out_conv.0`` -> ``fc1``, ``out_conv.2`` -> ``fc2``, ``out_conv.4`` -> ``fc3``
    (the study adds ``1e-6`` to the global feature; omitted here).
    """

    kind = "prune"
    stage = "before_block"
    slots_in_shape = False
    float32_tokens = False  # its score predictor runs in the model's compute dtype, its logits in float32
    study_prefix = "score_predictor"

    def __init__(self, *, seed: int = 0, ratio_weight: float = 2.0, tau: float = 1.0) -> None:
        super().__init__(seed=seed)
        self.ratio_weight = check_float("ratio_weight", ratio_weight, low=0.0, error=MethodOptionError)
        self.tau = check_float("tau", tau, low=0.0, low_open=True, error=MethodOptionError)
        self._ratio_terms: dict[int, torch.Tensor] = {}
        self._noise: torch.Generator | None = None

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "ratio_weight": self.ratio_weight, "tau": self.tau}

    @property
    def proportional_attention(self) -> bool:  # type: ignore[override]
        """Sizes act on the attention (``log(size)`` logits) only while fitting with the soft masks."""
        return self._soft_fitting()

    def _soft_fitting(self) -> bool:
        return self._fitting and torch.is_grad_enabled()

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``ratio_weight`` times the keep-ratio loss of the latest fitting forward (cleared when read)."""
        if not self._ratio_terms:
            return None
        total = torch.stack(list(self._ratio_terms.values())).sum()
        self._ratio_terms.clear()
        return self.ratio_weight * total

    def check_model(self, info: ModelInfo) -> None:
        super().check_model(info)
        if info.embed_dim < 4:
            raise MethodOptionError(f"dynamicvit needs an embedding width of at least 4: got {info.embed_dim}")

    def make_reducer(self, dim: int, n_out: int, g: torch.Generator) -> nn.Module:
        mod = ScorePredictor(dim)
        for lin in (mod.proj, mod.fc1, mod.fc2, mod.fc3):
            init_linear(lin, g)
        return mod

    def reducer_shape(self, entries: dict[str, torch.Tensor]) -> tuple[int, int]:
        return int(entries["norm.weight"].shape[0]), 0

    def study_key_map(self) -> dict[str, str]:
        names = {
            "in_conv.0": "norm",
            "in_conv.1": "proj",
            "out_conv.0": "fc1",
            "out_conv.2": "fc2",
            "out_conv.4": "fc3",
        }
        return {f"{s}.{t}": f"{o}.{t}" for s, o in names.items() for t in ("weight", "bias")}

    def reduce(self, module: nn.Module, ctx: ReductionContext) -> LayerDecision:
        if self._soft_fitting():
            return self._soft_decision(module, ctx)
        score = module(ctx.x[:, ctx.num_prefix :], dtype=ctx.compute_dtype)
        dst, keep = rank_keep(score, ctx.target)
        return LayerDecision(ctx.layer, "prune", dst, keep, n_out=ctx.target, score=score)

    def _soft_decision(self, module: nn.Module, ctx: ReductionContext) -> LayerDecision:
        """Keep every token; the relaxed keep mask scales the sizes (see the class docstring)."""
        p = ctx.num_prefix
        prev = ctx.size[:, p:]  # the cumulative mask so far: sizes start at 1 and nothing is dropped
        z = module.logits(ctx.x[:, p:], weight=prev, dtype=ctx.compute_dtype)
        logit = z[..., 0] - z[..., 1]  # log p - log(1 - p)
        dev = logit.device
        if self._noise is None or self._noise.device != dev:
            self._noise = torch.Generator(device=dev).manual_seed(self.seed)
        u = torch.rand(logit.shape, generator=self._noise, device=dev, dtype=logit.dtype).clamp(1e-6, 1 - 1e-6)
        mask = torch.sigmoid((logit + u.log() - (-u).log1p()) / self.tau).clamp_min(1e-6)
        ratio = ctx.target / ctx.n_patches
        self._ratio_terms[ctx.layer] = (((prev * mask).mean(1) - ratio) ** 2).mean()
        B, n = logit.shape
        dst = torch.arange(n, device=dev).expand(B, n).clone()
        keep = torch.ones(B, n, dtype=torch.bool, device=dev)
        score = z.log_softmax(-1)[..., 0]
        return LayerDecision(ctx.layer, "prune", dst, keep, n_out=n, score=score, size_scale=mask)
