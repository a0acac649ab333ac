"""Per-image similarity of token-reduction patterns, vectorised across images.

Two traces of the *same* images give, at one layer, two patterns per image:

* **pruning patterns** -- which patches are still their own token (``trace.kept(layer)``):
  compared with :func:`iou` and :func:`ioa`;
* **merging patterns** -- which token each patch ended up in (``trace.labels(layer)``, ``-1`` for
  dropped patches): compared as two partitions of the image's patches with :func:`homogeneity`,
  :func:`completeness`, :func:`v_measure`, :func:`normalized_mutual_info`, :func:`mutual_info`,
  :func:`adjusted_rand_index` and :func:`adjusted_mutual_info`, or several at once with
  :func:`merge_scores` (one contingency pass for all of them).

Inputs are batched arrays ``[num_images, num_patches]``; every function returns a float64 array
``[num_images]`` (one value per image), or a plain ``float`` when given one image as a 1-D array.
Nothing loops over images in Python: each image's contingency table is built for all images at
once by sorting ``true_label * num_pred_labels + pred_label`` keys within each row and counting runs,
and every metric is a function of per-image sums over the table cells and its margins.

Argument order
--------------
Every merging metric takes ``(labels_true, labels_pred)``, the order of scikit-learn's clustering
metrics: ``labels_true`` is the **reference** pattern, ``labels_pred`` the **compared** pattern.
Homogeneity is 1 when every group of the compared pattern lies inside one group of the reference;
completeness is 1 when every reference group lies inside one compared group, so
``homogeneity(a, b) == completeness(b, a)``.  V-measure (``beta=1``), NMI, mutual information, ARI
and AMI are symmetric.  The analysis scripts of the "Which Tokens to Use?" study called the
scikit-learn functions with the two patterns in the other order, so what the study reports as
homogeneity is :func:`completeness` here and vice versa; V-measure is unaffected.

Dropped patches
---------------
Negative labels mean "dropped" (pruned, or otherwise removed from the token set).  With
``dropped="exclude"`` (the default) a patch dropped in *either* pattern is left out of that image's
comparison.  With ``dropped="group"`` all dropped patches of one pattern form one extra group of
that pattern, so agreeing on what to drop counts as agreement.

Edge cases (never NaN)
----------------------
* An image with no patch left to compare (everything excluded, or ``num_patches == 0``) compares two
  identical empty partitions: every merging metric is 1.0 for it.
* One group on both sides (including a single remaining patch) is a perfect match: 1.0, as in
  scikit-learn.  One group on one side only: NMI, mutual information and AMI are 0.0, ARI is 0.0,
  homogeneity / completeness follow scikit-learn (1.0 for the side that is trivially nested).
* Identical partitions give exactly 1.0 for the normalised metrics (scikit-learn's AMI can return an
  arbitrary value when chance agreement equals the maximum, e.g. all-singleton partitions; here it is
  1.0).
* Pruning: two empty kept sets have IoU 1.0 (identical sets); IoA with an empty ``kept_b`` is 1.0
  (the empty set is vacuously covered by any ``kept_a``).

Conventions
-----------
``convention="standard"`` (default) gives the definitions above.  ``convention="study"`` reproduces
the analysis scripts of the "Which Tokens to Use?" study (Haurum et al., ICCVW 2023,
``reduction_methods_analysis/compare_pruning_*.py`` and ``compare_merging_*.py``):

* IoU and IoA are 0.0 whenever the intersection is empty, so also for two empty kept sets (IoU)
  and for an empty ``kept_b`` (IoA); otherwise they equal the standard values;
* homogeneity and completeness are swapped: the study called
  ``sklearn.metrics.homogeneity_completeness_v_measure(labels_B, labels_A)``, i.e. with the
  compared pattern as ``labels_true``, so its homogeneity is ``completeness(A, B)`` here;
  V-measure (the study's column ``NMI``) is symmetric and unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from tokvis.errors import AnalysisOptionError, ArgumentValueError, BlockIndexError, TraceMismatchError
from tokvis.validate import check_choice, check_float, check_names

__all__ = [
    "CONVENTIONS",
    "MERGE_METRICS",
    "Contingency",
    "adjusted_mutual_info",
    "adjusted_rand_index",
    "completeness",
    "contingency",
    "homogeneity",
    "ioa",
    "iou",
    "merge_scores",
    "mutual_info",
    "normalized_mutual_info",
    "v_measure",
]

#: ``convention=`` values of the analysis functions: tokvis's definitions, or the study's scripts.
CONVENTIONS = ("standard", "study")

#: Names accepted by :func:`merge_scores` (``metrics=``).
MERGE_METRICS = ("homogeneity", "completeness", "v_measure", "nmi", "mutual_info", "ari", "ami")

_DROPPED_MODES = ("exclude", "group")
_AVERAGE_METHODS = ("arithmetic", "geometric", "min", "max")
_INT32_MAX = np.iinfo(np.int32).max
_KEY_LIMIT = 2**62  # keys must stay well inside int64
_CHUNK_ENTRIES = 2**17  # patches per block of images in merge_scores


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def check_convention(convention) -> str:
    """``convention`` if it is one of :data:`CONVENTIONS`, else :class:`~tokvis.errors.AnalysisOptionError`."""
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise AnalysisOptionError(
            f"convention must be 'standard' (tokvis's definitions) or 'study' (the 'Which Tokens to Use?' "
            f"scripts' columns): got {convention!r}"
        )
    return convention


def _as_batch(x, name: str, *, kind: str) -> np.ndarray:
    """Validate a pattern array: 2-D [num_images, num_patches], or 1-D for one image."""
    arr = np.asarray(x)
    if arr.ndim not in (1, 2):
        raise ArgumentValueError(
            f"{name} must be 2-D [num_images, num_patches] (or 1-D [num_patches] for one image): shape is {arr.shape}"
        )
    if kind == "labels":
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise ArgumentValueError(f"{name} must hold integer labels (negative = dropped): dtype is {arr.dtype}")
        if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ArgumentValueError(f"{name} holds labels beyond the int64 range")
    else:  # kept masks
        if arr.dtype != np.bool_:
            if not np.issubdtype(arr.dtype, np.integer):
                raise ArgumentValueError(f"{name} must be boolean (or 0/1 integers): dtype is {arr.dtype}")
            if arr.size and (arr.min() < 0 or arr.max() > 1):
                raise ArgumentValueError(f"{name} must be boolean (or 0/1 integers): values outside {{0, 1}}")
            arr = arr.astype(np.bool_)
    return arr


def _as_pair(a, b, names: tuple[str, str], *, kind: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate two patterns of the same images; returns 2-D views and whether input was 1-D."""
    a = _as_batch(a, names[0], kind=kind)
    b = _as_batch(b, names[1], kind=kind)
    if a.shape != b.shape:
        raise TraceMismatchError(
            f"{names[0]} and {names[1]} must describe the same images and patches: shapes are {a.shape} and {b.shape}"
        )
    one = a.ndim == 1
    if one:
        a, b = a[None, :], b[None, :]
    return a, b, one


def _out(values: np.ndarray, one: bool):
    """float for 1-D input, float64 [num_images] otherwise."""
    return float(values[0]) if one else values


# --------------------------------------------------------------------------------------------
# pruning patterns
# --------------------------------------------------------------------------------------------


def iou(kept_a, kept_b, *, convention: str = "standard"):
    """Intersection over union of the kept patch sets, per image.

    Parameters
    ----------
    kept_a, kept_b : bool array [num_images, num_patches] or [num_patches]
        ``True`` where the patch is still its own token (``trace.kept(layer)``).  0/1 integers are
        accepted.
    convention : {"standard", "study"}
        Value for two empty sets: 1.0 (standard: identical sets) or 0.0 (the study's scripts,
        which return 0 whenever the intersection is empty).

    Returns
    -------
    ndarray float64 [num_images] or float
        ``|A & B| / |A | B|`` in [0, 1]; symmetric.
    """
    empty = 1.0 if check_convention(convention) == "standard" else 0.0
    a, b, one = _as_pair(kept_a, kept_b, ("kept_a", "kept_b"), kind="kept")
    inter = np.count_nonzero(a & b, axis=1)
    union = np.count_nonzero(a | b, axis=1)
    # both sets empty -> union 0 -> identical sets: 1.0 (standard); the study's scripts give 0
    out = np.divide(inter, union, out=np.full(a.shape[0], empty), where=union > 0)
    return _out(out, one)


def ioa(kept_a, kept_b, *, convention: str = "standard"):
    """Intersection over area of ``kept_b``: the fraction of B's kept patches that A keeps too.

    Parameters
    ----------
    kept_a, kept_b : bool array [num_images, num_patches] or [num_patches]
        Kept masks; ``kept_b`` is the set whose coverage is measured.
    convention : {"standard", "study"}
        Value for an empty B: 1.0 (standard: vacuously covered by any A) or 0.0 (the study's scripts).

    Returns
    -------
    ndarray float64 [num_images] or float
        ``|A & B| / |B|`` in [0, 1]; not symmetric.
    """
    empty = 1.0 if check_convention(convention) == "standard" else 0.0
    a, b, one = _as_pair(kept_a, kept_b, ("kept_a", "kept_b"), kind="kept")
    inter = np.count_nonzero(a & b, axis=1)
    area = np.count_nonzero(b, axis=1)
    out = np.divide(inter, area, out=np.full(a.shape[0], empty), where=area > 0)
    return _out(out, one)


# --------------------------------------------------------------------------------------------
# merging patterns: codes, runs and contingency cells
# --------------------------------------------------------------------------------------------


def _dense_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel each row to dense ids 0..K-1 (order preserved).

    Returns the dense ids [n, p] and a decode table [n, p] with ``table[i, d]`` the original value
    of dense id ``d`` in row ``i``.  Only needed when label values are too large for pair keys.
    """
    order = np.argsort(codes, axis=1, kind="stable")
    srt = np.take_along_axis(codes, order, axis=1)
    new = np.ones(srt.shape, dtype=np.int64)
    new[:, 0] = 0
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    rank = np.cumsum(new, axis=1)
    dense = np.empty_like(rank)
    np.put_along_axis(dense, order, rank, axis=1)
    table = np.zeros(srt.shape, dtype=np.int64)
    rows = np.repeat(np.arange(srt.shape[0]), srt.shape[1])
    table[rows, rank.ravel()] = srt.ravel()
    return dense, table


@dataclass(frozen=True)
class _Codes:
    """Non-negative codes of two patterns plus the mask of compared patches."""

    true: np.ndarray  # [n, p] int, >= 0
    pred: np.ndarray
    valid: np.ndarray | None  # [n, p] bool, None when every patch is compared
    size_true: int  # codes are < size_true / size_pred
    size_pred: int
    decode_true: np.ndarray | None  # decode tables when rows were densified
    decode_pred: np.ndarray | None


def _encode(a: np.ndarray, b: np.ndarray, dropped: str) -> _Codes:
    valid = None
    if dropped == "group":
        # all negative labels -> code 0 (the "dropped" group), label l -> code l + 1
        a = np.maximum(a, -1).astype(np.int64) + 1 if a.size and a.min() < 0 else a
        b = np.maximum(b, -1).astype(np.int64) + 1 if b.size and b.min() < 0 else b
    else:
        neg_a = a.size > 0 and a.min() < 0
        neg_b = b.size > 0 and b.min() < 0
        if neg_a or neg_b:
            valid = (a >= 0) & (b >= 0)
    size_a = int(a.max()) + 1 if a.size else 1
    size_b = int(b.max()) + 1 if b.size else 1
    size_a, size_b = max(size_a, 1), max(size_b, 1)
    dec_a = dec_b = None
    if (size_a + 1) * (size_b + 1) >= _KEY_LIMIT:
        # huge label values: relabel rows densely so pair keys cannot overflow
        a, dec_a = _dense_rows(a)
        b, dec_b = _dense_rows(b)
        size_a = size_b = a.shape[1] + 1
    return _Codes(a, b, valid, size_a, size_b, dec_a, dec_b)


def _runs(keys: np.ndarray, sentinel: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal keys within each row.

    Returns ``(image, value, count)`` for every distinct key of every row (rows in order, keys
    ascending within a row), leaving out the ``sentinel`` key that marks excluded patches.
    """
    n, p = keys.shape
    srt = np.sort(keys, axis=1)
    new = np.empty(srt.shape, dtype=np.bool_)
    new[:, 0] = True
    np.not_equal(srt[:, 1:], srt[:, :-1], out=new[:, 1:])
    starts = np.flatnonzero(new)
    counts = np.diff(starts, append=n * p)
    values = srt.ravel()[starts]
    if sentinel is not None:
        keep = values != sentinel
        starts, counts, values = starts[keep], counts[keep], values[keep]
    return starts // p, values, counts


def _keyed(codes: np.ndarray, size: int, valid: np.ndarray | None) -> tuple[np.ndarray, int | None]:
    """Codes with excluded patches replaced by the sentinel ``size`` (sorts last)."""
    dtype = np.int32 if size < _INT32_MAX else np.int64
    keys = codes.astype(dtype, copy=valid is not None)
    if valid is None:
        return keys, None
    keys[~valid] = size
    return keys, size


def _joint_keys(c: _Codes) -> tuple[np.ndarray, int | None]:
    total = c.size_true * c.size_pred
    dtype = np.int32 if total < _INT32_MAX else np.int64
    keys = c.true.astype(dtype) * dtype(c.size_pred)
    keys += c.pred.astype(dtype, copy=False)
    if c.valid is None:
        return keys, None
    keys[~c.valid] = total
    return keys, total


@dataclass(frozen=True)
class _Sums:
    """Per-image sums over the contingency table: everything the metrics need."""

    n: np.ndarray  # [m] patches compared
    k_true: np.ndarray  # number of groups
    k_pred: np.ndarray
    s_true: np.ndarray  # sum of c*log(c) over groups / cells
    s_pred: np.ndarray
    s_joint: np.ndarray
    q_true: np.ndarray  # sum of c**2 (exact integers in float64)
    q_pred: np.ndarray
    q_joint: np.ndarray
    marg_true: tuple[np.ndarray, np.ndarray] | None  # (image, size) of every group, for AMI
    marg_pred: tuple[np.ndarray, np.ndarray] | None


def _row_sums(keys: np.ndarray, sentinel: int | None, n_valid: np.ndarray, xlogx_step: np.ndarray):
    """Per row: number of distinct keys, sum of c*log(c) and of c**2 over their counts c.

    Works in the [rows, p] layout, with no per-cell arrays: after sorting each row, ``r`` is the
    1-based position of every entry within its run of equal keys, and for any ``f`` with
    ``f(0) = 0`` a run of length ``c`` telescopes to ``f(c) = sum_{r=1..c} f(r) - f(r - 1)``.
    So ``sum_cells c log c = sum_entries xlogx_step[r]`` and ``sum_cells c**2 = sum_entries 2r - 1``.
    Excluded entries carry the sentinel, sort last, and get ``r = 0``.
    """
    p = keys.shape[1]
    srt = np.sort(keys, axis=1)
    new = np.empty(srt.shape, dtype=np.bool_)
    new[:, 0] = True
    np.not_equal(srt[:, 1:], srt[:, :-1], out=new[:, 1:])
    dtype = np.int16 if p < 2**15 else np.int32 if p < 2**31 else np.int64
    pos = np.arange(p, dtype=dtype)
    run_start = np.where(new, pos, dtype(0))
    np.maximum.accumulate(run_start, axis=1, out=run_start)
    r = pos + dtype(1) - run_start
    k = np.count_nonzero(new, axis=1)
    if sentinel is not None:
        r[pos >= n_valid[:, None].astype(dtype)] = 0
        k = k - (n_valid < p)  # the sentinel's own run
    s = xlogx_step[r].sum(axis=1)
    q = 2.0 * r.sum(axis=1, dtype=np.int64) - n_valid
    return k, s, q


def _sums(c: _Codes, *, margins: bool) -> _Sums:
    m, p = c.true.shape
    if c.valid is None:
        n = np.full(m, p, dtype=np.int64)
    else:
        n = np.count_nonzero(c.valid, axis=1)
    # xlogx_step[r] = r log r - (r - 1) log(r - 1), with 0 log 0 = 0
    xlogx = np.zeros(p + 1)
    xlogx[1:] = np.arange(1, p + 1) * np.log(np.arange(1, p + 1))
    step = np.zeros(p + 1)
    step[1:] = np.diff(xlogx)
    keys_t = _keyed(c.true, c.size_true, c.valid)
    keys_p = _keyed(c.pred, c.size_pred, c.valid)
    k_t, s_t, q_t = _row_sums(*keys_t, n, step)
    k_p, s_p, q_p = _row_sums(*keys_p, n, step)
    _, s_j, q_j = _row_sums(*_joint_keys(c), n, step)
    marg_t = marg_p = None
    if margins:
        img, _, cnt = _runs(*keys_t)
        marg_t = (img, cnt)
        img, _, cnt = _runs(*keys_p)
        marg_p = (img, cnt)
    return _Sums(n.astype(np.float64), k_t, k_p, s_t, s_p, s_j, q_t, q_p, q_j, marg_t, marg_p)


# --------------------------------------------------------------------------------------------
# expected mutual information (for AMI), vectorised over images
# --------------------------------------------------------------------------------------------


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """concatenate(arange(l) for l in lengths), without a Python loop."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def _distinct_sizes(image: np.ndarray, size: np.ndarray, p: int):
    """Distinct group sizes of every image with their multiplicity, sorted by image."""
    key, mult = np.unique(image * (p + 1) + size, return_counts=True)
    return key // (p + 1), key % (p + 1), mult


def _expected_mutual_info(s: _Sums, p: int) -> np.ndarray:
    """E[MI] of two random partitions with the observed group sizes (hypergeometric model).

    EMI of an image is ``sum_ij T(n, a_i, b_j)`` with ``T`` the expectation over the cell count
    ``k ~ Hypergeometric(n, a, b)`` of ``k/n log(n k / (a b))``.  ``T`` depends only on the triple
    ``(n, a, b)``, so it is evaluated once per distinct triple of the whole batch (few: group sizes
    repeat a lot) and summed back with the multiplicities of the sizes -- no loop over images.
    """
    m = s.n.shape[0]
    img_a, size_a, mult_a = _distinct_sizes(*s.marg_true, p)
    img_b, size_b, mult_b = _distinct_sizes(*s.marg_pred, p)
    # Cartesian product, within each image, of its distinct true sizes and distinct pred sizes
    nb = np.bincount(img_b, minlength=m)
    first_b = np.cumsum(nb) - nb
    reps = nb[img_a]
    ia = np.repeat(np.arange(img_a.shape[0]), reps)
    ib = np.repeat(first_b[img_a], reps) + _ragged_arange(reps)
    img = img_a[ia]
    n = s.n.astype(np.int64)[img]
    a, b = size_a[ia], size_b[ib]
    weight = (mult_a[ia] * mult_b[ib]).astype(np.float64)
    # T is symmetric in (a, b): evaluate it once per distinct (n, min, max)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    triple, inv = np.unique((n * (p + 1) + lo) * (p + 1) + hi, return_inverse=True)
    tn, tlo, thi = triple // (p + 1) ** 2, (triple // (p + 1)) % (p + 1), triple % (p + 1)
    # every k with non-zero probability: max(1, a + b - n) .. min(a, b)  (k = 0 contributes 0)
    k_first = np.maximum(1, tlo + thi - tn)
    lengths = np.maximum(tlo - k_first + 1, 0)
    t_id = np.repeat(np.arange(triple.shape[0]), lengths)
    k = np.repeat(k_first, lengths) + _ragged_arange(lengths)
    tn, ta, tb = tn[t_id], tlo[t_id], thi[t_id]
    lgf = gammaln(np.arange(p + 2, dtype=np.float64))  # lgf[x] = log((x - 1)!)
    log_pmf = (
        lgf[ta + 1] + lgf[tb + 1] + lgf[tn - ta + 1] + lgf[tn - tb + 1]
        - lgf[tn + 1] - lgf[k + 1] - lgf[ta - k + 1] - lgf[tb - k + 1] - lgf[tn - ta - tb + k + 1]
    )  # fmt: skip
    kf, nf = k.astype(np.float64), tn.astype(np.float64)
    term = kf / nf * (np.log(nf) + np.log(kf) - np.log(ta.astype(np.float64)) - np.log(tb.astype(np.float64)))
    t_val = np.bincount(t_id, weights=term * np.exp(log_pmf), minlength=triple.shape[0])
    return np.bincount(img, weights=weight * t_val[inv], minlength=m)


# --------------------------------------------------------------------------------------------
# merging patterns: public API
# --------------------------------------------------------------------------------------------


def _merge_metrics(s: _Sums, metrics, *, beta: float, average_method: str, p: int) -> dict[str, np.ndarray]:
    n = s.n
    nz = np.maximum(n, 1.0)  # n == 0 only for empty images; their values are overwritten below
    logn = np.log(nz)
    split_t, split_p = s.k_true > 1, s.k_pred > 1
    # entropies (nats); a single group has entropy exactly 0
    h_t = np.where(split_t, logn - s.s_true / nz, 0.0)
    h_p = np.where(split_p, logn - s.s_pred / nz, 0.0)
    # MI = log n + (sum c_ij log c_ij - sum a_i log a_i - sum b_j log b_j) / n; 0 with one group
    mi = np.where(split_t & split_p, logn + (s.s_joint - s.s_true - s.s_pred) / nz, 0.0)
    mi = np.maximum(mi, 0.0)
    # exact integer tests: each compared group inside one reference group, and conversely
    homogeneous = s.q_pred == s.q_joint
    complete = s.q_true == s.q_joint
    identical = homogeneous & complete  # also true for empty images and n == 1
    trivial = ~split_t & ~split_p  # one group (or none) on both sides

    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        hom = np.clip(np.where(homogeneous, 1.0, mi / h_t), 0.0, 1.0)
        com = np.clip(np.where(complete, 1.0, mi / h_p), 0.0, 1.0)
        if "homogeneity" in metrics:
            out["homogeneity"] = hom
        if "completeness" in metrics:
            out["completeness"] = com
        if "v_measure" in metrics:
            den = beta * hom + com
            v = np.where(den > 0, (1.0 + beta) * hom * com / den, 0.0)
            out["v_measure"] = np.where(identical, 1.0, np.clip(v, 0.0, 1.0))
        if "mutual_info" in metrics:
            out["mutual_info"] = mi
        if "nmi" in metrics:
            norm = _average(h_t, h_p, average_method)
            nmi = np.clip(mi / norm, 0.0, 1.0)
            # identical or both unsplit -> 1; MI == 0 otherwise (includes one unsplit side) -> 0
            out["nmi"] = np.where(identical | trivial, 1.0, np.where(mi > 0, nmi, 0.0))
        if "ari" in metrics:
            # pair counting (Hubert & Arabie): all terms are exact integers in float64
            pairs = n * (n - 1) / 2
            idx = (s.q_joint - n) / 2
            sa, sb = (s.q_true - n) / 2, (s.q_pred - n) / 2
            num = pairs * idx - sa * sb
            den = pairs * (sa + sb) / 2 - sa * sb
            # den == 0 only for identical partitions (all singletons or one group on both sides)
            ari = np.where(identical, 1.0, num / np.where(den == 0, 1.0, den))
            out["ari"] = ari
        if "ami" in metrics:
            emi = _expected_mutual_info(s, p)
            norm = _average(h_t, h_p, average_method)
            den = norm - emi
            eps = np.finfo(np.float64).eps
            # keep the sign when rounding pushes EMI just past the normaliser
            den = np.where(den < 0, np.minimum(den, -eps), np.maximum(den, eps))
            ami = (mi - emi) / den
            ami = np.where(split_t ^ split_p, 0.0, ami)  # one unsplit side: no information
            out["ami"] = np.where(identical | trivial, 1.0, ami)
    return out


def _average(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    if method == "arithmetic":
        return (x + y) / 2
    if method == "geometric":
        return np.sqrt(x * y)
    if method == "min":
        return np.minimum(x, y)
    return np.maximum(x, y)


def merge_scores(
    labels_true,
    labels_pred,
    *,
    metrics=("homogeneity", "completeness", "v_measure", "ari"),
    dropped: str = "exclude",
    beta: float = 1.0,
    average_method: str = "arithmetic",
) -> dict:
    """Several merging-pattern metrics from one contingency pass.

    Parameters
    ----------
    labels_true : int array [num_images, num_patches] or [num_patches]
        Reference pattern: the token each patch belongs to (``trace.labels(layer)``); negative =
        dropped.  Label values only matter within one image.
    labels_pred : int array, same shape
        Compared pattern.
    metrics : iterable of str
        Any of :data:`MERGE_METRICS`: ``"homogeneity"``, ``"completeness"``, ``"v_measure"``,
        ``"nmi"`` (normalised mutual information), ``"mutual_info"`` (nats), ``"ari"``, ``"ami"``.
    dropped : {"exclude", "group"}
        ``"exclude"``: leave out, per image, patches dropped in either pattern.  ``"group"``: the
        dropped patches of each pattern form one extra group.
    beta : float > 0
        V-measure weight of homogeneity (``beta < 1``) versus completeness (``beta > 1``).
    average_method : {"arithmetic", "geometric", "min", "max"}
        Normaliser of NMI and AMI (mean of the two entropies).  V-measure with ``beta=1`` equals
        NMI with ``"arithmetic"``.

    Returns
    -------
    dict
        metric name -> float64 array [num_images] (values in [0, 1]; ARI and AMI in [-1, 1];
        mutual information in [0, log num_patches]), or -> float for 1-D input.

    Notes
    -----
    Cost: three row-wise sorts of ``num_images x num_patches`` integer keys and a few ``bincount``
    passes.  AMI adds the expected mutual information, computed once per distinct
    ``(n, group size, group size)`` triple of the batch.
    """
    a, b, one = _as_pair(labels_true, labels_pred, ("labels_true", "labels_pred"), kind="labels")
    check_choice("dropped", dropped, _DROPPED_MODES)
    check_choice("average_method", average_method, _AVERAGE_METHODS)
    metrics = check_names("metrics", metrics)
    for name in metrics:
        check_choice("each metric", name, MERGE_METRICS)
    check_float("beta", beta, low=0.0, high=np.inf, low_open=True, high_open=True)
    if a.shape[0] == 0:
        return {name: np.zeros(0) for name in metrics}
    if a.shape[1] == 0:
        # no patches at all: identical empty partitions (mutual information 0)
        values = {name: np.full(a.shape[0], 0.0 if name == "mutual_info" else 1.0) for name in metrics}
        return {name: _out(values[name], one) for name in metrics}
    # blocks of images keep the working set small (memory, cache); no per-image work in Python
    step = max(1, _CHUNK_ENTRIES // max(a.shape[1], 1))
    parts = []
    for lo in range(0, a.shape[0], step):
        codes = _encode(a[lo : lo + step], b[lo : lo + step], dropped)
        sums = _sums(codes, margins="ami" in metrics)
        parts.append(_merge_metrics(sums, metrics, beta=float(beta), average_method=average_method, p=a.shape[1]))
    values = {name: np.concatenate([part[name] for part in parts]) for name in metrics}
    return {name: _out(values[name], one) for name in metrics}


def _single(metric: str, labels_true, labels_pred, **options):
    return merge_scores(labels_true, labels_pred, metrics=(metric,), **options)[metric]


def homogeneity(labels_true, labels_pred, *, dropped: str = "exclude", convention: str = "standard"):
    """Homogeneity per image: each group of ``labels_pred`` lies inside one group of ``labels_true``.

    ``MI / H(labels_true)`` in [0, 1]; 1.0 when ``labels_true`` has a single group.  See
    :func:`merge_scores` for the parameters and the module docstring for the argument order and
    edge cases.  ``convention="study"`` gives what the study's scripts report as homogeneity for
    reference A and compared B: ``MI / H(labels_pred)``, i.e. :func:`completeness` (the study passed
    the patterns to scikit-learn the other way round).  Returns float64 [num_images], or float.

    Parameters
    ----------
    labels_true : int array [num_images, num_patches] or [num_patches]
        Reference pattern (``trace.labels(layer)``); negative = dropped.
    labels_pred : int array, same shape
        Compared pattern.
    dropped : {"exclude", "group"}
        Patches dropped in either pattern: left out, or one extra group per pattern (see :func:`merge_scores`).
    convention : {"standard", "study"}
        ``"study"``: the study's column (see above).
    """
    name = "homogeneity" if check_convention(convention) == "standard" else "completeness"
    return _single(name, labels_true, labels_pred, dropped=dropped)


def completeness(labels_true, labels_pred, *, dropped: str = "exclude", convention: str = "standard"):
    """Completeness per image: each group of ``labels_true`` lies inside one group of ``labels_pred``.

    ``MI / H(labels_pred)`` in [0, 1]; ``completeness(a, b) == homogeneity(b, a)``.  See
    :func:`merge_scores`.  ``convention="study"``: the study's completeness column,
    ``MI / H(labels_true)`` (:func:`homogeneity` here).  Returns float64 [num_images], or float.

    Parameters
    ----------
    labels_true : int array [num_images, num_patches] or [num_patches]
        Reference pattern (``trace.labels(layer)``); negative = dropped.
    labels_pred : int array, same shape
        Compared pattern.
    dropped : {"exclude", "group"}
        Patches dropped in either pattern: left out, or one extra group per pattern (see :func:`merge_scores`).
    convention : {"standard", "study"}
        ``"study"``: the study's column (see above).
    """
    name = "completeness" if check_convention(convention) == "standard" else "homogeneity"
    return _single(name, labels_true, labels_pred, dropped=dropped)


def v_measure(labels_true, labels_pred, *, beta: float = 1.0, dropped: str = "exclude"):
    """V-measure per image: weighted harmonic mean of homogeneity and completeness.

    ``(1 + beta) h c / (beta h + c)`` in [0, 1]; with ``beta=1`` it is symmetric and equals NMI with
    arithmetic normalisation.  See :func:`merge_scores`.  Returns float64 [num_images], or float.

    Parameters
    ----------
    labels_true : int array [num_images, num_patches] or [num_patches]
        Reference pattern (``trace.labels(layer)``); negative = dropped.
    labels_pred : int array, same shape
        Compared pattern.
    beta : float > 0
        Weight of homogeneity (``beta < 1``) versus completeness (``beta > 1``).
    dropped : {"exclude", "group"}
        Patches dropped in either pattern: left out, or one extra group per pattern (see :func:`merge_scores`).
    """
    return _single("v_measure", labels_true, labels_pred, beta=beta, dropped=dropped)


def normalized_mutual_info(labels_true, labels_pred, *, average_method: str = "arithmetic", dropped: str = "exclude"):
    """Normalised mutual information per image, in [0, 1], symmetric.

    ``MI / mean(H_true, H_pred)`` with the mean chosen by ``average_method``.  See
    :func:`merge_scores`.  Returns float64 [num_images], or float for 1-D input.

    Parameters
    ----------
    labels_true : int array [num_images, num_patches] or [num_patches]
        Reference pattern (``trace.labels(layer)``); negative = dropped.
    labels_pred : int array, same shape
        Compared pattern.
    average_method : {"arithmetic", "geometric", "min", "max"}
        Mean of the two entropies used as the normaliser.
    dropped : {"exclude", "group"}
        Patches dropped in either pattern: left out, or one extra group per pattern (see :func:`merge_scores`).
    """
    return _single("nmi", labels_true, labels_pred, average_method=average_method, dropped=dropped)


def mutual_info(labels_true, labels_pred, *, dropped: str = "exclude"):
    """Mutual information (nats) per image, in [0, log num_patches], symmetric.

    0.0 when either side has one group, and for images with nothing to compare.  Returns float64
    [num_images], or float for 1-D input.

    Parameters
    ----------
    labels_true : int array [num_images, num_patches] or [num_patches]
        Reference pattern (``trace.labels(layer)``); negative = dropped.
    labels_pred : int array, same shape
        Compared pattern.
    dropped : {"exclude", "group"}
        Patches dropped in either pattern: left out, or one extra group per pattern (see :func:`merge_scores`).
    """
    return _single("mutual_info", labels_true, labels_pred, dropped=dropped)


def adjusted_rand_index(labels_true, labels_pred, *, dropped: str = "exclude"):
    """Adjusted Rand index per image, in [-1, 1] (0 = chance level), symmetric.

    Pair counting: ``(index - expected) / (max - expected)`` with ``index = sum C(n_ij, 2)``.
    Identical partitions (including one group on both sides, or all singletons) give 1.0.  Returns
    float64 [num_images], or float for 1-D input.

    Parameters
    ----------
    labels_true : int array [num_images, num_patches] or [num_patches]
        Reference pattern (``trace.labels(layer)``); negative = dropped.
    labels_pred : int array, same shape
        Compared pattern.
    dropped : {"exclude", "group"}
        Patches dropped in either pattern: left out, or one extra group per pattern (see :func:`merge_scores`).
    """
    return _single("ari", labels_true, labels_pred, dropped=dropped)


def adjusted_mutual_info(labels_true, labels_pred, *, average_method: str = "arithmetic", dropped: str = "exclude"):
    """Adjusted mutual information per image, at most 1 (0 = chance level), symmetric.

    ``(MI - E[MI]) / (mean(H_true, H_pred) - E[MI])`` with the expectation under random partitions
    with the same group sizes (hypergeometric model), as scikit-learn's
    ``adjusted_mutual_info_score``.  The expectation is vectorised over images: it is evaluated once
    per distinct ``(n, a, b)`` triple of group sizes in the batch.  Returns float64 [num_images], or
    float for 1-D input.

    Parameters
    ----------
    labels_true : int array [num_images, num_patches] or [num_patches]
        Reference pattern (``trace.labels(layer)``); negative = dropped.
    labels_pred : int array, same shape
        Compared pattern.
    average_method : {"arithmetic", "geometric", "min", "max"}
        Mean of the two entropies used as the normaliser.
    dropped : {"exclude", "group"}
        Patches dropped in either pattern: left out, or one extra group per pattern (see :func:`merge_scores`).
    """
    return _single("ami", labels_true, labels_pred, average_method=average_method, dropped=dropped)


# --------------------------------------------------------------------------------------------
# contingency tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contingency:
    """Sparse per-image contingency tables of two patterns (non-zero cells only).

    Attributes
    ----------
    num_images : int
    n : int64 [num_images]
        Patches compared in each image (after the ``dropped`` rule).
    image, label_true, label_pred, count : int64 [num_cells]
        One row per non-zero cell, sorted by image, then ``label_true``, then ``label_pred``.  With
        ``dropped="group"`` the dropped group has label -1.
    """

    num_images: int
    n: np.ndarray
    image: np.ndarray
    label_true: np.ndarray
    label_pred: np.ndarray
    count: np.ndarray

    def table(self, image: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense table of one image: ``(true_labels [Ka], pred_labels [Kb], counts [Ka, Kb])``.

        Rows and columns follow the sorted label values, as scikit-learn's ``contingency_matrix``.
        """
        if not 0 <= image < self.num_images:
            raise BlockIndexError(f"image must be in [0, {self.num_images}): got {image}")
        lo, hi = np.searchsorted(self.image, [image, image + 1])
        lt, lp, cnt = self.label_true[lo:hi], self.label_pred[lo:hi], self.count[lo:hi]
        rows, ri = np.unique(lt, return_inverse=True)
        cols, ci = np.unique(lp, return_inverse=True)
        dense = np.zeros((rows.shape[0], cols.shape[0]), dtype=np.int64)
        dense[ri, ci] = cnt
        return rows, cols, dense


def contingency(labels_true, labels_pred, *, dropped: str = "exclude") -> Contingency:
    """Per-image contingency tables of two merging patterns, as sparse cells.

    Parameters
    ----------
    labels_true, labels_pred : int array [num_images, num_patches] or [num_patches]
        Reference and compared pattern (negative = dropped).
    dropped : {"exclude", "group"}
        As in :func:`merge_scores`.

    Returns
    -------
    Contingency
        ``count[c]`` patches of image ``image[c]`` have reference label ``label_true[c]`` and
        compared label ``label_pred[c]``.  A 1-D input is one image.
    """
    a, b, _ = _as_pair(labels_true, labels_pred, ("labels_true", "labels_pred"), kind="labels")
    check_choice("dropped", dropped, _DROPPED_MODES)
    m = a.shape[0]
    if a.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Contingency(m, np.zeros(m, dtype=np.int64), empty, empty, empty, empty)
    c = _encode(a, b, dropped)
    image, value, count = _runs(*_joint_keys(c))
    code_t, code_p = value.astype(np.int64) // c.size_pred, value.astype(np.int64) % c.size_pred

    def decode(codes, table, original):
        if table is not None:
            codes = table[image, codes]
        if dropped == "group" and original.min() < 0:
            codes = codes - 1  # code 0 was the dropped group
        return codes

    lt = decode(code_t, c.decode_true, a)
    lp = decode(code_p, c.decode_pred, b)
    n = np.bincount(image, weights=count, minlength=m).astype(np.int64)
    return Contingency(m, n, image.astype(np.int64), lt, lp, count.astype(np.int64))
