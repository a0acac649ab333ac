"""Does a per-patch importance score agree with a reference more than a random method would?

A method that ranks patches (DynamicViT's keep probability, Top-K's class-token attention, the
mass a merging method gives each patch) can be compared with a reference ranking of the same
patches, e.g. the unreduced model's class-token attention at the same block:

* **top-k IoU** -- the ``k`` highest-scoring patches of each side as two kept sets (what two
  pruning methods with the same budget would keep), compared by intersection over union;
* **Spearman's rho** -- rank correlation of the two scores over all patches.

:func:`importance_agreement` gives both per image and compares their means with a **random
method**: the same scores placed on randomly permuted patch positions, independently per image and
per draw.  A random method keeps the score distribution (and so the tie structure and the kept
count) but not where the scores are; its IoU averages ``E[x / (2k - x)]`` with ``x``
hypergeometric, its rho averages 0 with variance ``1 / (n - 1)`` per image (no ties).  The
p-value is the share of random draws whose mean over the images is at least the observed mean
(one-sided, with the usual ``+1`` so that it is never 0).

Ties: the top-k sets break ties by patch position (lower index first, a stable sort); Spearman uses
average ranks (as :func:`scipy.stats.spearmanr`).  Scores are compared per image; torch tensors are
accepted through ``numpy()``.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from tokvis.analysis.correlation import _pearson_rows, _statistic_rows
from tokvis.errors import ArgumentValueError, TraceMismatchError
from tokvis.validate import as_array, check_int, check_seed

__all__ = ["importance_agreement", "rank_correlation", "top_k_mask"]

_CHUNK = 2**22  # permuted entries held at once by the random-method draws


def _scores(x, name: str) -> np.ndarray:
    arr = as_array(name, x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ArgumentValueError(
            f"{name} must be [num_images, num_patches] (or one image [num_patches]): got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ArgumentValueError(f"{name} has NaN or infinite values: give finite scores")
    return arr


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _scores(a, "scores"), _scores(b, "reference")
    if a.shape != b.shape:
        raise TraceMismatchError(f"scores and reference must score the same images and patches: {a.shape} vs {b.shape}")
    return a, b


def top_k_mask(scores, k: int) -> np.ndarray:
    """Boolean mask ``[num_images, num_patches]`` of each image's ``k`` highest scores (ties: lower index).

    Parameters
    ----------
    scores : float array [num_images, num_patches]
        Per-patch importance.
    k : int
        Patches kept per image.
    """
    s = _scores(scores, "scores")
    n = s.shape[1]
    k = check_int("k", k, minimum=1, maximum=n)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    mask = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def rank_correlation(scores, reference) -> np.ndarray:
    """Spearman's rho of each image's two score vectors, ``[num_images]`` (NaN where one side is constant).

    Parameters
    ----------
    scores, reference : float array [num_images, num_patches]
        Per-patch importance and the reference pattern, of the same images.
    """
    a, b = _pair(scores, reference)
    return _statistic_rows(a, b, "spearman")


def _iou_rows(ma: np.ndarray, mb: np.ndarray, k: int) -> np.ndarray:
    inter = (ma & mb).sum(-1)
    return inter / (2 * k - inter)


def importance_agreement(scores, reference, *, k: int, n_random: int = 1000, seed=0) -> dict:
    """Agreement of ``scores`` with ``reference`` per image, and the same for a random method.

    Parameters
    ----------
    scores, reference : array [num_images, num_patches]
        Per-patch importance of the compared method and of the reference (higher = more important).
    k : int in [1, num_patches]
        Size of the top-k sets compared by IoU (e.g. the block's token budget).
    n_random : int >= 1
        Draws of the random method (each permutes every image's scores independently).
    seed : int, numpy Generator or None
        Random state of the draws.

    Returns
    -------
    dict
        ``iou``, ``spearman``: float arrays ``[num_images]``; for each of the two statistics
        ``<stat>_mean`` (mean over the images), ``random_<stat>`` (array ``[n_random]``: the mean over
        the images of each random draw), ``random_<stat>_mean``, ``random_<stat>_ci`` (2.5 and 97.5
        percentiles of the draws) and ``<stat>_p`` (share of draws with a mean at least the
        observed one, ``(count + 1) / (n_random + 1)``); ``chance_iou`` (exact expected IoU of two
        random k-subsets, from the hypergeometric distribution); ``k``, ``n_random``.
    """
    a, b = _pair(scores, reference)
    n_random = check_int("n_random", n_random, minimum=1)
    ma, mb = top_k_mask(a, k), top_k_mask(b, k)
    ra, rb = stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)  # average ranks, as scipy's spearmanr
    N, n = a.shape
    out = {"k": int(k), "n_random": int(n_random), "iou": _iou_rows(ma, mb, k), "spearman": _pearson_rows(ra, rb)}
    rng = np.random.default_rng(check_seed("seed", seed))
    draws = {"iou": [], "spearman": []}
    step = max(1, _CHUNK // (N * n))
    for start in range(0, n_random, step):
        m = min(step, n_random - start)
        perm = np.argsort(rng.random((m, N, n)), axis=2)  # a random method: scores on shuffled patches
        draws["iou"].append(_iou_rows(np.take_along_axis(ma[None], perm, 2), mb[None], k).mean(1))
        draws["spearman"].append(np.nanmean(_pearson_rows(np.take_along_axis(ra[None], perm, 2), rb[None]), 1))
    for stat, values in draws.items():
        rand = np.concatenate(values)
        observed = float(np.nanmean(out[stat]))
        out[f"{stat}_mean"] = observed
        out[f"random_{stat}"] = rand
        out[f"random_{stat}_mean"] = float(rand.mean())
        out[f"random_{stat}_ci"] = (float(np.quantile(rand, 0.025)), float(np.quantile(rand, 0.975)))
        out[f"{stat}_p"] = float((np.sum(rand >= observed) + 1) / (n_random + 1))
    x = np.arange(k + 1)
    pmf = stats.hypergeom(n, k, k).pmf(x)
    out["chance_iou"] = float(np.sum(pmf * x / (2 * k - x)))
    return out
