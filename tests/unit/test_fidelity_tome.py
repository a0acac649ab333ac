"""tokvis ToMe reproduces the official ToMe code (facebookresearch/ToMe, ``tome.patch.timm``).

The official behaviour is encoded here independently, as plain loops written from
its description (the official code itself is not imported):

- the bipartite split alternates over the *whole* token sequence, prefix tokens
  included: sequence position ``t`` is in set A when ``t`` is even, so with a
  class token (position 0 of A) patch ``j`` is in A when ``j`` is odd;
- prefix tokens are protected: those in A have no partner, those in B receive
  nothing;
- after a merge the tokens are ordered: prefix tokens, unmerged A tokens (by
  position when there are prefix tokens, else by decreasing best similarity), then
  the B tokens by position; this order sets the next block's split;
- proportional attention adds ``log(size)`` to the logits; merged tokens are
  size-weighted averages.

A slow per-image forward built on these rules, through the model's own layers,
must give the same partitions *and* token slots at every block as the patched
model, and the same logits.
"""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.errors import MethodOptionError
from tokvis.methods.ops import bipartite_matching


def _cosines(metric: torch.Tensor) -> list[list[float]]:
    """Cosine similarity of every pair of rows, as plain floats."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    return (unit @ unit.T).tolist()


def official_round(metric: torch.Tensor, r: int, num_prefix: int) -> list[list[int]]:
    """One official ToMe round on one image, as a loop.

    ``metric [T, c]`` covers the whole sequence (prefix tokens first).  Returns the
    output tokens in output order, each as the list of input sequence positions it
    merges (prefix tokens included, first).
    """
    T = metric.shape[0]
    seq_a = [t for t in range(T) if t % 2 == 0 and t >= num_prefix]
    seq_b = [t for t in range(T) if t % 2 == 1 and t >= num_prefix]
    r = min(r, (T - num_prefix) // 2)
    cos = _cosines(metric)
    best = {}
    for a in seq_a:
        sims = [(cos[a][b], b) for b in seq_b]
        top = max(s for s, _ in sims)
        best[a] = (top, next(b for s, b in sims if s == top))
    by_score = sorted(seq_a, key=lambda a: -best[a][0])  # ties: lower position first
    merged, unmerged = by_score[:r], by_score[r:]
    if num_prefix:
        unmerged = sorted(unmerged)
    out = [[t] for t in range(num_prefix)] + [[a] for a in unmerged]
    out += [[b] + [a for a in merged if best[a][1] == b] for b in seq_b]
    return out


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("n,r", [(16, 3), (17, 8), (31, 15), (9, 4), (20, 1)])
def test_matching_equals_official_loop(num_prefix, n, r):
    """Same groups and same output slots as the loop reference of the official round."""
    g = torch.Generator().manual_seed(100 * n + 10 * r + num_prefix)
    metric = torch.randn(3, num_prefix + n, 8, generator=g, dtype=torch.float64)
    r = min(r, n // 2)
    dst, keep = bipartite_matching(metric[:, num_prefix:], r, num_prefix=num_prefix)
    for b in range(3):
        ref = official_round(metric[b], r, num_prefix)[num_prefix:]  # patch output tokens, in order
        want = [-1] * n
        for slot, members in enumerate(ref):
            for t in members:
                want[t - num_prefix] = slot
        assert dst[b].tolist() == want
        assert int((~keep[b]).sum()) == r
        survivors = {m[0] - num_prefix for m in ref}
        assert [i in survivors for i in range(n)] == keep[b].tolist()


def test_class_token_parity():
    """With one class token, patch j is in set A when j is odd: only odd patches are merged away."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(4, 40, 6, generator=g)
    _, keep = bipartite_matching(metric, 20, num_prefix=1)
    assert bool(keep[:, ::2].all()) and not bool(keep[:, 1::2].any())
    _, keep0 = bipartite_matching(metric, 20, num_prefix=0)
    assert bool(keep0[:, 1::2].all()) and not bool(keep0[:, ::2].any())


def test_original_order_option_keeps_positions():
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 21, 5, generator=g)
    dst, keep = bipartite_matching(metric, 7, order="original")  # tome order="original" splits patch tokens only
    for b in range(2):
        assert dst[b][keep[b]].tolist() == list(range(14))
    assert bool(keep[:, 1::2].all()), "patch j is in A for even j"
    with pytest.raises(ValueError, match="order must be one of"):
        bipartite_matching(metric, 7, order="sorted")
    with pytest.raises(MethodOptionError, match="order must be one of"):
        tokvis.create_method("tome", order="sorted")


# --------------------------------------------------------------------------------------------------
# whole model: a slow per-image forward with the official rules


def _qkv(blk, h):
    a = blk.attn
    T = h.shape[0]
    q, k, v = a.qkv(h).reshape(T, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)  # each [H, T, d]
    return a.q_norm(q), a.k_norm(k), v


@torch.no_grad()
def official_forward(model, image: torch.Tensor, r_per_block: list[int], prop_attn: bool):
    """Logits and, per block, the output slot of every patch (-1 never: ToMe only merges)."""
    p = model.num_prefix_tokens
    x = model._pos_embed(model.patch_embed(image[None]))[0]
    x = model.norm_pre(x)
    size = torch.ones(x.shape[0], dtype=x.dtype)
    members = [[t - p] if t >= p else [] for t in range(x.shape[0])]  # patches held by each token
    slots = []
    for blk, r in zip(model.blocks, r_per_block, strict=True):
        h = blk.norm1(x)
        q, k, v = _qkv(blk, h)
        logits = (q * blk.attn.scale) @ k.transpose(-2, -1)
        if prop_attn:
            logits = logits + size.log()[None, None, :]
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(x.shape[0], -1)
        x = x + blk.ls1(blk.attn.proj(blk.attn.norm(out)))
        if r > 0:
            groups = official_round(k.mean(0), r, p)
            x = torch.stack([(size[g, None] * x[g]).sum(0) / size[g].sum() for g in groups])
            size = torch.stack([size[g].sum() for g in groups])
            members = [sum((members[t] for t in g), []) for g in groups]
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        slot = [0] * (model.patch_embed.num_patches)
        for j, m in enumerate(members[p:]):
            for patch in m:
                slot[patch] = j
        slots.append(slot)
    logits = model.forward_head(model.norm(x[None]))
    return logits[0], slots


FLAVOURS = ["cls", "distilled", "avgpool", "registers"]


CASES = [(f, 6, True) for f in FLAVOURS] + [
    ("cls", 6, False),
    ("cls", [0, 12, 3, 16, 0, 5], True),
    ("cls", [0, 12, 3, 16, 0, 5], False),
    ("distilled", [4, 0, 20, 2, 9, 1], False),
    ("avgpool", [4, 0, 20, 2, 9, 1], True),
]


@pytest.mark.parametrize("flavour,r,prop_attn", CASES)
def test_model_equals_official_forward(flavour, r, prop_attn):
    """Same token slots at every block as the official rules, and the same logits (float64)."""
    model = make_model(flavour, dtype=torch.float64)
    images = make_images(flavour, n=2, dtype=torch.float64)
    r_list = r if isinstance(r, list) else [r] * len(model.blocks)
    refs = [official_forward(model, img, r_list, prop_attn) for img in images]
    tokvis.patch(model, "tome", r=r, prop_attn=prop_attn)
    with torch.no_grad():
        out, trace = tokvis.run_with_trace(model, images)
    for layer in range(len(model.blocks)):
        got = trace.labels(layer)
        for b, (_, slots) in enumerate(refs):
            assert got[b].tolist() == slots[layer], f"block {layer}, image {b}"
    torch.testing.assert_close(out, torch.stack([lg for lg, _ in refs]), rtol=1e-9, atol=1e-9)


def test_default_is_official_and_original_differs():
    """The former convention gives other partitions: the test above can tell the two apart."""
    model = make_model("cls", dtype=torch.float64)
    images = make_images("cls", n=2, dtype=torch.float64)
    tokvis.patch(model, "tome", r=8, order="original")
    with torch.no_grad():
        _, old = tokvis.run_with_trace(model, images)
    ref = official_forward(model, images[0], [8] * len(model.blocks), True)[1]
    assert old.labels(0)[0].tolist() != ref[0]
    assert tokvis.create_method("tome").options()["order"] == "official"


@pytest.mark.parametrize("flavour", ["cls", "avgpool", "registers"])
def test_keep_rate_repeated_matching_follows_schedule(flavour):
    """keep_rate stages that remove more than half still reach their budgets with the official order
    (``budget="exact"``: the repeated matching)."""
    model = make_model(flavour)
    images = make_images(flavour, n=2)
    tokvis.patch(model, "tome", keep_rate=0.25, budget="exact")
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, images)
    n = model.patch_embed.num_patches
    for s, layer in enumerate(trace.layers, start=1):
        assert trace.decision(layer).n_out == int(n * 0.25**s)
        labels = trace.labels(layer)
        assert bool((labels >= 0).all())  # merging drops nothing
        for b in range(2):  # every output slot holds at least one patch
            assert sorted(set(labels[b].tolist())) == list(range(int(n * 0.25**s)))
