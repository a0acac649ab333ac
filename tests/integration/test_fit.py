"""Fitting a learned method on the real DINOv2 ViT-S/14 (a handful of images, a few steps)."""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.integration.conftest import needs_offline_weights
from tokvis import fitting, zoo

pytestmark = [pytest.mark.slow, needs_offline_weights]


def test_fit_sit_on_real_backbone_lowers_held_out_loss(tmp_path):
    torch.manual_seed(0)
    model = zoo.create("dinov2_small_offline")
    train = fitting.augmented_images(model, 8, seed=0, sources=("imagenet",))
    held = fitting.augmented_images(model, 4, seed=1, sources=("samples",))
    method = tokvis.create_method("sit", seed=0)
    before = fitting.distillation_loss(model, method, held, keep_rate=0.7, locations=[9], batch_size=4)
    tokvis.fit(model, method, train, keep_rate=0.7, locations=[9], epochs=3, lr=1e-2, batch_size=4, progress=False)
    after = fitting.distillation_loss(model, method, held, keep_rate=0.7, locations=[9], batch_size=4)
    assert after < before, (before, after)
    path = fitting.save_method(method, tmp_path / "sit.safetensors")
    loaded = fitting.load_method(path)
    assert loaded.fit_info["keep_rate"] == 0.7
    tokvis.patch(model, loaded, keep_rate=0.7, locations=[9])
    with torch.no_grad():
        out = model(held[:1])
    tokvis.patch(model, method, keep_rate=0.7, locations=[9])
    with torch.no_grad():
        assert torch.equal(model(held[:1]), out)
