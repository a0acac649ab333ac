"""Mixed precision (issue 12 §1): every registered method under bf16 autocast on the CPU, on ``.bfloat16()``
and ``.half()`` models; decision maths (matching similarities, distances, merge sums, class-token row,
token sizes) in float32.

The same tests run on CUDA (fp16 and bf16 autocast too) with ``TOKVIS_TEST_DEVICE=cuda``
(``benchmarks/gpu_check.sh``); on a machine without CUDA the CUDA cases are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import tokvis
from tests.invariants import METHOD_MATRIX, block_token_counts, expected_counts, method_for
from tests.models import make_images, make_model
from tokvis.methods.ops import apply_decision, bipartite_matching, decision_dtype, merge_mean
from tokvis.trace import LayerDecision

DEVICE = os.environ.get("TOKVIS_TEST_DEVICE", "cpu")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TOKVIS_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)

# (mode, dtype): "autocast" runs the float32 model under torch.autocast; "model" converts the model and images
# fp16 CPU kernels are slow: the .half() cases run with the slow tests (and on CUDA)
_HALF = pytest.param("model", torch.float16, marks=() if DEVICE == "cuda" else pytest.mark.slow)
MODES = [("autocast", torch.bfloat16), ("model", torch.bfloat16), _HALF]
if DEVICE == "cuda":
    MODES.append(("autocast", torch.float16))

#: per method the first schedule of the matrix (and its own conventions)
CASES = [(name, METHOD_MATRIX[name].schedules[0]) for name in sorted(METHOD_MATRIX)]

# (method, mode, dtype) -> fraction of patches whose final label differs from float32, for the report
AGREEMENT: dict[tuple, float] = {}
# (mode, dtype) -> relative error of the *unpatched* model against float32: the precision's own error
BASELINE: dict[tuple, float] = {}


def _run(name, kw, mode, dtype):
    model, x = make_model("cls").to(DEVICE), make_images("cls", n=4).to(DEVICE)
    obj, sched = method_for(name, kw)
    with torch.no_grad():
        base_ref = model(x)
        with torch.autocast(DEVICE, dtype=dtype, enabled=mode == "autocast"):
            base = model.to(dtype if mode == "model" else torch.float32)(x.to(dtype) if mode == "model" else x)
        model.float()
        BASELINE[(mode, str(dtype))] = ((base.float() - base_ref).norm() / base_ref.norm()).item()
    tokvis.patch(model, obj, **sched)
    with torch.no_grad():
        ref, ref_trace = tokvis.run_with_trace(model, x)
        if mode == "autocast":
            with torch.autocast(DEVICE, dtype=dtype):
                out, trace = tokvis.run_with_trace(model, x)
                counts = block_token_counts(model, x)
        else:
            model.to(dtype)
            out, trace = tokvis.run_with_trace(model, x.to(dtype))
            counts = block_token_counts(model, x.to(dtype))
    return ref, ref_trace, out, trace, counts


@pytest.mark.parametrize("mode,dtype", MODES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name,kw", CASES, ids=[n for n, _ in CASES])
def test_method_runs_in_low_precision(name, kw, mode, dtype):
    ref, ref_trace, out, trace, counts = _run(name, kw, mode, dtype)
    # follows the schedule
    expect = expected_counts(name, kw, 64, 6)
    assert counts == expect, (counts, expect)  # adaptive methods (ATS) too: padded to the budget
    assert trace.layers == ref_trace.layers
    # agrees with float32 up to the precision (partitions may differ: measured, not asserted identical)
    assert torch.isfinite(out.float()).all()
    err = (out.float() - ref).norm() / ref.norm()
    base = BASELINE[(mode, str(dtype))]
    last = trace.layers[-1]
    differ = (trace.kept(last) != ref_trace.kept(last)).float().mean().item()
    AGREEMENT[(name, mode, str(dtype))] = (differ, err.item(), base)
    same = all(torch.equal(trace.labels(layer), ref_trace.labels(layer)) for layer in ref_trace.layers)
    if same:  # the same partitions: the output differs by the precision's own rounding only
        assert err < max(0.05, 4 * base), f"{name} {mode} {dtype}: relative error {err:.3f} (unpatched: {base:.3f})"
    else:  # partitions flipped on near-ties (random-init scorers): loose, but never garbage
        assert err < 0.6, f"{name} {mode} {dtype}: relative error {err:.3f} (unpatched: {base:.3f})"
    # the decisions a recorder stores are float32 / int64 / bool whatever the model's precision
    for d in trace.decisions:
        assert d.dst.dtype == torch.int64 and d.keep.dtype == torch.bool


def test_deterministic_partitions_mostly_agree_under_bf16_autocast():
    """Decision maths in float32: deterministic ToMe / Top-K partitions under bf16 autocast mostly agree
    with float32's (the tokens themselves are bf16, so not bit for bit)."""
    for name, kw in (("tome", {"r": 5}), ("topk", {"keep_rate": 0.7})):
        _, ref_trace, _, trace, _ = _run(name, kw, "autocast", torch.bfloat16)
        for layer in ref_trace.layers:
            same = (trace.kept(layer) == ref_trace.kept(layer)).float().mean().item()
            assert same > 0.6, f"{name} block {layer}: only {same:.2f} of the patches agree with float32"


def test_merge_mean_mixed_dtypes_sums_in_float32():
    """bf16 tokens with float32 sizes (ToMe's metric merge under autocast) crashed in scatter_add_."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 10, 8, generator=g)
    w = torch.rand(2, 10, generator=g) + 0.5
    dst = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3, -1, 4]] * 2)
    ref = merge_mean(v.double(), dst, 5, w.double())
    out = merge_mean(v.bfloat16(), dst, 5, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    # float32 accumulation: many small contributions are not lost (a bf16 running sum would lose them)
    many = torch.full((1, 4096, 1), 1.0, dtype=torch.bfloat16)
    many[0, 0, 0] = 256.0
    total = merge_mean(many, torch.zeros(1, 4096, dtype=torch.long), 1, torch.ones(1, 4096))
    assert total.item() == pytest.approx((256 + 4095) / 4096, rel=1e-2)


def test_decision_maths_dtype():
    assert decision_dtype(torch.float16) == torch.float32
    assert decision_dtype(torch.bfloat16, torch.float32) == torch.float32
    assert decision_dtype(torch.float64) == torch.float64


def test_matching_of_bf16_metric_equals_float32_matching_of_the_same_values():
    """The similarities are computed in float32: matching bf16 keys equals matching their float32 values."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(3, 40, 16, generator=g).bfloat16()
    dst16, keep16 = bipartite_matching(m, 10, num_prefix=1)
    dst32, keep32 = bipartite_matching(m.float(), 10, num_prefix=1)
    assert torch.equal(dst16, dst32) and torch.equal(keep16, keep32)


@pytest.mark.parametrize(
    "name,kw", [("tome", {"r": 8}), ("kmedoids", {"keep_rate": 0.5}), ("topk", {"keep_rate": 0.5})]
)
def test_decisions_under_autocast_equal_float32_maths_on_the_same_inputs(name, kw):
    """Under ``torch.autocast`` a method decides as it does in a bf16 model: from the block's own (bf16)
    keys and float32 tokens, with its float32 maths -- autocast does not lower them.  (It did: ToMe's
    similarity matmul ran in bf16 under autocast and changed the partition of nearly every image, where a
    ``.bfloat16()`` model kept most of them.)  Each decision is recomputed outside autocast from the inputs
    the method got, and must be the same."""
    from tokvis.methods.registry import get_method_class

    seen = []
    base = get_method_class(name)

    class Spy(base):
        def decide(self, ctx):
            seen.append(torch.is_autocast_enabled(ctx.x.device.type))
            d = super().decide(ctx)
            with torch.autocast(ctx.x.device.type, enabled=False):
                again = super().decide(ctx)
            assert torch.equal(d.dst, again.dst) and torch.equal(d.keep, again.keep), f"block {ctx.layer}"
            return d

    g = torch.Generator().manual_seed(0)
    model = make_model("cls").to(DEVICE)
    x = torch.randn(8, 3, *model.patch_embed.img_size, generator=g).to(DEVICE)
    tokvis.patch(model, Spy(), **kw)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(x)
    assert seen and not any(seen)  # decide ran, and never under autocast


def test_soft_decision_on_bf16_tokens_keeps_float32_sizes():
    x = torch.randn(2, 5, 4).bfloat16()
    size = torch.ones(2, 5)
    soft = torch.softmax(torch.randn(2, 2, 4), -1)
    d = LayerDecision(0, "soft", soft.argmax(1), torch.zeros(2, 4, dtype=torch.bool), n_out=2, soft=soft)
    out, new_size = apply_decision(x, size, d, num_prefix=1)
    assert out.dtype == torch.bfloat16 and new_size.dtype == torch.float32
    torch.testing.assert_close(new_size[:, 1:], (soft @ size[:, 1:, None]).squeeze(-1))


def teardown_module(module):
    if AGREEMENT:
        print(
            "\nmethod mode dtype: patches kept/merged otherwise than in float32 after the last reduction, "
            "relative output error (unpatched model's own error)"
        )
        for key, (v, e, b) in sorted(AGREEMENT.items()):
            print(f"  {key[0]:12s} {key[1]:9s} {key[2]:15s} {v:.3f}  {e:.3f} ({b:.3f})")


# -- tokvis record --amp fp16|bf16 -----------------------------------------------------------------


def test_record_run_with_bf16_autocast_on_cpu(tmp_path):
    """``--amp bf16`` records on the CPU (ToMe crashed under bf16 autocast); the run is complete."""
    from tests.unit.test_store import N_IMAGES, _record

    res, _ = _record(tmp_path, method="tome", amp="bf16")
    run = tokvis.load_run(res.path)
    assert run.num_images == N_IMAGES
    assert run.complete
    from tokvis.store.format import read_manifest

    assert "bf16" in json.dumps(read_manifest(res.path))


def test_amp_values():
    from tokvis.store import RunConfigError, RunSpec

    base = dict(backbone="b", method="tome", dataset="d", r=4)
    assert RunSpec(**base, amp="fp16").amp is True  # the former --amp: same run, same fingerprint
    assert RunSpec(**base, amp="bf16").amp == "bf16"
    with pytest.raises(RunConfigError, match="fp16 or bf16"):
        RunSpec(**base, amp="fp8")


def test_amp_fp16_on_cpu_says_use_bf16(tmp_path):
    from tests.unit.test_store import _record
    from tokvis.store import RunConfigError

    with pytest.raises(RunConfigError, match="--amp bf16"):
        _record(tmp_path, amp="fp16")


@pytest.mark.parametrize(
    "argv,amp", [([], False), (["--amp"], True), (["--amp", "fp16"], True), (["--amp", "bf16"], "bf16")]
)
def test_cli_amp_argument(argv, amp):
    from tokvis.cli import build_parser
    from tokvis.commands.record import _specs

    args = build_parser().parse_args(["record", "--model", "m", "--method", "tome", "--r", "4", *argv])
    assert [s.amp for s in _specs(args)] == [amp]


def test_cli_bad_amp_is_one_line(capsys):
    from tokvis.cli import main

    with pytest.raises(SystemExit) as e:
        main(["record", "--model", "m", "--method", "tome", "--r", "4", "--amp", "fp8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp8" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("name", ["dynamicvit", "sit", "patchmerger", "sinkhorn"])
def test_learned_modules_stay_float32_in_a_half_model(name):
    """A learned method's per-block modules keep float32 parameters and give float32 scores and assignments
    whatever the model's precision (half-precision scores tie: a bf16 model's unfitted DynamicViT kept other
    tokens than float32's on nearly every image); float64 models keep float64."""
    model, x = make_model("cls").to(DEVICE), make_images("cls", n=2).to(DEVICE)
    tokvis.patch(model, name, keep_rate=0.5)
    with torch.no_grad(), pytest.warns(UserWarning, match="neither fitted"):
        model(x)  # creates the modules
    method = model.tokvis_method
    for dtype, expect in (
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ):
        model.to(dtype)
        assert {p.dtype for p in method.reducers.parameters()} == {expect}, dtype
        assert next(model.blocks.parameters()).dtype == dtype  # the model itself did convert
        if dtype != torch.float16 or DEVICE == "cuda":  # fp16 CPU kernels are slow
            with torch.no_grad():
                out, trace = tokvis.run_with_trace(model, x.to(dtype))
            assert out.dtype == dtype and torch.isfinite(out).all()
            assert all(d.score is None or d.score.dtype == expect for d in trace.decisions)
    # bf16 tensors (a state dict saved in half precision elsewhere) load into a fresh method as float32
    fresh = type(method)()
    fresh.load_state_dict({k: v.bfloat16() if v.is_floating_point() else v for k, v in method.state_dict().items()})
    assert {p.dtype for p in fresh.reducers.parameters()} == {torch.float32}


@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast", "bf16-model"])
@pytest.mark.parametrize("name,module_name,head", [("dynamicvit", "dynamicvit", "fc3"), ("sit", "sit", "fc2")])
def test_learned_feature_layers_in_the_compute_dtype_and_ranked_outputs_in_float32(
    name, module_name, head, mode, monkeypatch
):
    """DynamicViT's score predictor and SiT's slot MLP run their feature layers in the model's compute dtype
    (bf16 under bf16 autocast or in a bf16 model: float32 matmuls there would cost a GPU about as much as two
    blocks per reduction for DynamicViT) and the layer whose outputs are ranked / normalised in float32
    (bf16 logits tie: DynamicViT's kept sets overlapped float32's at IoU 0.13 in a bf16 model; 0.91 with the
    float32 head, as with the whole predictor in float32)."""
    import importlib

    mod = importlib.import_module(f"tokvis.methods.{module_name}")
    attr = "_linear" if hasattr(mod, "_linear") else "linear_in"
    orig, seen = getattr(mod, attr), []

    def spy(layer, x, dtype):
        out = orig(layer, x, dtype)
        seen.append((layer, out.dtype))
        return out

    monkeypatch.setattr(mod, attr, spy)
    model, x = make_model("cls").to(DEVICE), make_images("cls", n=2).to(DEVICE)
    tokvis.patch(model, name, keep_rate=0.5)
    low = torch.float32 if mode == "fp32" else torch.bfloat16
    with torch.no_grad(), pytest.warns(UserWarning, match="neither fitted"):
        if mode == "bf16-model":
            model.to(torch.bfloat16)
            _, trace = tokvis.run_with_trace(model, x.to(torch.bfloat16))
        else:
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
                _, trace = tokvis.run_with_trace(model, x)
    heads = {id(getattr(m, head)) for m in model.tokvis_method.reducers.values()}
    assert seen and any(id(layer) in heads for layer, _ in seen) and any(id(layer) not in heads for layer, _ in seen)
    for layer, dtype in seen:
        assert dtype == (torch.float32 if id(layer) in heads else low), (layer, dtype)
    for d in trace.decisions:
        assert (d.score if d.soft is None else d.soft).dtype == torch.float32


def test_amp_context_is_the_runs_autocast():
    """Recording and evaluating a run share ``store.amp_context``: bf16 autocast on the CPU, nothing without
    amp, and fp16 on the CPU refused with what to do."""
    from tokvis.store import RunConfigError, RunSpec, amp_context

    spec = RunSpec(backbone="vit_tiny_patch16_224", method="tome", dataset="samples", keep_rate=0.5)
    with amp_context(spec, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with amp_context(dataclasses.replace(spec, amp="bf16"), "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(RunConfigError, match="--device cuda"):
        amp_context(dataclasses.replace(spec, amp="fp16"), "cpu")
