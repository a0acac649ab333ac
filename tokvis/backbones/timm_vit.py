"""Adapter of timm's ``VisionTransformer`` (ViT, DeiT, DeiT-III, DINOv2, CLIP, SigLIP, ...)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tokvis.backbones.base import Backbone, check_timm_blocks, timm_model_info
from tokvis.errors import UnsupportedModelError


def timm_classes() -> tuple[type, type, type]:
    """timm's ``VisionTransformer``, ``Block`` and ``Attention`` classes.

    ``Attention`` moved from ``timm.models.vision_transformer`` to ``timm.layers.attention`` in
    timm 1.0.21; the model module still re-exports it, so it is imported from there first.
    """
    from timm.models import vision_transformer as vt

    attention = getattr(vt, "Attention", None)
    if attention is None:  # pragma: no cover - a timm without the re-export
        from timm.layers.attention import Attention as attention
    return vt.VisionTransformer, vt.Block, attention


def attn_dim(attn: nn.Module) -> int:
    """Width of the attention heads concatenated (``num_heads * head_dim``) of a timm ``Attention``.

    ``attn.attn_dim`` exists from timm 1.0.23; older versions have ``qkv`` of width ``3 * attn_dim``.
    """
    dim = getattr(attn, "attn_dim", None)
    return int(dim) if dim is not None else int(attn.qkv.out_features) // 3


class TimmViT(Backbone):
    """timm ``VisionTransformer`` with its standard pre-norm ``Block`` and ``Attention``.

    The block's own layers run in timm's order: ``norm1``, ``attn.qkv``, ``attn.q_norm`` /
    ``k_norm``, ``attn.norm`` (scale-norm), ``attn.gate``, ``attn.proj``, ``ls1``, ``drop_path1``,
    ``norm2``, ``mlp``, ``ls2``, ``drop_path2``.  Positions are absolute (added before block 0),
    so there are none to follow.
    """

    family = "timm-vit"

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, timm_classes()[0])

    def describe(self, model: nn.Module):
        _, Block, Attention = timm_classes()
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise UnsupportedModelError("the model has no nn.Sequential of blocks (model.blocks)")
        check_timm_blocks(
            blocks, Block, (Attention,),
            "tokvis supports timm's standard pre-norm Block only (not ResPostBlock, ParallelScalingBlock, ...)",
            "tokvis supports timm's standard Attention (qk-norm, scale-norm and gating included), not rotary / "
            "differential / other variants",
        )  # fmt: skip
        return timm_model_info(model)

    def project(self, block, h, positions, rope=None):
        attn = block.attn
        B, T, _ = h.shape
        gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v, gate

    def project_parts(self, block, h, positions, rope, parts):
        """Only the rows of ``attn.qkv`` that give ``parts`` (the whole projection, sliced, when ``qkv`` is not
        a plain ``nn.Linear``); q and k after their norms."""
        attn = block.attn
        first, last = (0, 2) if parts == "qk" else (2, 3)
        B, T, _ = h.shape
        C = attn_dim(attn)
        lin = attn.qkv
        if type(lin) is nn.Linear:
            bias = None if lin.bias is None else lin.bias[first * C : last * C]
            out = F.linear(h, lin.weight[first * C : last * C], bias)
        else:
            out = lin(h)[..., first * C : last * C]
        out = out.reshape(B, T, last - first, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return (attn.q_norm(out[0]), attn.k_norm(out[1])) if parts == "qk" else out[0]
