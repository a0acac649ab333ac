"""Patching: equivalence at no reduction, unpatch, replacement, recording transparency, errors."""

from __future__ import annotations

import math

import pytest
import torch

import tokvis
from tests.models import FLAVOURS, make_images, make_model
from tokvis import recording
from tokvis.errors import (
    ImageSizeError,
    MethodOptionError,
    ScheduleError,
    TokvisError,
    UnknownMethodError,
    UnsupportedModelError,
)

METHODS = ["tome", "topk", "evit"]


def _method_kwargs(method: str, flavour: str) -> dict:
    # ranking by the class token needs one; models without use the mean received attention
    if method in ("topk", "evit") and flavour == "avgpool":
        return {"score": "mean"}
    return {}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("schedule", [{"keep_rate": 1.0}, {"r": 0}, {"keep_rate": 1.0, "locations": [0, 5]}])
def test_no_reduction_equals_unpatched(flavour, method, schedule):
    model, x = make_model(flavour), make_images(flavour)
    with torch.no_grad():
        ref = model(x)
        tokvis.patch(model, method, **schedule, **_method_kwargs(method, flavour))
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("method", METHODS)
def test_reduction_changes_output_and_unpatch_restores(flavour, method):
    model, x = make_model(flavour), make_images(flavour)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    classes_before = [type(b) for b in model.blocks]
    with torch.no_grad():
        ref = model(x)
        tokvis.patch(model, method, keep_rate=0.5, **_method_kwargs(method, flavour))
        reduced = model(x)
        assert not torch.allclose(reduced, ref, atol=1e-5), "a 0.5 keep rate must change the output"
        tokvis.unpatch(model)
        out = model(x)
    assert torch.equal(out, ref)
    assert [type(b) for b in model.blocks] == classes_before
    after = model.state_dict()
    assert after.keys() == state_before.keys()
    assert all(torch.equal(after[k], state_before[k]) for k in after)
    assert not tokvis.is_patched(model)
    assert not model._forward_pre_hooks
    assert not any(k.startswith("_tokvis") for b in model.blocks for k in vars(b))


def test_patch_twice_replaces_never_stacks():
    model, x = make_model(), make_images()
    with torch.no_grad():
        tokvis.patch(model, "tome", r=4)
        tokvis.patch(model, "topk", keep_rate=0.5)
        twice = model(x)
        assert len(model._forward_pre_hooks) == 1
        assert model.tokvis_method.name == "topk"
        tokvis.unpatch(model)
        tokvis.patch(model, "topk", keep_rate=0.5)
        once = model(x)
        _, trace = tokvis.run_with_trace(model, x)
    assert torch.equal(twice, once)
    assert trace.meta.method == "topk"
    tokvis.unpatch(model)
    assert tokvis.unpatch(model) is model  # unpatching an unpatched model is a no-op


RECORD_CASES = [("tome", {"r": 6}), ("topk", {"keep_rate": 0.6}), ("evit", {"keep_rate": 0.6})]


@pytest.mark.parametrize("method,kw", RECORD_CASES)
def test_recording_does_not_change_outputs(method, kw):
    # recording must be invisible: the same batch gives bit-identical outputs with and without a recorder
    # (never compare across batch sizes bit for bit: BLAS kernels depend on the batch size on some CPUs)
    model, x = make_model("registers"), make_images("registers")
    tokvis.patch(model, method, **kw)
    with torch.no_grad():
        plain = model(x)
        plain2 = model(x[:2])
        hooks_before = (len(model._forward_pre_hooks), len(model._forward_hooks))
        with tokvis.record(model) as rec:
            recorded = model(x)
            recorded2 = model(x[:2])
        assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks_before
    assert torch.equal(plain, recorded)
    assert torch.equal(plain2, recorded2)
    assert rec.trace.num_images == 5
    assert len(rec.batches) == 2
    assert not recording._LISTENERS


@pytest.mark.parametrize("method,kw", RECORD_CASES)
def test_batch_items_do_not_influence_each_other(method, kw):
    # batch independence: a sub-batch gives the same outputs up to float rounding and identical partitions
    model, x = make_model("registers"), make_images("registers")
    tokvis.patch(model, method, **kw)
    out3, trace3 = tokvis.run_with_trace(model, x)
    out2, trace2 = tokvis.run_with_trace(model, x[:2])
    torch.testing.assert_close(out2, out3[:2], atol=1e-5, rtol=1e-5)
    assert trace2.layers == trace3.layers and trace3.layers
    for layer in trace3.layers:
        assert torch.equal(trace2.labels(layer), trace3.labels(layer)[:2])
        assert torch.equal(trace2.kept(layer), trace3.kept(layer)[:2])


def test_hooks_removed_when_forward_raises():
    model, x = make_model(), make_images()
    tokvis.patch(model, "tome", r=4)
    hooks_before = (len(model._forward_pre_hooks), len(model._forward_hooks))

    def boom(module, inp, out):
        raise RuntimeError("boom")

    h = model.blocks[3].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        with tokvis.record(model):
            model(x)
    h.remove()
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks_before
    assert not recording._LISTENERS
    # the model still works and records afterwards
    out, trace = tokvis.run_with_trace(model, x)
    assert trace.num_images == 3


def test_recording_unpatched_model_gives_empty_trace():
    model, x = make_model(), make_images()
    out, trace = tokvis.run_with_trace(model, x)
    assert trace.layers == ()
    assert torch.equal(trace.labels(5), torch.arange(64).expand(3, 64))
    assert bool((trace.depth() == 6).all())


def test_third_party_report():
    """Code outside tokvis announces decisions through tokvis.report."""
    model, x = make_model(), make_images(n=2)
    d = tokvis.LayerDecision(
        layer=2,
        kind="prune",
        dst=torch.arange(64).expand(2, 64).clone(),
        keep=torch.ones(2, 64, dtype=torch.bool),
        n_out=64,
    )

    def announce(module, inp, out):
        tokvis.report(module, d)

    h = model.blocks[2].mlp.register_forward_hook(announce)
    try:
        tokvis.report(model.blocks[2], d)  # no recorder open: a no-op
        out, trace = tokvis.run_with_trace(model, x)
    finally:
        h.remove()
    assert trace.layers == (2,)
    assert torch.equal(trace.decision(2).dst, d.dst)


def test_patched_model_trains_with_grad():
    model, x = make_model(), make_images()
    tokvis.patch(model, "tome", r=4)
    model.train()
    out = model(x)
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_dynamic_img_size_other_input():
    model = make_model("dynamic")
    tokvis.patch(model, "topk", keep_rate=0.5)
    x = torch.randn(2, 3, 32, 96)
    _, trace = tokvis.run_with_trace(model, x)
    assert trace.grid_size == (4, 12)
    assert trace.num_patches == 48
    assert trace.token_counts(trace.layers[-1]).tolist() == [math.floor(48 * 0.5**3)] * 2


# ---------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("keep_rate", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_keep_rate(keep_rate):
    with pytest.raises(ScheduleError, match="keep_rate"):
        tokvis.patch(make_model(), "topk", keep_rate=keep_rate)


def test_keep_rate_too_small_for_patches():
    with pytest.raises(ScheduleError, match="keep_rate=0.05"):
        tokvis.patch(make_model(), "topk", keep_rate=0.05)


@pytest.mark.parametrize(
    "r,match", [(-1, ">= 0"), (65, "only 64 patches"), ([1, 2], "one entry per block"), ("x", "int")]
)
def test_bad_r(r, match):
    with pytest.raises(ScheduleError, match=match):
        tokvis.patch(make_model(), "tome", r=r)


def test_r_too_large_for_pruning():
    with pytest.raises(ScheduleError, match="leaves no token"):
        tokvis.patch(make_model(), "topk", r=20)
    tokvis.patch(make_model(), "tome", r=20)  # ToMe caps r at half the tokens, as ToMe does


def test_both_or_neither_schedule():
    with pytest.raises(ScheduleError, match="mutually exclusive"):
        tokvis.patch(make_model(), "tome", keep_rate=0.5, r=4)
    with pytest.raises(ScheduleError, match="keep_rate"):
        tokvis.patch(make_model(), "tome")


@pytest.mark.parametrize(
    "locations,match", [([0, 6], "out of range"), ([-1], "out of range"), ([3, 2], "ascending"), ([], "empty")]
)
def test_bad_locations(locations, match):
    with pytest.raises(ScheduleError, match=match):
        tokvis.patch(make_model(), "topk", keep_rate=0.5, locations=locations)


def test_unknown_method_and_options():
    with pytest.raises(UnknownMethodError, match="did you mean 'tome'"):
        tokvis.patch(make_model(), "tomee", r=2)
    with pytest.raises(MethodOptionError, match="score"):
        tokvis.patch(make_model(), "topk", keep_rate=0.5, score="max")
    with pytest.raises(MethodOptionError, match="method 'tome' has no option 'bogus'; its options"):
        tokvis.patch(make_model(), "tome", r=2, bogus=1)


def test_method_spec_strings():
    from tokvis.methods import create_method, parse_method_spec

    name, options = parse_method_spec("sinkhorn:eps=0.1,iters=5")
    assert (name, options) == ("sinkhorn", {"eps": 0.1, "iters": 5})
    expect = {"eps": 0.1, "iters": 5, "seed": 0, "output": "study", "placement": "before_block"}
    assert create_method(name, **options).options() == expect
    assert parse_method_spec("vomix:residual=drop,soft=true") == ("vomix", {"residual": "drop", "soft": True})
    assert parse_method_spec("tome") == ("tome", {})
    with pytest.raises(MethodOptionError, match="KEY=VALUE"):
        parse_method_spec("sinkhorn:eps")


def test_failed_patch_leaves_model_untouched():
    model = make_model()
    tokvis.patch(model, "tome", r=2)
    with pytest.raises(ScheduleError):
        tokvis.patch(model, "topk", keep_rate=2.0)
    assert model.tokvis_method.name == "tome"  # the previous patch is still in place


def test_class_token_required():
    with pytest.raises(UnsupportedModelError, match="no class token.*score='mean'"):
        tokvis.patch(make_model("avgpool"), "topk", keep_rate=0.5)


def test_non_vit_models():
    import timm

    for name in ("resnet18", "swin_tiny_patch4_window7_224"):
        with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
            tokvis.patch(timm.create_model(name, pretrained=False), "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        tokvis.patch(torch.nn.Linear(2, 2), "tome", r=2)


def test_unsupported_block_and_attention():
    from timm.models.vision_transformer import ResPostBlock

    model = make_model(block_fn=ResPostBlock)
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        tokvis.patch(model, "tome", r=2)

    class MyAttention(torch.nn.Module):
        pass

    model = make_model()
    model.blocks[1].attn.__class__ = type("MyAttention", (type(model.blocks[1].attn),), {})
    with pytest.raises(UnsupportedModelError, match="block 1 uses attention .*MyAttention"):
        tokvis.patch(model, "tome", r=2)


@pytest.mark.parametrize(
    "flavour,shape,match",
    [
        ("cls", (2, 3, 60, 64), "expects 64x64"),
        ("cls", (2, 1, 64, 64), "3-channel"),
        ("cls", (3, 64, 64), "4-D"),
        ("dynamic", (2, 3, 50, 64), "not divisible by the patch size 8x8"),
    ],
)
def test_bad_image_sizes(flavour, shape, match):
    model = make_model(flavour)
    tokvis.patch(model, "tome", r=2)
    with pytest.raises(ImageSizeError, match=match):
        model(torch.randn(*shape))
    with pytest.raises(ImageSizeError, match=match):
        tokvis.run_with_trace(model, torch.randn(*shape))


def test_integer_images_rejected():
    model = make_model()
    with pytest.raises(ImageSizeError, match="float"):
        tokvis.run_with_trace(model, torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_attention_mask_rejected():
    model = make_model()
    tokvis.patch(model, "tome", r=2)
    with pytest.raises(TokvisError, match="attention masks"):
        model.forward_features(make_images(), attn_mask=torch.zeros(65, 65, dtype=torch.bool))
