"""tokvis.analysis.importance: vectorised statistics checked against scipy / direct set arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tokvis.analysis import importance_agreement, iou, rank_correlation, top_k_mask
from tokvis.errors import TraceMismatchError


def _pair(seed=0, N=5, n=49, corr=0.6, ties=False):
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(N, n))
    a = corr * b + rng.normal(size=(N, n))
    if ties:
        a, b = np.round(a), np.round(b * 2)
    return a, b


@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlation_matches_scipy(ties):
    a, b = _pair(ties=ties)
    ours = rank_correlation(a, b)
    ref = [stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_top_k_mask_and_iou_match_sets():
    a, b = _pair(ties=True)
    k = 12
    ma, mb = top_k_mask(a, k), top_k_mask(b, k)
    assert (ma.sum(1) == k).all()
    for row, m in zip(a, ma, strict=True):  # stable tie-break: the lower index wins
        expected = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        assert set(np.flatnonzero(m)) == set(expected)
    res = importance_agreement(a, b, k=k, n_random=10)
    sets = [(set(np.flatnonzero(x)), set(np.flatnonzero(y))) for x, y in zip(ma, mb, strict=True)]
    direct = [len(x & y) / len(x | y) for x, y in sets]
    np.testing.assert_allclose(res["iou"], direct)
    np.testing.assert_allclose(res["iou"], iou(ma, mb))  # the pruning-pattern IoU of tokvis.analysis.patterns


def test_random_method_matches_theory():
    a, b = _pair(N=4, n=64)
    k = 16
    res = importance_agreement(a, b, k=k, n_random=4000, seed=1)
    # mean IoU of a random method: the exact hypergeometric expectation, computed by enumeration here
    x = np.arange(k + 1)
    pmf = stats.hypergeom(64, k, k).pmf(x)
    chance = float(np.sum(pmf * x / (2 * k - x)))
    assert res["chance_iou"] == pytest.approx(chance)
    sem = res["random_iou"].std() / np.sqrt(4000)
    assert abs(res["random_iou_mean"] - chance) < 5 * sem
    # Spearman of a random method: mean 0, variance 1/(n-1) per image, so 1/(N (n-1)) for the mean of N images
    assert abs(res["random_spearman_mean"]) < 5 * np.sqrt(1 / (4 * 63 * 4000))
    assert res["random_spearman"].var() == pytest.approx(1 / (4 * 63), rel=0.1)
    lo, hi = res["random_spearman_ci"]
    assert lo < 0 < hi


def test_agreeing_scores_are_significant_and_random_ones_are_not():
    a, b = _pair(N=6, n=100, corr=3.0)
    res = importance_agreement(a, b, k=50, n_random=500)
    assert res["spearman_mean"] > res["random_spearman_ci"][1]
    assert res["iou_mean"] > res["random_iou_ci"][1]
    assert res["spearman_p"] == pytest.approx(1 / 501) and res["iou_p"] == pytest.approx(1 / 501)
    same = importance_agreement(b, b, k=50, n_random=10)
    np.testing.assert_allclose(same["iou"], 1.0)
    np.testing.assert_allclose(same["spearman"], 1.0)
    noise = np.random.default_rng(9).normal(size=b.shape)
    res = importance_agreement(noise, b, k=50, n_random=500)
    assert res["spearman_p"] > 0.01


def test_one_image_and_torch_inputs():
    torch = pytest.importorskip("torch")
    a, b = _pair(N=1)
    res = importance_agreement(torch.from_numpy(a[0]), b[0], k=5, n_random=20)
    assert res["iou"].shape == (1,) and res["random_iou"].shape == (20,)


def test_bad_inputs():
    a, b = _pair()
    with pytest.raises(TraceMismatchError, match="same images and patches"):
        importance_agreement(a, b[:, :-1], k=3)
    with pytest.raises(ValueError, match="k must be an integer in"):
        importance_agreement(a, b, k=0)
    with pytest.raises(ValueError, match="k must be an integer in"):
        top_k_mask(a, a.shape[1] + 1)
    with pytest.raises(ValueError, match="n_random"):
        importance_agreement(a, b, k=3, n_random=0)
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        rank_correlation(bad, b)
    with pytest.raises(ValueError, match="num_images, num_patches"):
        rank_correlation(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
