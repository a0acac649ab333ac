"""Adapter of Hugging Face ``transformers``' ``ViTModel`` and ``ViTForImageClassification``.

The layers are ``layers`` of the ``ViTModel`` (``ViTLayer``): ``layernorm_before``, ``attention`` (``q_proj`` /
``k_proj`` / ``v_proj``, ``o_proj``), ``dropout``, ``layernorm_after``, ``mlp``.  One class token; the input size is
the config's (``interpolate_pos_encoding`` is not followed by the image checks).
"""

from __future__ import annotations

from tokvis.backbones.hf_base import HFPreNormViT

_V = "transformers.models.vit.modeling_vit"


class HFViT(HFPreNormViT):
    """``transformers`` ``ViTModel`` / ``ViTForImageClassification``."""

    family = "hf-vit"
    model_classes = (f"{_V}:ViTModel", f"{_V}:ViTForImageClassification")
    layer_classes = (f"{_V}:ViTLayer",)
    layers_path = "layers"
    norm1_name, norm2_name, drop_name = "layernorm_before", "layernorm_after", "dropout"
    classifier_name = "classifier"
