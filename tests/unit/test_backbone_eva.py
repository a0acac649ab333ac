"""timm ``Eva`` (DINOv3, EVA-02, RoPE ViTs, PE): the method matrix, rotary positions that follow the tokens, errors.

The no-reduction invariant over every method and Eva flavour is in ``test_invariants`` (its flavour list holds
every supported family); here every method reduces on Eva models.
"""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.invariants import (
    MATRIX_SCHEDULES,
    block_token_counts,
    case_for,
    check_batch_items_independent,
    check_composition_kept_depth,
    expected_counts,
    method_for,
    schedule_id,
)
from tests.models import make_images, make_model
from tokvis.backbones import backbone_for
from tokvis.backbones.timm_eva import TimmEva, _timm_builds_grids, rope_coords, rope_from_coords
from tokvis.errors import MethodOptionError, UnsupportedModelError

IDS = [f"{m}-{schedule_id(kw)}" for m, kw in MATRIX_SCHEDULES]
#: merge_position="mean" evaluates rotary rows through timm's grid builder (timm >= 1.0.31); older timm (the
#: lowest timm CI tests) gets a typed error instead (test_mean_position_on_an_older_timm_is_a_typed_error)
needs_grids = pytest.mark.skipif(not _timm_builds_grids(), reason="timm < 1.0.31 has no rotary grid builder")


def _flavour_for(method: str, with_cls: str, without: str) -> str:
    return with_cls if case_for(method).needs_class_token else without


@pytest.mark.parametrize("method,kw", MATRIX_SCHEDULES, ids=IDS)
def test_every_method_reduces_and_records_on_eva(method, kw):
    """Token counts follow the schedule, the recorded composition equals the dense product (every stage:
    before the block, in the attention, after it), on DINOv3-like (registers) and no-class-token Eva models."""
    for flavour in ("eva_dinov3", _flavour_for(method, "eva02", "eva02_gap")):
        model, x = make_model(flavour), make_images(flavour)
        obj, sched = method_for(method, kw)
        tokvis.patch(model, obj, **sched)
        counts = block_token_counts(model, x)
        expect = expected_counts(method, kw, 64, 6)
        assert counts == expect, (flavour, counts, expect)
        check_composition_kept_depth(flavour, method, kw)


@pytest.mark.parametrize("method,kw", MATRIX_SCHEDULES, ids=IDS)
def test_batch_items_independent_on_eva(method, kw):
    """Rotary rows are gathered per image: each image is reduced as if alone."""
    check_batch_items_independent(method, kw, flavour="eva_dinov3")


# timm < 1.0.31's mixed RoPE cannot run in float64 (its frequencies stay float32), unpatched too
@pytest.mark.parametrize(
    "flavour", ["eva_dinov3", "eva02", pytest.param("eva_rope_mixed", marks=needs_grids), "eva_pe"]
)
def test_pruned_tokens_keep_their_rotary_rows(flavour):
    """Top-K at one block equals the unpatched model whose later blocks cannot attend to the dropped tokens
    (a key mask, the tokens stay in place with their own rotary rows): the class token's output agrees."""
    model = make_model(flavour, global_pool="token", dtype=torch.float64)
    x = make_images(flavour, dtype=torch.float64)
    tokvis.patch(model, "topk", keep_rate=0.5, locations=[1])
    with torch.no_grad():
        out, trace = tokvis.run_with_trace(model, x)
    tokvis.unpatch(model)
    p = model.num_prefix_tokens
    keep = torch.cat([torch.ones(x.shape[0], p, dtype=torch.bool), trace.decision(1).keep], 1)  # [B, T]
    mask = keep[:, None, None, :].expand(-1, 1, keep.shape[1], -1)

    def masked(module, args, kwargs):
        return args, {**kwargs, "attn_mask": mask}

    hooks = [blk.register_forward_pre_hook(masked, with_kwargs=True) for blk in list(model.blocks)[2:]]
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    # and the rows matter: the same tokens with the rows of the first tokens instead give another output
    assert not torch.allclose(out, model(x), atol=1e-6)


@needs_grids
@pytest.mark.parametrize("flavour", ["eva_dinov3", "eva02"])
def test_rotary_rows_at_grid_coordinates_are_the_modules_table(flavour):
    """The embedding at any coordinate (merge_position='mean') equals the module's own table on its grid."""
    model = make_model(flavour)
    grid = tuple(model.patch_embed.grid_size)
    table = model.rope.get_embed(shape=list(grid))
    mine = rope_from_coords(model.rope, rope_coords(model.rope, grid))
    torch.testing.assert_close(mine, table, atol=1e-6, rtol=1e-6)


@needs_grids
@pytest.mark.parametrize("flavour", ["eva_dinov3", "eva02"])
def test_merged_token_position_is_the_mean_of_its_patches(flavour):
    """With merge_position='mean', each ToMe token sits at the mean coordinate of the patches it holds (ToMe
    weights by size, so the size-weighted means of means are the plain mean over the patches); pruning leaves
    both options identical."""
    model, x = make_model(flavour), make_images(flavour)
    tokvis.patch(model, "tome", r=8, merge_position="mean")
    with torch.no_grad():
        out_mean, trace = tokvis.run_with_trace(model, x)
    pos = model._tokvis.positions
    grid = tuple(model.patch_embed.grid_size)
    coords = rope_coords(model.rope, grid)  # [N, 2]
    labels = trace.labels(trace.layers[-1])
    for b in range(x.shape[0]):
        for j in range(pos.coords.shape[1]):
            members = (labels[b] == j).nonzero().flatten()
            torch.testing.assert_close(pos.coords[b, j], coords[members].mean(0), atol=1e-5, rtol=1e-5)
    assert bool(pos.merged.any())
    tokvis.patch(model, "tome", r=8)
    with torch.no_grad():
        out_dst = model(x)
    assert not torch.allclose(out_mean, out_dst, atol=1e-6), "the option changes merged tokens"
    for name, opts in (("topk", {}),):
        tokvis.patch(model, name, keep_rate=0.5, merge_position="mean", **opts)
        with torch.no_grad():
            a = model(x)
        tokvis.patch(model, name, keep_rate=0.5, **opts)
        with torch.no_grad():
            b = model(x)
        assert torch.equal(a, b)


def test_destination_position_is_the_kept_token():
    """merge_position='destination': each ToMe token's rotary row is its destination's (the kept token)."""
    model, x = make_model("eva_dinov3"), make_images("eva_dinov3")
    tokvis.patch(model, "tome", r=8, locations=[0])
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    d = trace.decision(0)
    idx = model._tokvis.positions.index
    for b in range(x.shape[0]):
        dst_tokens = d.keep[b].nonzero().flatten()
        assert torch.equal(idx[b][d.dst[b][dst_tokens]], dst_tokens)


def test_mean_position_needs_a_known_rotary_module():
    model = make_model("eva_rope_mixed")
    with pytest.raises(UnsupportedModelError, match="merge_position='destination'"):
        tokvis.patch(model, "tome", r=4, merge_position="mean")
    with pytest.raises(MethodOptionError, match="merge_position"):
        tokvis.patch(model, "tome", r=4, merge_position="centre")
    assert not tokvis.is_patched(model)


def test_eva_family_and_unsupported_variants():
    import timm

    model = make_model("eva02")
    assert isinstance(backbone_for(model), TimmEva)
    post = timm.create_model(
        "eva02_small_patch14_224", pretrained=False, img_size=112, depth=2, embed_dim=64, num_heads=4,
        use_post_norm=True,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="EvaBlockPostNorm"):
        tokvis.patch(post, "tome", r=4)
    naflex = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=64, num_heads=4)
    with pytest.raises(UnsupportedModelError, match="NaFlexVit is not supported"):
        tokvis.patch(naflex, "tome", r=4)


@pytest.mark.parametrize("flavour", ["eva_dinov3", "eva_rope_mixed"])
def test_attention_maps_on_eva_are_the_models_own(flavour):
    """tokvis.attention_maps on Eva (rotary embeddings applied) equals the probabilities Eva's own unfused
    attention computes (read at its attention dropout)."""
    from tokvis.attention import attention_maps

    model, x = make_model(flavour), make_images(flavour)
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0]))
    maps = attention_maps(model, x, heads="all")
    for i, probs in maps.items():
        torch.testing.assert_close(probs, seen[i], atol=1e-6, rtol=1e-5)


@needs_grids
def test_rope_merge_position_benchmark_runs_with_random_weights(capsys):
    """The benchmark's smoke test (random weights: no hub); its fidelity is the cosine of the pooled features."""
    from tests.scripts import load_benchmark

    bench = load_benchmark("rope_merge_position")
    model, x = make_model("eva_dinov3"), make_images("eva_dinov3")
    rows = bench.measure(model, x, [("tome", {"r": 8})])
    tokvis.patch(model, "tome", r=8, merge_position="mean")
    with torch.no_grad():
        feat = model.forward_head(model.forward_features(x), pre_logits=True).double()
    tokvis.unpatch(model)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True).double()
    expect = torch.nn.functional.cosine_similarity(feat, ref, dim=-1).mean().item()
    assert rows[0]["mean"] == pytest.approx(expect, abs=1e-12)
    assert rows[0]["mean - destination"] == pytest.approx(rows[0]["mean"] - rows[0]["destination"])
    assert not tokvis.is_patched(model)


@needs_grids
def test_other_input_size_on_a_dynamic_eva():
    """DINOv3 takes any size (dynamic_img_size): the rotary rows of that grid follow the tokens; no reduction
    is the unpatched model, and the mean coordinates start on that grid."""
    model = make_model("eva_dinov3")
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        tokvis.patch(model, "tome", r=0, merge_position="mean")
        assert torch.equal(model(x), ref)
        tokvis.patch(model, "tome", r=4, merge_position="mean")
        out, trace = tokvis.run_with_trace(model, x)
    assert trace.grid_size == (6, 10) and torch.isfinite(out).all()
    assert model._tokvis.positions.coords.shape == (2, 60 - 4 * 6, 2)


def test_mean_position_on_an_older_timm_is_a_typed_error(monkeypatch):
    """Without timm's rotary grid builder (timm < 1.0.31) merge_position="mean" is refused, naming the fix."""
    import tokvis.backbones.timm_eva as eva

    monkeypatch.setattr(eva, "_timm_builds_grids", lambda: False)
    model = make_model("eva_dinov3")
    with pytest.raises(UnsupportedModelError, match=r"upgrade timm \(>= 1.0.31\) or use merge_position='destination'"):
        tokvis.patch(model, "tome", r=4, merge_position="mean")
    tokvis.patch(model, "tome", r=4)  # the default works on any timm
    assert tokvis.is_patched(model)
