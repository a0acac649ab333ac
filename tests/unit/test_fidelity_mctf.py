"""tokvis MCTF reproduces the authors' code (mlvlab/MCTF ``utils/mctf.py`` with its DeiT).

The official behaviour is encoded here independently, as plain loops written from
its description (the official code itself is not imported):

- the bipartite split alternates over the *whole* sequence: sequence position
  ``t`` is in set A when ``t`` is even (the class token is position 0 of A);
  prefix tokens are never fused;
- weights: ``((cos + 1) / 2) ** (1 / tau_sim) * (u_a u_b) ** (1 / tau_info) *
  (v_a v_b) ** (1 / tau_size)`` with ``u = (1 / received) / max``, ``v = (1 / size)
  / max`` over the whole sequence;
- step 1 fuses the ``r // 2`` (bidirectional) or ``r`` best A tokens into their
  best B tokens; step 2 fuses the ``r - r // 2`` best B tokens into their best A
  token left (same weights);
- output order: prefix, unmerged A tokens (by position when there are prefix
  tokens), then the B tokens left by decreasing step-2 weight (bidirectional) or
  by position;
- fused tokens: mean weighted by attention received x size; one-step-ahead: the
  attention map of the block's input is merged (key columns summed, query rows
  pooled with the same weights) and applied to the values of the fused tokens;
  without it the block's output is fused after the MLP;
- default locations: a count ``r`` at every block but the first, a fraction at
  the quarter points.
"""

from __future__ import annotations

import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.methods.mctf import bidirectional_matching, multi_criteria_weights
from tokvis.schedule import default_locations

TAUS = (1.0, 20.0, 40.0)


def official_round(metric, received, size, r, num_prefix, *, bidirectional=True, taus=TAUS):
    """One official MCTF fusion on one image: output tokens in order, each a list of input positions."""
    T = metric.shape[0]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).tolist()
    inv_att = [1.0 / float(v) for v in received]
    inv_size = [1.0 / float(v) for v in size]
    u = [v / max(inv_att) for v in inv_att]
    s = [v / max(inv_size) for v in inv_size]
    t_sim, t_info, t_size = taus

    def weight(a, b):
        return ((cos[a][b] + 1) / 2) ** (1 / t_sim) * (u[a] * u[b]) ** (1 / t_info) * (s[a] * s[b]) ** (1 / t_size)

    seq_a = [t for t in range(T) if t % 2 == 0 and t >= num_prefix]
    seq_b = [t for t in range(T) if t % 2 == 1 and t >= num_prefix]
    r = min(r, (T - num_prefix) // 2)
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    best = {}
    for a in seq_a:
        ws = [(weight(a, b), b) for b in seq_b]
        top = max(w for w, _ in ws)
        best[a] = (top, next(b for w, b in ws if w == top))
    by_score = sorted(seq_a, key=lambda a: -best[a][0])
    merged, unmerged = by_score[:r1], by_score[r1:]
    if num_prefix:
        unmerged = sorted(unmerged)
    groups = {a: [a] for a in unmerged}
    groups.update({b: [b] + [a for a in merged if best[a][1] == b] for b in seq_b})
    if not bidirectional:
        tail = seq_b
    else:
        best2 = {}
        for b in seq_b:
            ws = [(weight(a, b), a) for a in sorted(unmerged)]
            top = max(w for w, _ in ws)
            best2[b] = (top, next(a for w, a in ws if w == top))
        order2 = sorted(seq_b, key=lambda b: -best2[b][0])
        for b in order2[:r2]:
            groups[best2[b][1]] += groups[b]
        tail = order2[r2:]
    return [[t] for t in range(num_prefix)] + [groups[a] for a in unmerged] + [groups[b] for b in tail]


# --------------------------------------------------------------------------------------------------
# the matching functions against the loop


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("n,r", [(16, 6), (17, 8), (13, 3), (9, 4), (8, 1)])
def test_matching_equals_official_loop(bidirectional, num_prefix, n, r):
    g = torch.Generator().manual_seed(1000 * n + 10 * r + num_prefix)
    T = num_prefix + n
    metric = torch.randn(2, T, 6, generator=g, dtype=torch.float64)
    received = torch.rand(2, T, generator=g, dtype=torch.float64) + 0.01
    size = torch.randint(1, 6, (2, T), generator=g).double()
    w = multi_criteria_weights(
        metric, received, size, tau_sim=TAUS[0], tau_info=TAUS[1], tau_size=TAUS[2], num_prefix=num_prefix
    )
    dst, keep, _ = bidirectional_matching(w, n, r, bidirectional=bidirectional, num_prefix=num_prefix)
    for b in range(2):
        ref = official_round(metric[b], received[b], size[b], r, num_prefix, bidirectional=bidirectional)
        want = [-1] * n
        for slot, members in enumerate(ref[num_prefix:]):
            for t in members:
                want[t - num_prefix] = slot
        assert dst[b].tolist() == want
        assert keep[b].tolist() == [any(m[0] == i + num_prefix for m in ref) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# whole model: a slow per-image forward with the official rules


def _fuse(x, size, attn, groups):
    """Fused tokens, sizes, pooling weights per group (attention received x size)."""
    received = attn.mean(dim=(0, 1))
    w = received * size
    x_new = torch.stack([(w[g, None] * x[g]).sum(0) / w[g].sum() for g in groups])
    size_new = torch.stack([size[g].sum() for g in groups])
    return x_new, size_new, w, received


def _attention(blk, h, size, prop_attn):
    a = blk.attn
    T = h.shape[0]
    q, k, v = a.qkv(h).reshape(T, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
    logits = (a.q_norm(q) * a.scale) @ a.k_norm(k).transpose(-2, -1)
    if prop_attn:
        logits = logits + size.log()[None, None, :]
    return logits.softmax(-1), v


def _project(blk, attn_map, v, T):
    out = (attn_map @ v).transpose(0, 1).reshape(T, -1)
    return blk.ls1(blk.attn.proj(blk.attn.norm(out)))


@torch.no_grad()
def official_forward(model, image, r_per_block, *, one_step_ahead=True, bidirectional=True, prop_attn=True):
    p = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))[0]
    size = torch.ones(x.shape[0], dtype=x.dtype)
    members = [[t - p] if t >= p else [] for t in range(x.shape[0])]
    slots = []
    for blk, r in zip(model.blocks, r_per_block, strict=True):
        attn, v = _attention(blk, blk.norm1(x), size, prop_attn)
        if r and one_step_ahead:
            groups = official_round(x, attn.mean(dim=(0, 1)), size, r, p, bidirectional=bidirectional)
            x_new, size_new, w, _ = _fuse(x, size, attn, groups)
            cols = torch.stack([attn[..., g].sum(-1) for g in groups], -1)  # [H, T, T']
            merged = torch.stack([(w[g, None, None] * cols[:, g].transpose(0, 1)).sum(0) / w[g].sum() for g in groups])
            x, size = x_new, size_new
            _, v = _attention(blk, blk.norm1(x), size, prop_attn)
            x = x + _project(blk, merged.transpose(0, 1), v, x.shape[0])
            members = [sum((members[t] for t in g), []) for g in groups]
        else:
            x = x + _project(blk, attn, v, x.shape[0])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        if r and not one_step_ahead:
            groups = official_round(x, attn.mean(dim=(0, 1)), size, r, p, bidirectional=bidirectional)
            x, size, _, _ = _fuse(x, size, attn, groups)
            members = [sum((members[t] for t in g), []) for g in groups]
        slot = [0] * model.patch_embed.num_patches
        for j, m in enumerate(members[p:]):
            for patch in m:
                slot[patch] = j
        slots.append(slot)
    return model.forward_head(model.norm(x[None]))[0], slots


def _r_per_block(r, depth, n):
    """Tokens removed per block under MCTF's default locations (count: blocks 1.., fraction: quarter points)."""
    locs = range(1, depth) if isinstance(r, int) else default_locations(depth)
    out = []
    for i in range(depth):
        k = (r if isinstance(r, int) else int(r * n)) if i in locs else 0
        k = min(k, n // 2)
        out.append(k)
        n -= k
    return out


CASES = [
    ("cls", 6, {}),  # paper default: count r at blocks 1.., one-step-ahead, bidirectional
    ("cls", 6, {"one_step_ahead": False}),
    ("cls", 6, {"bidirectional": False}),
    ("cls", 0.35, {}),  # MCTF-Fast: a fraction at the quarter points
    ("cls", 6, {"prop_attn": False}),
    ("distilled", 6, {}),
    ("registers", 0.35, {}),
    ("avgpool", 6, {}),
    ("avgpool", 6, {"one_step_ahead": False}),
]


@pytest.mark.parametrize("flavour,r,kw", CASES)
def test_model_equals_official_forward(flavour, r, kw):
    model = make_model(flavour, dtype=torch.float64)
    images = make_images(flavour, n=2, dtype=torch.float64)
    r_list = _r_per_block(r, len(model.blocks), model.patch_embed.num_patches)
    refs = [official_forward(model, img, r_list, **kw) for img in images]
    tokvis.patch(model, "mctf", r=r, **kw)
    with torch.no_grad():
        out, trace = tokvis.run_with_trace(model, images)
    assert list(trace.layers) == [i for i, k in enumerate(r_list) if k]
    for layer in range(len(model.blocks)):
        got = trace.labels(layer)
        for b, (_, slots) in enumerate(refs):
            assert got[b].tolist() == slots[layer], f"block {layer}, image {b}"
    torch.testing.assert_close(out, torch.stack([lg for lg, _ in refs]), rtol=1e-9, atol=1e-9)


def test_default_locations_follow_the_scripts():
    model = make_model("cls")
    assert tokvis.patch(model, "mctf", r=4)._tokvis.schedule.locations == tuple(range(1, 6))
    assert tokvis.patch(model, "mctf", r=0.35)._tokvis.schedule.locations == tuple(default_locations(6))
    assert tokvis.patch(model, "mctf", r=4, locations=[0, 2])._tokvis.schedule.locations == (0, 2)
    assert tokvis.patch(model, "mctf", keep_rate=0.7)._tokvis.schedule.locations == tuple(default_locations(6))
    assert tokvis.patch(model, "tome", r=4)._tokvis.schedule.locations == tuple(range(6)), "other methods unchanged"


def test_original_order_option_differs_from_official():
    model = make_model("cls", dtype=torch.float64)
    images = make_images("cls", n=2, dtype=torch.float64)
    tokvis.patch(model, "mctf", r=6, order="original")
    with torch.no_grad():
        _, old = tokvis.run_with_trace(model, images)
    ref = official_forward(model, images[0], _r_per_block(6, 6, 64))[1]
    assert old.labels(1)[0].tolist() != ref[1]
    assert tokvis.create_method("mctf").options()["order"] == "official"
