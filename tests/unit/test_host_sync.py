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
#: (empty since ATS pads to its fixed budget instead of the batch's largest count)
SYNCING: dict[str, str] = {}

CASES = [
    pytest.param(name, METHOD_MATRIX[name].schedules[0], id=name,
                 marks=pytest.mark.xfail(strict=True, reason=SYNCING[name]) if name in SYNCING else ())
    for name in sorted(METHOD_MATRIX)
] + [
    # VoMix's default (residual="drop") makes hard decisions; soft mixing declares its structure
    # (LayerDecision.soft_kept_own), so ops._soft_apply applies it sparsely without checking it on the host
    pytest.param("vomix", {"r": 4, "residual": "mix"}, id="vomix-mix"),
]  # fmt: skip


class _HostToDevice:
    """Records copies of host data to another device while ``active``: ``Tensor.to`` / ``Tensor.copy_`` from
    a CPU tensor, ``torch.tensor`` / ``torch.as_tensor`` / ``Tensor.new_tensor`` onto a device.  On a GPU such
    a copy (from pageable memory, ``non_blocking=False``) waits for the device like a device-to-host one."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.active = False
        orig_to, orig_copy = torch.Tensor.to, torch.Tensor.copy_

        def to(t, *args, **kwargs):
            out = orig_to(t, *args, **kwargs)
            if self.active and t.device.type == "cpu" and out.device.type != "cpu":
                self.calls.append(f"to({out.device}) of a host tensor {tuple(t.shape)}")
            return out

        def copy_(t, src, *args, **kwargs):
            if self.active and src.device.type == "cpu" and t.device.type != "cpu":
                self.calls.append(f"copy_ of a host tensor {tuple(src.shape)}")
            return orig_copy(t, src, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "copy_", copy_)
        for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")):
            monkeypatch.setattr(owner, name, self._creation(name, getattr(owner, name), owner is torch.Tensor))

    def _creation(self, name, orig, method):
        def f(*args, **kwargs):
            out = orig(*args, **kwargs)
            if self.active and out.device.type != "cpu" and not (method and isinstance(args[1], torch.Tensor)):
                self.calls.append(f"{name}(..., device={out.device})")
            return out

        return f


@pytest.mark.parametrize("name,kw", CASES)
def test_recorded_forward_on_meta_device_never_syncs(name, kw, monkeypatch):
    """On the meta device ``.item()``, ``bool()``, ``.tolist()`` and copies to the CPU raise: a recorded
    forward that returns made none of them.  Nor does it copy host data to the device (:class:`_HostToDevice`:
    constants are made on the device or cached there)."""
    model, x = make_model("cls"), make_images("cls", n=2)
    obj, sched = method_for(name, kw)
    tokvis.patch(model, obj, **sched)
    model.to("meta")
    x = x.to("meta")
    h2d = _HostToDevice(monkeypatch)
    with torch.no_grad(), tokvis.record(model) as rec:
        model(x)  # the first forward may cache constants on the device (and creates learned modules)
        rec._pending.clear()
        start = model.register_forward_pre_hook(lambda m, a: setattr(h2d, "active", True))
        stop = model.register_forward_hook(lambda m, a, o: setattr(h2d, "active", False))
        out = model(x)
    start.remove(), stop.remove()
    assert out.device.type == "meta" and out.shape == (2, 10)
    assert len(rec._pending) == 1  # one forward's decisions wait to be copied, after the forward
    assert h2d.calls == [], f"host data copied to the device inside the forward: {h2d.calls}"


def test_host_to_device_detector_can_fail(monkeypatch):
    """The detector sees the copies it is for (and not a tensor created on the host)."""
    h2d = _HostToDevice(monkeypatch)
    h2d.active = True
    torch.ones(2).to("meta")
    torch.tensor([1, 2], device="meta")
    torch.empty(2, device="meta").copy_(torch.ones(2))
    torch.tensor([1.0])
    assert len(h2d.calls) == 3, h2d.calls


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


@pytest.mark.parametrize(
    "name,kw",
    [("tome", {"r": 5}), ("topk", {"keep_rate": 0.5}), ("evit", {"keep_rate": 0.7}), ("ats", {"keep_rate": 0.5})],
)
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


@pytest.mark.parametrize("name", ["dynamicvit", "sit", "patchmerger", "sinkhorn"])
def test_learned_fitted_flag_is_a_host_mirror_of_the_buffer(name):
    """``is_fitted`` no longer reads the ``fitted`` buffer (a sync per reducing block): a host flag follows
    ``mark_fitted`` and state-dict loads, and the buffer still carries the flag through save / load."""
    from tokvis.methods.registry import get_method_class

    cls = get_method_class(name)
    method = cls()
    assert not method.is_fitted
    method.mark_fitted(True)
    assert method.is_fitted and bool(method.fitted)
    fresh = cls()
    fresh.load_state_dict(method.state_dict())
    assert fresh.is_fitted and bool(fresh.fitted)
    method.mark_fitted(False)
    fresh.load_state_dict(method.state_dict())
    assert not fresh.is_fitted and not bool(fresh.fitted)
    fresh.mark_fitted(True)
    fresh.to("meta")  # a buffer without a value: reading it would raise
    assert fresh.is_fitted


def test_vomix_declared_structure_applies_sparsely_and_agrees_with_the_dense_product():
    """With ``soft_kept_own`` the sparse product runs without host checks (the meta-device test above); it
    agrees with the dense product, which a decision without the hint gets."""
    import dataclasses

    from tokvis.methods.ops import apply_decision

    model, images = make_model("cls"), make_images("cls", n=3)
    tokvis.patch(model, "vomix", r=4, residual="mix")
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, images)
    d = trace.decision(trace.layers[0])
    assert d.kind == "soft" and d.n_out < d.n_in
    torch.manual_seed(1)
    x = torch.randn(d.batch_size, 1 + d.n_in, 8, dtype=torch.float64)
    size = torch.rand(d.batch_size, 1 + d.n_in, dtype=torch.float64) + 0.5
    out_h, size_h = apply_decision(x, size, dataclasses.replace(d, soft_kept_own=True), num_prefix=1)
    out_p, size_p = apply_decision(x, size, dataclasses.replace(d, soft_kept_own=False), num_prefix=1)
    torch.testing.assert_close(out_h, out_p)
    assert torch.equal(size_h, size_p)  # sizes: the same dense product on both paths
    assert not torch.equal(out_h, x[:, : 1 + d.n_out])  # it mixed


def test_vomix_mix_decisions_declare_their_structure_and_traces_do_not_keep_it(tmp_path):
    """The recorded decision carries the hint only at run time: a saved and loaded trace has it off (the dense
    product applies it), and a hint without a soft matrix is refused."""
    from tokvis.trace import LayerDecision

    model, x = make_model("cls"), make_images("cls", n=2)
    tokvis.patch(model, "vomix", r=4, residual="mix")
    seen = []
    from tokvis.methods import ops

    orig = ops._soft_apply

    def spy(soft, patches, d):
        seen.append(d.soft_kept_own)
        return orig(soft, patches, d)

    ops._soft_apply = spy
    try:
        with torch.no_grad():
            _, trace = tokvis.run_with_trace(model, x)
    finally:
        ops._soft_apply = orig
    assert seen and all(seen)
    trace.save(tmp_path / "t.safetensors")
    loaded = tokvis.load_trace(tmp_path / "t.safetensors")
    assert not any(loaded.decision(layer).soft_kept_own for layer in loaded.layers)
    dst = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="soft_kept_own"):
        LayerDecision(0, "merge", dst, torch.ones(1, 3, dtype=torch.bool), n_out=1, soft_kept_own=True)
