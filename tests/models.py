"""Tiny random timm ViTs of every supported flavour (fast, offline)."""

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
    "patch14": (dict(img_size=56, patch_size=14), (56, 56)),
    "patch32": (dict(img_size=128, patch_size=32), (128, 128)),
    "dynamic": (dict(img_size=64, patch_size=8, dynamic_img_size=True), (48, 80)),
}


def make_model(flavour: str = "cls", *, seed: int = 0, dtype=torch.float32, **overrides) -> VisionTransformer:
    kw, _ = FLAVOURS[flavour]
    kw = {**TINY, **kw, **overrides}
    distilled = kw.pop("distilled", False)
    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(**kw).eval().to(dtype)
    # timm initialises biases / LayerScale tiny; perturb so every submodule matters in the equivalence tests
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_images(flavour: str = "cls", n: int = 3, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    _, (h, w) = FLAVOURS[flavour]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g).to(dtype)
