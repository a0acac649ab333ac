"""tokvis.analysis.compare: pairings, hand-checked values, agreement with the pattern functions, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, v_measure_score

import tokvis
from tests.models import make_images, make_model
from tokvis.analysis import compare, compare_maps, global_maps, maps, patterns
from tokvis.errors import TraceMismatchError
from tokvis.trace import LayerDecision, Trace, TraceMeta


def _trace(dst, *, kind="prune", keep=None, method="m", keep_rate=0.5, backbone="vit", ids=("x", "y"), grid=(2, 2),
           layer=1, dataset="d", r=None):  # fmt: skip
    dst = torch.tensor(dst, dtype=torch.int64)
    if keep is None:
        keep = dst >= 0
    else:
        keep = torch.tensor(keep, dtype=torch.bool)
    n_out = int(dst.max()) + 1
    d = LayerDecision(layer=layer, kind=kind, dst=dst, keep=keep, n_out=n_out)
    meta = TraceMeta(grid_size=grid, num_prefix_tokens=1, depth=3, backbone=backbone, method=method,
                     keep_rate=keep_rate, r=r, dataset=dataset, image_ids=list(ids))  # fmt: skip
    return Trace([d], meta)


def test_hand_checked_pruning_values():
    # image x: A keeps {0,1,2}, B keeps {1,2,3}: IoU 2/4, IoA |A&B|/|B| = 2/3; image y: identical sets
    a = _trace([[0, 1, 2, -1], [0, 1, 2, -1]], keep_rate=0.75)
    b = _trace([[-1, 0, 1, 2], [0, 1, 2, -1]], keep_rate=0.5)
    df = compare([b, a], by="keep_rate")  # order of the input does not matter: A = higher keep rate
    assert set(df.keep_rate_a) == {0.75} and set(df.keep_rate_b) == {0.5}
    got = df.set_index(["image_id", "metric"]).value
    assert got[("x", "iou")] == pytest.approx(0.5)
    assert got[("x", "ioa")] == pytest.approx(2 / 3)
    assert got[("y", "iou")] == 1.0 and got[("y", "ioa")] == 1.0
    assert set(df.family) == {"prune"} and set(df.layer) == {1} and set(df.stage) == {0}
    assert isinstance(df.value.iloc[0], float)


def test_hand_checked_merging_values():
    # A groups {0,1},{2,3}; B groups {0,2},{1,3}: independent partitions -> V-measure 0, ARI -0.5
    a = _trace([[0, 0, 1, 1], [0, 0, 1, 1]], kind="merge", keep=[[1, 0, 1, 0]] * 2, method="tome")
    b = _trace([[0, 1, 0, 1], [0, 0, 1, 1]], kind="merge", keep=[[1, 1, 0, 0], [1, 0, 1, 0]], method="other")
    df = compare([a, b], by="method", metric=["v_measure", "ari", "homogeneity"])
    got = df.set_index(["image_id", "metric"]).value
    assert got[("x", "v_measure")] == pytest.approx(0.0, abs=1e-12)
    assert got[("x", "ari")] == pytest.approx(-0.5)
    assert got[("y", "v_measure")] == 1.0 and got[("y", "ari")] == 1.0
    assert list(df.method_a.unique()) == ["other"] and list(df.method_b.unique()) == ["tome"]  # sorted by name
    assert got[("x", "ari")] == pytest.approx(adjusted_rand_score([0, 0, 1, 1], [0, 1, 0, 1]))


@pytest.fixture(scope="module")
def tiny_traces():
    torch.set_grad_enabled(False)
    model = make_model("cls")
    x = make_images("cls", 5)
    ids = [f"img{i}" for i in range(5)]
    out = []
    for method in ("topk", "evit", "tome"):
        for rho in (0.9, 0.7, 0.5):
            tokvis.patch(model, method, keep_rate=rho)
            _, t = tokvis.run_with_trace(model, x, image_ids=ids, dataset="rand")
            out.append(t)
    tokvis.unpatch(model)
    torch.set_grad_enabled(True)
    return out


def test_keep_rate_pairing_agrees_with_pattern_functions(tiny_traces):
    df = compare(tiny_traces, by="keep_rate", metric=["iou", "ioa", "v_measure", "ari", "ami", "nmi"])
    # 3 methods x 3 pairs of keep rates
    pairs = df[["method", "keep_rate_a", "keep_rate_b"]].drop_duplicates()
    assert len(pairs) == 9 and (pairs.keep_rate_a > pairs.keep_rate_b).all()
    by = {(t.meta.method, t.meta.keep_rate): t for t in tiny_traces}
    for (method, ka, kb, layer, metric), part in df.groupby(
        ["method", "keep_rate_a", "keep_rate_b", "layer", "metric"]
    ):
        a, b = by[(method, ka)], by[(method, kb)]
        if metric in ("iou", "ioa"):
            assert method in ("topk", "evit")
            expect = getattr(patterns, metric)(a.kept(layer).numpy(), b.kept(layer).numpy())
        else:
            assert method == "tome"
            expect = patterns.merge_scores(a.labels(layer).numpy(), b.labels(layer).numpy(), metrics=[metric])[metric]
        np.testing.assert_allclose(part.value.to_numpy(), expect, rtol=0, atol=0)
        assert list(part.image_id) == a.image_ids
    # an independent path for V-measure: scikit-learn per image
    tome = df[(df.method == "tome") & (df.metric == "v_measure")].iloc[0]
    a, b = by[("tome", tome.keep_rate_a)], by[("tome", tome.keep_rate_b)]
    img = a.image_ids.index(tome.image_id)
    ref = v_measure_score(a.labels(tome.layer)[img].numpy(), b.labels(tome.layer)[img].numpy())
    assert tome.value == pytest.approx(ref)


def test_method_pairing_skips_mixed_families(tiny_traces):
    df = compare(tiny_traces, by="method")
    assert set(zip(df.method_a, df.method_b, strict=True)) == {("evit", "topk")}  # tome (merging) has no common metric
    assert set(df.keep_rate) == {0.9, 0.7, 0.5}
    assert list(df.columns[:6]) == ["backbone", "dataset", "keep_rate", "r", "method_a", "method_b"]
    with pytest.raises(TraceMismatchError, match="none of the metrics"):
        compare([t for t in tiny_traces if t.meta.method != "tome"], by="method", metric="v_measure")


def test_default_metrics_and_dropped_group(tiny_traces):
    tome = [t for t in tiny_traces if t.meta.method == "tome"]
    df = compare(tome, by="keep_rate")
    assert set(df.metric) == {"v_measure", "homogeneity", "completeness", "ari"}
    topk = [t for t in tiny_traces if t.meta.method == "topk"]
    # pruning pairs are not measured with merge metrics: asking only for those is an error
    with pytest.raises(TraceMismatchError, match="IoU/IoA need pruning"):
        compare(topk, by="keep_rate", metric="v_measure", dropped="group")
    # dropped="group" changes merge metrics where patches are dropped (hand-made: B drops patch 3)
    a = _trace([[0, 0, 1, 1]] * 2, kind="merge", keep=[[1, 0, 1, 0]] * 2, keep_rate=0.9)
    b = _trace([[0, 0, 1, -1]] * 2, kind="merge", keep=[[1, 0, 1, 0]] * 2, keep_rate=0.5)
    excl = compare([a, b], by="keep_rate", metric="v_measure").value
    grp = compare([a, b], by="keep_rate", metric="v_measure", dropped="group").value
    assert (excl == 1.0).all() and (grp < 1.0).all()


def test_images_are_aligned_by_id(tiny_traces):
    a, b = tiny_traces[0], tiny_traces[1]
    perm = [3, 0, 4, 1, 2]
    shuffled = b.select(perm)
    df1 = compare([a, b], by="keep_rate")
    df2 = compare([a, shuffled], by="keep_rate")
    np.testing.assert_array_equal(df1.value.to_numpy(), df2.value.to_numpy())
    assert list(df2.image_id.unique()) == a.image_ids


def test_comparability_errors(tiny_traces):
    a, b = tiny_traces[0], tiny_traces[1]
    with pytest.raises(TraceMismatchError, match="different images"):
        compare([a.select([0, 1, 2]), b], by="keep_rate")
    with pytest.raises(TraceMismatchError, match="patch grid"):
        compare([_trace([[0, 1, 2, -1]] * 2, keep_rate=0.9, grid=(2, 2)),
                 _trace([[0, 1, 2, -1]] * 2, keep_rate=0.5, grid=(1, 4))], by="keep_rate")  # fmt: skip
    with pytest.raises(TraceMismatchError, match=r"blocks \[1\].*\[2\]"):
        compare([_trace([[0, 1, 2, -1]] * 2, keep_rate=0.9, layer=1),
                 _trace([[0, 1, 2, -1]] * 2, keep_rate=0.5, layer=2)], by="keep_rate")  # fmt: skip
    with pytest.raises(TraceMismatchError, match="have the same"):
        compare([a, a], by="keep_rate")
    with pytest.raises(ValueError, match="by must be one of"):
        compare([a, b], by="rate")
    with pytest.raises(ValueError, match="metric must be one of"):
        compare([a, b], by="keep_rate", metric="jaccard")


def test_explicit_layers_compare_any_blocks():
    a = _trace([[0, 1, 2, -1]] * 2, keep_rate=0.9, layer=1)
    b = _trace([[0, 1, 2, -1]] * 2, keep_rate=0.5, layer=2)
    df = compare([a, b], by="keep_rate", layers=[0, 1, 2], metric="iou")
    got = df.groupby("layer").value.mean()
    # after block 0 nothing is reduced; after block 1 only A has dropped patch 3; after 2 both have
    assert got[0] == 1.0 and got[1] == pytest.approx(3 / 4) and got[2] == 1.0
    with pytest.raises(TraceMismatchError, match="not a block"):
        compare([a, b], by="keep_rate", layers=[5])


def test_empty_when_nothing_to_pair(tiny_traces):
    df = compare(tiny_traces[:1], by="keep_rate")
    assert df.empty and "value" in df.columns


def test_traces_differing_in_another_field_raise_naming_it():
    """ToMe by r against Top-K by keep rate, by="method": no pair, and the error says why (was: an empty table)."""
    tome = _trace([[0, 0, 1, 1]] * 2, kind="merge", method="tome", keep_rate=None, r=8)
    topk = _trace([[0, 1, 2, -1]] * 2, method="topk", keep_rate=0.7)
    with pytest.raises(TraceMismatchError, match=r"also differ in keep_rate, r") as e:
        compare([tome, topk], by="method")
    msg = str(e.value)
    assert "trace 0: None, trace 1: 0.7" in msg and "trace 0: 8, trace 1: None" in msg
    assert "schedule convention" in msg
    # another field (backbone) differing is named with its values, too
    small = _trace([[0, 1, 2, -1]] * 2, method="topk", backbone="vit_s")
    big = _trace([[0, 1, 2, -1]] * 2, method="evit", backbone="vit_b")
    expect = r"also differ in backbone \(backbone: trace 0: 'vit_s', trace 1: 'vit_b'\)"
    with pytest.raises(TraceMismatchError, match=expect):
        compare([small, big], by="method")


def test_a_trace_without_partner_is_named_in_a_warning():
    a = _trace([[0, 1, 2, -1]] * 2, method="topk", keep_rate=0.5)
    b = _trace([[0, 1, -1, 2]] * 2, method="evit", keep_rate=0.5)
    c = _trace([[0, 1, 2, -1]] * 2, method="tome", keep_rate=0.7)
    with pytest.warns(UserWarning, match=r"trace 2 \(vit/tome/d, keep_rate=0.7\) has no partner"):
        df = compare([a, b, c], by="method")
    assert set(zip(df.method_a, df.method_b, strict=True)) == {("evit", "topk")}


def test_same_metadata_says_what_differs():
    """Traces equal in metadata but not in grid or images get a precise message, not 'concatenate batches'."""
    a = _trace([[0, 1, 2, -1]] * 2, grid=(2, 2))
    b = _trace([[0, 1, 2, -1]] * 2, grid=(1, 4))
    with pytest.raises(TraceMismatchError, match=r"differ in patch grid: \(2, 2\) vs \(1, 4\)") as e:
        compare([a, b], by="keep_rate")
    assert "concatenate" not in str(e.value) and "input size" in str(e.value)
    c = _trace([[0, 1, 2, -1]] * 2, ids=("z", "w"))
    with pytest.raises(TraceMismatchError, match=r"different images .*only in trace 0: \['x', 'y'\].*Trace.concat"):
        compare([a, c], by="keep_rate")
    d = _trace([[0, 1, 2, -1]] * 2, ids=("y", "x"))
    with pytest.raises(TraceMismatchError, match="same images in a different order"):
        compare([a, d], by="keep_rate")
    with pytest.raises(TraceMismatchError, match="same recording twice"):
        compare([a, a], by="keep_rate")


def test_global_maps_and_compare_maps(tiny_traces):
    t = tiny_traces[2]
    got = global_maps(t)
    last = t.layers[-1]
    np.testing.assert_array_equal(got["depth"], t.depth().double().mean(0).reshape(t.grid_size).numpy())
    np.testing.assert_array_equal(got["keep_frequency"], t.kept(last).double().mean(0).reshape(t.grid_size).numpy())
    assert got["merge_size"].shape == t.grid_size
    df = compare_maps(tiny_traces[0], t, maps="keep_frequency")
    assert list(df.metric) == ["kl", "kl_reverse", "js", "pcc", "scc", "emd", "sim"]
    other = global_maps(tiny_traces[0])["keep_frequency"]
    v = df.set_index("metric").value
    assert v["kl"] == pytest.approx(maps.kl_divergence(other, got["keep_frequency"]))
    assert v["kl_reverse"] == pytest.approx(maps.kl_divergence(got["keep_frequency"], other))
    same = compare_maps(t, t, maps="depth").set_index("metric").value
    assert same["js"] == 0 and same["sim"] == pytest.approx(1.0) and same["emd"] == 0
    with pytest.raises(ValueError, match="metrics must be among"):
        compare_maps(t, t, metrics="cosine")


def test_analysis_package_and_adapters_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys, tokvis.analysis, tokvis.adapters, tokvis.plotting.stats; "
        "from tokvis.analysis import compare, global_maps, correlate; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
