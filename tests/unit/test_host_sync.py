"""Recording without host syncs (issue 12 §2): a recorded forward makes no device-to-host copy and no other
host sync (``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``, ``nonzero``) before it returns; the
decisions reach the host once per forward, after it.

Two detectors: the meta device (tensors without values: every sync raises) and, on the CPU, counting the
Python-level sync calls between the model's entry (after the input check) and its return.
With ``TOKVIS_TEST_DEVICE=cuda`` the counting test also runs on CUDA (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import os

import pytest
import torch

import tokvis
from tests.invariants import METHOD_MATRIX, method_for
from tests.models import make_images, make_model

DEVICE = os.environ.get("TOKVIS_TEST_DEVICE", "cpu")

#: methods that still need a value on the host inside the forward, and why (strict xfail: fixing one fails
#: the test until it is removed from here)
SYNCING = {
    "ats": "adaptive: the number of output tokens (a Python int) is the data-dependent maximum over the batch",
    "dynamicvit": "_learned.Method.decide reads bool(self.fitted) (a device buffer) at every reducing block",
    "patchmerger": "_learned: bool(self.fitted) per reducing block",
    "sinkhorn": "_learned: bool(self.fitted) per reducing block",
    "sit": "_learned: bool(self.fitted) per reducing block",
}

CASES = [
    pytest.param(name, METHOD_MATRIX[name].schedules[0], id=name,
                 marks=pytest.mark.xfail(strict=True, reason=SYNCING[name]) if name in SYNCING else ())
    for name in sorted(METHOD_MATRIX)
] + [
    # VoMix's default (residual="drop") makes hard decisions; soft mixing applies them sparsely after
    # checking their structure on the host (ops._soft_apply)
    pytest.param("vomix", {"r": 4, "residual": "mix"}, id="vomix-mix",
                 marks=pytest.mark.xfail(strict=True, reason="ops._soft_apply checks the soft structure on the host")),
]  # fmt: skip


@pytest.mark.parametrize("name,kw", CASES)
def test_recorded_forward_on_meta_device_never_syncs(name, kw):
    """On the meta device ``.item()``, ``bool()``, ``.tolist()`` and copies to the CPU raise: a recorded
    forward that returns made none of them."""
    model, x = make_model("cls"), make_images("cls", n=2)
    obj, sched = method_for(name, kw)
    tokvis.patch(model, obj, **sched)
    model.to("meta")
    with torch.no_grad(), tokvis.record(model) as rec:
        out = model(x.to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 10)
    assert len(rec._pending) == 1  # one forward's decisions wait to be copied, after the forward


_SYNC_METHODS = ("item", "tolist", "__bool__", "cpu", "numpy", "nonzero", "__int__", "__float__", "__index__")


class _SyncCounter:
    """Counts host-sync calls on tensors while ``active``; ``.to()`` counts when it moves off the device."""

    def __init__(self, monkeypatch, device):
        self.calls: list[str] = []
        self.active = False
        for name in _SYNC_METHODS:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))
        orig_to = torch.Tensor.to

        def to(t, *args, **kwargs):
            out = orig_to(t, *args, **kwargs)
            # an asynchronous copy (CUDA -> pinned host memory, non_blocking) does not wait for the device
            if self.active and out.device != t.device and not (t.is_cuda and kwargs.get("non_blocking")):
                self.calls.append(f"to({out.device})")
            return out

        monkeypatch.setattr(torch.Tensor, "to", to)
        orig_equal = torch.equal
        monkeypatch.setattr(torch, "equal", lambda *a, **k: (self._note("torch.equal"), orig_equal(*a, **k))[1])

    def _note(self, name):
        if self.active:
            self.calls.append(name)

    def _wrap(self, name, orig):
        def f(t, *args, **kwargs):
            self._note(name)
            return orig(t, *args, **kwargs)

        return f


@pytest.mark.parametrize("name,kw", [("tome", {"r": 5}), ("topk", {"keep_rate": 0.5}), ("evit", {"keep_rate": 0.7})])
def test_recorded_forward_makes_no_host_sync_call(name, kw, monkeypatch):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    model, x = make_model("cls").to(DEVICE), make_images("cls", n=3).to(DEVICE)
    tokvis.patch(model, name, **kw)
    with torch.no_grad():
        ref_out, ref_trace = tokvis.run_with_trace(model, x)
    counter = _SyncCounter(monkeypatch, DEVICE)
    # after the input check (one sync at the entry, for NaN images) and after the recorder's own hook
    start = model.register_forward_pre_hook(lambda m, a: setattr(counter, "active", True))
    with torch.no_grad(), tokvis.record(model) as rec:
        stop = model.register_forward_hook(lambda m, a, o: setattr(counter, "active", False))
        out = model(x)
    start.remove(), stop.remove()
    assert counter.calls == [], f"host syncs inside the recorded forward: {counter.calls}"
    # ... and the trace read afterwards is the one the forward made
    trace = rec.trace
    assert trace.layers == ref_trace.layers
    for layer in trace.layers:
        assert torch.equal(trace.labels(layer), ref_trace.labels(layer))
        assert trace.decision(layer).dst.device.type == "cpu"
    torch.testing.assert_close(out, ref_out)


def test_counter_detects_a_sync(monkeypatch):
    """The counting test can fail: a ``.item()`` and a copy to the CPU inside the forward are seen."""
    counter = _SyncCounter(monkeypatch, "cpu")
    counter.active = True
    t = torch.ones(2)
    t.sum().item()
    bool(t.all())
    t.to(torch.device("meta"))
    assert counter.calls[:2] == ["item", "__bool__"] and counter.calls[-1] == "to(meta)"


def test_identity_decision_applies_without_sync_and_exactly():
    """ops.apply_decision used bool((dst == arange).all()) per block; now a device-side select, same values."""
    from tokvis.methods.ops import apply_decision
    from tokvis.trace import LayerDecision

    x = torch.randn(2, 5, 3, device="meta")
    ar = torch.arange(4, device="meta").expand(2, 4).clone()
    d = LayerDecision(0, "prune", ar, torch.ones(2, 4, dtype=torch.bool, device="meta"), n_out=4)
    out, size = apply_decision(x, torch.ones(2, 5, device="meta"), d, num_prefix=1)  # raised on meta before
    assert out.shape == x.shape
    # on real values: an identity image keeps its tokens bit for bit, a permuted one is permuted
    x = torch.randn(2, 5, 3)
    dst = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])
    w = torch.tensor([[0.3, 1.7, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    d = LayerDecision(0, "merge", dst, torch.ones(2, 4, dtype=torch.bool), n_out=4, weight=w)
    out, _ = apply_decision(x, torch.ones(2, 5), d, num_prefix=1)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1, 1:][[1, 0, 2, 3]], x[1, 1:])
