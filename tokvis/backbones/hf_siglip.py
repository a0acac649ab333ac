"""Adapter of Hugging Face ``transformers``' ``SiglipVisionModel``: ``encoder.layers`` (``SiglipEncoderLayer``, laid
out as CLIP's); no class token (every token is a patch), pooled by the attention-pooling head over the tokens left."""

from __future__ import annotations

from tokvis.backbones.hf_clip import HFCLIP

_S = "transformers.models.siglip.modeling_siglip"


class HFSiglip(HFCLIP):
    """``transformers`` ``SiglipVisionModel``."""

    family = "hf-siglip"
    model_classes = (f"{_S}:SiglipVisionModel",)
    layer_classes = (f"{_S}:SiglipEncoderLayer",)
    has_class_token = False
    fallback_pool = "mean"  # without the attention-pooling head (vision_use_head=False)
