"""The real pretrained DINOv2 ViT-S/14 (offline weights): equivalence, schedules, meaningful patterns."""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.integration.conftest import needs_offline_weights

pytestmark = [pytest.mark.slow, needs_offline_weights]


@pytest.fixture(scope="module")
def backbone():
    from tokvis import data, zoo

    model = zoo.create("dinov2_small_offline")
    images, ids = data.load_images(model, ["chelsea", "coffee", "rocket"])
    with torch.no_grad():
        ref = model(images)
    return model, images, ids, ref


@pytest.mark.parametrize("method", ["tome", "topk", "evit"])
def test_keep_rate_one_equals_unpatched(backbone, method):
    model, images, _, ref = backbone
    tokvis.patch(model, method, keep_rate=1.0)
    try:
        out, trace = tokvis.run_with_trace(model, images)
    finally:
        tokvis.unpatch(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert trace.layers == (3, 6, 9)
    assert bool(trace.kept(11).all())


def test_tome_r16_schedule_and_fidelity(backbone):
    model, images, ids, ref = backbone
    tokvis.patch(model, "tome", r=16)
    try:
        out, trace = tokvis.run_with_trace(model, images, image_ids=ids)
    finally:
        tokvis.unpatch(model)
    assert trace.grid_size == (16, 16)
    assert trace.meta.backbone == "dinov2_small_offline"
    assert trace.meta.image_ids == ids
    assert trace.token_counts(11).tolist() == [256 - 12 * 16] * 3
    # a pretrained model degrades gracefully under ToMe: features stay close to the unreduced ones
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert bool((cos > 0.8).all()), cos


@pytest.mark.parametrize("method", ["tome", "topk", "evit"])
def test_fidelity_falls_with_keep_rate(backbone, method):
    """On a pretrained model, keeping fewer tokens moves the features further from the unreduced ones."""
    model, images, _, ref = backbone
    fidelity = []
    try:
        for keep_rate in (0.9, 0.7, 0.5):
            tokvis.patch(model, method, keep_rate=keep_rate)
            out, _ = tokvis.run_with_trace(model, images)
            fidelity.append(float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()))
    finally:
        tokvis.unpatch(model)
    assert fidelity[0] > 0.95, fidelity
    assert fidelity[0] > fidelity[1] > fidelity[2], fidelity
