"""DynamicViT: a learned MLP predicts which tokens to keep, before the block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.errors import MethodOptionError
from tokvis.methods._learned import LearnedMethod, init_linear
from tokvis.methods.base import ModelInfo, ReductionContext
from tokvis.methods.ops import rank_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probability of keeping each token, ``[B, n]`` from tokens ``x [B, n, C]``."""
        h = F.gelu(self.proj(self.norm(x)))
        half = h.shape[-1] // 2
        local, glob = h[..., :half], h[..., half:]
        glob = glob.mean(1, keepdim=True).expand(-1, h.shape[1], -1)
        z = torch.cat([local, glob], -1)
        z = self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(z)))))
        return z.log_softmax(-1)[..., 0]


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

    Fitting (:func:`tokvis.fit`): hard top-k selection has no gradient, so while
    fitting the decision is a straight-through soft one: the one-hot selection
    matrix of the kept tokens is scaled per token by ``1 + p - stopgrad(p)``
    (``p`` the predicted keep probability).  The forward values are exactly the
    pruned tokens; the gradient of the loss reaches ``p`` of each kept token as
    the first-order effect of scaling that token, so kept tokens whose presence
    hurts the distillation loss are pushed below dropped ones.  (The original
    DynamicViT trains with Gumbel-softmax masks inside the attention instead.)

    Parameters
    ----------
    seed : int >= 0
        Seeds the predictors' initial weights (truncated normal, std 0.02, as timm).

    Study checkpoints (:func:`~tokvis.methods._learned.load_study_checkpoint`):
    ``score_predictor.{i}.in_conv.0`` -> ``norm``, ``in_conv.1`` -> ``proj``,
    ``out_conv.0`` -> ``fc1``, ``out_conv.2`` -> ``fc2``, ``out_conv.4`` -> ``fc3``
    (the study adds ``1e-6`` to the global feature; omitted here).
    """

    kind = "prune"
    stage = "before_block"
    slots_in_shape = False
    study_prefix = "score_predictor"

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
        score = module(ctx.x[:, ctx.num_prefix :])
        k = ctx.target
        dst, keep = rank_keep(score, k)
        if self._fitting and torch.is_grad_enabled():
            p = score.exp()
            st = torch.where(keep, 1.0 + p - p.detach(), torch.zeros_like(p))
            B, n = dst.shape
            onehot = torch.zeros(B, k + 1, n, dtype=st.dtype, device=st.device)
            onehot.scatter_(1, torch.where(dst >= 0, dst, k).unsqueeze(1), 1.0)
            soft = onehot[:, :k] * st.unsqueeze(1)
            return LayerDecision(ctx.layer, "soft", dst, keep, n_out=k, soft=soft, score=score)
        return LayerDecision(ctx.layer, "prune", dst, keep, n_out=k, score=score)
