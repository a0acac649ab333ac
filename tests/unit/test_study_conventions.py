"""convention="study": the "Which Tokens to Use?" study's columns, names and units, next to the standard ones.

Every value is checked against an independent formula (plain loops, scipy, scikit-learn) under both
conventions, and the two conventions against each other where they must agree.  The study's formulas,
re-derived from its scripts (``reduction_methods_analysis/``), are written here as plain loops:

* pruning: ``IoU = |A & B| / |A | B|`` and ``IoA = |A & B| / |B|``, 0 when the intersection is empty;
* merging: ``homogeneity_completeness_v_measure(labels_B, labels_A)`` (B as labels_true), V-measure named NMI;
* maps: ``KL(m1, m2) = sum m2 log2(m2 / m1)``, ``JS = KL(m1, M) / 2 + KL(m2, M) / 2``;
* features: ``CKA = 1 - linear CKA``, ``PWCCA = 1 - projection-weighted CCA``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import homogeneity_completeness_v_measure

from tokvis.analysis import (
    CONVENTIONS,
    STUDY_FEATURE_METRICS,
    STUDY_MAP_METRICS,
    compare,
    compare_maps,
    feature_scores,
    features,
    global_maps,
    maps,
    patterns,
)
from tokvis.errors import AnalysisOptionError, TokvisError
from tokvis.trace import LayerDecision, Trace, TraceMeta

# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------


def _sets(kept):
    return [{j for j, k in enumerate(row) if k} for row in np.asarray(kept)]


def _iou_loop(ka, kb, *, study):
    out = []
    for a, b in zip(_sets(ka), _sets(kb), strict=True):
        inter, union = len(a & b), len(a | b)
        if study:
            out.append(inter / union if inter > 0 and union > 0 else 0.0)
        else:
            out.append(inter / union if union else 1.0)
    return np.array(out)


def _ioa_loop(ka, kb, *, study):
    out = []
    for a, b in zip(_sets(ka), _sets(kb), strict=True):
        inter = len(a & b)
        if study:
            out.append(inter / len(b) if inter > 0 and len(b) > 0 else 0.0)
        else:
            out.append(inter / len(b) if b else 1.0)
    return np.array(out)


def _kl_bits_loop(m1, m2):
    """The study's KL(map1, map2) = sum map2 * log2(map2 / map1), 0 log 0 = 0."""
    m1, m2 = [float(v) for v in np.ravel(m1)], [float(v) for v in np.ravel(m2)]
    p = [v / sum(m1) for v in m1]
    q = [v / sum(m2) for v in m2]
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        if qi > 0:
            total += math.inf if pi == 0 else qi * math.log2(qi / pi)
    return total


def _js_study_loop(m1, m2):
    p = np.ravel(m1) / np.sum(m1)
    q = np.ravel(m2) / np.sum(m2)
    mid = (p + q) / 2
    return 0.5 * _kl_bits_loop(p, mid) + 0.5 * _kl_bits_loop(q, mid)


def _cka_hsic(x, y):
    """Linear CKA through HSIC with the centring matrix H (Kornblith et al., 2019)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.trace(kx @ ky) / np.sqrt(np.trace(kx @ kx) * np.trace(ky @ ky))


def _pwcca_whitening(x, y):
    """PWCCA by whitening (covariance^-1/2), as Morcos et al. describe it; x and y of full column rank."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(1 / np.sqrt(w)) @ v.T

    wx, wy = inv_sqrt(x.T @ x), inv_sqrt(y.T @ y)
    u, rho, _ = np.linalg.svd(wx @ x.T @ y @ wy)
    k = min(x.shape[1], y.shape[1])
    h = x @ wx @ u[:, :k]  # canonical variates of x, unit norm over the images
    alpha = np.abs(h.T @ x).sum(axis=1)
    return float(alpha @ rho[:k] / alpha.sum())


# --------------------------------------------------------------------------------------------
# the convention option itself
# --------------------------------------------------------------------------------------------


def _trace(dst, *, kind="prune", keep=None, method="m", keep_rate=0.5, ids=("x", "y", "z"), grid=(2, 2)):
    dst = torch.tensor(dst, dtype=torch.int64)
    keep = dst >= 0 if keep is None else torch.tensor(keep, dtype=torch.bool)
    d = LayerDecision(layer=1, kind=kind, dst=dst, keep=keep, n_out=max(int(dst.max()) + 1, 1))
    meta = TraceMeta(grid_size=grid, num_prefix_tokens=1, depth=3, backbone="vit", method=method,
                     keep_rate=keep_rate, r=None, dataset="d", image_ids=list(ids))  # fmt: skip
    return Trace([d], meta)


BAD_CONVENTION_CALLS = {
    "iou": lambda c: patterns.iou([True], [True], convention=c),
    "ioa": lambda c: patterns.ioa([True], [True], convention=c),
    "homogeneity": lambda c: patterns.homogeneity([0, 1], [0, 1], convention=c),
    "completeness": lambda c: patterns.completeness([0, 1], [0, 1], convention=c),
    "kl": lambda c: maps.kl_divergence([1, 2], [2, 1], convention=c),
    "js": lambda c: maps.js_divergence([1, 2], [2, 1], convention=c),
    "cka": lambda c: features.linear_cka(np.eye(3), np.eye(3), convention=c),
    "pwcca": lambda c: features.pwcca(np.eye(3), np.eye(3), convention=c),
    "feature_scores": lambda c: feature_scores(np.eye(3), np.eye(3), convention=c),
    "compare": lambda c: compare([_trace([[0, 1, -1, -1]] * 3)], by="method", convention=c),
    "compare_maps": lambda c: compare_maps(_trace([[0, 1, -1, -1]] * 3), _trace([[0, 1, -1, -1]] * 3), convention=c),
}


@pytest.mark.parametrize("call", list(BAD_CONVENTION_CALLS))
@pytest.mark.parametrize("bad", ["Study", "paper", None, 1])
def test_unknown_convention_is_a_typed_error(call, bad):
    with pytest.raises(AnalysisOptionError, match=r"convention must be 'standard' .* or 'study'") as info:
        BAD_CONVENTION_CALLS[call](bad)
    assert isinstance(info.value, TokvisError) and isinstance(info.value, ValueError)


def test_conventions_listed():
    assert CONVENTIONS == ("standard", "study")


# --------------------------------------------------------------------------------------------
# pruning: IoU / IoA
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kept_pairs():
    rng = np.random.default_rng(0)
    a = rng.random((40, 9)) < 0.5
    b = rng.random((40, 9)) < 0.5
    a[:3] = False  # empty A (rows 0-2); with empty B in rows 0-1: both empty
    b[:2] = False
    b[5] = False  # empty B, non-empty A
    a[6], b[6] = [True] * 4 + [False] * 5, [False] * 4 + [True] * 5  # disjoint, non-empty
    return a, b


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_iou_ioa_against_set_loops(kept_pairs, convention):
    a, b = kept_pairs
    study = convention == "study"
    np.testing.assert_allclose(patterns.iou(a, b, convention=convention), _iou_loop(a, b, study=study), rtol=1e-15)
    np.testing.assert_allclose(patterns.ioa(a, b, convention=convention), _ioa_loop(a, b, study=study), rtol=1e-15)


def test_iou_ioa_conventions_differ_only_on_empty_sets(kept_pairs):
    a, b = kept_pairs
    for fn, empty in ((patterns.iou, ~(a | b).any(axis=1)), (patterns.ioa, ~b.any(axis=1))):
        std, stu = fn(a, b), fn(a, b, convention="study")
        assert empty.sum() >= 2
        np.testing.assert_array_equal(std[~empty], stu[~empty])
        assert (std[empty] == 1.0).all() and (stu[empty] == 0.0).all()
    assert patterns.iou([False] * 4, [False] * 4) == 1.0
    assert patterns.iou([False] * 4, [False] * 4, convention="study") == 0.0


# --------------------------------------------------------------------------------------------
# merging: homogeneity / completeness / V-measure (NMI)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def label_pairs():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(25, 16))
    b = np.where(rng.random((25, 16)) < 0.6, a // 2, rng.integers(0, 7, size=(25, 16)))
    return a, b


def test_homogeneity_completeness_against_sklearn_both_conventions(label_pairs):
    a, b = label_pairs
    std_h, std_c = patterns.homogeneity(a, b), patterns.completeness(a, b)
    stu_h = patterns.homogeneity(a, b, convention="study")
    stu_c = patterns.completeness(a, b, convention="study")
    v = patterns.v_measure(a, b)
    for i in range(a.shape[0]):
        h, c, vm = homogeneity_completeness_v_measure(a[i], b[i])  # standard: A is labels_true
        assert (std_h[i], std_c[i], v[i]) == pytest.approx((h, c, vm), abs=1e-12)
        h, c, vm = homogeneity_completeness_v_measure(b[i], a[i])  # the study's call: B is labels_true
        assert (stu_h[i], stu_c[i]) == pytest.approx((h, c), abs=1e-12)
        assert v[i] == pytest.approx(vm, abs=1e-12)  # V-measure agrees under both
    assert not np.allclose(std_h, stu_h)  # the swap is visible on these patterns
    np.testing.assert_array_equal(stu_h, std_c)
    np.testing.assert_array_equal(stu_c, std_h)


def test_compare_study_names_and_values():
    # image x: A keeps {0,1,2}, B keeps {1,2,3}; y: identical; z: both empty
    a = _trace([[0, 1, 2, -1], [0, 1, 2, -1], [-1, -1, -1, -1]], keep_rate=0.75)
    b = _trace([[-1, 0, 1, 2], [0, 1, 2, -1], [-1, -1, -1, -1]], keep_rate=0.5)
    std = compare([a, b], by="keep_rate").set_index(["image_id", "metric"]).value
    stu = compare([a, b], by="keep_rate", convention="study").set_index(["image_id", "metric"]).value
    assert set(stu.index.get_level_values("metric")) == {"IoU", "IoA"}
    for image in ("x", "y"):
        assert stu[(image, "IoU")] == std[(image, "iou")] and stu[(image, "IoA")] == std[(image, "ioa")]
    assert stu[("x", "IoU")] == pytest.approx(0.5) and stu[("x", "IoA")] == pytest.approx(2 / 3)
    assert std[("z", "iou")] == 1.0 and stu[("z", "IoU")] == 0.0
    assert std[("z", "ioa")] == 1.0 and stu[("z", "IoA")] == 0.0


def test_compare_study_merging_columns():
    la = [[0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 2, 3]]
    lb = [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    a = _trace(la, kind="merge", keep=[[1, 0, 1, 0]] * 3, keep_rate=0.75)
    b = _trace(lb, kind="merge", keep=[[1, 0, 0, 1]] * 3, keep_rate=0.5)
    df = compare([a, b], by="keep_rate", convention="study")
    assert list(df.metric.unique()) == ["Homogeneity", "Completeness", "NMI"]
    got = df.set_index(["image_id", "metric"]).value
    for i, image in enumerate("xyz"):
        h, c, v = homogeneity_completeness_v_measure(lb[i], la[i])  # the study's argument order
        assert got[(image, "Homogeneity")] == pytest.approx(h, abs=1e-12)
        assert got[(image, "Completeness")] == pytest.approx(c, abs=1e-12)
        assert got[(image, "NMI")] == pytest.approx(v, abs=1e-12)
    # requested by tokvis names or by the study's: the same rows
    by_std_name = compare([a, b], by="keep_rate", convention="study", metric=["v_measure", "homogeneity"])
    by_study_name = compare([a, b], by="keep_rate", convention="study", metric=["NMI", "Homogeneity"])
    assert by_std_name.equals(by_study_name)
    std = compare([a, b], by="keep_rate", metric="v_measure").value.to_numpy()
    np.testing.assert_array_equal(std, by_std_name[by_std_name.metric == "NMI"].value.to_numpy())


@pytest.mark.parametrize("metric", ["ari", "ami", "mutual_info", "KLD12", "rand"])
def test_compare_study_refuses_metrics_the_study_lacks(metric):
    a = _trace([[0, 0, 1, 1]] * 3, kind="merge", keep=[[1, 0, 1, 0]] * 3, keep_rate=0.75)
    b = _trace([[0, 1, 1, 1]] * 3, kind="merge", keep=[[1, 1, 0, 0]] * 3, keep_rate=0.5)
    with pytest.raises(AnalysisOptionError, match=rf"metric '{metric}' is not a column of the study.*'NMI'"):
        compare([a, b], by="keep_rate", convention="study", metric=metric)


# --------------------------------------------------------------------------------------------
# maps: KLD12 / KLD21 / JSD / SIM
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_like():
    rng = np.random.default_rng(2)
    return 3 + 9 * rng.random((4, 5)), 3 + 9 * rng.random((4, 5))


def test_study_kl_is_reversed_and_in_bits(depth_like):
    p, q = depth_like
    assert maps.kl_divergence(p, q, convention="study") == pytest.approx(_kl_bits_loop(p, q), rel=1e-12)
    # the standard KL(Q || P) in nats without smoothing is the same number times ln 2
    assert maps.kl_divergence(p, q, convention="study") == pytest.approx(
        maps.kl_divergence(q, p, eps=0) / np.log(2), rel=1e-12
    )
    pn, qn = p.ravel() / p.sum(), q.ravel() / q.sum()
    assert maps.kl_divergence(p, q) == pytest.approx(special.rel_entr(pn, qn).sum(), rel=1e-9)
    assert maps.kl_both(p, q, convention="study") == pytest.approx((_kl_bits_loop(p, q), _kl_bits_loop(q, p)))


def test_study_js_is_not_jensen_shannon(depth_like):
    p, q = depth_like
    std = maps.js_divergence(p, q)
    stu = maps.js_divergence(p, q, convention="study")
    assert std == pytest.approx(jensenshannon(p.ravel(), q.ravel()) ** 2, rel=1e-9)  # scipy: nats
    assert stu == pytest.approx(_js_study_loop(p, q), rel=1e-12)
    assert stu != pytest.approx(std / np.log(2), rel=1e-3)  # not the JS divergence in bits either
    # disjoint supports: the JS divergence is log 2 (1 bit); the study's variant is infinite
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert maps.js_divergence(a, b) == pytest.approx(np.log(2))
    assert maps.js_divergence(a, b, convention="study") == math.inf
    assert _js_study_loop(a, b) == math.inf


def test_study_kl_zeros(depth_like):
    p = np.array([0.5, 0.5, 0.0])
    q = np.array([0.2, 0.3, 0.5])
    assert maps.kl_divergence(p, q, convention="study") == math.inf  # Q has mass where P has none
    assert maps.kl_divergence(q, p, convention="study") == pytest.approx(_kl_bits_loop(q, p))  # 0 log 0 = 0
    assert math.isfinite(maps.kl_divergence(p, q))  # the standard smooths (eps=1e-12)


def _traces_with_depth(depth_a, depth_b, grid=(2, 3)):
    """Two pruning traces whose depth maps are given (one image each: block at which each patch is dropped)."""
    out = []
    for depth, method in ((depth_a, "a"), (depth_b, "b")):
        depth = np.asarray(depth)
        n = depth.size
        decisions, alive = [], list(range(n))
        for layer in range(3):
            keep = [depth[p] > layer for p in alive]
            dst, slot = [], 0
            for k in keep:
                dst.append(slot if k else -1)
                slot += k
            decisions.append(LayerDecision(layer=layer, kind="prune", dst=torch.tensor([dst]),
                                           keep=torch.tensor([keep]), n_out=slot))  # fmt: skip
            alive = [p for p, k in zip(alive, keep, strict=True) if k]
        meta = TraceMeta(grid_size=grid, num_prefix_tokens=1, depth=3, backbone="vit", method=method,
                         keep_rate=0.5, r=None, dataset="d", image_ids=["x"])  # fmt: skip
        out.append(Trace(decisions, meta))
    return out


def test_compare_maps_study_columns():
    ta, tb = _traces_with_depth([1, 2, 3, 3, 2, 1], [3, 3, 1, 2, 1, 2])
    da, db = global_maps(ta)["depth"], global_maps(tb)["depth"]
    np.testing.assert_array_equal(da.ravel(), [1, 2, 3, 3, 2, 1])
    stu = compare_maps(ta, tb, maps="depth", convention="study")
    assert list(stu.metric) == ["KLD12", "KLD21", "JSD", "PCC", "SCC", "EMD", "SIM"] == list(STUDY_MAP_METRICS.values())
    got = stu.set_index("metric").value
    assert got["KLD12"] == pytest.approx(_kl_bits_loop(da, db), rel=1e-12)
    assert got["KLD21"] == pytest.approx(_kl_bits_loop(db, da), rel=1e-12)
    assert got["JSD"] == pytest.approx(_js_study_loop(da, db), rel=1e-12)
    std = compare_maps(ta, tb, maps="depth").set_index("metric").value
    for name in ("pcc", "scc", "emd", "sim"):  # the same under both conventions
        assert got[STUDY_MAP_METRICS[name]] == std[name]
    assert std["kl"] == pytest.approx(maps.kl_divergence(da, db))
    # requested by either name
    one = compare_maps(ta, tb, maps="depth", convention="study", metrics=["kl_reverse", "KLD12", "js"])
    assert list(one.metric) == ["KLD12", "JSD"]
    with pytest.raises(ValueError, match="metrics must be among"):
        compare_maps(ta, tb, maps="depth", metrics="KLD12")  # a study name under the standard convention


# --------------------------------------------------------------------------------------------
# features: CKA and PWCCA as distances
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_pair():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 5))
    y = x @ rng.normal(size=(5, 5)) + 0.8 * rng.normal(size=(60, 5))
    return x, y


def test_feature_metrics_both_conventions(feature_pair):
    x, y = feature_pair
    cka, pw = _cka_hsic(x, y), _pwcca_whitening(x, y)
    assert features.linear_cka(x, y) == pytest.approx(cka, rel=1e-10)
    assert features.linear_cka(x, y, convention="study") == pytest.approx(1 - cka, rel=1e-10)
    assert features.pwcca(x, y) == pytest.approx(pw, rel=1e-10)
    assert features.pwcca(x, y, convention="study") == pytest.approx(1 - pw, rel=1e-10)
    std, stu = feature_scores(x, y), feature_scores(x, y, convention="study")
    assert tuple(stu) == STUDY_FEATURE_METRICS
    assert stu["CKA"] == pytest.approx(1 - std["cka"], rel=1e-12)
    assert stu["PWCCA"] == pytest.approx(1 - std["pwcca"], rel=1e-12)
    # the same under both conventions
    assert stu["mean_cca_corr"] == std["mean_cca"] == features.mean_cca(x, y)
    assert stu["mean_sq_cca_corr"] == std["mean_squared_cca"] == features.mean_squared_cca(x, y)
    assert stu["Procrustes"] == std["procrustes"] == features.procrustes_distance(x, y)
    assert std["cka"] == features.linear_cka(x, y) and std["pwcca"] == features.pwcca(x, y)
    # identical features: similarity 1, distance 0
    same = feature_scores(x, x, convention="study")
    assert same["CKA"] == pytest.approx(0.0, abs=1e-12) and same["PWCCA"] == pytest.approx(0.0, abs=1e-12)
