"""tokvis.model: introspection shared by patching and recording, and the timm-version shims."""

from __future__ import annotations

import torch

import tokvis
import tokvis.model as M
import tokvis.patching as P
from tests.models import make_images, make_model


def test_old_names_stay_importable_from_patching():
    for name in ("model_info", "grid_for_input", "check_images", "backbone_name", "is_patched", "patch_state"):
        assert getattr(P, name) is getattr(M, name), name
    from tokvis.methods import ModelInfo

    assert ModelInfo is M.ModelInfo


def test_timm_classes_are_the_ones_models_use():
    vit, block, attention = M.timm_classes()
    model = make_model()
    assert isinstance(model, vit) and type(model.blocks[0]) is block and type(model.blocks[0].attn) is attention


def test_attention_width_without_attn_dim_attribute():
    # timm < 1.0.23 has no Attention.attn_dim: the width comes from qkv (3 * heads * head_dim)
    model, x = make_model("qknorm"), make_images("qknorm")
    tokvis.patch(model, "tome", r=4)
    with torch.no_grad():
        ref = model(x)
        for blk in model.blocks:
            assert M.attn_dim(blk.attn) == blk.attn.attn_dim == blk.attn.qkv.out_features // 3
            del blk.attn.attn_dim
        assert M.attn_dim(model.blocks[0].attn) == model.embed_dim
        out = model(x)
    assert torch.equal(out, ref)


def test_patch_state_and_is_patched():
    model = make_model()
    assert not M.is_patched(model) and M.patch_state(model) is None
    tokvis.patch(model, "topk", keep_rate=0.5)
    assert M.is_patched(model) and M.patch_state(model).method.name == "topk"
    tokvis.unpatch(model)
    assert M.patch_state(model) is None
