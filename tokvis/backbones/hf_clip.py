"""Adapter of Hugging Face ``transformers``' ``CLIPVisionModel``: ``encoder.layers`` (``CLIPEncoderLayer``:
``layer_norm1``, ``self_attn`` with ``out_proj``, ``layer_norm2``, ``mlp``); one class token, pooled after
``post_layernorm``."""

from __future__ import annotations

from tokvis.backbones.hf_base import HFPreNormViT

_C = "transformers.models.clip.modeling_clip"


class HFCLIP(HFPreNormViT):
    """``transformers`` ``CLIPVisionModel``."""

    family = "hf-clip"
    model_classes = (f"{_C}:CLIPVisionModel",)
    layer_classes = (f"{_C}:CLIPEncoderLayer",)
    layers_path = "encoder.layers"
    patch_conv_path = "embeddings.patch_embedding"
    norm1_name, norm2_name, attention_name, out_proj_name = "layer_norm1", "layer_norm2", "self_attn", "out_proj"
