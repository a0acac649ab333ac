"""tokvis.plotting.figures, tested on the drawn artists (lines, error bars, legends, titles), not pixels."""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection

import tokvis
from tests.models import make_images, make_model
from tokvis.analysis import compare
from tokvis.analysis.correlation import correlate
from tokvis.errors import DataError, TokvisError, TraceMismatchError
from tokvis.plotting import figures as F
from tokvis.trace import Trace

IDS = [f"img{i}" for i in range(4)]


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _record(model, x, method, backbone="tiny", **kw):
    tokvis.patch(model, method, **kw)
    _, t = tokvis.run_with_trace(model, x, image_ids=IDS, dataset="rand")
    tokvis.unpatch(model)
    return Trace(t.decisions, dataclasses.replace(t.meta, backbone=backbone))


@pytest.fixture(scope="module")
def traces():
    torch.set_grad_enabled(False)
    try:
        model, x = make_model("cls"), make_images("cls", 4)
        out = {(m, k): _record(model, x, m, keep_rate=k) for m in ("topk", "evit", "tome") for k in (0.9, 0.7, 0.5)}
        out["vomix"] = _record(model, x, "vomix", r=0.25, residual="mix")  # soft mixing (default: drop)
        out["vomix_drop"] = _record(model, x, "vomix", r=0.25)  # pruned tokens, mixed queries (query_soft)
        out["big"] = {k: _record(make_model("cls", seed=1), x, "topk", backbone="tiny-b", keep_rate=k) for k in (0.7,)}
        out["x"] = x
    finally:
        torch.set_grad_enabled(True)
    return out


def _lines(ax):
    return [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]


def test_similarity_vs_keep_rate_agrees_with_the_table(traces):
    df = compare([traces[("topk", k)] for k in (0.9, 0.7, 0.5)], by="keep_rate")
    fig, ax = plt.subplots()
    assert F.similarity_vs_keep_rate(df, ax=ax) is ax
    bars = _lines(ax)
    assert len(bars) == df.stage.nunique() == 3  # one line per stage
    iou = df[df.metric == "iou"]
    for k, (_stage, part) in enumerate(sorted(iou.groupby("stage"))):
        line = bars[k].lines[0]
        means = part.groupby(["keep_rate_a", "keep_rate_b"]).value.mean()
        order = sorted(means.index, key=lambda p: (-p[0], -p[1]))
        np.testing.assert_allclose(line.get_ydata(), [means[p] for p in order])
        assert bars[k].get_label() == f"block {part.layer.iloc[0]}"  # the block the stage reduces at
    # curves that coincide stay distinguishable: distinct markers, line styles and x offsets
    assert len({b.lines[0].get_marker() for b in bars}) == 3
    assert len({b.lines[0].get_linestyle() for b in bars}) == 3
    assert len({float(b.lines[0].get_xdata()[0]) for b in bars}) == 3
    blocks = [f"block {b}" for b in sorted(set(df.layer))]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == blocks and len(blocks) == 3
    assert ax.get_legend().get_title().get_text() == "reduction at"
    assert not [t for t in ax.texts if "pair" in t.get_text()]  # three pairs: no one-pair note
    assert ax.get_ylabel().startswith("IoU") and "std" in ax.get_ylabel()
    assert "topk" in ax.get_title() and ax.get_xticklabels()[0].get_text() == "0.9 vs 0.7"


def test_similarity_vs_keep_rate_merging_is_labelled_v_measure(traces):
    df = compare([traces[("tome", k)] for k in (0.9, 0.5)], by="keep_rate")
    fig, ax = plt.subplots()
    F.similarity_vs_keep_rate(df, ax=ax, errorbar="se")
    assert ax.get_ylabel().startswith("v_measure") and "s.e.m." in ax.get_ylabel()  # the table's name
    assert "v_measure" in set(df.metric)
    (note,) = [t.get_text() for t in ax.texts]  # one keep-rate pair: the panel says a trend needs more
    assert note == "one keep rate pair: record more keep rates for a trend"
    v = df[(df.metric == "v_measure") & (df.stage == 0)].value.to_numpy()
    (seg,) = _lines(ax)[0].lines[2][0].get_segments()  # the error bar of stage 0: mean +- s.e.m.
    np.testing.assert_allclose(seg[:, 1], v.mean() + np.array([-1, 1]) * v.std(ddof=1) / np.sqrt(v.size))


def test_similarity_vs_keep_rate_bad_inputs(traces):
    df = compare([traces[(m, k)] for m in ("topk", "evit") for k in (0.9, 0.5)], by="keep_rate")
    with pytest.raises(DataError, match="several methods.*method="):
        F.similarity_vs_keep_rate(df)
    with pytest.raises(DataError, match="no rows with method='nope'"):
        F.similarity_vs_keep_rate(df, method="nope")
    with pytest.raises(DataError, match="no rows of metric 'v_measure'"):
        F.similarity_vs_keep_rate(df, method="topk", metric="v_measure")
    with pytest.raises(DataError, match="columns not in data"):
        F.similarity_vs_keep_rate(df.drop(columns="keep_rate_b"), method="topk")
    with pytest.raises(DataError, match="no rows"):
        F.similarity_vs_keep_rate(df.iloc[:0])
    with pytest.raises(DataError, match="errorbar"):
        F.similarity_vs_keep_rate(df, method="topk", errorbar="iqr")


def test_similarity_vs_backbone(traces):
    df = compare([traces[("topk", 0.7)], traces["big"][0.7]], by="backbone")
    fig, ax = plt.subplots()
    assert F.similarity_vs_backbone(df, ax=ax) is ax
    bars = _lines(ax)
    assert len(bars) == 3 and [t.get_text() for t in ax.get_xticklabels()] == ["tiny vs tiny-b"]
    for k, b in enumerate(bars):
        assert b.lines[0].get_ydata()[0] == pytest.approx(df[(df.metric == "iou") & (df.stage == k)].value.mean())
    assert "keep rate 0.7" in ax.get_title() and "backbones" in ax.get_title()


def _perf():
    rows = []
    for m, acc in (("topk", 0.8), ("evit", 0.7), ("tome", 0.6)):
        for k in (0.9, 0.7, 0.5):
            rows.append({"run": f"{m}{k}", "backbone": "tiny", "method": m, "keep_rate": k, "dataset": "rand",
                         "top1": acc * k})  # fmt: skip
    return pd.DataFrame(rows)


def test_pair_performance_delta_and_similarity(traces):
    sim = compare([traces[("topk", k)] for k in (0.9, 0.7, 0.5)], by="keep_rate")
    got = F.pair_performance(sim, _perf(), by="keep_rate", measure="top1", metric="iou")
    assert len(got) == 3
    row = got[(got.keep_rate_a == "0.9") & (got.keep_rate_b == "0.5")].iloc[0]
    assert row.delta == pytest.approx(0.8 * 0.9 - 0.8 * 0.5)
    expect = sim[(sim.metric == "iou") & (sim.keep_rate_a == 0.9) & (sim.keep_rate_b == 0.5)].value.mean()
    assert row.similarity == pytest.approx(expect) and row.n_values == 3 * len(IDS)


def test_pair_performance_reference_orients_pairs(traces):
    sim = compare([traces[(m, 0.7)] for m in ("topk", "evit", "tome")], by="method")
    got = F.pair_performance(sim, _perf(), by="method", measure="top1", metric="iou", reference="topk")
    assert list(got.method_b) == ["topk"] and list(got.method_a) == ["evit"]  # tome is merging: no IoU rows
    assert got.delta.iloc[0] == pytest.approx(0.7 * 0.7 - 0.8 * 0.7)
    with pytest.raises(DataError, match="no pair with method='kmedoids'"):
        F.pair_performance(sim, _perf(), by="method", measure="top1", reference="kmedoids")
    with pytest.raises(DataError, match="columns not in data.*accuracy"):
        F.pair_performance(sim, _perf(), by="method", measure="accuracy")
    dup = pd.concat([_perf(), _perf().iloc[1:2]])  # topk at 0.7: a run of the pairs
    with pytest.raises(DataError, match="several rows for .*'topk'"):
        F.pair_performance(sim, dup, by="method", measure="top1")
    unused = pd.concat([_perf(), _perf().iloc[:1]])  # topk at 0.9: no pair uses it, no ambiguity
    assert len(F.pair_performance(sim, unused, by="method", measure="top1", metric="iou")) == 1


def test_performance_correlation_title_and_points():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"similarity": rng.uniform(size=12), "method_a": ["a", "b", "c"] * 4, "metric": "iou"})
    df["delta"] = -df.similarity + 0.2 * rng.normal(size=12)
    fig, ax = plt.subplots()
    assert F.performance_correlation(df, hue="method_a", measure="top1", n_boot=200, ax=ax) is ax
    res = correlate(df.similarity, df.delta, n_boot=200)
    title = ax.get_title()
    assert title.startswith(f"Spearman ρ = {res['r']:.2f}, 95% bootstrap CI [{res['ci_low']:.2f}, ")
    assert "(n = 12)" in title and "percentile bootstrap, 200 resamples" in title and "spearmanr" in title
    assert sum(len(c.get_offsets()) for c in ax.collections) == 12
    assert len({c.get_paths()[0].vertices.tobytes() for c in ax.collections}) == 3  # one marker per level
    assert ax.get_ylabel() == "Δ top1 (A - B)" and ax.get_xlabel() == "IoU"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]


def test_performance_correlation_undefined_says_so():
    df = pd.DataFrame({"similarity": [0.5, 0.6], "delta": [0.1, 0.2]})
    fig, ax = plt.subplots()
    F.performance_correlation(df, ax=ax)
    assert "undefined (n = 2" in ax.get_title()


class _FakeRun:
    def __init__(self, name, keep_rate, feats, method="topk"):
        from pathlib import Path
        from types import SimpleNamespace

        self.path = Path(name)
        self.meta = SimpleNamespace(backbone="b", method=method, dataset="d", keep_rate=keep_rate)
        self.image_ids = [f"i{k}" for k in range(feats.shape[0])]
        self._feats = feats

    def cls_features(self):
        return self._feats


def _cka_reference(x, y):
    # HSIC form with centring matrices: a second path to linear CKA
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_))


def test_cls_similarity_pairs_runs_and_agrees_with_hsic_cka():
    rng = np.random.default_rng(0)
    feats = {k: rng.normal(size=(20, 3, 8)) for k in (0.9, 0.5)}
    runs = [_FakeRun("a", 0.5, feats[0.5]), _FakeRun("b", 0.9, feats[0.9]), _FakeRun("c", 0.9, feats[0.9], "evit")]
    got = F.cls_similarity(runs, by="keep_rate")
    assert len(got) == 1  # evit has no partner at another keep rate
    row = got.iloc[0]
    assert (row.keep_rate_a, row.keep_rate_b, row.metric) == (0.9, 0.5, "cka")
    assert row.value == pytest.approx(_cka_reference(feats[0.9][:, -1], feats[0.5][:, -1]))
    first = F.cls_similarity(runs, by="keep_rate", block=0).value.iloc[0]
    assert first == pytest.approx(_cka_reference(feats[0.9][:, 0], feats[0.5][:, 0]))
    same = [_FakeRun("a", 0.9, feats[0.5]), _FakeRun("b", 0.9, feats[0.9])]
    assert F.cls_similarity(same, by="keep_rate").empty  # not a pair along keep_rate
    other = _FakeRun("d", 0.5, feats[0.5][:10])
    with pytest.raises(TraceMismatchError, match="different images"):
        F.cls_similarity([runs[1], other], by="keep_rate")


def test_method_overlays_legend_and_panels(traces):
    img = np.random.default_rng(0).random((64, 64, 3))
    ts = [traces[(m, 0.5)] for m in ("topk", "evit", "tome")]
    fig = F.method_overlays(ts, img, image_index=1, kept_pixels=True)
    axes = [a for a in fig.axes if a.get_images()]
    assert len(axes) == 3
    assert [a.get_title().split("\n")[0] for a in axes] == ["topk", "evit", "tome"]
    assert not fig.legends  # one legend per panel, of what that panel draws
    texts = {a.get_title().split("\n")[0]: [t.get_text() for t in a.get_legend().get_texts()] for a in axes}
    assert not any(t.startswith("dot:") for t in texts["topk"]) and any("dropped" in t for t in texts["topk"])
    assert any(t.startswith("dot:") for t in texts["tome"]) and not any("dropped" in t for t in texts["tome"])
    for a in axes:  # a dot entry exactly where kept markers were drawn
        dots = any(len(c.get_offsets()) for c in a.collections if isinstance(c, PathCollection))
        assert any(t.startswith("dot:") for t in texts[a.get_title().split("\n")[0]]) == dots
    assert any("real pixels" in t for t in texts["topk"])
    # the overlay drawn is merge_overlay's of that image and block
    ref_fig, ref_ax = plt.subplots()
    lay = ts[2].layers[-1]
    from tokvis.plotting.overlay import merge_overlay

    merge_overlay(img, ts[2].labels(lay)[1], kept=ts[2].kept(lay)[1], grid_size=ts[2].grid_size, ax=ref_ax,
                  kept_pixels=True)  # fmt: skip
    np.testing.assert_array_equal(axes[2].get_images()[0].get_array(), ref_ax.get_images()[0].get_array())


def test_method_overlays_bad_inputs(traces):
    img = np.zeros((64, 64, 3))
    with pytest.raises(DataError, match="empty"):
        F.method_overlays([], img)
    with pytest.raises(TraceMismatchError, match="image_index 9"):
        F.method_overlays([traces[("topk", 0.5)]], img, image_index=9)
    with pytest.raises(DataError, match="one entry per trace"):
        F.method_overlays([traces[("topk", 0.5)]], img, titles=["a", "b"])


def test_source_weights_hard_equals_labels_and_soft_is_a_mixture(traces):
    t = traces[("tome", 0.5)]
    lay = t.layers[-1]
    w = F.source_weights(t, image_index=2)
    labels = t.labels(lay)[2].numpy()
    for tok in range(w.shape[0]):
        members = np.flatnonzero(labels == tok)
        np.testing.assert_allclose(w[tok, members], 1 / members.size)
        assert np.count_nonzero(w[tok]) == members.size
    v = traces["vomix"]
    ws = F.source_weights(v, image_index=0)
    np.testing.assert_allclose(ws.sum(axis=1), 1.0)
    # the composition of the soft matrices, done densely in torch as a second path
    dense = torch.eye(v.num_patches, dtype=torch.float64)
    for d in v.decisions:
        dense = d.soft[0].double() @ dense
        dense = dense / dense.sum(1, keepdim=True).clamp(min=1e-12)
    np.testing.assert_allclose(ws, dense.numpy(), atol=1e-9)


def _title(fig) -> str:
    """The figure's title with its line breaks (wrapped to the figure's width) as spaces."""
    return " ".join(fig._suptitle.get_text().split())


def test_vomix_drop_draws_the_mixed_queries(traces):
    """residual="drop": the tokens are pruned (one patch each); the figure draws the queries mixed into them at the
    last block, computed here densely from the recorded labels as a second path, on the tokens mixing the most."""
    v = traces["vomix_drop"]
    lay, image_index = v.layers[-1], 1
    d = v.decision(lay)
    before = max(k for k in v.layers if k < lay)
    # second path: one-hot sources of the tokens entering the block, from the composed labels, in torch
    labels = v.labels(before)[image_index]
    onehot = torch.zeros(d.n_in, v.num_patches, dtype=torch.float64)
    onehot[labels[labels >= 0], torch.nonzero(labels >= 0).flatten()] = 1.0
    expect = d.query_soft[image_index].double() @ onehot
    w = F.source_weights(v, image_index=image_index, queries=True)
    np.testing.assert_allclose(w, expect.numpy(), atol=1e-9)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    hard = F.source_weights(v, image_index=image_index)
    assert ((hard > 0).sum(axis=1) == 1).all()  # the tokens themselves hold one patch each: pruning
    img = np.random.default_rng(2).random((64, 64, 3))
    fig = F.feature_source_view(v, img, image_index=image_index, tokens=3)
    title = _title(fig)
    assert f"queries mixed into output tokens at block {lay}" in title and "removed tokens' queries" in title
    panels = [a for a in fig.axes if len(a.get_images()) == 2]
    shown = [int(a.get_title().split()[1].rstrip(":")) for a in panels]
    counts = (expect.numpy() >= 0.01).sum(axis=1)
    assert sorted(counts[shown].tolist(), reverse=True) == sorted(counts.tolist(), reverse=True)[:3]
    assert counts[shown].min() > 1, "the tokens shown mix in other patches' queries"
    for ax, tok in zip(panels, shown, strict=True):
        drawn = np.ma.filled(ax.get_images()[1].get_array(), 0.0).reshape(-1)
        np.testing.assert_allclose(drawn, np.where(w[tok] >= 0.01, w[tok], 0.0))  # below 1 %: not tinted
        assert np.count_nonzero(drawn) == counts[tok]  # as many tinted patches as the title counts
    # the tokens themselves on request; no query mixing where none was recorded
    fig = F.feature_source_view(v, img, image_index=image_index, tokens=2, queries=False)
    assert "sources of output tokens after" in _title(fig)
    with pytest.raises(DataError, match="no query mixing"):
        F.source_weights(traces["vomix"], queries=True)
    stored = Trace([dataclasses.replace(d, query_soft=None) for d in v.decisions], v.meta)  # a store without --soft
    fig = F.feature_source_view(stored, img, image_index=image_index, tokens=2)
    assert "hard assignment" in _title(fig) and "again with --soft" in _title(fig)
    with pytest.raises(TokvisError, match="queries must be True or False"):
        F.source_weights(v, queries="yes")


def test_token_sources_leaves_weights_below_min_weight_untinted():
    img = np.full((16, 16, 3), 0.5)
    w = np.array([0.6, 0.3, 0.095, 0.005])  # rows of soft mixing end in tiny weights
    ax = F.token_sources(img, w, grid_size=(2, 2), colorbar=False)
    heat = ax.get_images()[1].get_array()
    assert np.ma.getmaskarray(heat).reshape(-1).tolist() == [False, False, False, True]
    ax = F.token_sources(img, w, grid_size=(2, 2), colorbar=False, min_weight=0.0, ax=plt.figure().add_subplot())
    np.testing.assert_array_equal(np.ma.filled(ax.get_images()[1].get_array(), -1.0).reshape(-1), w)
    with pytest.raises(DataError, match="min_weight"):
        F.token_sources(img, w, grid_size=(2, 2), min_weight=1.0)


def test_feature_source_view_and_fused_token_views(traces):
    img = np.random.default_rng(1).random((64, 64, 3))
    fig = F.feature_source_view(traces["vomix"], img, tokens=3)
    panels = [a for a in fig.axes if len(a.get_images()) == 2]
    assert len(panels) == 3
    assert "soft mixing weights of the tokens drawing on the most patches" in _title(fig)
    cbars = [a for a in fig.axes if a.get_ylabel() == "contribution to the token (fraction)"]
    assert len(cbars) == 1
    w = F.source_weights(traces["vomix"])
    heat = panels[0].get_images()[1].get_array()
    tok = int(panels[0].get_title().split()[1].rstrip(":"))
    np.testing.assert_allclose(np.ma.filled(heat, 0.0).reshape(-1), np.where(w[tok] >= 0.01, w[tok], 0.0))
    clims = {a.get_images()[1].get_clim() for a in panels}
    assert len(clims) == 1  # one colour scale for the one colour bar
    with pytest.raises(DataError, match="do not exist"):
        F.feature_source_view(traces["vomix"], img, tokens=[10_000])
    a, b = traces[("tome", 0.7)], traces[("tome", 0.5)]
    a = Trace(a.decisions, dataclasses.replace(a.meta, options={**a.meta.options, "criteria": ["similarity"]}))
    fig = F.fused_token_views([a, b], img)
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles == ["criteria=['similarity']", "criteria=None"] and "ablations" in fig._suptitle.get_text()


def test_errors_are_typed():
    assert issubclass(DataError, TokvisError) and issubclass(DataError, ValueError)


def test_performance_panels_side_by_side_have_titles_that_do_not_overlap():
    """Three panels as ``tokvis figures`` lays them out (5.2 in each, a legend each, a prefix line): the
    interval's explanation used to run into the next panel's title."""
    rng = np.random.default_rng(0)
    n = 156
    fig, axes = plt.subplots(1, 3, figsize=(15.6, 4.2), layout="constrained")
    for k, ax in enumerate(axes):
        df = pd.DataFrame({"similarity": rng.uniform(size=n), "method_a": [f"method{i}" for i in range(13)] * 12})
        df["delta"] = -df.similarity + 0.2 * rng.normal(size=n)
        df["metric"] = "iou"
        F.performance_correlation(df, hue="method_a", measure="fidelity", n_boot=1000, ax=ax)
        ax.set_title(f"pattern similarity to method {k}\n{ax.get_title()}", fontsize=8)
    fig.canvas.draw()
    boxes = [ax.title.get_window_extent() for ax in axes]
    for left, right in zip(boxes[:-1], boxes[1:], strict=True):
        assert left.x1 < right.x0, (left, right)
    plt.close(fig)
