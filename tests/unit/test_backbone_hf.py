"""transformers ``ViTModel`` / ``ViTForImageClassification``, ``CLIPVisionModel``, ``SiglipVisionModel``: the method
matrix, the unpatched model at keep rate 1.0 / r = 0, recording.  (DINOv2, against timm: test_backbone_hf_dinov2.)"""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.hf_models import check_no_reduction_hf, hf_output, make_hf
from tests.invariants import MATRIX_SCHEDULES, block_token_counts, case_for, expected_counts, method_for, schedule_id
from tests.models import make_images
from tokvis.errors import TokvisError

FAMILIES = ["vit", "vit_cls", "clip", "siglip"]
IDS = [f"{m}-{schedule_id(kw)}" for m, kw in MATRIX_SCHEDULES]


@pytest.mark.parametrize("method,kw", MATRIX_SCHEDULES, ids=IDS)
def test_every_method_reduces_and_records_on_hf(method, kw):
    """Token counts follow the schedule and the trace has a decision at each reducing block, on every family
    (methods that rank by the class token are refused on SigLIP, which has none)."""
    for family in FAMILIES:
        model, x = make_hf(family), make_images("cls")
        obj, sched = method_for(method, kw)
        if family == "siglip" and case_for(method).needs_class_token:
            with pytest.raises(TokvisError):
                tokvis.patch(model, obj, **sched)
            continue
        tokvis.patch(model, obj, **sched)
        counts = block_token_counts(model, x)
        assert counts == expected_counts(method, kw, 64, 6), family
        with torch.no_grad():
            out, trace = tokvis.run_with_trace(model, x)
        assert hf_output(out).shape[0] == 3 and trace.num_images == 3
        reducing = [i for i, (a, b) in enumerate(zip([64, *counts[:-1]], counts, strict=True)) if a != b]
        assert set(reducing) <= set(trace.layers), (family, reducing, trace.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_reduction_is_the_unpatched_hf_model(family):
    """Through the adapter (tokvis' attention and the layers' own modules) the model computes what its own forward
    does: bit for bit at r = 0, up to rounding at keep rate 1.0 where the matrix says so."""
    model, x = make_hf(family), make_images("cls")
    with torch.no_grad():
        ref = hf_output(model(x))
    check_no_reduction_hf(model, x, ref, skip_class_token=family == "siglip")
    tokvis.patch(model, "tome", r=8)  # and the check can fail: a reducing schedule changes the output
    with torch.no_grad():
        assert not torch.allclose(hf_output(model(x)), ref, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_refused_calls_and_wrong_images(family):
    model = tokvis.patch(make_hf(family), "tome", r=4)
    x = make_images("cls")
    with pytest.raises(TokvisError, match="output_attentions"):
        model(x, output_attentions=True)
    with pytest.raises(tokvis.errors.ImageSizeError, match="64x64"):
        model(pixel_values=make_images("patch14"))


def test_speed_table_times_each_family_unpatched_and_with_tome():
    """benchmarks/hf_dinov2_equivalence.py --speed on tiny models: a row per model and batch size, each timing
    positive, and every model left unpatched."""
    from tests.scripts import load_benchmark

    bench = load_benchmark("hf_dinov2_equivalence")
    models = {family: make_hf(family) for family in ("vit", "clip", "siglip")}
    rows = bench.speed_table(models, [1, 2], 1)
    assert [(r["model"], r["batch"]) for r in rows] == [(f, b) for f in models for b in (1, 2)]
    assert all(r["plain_ms"] > 0 and r["tome_ms"] > 0 for r in rows)
    assert not any(tokvis.is_patched(m) for m in models.values())
