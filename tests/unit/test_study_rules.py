"""EViT, ATS and ToMe (under keep_rate) against plain-loop references of the study's rules (issue 17).

Each reference is written from reading the study's model files (``models/evit.py``, ``models/ats.py``,
``models/tome.py`` of github.com/JoakimHaurum/TokenReduction; file:line given where a rule is used) with
Python loops over the tokens of one image, independent of tokvis's vectorised code; the study's code is
never imported.  The references run the tiny timm ViT of ``tests.models`` block by block (its own
``norm1`` / ``qkv`` / ``proj`` / ``norm2`` / ``mlp``), in float64, one image at a time, and are compared
with tokvis's patched model on a batch: the partitions per stage (groups of original patches), and the
class-head output.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.errors import MethodOptionError
from tokvis.methods.ats import study_level_count as ats_level_count
from tokvis.methods.ats import study_levels
from tokvis.schedule import default_locations

DEPTH, N = 6, 64  # the tiny model: 6 blocks, 8 x 8 patches
LOCS = default_locations(DEPTH)


def _budget(rho: float, s: int) -> int:
    # the study: int(num_patches * rho ** s) (evit.py:78 with :172, ats.py:205, tome.py:146)
    return int(N * rho**s + 1e-9)


def _heads(blk, x):
    """Attention of one image's tokens ``x [T, C]`` in block ``blk``: (probs [H, T, T], v [H, T, d], proj)."""
    h = blk.norm1(x)
    T, C = h.shape
    H = blk.attn.num_heads
    q, k, v = blk.attn.qkv(h).reshape(T, 3, H, C // H).permute(1, 2, 0, 3)
    return q, k, v


def _attend(blk, probs, v, rows):
    """``proj`` of the attention output of the query rows ``rows`` (list of token indices)."""
    out = probs[:, rows] @ v  # [H, len(rows), d]
    return blk.attn.proj(out.transpose(0, 1).reshape(len(rows), -1))


def _mlp(blk, x):
    return x + blk.mlp(blk.norm2(x))


def _probs(blk, q, k, bias=None):
    logits = q @ k.transpose(-1, -2) * blk.attn.scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1)


def _embed(model, img):
    x = model.patch_embed(img[None])
    return model.norm_pre(model._pos_embed(x))[0]


def _head(model, x):
    return model.forward_head(model.norm(x)[None])[0]


def _groups(labels_row: torch.Tensor) -> set[frozenset[int]]:
    """The partition of a trace's labels row: the groups of original patches sharing a token."""
    out: dict[int, set[int]] = {}
    for patch, lab in enumerate(labels_row.tolist()):
        if lab >= 0:
            out.setdefault(lab, set()).add(patch)
    return {frozenset(g) for g in out.values()}


# -- EViT: models/evit.py -----------------------------------------------------------------------------
def study_evit(model, img, rho: float, fused: str = "sum"):
    """EViT as the study's ``Block_EVIT.forward``: after the attention residual (``evit.py:108-109``), keep the
    ``int(N rho**s)`` tokens of highest head-averaged class attention (``:78,82-84``), append the dropped tokens
    weighted by that attention and summed (``:116-121``; ``fused="mean"``: divided by the summed weights), then
    the MLP (``:125``).  Returns (logits, groups per reducing block)."""
    x = _embed(model, img)
    members = [frozenset([j]) for j in range(N)]  # original patches of each patch token
    groups = {}
    for i, blk in enumerate(model.blocks):
        if i not in LOCS:
            x = blk(x[None])[0]
            continue
        q, k, v = _heads(blk, x)
        probs = _probs(blk, q, k)
        x = x + _attend(blk, probs, v, list(range(x.shape[0])))
        n = x.shape[0] - 1
        keep_n = _budget(rho, LOCS.index(i) + 1)
        if keep_n < n:  # evit.py:79: no reduction when the budget is the current count
            a = [float(sum(probs[h, 0, 1 + j] for h in range(probs.shape[0])) / probs.shape[0]) for j in range(n)]
            order = sorted(range(n), key=lambda j: -a[j])
            kept, dropped = sorted(order[:keep_n]), order[keep_n:]
            tok = torch.zeros_like(x[0])
            for j in dropped:
                tok = tok + a[j] * x[1 + j]
            if fused == "mean":
                tok = tok / sum(a[j] for j in dropped)
            x = torch.cat([x[:1], x[[1 + j for j in kept]], tok[None]])
            members = [members[j] for j in kept] + [frozenset().union(*(members[j] for j in dropped))]
        x = _mlp(blk, x)
        groups[i] = set(members)
    return _head(model, x), groups


@pytest.mark.parametrize("fused,rho", [("sum", 0.9), ("sum", 0.7), ("sum", 0.5), ("sum", 0.25), ("mean", 0.5)])
def test_evit_equals_the_study_loop(fused, rho):
    model, x = make_model("cls", dtype=torch.float64), make_images("cls", n=2, dtype=torch.float64)
    tokvis.patch(model, "evit", keep_rate=rho, fused=fused)
    with torch.no_grad():
        out, trace = tokvis.run_with_trace(model, x)
        tokvis.unpatch(model)
        for b in range(len(x)):
            ref_out, ref_groups = study_evit(model, x[b], rho, fused)
            torch.testing.assert_close(out[b], ref_out, atol=1e-10, rtol=0)
            for layer in LOCS:
                assert _groups(trace.labels(layer)[b]) == ref_groups[layer], (b, layer)


def test_evit_sum_and_mean_differ_and_bad_option():
    """The two fused tokens give other outputs (the check can fail); a bad option is a typed error."""
    model, x = make_model("cls"), make_images("cls")
    outs = []
    for fused in ("sum", "mean"):
        tokvis.patch(model, "evit", keep_rate=0.5, fused=fused)
        with torch.no_grad():
            outs.append(model(x))
    assert not torch.allclose(*outs, atol=1e-4)
    with pytest.raises(MethodOptionError):
        tokvis.create_method("evit", fused="average")


def test_weighted_sum_survives_save_and_load(tmp_path):
    """The fused-sum flag travels with a saved trace (``LayerDecision.weighted_sum``)."""
    model, x = make_model("cls"), make_images("cls")
    tokvis.patch(model, "evit", keep_rate=0.5)
    _, trace = tokvis.run_with_trace(model, x)
    loaded = tokvis.load_trace(trace.save(tmp_path / "t.safetensors"))
    assert [d.weighted_sum for d in loaded.decisions] == [True] * len(LOCS)
    tokvis.patch(model, "evit", keep_rate=0.5, fused="mean")
    _, trace = tokvis.run_with_trace(model, x)
    loaded = tokvis.load_trace(trace.save(tmp_path / "m.safetensors"))
    assert [d.weighted_sum for d in loaded.decisions] == [False] * len(LOCS)


# -- ATS: models/ats.py -------------------------------------------------------------------------------
def study_level_count(K: int) -> int:
    """Length of the study's ``torch.arange(1/(2K), (2K-1)/(2K), 2/(2K))`` (``ats.py:48``), by arange's rule
    ``ceil((end - start) / step)`` evaluated in double precision."""
    return math.ceil(((2 * K - 1) / (2 * K) - 1 / (2 * K)) / (2 / (2 * K)))


def study_ats_sample(score: list[float], K: int) -> list[int]:
    """The study's sampling of one image: normalise by the sum plus 1e-6 (``ats.py:67``), accumulate in sequence
    order (``:69``), each level (2m+1)/(2K) (``:48``, float32 as arange makes them) takes the token of nearest
    cumulative score, the first on ties (``:73-74``); the distinct tokens, ascending (``:77``)."""
    total = sum(score) + 1e-6
    cdf, acc = [], 0.0
    for s in score:
        acc += s / total
        cdf.append(acc)
    picked = set()
    for m in range(study_level_count(K)):
        level = float(torch.tensor(1 / (2 * K) + m * (2 / (2 * K)), dtype=torch.float32))
        best = min(range(len(cdf)), key=lambda j: (abs(cdf[j] - level), j))
        picked.add(best)
    return sorted(picked)


def study_ats(model, img, rho: float):
    """ATS as the study's ``ATSBlock``: inside the attention, score = class attention x value norm summed over
    heads (``ats.py:53-63``), sample :func:`study_ats_sample` with ``K = int(N rho**s) + 1`` (``:205``); the kept
    tokens' rows of the full attention (``:86,130``) and their residual (``:157-159``), then the MLP.  One image
    alone: no padding.  Returns (logits, kept original patches per reducing block)."""
    x = _embed(model, img)
    members = list(range(N))
    kept_sets = {}
    for i, blk in enumerate(model.blocks):
        if i not in LOCS:
            x = blk(x[None])[0]
            continue
        q, k, v = _heads(blk, x)
        probs = _probs(blk, q, k)
        n, H = x.shape[0] - 1, probs.shape[0]
        score = [sum(float(probs[h, 0, 1 + j]) * float(v[h, 1 + j].norm()) for h in range(H)) for j in range(n)]
        ids = study_ats_sample(score, _budget(rho, LOCS.index(i) + 1) + 1)
        rows = [0] + [1 + j for j in ids]
        x = x[rows] + _attend(blk, probs, v, rows)
        x = _mlp(blk, x)
        members = [members[j] for j in ids]
        kept_sets[i] = set(members)
    return _head(model, x), kept_sets


def test_study_level_count_is_the_arange_length():
    for K in range(2, 300):
        assert len(study_levels(K - 1)) == study_level_count(K) == ats_level_count(K - 1)
    assert study_level_count(3) == 3 and study_level_count(4) == 3  # one more level at K = 3 (float round-off)


def _peaked(dtype=torch.float64):
    """The tiny model with sharpened attention: ATS picks high-scoring tokens several times."""
    model = make_model("cls", dtype=dtype)
    with torch.no_grad():
        for blk in model.blocks:
            c = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * c] *= 6
    return model


@pytest.mark.parametrize("rho", [0.9, 0.7, 0.5, 0.25])
def test_ats_equals_the_study_loop(rho):
    """Kept sets per stage and outputs; the batch pads images with fewer tokens, the reference runs each alone."""
    model, x = _peaked(), make_images("cls", n=4, dtype=torch.float64)
    tokvis.patch(model, "ats", keep_rate=rho)
    with torch.no_grad():
        out, trace = tokvis.run_with_trace(model, x)
        tokvis.unpatch(model)
        padded = False
        for b in range(len(x)):
            ref_out, ref_kept = study_ats(model, x[b], rho)
            torch.testing.assert_close(out[b], ref_out, atol=1e-10, rtol=0)
            for layer in LOCS:
                got = set(torch.nonzero(trace.kept(layer)[b]).flatten().tolist())
                assert got == ref_kept[layer], (b, layer)
                padded |= len(got) < trace.decision(layer).n_out
    if rho <= 0.7:
        assert padded, "the test needs duplicates (an image keeping fewer tokens than its slots)"


def test_ats_sorted_option_differs_from_the_study_rule():
    model, x = _peaked(torch.float32), make_images("cls", n=4)
    kept = []
    for sampling in ("study", "sorted"):
        tokvis.patch(model, "ats", keep_rate=0.5, sampling=sampling)
        _, trace = tokvis.run_with_trace(model, x)
        kept.append(trace.kept(LOCS[0]))
    assert not torch.equal(*kept)


# -- ToMe under keep_rate: models/tome.py -----------------------------------------------------------------
def study_tome_removals(rho: float) -> list[int]:
    """The study's per-block r: the previous stage's int(N rho**s) minus this one's (``tome.py:146,152-156``)."""
    r, prev = [0] * DEPTH, N
    for s, loc in enumerate(LOCS, start=1):
        r[loc] = prev - _budget(rho, s)
        prev = _budget(rho, s)
    return r


@pytest.mark.parametrize("rho", [0.9, 0.7, 0.5, 0.25])
def test_tome_keep_rate_is_the_study_removals_capped(rho):
    """Under keep_rate, ToMe removes the study's per-stage removals, each capped at (t - 1) // 2 (``tome.py:253``,
    t counting the class token): the same decisions and output as ToMe given those removals as an ``r`` list
    (ToMe's ``r`` equals the official ToMe, tests/unit/test_fidelity_tome.py), and the counts of the loop below."""
    model, x = make_model("cls", dtype=torch.float64), make_images("cls", dtype=torch.float64)
    removals = study_tome_removals(rho)
    tokvis.patch(model, "tome", keep_rate=rho)
    with torch.no_grad():
        out, trace = tokvis.run_with_trace(model, x)
    tokvis.patch(model, "tome", r=removals)
    with torch.no_grad():
        ref_out, ref = tokvis.run_with_trace(model, x)
    assert torch.equal(out, ref_out)
    t, counts = N + 1, []
    for loc in LOCS:
        t -= min(removals[loc], (t - 1) // 2)
        counts.append(t - 1)
    assert [trace.decision(layer).n_out for layer in LOCS] == counts
    for layer in LOCS:
        assert torch.equal(trace.labels(layer), ref.labels(layer))
    if rho == 0.25:  # the cap binds: the study keeps more than the budgets 16, 4, 1
        assert counts == [32, 20, 17]


def test_tome_exact_budget_option_and_r_unchanged():
    model, x = make_model("cls"), make_images("cls")
    tokvis.patch(model, "tome", keep_rate=0.25, budget="exact")
    _, trace = tokvis.run_with_trace(model, x)
    assert [trace.decision(layer).n_out for layer in LOCS] == [_budget(0.25, s) for s in (1, 2, 3)]
    outs = []
    for budget in ("study", "exact"):  # under r the option does nothing
        tokvis.patch(model, "tome", r=12, budget=budget)
        with torch.no_grad():
            outs.append(model(x))
    assert torch.equal(*outs)
    with pytest.raises(MethodOptionError):
        tokvis.create_method("tome", budget="budget")
