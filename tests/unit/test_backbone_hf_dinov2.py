"""transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``: the same traces and outputs as timm with the same
weights, every method, recording, the unpatched model at keep rate 1.0 / r = 0, and the refused calls."""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.hf_models import check_no_reduction_hf, compare_families, pooled, timm_and_hf_dinov2
from tests.invariants import METHOD_MATRIX, method_for
from tests.models import make_images
from tokvis.errors import TokvisError, UnsupportedModelError

METHODS = sorted(tokvis.list_methods())


def test_the_matrix_covers_every_method():
    assert set(METHODS) == set(METHOD_MATRIX)


@pytest.mark.parametrize("registers", [0, 4])
def test_unpatched_families_agree(registers):
    timm_model, hf_model = timm_and_hf_dinov2(registers)
    x = make_images("cls")
    with torch.no_grad():
        torch.testing.assert_close(pooled(hf_model, x), pooled(timm_model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_timms_trace_on_hf_dinov2(method, registers):
    """Same weights, same method parameters: the same labels at every reducing block, the same pooled feature
    (float64 models: no near-tie of two kernels' rounding can flip a decision)."""
    timm_model, hf_model = timm_and_hf_dinov2(registers, dtype=torch.float64)
    x = make_images("cls", n=2, dtype=torch.float64)
    schedules = [{"keep_rate": 0.5}] + ([{"r": 8}] if method == "tome" else [])  # r=16 on 64 patches: too many
    for kw in schedules:
        obj, sched = method_for(method, kw)
        layers, differ, delta = compare_families(timm_model, hf_model, x, obj, sched)
        assert layers, (method, kw, "nothing reduced")
        assert differ == [], (method, kw, differ)
        assert delta <= 1e-9, (method, kw, delta)


def test_no_reduction_is_the_unpatched_hf_model():
    _, hf_model = timm_and_hf_dinov2(4)
    x = make_images("cls")
    with torch.no_grad():
        ref = pooled(hf_model, x)
    check_no_reduction_hf(hf_model, x, ref)


def test_hf_model_info_and_keyword_images():
    _, hf_model = timm_and_hf_dinov2(4)
    info = tokvis.model.model_info(hf_model)
    assert (info.num_prefix_tokens, info.grid_size, info.depth) == (5, (8, 8), 6)
    tokvis.patch(hf_model, "topk", keep_rate=0.5)
    x = make_images("cls")
    with torch.no_grad(), tokvis.record(hf_model) as rec:
        hf_model(pixel_values=x)  # images by keyword are checked and recorded too
    assert rec.trace.num_images == 3
    with pytest.raises(tokvis.errors.ImageSizeError):
        hf_model(pixel_values=x[:, :2])


def test_refused_calls_and_classes():
    _, hf_model = timm_and_hf_dinov2(0)
    tokvis.patch(hf_model, "tome", r=4)
    x = make_images("cls")
    with pytest.raises(TokvisError, match="output_attentions"):
        hf_model(x, output_attentions=True)
    with pytest.raises(TokvisError, match="attention mask"):
        hf_model(x, attention_mask=torch.ones(3, 65))
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    with pytest.raises(UnsupportedModelError, match="Dinov2ForImageClassification"):
        tokvis.patch(transformers.Dinov2ForImageClassification(cfg), "tome", r=2)
