"""Similarity of the features two models compute for the same images (e.g. the CLS token per block).

Inputs are ``X [n, d1]`` and ``Y [n, d2]``: row ``i`` of both is image ``i``; the feature widths may
differ.  Every measure first centres each feature (column) over the images.

* :func:`linear_cka` -- linear centred kernel alignment (Kornblith et al., 2019);
* :func:`cca_coefficients`, :func:`mean_cca`, :func:`mean_squared_cca` -- canonical correlations;
* :func:`pwcca` -- projection-weighted CCA (Morcos et al., 2018);
* :func:`procrustes_distance` -- orthogonal Procrustes distance on normalised features;
* :func:`feature_scores` -- all of them from one CCA, under tokvis's names or the study's.

Conventions
-----------
``convention="standard"`` (default) reports CKA and PWCCA as similarities (1 = same representation).
``convention="study"`` reproduces ``compare_cls_features_*.py`` / ``feature_sim_metrics.py`` of the
"Which Tokens to Use?" study (Haurum et al., ICCVW 2023), which report them as **distances**:
``CKA = 1 - linear_cka``, ``PWCCA = 1 - pwcca``; its ``mean_cca_corr``, ``mean_sq_cca_corr`` and
``Procrustes`` are :func:`mean_cca`, :func:`mean_squared_cca` and :func:`procrustes_distance`
unchanged (the study centres each feature over the images and divides by the Frobenius norm, as
here).  One difference is not reproduced: when X is wider than Y, the study's PWCCA normalises the
weights over *all* of X's directions, including those without a canonical partner, whose weights
depend on an arbitrary basis LAPACK picks for that subspace; here the weights are normalised over the
``min(rank X, rank Y)`` canonical directions under both conventions (equal widths: identical).

Few images, wide features (``n <= d``)
--------------------------------------
CKA and Procrustes are well defined for any ``n``.  CCA is not: once the two centred feature spaces
together span more than the ``n - 1`` dimensions available, they intersect and some canonical
correlations are 1 *by construction*.  The CCA functions therefore work on the numerical rank of each
input (directions with singular value above ``tol`` times the largest) and can truncate further to
the top ``n_components`` principal directions of each input (SVCCA-style, Raghu et al. 2017); they
warn (``RuntimeWarning``) when the retained dimensions exceed ``n - 1``, because the coefficients are
then partly trivial.  Truncate with ``n_components`` (e.g. a few tens for ``n`` in the hundreds) or
use more images.

Degenerate inputs (never NaN)
-----------------------------
A feature matrix that is constant over the images (zero after centring) carries no similarity
structure: two such inputs are treated as identical (CKA / mean CCA / PWCCA 1.0, Procrustes 0.0)
and one alone as unrelated (0.0, Procrustes 1.0).  :func:`cca_coefficients` returns an empty array
for it.  All scalar results are plain ``float``.
"""

from __future__ import annotations

import warnings

import numpy as np

from tokvis.analysis.patterns import check_convention
from tokvis.errors import ArgumentValueError, TraceMismatchError
from tokvis.validate import check_float, check_int

__all__ = [
    "FEATURE_METRICS",
    "STUDY_FEATURE_METRICS",
    "cca_coefficients",
    "feature_scores",
    "linear_cka",
    "mean_cca",
    "mean_squared_cca",
    "procrustes_distance",
    "pwcca",
]


#: Names of :func:`feature_scores` under ``convention="standard"`` (similarities, Procrustes a distance).
FEATURE_METRICS = ("cka", "mean_cca", "mean_squared_cca", "pwcca", "procrustes")
#: The study's column names for the same metrics (``CKA`` and ``PWCCA`` are distances 1 - similarity).
STUDY_FEATURE_METRICS = ("CKA", "mean_cca_corr", "mean_sq_cca_corr", "PWCCA", "Procrustes")


def _features(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ArgumentValueError(f"{name} must be 2-D [num_images, num_features]: shape is {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ArgumentValueError(f"{name} must be numeric: dtype is {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ArgumentValueError(f"{name} must be real: dtype is {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ArgumentValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Validated, column-centred float64 copies of X and Y."""
    a, b = _features(x, "X"), _features(y, "Y")
    if a.shape[0] != b.shape[0]:
        raise TraceMismatchError(f"X and Y must hold the same images (rows): X has {a.shape[0]}, Y has {b.shape[0]}")
    if a.shape[0] < 2:
        raise ArgumentValueError(f"need at least 2 images to compare features: got {a.shape[0]}")
    # constant over the images, tested before centring (the centred values of a constant column
    # can be rounding noise instead of exact zeros)
    const = (bool(np.all(a.max(axis=0) == a.min(axis=0))), bool(np.all(b.max(axis=0) == b.min(axis=0))))
    a -= a.mean(axis=0)
    b -= b.mean(axis=0)
    if const[0]:
        a[:] = 0.0
    if const[1]:
        b[:] = 0.0
    return a, b


def _degenerate(a: np.ndarray, b: np.ndarray, *, same: float, one: float) -> float | None:
    """The value for constant (zero after centring) inputs, or None when both carry structure."""
    za, zb = not np.any(a), not np.any(b)
    if za and zb:
        return same
    if za or zb:
        return one
    return None


def linear_cka(X, Y, *, convention: str = "standard") -> float:
    """Linear centred kernel alignment; ``convention="study"``: the study's CKA distance ``1 - CKA``.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, i.e. HSIC of the linear kernels
    normalised by the HSIC of each kernel with itself.

    Parameters
    ----------
    X : array [n, d1]
    Y : array [n, d2]
        Features of the same ``n`` images.
    convention : {"standard", "study"}
        ``"study"``: the study's CKA distance, ``1 - CKA``.

    Returns
    -------
    float
        In [0, 1]; symmetric; 1 for ``X`` vs itself (study convention: 0); invariant to orthogonal
        transforms and isotropic scaling of either input (not to arbitrary invertible linear maps).
    """
    if check_convention(convention) == "study":
        return float(1.0 - linear_cka(X, Y))
    a, b = _pair(X, Y)
    special = _degenerate(a, b, same=1.0, one=0.0)
    if special is not None:
        return special
    a /= np.linalg.norm(a)  # scale-free; avoids overflow of 4th powers
    b /= np.linalg.norm(b)
    n, d1 = a.shape
    d2 = b.shape[1]
    if n * n * (d1 + d2) < n * (d1 * d2 + d1 * d1 + d2 * d2):
        # few images: work with the n x n Gram matrices, tr(Ka Kb) = ||a^T b||_F^2
        ka, kb = a @ a.T, b @ b.T
        cross, self_a, self_b = np.vdot(ka, kb), np.linalg.norm(ka), np.linalg.norm(kb)
    else:
        cross = np.linalg.norm(a.T @ b) ** 2
        self_a, self_b = np.linalg.norm(a.T @ a), np.linalg.norm(b.T @ b)
    return float(np.clip(cross / (self_a * self_b), 0.0, 1.0))


def _basis(a: np.ndarray, n_components: int | None, tol: float | None):
    """Orthonormal basis [n, r] of the retained column space of a centred matrix, plus singular values."""
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return u[:, :0], s[:0]
    cutoff = (max(a.shape) * np.finfo(np.float64).eps if tol is None else tol) * s[0]
    r = int(np.count_nonzero(s > cutoff))
    if n_components is not None:
        r = min(r, n_components)
    return u[:, :r], s[:r]


def _cca(X, Y, n_components, tol):
    """Canonical correlations [k] (descending) and X's canonical variates [n, k] (orthonormal)."""
    if n_components is not None:
        n_components = check_int("n_components (or None)", n_components, minimum=1)
    if tol is not None:
        check_float("tol (or None)", tol, low=0.0, high=1.0, high_open=True)
    a, b = _pair(X, Y)
    qa, _ = _basis(a, n_components, tol)
    qb, _ = _basis(b, n_components, tol)
    n = a.shape[0]
    if qa.shape[1] + qb.shape[1] > n - 1 and qa.shape[1] and qb.shape[1]:
        trivial = qa.shape[1] + qb.shape[1] - (n - 1)
        warnings.warn(
            f"CCA with {n} images keeps {qa.shape[1]} + {qb.shape[1]} dimensions, more than the "
            f"{n - 1} available after centring: at least {trivial} canonical correlation(s) are 1 by "
            "construction; pass n_components to truncate (SVCCA) or use more images",
            RuntimeWarning,
            stacklevel=3,
        )
    # canonical correlations = singular values of the product of the two orthonormal bases
    u, rho, _ = np.linalg.svd(qa.T @ qb, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    return rho, qa @ u[:, : rho.size], a, b


def cca_coefficients(X, Y, *, n_components: int | None = None, tol: float | None = None) -> np.ndarray:
    """Canonical correlations between the feature spaces of X and Y.

    Computed from orthonormal bases of the centred column spaces (SVD): the canonical correlations
    are the singular values of ``Qx^T Qy`` (cosines of the principal angles between the spaces).

    Parameters
    ----------
    X : array [n, d1]
    Y : array [n, d2]
    n_components : int, optional
        Keep only the top ``n_components`` principal directions of each input first (SVCCA).
    tol : float in [0, 1), optional
        Relative singular-value cut-off for the numerical rank (default ``max(n, d) * eps``).

    Returns
    -------
    ndarray float64 [k]
        Descending, in [0, 1], ``k = min(rank X, rank Y)`` (after truncation); empty when either
        input is constant.  Symmetric in X and Y.
    """
    rho, *_ = _cca(X, Y, n_components, tol)
    return rho


def mean_cca(X, Y, *, n_components: int | None = None, tol: float | None = None) -> float:
    """Mean canonical correlation, in [0, 1], symmetric; see :func:`cca_coefficients`.

    Parameters
    ----------
    X, Y : float array [num_images, d_x], [num_images, d_y]
        Features of the same images (rows), e.g. class-token features of two runs.
    n_components : int, optional
        Keep only the top ``n_components`` principal directions of each input first (SVCCA).
    tol : float in [0, 1), optional
        As in :func:`cca_coefficients`.
    """
    rho, _, a, b = _cca(X, Y, n_components, tol)
    special = _degenerate(a, b, same=1.0, one=0.0)
    return special if special is not None else float(rho.mean())


def mean_squared_cca(X, Y, *, n_components: int | None = None, tol: float | None = None) -> float:
    """Mean squared canonical correlation (Yanai's GCD), in [0, 1], symmetric.

    Parameters
    ----------
    X, Y : float array [num_images, d_x], [num_images, d_y]
        Features of the same images (rows), e.g. class-token features of two runs.
    n_components : int, optional
        Keep only the top ``n_components`` principal directions of each input first (SVCCA).
    tol : float in [0, 1), optional
        As in :func:`cca_coefficients`.
    """
    rho, _, a, b = _cca(X, Y, n_components, tol)
    special = _degenerate(a, b, same=1.0, one=0.0)
    return special if special is not None else float(np.mean(rho**2))


def pwcca(X, Y, *, n_components: int | None = None, tol: float | None = None, convention: str = "standard") -> float:
    """Projection-weighted CCA (Morcos et al., 2018), in [0, 1]; **not** symmetric.

    ``convention="study"``: the study's PWCCA distance ``1 - pwcca`` (see the module docstring).

    The canonical correlations ``rho_i`` are averaged with weights ``alpha_i = sum_j |<h_i, x_j>|``:
    how much of X's centred features ``x_j`` (columns) lies along X's ``i``-th canonical variate
    ``h_i`` (unit vectors over the images).  Directions that X actually uses count more than
    directions CCA found in X's noise.  The weights come from ``X``: ``pwcca(X, Y)`` asks how much
    of X's representation is reflected in Y.  Because the weights sum absolute projections over X's
    individual features, PWCCA depends on X's feature basis: it is invariant to translation and
    isotropic scaling of X and to any invertible linear map of Y, but not to rotations of X.

    Parameters
    ----------
    X, Y : float array [num_images, d_x], [num_images, d_y]
        Features of the same images (rows), e.g. class-token features of two runs.
    n_components : int, optional
        Keep only the top ``n_components`` principal directions of each input first (SVCCA).
    tol : float in [0, 1), optional
        As in :func:`cca_coefficients`.
    convention : {"standard", "study"}
        ``"study"``: the study's ``PWCCA`` distance, 1 - similarity.
    """
    if check_convention(convention) == "study":
        return float(1.0 - pwcca(X, Y, n_components=n_components, tol=tol))
    return _pwcca_value(*_cca(X, Y, n_components, tol))


def _pwcca_value(rho, variates, a, b) -> float:
    special = _degenerate(a, b, same=1.0, one=0.0)
    if special is not None:
        return special
    alpha = np.abs(variates.T @ a).sum(axis=1)
    total = alpha.sum()
    if total == 0:  # pragma: no cover - non-zero X always projects on its own variates
        return float(rho.mean())
    return float(np.clip(alpha @ rho / total, 0.0, 1.0))


def procrustes_distance(X, Y) -> float:
    """Orthogonal Procrustes distance between centred, Frobenius-normalised features.

    With ``A = Xc / ||Xc||_F`` and ``B = Yc / ||Yc||_F`` (the narrower one padded with zero columns),

        ``d(X, Y) = min_{R orthogonal} ||A - B R||_F^2 = 2 - 2 ||A^T B||_*``

    (``||.||_*`` the nuclear norm, Ding et al. 2021).  In [0, 2]; symmetric; 0 iff Y equals X up to
    translation, isotropic scaling and an orthogonal transform.  A constant input is the zero matrix
    (distance 1.0 to any normalised input; two constant inputs: 0.0).

    Parameters
    ----------
    X, Y : float array [num_images, d_x], [num_images, d_y]
        Features of the same images (rows), e.g. class-token features of two runs.
    """
    a, b = _pair(X, Y)
    special = _degenerate(a, b, same=0.0, one=1.0)
    if special is not None:
        return special
    a /= np.linalg.norm(a)
    b /= np.linalg.norm(b)
    # ||A^T B||_* through A's thin SVD: the singular values of A^T B = V S U^T B are those of S U^T B
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    nuclear = np.linalg.svd(s[:, None] * (u.T @ b), compute_uv=False).sum()
    return float(np.clip(2.0 - 2.0 * nuclear, 0.0, 2.0))


def feature_scores(
    X, Y, *, convention: str = "standard", n_components: int | None = None, tol: float | None = None
) -> dict[str, float]:
    """Every feature-similarity metric of X against Y from one CCA.

    Parameters
    ----------
    X : array [n, d1]
    Y : array [n, d2]
        Features of the same ``n`` images (X is model A: PWCCA's weights come from it).
    convention : {"standard", "study"}
        ``"standard"``: keys :data:`FEATURE_METRICS` -- ``cka`` (:func:`linear_cka`), ``mean_cca``,
        ``mean_squared_cca``, ``pwcca`` (similarities in [0, 1]) and ``procrustes`` (distance in
        [0, 2]).  ``"study"``: the study's columns :data:`STUDY_FEATURE_METRICS` -- ``CKA`` =
        ``1 - cka``, ``mean_cca_corr`` = ``mean_cca``, ``mean_sq_cca_corr`` = ``mean_squared_cca``,
        ``PWCCA`` = ``1 - pwcca``, ``Procrustes`` = ``procrustes``.
    n_components, tol
        As in :func:`cca_coefficients` (CCA-based metrics only).

    Returns
    -------
    dict
        metric name -> float.
    """
    study = check_convention(convention) == "study"
    rho, variates, a, b = _cca(X, Y, n_components, tol)
    special = _degenerate(a, b, same=1.0, one=0.0)
    cka = linear_cka(X, Y)
    mean = special if special is not None else float(rho.mean())
    mean_sq = special if special is not None else float(np.mean(rho**2))
    pw = _pwcca_value(rho, variates, a, b)
    proc = procrustes_distance(X, Y)
    if study:
        values = (1.0 - cka, mean, mean_sq, 1.0 - pw, proc)
        return dict(zip(STUDY_FEATURE_METRICS, values, strict=True))
    return dict(zip(FEATURE_METRICS, (cka, mean, mean_sq, pw, proc), strict=True))
