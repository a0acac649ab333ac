"""Global spatial maps over a dataset, and metrics between two maps.

Maps summarise, for every patch position of the grid, what a reduction method does there over a
whole dataset (the study's Fig. "global pruning/merging maps"):

* :func:`depth_map` -- mean token depth: the block after which the patch is no longer its own token
  (``trace.depth()``);
* :func:`keep_frequency` -- fraction of images in which the patch is still its own token
  (``trace.kept(layer)``);
* :func:`merge_size_map` -- mean size of the merged group the patch belongs to
  (``trace.labels(layer)``).

Inputs are batched arrays ``[num_images, num_patches]`` (a 1-D array is one image) with the patch
grid given as ``grid_size=(h, w)``; outputs are float64 ``[h, w]`` arrays.

Map metrics compare two maps of the same shape (any shape; they are flattened):

* distributions -- the maps are normalised to sum to 1 first (values must be >= 0): :func:`kl_divergence`
  (and :func:`kl_both` for both directions), :func:`js_divergence` and :func:`emd` (earth mover's
  distance with the Euclidean distance between patch centres);
* :func:`sim` -- the MIT saliency benchmark's similarity (Bylinskii et al., "What do different
  evaluation metrics tell us about saliency models?", TPAMI 2019; ``code_forMetrics/similarity.m`` of
  cvzoya/saliency): each map is min-max rescaled to [0, 1], then normalised to sum 1, then
  ``SIM = sum_i min(P_i, Q_i)`` (``min_max=False``: the histogram intersection of the maps only
  divided by their sums);
* correlations of the raw values -- :func:`pcc` (Pearson) and :func:`scc` (Spearman).

Edge cases (never NaN): an all-zero map is normalised to the uniform distribution (it expresses no
spatial preference), and so is a constant map in :func:`sim` (its min-max rescaling is all zero); a
constant map has no spatial structure to correlate, so PCC / SCC are 1.0 when *both* maps are constant
and 0.0 when exactly one is.  Every scalar is returned as a plain ``float``.

Conventions
-----------
``convention="study"`` reproduces ``reduction_methods_analysis/heatmap_metrics.py`` of the "Which
Tokens to Use?" study (Haurum et al., ICCVW 2023), which follows the MIT saliency benchmark:

* :func:`kl_divergence` ``(p, q)`` is the study's ``KL(map1=p, map2=q) = sum q log2(q / p)``, i.e.
  KL(Q || P) in **bits**, without smoothing (``inf`` where P is 0 and Q is not); the study's column
  ``KLD12`` is ``kl_divergence(map_A, map_B, convention="study")``;
* :func:`js_divergence` is the study's ``JS``: ``KL(M || P) / 2 + KL(M || Q) / 2`` in bits with
  ``M = (P + Q) / 2``, built on the reversed KL.  It is **not** the Jensen-Shannon divergence
  (``KL(P || M) / 2 + KL(Q || M) / 2``, the standard here): it is unbounded and ``inf`` where one map
  is 0 and the other is not.  Offered only to reproduce the study's column ``JSD``;
* SIM, PCC, SCC and EMD are the same under both conventions.

Where the study's numpy code gives NaN (``0 * log 0`` for a patch where both maps, or Q alone in KL,
are 0; an all-zero or constant map), tokvis uses ``0 log 0 = 0`` and the edge cases above.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, sparse, special, stats

from tokvis.analysis.patterns import _as_batch, _dense_rows, check_convention
from tokvis.errors import ArgumentTypeError, ArgumentValueError, TraceMismatchError
from tokvis.validate import check_float

__all__ = [
    "depth_map",
    "emd",
    "js_divergence",
    "keep_frequency",
    "kl_both",
    "kl_divergence",
    "merge_size_map",
    "pcc",
    "scc",
    "sim",
]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_grid(grid_size, num_patches: int) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in grid_size)
    except (TypeError, ValueError):
        raise ArgumentValueError(f"grid_size must be a pair (h, w) of positive integers: got {grid_size!r}") from None
    if h <= 0 or w <= 0:
        raise ArgumentValueError(f"grid_size must be a pair (h, w) of positive integers: got {grid_size!r}")
    if h * w != num_patches:
        raise TraceMismatchError(
            f"grid_size {(h, w)} has {h * w} patches but the input has {num_patches} patches per image"
        )
    return h, w


def _values_2d(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim not in (1, 2):
        raise ArgumentValueError(
            f"{name} must be 2-D [num_images, num_patches] (or 1-D [num_patches] for one image): shape is {arr.shape}"
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ArgumentValueError(f"{name} must be numeric: dtype is {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ArgumentValueError(f"{name} must be finite (no NaN or inf)")
    return arr[None, :] if arr.ndim == 1 else arr


def _need_images(arr: np.ndarray, name: str) -> None:
    if arr.shape[0] == 0:
        raise ArgumentValueError(f"{name} holds no images: a map needs at least one")


# --------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------


def depth_map(depth, *, grid_size) -> np.ndarray:
    """Mean token depth of every patch position over a dataset.

    Parameters
    ----------
    depth : array [num_images, num_patches] or [num_patches]
        Per-patch depth (``trace.depth()``): the block after which the patch stops being its own
        token, the model depth if it never does.
    grid_size : (h, w)
        Patch grid, ``h * w == num_patches``.

    Returns
    -------
    ndarray float64 [h, w]
        Mean depth, in the units of ``depth`` (blocks).
    """
    arr = _values_2d(depth, "depth")
    _need_images(arr, "depth")
    h, w = _check_grid(grid_size, arr.shape[1])
    return arr.mean(axis=0).reshape(h, w)


def keep_frequency(kept, *, grid_size) -> np.ndarray:
    """Fraction of images in which each patch position is still its own token.

    Parameters
    ----------
    kept : bool array [num_images, num_patches] or [num_patches]
        ``trace.kept(layer)``; 0/1 integers are accepted.
    grid_size : (h, w)
        Patch grid.

    Returns
    -------
    ndarray float64 [h, w]
        Values in [0, 1].
    """
    arr = _as_batch(kept, "kept", kind="kept")
    arr = arr[None, :] if arr.ndim == 1 else arr
    _need_images(arr, "kept")
    h, w = _check_grid(grid_size, arr.shape[1])
    return arr.mean(axis=0, dtype=np.float64).reshape(h, w)


def _group_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of the group each patch belongs to within its image; 0 for dropped (negative) labels."""
    m, p = labels.shape
    valid = labels >= 0
    codes = labels
    if p and int(labels.max()) >= p:
        # sparse label values: relabel each row densely (order preserved) so bins stay O(m * p)
        codes, _ = _dense_rows(np.where(valid, labels, -1))
        codes = codes - (~valid).any(axis=1, keepdims=True)  # -1 was rank 0 where present
    codes = np.where(valid, codes, 0).astype(np.int64)
    size = max(p, 1)
    flat = (np.arange(m, dtype=np.int64)[:, None] * size + codes).ravel()
    counts = np.bincount(flat, weights=valid.ravel(), minlength=m * size)
    return np.where(valid, counts[flat].reshape(m, p), 0.0)


def merge_size_map(labels, *, grid_size) -> np.ndarray:
    """Mean size of the merged group each patch position belongs to.

    Parameters
    ----------
    labels : int array [num_images, num_patches] or [num_patches]
        ``trace.labels(layer)``: the token holding each patch, negative = dropped.
    grid_size : (h, w)
        Patch grid.

    Returns
    -------
    ndarray float64 [h, w]
        For each position, the mean over the images in which the patch is *not* dropped of the
        number of patches in its group (1 = unmerged).  Dropped patches contribute nothing; a
        position dropped in every image has value 0.0 (no group, and never NaN).
    """
    arr = _as_batch(labels, "labels", kind="labels")
    arr = arr[None, :] if arr.ndim == 1 else arr
    _need_images(arr, "labels")
    h, w = _check_grid(grid_size, arr.shape[1])
    sizes = _group_sizes(arr)
    present = np.count_nonzero(sizes > 0, axis=0)
    total = sizes.sum(axis=0)
    # positions dropped everywhere: no group to average -> 0.0
    out = np.divide(total, present, out=np.zeros(arr.shape[1]), where=present > 0)
    return out.reshape(h, w)


# --------------------------------------------------------------------------------------------
# map metrics
# --------------------------------------------------------------------------------------------


def _map_pair(p, q) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(p), np.asarray(q)
    for arr, name in ((a, "p"), (b, "q")):
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
            raise ArgumentValueError(f"{name} must be a numeric map: dtype is {arr.dtype}")
    if a.shape != b.shape:
        raise TraceMismatchError(f"p and q must be maps of the same shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ArgumentValueError("p and q are empty maps")
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ArgumentValueError("p and q must be finite (no NaN or inf)")
    return a, b


def _distribution(x: np.ndarray, name: str) -> np.ndarray:
    if (x < 0).any():
        raise ArgumentValueError(f"{name} must be non-negative to be read as a distribution: min is {x.min()}")
    total = x.sum()
    if total == 0:
        return np.full(x.shape, 1.0 / x.size)  # no mass anywhere: no spatial preference -> uniform
    return x / total


def _distributions(p, q) -> tuple[np.ndarray, np.ndarray]:
    a, b = _map_pair(p, q)
    return _distribution(a, "p"), _distribution(b, "q")


def kl_divergence(p, q, *, eps: float | None = None, convention: str = "standard") -> float:
    """Kullback-Leibler divergence of two maps read as distributions.

    Parameters
    ----------
    p, q : array, same shape
        Non-negative maps; each is normalised to sum to 1.
    eps : float >= 0, optional
        Smoothing: both distributions become ``(P + eps) / (1 + K eps)`` (``K`` = number of
        patches) before the divergence, so a zero where the other map has mass gives a large
        (about ``p log(p / eps)``) but finite value.  ``eps=0`` gives the unsmoothed divergence,
        which is ``inf`` in that case.  Default: ``1e-12`` (standard), ``0`` (study: no smoothing).
    convention : {"standard", "study"}
        ``"standard"``: ``KL(P || Q) = sum_i P_i ln(P_i / Q_i)`` in **nats**.  ``"study"``: the study's
        ``KL(map1=p, map2=q) = sum_i Q_i log2(Q_i / P_i)``, i.e. ``KL(Q || P)`` in **bits** (the MIT
        saliency benchmark's argument order: ``p`` is the prediction, ``q`` the reference).

    Returns
    -------
    float
        In [0, inf]; 0 iff the normalised maps are equal.  Not symmetric (see :func:`kl_both`).
    """
    study = check_convention(convention) == "study"
    a, b = _distributions(p, q)
    eps = (0.0 if study else 1e-12) if eps is None else eps
    check_float("eps", eps, low=0.0, high=np.inf, high_open=True)
    if eps:
        a = (a + eps) / (1 + a.size * eps)
        b = (b + eps) / (1 + b.size * eps)
    if study:
        return float(max(special.rel_entr(b, a).sum(), 0.0) / np.log(2))
    return float(max(special.rel_entr(a, b).sum(), 0.0))


def kl_both(p, q, *, eps: float | None = None, convention: str = "standard") -> tuple[float, float]:
    """Both directions ``(kl_divergence(p, q), kl_divergence(q, p))``; see :func:`kl_divergence`.

    Under ``convention="study"`` these are the study's columns ``(KLD12, KLD21)``.

    Parameters
    ----------
    p, q : array, same shape
        The two maps.
    eps : float >= 0, optional
        Smoothing, as in :func:`kl_divergence` (default: 1e-12 standard, 0 study).
    convention : {"standard", "study"}
        ``"study"``: the study's columns ``(KLD12, KLD21)`` in bits.
    """
    return kl_divergence(p, q, eps=eps, convention=convention), kl_divergence(q, p, eps=eps, convention=convention)


def js_divergence(p, q, *, convention: str = "standard") -> float:
    """Jensen-Shannon divergence of two maps read as distributions.

    ``convention="standard"``: ``JS = KL(P || M) / 2 + KL(Q || M) / 2`` with ``M = (P + Q) / 2``, in
    nats; no smoothing is needed.  Symmetric, in [0, log 2]; its square root is the Jensen-Shannon
    distance of ``scipy.spatial.distance.jensenshannon``.

    ``convention="study"``: the study's ``JS`` (column ``JSD``), ``KL(M || P) / 2 + KL(M || Q) / 2`` in
    bits, built on its reversed KL.  Not the Jensen-Shannon divergence: symmetric but unbounded, and
    ``inf`` where one map is 0 and the other is not.  Use it only to reproduce the study's numbers.

    Parameters
    ----------
    p, q : array, same shape
        The two maps.
    convention : {"standard", "study"}
        ``"standard"``: the Jensen-Shannon divergence in nats; ``"study"``: the study's ``JSD`` (see
        above).
    """
    study = check_convention(convention) == "study"
    a, b = _distributions(p, q)
    mid = (a + b) / 2
    if study:
        return float(max(special.rel_entr(mid, a).sum() + special.rel_entr(mid, b).sum(), 0.0) / 2 / np.log(2))
    js = (special.rel_entr(a, mid).sum() + special.rel_entr(b, mid).sum()) / 2
    return float(min(max(js, 0.0), np.log(2)))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    const_a, const_b = a.max() == a.min(), b.max() == b.min()
    if const_a or const_b:
        # a constant map has no spatial structure: two of them agree, one alone correlates with nothing
        return 1.0 if const_a and const_b else 0.0
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt(np.dot(da, da)), np.sqrt(np.dot(db, db))
    return float(np.clip(np.dot(da, db) / (na * nb), -1.0, 1.0))


def pcc(p, q) -> float:
    """Pearson correlation of two maps, in [-1, 1], symmetric.

    Values are used as they are (no normalisation needed: correlation is scale-invariant).  Both
    maps constant: 1.0; exactly one constant: 0.0.

    Parameters
    ----------
    p, q : array, same shape
        The two maps.
    """
    a, b = _map_pair(p, q)
    return _pearson(a, b)


def scc(p, q) -> float:
    """Spearman rank correlation of two maps, in [-1, 1], symmetric.

    Pearson correlation of the ranks (ties get their average rank).  Constant maps as in :func:`pcc`.

    Parameters
    ----------
    p, q : array, same shape
        The two maps.
    """
    a, b = _map_pair(p, q)
    return _pearson(stats.rankdata(a), stats.rankdata(b))


def _min_max(x: np.ndarray) -> np.ndarray:
    """The map rescaled to [0, 1] and normalised to sum 1; a constant map (no spatial preference) is uniform."""
    lo, hi = x.min(), x.max()
    if hi == lo:
        return np.full(x.shape, 1.0 / x.size)
    x = (x - lo) / (hi - lo)
    return x / x.sum()


def sim(p, q, *, min_max: bool = True) -> float:
    """Similarity (SIM) of two maps read as distributions, as the MIT saliency benchmark defines it.

    Each map is min-max rescaled to [0, 1] (``(x - min) / (max - min)``), then normalised to sum 1,
    then ``SIM = sum_i min(P_i, Q_i)`` (Bylinskii et al., TPAMI 2019; ``similarity.m`` of the
    benchmark's code; the "Which Tokens to Use?" study computes it the same way).  Values may be
    negative.  A constant map is read as uniform (the benchmark's code gives NaN there).

    ``min_max=False``: the plain histogram intersection of the maps divided by their sums (values
    must be >= 0; ``1 - sim`` is then the total variation distance).  Without the rescaling a map's
    offset counts: depth maps, whose minimum is the first reducing block, look more similar than
    they are.

    Parameters
    ----------
    p, q : array, same shape
        The two maps.
    min_max : bool
        Rescale each map to [0, 1] first, as the MIT saliency benchmark does (default); ``False``: the plain
        histogram intersection of the normalised maps.

    Returns
    -------
    float
        In [0, 1], symmetric; 1 iff the normalised maps are equal, 0 iff their supports are disjoint.
    """
    if not isinstance(min_max, (bool, np.bool_)):
        raise ArgumentTypeError(f"min_max must be True or False: got {min_max!r}")
    if min_max:
        a, b = _map_pair(p, q)
        a, b = _min_max(a), _min_max(b)
    else:
        a, b = _distributions(p, q)
    return float(np.clip(np.minimum(a, b).sum(), 0.0, 1.0))


def emd(p, q, *, grid_size=None) -> float:
    """Earth mover's distance between two maps read as distributions over the patch grid.

    The ground distance is the Euclidean distance between patch centres, in units of the patch
    spacing (neighbours are 1 apart, diagonal neighbours sqrt(2)).  Solved exactly as a transport
    linear program (HiGHS via :func:`scipy.optimize.linprog`).  Because the ground distance is a
    metric, mass present in both maps stays in place at no cost, so only the surplus
    ``max(P - Q, 0)`` is moved onto the deficit ``max(Q - P, 0)``: the LP has one variable per
    (surplus patch, deficit patch) pair.

    Parameters
    ----------
    p, q : array, same shape
        Non-negative maps, normalised to sum to 1.
    grid_size : (h, w), optional
        Patch grid of flattened maps; defaults to the shape of 2-D maps.

    Returns
    -------
    float
        In [0, diameter of the grid]; symmetric; 0 iff the normalised maps are equal.
    """
    shape = np.shape(p)
    a, b = _distributions(p, q)
    if grid_size is None:
        if len(shape) != 2:
            raise ArgumentValueError(f"grid_size is required unless the maps are 2-D [h, w]: shape is {shape}")
        grid_size = shape
    _, w = _check_grid(grid_size, a.size)
    rows, cols = np.divmod(np.arange(a.size), w)
    diff = a - b
    src, dst = np.flatnonzero(diff > 0), np.flatnonzero(diff < 0)
    if src.size == 0 or dst.size == 0:
        return 0.0  # identical distributions
    supply, demand = diff[src], -diff[dst]
    moved = supply.sum()  # total variation distance; rescale both sides to unit mass for the LP
    supply, demand = supply / moved, demand / demand.sum()
    if src.size == 1 or dst.size == 1:
        # a single source or sink: the plan is forced
        cost = np.hypot(rows[src][:, None] - rows[dst][None, :], cols[src][:, None] - cols[dst][None, :])
        plan = supply[:, None] * demand[None, :]
        return float(moved * (cost * plan).sum())
    cost = np.hypot(rows[src][:, None] - rows[dst][None, :], cols[src][:, None] - cols[dst][None, :]).ravel()
    ns, nd = src.size, dst.size
    var = np.arange(ns * nd)
    # equality constraints: row sums (out of each source) and column sums (into each sink)
    a_eq = sparse.csr_array(
        (
            np.ones(2 * ns * nd),
            (np.concatenate([var // nd, ns + var % nd]), np.concatenate([var, var])),
        ),
        shape=(ns + nd, ns * nd),
    )
    res = optimize.linprog(cost, A_eq=a_eq, b_eq=np.concatenate([supply, demand]), bounds=(0, None), method="highs")
    if res.status != 0:  # pragma: no cover - a balanced transport problem is always feasible
        raise RuntimeError(f"earth mover's distance: the transport LP failed ({res.message})")
    return float(max(moved * res.fun, 0.0))
