"""Adapter of Hugging Face ``transformers``' DINOv2: ``Dinov2Model`` and ``Dinov2WithRegistersModel``.

The blocks are ``model.encoder.layer`` (``Dinov2Layer``): ``norm1``, ``attention`` (separate ``q_proj`` /
``k_proj`` / ``v_proj`` and ``o_proj``), ``layer_scale1``, ``drop_path``, ``norm2``, ``mlp`` (plain or SwiGLU),
``layer_scale2``.  The prefix is the class token and the registers; the position embedding is absolute (added
before block 0, interpolated by the model for other image sizes), so there are no positions to follow.

The patched layer computes the attention itself (tokvis' fused attention with its extension points), so the
model's attention implementation (``config._attn_implementation``) is not used, and what ``transformers``
collects through the attention modules (``output_attentions``) would be missing: such calls are refused
(:meth:`HFDinov2.check_call`), as are attention masks (token reduction changes the sequence length).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.backbones.base import Backbone
from tokvis.errors import TokvisError, UnsupportedModelError


def hf_dinov2_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The ``transformers`` DINOv2 model classes and their layer classes (empty when transformers is missing)."""
    try:
        from transformers.models.dinov2 import modeling_dinov2 as d
        from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as r
    except ImportError:
        return (), ()
    return (d.Dinov2Model, r.Dinov2WithRegistersModel), (d.Dinov2Layer, r.Dinov2WithRegistersLayer)


class _Dropout:
    """The attention-probability dropout of an HF attention module (``attention_dropout``, a float)."""

    def __init__(self, p: float, training: bool) -> None:
        self.p, self.training = float(p), training

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return F.dropout(t, self.p, self.training) if self.p else t


class HFAttentionView:
    """What the patched attention reads from an attention module (``scale``, ``fused_attn``, ``attn_drop``,
    ``training``), for an HF attention module (``scaling``, ``attention_dropout``).

    Parameters
    ----------
    module : nn.Module
        An HF self-attention module with ``scaling`` and ``attention_dropout``.
    """

    fused_attn = True

    def __init__(self, module: nn.Module) -> None:
        self.scale = float(module.scaling)
        self.training = module.training
        self.attn_drop = _Dropout(module.attention_dropout, module.training)


def check_hf_call(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise :class:`~tokvis.errors.TokvisError` for an HF call a patched model cannot honour.

    Parameters
    ----------
    model : nn.Module
        A patched ``transformers`` model.
    args, kwargs : tuple, dict
        The call's arguments.
    """
    if kwargs.get("attention_mask") is not None:
        raise TokvisError(
            "token reduction changes the sequence length, so an attention mask cannot be used with a patched "
            "model; call it without attention_mask (or tokvis.unpatch(model) first)"
        )
    wants = kwargs.get("output_attentions")
    if wants is None:
        wants = getattr(getattr(model, "config", None), "output_attentions", False)
    if wants:
        raise TokvisError(
            "a patched model computes its attention in tokvis, so output_attentions=True would return no "
            "attention maps; call it with output_attentions=False (and config.output_attentions=False) and use "
            "tokvis.attention_maps(model, images) for the maps"
        )


class HFDinov2(Backbone):
    """``transformers`` ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (class token, optional registers)."""

    family = "hf-dinov2"
    #: the keyword of the images in the model's forward
    input_name = "pixel_values"

    def accepts(self, model: nn.Module) -> bool:
        models, _ = hf_dinov2_classes()
        return bool(models) and isinstance(model, models)

    def describe(self, model: nn.Module):
        from tokvis.model import ModelInfo

        _, layers = hf_dinov2_classes()
        blocks = self.blocks(model)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError("the model has no encoder layers (model.encoder.layer)")
        for i, blk in enumerate(blocks):
            base = getattr(type(blk), "_tokvis_original_class", type(blk))
            if base not in layers:
                raise UnsupportedModelError(
                    f"layer {i} is a {base.__module__}.{base.__name__}; tokvis supports transformers' Dinov2Layer"
                )
            if not all(hasattr(blk.attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
                raise UnsupportedModelError(
                    f"layer {i}'s attention has no q_proj / k_proj / v_proj / o_proj: this transformers version "
                    "lays DINOv2 out differently from the one tokvis supports (transformers>=5)"
                )
        cfg = model.config
        pe = model.embeddings.patch_embeddings
        grid = tuple(int(s) // int(p) for s, p in zip(pe.image_size, pe.patch_size, strict=True))
        return ModelInfo(
            depth=len(blocks),
            num_prefix_tokens=1 + int(getattr(cfg, "num_register_tokens", 0) or 0),
            has_class_token=True,
            embed_dim=int(cfg.hidden_size),
            num_heads=int(cfg.num_attention_heads),
            grid_size=grid,  # type: ignore[arg-type]
            dynamic_img_size=True,  # the model interpolates its position embedding to any image size
        )

    def blocks(self, model: nn.Module) -> nn.Module:
        return model.encoder.layer

    def attention(self, block: nn.Module) -> Any:
        return HFAttentionView(block.attention)

    def project(self, block, h, positions, rope=None):
        attn = block.attention
        B, T, _ = h.shape
        shape = (B, T, -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        return q, k, v, None

    def attention_output(self, block, heads, gate):
        B, H, T, d = heads.shape
        return block.attention.o_proj(heads.transpose(1, 2).reshape(B, T, H * d))

    def attention_residual(self, block, y):
        return block.drop_path(block.layer_scale1(y))

    def mlp_residual(self, block, x):
        return block.drop_path(block.layer_scale2(block.mlp(block.norm2(x))))

    # -- inputs -----------------------------------------------------------------------------------
    def patch_embed(self, model: nn.Module) -> Any:
        pe = model.embeddings.patch_embeddings
        return SimpleNamespace(
            proj=pe.projection, patch_size=tuple(pe.patch_size), img_size=tuple(pe.image_size), dynamic_img_pad=False
        )

    def dynamic_img_size(self, model: nn.Module) -> bool:
        return True

    def grid_for_input(self, model, hw):
        ph, pw = self.patch_embed(model).patch_size
        return int(hw[0]) // ph, int(hw[1]) // pw

    def check_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        check_hf_call(model, args, kwargs)
