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


HF_TINY = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128, image_size=64,
               patch_size=8)  # fmt: skip


def make_hf(family: str, *, seed: int = 0):
    """A tiny random ``transformers`` model of ``family`` (``vit``, ``vit_cls``, ``clip``, ``siglip``), eval mode,
    weights perturbed so that every submodule matters."""
    torch.manual_seed(seed)
    t = transformers
    model = {
        "vit": lambda: t.ViTModel(t.ViTConfig(**HF_TINY)),
        "vit_cls": lambda: t.ViTForImageClassification(t.ViTConfig(num_labels=5, **HF_TINY)),
        "clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**HF_TINY)),
        "siglip": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**HF_TINY)),
    }[family]()
    return _perturb(model.eval(), seed)


def hf_output(out) -> torch.Tensor:
    """The model's final tensor: the pooled feature, else the logits."""
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.logits


def check_no_reduction_hf(model, x, ref: torch.Tensor, *, skip_class_token: bool = False) -> None:
    """Every method at keep rate 1.0 / r = 0 gives ``ref`` (the unpatched output): bit for bit at r = 0 (and at
    keep rate 1.0 where the method matrix says so) and keeps every token; ``model`` is unpatched afterwards."""
    import tokvis
    from tests.invariants import case_for, method_for

    for method in sorted(tokvis.list_methods()):
        case = case_for(method)
        if skip_class_token and case.needs_class_token:
            continue
        for kw in ({"keep_rate": 1.0}, {"r": 0}):
            if next(iter(kw)) not in case.conventions:
                continue
            obj, sched = method_for(method, kw)
            tokvis.patch(model, obj, **sched)
            with torch.no_grad():
                out, trace = tokvis.run_with_trace(model, x)
            if "r" in kw or case.exact_at_keep_rate_one:
                assert torch.equal(hf_output(out), ref), (method, kw)
            else:
                torch.testing.assert_close(hf_output(out), ref, atol=1e-5, rtol=0)
            assert all(d.n_out == trace.num_patches for d in trace.decisions)
            tokvis.unpatch(model)


#: an image processor per family, exercising both of transformers' resize kinds (height x width; short side, then
#: a centre crop) at the tiny models' 64 px input
PROCESSORS = {
    "vit": ("ViTImageProcessor", dict(size={"height": 64, "width": 64})),
    "vit_cls": ("ViTImageProcessor", dict(size={"height": 64, "width": 64}, resample=3)),
    "clip": ("CLIPImageProcessor", dict(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64})),
    "siglip": ("SiglipImageProcessor", dict(size={"height": 64, "width": 64})),
}


def hf_processor(family: str, *, pil: bool = False):
    """The image processor of ``family``'s tiny model (``pil``: transformers' PIL backend where it has one)."""
    name, kw = PROCESSORS[family]
    cls = getattr(transformers, name + "Pil", None) if pil else None
    return (cls or getattr(transformers, name))(**kw)


def save_hf(family: str, folder, *, seed: int = 0, processor: bool = True):
    """``make_hf(family)`` saved to ``folder`` (``save_pretrained``) with its image processor; the model."""
    model = make_hf(family, seed=seed)
    model.save_pretrained(folder)
    if processor:
        hf_processor(family).save_pretrained(folder)
    return model


def fake_hub_cache(cache, repo: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567") -> str:
    """Put the files of ``folder`` into a Hugging Face Hub cache at ``cache`` as repo ``repo``'s ``main`` at
    ``commit`` (the layout huggingface_hub reads offline); the commit."""
    import shutil
    from pathlib import Path

    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return commit
