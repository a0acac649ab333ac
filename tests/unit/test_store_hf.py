"""Run stores of ``transformers`` models: class-token features per block (``cls=True``) through the backbone
adapter, equal to timm's for the same weights and to the model's own hidden states; transformers' version in the
manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokvis
from tokvis.data import data_config, transform_for
from tokvis.datasets import Dataset
from tokvis.store import RunConfigError, RunSpec, load_run, record_run
from tokvis.store.format import versions

transformers = pytest.importorskip("transformers")

from tests.hf_models import make_hf, timm_and_hf_dinov2  # noqa: E402

N = 5


def _dataset(n=N, size=64):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return Dataset(name="synthetic", spec="synthetic", ids=[f"img{i}" for i in range(n)], loader=lambda i: imgs[i])


def _record(model, out, dataset, *, backbone, method="topk", keep_rate=0.7, cls=True):
    spec = RunSpec(backbone=backbone, method=method, dataset="synthetic", keep_rate=keep_rate, shard_size=2, cls=cls)
    tokvis.patch(model, method, keep_rate=keep_rate)
    try:
        return record_run(model, dataset, spec, out, batch_size=2, progress=False, log=lambda *a: None)
    finally:
        tokvis.unpatch(model)


def _pair():
    timm_model, hf_model = timm_and_hf_dinov2()
    hf_model._tokvis_data_config = data_config(timm_model)  # the same transform, so the same pixels reach both
    return timm_model, hf_model


def test_hf_cls_features_per_block_equal_timms_and_the_hidden_states(tmp_path):
    timm_model, hf_model = _pair()
    ds = _dataset()
    timm_run = load_run(_record(timm_model, tmp_path / "timm", ds, backbone="timm").path)
    hf_run = load_run(_record(hf_model, tmp_path / "hf", ds, backbone="hf").path)
    hf_cls, timm_cls = hf_run.cls_features(), timm_run.cls_features()
    assert hf_cls.shape == timm_cls.shape == (N, 6, 64)
    np.testing.assert_allclose(hf_cls, timm_cls, atol=1e-4, rtol=0)
    assert not np.allclose(hf_cls[:, 0], hf_cls[:, -1], atol=1e-2)  # per block, not one feature repeated
    # an independent path: the unreduced model's hidden states (topk keeps the class token, which
    # attends to the kept tokens only after the first reduction: compare the blocks before it)
    tf = transform_for(hf_model)
    x = torch.stack([tf(ds.loader(i)) for i in range(N)])
    with torch.no_grad():
        hidden = hf_model(pixel_values=x, output_hidden_states=True).hidden_states
    first = min(d.layer for d in hf_run.trace().decisions)
    for i in range(first + 1):
        np.testing.assert_allclose(hf_cls[:, i], hidden[i + 1][:, 0].numpy(), atol=1e-5, rtol=0)


def test_a_model_without_class_token_is_refused_clearly(tmp_path):
    model = make_hf("siglip")
    with pytest.raises(RunConfigError, match="SiglipVisionModel.*has none"):
        _record(model, tmp_path, _dataset(), backbone="hf-siglip", method="tome")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_manifest_records_transformers_version_for_hf_models_only(tmp_path):
    timm_model, hf_model = _pair()
    ds = _dataset(2)
    hf_res = _record(hf_model, tmp_path / "hf", ds, backbone="hf", cls=False)
    timm_res = _record(timm_model, tmp_path / "timm", ds, backbone="timm", cls=False)
    hf_versions = json.loads((hf_res.path / "manifest.json").read_text())["versions"]
    timm_versions = json.loads((timm_res.path / "manifest.json").read_text())["versions"]
    assert hf_versions["transformers"] == transformers.__version__
    assert {"tokvis", "torch", "timm"} <= set(hf_versions)
    assert "transformers" not in timm_versions and "transformers" not in versions()
    # a patched model still counts as a transformers model; a store without the key (timm, older) still loads
    tokvis.patch(hf_model, "topk", keep_rate=0.7)
    try:
        assert versions(hf_model)["transformers"] == transformers.__version__
    finally:
        tokvis.unpatch(hf_model)
    assert load_run(timm_res.path).num_images == 2 and load_run(hf_res.path).num_images == 2
