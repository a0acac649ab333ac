"""ATS: Adaptive Token Sampling (Fayyaz et al., ECCV 2022)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from tokvis.errors import MethodOptionError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import slots_from_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice

SAMPLING = ("study", "sorted")
#: what the study adds to the sum of the scores before normalising them (``ats.py:45,67``)
STUDY_EPS = 1e-6
#: what the study adds to the cumulative score of a padding slot, keeping it away from every level (``ats.py:70``)
STUDY_PAD_OFFSET = 0.1


def ats_scores(cls_attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """ATS significance scores of the patch tokens.

    Parameters
    ----------
    cls_attn : Tensor [B, H, n]
        Attention probabilities of the class token to each patch token, per head.
    values : Tensor [B, H, n, d]
        Attention values of the patch tokens.

    Returns
    -------
    Tensor [B, n]
        ``S_j = sum_h A_h[cls, j] * ||v_hj|| / sum_i sum_h A_h[cls, i] * ||v_hi||`` (sums to 1
        per image; tokens whose attention is 0, e.g. masked padding, score 0).
    """
    return _normalised(significance(cls_attn, values))


def significance(cls_attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_h A_h[cls, j] * ||v_hj||`` ``[B, n]``: :func:`ats_scores` before normalising (``ats.py:58-63``).

    Parameters
    ----------
    cls_attn : Tensor [B, H, n]
    values : Tensor [B, H, n, d]
    """
    return (cls_attn * values.norm(dim=-1)).sum(1)


def _normalised(s: torch.Tensor) -> torch.Tensor:
    return s / s.sum(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def inverse_transform_sample(score: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic inverse-transform sampling of ``k`` tokens from the scores.

    Tokens are sorted by increasing score (stable: ties keep their order); the
    cumulative distribution ``F`` of the sorted scores is normalised to end at 1;
    the ``k`` evenly spaced levels ``y_m = (m + 1/2) / k``, ``m = 0 .. k-1``, are
    mapped through the inverse CDF ``F^{-1}(y) = min{j : F_j >= y}``.  A token
    with zero score is never chosen (its CDF step is empty).

    Parameters
    ----------
    score : Tensor [B, n]
        Non-negative scores, at least one positive per row.
    k : int, >= 1

    Returns
    -------
    BoolTensor [B, n]
        Tokens hit by at least one level; at most ``k`` per row (duplicates removed).
    """
    B, n = score.shape
    sorted_s, idx = torch.sort(score, dim=1, stable=True)
    cdf = sorted_s.cumsum(1)
    cdf = cdf / cdf[:, -1:].clamp_min(torch.finfo(cdf.dtype).tiny)
    levels = (torch.arange(k, device=score.device, dtype=cdf.dtype) + 0.5) / k
    pos = torch.searchsorted(cdf.contiguous(), levels.expand(B, k).contiguous(), right=False)
    pos = pos.clamp(max=n - 1)  # round-off: F_{n-1} may be a hair below a level
    picked = idx.gather(1, pos)
    keep = torch.zeros(B, n, dtype=torch.bool, device=score.device)
    keep.scatter_(1, picked, True)
    return keep


def study_levels(k: int, device=None) -> torch.Tensor:
    """The study's sampling levels for a budget of ``k`` tokens (``ats.py:48``, ``K = k + 1`` at ``:205``).

    ``torch.arange(1/(2K), (2K-1)/(2K), 1/K)``: the levels ``(2m+1)/(2K)``, float32, whose count is
    ``ceil(((2K-1)/(2K) - 1/(2K)) * K)`` evaluated in floating point: ``K - 1 = k`` mathematically, but
    ``K`` for some ``K`` (e.g. 3, 7, 12, 99), where round-off lets the end level in.  The study's number of
    samples, hence its largest kept count, is this count.  Made on ``device`` directly (no copy from the host
    inside a forward), in float32 as the study's (whose values a float64 ``arange`` would round differently).

    Parameters
    ----------
    k : int, >= 1
        The budget ``int(N rho**s)``.
    device : torch.device or str, optional
    """
    K = k + 1
    return torch.arange(1 / (2 * K), (2 * K - 1) / (2 * K), 2 / (2 * K), dtype=torch.float32, device=device)


def study_level_count(k: int) -> int:
    """How many levels :func:`study_levels` makes for a budget of ``k``: ``torch.arange``'s length rule,
    ``ceil((end - start) / step)`` in double precision (no tensor: known on the host).

    Parameters
    ----------
    k : int, >= 1
        The budget ``int(N rho**s)``.
    """
    K = k + 1
    return max(math.ceil(((2 * K - 1) / (2 * K) - 1 / (2 * K)) / (2 / (2 * K))), 0)


def study_sample(score: torch.Tensor, real: torch.Tensor, k: int) -> torch.Tensor:
    """The study's ATS sampling: nearest cumulative score to each level, in sequence order.

    As ``AdaptiveTokenSampling.forward`` in the study's ``models/ats.py``: the raw scores are normalised
    by their sum plus ``1e-6`` (``:67``) and accumulated in *sequence order*, unsorted (``:69``); a padding
    slot's cumulative score gets ``+0.1`` (``:70``); each level of :func:`study_levels` takes the token whose
    cumulative score is nearest (``torch.cdist``, first index on ties, ``:73-74``); duplicates collapse
    (``torch.unique``, ``:77``).

    Parameters
    ----------
    score : Tensor [B, n]
        Unnormalised significance scores (class attention times value norm, summed over heads).
    real : BoolTensor [B, n]
        False for padding slots of an earlier stage.
    k : int, >= 1
        The budget ``int(N rho**s)``.

    Returns
    -------
    BoolTensor [B, n]
        Tokens nearest to at least one level.
    """
    B, n = score.shape
    normed = score / (score.sum(-1, keepdim=True) + STUDY_EPS)
    cdf = normed.cumsum(1) + STUDY_PAD_OFFSET * (~real).to(score.dtype)
    levels = study_levels(k, score.device).to(cdf.dtype)
    dist = torch.cdist(levels[None, :, None], cdf[:, :, None])  # [B, L, n], as the study computes it
    picked = dist.argmin(-1)
    keep = torch.zeros(B, n, dtype=torch.bool, device=score.device)
    return keep.scatter_(1, picked, True)


@register_method("ats")
class ATS(Method):
    """Adaptive Token Sampling, parameter-free, as at inference in the paper.

    At each reducing block, inside the attention: the significance score of each
    patch token is the class token's attention to it times the norm of its
    value, summed over heads (:func:`ats_scores` normalises it).  Evenly spaced
    levels are pushed through the cumulative scores, and the distinct tokens hit
    are kept, in their original order, so each image keeps *at most* as many
    tokens as there are levels, fewer when high-scoring tokens are hit by several
    levels.  The kept tokens' attention output is the one of the full attention
    (their queries attend to every key and value), as in ATS.  A budget of every
    token (``keep_rate=1``) keeps every token without sampling, so the model is
    unchanged (the study's code would still sample there; the study never ran it).

    What the study does (``models/ats.py`` of JoakimHaurum/TokenReduction), the
    default ``sampling="study"`` (:func:`study_sample`): ``K = int(196 rho**s) + 1``
    (``ats.py:205``) gives the levels ``(2m+1)/(2K)`` of ``torch.arange``
    (``:48``; :func:`study_levels`: ``int(N rho**s)`` of them, or one more where
    the float ``arange`` lets its end in); the scores, normalised by their sum
    plus ``1e-6`` (``:67``), are accumulated in sequence order, unsorted
    (``:69``); each level takes the token whose cumulative score is *nearest* to
    it (``:73-74``), duplicates collapse (``:77``), the kept tokens stay in
    sequence order and the batch is padded with masked slots (``:78-81``).
    Padding slots of an earlier stage get ``+0.1`` on their cumulative score
    (``:70``), so no level picks them.  Every image is sampled, even one whose
    tokens already fit the budget.

    ``sampling="sorted"`` (tokvis's rule before issue 17): the scores are sorted
    ascending first, and each of ``target`` levels ``(m + 1/2)/target`` takes the
    first token whose cumulative score reaches it
    (:func:`inverse_transform_sample`, the inverse CDF of the paper); an image
    whose real tokens already fit the budget (it kept fewer at an earlier stage)
    keeps them all, exactly as it would if run alone.

    Fixed output size, variable token counts: the decision's ``n_out`` is the
    budget itself, ``min(levels, n_in)`` (a Python int known before the forward,
    so deciding makes no host sync and the shapes are static); an image that
    keeps fewer tokens gets empty output slots at the end (``dst`` points no
    token to them).  ``apply_decision`` makes those slots zero tokens with size
    0, and ATS turns on proportional attention, so every later block adds
    ``log(size)`` to the attention logits: ``log(0) = -inf`` masks the padding
    slots as keys, and real tokens (size 1, ``log 1 = 0``) are untouched.
    Padding slots never influence the real tokens, and are never sampled at a
    later stage (their class attention, hence score, is 0); an image's kept
    sets and outputs are those of the image run alone (up to float rounding),
    whatever the padding.  They stay in the output sequence (ignored by the class-token
    head); a trace's ``labels``/``token_counts`` see only the real tokens.

    Only the ``keep_rate`` schedule is supported: under ``r`` (a number of tokens
    removed from the tokens entering a block) the budget of an image would depend
    on the padding its batch added, i.e. on the other images.

    Needs a class token (``UnsupportedModelError`` on average-pooling models).
    Decides at stage ``"in_attention"``, where the values are available, from
    the per-head class-token attention row (``needs={"cls_attn_heads"}``: one
    query row, float32 for fp16 / bf16 models); the block's attention stays
    fused (no ``[B, H, T, T]`` map).

    Parameters
    ----------
    sampling : {"study", "sorted"}
        The sampling rule (see above; default ``"study"``).
    """

    kind = "prune"
    conventions = ("keep_rate",)
    stage = "in_attention"
    needs = frozenset({"cls_attn_heads"})
    requires_class_token = True
    class_token_use = "scores tokens by the class token's attention times their value norm"
    proportional_attention = True  # masks the size-0 padding slots (see above); sizes of real tokens are 1
    #: 2: the study's sampling rule became the default (issue 17)
    decisions_version: ClassVar[int] = 2

    def __init__(self, *, sampling: str = "study") -> None:
        super().__init__()
        self.sampling = check_choice("sampling", sampling, SAMPLING, error=MethodOptionError)

    def options(self) -> dict:
        return {"sampling": self.sampling}

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        p = ctx.num_prefix
        heads, values = ctx.cls_attn_heads, ctx.values
        assert heads is not None and values is not None
        n = ctx.n_in
        raw = significance(heads, values[:, :, p:].to(heads.dtype))
        score = _normalised(raw)  # ats_scores
        real = ctx.patch_size > 0  # padding slots of an earlier ATS stage have size 0
        k = max(ctx.target, 1)
        if k >= n:  # every image's real tokens fit the budget: all kept (keep_rate=1 leaves the model unchanged)
            keep, n_out = real, n
        elif self.sampling == "study":
            keep, n_out = study_sample(raw, real, k), min(study_level_count(k), n)
        else:  # an image whose real tokens fit keeps them all (as it would alone), the others are sampled
            fits = real.sum(1, keepdim=True) <= k
            keep, n_out = torch.where(fits, real, inverse_transform_sample(score, k)), k
        # a fixed size, not the batch's largest count: no host sync; images with fewer tokens are padded
        return LayerDecision(ctx.layer, "prune", slots_from_keep(keep), keep, n_out=n_out, score=score)
