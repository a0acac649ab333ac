"""The offline DINOv2 ViT-S/14 in transformers' ``Dinov2Model`` (``dinov2_small_offline_hf``) and in timm: every
method at keep rate 0.5 and ToMe at r=16 give the same labels at every block and the same pooled features; ``tokvis
record --cls`` stores the same class-token features per block."""

from __future__ import annotations

import pytest
import torch

from tests.integration.conftest import needs_offline_weights
from tests.scripts import load_benchmark

pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, needs_offline_weights]

bench = load_benchmark("hf_dinov2_equivalence")


@pytest.fixture(scope="module")
def families():
    from tokvis import data, zoo

    timm_model, hf_model = zoo.create("dinov2_small_offline"), zoo.create("dinov2_small_offline_hf")
    images, _ = data.load_images(timm_model, ["chelsea", "coffee", "rocket"])
    return timm_model, hf_model, images


def test_unpatched_families_agree(families):
    timm_model, hf_model, images = families
    with torch.no_grad():
        torch.testing.assert_close(bench.pooled(hf_model, images), bench.pooled(timm_model, images), atol=1e-4, rtol=0)
    assert type(hf_model).__name__ == "Dinov2Model"
    from tokvis import data

    assert data.data_config(hf_model) == data.data_config(timm_model)  # the same transform for the same weights


@pytest.mark.parametrize("name,schedule", bench.configurations(), ids=lambda v: str(v))
def test_same_trace_and_pooled_feature(families, name, schedule):
    timm_model, hf_model, images = families
    layers, differ, delta = bench.compare_families(timm_model, hf_model, images, bench.make_method(name), schedule)
    assert layers, "the schedule reduces"
    assert differ == [], f"labels differ at blocks {differ}"
    assert delta <= 1e-4


def test_record_cls_stores_timms_class_token_features(tmp_path):
    """``tokvis record --cls`` on the transformers model: its class token after every block equals timm's."""
    import numpy as np

    from tokvis.cli import main
    from tokvis.store import load_run

    cls = {}
    for name in ("dinov2_small_offline", "dinov2_small_offline_hf"):
        out = tmp_path / name
        argv = ["record", "--model", name, "--method", "topk", "--keep-rate", "0.5", "--data", "samples", "--limit",
                "3", "--batch-size", "3", "--device", "cpu", "--cls", "--no-progress", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
        cls[name] = load_run(run_dir).cls_features()
    timm_cls, hf_cls = cls["dinov2_small_offline"], cls["dinov2_small_offline_hf"]
    assert timm_cls.shape == hf_cls.shape == (3, 12, 384)
    np.testing.assert_allclose(hf_cls, timm_cls, atol=1e-4, rtol=0)
