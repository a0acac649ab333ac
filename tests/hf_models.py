"""Tiny random ``transformers`` DINOv2 models with the weights of a tiny timm DINOv2 (fast, offline)."""

from __future__ import annotations

import pytest
import torch

from tests.models import _perturb
from tests.scripts import load_benchmark
from tokvis.zoo import timm_dinov2_to_hf

transformers = pytest.importorskip("transformers")


def timm_and_hf_dinov2(registers: int = 0, *, seed: int = 0, dtype=torch.float32):
    """A tiny timm DINOv2-style ViT (layer scale; ``registers`` register tokens) and the ``Dinov2Model``
    (``Dinov2WithRegistersModel``) holding the same weights, both in eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    kw = dict(reg_tokens=registers, no_embed_class=True) if registers else {}
    timm_model = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=0, init_values=0.1, **kw
    )
    timm_model = _perturb(timm_model.eval(), seed)
    common = dict(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=64, patch_size=8, layer_norm_eps=1e-6
    )
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        )
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    state = timm_dinov2_to_hf(timm_model.state_dict(), num_register_tokens=registers)
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= {"embeddings.mask_token"} and not result.unexpected_keys, result
    return timm_model.eval().to(dtype), model.eval().to(dtype)


_bench = load_benchmark("hf_dinov2_equivalence")
pooled, compare_families = _bench.pooled, _bench.compare_families
