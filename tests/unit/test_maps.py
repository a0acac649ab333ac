"""tokvis.analysis.maps: dataset maps and map-to-map metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from tokvis.analysis import maps as M
from tokvis.errors import TraceMismatchError

SEED = 7

METRICS = {
    "kl": M.kl_divergence,
    "js": M.js_divergence,
    "pcc": M.pcc,
    "scc": M.scc,
    "emd": M.emd,
    "sim": M.sim,
}
SYMMETRIC = ["js", "pcc", "scc", "emd", "sim"]
# best value: divergences / distances 0, similarities / correlations 1
BEST = {"kl": 0.0, "js": 0.0, "emd": 0.0, "pcc": 1.0, "scc": 1.0, "sim": 1.0}


@pytest.fixture(scope="module")
def two_maps():
    rng = np.random.default_rng(SEED)
    return rng.random((6, 7)), rng.random((6, 7)) ** 3


# --------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------


def test_depth_map_and_keep_frequency():
    depth = np.array([[1, 2, 3, 4, 5, 6], [3, 2, 1, 4, 5, 12]])
    np.testing.assert_allclose(M.depth_map(depth, grid_size=(2, 3)), [[2, 2, 2], [4, 5, 9]])
    kept = np.array([[1, 0, 1, 1], [1, 0, 0, 1], [1, 1, 0, 1]], dtype=bool)
    out = M.keep_frequency(kept, grid_size=(2, 2))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [[1, 1 / 3], [1 / 3, 1]])
    np.testing.assert_allclose(M.keep_frequency(kept[0], grid_size=(1, 4)), [[1, 0, 1, 1]])


def test_merge_size_map():
    labels = np.array([[0, 0, 1, -1], [5, 5, 5, 5], [-1, 2, 3, -1]])
    out = M.merge_size_map(labels, grid_size=(2, 2))
    # patch 0: sizes 2, 4 (dropped in image 2); patch 3: 4 only
    np.testing.assert_allclose(out, [[3.0, (2 + 4 + 1) / 3], [(1 + 4 + 1) / 3, 4.0]])
    # label values do not matter, large ones included
    relabelled = np.where(labels >= 0, labels * 10**12 + 3, -1)
    np.testing.assert_allclose(M.merge_size_map(relabelled, grid_size=(2, 2)), out)
    # a position dropped in every image: 0.0, not NaN
    dropped = np.array([[-1, 0, 0, 1], [-1, 1, 2, 2]])
    np.testing.assert_allclose(M.merge_size_map(dropped, grid_size=(1, 4)), [[0.0, 1.5, 2.0, 1.5]])
    np.testing.assert_allclose(M.merge_size_map(np.full((2, 4), -1), grid_size=(2, 2)), 0.0)


def test_merge_size_map_agrees_with_a_per_image_loop():
    rng = np.random.default_rng(SEED)
    labels = rng.integers(-1, 9, (40, 20))
    ref_total, ref_count = np.zeros(20), np.zeros(20)
    for row in labels:
        for j, lab in enumerate(row):
            if lab >= 0:
                ref_total[j] += np.count_nonzero(row == lab)
                ref_count[j] += 1
    ref = np.where(ref_count > 0, ref_total / np.maximum(ref_count, 1), 0.0)
    np.testing.assert_allclose(M.merge_size_map(labels, grid_size=(4, 5)).ravel(), ref)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: M.depth_map(np.zeros((2, 6)), grid_size=(2, 2)), TraceMismatchError, r"has 4 patches .* 6"),
        (lambda: M.depth_map(np.zeros((2, 4)), grid_size=(0, 4)), ValueError, r"positive integers"),
        (lambda: M.depth_map(np.zeros((2, 4)), grid_size=4), ValueError, r"pair \(h, w\)"),
        (lambda: M.depth_map(np.zeros((2, 2, 2)), grid_size=(2, 2)), ValueError, r"depth must be 2-D"),
        (lambda: M.depth_map([[np.nan] * 4], grid_size=(2, 2)), ValueError, r"finite"),
        (lambda: M.depth_map(np.zeros((0, 4)), grid_size=(2, 2)), ValueError, r"no images"),
        (lambda: M.keep_frequency(np.full((1, 4), 0.5), grid_size=(2, 2)), ValueError, r"boolean"),
        (lambda: M.merge_size_map(np.zeros((1, 4)), grid_size=(2, 2)), ValueError, r"integer labels"),
    ],
)
def test_map_validation(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------
# map metrics: agreement with scipy
# --------------------------------------------------------------------------------------------


def test_kl_against_scipy_entropy(two_maps):
    p, q = two_maps
    ref = stats.entropy(p.ravel(), q.ravel())  # normalises both, natural log
    assert M.kl_divergence(p, q, eps=0) == pytest.approx(ref, rel=1e-12)
    assert M.kl_divergence(p, q) == pytest.approx(ref, rel=1e-6)  # eps smoothing
    forward, backward = M.kl_both(p, q)
    assert forward == M.kl_divergence(p, q) and backward == M.kl_divergence(q, p)


def test_kl_smoothing_keeps_zeros_finite():
    p, q = np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.0, 1.0])
    assert np.isinf(M.kl_divergence(p, q, eps=0))
    value = M.kl_divergence(p, q, eps=1e-12)
    assert np.isfinite(value) and value > 10  # about 0.5 log(0.5 / 1e-12)


def test_js_against_scipy(two_maps):
    p, q = two_maps
    assert M.js_divergence(p, q) == pytest.approx(jensenshannon(p.ravel(), q.ravel()) ** 2, rel=1e-10)
    assert M.js_divergence([1, 0], [0, 1]) == pytest.approx(np.log(2))


def test_correlations_against_scipy(two_maps):
    p, q = two_maps
    assert M.pcc(p, q) == pytest.approx(stats.pearsonr(p.ravel(), q.ravel())[0], rel=1e-12)
    assert M.scc(p, q) == pytest.approx(stats.spearmanr(p.ravel(), q.ravel())[0], rel=1e-12)
    ties_p, ties_q = np.array([1, 1, 2, 3, 3, 3]), np.array([5, 4, 4, 1, 2, 2])
    assert M.scc(ties_p, ties_q) == pytest.approx(stats.spearmanr(ties_p, ties_q)[0], rel=1e-12)


def test_plain_sim_is_one_minus_total_variation(two_maps):
    p, q = two_maps
    pn, qn = p / p.sum(), q / q.sum()
    assert M.sim(p, q, min_max=False) == pytest.approx(1 - 0.5 * np.abs(pn - qn).sum(), rel=1e-12)


def _benchmark_sim(p, q):
    """The MIT saliency benchmark's similarity.m, as plain loops: min-max rescale, normalise to sum 1, sum of minima."""
    maps = []
    for m in (np.asarray(p, float).ravel(), np.asarray(q, float).ravel()):
        lo, hi = min(m), max(m)
        scaled = [(v - lo) / (hi - lo) for v in m]
        total = sum(scaled)
        maps.append([v / total for v in scaled])
    return sum(min(x, y) for x, y in zip(*maps, strict=True))


def test_sim_follows_the_saliency_benchmark(two_maps):
    p, q = two_maps
    assert M.sim(p, q) == pytest.approx(_benchmark_sim(p, q), rel=1e-12)
    # the min-max rescaling makes SIM blind to an offset and a scale, unlike the plain intersection
    assert M.sim(p + 5.0, 3.0 * q) == pytest.approx(M.sim(p, q), rel=1e-12)
    assert M.sim(p + 5.0, q, min_max=False) != pytest.approx(M.sim(p, q, min_max=False), rel=1e-3)
    # depth-like maps (values 3..12): the plain intersection overstates their similarity
    depth_a, depth_b = 3.0 + 9.0 * p / p.max(), 3.0 + 9.0 * q / q.max()
    assert M.sim(depth_a, depth_b) < M.sim(depth_a, depth_b, min_max=False)
    # negative values are fine once rescaled
    assert M.sim(p - 10.0, q) == pytest.approx(_benchmark_sim(p, q), rel=1e-12)


def test_sim_constant_map_reads_as_uniform():
    const, ramp = np.full((2, 2), 3.0), np.arange(4.0).reshape(2, 2)
    # uniform 1/4 each vs ramp rescaled (0, 1/3, 2/3, 1) / 2 = (0, 1/6, 1/3, 1/2)
    assert M.sim(const, ramp) == pytest.approx(0 + 1 / 6 + 1 / 4 + 1 / 4, rel=1e-12)
    with pytest.raises(TypeError, match="min_max must be True or False"):
        M.sim(const, ramp, min_max="yes")


def _grid_coords(h, w):
    return np.stack(np.divmod(np.arange(h * w), w), axis=1).astype(float)


def test_emd_against_scipy_wasserstein(two_maps):
    p, q = two_maps
    coords = _grid_coords(*p.shape)
    ref = stats.wasserstein_distance_nd(coords, coords, p.ravel(), q.ravel())  # dual LP (milp)
    assert M.emd(p, q) == pytest.approx(ref, rel=1e-7)
    assert M.emd(p.ravel(), q.ravel(), grid_size=p.shape) == M.emd(p, q)


def test_emd_one_row_is_the_1d_wasserstein_distance():
    rng = np.random.default_rng(SEED)
    p, q = rng.random(11), rng.random(11)
    ref = stats.wasserstein_distance(np.arange(11), np.arange(11), p, q)  # CDF formula, no LP
    assert M.emd(p[None, :], q[None, :]) == pytest.approx(ref, rel=1e-9)
    assert M.emd(p, q, grid_size=(11, 1)) == pytest.approx(ref, rel=1e-9)


def test_emd_closed_forms():
    p, q = np.zeros((4, 5)), np.zeros((4, 5))
    p[0, 0], q[3, 4] = 1.0, 7.0  # unnormalised: mass is normalised first
    assert M.emd(p, q) == pytest.approx(5.0)
    p, q = np.zeros((3, 3)), np.zeros((3, 3))
    p[1, 1] = 1
    q[0, 1] = q[2, 1] = q[1, 0] = q[1, 2] = 1
    assert M.emd(p, q) == pytest.approx(1.0)
    assert M.emd(q, p) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# properties, parametrised over every metric
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METRICS))
def test_identity_gives_the_best_value(two_maps, name):
    p, _ = two_maps
    assert METRICS[name](p, p) == pytest.approx(BEST[name], abs=1e-12)
    assert METRICS[name](p, 3 * p) == pytest.approx(BEST[name], abs=1e-9)  # scale-free


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetry(two_maps, name):
    p, q = two_maps
    assert METRICS[name](p, q) == pytest.approx(METRICS[name](q, p), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", list(METRICS))
def test_bounds_and_plain_float(two_maps, name):
    p, q = two_maps
    value = METRICS[name](p, q)
    assert type(value) is float
    low, high = {
        "kl": (0, np.inf),
        "js": (0, np.log(2)),
        "pcc": (-1, 1),
        "scc": (-1, 1),
        "emd": (0, np.hypot(*p.shape)),
        "sim": (0, 1),
    }[name]
    assert low <= value <= high


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize(
    "pair",
    [
        (np.zeros((3, 3)), np.zeros((3, 3))),  # empty maps: uniform
        (np.zeros((3, 3)), np.arange(9.0).reshape(3, 3)),
        (np.ones((3, 3)), np.ones((3, 3)) * 2),  # constant maps
        (np.eye(3), np.ones((3, 3))),
        (np.diag([1.0, 0, 0]), np.diag([0, 0, 1.0])),  # disjoint supports
    ],
)
def test_edge_cases_are_finite(name, pair):
    value = METRICS[name](*pair)
    assert type(value) is float and np.isfinite(value)


def test_documented_edge_values():
    zero, const = np.zeros((2, 2)), np.full((2, 2), 3.0)
    assert M.sim(zero, const) == 1.0  # an all-zero map reads as uniform
    assert M.emd(zero, const) == 0.0
    assert M.pcc(const, const * 2) == 1.0 and M.scc(const, const) == 1.0
    assert M.pcc(const, np.arange(4.0).reshape(2, 2)) == 0.0


@pytest.mark.parametrize("name", list(METRICS))
def test_metric_validation(name):
    with pytest.raises(TraceMismatchError, match="same shape"):
        METRICS[name](np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        METRICS[name](np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    if name not in ("pcc", "scc", "sim"):
        with pytest.raises(ValueError, match="non-negative"):
            METRICS[name](np.array([[1.0, -1.0]]), np.array([[1.0, 2.0]]))
    if name == "sim":  # the benchmark's SIM rescales first; the plain intersection needs distributions
        with pytest.raises(ValueError, match="non-negative"):
            M.sim(np.array([[1.0, -1.0]]), np.array([[1.0, 2.0]]), min_max=False)


def test_emd_needs_a_grid_for_flat_maps():
    with pytest.raises(ValueError, match="grid_size is required"):
        M.emd(np.ones(4), np.ones(4))
    with pytest.raises(TraceMismatchError):
        M.emd(np.ones(4), np.ones(4), grid_size=(3, 2))
