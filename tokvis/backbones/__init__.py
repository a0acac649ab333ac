"""Backbone adapters: one per model family, behind one interface (:class:`~tokvis.backbones.base.Backbone`).

:func:`backbone_for` finds the adapter of a model; patching, recording and the image checks go
through it, so no method branches on the family.
"""

from __future__ import annotations

from torch import nn

from tokvis.backbones.base import Backbone, TokenPositions
from tokvis.backbones.hf_clip import HFCLIP
from tokvis.backbones.hf_dinov2 import HFDinov2
from tokvis.backbones.hf_siglip import HFSiglip
from tokvis.backbones.hf_vit import HFViT
from tokvis.backbones.timm_eva import TimmEva
from tokvis.backbones.timm_vit import TimmViT
from tokvis.errors import UnsupportedModelError

__all__ = ["Backbone", "TokenPositions", "backbone_for", "ADAPTERS"]

#: the adapters tried in order
ADAPTERS: tuple[Backbone, ...] = (TimmViT(), TimmEva(), HFDinov2(), HFViT(), HFCLIP(), HFSiglip())


def backbone_for(model: nn.Module) -> Backbone:
    """The adapter of ``model``'s family.

    Parameters
    ----------
    model : nn.Module
        A vision transformer of a supported family.

    Raises
    ------
    UnsupportedModelError
        No adapter accepts the model's class; the message names the class and the supported families.
    """
    for adapter in ADAPTERS:
        if adapter.accepts(model):
            return adapter
    if type(model).__name__ == "NaFlexVit":
        raise UnsupportedModelError(
            "timm NaFlexVit is not supported: it packs images of different sizes into one padded sequence with "
            "an attention mask over the padding, and token reduction changes each image's length inside the "
            "blocks, which the mask and NaFlexVit's masked pooling do not follow. Use a fixed-size ViT/Eva model"
        )
    raise UnsupportedModelError(
        f"tokvis patches timm VisionTransformer models (ViT, DeiT, DeiT-III, DINOv2, ...) and timm Eva models "
        f"(EVA-02, DINOv3, RoPE ViTs), and transformers Dinov2Model / Dinov2WithRegistersModel, ViTModel / "
        f"ViTForImageClassification, CLIPVisionModel and SiglipVisionModel; got "
        f"{type(model).__module__}.{type(model).__name__}. Hierarchical or convolutional models "
        "(ResNet, Swin, ConvNeXt, ...) have no flat token sequence to reduce"
    )
