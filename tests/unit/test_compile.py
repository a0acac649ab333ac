"""``torch.compile`` on a patched model (issue 12 §3): fixed schedules have static shapes; the compiled
model's outputs equal eager's within float tolerance and its partitions (recorded eagerly on the same
input) are the ones eager makes.  Slow: compiling takes tens of seconds on the CPU."""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.models import make_images, make_model

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("method", ["topk", "ats"])
def test_no_graph_break_in_a_patched_forward(method):
    """The whole patched forward is one graph (the input check's host read used to break it; ATS's
    data-dependent token count did, before it padded to its fixed budget)."""
    import torch._dynamo

    model, x = make_model("cls"), make_images("cls", n=2)
    tokvis.patch(model, method, keep_rate=0.5)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
