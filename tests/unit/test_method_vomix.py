"""VoMix: voting (loop reference), mixing matrix, block output with mixed queries, schedules, invariants."""

from __future__ import annotations

import math

import pytest
import torch

import tokvis
from tests.invariants import (
    block_token_counts,
)
from tests.models import make_images, make_model
from tokvis.errors import MethodOptionError
from tokvis.methods.vomix import VoMix, key_similarity, mixing_matrix, neutral_rank, vote
from tokvis.patching import patch_state


def _loop_votes(keys, votes, weighting):
    """Slow reference: head-averaged key cosine, each token votes for its `votes` most similar others."""
    B, H, n, d = keys.shape
    out = torch.zeros(B, n, dtype=torch.float64)
    for b in range(B):
        k = [keys[b, :, i].mean(0) for i in range(n)]
        for i in range(n):
            sims = []
            for j in range(n):
                if j != i:
                    sims.append(((k[i] @ k[j]) / (k[i].norm() * k[j].norm())).item())
                else:
                    sims.append(-float("inf"))
            for j in sorted(range(n), key=lambda j: -sims[j])[:votes]:
                out[b, j] += 1.0 if weighting == "count" else sims[j]
    return out


@pytest.mark.parametrize("votes,weighting", [(1, "count"), (3, "count"), (2, "similarity")])
def test_votes_match_loop_reference(votes, weighting):
    g = torch.Generator().manual_seed(votes)
    keys = torch.randn(2, 3, 15, 4, generator=g, dtype=torch.float64)
    got = vote(key_similarity(keys), votes=votes, weighting=weighting)
    torch.testing.assert_close(got, _loop_votes(keys, votes, weighting))
    if weighting == "count":
        assert bool((got.sum(1) == 15 * votes).all())


def test_mixing_matrix_matches_loop_reference():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64)
    sim = key_similarity(keys)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    soft = mixing_matrix(sim, keep, tau=0.5)
    for b in range(2):
        ret = [i for i in range(9) if keep[b, i]]
        rem = [i for i in range(9) if not keep[b, i]]
        expect = torch.zeros(len(ret), 9, dtype=torch.float64)
        for s in rem:
            e = torch.tensor([sim[b, s, j].item() / 0.5 for j in ret]).exp()
            expect[:, s] = e / e.sum()
        for row, j in enumerate(ret):
            expect[row, j] = 1.0
        expect = expect / expect.sum(1, keepdim=True)
        torch.testing.assert_close(soft[b], expect)


@pytest.mark.parametrize(
    "kw,expect",
    [
        ({"r": 5}, [59, 54, 49, 44, 39, 34]),
        ({"r": 0.2}, [52, 42, 34, 28, 23, 19]),  # N * r of the tokens entering each block
        ({"r": 40, "locations": [2]}, [64, 64, 24, 24, 24, 24]),  # no half cap
        ({"keep_rate": 0.5}, [64, 32, 32, 16, 8, 8]),  # default locations [1, 3, 4]
    ],
)
def test_one_output_per_retained_token(kw, expect):
    model, x = make_model("registers"), make_images("registers")
    tokvis.patch(model, "vomix", residual="mix", **kw)
    assert block_token_counts(model, x) == expect
    _, trace = tokvis.run_with_trace(model, x)
    for layer in trace.layers:
        d = trace.decision(layer)
        assert d.kind == "soft" and d.n_out == expect[layer]
        assert bool((d.keep.sum(1) == d.n_out).all()), "one output per retained token"
        torch.testing.assert_close(d.soft.sum(-1), torch.ones(3, d.n_out))
        assert bool((d.soft >= 0).all())
        assert torch.equal(d.dst[d.keep], d.soft.argmax(1)[d.keep])  # removed: tests/unit/test_vomix_sound.py
        # retained tokens go to their own slot, in order; removed tokens have the most votes
        assert torch.equal(d.dst[d.keep], torch.arange(d.n_out).repeat(3))
        for b in range(3):
            assert d.score[b][~d.keep[b]].min() >= d.score[b][d.keep[b]].max()


def test_block_output_mixed_queries_full_keys():
    """Reducing block rebuilt by hand: mixed queries over vanilla keys/values, mixed residual."""
    model, x = make_model("registers", dtype=torch.float64), make_images("registers", dtype=torch.float64)
    ref = make_model("registers", dtype=torch.float64)
    tokvis.patch(model, "vomix", keep_rate=0.5, locations=[3], tau=0.3, residual="mix")
    cap = {}
    h = model.blocks[3].register_forward_hook(lambda m, i, o: cap.update(inp=i[0], out=o))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
        h.remove()
        blk, inp, p = ref.blocks[3], cap["inp"], model.num_prefix_tokens
        B, T, C = inp.shape
        H = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(inp)).reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4)
        # vote and mix by loops on these keys
        votes = _loop_votes(k[:, :, p:], 1, "count")
        d = trace.decision(3)
        torch.testing.assert_close(d.score.double(), votes)
        ys = []
        sim_votes = _loop_votes(k[:, :, p:], 1, "similarity")
        rank = neutral_rank(T - p).tolist()
        for b in range(B):
            kb = k[b, :, p:].mean(0)
            kb = kb / kb.norm(dim=-1, keepdim=True)
            nearest = [max((kb[i] @ kb[j]).item() for j in range(T - p) if j != i) for i in range(T - p)]
            # ties: votes, then the similarity of the votes received, then nearest neighbour, then a fixed order
            key = {i: (-votes[b, i].item(), -sim_votes[b, i].item(), -nearest[i], rank.index(i)) for i in range(T - p)}
            order = sorted(range(T - p), key=key.__getitem__)
            removed = set(order[: T - p - 32])
            ret = [i for i in range(T - p) if i not in removed]
            assert d.keep[b].nonzero().flatten().tolist() == ret
            kb = k[b, :, p:].mean(0)
            kb = kb / kb.norm(dim=-1, keepdim=True)
            M = torch.zeros(len(ret), T - p, dtype=inp.dtype)
            for s in removed:
                M[:, s] = (kb[s] @ kb[ret].T / 0.3).softmax(0)
            for row, j in enumerate(ret):
                M[row, j] = 1.0
            M = M / M.sum(1, keepdim=True)
            Mf = torch.block_diag(torch.eye(p, dtype=inp.dtype), M)
            qm = Mf @ q[b].transpose(0, 1).reshape(T, -1)
            qm = qm.reshape(-1, H, q.shape[-1]).transpose(0, 1)
            a = ((qm * blk.attn.scale) @ k[b].transpose(-2, -1)).softmax(-1) @ v[b]
            y = Mf @ inp[b] + blk.ls1(blk.attn.proj(a.transpose(0, 1).reshape(-1, C)))
            ys.append(y + blk.ls2(blk.mlp(blk.norm2(y))))
    torch.testing.assert_close(cap["out"], torch.stack(ys))


def test_residual_drop_keeps_retained_residual():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    mixed = make_model(dtype=torch.float64)
    tokvis.patch(model, "vomix", r=10, locations=[2], residual="drop")
    tokvis.patch(mixed, "vomix", r=10, locations=[2], residual="mix")
    with torch.no_grad():
        _, tr_drop = tokvis.run_with_trace(model, x)
        _, tr_mix = tokvis.run_with_trace(mixed, x)
    d, m = tr_drop.decision(2), tr_mix.decision(2)
    assert d.kind == "prune" and torch.equal(d.keep, m.keep)
    assert bool((d.dst[~d.keep] == -1).all()) and d.n_out == m.n_out == 54
    assert bool(((tr_drop.labels(5) == -1).sum(1) == 10).all()) and bool((tr_mix.labels(5) >= 0).all())
    # the first reducing block sees the same input either way: "drop" records as query mixing what "mix" applies
    assert d.soft is None and m.query_soft is None
    torch.testing.assert_close(d.query_soft, m.soft)


def _loop_query_mixing(keys: torch.Tensor, keep: torch.Tensor, tau: float) -> torch.Tensor:
    """Plain loops from the method's definition, one image: keys [H, n, d], keep [n] -> [n_kept, n].

    Head-averaged key cosine; a removed token s sends softmax_j(sim[s, j] / tau) over the kept tokens j, a kept
    token weight 1 to itself; each kept token's row is normalised: (q_j + sum_s w_sj q_s) / (1 + sum_s w_sj).
    """
    n = keys.shape[1]
    k = [keys[:, i].mean(0) for i in range(n)]
    ret = [i for i in range(n) if keep[i]]
    out = torch.zeros(len(ret), n, dtype=torch.float64)
    for row, j in enumerate(ret):
        out[row, j] = 1.0
    for s in range(n):
        if keep[s]:
            continue
        e = [math.exp((k[s] @ k[j]).item() / (k[s].norm() * k[j].norm()).item() / tau) for j in ret]
        for row, ej in enumerate(e):
            out[row, s] = ej / sum(e)
    return out / out.sum(1, keepdim=True)


@pytest.mark.parametrize("kw", [{"r": 0.25, "tau": 0.3}, {"keep_rate": 0.5, "tau": 1.0}])
def test_drop_records_the_query_mixing_it_applies(kw, monkeypatch):
    """residual="drop": the recorded query_soft equals a loop reference on the block's keys and is exactly the
    mixing the model applied to the queries (query_soft @ queries == the mixed queries)."""
    from tokvis.methods import vomix as vomix_module

    model, x = make_model("registers", dtype=torch.float64), make_images("registers", dtype=torch.float64)
    tokvis.patch(model, "vomix", residual="drop", **kw)
    method = patch_state(model).method
    keys, applied = {}, {}
    decide, mix = method.decide, vomix_module.mix_into_kept

    def capture_decide(ctx):
        keys[ctx.layer] = (ctx.keys[:, :, ctx.num_prefix :].clone(), ctx.queries.clone(), ctx.num_prefix)
        return decide(ctx)

    def capture_mix(values, kept, removed, weight):
        out = mix(values, kept, removed, weight)
        applied[len(applied)] = out
        return out

    monkeypatch.setattr(method, "decide", capture_decide)
    monkeypatch.setattr(vomix_module, "mix_into_kept", capture_mix)
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    assert len(trace.layers) >= 2 and sorted(keys) == list(trace.layers) and len(applied) == len(trace.layers)
    for i, d in enumerate(trace.decisions):
        k, q, p = keys[d.layer]
        assert d.kind == "prune" and d.soft is None and d.query_soft.shape == (x.shape[0], d.n_out, d.n_in)
        for b in range(x.shape[0]):
            torch.testing.assert_close(d.query_soft[b].double(), _loop_query_mixing(k[b], d.keep[b], kw["tau"]))
        B, H, T, hd = q.shape
        flat = q.transpose(1, 2).reshape(B, T, H * hd)[:, p:]
        torch.testing.assert_close(d.query_soft.to(flat.dtype) @ flat, applied[i])


@pytest.mark.parametrize(
    "kw",
    [{"votes": 0}, {"votes": 1.5}, {"tau": 0.0}, {"tau": "x"}, {"vote_weight": "max"}, {"residual": "keep"}],
)
def test_bad_options(kw):
    with pytest.raises(MethodOptionError):
        VoMix(**kw)


def test_too_many_votes_for_the_tokens():
    model, x = make_model(), make_images()
    tokvis.patch(model, "vomix", r=4, votes=64)
    with pytest.raises(MethodOptionError, match="votes=64"):
        model(x)


@pytest.mark.slow
def test_real_backbone():
    model = tokvis.zoo.create("dinov2_small_offline")
    images, _ = tokvis.data.load_images(model)
    images = images[:2]
    with torch.no_grad():
        ref = model(images)
        tokvis.patch(model, "vomix", keep_rate=0.7)
        out, trace = tokvis.run_with_trace(model, images)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    assert [trace.decision(layer).n_out for layer in trace.layers] == [179, 125, 87]
    assert float(torch.nn.functional.cosine_similarity(out, ref).min()) > 0.3
