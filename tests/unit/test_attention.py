"""tokvis.attention: attention maps agree with timm's own attention, rollout with a direct product."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokvis
from tests.models import FLAVOURS, make_images, make_model
from tokvis.attention import attention_maps, attention_rollout
from tokvis.errors import MethodOptionError, TokvisError


def _timm_attention(model, images):
    """Per-head probabilities from timm's own (non-fused) Attention.forward: the input of attn_drop."""
    probs, handles = {}, []
    for i, blk in enumerate(model.blocks):
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_pre_hook(lambda m, a, i=i: probs.__setitem__(i, a[0])))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = True
    return probs


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_maps_match_timm(flavour):
    model, images = make_model(flavour), make_images(flavour, n=2)
    ref = _timm_attention(model, images)
    ours = attention_maps(model, images, heads="all")
    assert sorted(ours) == list(range(len(model.blocks)))
    for i, p in ours.items():
        torch.testing.assert_close(p, ref[i], rtol=1e-5, atol=1e-6)
    mean = attention_maps(model, images, blocks=[1, 4])
    assert sorted(mean) == [1, 4]
    torch.testing.assert_close(mean[4], ref[4].mean(1), rtol=1e-5, atol=1e-6)


def _pool_row(model, T):
    p = model.num_prefix_tokens
    row = np.zeros(T)
    if model.global_pool == "avg":
        row[p:] = 1 / (T - p)
    elif getattr(model, "dist_token", None) is not None:
        row[:2] = 0.5
    else:
        row[0] = 1
    return row


@pytest.mark.parametrize("flavour", ["cls", "distilled", "registers", "avgpool", "dynamic"])
@pytest.mark.parametrize("start,residual", [(0, 0.5), (3, 0.5), (2, 0.0), (5, 0.3)])
def test_rollout_matches_direct_product(flavour, start, residual):
    model, images = make_model(flavour), make_images(flavour, n=2)
    ref = {i: p.mean(1).double().numpy() for i, p in _timm_attention(model, images).items()}
    ours = attention_rollout(model, images, start=start, residual=residual).double().numpy()
    T = next(iter(ref.values())).shape[-1]
    p = model.num_prefix_tokens
    for b in range(images.shape[0]):
        v = _pool_row(model, T)
        for i in range(len(model.blocks) - 1, start - 1, -1):
            v = v @ (residual * np.eye(T) + (1 - residual) * ref[i][b])
        np.testing.assert_allclose(ours[b], v[p:], rtol=1e-4, atol=1e-7)
        assert v.sum() == pytest.approx(1.0)  # every factor is row-stochastic


def test_rollout_edges():
    model, images = make_model("cls"), make_images("cls", n=2)
    depth = len(model.blocks)
    assert torch.count_nonzero(attention_rollout(model, images, start=depth)) == 0  # class token: no patch weight
    assert torch.count_nonzero(attention_rollout(model, images, start=0, residual=1.0)) == 0
    last = attention_maps(model, images, blocks=[depth - 1])[depth - 1]
    torch.testing.assert_close(attention_rollout(model, images, start=depth - 1, residual=0.0), last[:, 0, 1:])
    avg = make_model("avgpool")
    flat = attention_rollout(avg, make_images("avgpool", n=1), start=depth)
    torch.testing.assert_close(flat, torch.full_like(flat, 1 / flat.shape[1]))


def test_bad_inputs():
    model, images = make_model("cls"), make_images("cls", n=1)
    with pytest.raises(MethodOptionError, match=r"start \(the model has 6 blocks\) must be an integer in \[0, 6\]"):
        attention_rollout(model, images, start=7)
    with pytest.raises(MethodOptionError, match="residual must be"):
        attention_rollout(model, images, residual=1.5)
    with pytest.raises(IndexError, match=r"blocks \(the model has 6\) must be an integer in \[0, 5\]"):
        attention_maps(model, images, blocks=[6])
    with pytest.raises(MethodOptionError, match="heads"):
        attention_maps(model, images, heads="max")
    with pytest.raises(tokvis.errors.ImageSizeError):
        attention_maps(model, make_images("patch32", n=1))
    tokvis.patch(model, "topk", keep_rate=0.5)
    with pytest.raises(TokvisError, match="unpatch"):
        attention_rollout(model, images)
    tokvis.unpatch(model)
    with pytest.raises(tokvis.errors.UnsupportedModelError):
        attention_maps(torch.nn.Linear(3, 3), images)
