"""Adapter of Hugging Face ``transformers``' DINOv2: ``Dinov2Model`` and ``Dinov2WithRegistersModel``.

The layers are ``encoder.layer`` (``Dinov2Layer``): ``norm1``, ``attention`` (``q_proj`` / ``k_proj`` / ``v_proj``,
``o_proj``), ``layer_scale1``, ``drop_path``, ``norm2``, ``mlp`` (plain or SwiGLU), ``layer_scale2``.  The prefix is
the class token and the registers; the model interpolates its position embedding to any image size.
"""

from __future__ import annotations

from tokvis.backbones.hf_base import HFPreNormViT

_D = "transformers.models.dinov2.modeling_dinov2"
_R = "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers"


class HFDinov2(HFPreNormViT):
    """``transformers`` ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (class token, optional registers)."""

    family = "hf-dinov2"
    model_classes = (f"{_D}:Dinov2Model", f"{_R}:Dinov2WithRegistersModel")
    layer_classes = (f"{_D}:Dinov2Layer", f"{_R}:Dinov2WithRegistersLayer")
    layers_path = "encoder.layer"
    ls1_name, ls2_name, drop_name = "layer_scale1", "layer_scale2", "drop_path"
    dynamic = True
