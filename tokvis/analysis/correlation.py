"""Correlation between two measurements, with p-values and bootstrap confidence intervals.

Typical use: does the similarity of two models' reduction patterns (a column of a
:func:`tokvis.analysis.compare` table) predict the difference of their accuracies?

* :func:`correlate` -- one pair of vectors: Spearman, Kendall (tau-b) or Pearson coefficient, its
  p-value from :mod:`scipy.stats` (two-sided), and a percentile-bootstrap confidence interval over
  resampled pairs;
* :func:`correlation_table` -- the same for columns of a DataFrame, optionally per group, as tidy rows.

Missing values: a pair is dropped when either of its two values is NaN or infinite (pairwise
deletion); ``n`` reports the pairs used.  With fewer than 3 pairs, or when either variable is
constant over the pairs used, the coefficient is undefined: ``r``, ``p`` and the interval are NaN.
Bootstrap resamples in which a variable is constant are left out of the percentiles.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from tokvis.errors import ArgumentValueError, TraceMismatchError
from tokvis.validate import check_choice, check_float, check_int, check_seed, checked_keywords

__all__ = ["METHODS", "correlate", "correlation_table"]

#: Correlation coefficients understood by :func:`correlate`.
METHODS = ("spearman", "kendall", "pearson")

_BLOCK = 2**22  # resampled values held at once by the vectorised bootstrap
_KENDALL_PAIRWISE_MAX_N = 400  # above this, bootstrap Kendall calls scipy per resample (O(n log n))


def _vector(v, name: str) -> np.ndarray:
    arr = np.asarray(v)
    if arr.ndim != 1:
        raise ArgumentValueError(f"{name} must be 1-D: shape is {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ArgumentValueError(f"{name} must be numeric: dtype is {arr.dtype}") from None
    return arr.astype(np.float64)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair over the last axis (leading axes broadcast); NaN where a side is constant."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    num = np.einsum("...j,...j->...", a, b)
    den = np.sqrt(np.einsum("...j,...j->...", a, a) * np.einsum("...j,...j->...", b, b))
    out = np.full(num.shape, np.nan)
    ok = den > 0
    out[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    return out


def _kendall_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall tau-b of each row pair from pairwise sign products; NaN where a side is constant."""
    n = a.shape[1]
    iu, ju = np.triu_indices(n, k=1)
    sa = np.sign(a[:, iu] - a[:, ju])
    sb = np.sign(b[:, iu] - b[:, ju])
    # (concordant - discordant) / sqrt(pairs untied in a * pairs untied in b)
    num = np.einsum("ij,ij->i", sa, sb)
    den = np.sqrt(np.abs(sa).sum(axis=1) * np.abs(sb).sum(axis=1))
    out = np.full(a.shape[0], np.nan)
    ok = den > 0
    out[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    return out


def _statistic_rows(a: np.ndarray, b: np.ndarray, method: str) -> np.ndarray:
    if method == "pearson":
        return _pearson_rows(a, b)
    if method == "spearman":
        return _pearson_rows(stats.rankdata(a, axis=1), stats.rankdata(b, axis=1))
    return _kendall_rows(a, b)


def _bootstrap(x: np.ndarray, y: np.ndarray, method: str, n_boot: int, seed) -> np.ndarray:
    """Coefficients of ``n_boot`` resamples of the pairs (with replacement), NaN where undefined."""
    rng = np.random.default_rng(check_seed("seed", seed))
    n = x.size
    out = np.empty(n_boot)
    if method == "kendall" and n > _KENDALL_PAIRWISE_MAX_N:
        # the pairwise form costs n^2 per resample: use scipy's O(n log n) algorithm instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(n_boot):
                idx = rng.integers(0, n, n)
                out[i] = stats.kendalltau(x[idx], y[idx]).statistic
        return out
    per_row = n * (n - 1) // 2 if method == "kendall" else n
    block = max(1, _BLOCK // max(per_row, 1))
    for lo in range(0, n_boot, block):
        idx = rng.integers(0, n, (min(block, n_boot - lo), n))
        out[lo : lo + idx.shape[0]] = _statistic_rows(x[idx], y[idx], method)
    return out


def correlate(
    x, y, *, method: str = "spearman", n_boot: int = 1000, ci: float = 0.95, seed=0
) -> dict[str, float | int | str]:
    """Correlation coefficient with p-value and percentile-bootstrap confidence interval.

    Parameters
    ----------
    x, y : array [n]
        Paired measurements (e.g. a pattern similarity and an accuracy difference per model pair).
    method : {"spearman", "kendall", "pearson"}
        Spearman's rho, Kendall's tau-b or Pearson's r (:func:`scipy.stats.spearmanr`,
        :func:`~scipy.stats.kendalltau`, :func:`~scipy.stats.pearsonr`; two-sided p-values).
    n_boot : int >= 0
        Bootstrap resamples of the pairs (with replacement); 0 skips the interval (NaN bounds).
    ci : float in (0, 1)
        Confidence level of the percentile interval.
    seed : int, numpy Generator or None
        Random state of the resampling (fixed by default: repeated calls give the same interval).

    Returns
    -------
    dict
        ``r`` (float in [-1, 1]), ``p`` (float in [0, 1]), ``ci_low``, ``ci_high`` (floats), ``n``
        (int, pairs used) and ``method`` (str).  See the module docstring for missing values and
        undefined cases (NaN).
    """
    check_choice("method", method, METHODS)
    n_boot = check_int("n_boot", n_boot, minimum=0)
    check_float("ci", ci, low=0.0, high=1.0, low_open=True, high_open=True)
    x, y = _vector(x, "x"), _vector(y, "y")
    if x.shape != y.shape:
        raise TraceMismatchError(f"x and y must be paired (same length): {x.size} vs {y.size}")
    # pairwise deletion of missing or infinite values
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    result = {"r": np.nan, "p": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": n, "method": method}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result  # undefined coefficient
    test = {"spearman": stats.spearmanr, "kendall": stats.kendalltau, "pearson": stats.pearsonr}[method]
    res = test(x, y)
    result["r"] = float(np.clip(res.statistic, -1.0, 1.0))
    result["p"] = float(np.clip(res.pvalue, 0.0, 1.0))
    if n_boot:
        boot = _bootstrap(x, y, method, int(n_boot), seed)
        boot = boot[np.isfinite(boot)]  # resamples with a constant side have no coefficient
        if boot.size:
            alpha = (1.0 - ci) / 2.0
            low, high = np.quantile(boot, [alpha, 1.0 - alpha])
            result["ci_low"], result["ci_high"] = float(low), float(high)
    return result


_TABLE_COLUMNS = ["x", "y", "correlation", "r", "p", "ci_low", "ci_high", "n"]


@checked_keywords(seed=check_seed)
def correlation_table(
    df,
    *,
    x: str,
    y: str | Sequence[str],
    method: str | Sequence[str] = "spearman",
    by: str | Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed=0,
):
    """Correlations of one column against one or several others, as a tidy DataFrame.

    Parameters
    ----------
    df : pandas.DataFrame
    x : str
        Column correlated against every ``y`` (e.g. ``"accuracy_difference"``).
    y : str or list of str
        Column(s), e.g. pattern-similarity metrics.
    method : str or list of str
        One or several of :data:`METHODS`.
    by : str or list of str, optional
        Grouping columns: one set of rows per group (e.g. ``"layer"``, ``["backbone", "layer"]``).
    n_boot, ci, seed
        As in :func:`correlate` (every row uses the same ``seed``).

    Returns
    -------
    pandas.DataFrame
        One row per (group, y, method) with columns ``*by, x, y, correlation, r, p, ci_low,
        ci_high, n`` (``correlation`` names the correlation method, so that a grouping column
        called ``method`` -- the reduction method -- is kept), in the order of the groups
        (sorted), ``y`` and ``method`` given.
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise ArgumentValueError(f"df must be a pandas DataFrame: got {type(df).__name__}")
    ys = [y] if isinstance(y, str) else list(y)
    methods = [method] if isinstance(method, str) else list(method)
    keys = [] if by is None else ([by] if isinstance(by, str) else list(by))
    if not ys:
        raise ArgumentValueError("y must name at least one column")
    if not methods:
        raise ArgumentValueError("method must name at least one correlation method")
    for m in methods:
        check_choice("method", m, METHODS)
    reserved = [k for k in keys if k in _TABLE_COLUMNS]
    if reserved:
        raise ArgumentValueError(
            f"by columns {reserved} clash with the output columns {_TABLE_COLUMNS}; rename them first"
        )
    missing = [c for c in [x, *ys, *keys] if c not in df.columns]
    if missing:
        raise ArgumentValueError(f"columns not in df: {missing}; available: {list(df.columns)}")

    groups = [((), df)] if not keys else df.groupby(keys, sort=True, dropna=False)
    rows = []
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        for col in ys:
            for m in methods:
                xs = part[x].to_numpy(dtype=np.float64, na_value=np.nan)
                ys_ = part[col].to_numpy(dtype=np.float64, na_value=np.nan)
                res = correlate(xs, ys_, method=m, n_boot=n_boot, ci=ci, seed=seed)
                res["correlation"] = res.pop("method")
                rows.append({**dict(zip(keys, key, strict=True)), "x": x, "y": col, **res})
    return pd.DataFrame(rows, columns=[*keys, *_TABLE_COLUMNS])
