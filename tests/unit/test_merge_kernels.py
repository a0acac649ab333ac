"""ops.merge_tokens (behind apply_decision and merge_mean): the fused sums give the plain formula's values,
with and without autograd, and ToMe's reduction stays a few dozen kernels (issue 12 §3)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tokvis.methods.ops import apply_decision, merge_tokens
from tokvis.methods.tome import ToMe
from tokvis.trace import LayerDecision


def _plain(values, dst, n_out, weight, size):
    """The formula, one slot at a time, in float64."""
    B, _, c = values.shape
    out = torch.zeros(B, n_out, c, dtype=torch.float64)
    new_size = torch.zeros(B, n_out, dtype=torch.float64)
    for b in range(B):
        for j in range(n_out):
            sel = dst[b] == j
            w = weight[b, sel].double()
            if sel.any():
                out[b, j] = (w[:, None] * values[b, sel].double()).sum(0) / w.sum()
            new_size[b, j] = size[b, sel].double().sum()
    return out, new_size


def test_merge_tokens_equals_the_formula_with_prefix_and_dropped_tokens():
    g = torch.Generator().manual_seed(0)
    values, prefix = torch.randn(3, 10, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    dst = torch.randint(-1, 5, (3, 10), generator=g)
    dst[:, 0] = 0
    weight, size = torch.rand(3, 10, generator=g) + 0.1, torch.randint(1, 4, (3, 10), generator=g).float()
    out, new_size = merge_tokens(values, dst, 6, weight, size, prefix=prefix)
    ref, ref_size = _plain(values, dst, 6, weight, size)
    assert out.shape == (3, 8, 4) and torch.equal(out[:, :2], prefix)
    torch.testing.assert_close(out[:, 2:].double(), ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[:, 7], torch.zeros(3, 4))  # slot 5 receives nothing: 0
    torch.testing.assert_close(new_size.double(), ref_size)


def test_merge_tokens_with_autograd_gives_the_same_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1 + 8, 3, generator=g)
    size = torch.ones(2, 9)
    dst = torch.tensor([[0, 0, 1, 2, 2, 3, -1, 3]] * 2)
    d = LayerDecision(0, "merge", dst, dst >= 0, n_out=4, weight=torch.rand(2, 8, generator=g) + 0.5)
    fast, fast_size = apply_decision(x, size, d, num_prefix=1)  # no input needs a gradient: out= path
    xg = x.clone().requires_grad_(True)
    slow, slow_size = apply_decision(xg, size, d, num_prefix=1)
    assert torch.equal(fast, slow.detach()) and torch.equal(fast_size, slow_size)
    slow.sum().backward()
    assert xg.grad is not None and torch.equal(xg.grad[:, 0], torch.ones(2, 3))  # the class token passes through
    assert torch.equal(xg.grad[:, 7], torch.zeros(2, 3))  # the dropped token gets nothing


def test_float32_sizes_of_a_float64_merge_are_summed_in_float32():
    g = torch.Generator().manual_seed(2)
    values, weight = torch.randn(2, 6, 3, generator=g, dtype=torch.float64), torch.rand(2, 6, generator=g)
    size = torch.rand(2, 6, generator=g) * 3
    dst = torch.tensor([[0, 1, 1, 2, -1, 0]] * 2)
    out, new_size = merge_tokens(values, dst, 3, weight, size)
    assert out.dtype == torch.float64 and new_size.dtype == torch.float32
    ref = torch.zeros(2, 4).scatter_add_(1, dst.remainder(4), size)[:, :3]
    assert torch.equal(new_size, ref)


class _Kernels(TorchDispatchMode):
    FREE = {"empty", "new_empty", "empty_strided", "_unsafe_view", "lift_fresh", "scalar_tensor"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not (func.is_view or func.overloadpacket.__name__ in self.FREE)
        return func(*args, **(kwargs or {}))


def test_tome_reduction_is_a_few_dozen_kernels():
    """One ToMe round, decide + apply, at ViT-S sizes: 25 non-view operators with torch 2.14 (61 before)."""
    from tokvis.methods.base import ReductionContext

    B, H, T, d = 2, 6, 197, 64
    x, keys, size = torch.randn(B, T, H * d), torch.randn(B, H, T, d), torch.ones(B, T)
    ctx = ReductionContext(layer=1, x=x, size=size, num_prefix=1, target=180, n_patches=196, keys=keys)
    with torch.no_grad(), _Kernels() as k:
        apply_decision(x, size, ToMe().decide(ctx), num_prefix=1)
    assert k.n <= 30, k.n
