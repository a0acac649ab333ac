"""Tiny random timm ViTs and Eva models of every supported flavour (fast, offline)."""

from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

TINY = dict(embed_dim=64, depth=6, num_heads=4, num_classes=10)

# name -> (constructor kwargs, input size (H, W))
FLAVOURS: dict[str, tuple[dict, tuple[int, int]]] = {
    "cls": (dict(img_size=64, patch_size=8), (64, 64)),
    "distilled": (dict(img_size=64, patch_size=8, distilled=True), (64, 64)),
    "layerscale": (dict(img_size=64, patch_size=8, init_values=0.1, no_embed_class=True), (64, 64)),
    "qknorm": (dict(img_size=64, patch_size=8, qk_norm=True), (64, 64)),
    "registers": (dict(img_size=64, patch_size=8, reg_tokens=4, init_values=0.1), (64, 64)),
    "avgpool": (dict(img_size=64, patch_size=8, class_token=False, global_pool="avg"), (64, 64)),
    "scalenorm": (dict(img_size=64, patch_size=8, scale_attn_norm=True, scale_mlp_norm=True), (64, 64)),
    "patch14": (dict(img_size=112, patch_size=14), (112, 112)),
    "patch32": (dict(img_size=128, patch_size=32), (128, 128)),
    "dynamic": (dict(img_size=64, patch_size=8, dynamic_img_size=True), (48, 80)),
}


# timm Eva (rotary position embeddings), built from timm's own architecture configs, shrunk: name -> (architecture,
# overrides, input size).  DINOv3 (registers, layer scale, DINOv3 rope, half layout), EVA-02 (SwiGLU with scale-norm,
# rope 'cat' with a reference grid), the RoPE ViT with one register and no class token, the mixed (learned, per-head)
# RoPE ViT with AttentionRope, PE core (AttentionRope with separate q/k/v, attention pooling), and EVA-02 without a
# class token.
EVA_FLAVOURS: dict[str, tuple[str, dict, tuple[int, int]]] = {
    "eva_dinov3": ("vit_small_patch16_dinov3", dict(img_size=64, patch_size=8), (64, 64)),
    "eva02": ("eva02_small_patch14_224", dict(img_size=112, patch_size=14), (112, 112)),
    "eva_rope_reg_gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=64, patch_size=8), (64, 64)),
    "eva_rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64, patch_size=8), (64, 64)),
    "eva_pe": ("vit_pe_core_tiny_patch16_384", dict(img_size=64, patch_size=8), (64, 64)),
    "eva02_gap": ("eva02_small_patch14_224", dict(img_size=112, patch_size=14, class_token=False), (112, 112)),
}


def make_model(flavour: str = "cls", *, seed: int = 0, dtype=torch.float32, **overrides) -> VisionTransformer:
    if flavour in EVA_FLAVOURS:
        import timm

        arch, kw, _ = EVA_FLAVOURS[flavour]
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, **{**TINY, **kw, **overrides}).eval().to(dtype)
        return _perturb(model, seed)
    kw, _ = FLAVOURS[flavour]
    kw = {**TINY, **kw, **overrides}
    distilled = kw.pop("distilled", False)
    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return _perturb(cls(**kw).eval().to(dtype), seed)


def _perturb(model, seed: int):
    # timm initialises biases / LayerScale tiny; perturb so every submodule matters in the equivalence tests
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_images(flavour: str = "cls", n: int = 3, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    h, w = EVA_FLAVOURS[flavour][2] if flavour in EVA_FLAVOURS else FLAVOURS[flavour][1]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g).to(dtype)


def warns_if_unfitted(model):
    """``pytest.warns`` of the one warning a patched model's unfitted learned method gives on its first forward
    ("neither fitted nor loaded"), asserted where it is expected; a no-op context for every other method (DPC-KNN
    learns nothing unless ``merge="learned"``)."""
    import contextlib

    import pytest

    from tokvis.methods._learned import LearnedMethod
    from tokvis.patching import patch_state

    method = patch_state(model).method
    if isinstance(method, LearnedMethod) and getattr(method, "learned", True) and not method.is_fitted:
        return pytest.warns(UserWarning, match="has neither fitted nor loaded parameters")
    return contextlib.nullcontext()
