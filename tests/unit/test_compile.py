"""``torch.compile`` on a patched model (issue 12 §3): fixed schedules have static shapes; the compiled
model's outputs equal eager's within float tolerance and its partitions (recorded eagerly on the same
input) are the ones eager makes.  Slow: compiling takes tens of seconds on the CPU."""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.invariants import METHOD_MATRIX, method_for
from tests.models import make_images, make_model

pytestmark = pytest.mark.slow

NO_BREAK_CASES = [pytest.param(n, METHOD_MATRIX[n].schedules[0], id=n) for n in sorted(METHOD_MATRIX)] + [
    pytest.param("tome", {"keep_rate": 0.5}, id="tome-keep-rate"),  # several matching rounds per block
    pytest.param("vomix", {"r": 4, "residual": "mix"}, id="vomix-mix"),
    # 64 patches halve to 1 by block 6: the last blocks keep every token (the CPU's identity shortcut reads a
    # value on the host, so it is skipped under torch.compile)
    pytest.param("tome", {"r": 32}, id="tome-down-to-one-token"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean dynamo state.  Compiles of the same code objects earlier in the process
    (other tests, other shapes) make dynamo recompile with automatic dynamic shapes, where torch 2.14's guard
    builder can fail with an IndexError (symbolic_shapes.produce_guards_verbose): a torch fault that depends on
    test order, not on tokvis."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "method,kw",
    [("tome", {"r": 4}), ("topk", {"keep_rate": 0.5}), ("evit", {"keep_rate": 0.7}), ("ats", {"keep_rate": 0.5})],
)
def test_compiled_patched_model_equals_eager(method, kw):
    model, x = make_model("cls"), make_images("cls", n=2)
    tokvis.patch(model, method, **kw)
    with torch.no_grad():
        eager = model(x)
        try:
            compiled = torch.compile(model)
            out = compiled(x)
            out2 = compiled(x)  # the cached graph
        except Exception as e:  # inductor needs a C compiler
            if "compiler" in str(e).lower() or "cc" in type(e).__name__.lower():
                pytest.skip(f"torch.compile unavailable here: {e}")
            raise
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out2, eager, atol=1e-4, rtol=1e-4)
    # the reduction really happened inside the compiled model: its output differs from the unpatched one
    tokvis.unpatch(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), out, atol=1e-4)


@pytest.mark.parametrize("name,kw", NO_BREAK_CASES)
def test_every_method_traced_by_dynamo_and_aot_autograd_equals_eager(name, kw):
    """Every method through dynamo and AOTAutograd (``backend="aot_eager"``: the graph capture and
    functionalisation inductor works from, without its code generation, so fast enough for every method):
    outputs equal eager's within float tolerance, and the partitions recorded from the compiled model are
    eager's.  The inductor cases above cover the code generation."""
    model, x = make_model("cls"), make_images("cls", n=2)
    obj, sched = method_for(name, kw)
    tokvis.patch(model, obj, **sched)
    with torch.no_grad():  # method_for marks learned methods fitted: nothing warns, and no warning is hidden
        eager, ref = tokvis.run_with_trace(model, x)
        compiled = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=True)
        out = compiled(x)
        with tokvis.record(model) as rec:
            compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    trace = rec.trace
    assert trace.layers == ref.layers
    for layer in ref.layers:
        assert torch.equal(trace.labels(layer), ref.labels(layer)), f"{name}: block {layer}"


def test_recording_a_compiled_model_gives_the_eager_partitions():
    model, x = make_model("cls"), make_images("cls", n=2)
    tokvis.patch(model, "tome", r=4)
    with torch.no_grad():
        _, ref = tokvis.run_with_trace(model, x)
        compiled = torch.compile(model)
        compiled(x)
        with tokvis.record(model) as rec:
            compiled(x)
    trace = rec.trace
    assert trace.layers == ref.layers
    for layer in ref.layers:
        assert torch.equal(trace.labels(layer), ref.labels(layer))


@pytest.mark.parametrize("name,kw", NO_BREAK_CASES)
def test_no_graph_break_in_a_patched_forward(name, kw):
    """The whole patched forward of every method is one graph.  What used to break it: the input check's host
    read; ATS's data-dependent token count; a strided ``out=`` tensor in ToMe's and MCTF's matching and in the
    merge; VoMix's tie-break permutation (a ``torch.Generator``); the learned methods' unfitted warning and
    ``state_dict()`` shape check.  A learned method creates its seeded per-block modules on its first forward
    (untraceable, so compiled: a break once, then a recompile), hence the eager forward first."""
    import torch._dynamo

    model, x = make_model("cls"), make_images("cls", n=2)
    obj, sched = method_for(name, kw)
    tokvis.patch(model, obj, **sched)
    with torch.no_grad():  # method_for marks learned methods fitted: no "unfitted" warning
        model(x)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
