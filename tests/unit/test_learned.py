"""Learned methods (dynamicvit, sit, patchmerger, sinkhorn, dpcknn's learned merge) and their fitting."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis import fitting
from tokvis.errors import MethodOptionError, WeightsError
from tokvis.methods import create_method
from tokvis.methods._learned import load_study_checkpoint
from tokvis.methods.sinkhorn import log_sinkhorn

LEARNED = ["dynamicvit", "sit", "patchmerger", "sinkhorn"]
SOFT = ["sit", "patchmerger", "sinkhorn"]
#: the options that make a method learned (dpcknn's study default merge, dpcknn.py:150-157)
LEARNED_OPTIONS = {"dpcknn": {"merge": "learned"}}
#: tokvis's former soft variants, kept as named options: after the attention, mixing the residual-stream tokens
#: with rows of the assignment summing to 1 (the study's defaults are tested in test_study_rules_clustering.py)
FORMER = {
    "sit": {"placement": "after_attn"},
    "patchmerger": {"placement": "after_attn", "output": "residual"},
    "sinkhorn": {"placement": "after_attn", "output": "mean"},
}


def _quiet(method):
    """A method marked fitted, so that tests not about the warning see none."""
    method.mark_fitted(True)
    return method


@pytest.mark.parametrize("name", SOFT)
def test_soft_rows_sum_to_one_and_output_is_soft_product(name):
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    tokvis.patch(model, _quiet(create_method(name, **FORMER[name])), keep_rate=0.5, locations=[2])
    captured = {}
    h = model.blocks[2].register_forward_hook(lambda m, i, o: captured.update(inp=i[0], out=o))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    h.remove()
    d = trace.decision(2)
    assert d.soft.shape == (3, 32, 64)
    torch.testing.assert_close(d.soft.sum(-1), torch.ones(3, 32, dtype=torch.float64))
    assert bool((d.soft >= 0).all())
    # dst is the arg-max slot of each input; keep marks the top contributor of that slot
    assert torch.equal(d.dst, d.soft.argmax(1))
    top = d.soft.argmax(2)
    for b in range(3):
        for i in range(64):
            assert bool(d.keep[b, i]) == (int(top[b, d.dst[b, i]]) == i)
    # the block's output is the block applied to soft @ tokens (independent path through the plain block)
    ref = make_model(dtype=torch.float64).blocks[2]
    with torch.no_grad():
        inp = captured["inp"]
        hh = inp + ref.attn(ref.norm1(inp))
        y = torch.cat([hh[:, :1], d.soft @ hh[:, 1:]], 1)
        y = y + ref.mlp(ref.norm2(y))
    torch.testing.assert_close(captured["out"], y)


def test_dynamicvit_keeps_top_predicted_and_runs_before_block():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    method = _quiet(create_method("dynamicvit"))
    tokvis.patch(model, method, keep_rate=0.5, locations=[2])
    captured = {}
    h = model.blocks[2].register_forward_hook(lambda m, i, o: captured.update(inp=i[0], out=o))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    h.remove()
    d = trace.decision(2)
    with torch.no_grad():
        score = method.reducers["2"](captured["inp"][:, 1:])
    torch.testing.assert_close(d.score, score)
    top = score.topk(32, dim=1).indices
    assert torch.equal(d.keep, torch.zeros_like(d.keep).scatter_(1, top, True))
    ref = make_model(dtype=torch.float64).blocks[2]
    kept = captured["inp"][:, 1:][d.keep].reshape(3, 32, -1)
    with torch.no_grad():
        expect = ref(torch.cat([captured["inp"][:, :1], kept], 1))
    torch.testing.assert_close(captured["out"], expect)


def _slow_sinkhorn(scores, eps, iters):
    """Plain (not log-domain) Sinkhorn-Knopp in float64 numpy, one image at a time."""
    out = []
    for s in scores.astype(np.float64):
        n, k = s.shape
        kern = np.exp(s / eps)
        u, v = np.ones(n), np.ones(k)
        for _ in range(iters):
            for i in range(n):
                u[i] = (1.0 / n) / sum(kern[i, j] * v[j] for j in range(k))
            for j in range(k):
                v[j] = (1.0 / k) / sum(kern[i, j] * u[i] for i in range(n))
        out.append(u[:, None] * kern * v[None, :])
    return np.stack(out)


@pytest.mark.parametrize("eps,iters", [(1.0, 3), (0.1, 5), (0.05, 1)])
def test_log_sinkhorn_matches_slow_loop(eps, iters):
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 12, 5, generator=g, dtype=torch.float64) * 2 - 1
    plan = log_sinkhorn(scores, eps=eps, iters=iters)
    np.testing.assert_allclose(plan.numpy(), _slow_sinkhorn(scores.numpy(), eps, iters), rtol=1e-9, atol=1e-12)


def test_sinkhorn_marginals():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    method = _quiet(create_method("sinkhorn", eps=0.5, iters=50, **FORMER["sinkhorn"]))
    tokvis.patch(model, method, keep_rate=0.5, locations=[1])
    cap = {}
    h = model.blocks[1].register_forward_hook(lambda m, i, o: cap.update(inp=i[0]))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
        h.remove()
        blk = model.blocks[1]
        tokens = cap["inp"] + blk.attn(blk.norm1(cap["inp"]))
        c = torch.nn.functional.normalize(method.reducers["1"].centres, dim=-1)
        plan = log_sinkhorn(torch.nn.functional.normalize(tokens[:, 1:], dim=-1) @ c.t(), eps=0.5, iters=50)
    # the plan's marginals: every token 1/n, every slot 1/K
    torch.testing.assert_close(plan.sum(2), torch.full((3, 64), 1 / 64, dtype=torch.float64), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(plan.sum(1), torch.full((3, 32), 1 / 32, dtype=torch.float64))
    # the recorded soft assignment is the plan normalised per slot
    torch.testing.assert_close(trace.decision(1).soft, plan.transpose(1, 2) * 32)


@pytest.mark.parametrize("name", [*LEARNED, "dpcknn"])
def test_state_dict_round_trip(name, tmp_path):
    model, x = make_model(), make_images()
    opts = LEARNED_OPTIONS.get(name, {})
    method = create_method(name, seed=3, **opts)
    tokvis.patch(model, _quiet(method), keep_rate=0.5)
    with torch.no_grad():
        for p in method.parameters():  # move away from the seeded init so a reload must really load
            p.add_(0.1 * torch.randn_like(p))
        out, trace = tokvis.run_with_trace(model, x)
    # through a plain state dict into a fresh method (parameters created from the shapes)
    fresh = create_method(name, seed=99, **opts)
    fresh.load_state_dict(method.state_dict())
    assert fresh.is_fitted
    tokvis.patch(model, fresh, keep_rate=0.5)
    with torch.no_grad():
        out2, trace2 = tokvis.run_with_trace(model, x)
    assert torch.equal(out, out2)
    for a, b in zip(trace.decisions, trace2.decisions, strict=True):
        assert torch.equal(a.dst, b.dst)
    # through a file
    fitting.save_method(method, tmp_path / "m.safetensors")
    loaded = fitting.load_method(tmp_path / "m.safetensors")
    assert loaded.options() == method.options()
    tokvis.patch(model, loaded, keep_rate=0.5)
    with torch.no_grad():
        assert torch.equal(model(x), out)
    # a fresh method with a different seed gives different outputs (the test can fail)
    tokvis.patch(model, _quiet(create_method(name, seed=99, **opts)), keep_rate=0.5)
    with torch.no_grad():
        assert not torch.equal(model(x), out)


def test_seeded_init_is_deterministic():
    model, x = make_model(), make_images()
    outs = []
    for _ in range(2):
        tokvis.patch(model, _quiet(create_method("sit", seed=5)), keep_rate=0.5)
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1])


def _study_state_dict(name, dim, counts):
    """The study model's state dict, from a plain description of its parameter names (not its code):

    - DynamicViT: ``score_predictor`` (dyvit.py:180-182), a ModuleList of PredictorLG (dyvit.py:94-110):
      ``in_conv`` = Sequential(LayerNorm, Linear(C, C), GELU), ``out_conv`` = Sequential(Linear(C, C/2),
      GELU, Linear(C/2, C/4), GELU, Linear(C/4, 2), LogSoftmax); saved from DataParallel (``module.``);
    - SiT: ``cluster_layers`` (sit.py:86) of TokenSlimmingModule (sit.py:28-34): ``weight`` =
      Sequential(LayerNorm, Linear(C, C/2), GELU, Linear(C/2, K)), ``scale`` of shape [1, 1, 1];
    - PatchMerger: ``cluster_layers`` (patchmerger.py:85): ``norm`` LayerNorm, ``queries`` [K, C] (:32-33);
    - Sinkhorn: ``cluster_layers`` (sinkhorn.py:134): ``v`` [K, C] (:62);
    - DPC-KNN (learned merge): ``cluster_layers`` (dpcknn.py:220) of CTM: ``score`` = Linear(C, 1) (:151).
    """
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"cls_token": r(1, 1, dim), "blocks.0.norm1.weight": r(dim)}  # backbone tensors are ignored
    for i, k in enumerate(counts):
        if name == "dynamicvit":
            p = f"module.score_predictor.{i}."
            shapes = {"in_conv.0": (dim, None), "in_conv.1": (dim, dim), "out_conv.0": (dim // 2, dim)}
            shapes.update({"out_conv.2": (dim // 4, dim // 2), "out_conv.4": (2, dim // 4)})
            for mod, (o, n_in) in shapes.items():
                sd[p + mod + ".weight"] = r(o) if n_in is None else r(o, n_in)
                sd[p + mod + ".bias"] = r(o)
        elif name == "sit":
            p = f"cluster_layers.{i}."
            sd.update({p + "weight.0.weight": r(dim), p + "weight.0.bias": r(dim)})
            sd.update({p + "weight.1.weight": r(dim // 2, dim), p + "weight.1.bias": r(dim // 2)})
            sd.update({p + "weight.3.weight": r(k, dim // 2), p + "weight.3.bias": r(k)})
            sd[p + "scale"] = torch.full((1, 1, 1), 1.5)
        elif name == "patchmerger":
            p = f"cluster_layers.{i}."
            sd.update({p + "norm.weight": r(dim), p + "norm.bias": r(dim), p + "queries": r(k, dim)})
        elif name == "dpcknn":
            p = f"cluster_layers.{i}."
            sd.update({p + "score.weight": 0.05 * r(1, dim), p + "score.bias": r(1)})
        else:
            sd[f"cluster_layers.{i}.v"] = r(k, dim)
    return sd


@pytest.mark.parametrize("name", [*LEARNED, "dpcknn"])
def test_load_study_checkpoint(name):
    counts = [32, 16, 8]
    sd = _study_state_dict(name, 64, counts)
    method = create_method(name, **LEARNED_OPTIONS.get(name, {}))
    method = load_study_checkpoint(method, {"model": sd}, locations=[1, 3, 4])
    assert method.is_fitted
    assert sorted(method.reducers) == ["1", "3", "4"]
    # spot checks of the mapping
    if name == "dynamicvit":
        assert torch.equal(method.reducers["3"].fc2.weight, sd["module.score_predictor.1.out_conv.2.weight"])
    elif name == "sit":
        assert torch.equal(method.reducers["4"].fc2.weight, sd["cluster_layers.2.weight.3.weight"])
        assert method.reducers["1"].scale.item() == 1.5
    elif name == "patchmerger":
        assert torch.equal(method.reducers["3"].queries, sd["cluster_layers.1.queries"])
    elif name == "dpcknn":
        assert torch.equal(method.reducers["4"].weight, sd["cluster_layers.2.score.weight"])
        assert torch.equal(method.reducers["1"].bias, sd["cluster_layers.0.score.bias"])
    else:
        assert torch.equal(method.reducers["1"].centres, sd["cluster_layers.0.v"])
    model, x = make_model(), make_images()
    tokvis.patch(model, method, keep_rate=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded: no "random until fitted" warning
        _, trace = tokvis.run_with_trace(model, x)
    assert [d.n_out for d in trace.decisions] == counts


def test_load_study_checkpoint_errors():
    with pytest.raises(WeightsError, match="no tensor named cluster_layers"):
        load_study_checkpoint(create_method("sit"), {"blocks.0.norm1.weight": torch.ones(4)})
    sd = _study_state_dict("sinkhorn", 64, [32, 16, 8])
    with pytest.raises(WeightsError, match="reduction location 2"):
        load_study_checkpoint(create_method("sinkhorn"), sd, locations=[1, 3])
    with pytest.raises(MethodOptionError):
        load_study_checkpoint(create_method("topk"), sd)
    with pytest.raises(MethodOptionError, match="merge='learned'"):  # the parameter-free --equal_weight mode
        load_study_checkpoint(create_method("dpcknn"), _study_state_dict("dpcknn", 64, [32]))


def test_slot_count_mismatch_is_an_error():
    model, x = make_model(), make_images()
    method = _quiet(create_method("patchmerger"))
    tokvis.patch(model, method, keep_rate=0.5)
    with torch.no_grad():
        model(x)
    tokvis.patch(model, method, keep_rate=0.7)
    with pytest.raises(tokvis.errors.TokvisError, match="output slots"):
        model(x)


@pytest.mark.parametrize("name", LEARNED)
def test_unfitted_method_warns_once(name):
    model, x = make_model(), make_images()
    method = create_method(name)
    tokvis.patch(model, method, keep_rate=0.5)
    with pytest.warns(UserWarning, match="random until fitted"):
        with torch.no_grad():
            model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)  # once per method object


@pytest.mark.parametrize(
    "name,kw",
    [
        ("sit", {"hidden_ratio": 0}),
        ("sit", {"hidden_ratio": "half"}),
        ("sinkhorn", {"eps": 0}),
        ("sinkhorn", {"eps": -1.0}),
        ("sinkhorn", {"iters": 0}),
        ("sinkhorn", {"iters": 2.5}),
        ("patchmerger", {"scaled": "yes"}),
        ("dynamicvit", {"seed": -1}),
        ("dynamicvit", {"seed": 1.5}),
        ("sit", {"unknown": 1}),
    ],
)
def test_bad_options(name, kw):
    with pytest.raises(MethodOptionError):
        create_method(name, **kw)


def test_fit_bad_inputs():
    model, x = make_model(), make_images(n=4)
    with pytest.raises(MethodOptionError, match="no learned parameters"):
        tokvis.fit(model, "topk", x, keep_rate=0.5)
    with pytest.raises(MethodOptionError, match="epochs"):
        tokvis.fit(model, "sit", x, keep_rate=0.5, epochs=0)
    with pytest.raises(MethodOptionError, match="lr"):
        tokvis.fit(model, "sit", x, keep_rate=0.5, lr=-1.0)
    with pytest.raises(MethodOptionError, match="images"):
        tokvis.fit(model, "sit", x[0], keep_rate=0.5)
    with pytest.raises(MethodOptionError, match="reduces nothing"):
        tokvis.fit(model, "sit", x, keep_rate=1.0, progress=False)
    assert not tokvis.is_patched(model)
    with pytest.raises(WeightsError):
        fitting.load_method("does/not/exist.safetensors")


@pytest.mark.parametrize("name", LEARNED)
def test_fit_lowers_held_out_loss(name):
    torch.manual_seed(0)
    model = make_model()
    train, held = make_images(n=32, seed=1), make_images(n=12, seed=2)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    method = create_method(name, seed=0, **({"eps": 0.1} if name == "sinkhorn" else {}))
    before = fitting.distillation_loss(model, method, held, keep_rate=0.5)
    fitted = tokvis.fit(model, method, train, keep_rate=0.5, epochs=4, lr=1e-2, batch_size=8, progress=False)
    after = fitting.distillation_loss(model, fitted, held, keep_rate=0.5)
    assert fitted is method and method.is_fitted and not method._fitting
    assert after < before, (before, after)
    assert not tokvis.is_patched(model)
    # the backbone is untouched and its flags restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, frozen[k])
    assert all(p.requires_grad for p in model.parameters())
    assert len(method.fit_info["epoch_losses"]) == 4


# -- soft keep (LayerDecision.size_scale) and DynamicViT's own fitting scheme ------------------------


def _loop_sizes(size, d, num_prefix):
    """Reference output sizes of a hard or soft decision with ``size_scale``, one token at a time."""
    B, n_in = d.dst.shape
    out = torch.zeros(B, num_prefix + d.n_out, dtype=size.dtype)
    out[:, :num_prefix] = size[:, :num_prefix]
    for b in range(B):
        for i in range(n_in):
            s = size[b, num_prefix + i] * (1.0 if d.size_scale is None else d.size_scale[b, i])
            if d.soft is not None:
                for j in range(d.n_out):
                    out[b, num_prefix + j] += d.soft[b, j, i] * s
            elif d.dst[b, i] >= 0:
                out[b, num_prefix + int(d.dst[b, i])] += s
    return out


def _decisions_with_size_scale(B=2, n=6, seed=0):
    from tokvis.trace import LayerDecision

    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(B, n, generator=g, dtype=torch.float64)
    ar = torch.arange(n).expand(B, n).clone()
    dst = torch.tensor([[0, -1, 1, 2, -1, 3], [-1, 0, 1, -1, 2, 3]])
    soft = torch.rand(B, 3, n, generator=g, dtype=torch.float64).softmax(1)
    identity = LayerDecision(0, "prune", ar, torch.ones(B, n, dtype=torch.bool), n_out=n, size_scale=scale)
    if n != 6:
        return [identity]
    return [
        identity,
        LayerDecision(0, "prune", dst, dst >= 0, n_out=4, size_scale=scale),
        LayerDecision(
            0,
            "merge",
            torch.tensor([[0, 0, 1, 1, 2, 2]] * B),
            torch.ones(B, n, dtype=torch.bool),
            n_out=3,
            size_scale=scale,
        ),  # fmt: skip
        LayerDecision(
            0, "soft", soft.argmax(1), torch.ones(B, n, dtype=torch.bool), n_out=3, soft=soft, size_scale=scale
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("which", range(4))
def test_size_scale_in_apply_decision_matches_loop(which):
    from tokvis.methods.ops import apply_decision

    d = _decisions_with_size_scale()[which]
    B, n = d.dst.shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1 + n, 5, generator=g, dtype=torch.float64)
    size = 1 + torch.rand(B, 1 + n, generator=g, dtype=torch.float64)
    size[:, 0] = 1
    out, new_size = apply_decision(x, size, d, num_prefix=1)
    torch.testing.assert_close(new_size, _loop_sizes(size, d, 1))
    # the tokens themselves ignore size_scale
    plain, _ = apply_decision(x, size, dataclasses.replace(d, size_scale=None), num_prefix=1)
    torch.testing.assert_close(out, plain)
    if which == 0:  # identity: the tokens pass through unchanged
        assert torch.equal(out, x)


def test_size_scale_round_trips_through_trace_files(tmp_path):
    from tokvis.trace import Trace, TraceMeta, load_trace

    d = _decisions_with_size_scale(n=4 * 4)[0]
    meta = TraceMeta(grid_size=(4, 4), num_prefix_tokens=1, depth=4)
    trace = Trace([dataclasses.replace(d, layer=1)], meta)
    loaded = load_trace(trace.save(tmp_path / "t.safetensors"))
    assert torch.equal(loaded.decision(1).size_scale, d.size_scale)
    both = Trace.concat([trace, loaded])
    assert torch.equal(both.decision(1).size_scale, torch.cat([d.size_scale, d.size_scale]))
    assert torch.equal(trace.decisions[0].index([1]).size_scale, d.size_scale[[1]])
    assert trace.decisions[0].to("cpu").size_scale is not None


def _fitting_forward(model, method, x, **schedule):
    """Forward in DynamicViT's fitting mode (gradients on); returns the output and the trace."""
    tokvis.patch(model, method, **schedule)
    method._fitting = True
    try:
        out, trace = tokvis.run_with_trace(model, x, grad=True)
    finally:
        method._fitting = False
        tokvis.unpatch(model)
    return out, trace


def test_dynamicvit_fitting_mode_keeps_all_and_masks_the_attention(monkeypatch):
    from tokvis.methods.dynamicvit import DynamicViT

    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    method = _quiet(create_method("dynamicvit"))
    assert not method.proportional_attention
    out, trace = _fitting_forward(model, method, x, keep_rate=0.5, locations=[1, 3])
    for d in trace.decisions:
        assert d.kind == "prune" and d.n_out == d.n_in == 64 and bool(d.keep.all())
        assert torch.equal(d.dst, torch.arange(64).expand(3, 64))
        assert d.size_scale is not None and bool((d.size_scale > 0).all() and (d.size_scale < 1).all())
    assert not torch.allclose(out, ref, atol=1e-4)  # later attention sees log(size)
    aux = method.auxiliary_loss()
    assert aux is not None and aux.requires_grad and method.auxiliary_loss() is None  # cleared when read
    # without the log(size) logits the soft keep changes nothing: the tokens pass through
    monkeypatch.setattr(DynamicViT, "proportional_attention", property(lambda self: False))
    out_plain, _ = _fitting_forward(model, method, x, keep_rate=0.5, locations=[1, 3])
    torch.testing.assert_close(out_plain, ref)
    monkeypatch.undo()
    # a mask of ones gives the unpatched output
    with torch.no_grad():
        for mod in method.reducers.values():
            mod.fc3.bias.copy_(torch.tensor([60.0, -60.0], dtype=torch.float64))
    out_ones, trace = _fitting_forward(model, method, x, keep_rate=0.5, locations=[1, 3])
    assert all(bool((d.size_scale == 1).all()) for d in trace.decisions)
    torch.testing.assert_close(out_ones, ref)
    # at inference nothing changed: hard top-k of the keep log-probability
    tokvis.patch(model, method, keep_rate=0.5, locations=[1, 3])
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    tokvis.unpatch(model)
    assert [d.n_out for d in trace.decisions] == [32, 16] and all(d.size_scale is None for d in trace.decisions)


def test_dynamicvit_ratio_loss():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    # a huge temperature makes every mask entry 0.5 (up to 1e-11)
    method = create_method("dynamicvit", tau=1e12)
    _fitting_forward(model, method, x, keep_rate=0.5, locations=[2])
    assert float(method.auxiliary_loss().detach()) < 1e-15  # mask mean == target / n_patches
    method = create_method("dynamicvit", tau=1e12, ratio_weight=3.0)
    _fitting_forward(model, method, x, keep_rate=0.25, locations=[2])
    assert float(method.auxiliary_loss().detach()) == pytest.approx(3.0 * 0.25**2)
    # two stages: the masks compound (0.5 * 0.5) and meet the cumulative target 0.5**2
    method = create_method("dynamicvit", tau=1e12)
    _fitting_forward(model, method, x, keep_rate=0.5, locations=[1, 3])
    assert float(method.auxiliary_loss().detach()) < 1e-15


def test_dynamicvit_fit_moves_the_mask_towards_the_target():
    # (that fitting lowers the held-out loss is test_fit_lowers_held_out_loss)
    torch.manual_seed(0)
    model = make_model()
    train, held = make_images(n=32, seed=1), make_images(n=12, seed=2)
    method = create_method("dynamicvit", seed=0)

    def mean_mask():
        _, trace = _fitting_forward(model, method, held, keep_rate=0.25, locations=[2])
        method.auxiliary_loss()
        return float(trace.decision(2).size_scale.mean())

    before = mean_mask()
    tokvis.fit(model, method, train, keep_rate=0.25, locations=[2], epochs=4, lr=1e-2, batch_size=8, progress=False)
    after = mean_mask()
    assert abs(after - 0.25) < abs(before - 0.25) - 0.05, (before, after)


def test_fit_uses_the_methods_default_learning_rate():
    """Without lr=, tokvis.fit takes the method's fit_lr (PatchMerger needs a larger step than the others)."""
    import tokvis
    from tokvis.methods import get_method_class

    assert get_method_class("patchmerger").fit_lr > get_method_class("sit").fit_lr
    model = make_model()
    images = make_images(n=4)
    fitted = tokvis.fit(model, "patchmerger", images, keep_rate=0.5, epochs=1, batch_size=4, progress=False)
    assert fitted.fit_info["lr"] == get_method_class("patchmerger").fit_lr
    fitted = tokvis.fit(model, "sit", images, keep_rate=0.5, epochs=1, batch_size=4, progress=False, lr=0.5)
    assert fitted.fit_info["lr"] == 0.5


def test_fit_works_under_no_grad():
    """tokvis.fit turns autograd on for its own steps (a caller's no_grad, or a command that switched it off)."""
    import torch

    import tokvis

    model, images = make_model(), make_images(n=4)
    with torch.no_grad():
        fitted = tokvis.fit(model, "sit", images, keep_rate=0.5, epochs=1, batch_size=4, progress=False)
    losses = fitted.fit_info["epoch_losses"]
    assert len(losses) == 1 and losses[0] > 0


@pytest.mark.parametrize("name", SOFT)
def test_a_method_file_from_before_the_study_options_loads_as_fitted(name, tmp_path):
    """A file whose options predate ``placement`` / ``output`` was fitted with the former behaviour."""
    import json

    from safetensors.torch import save_file

    method = _quiet(create_method(name, seed=3, **FORMER[name]))
    model, x = make_model(), make_images()
    tokvis.patch(model, method, keep_rate=0.5)
    with torch.no_grad():
        out = model(x)
    old = {k: v for k, v in method.options().items() if k not in ("placement", "output")}
    # such a file predates content checksums too: method-file version 1
    meta = {"format": fitting.METHOD_FORMAT, "version": "1", "method": name}
    meta.update(options=json.dumps(old), fit_info="null")
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(tmp_path / "old.safetensors"), meta)
    loaded = fitting.load_method(tmp_path / "old.safetensors")
    assert loaded.options() == method.options()
    tokvis.patch(model, loaded, keep_rate=0.5)
    with torch.no_grad():
        assert torch.equal(model(x), out)
    # a file that names the options keeps them
    fitting.save_method(create_method(name, seed=3), tmp_path / "new.safetensors")
    assert fitting.load_method(tmp_path / "new.safetensors").options() == create_method(name, seed=3).options()
