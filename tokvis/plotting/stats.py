"""Statistics plots: similarity matrices and correlation scatter plots (Axes-level, seaborn style).

Both functions take a tidy ``data=`` DataFrame with column names, draw on ``ax`` (the current Axes
when ``None``) and return the Axes.  Nothing here calls ``plt.show``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from tokvis.errors import ArgumentValueError
from tokvis.validate import check_choice, check_colormap, check_format_spec, checked_keywords

__all__ = ["correlation_plot", "correlation_title", "similarity_matrix"]

#: How each coefficient is named in titles, and where its p-value comes from.
_COEFFICIENT = {
    "spearman": ("Spearman ρ", "scipy.stats.spearmanr"),
    "kendall": ("Kendall τb", "scipy.stats.kendalltau"),
    "pearson": ("Pearson r", "scipy.stats.pearsonr"),
}


def _check_columns(data, columns) -> None:
    import pandas as pd

    if not isinstance(data, pd.DataFrame):
        raise ArgumentValueError(f"data must be a pandas DataFrame: got {type(data).__name__}")
    missing = [c for c in columns if c is not None and c not in data.columns]
    if missing:
        raise ArgumentValueError(f"columns not in data: {missing}; available: {list(data.columns)}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


#: what ``similarity_matrix(agg=...)`` may aggregate a cell with (pandas reductions)
AGGREGATES = ("mean", "median", "min", "max", "sum", "std", "var", "sem", "count", "first", "last")


@checked_keywords(
    agg=lambda name, v: check_choice(name, v, AGGREGATES),
    fmt=check_format_spec,
    cmap=check_colormap,
    diagonal={"nan": True},
)
def similarity_matrix(
    data,
    *,
    x: str = "keep_rate_a",
    y: str = "keep_rate_b",
    value: str = "value",
    agg: str = "mean",
    symmetric: bool = True,
    diagonal: float | None = None,
    annot: bool = True,
    fmt: str = ".2f",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    label: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Heatmap of a pairwise similarity: one cell per (``y``, ``x``) pair, aggregated over rows.

    Parameters
    ----------
    data : pandas.DataFrame
        Tidy rows, e.g. :func:`tokvis.analysis.compare` filtered to one metric and block.  The
        values of one cell are aggregated with ``agg`` (over images).
    x, y : str
        Columns naming the two members of a pair (``"method_a"`` / ``"method_b"``, ...).
    value : str
        Column of the similarity values.
    agg : str
        Aggregation of a cell's values (any pandas aggregation name: ``"mean"``, ``"median"``, ...).
    symmetric : bool
        Mirror each cell (a, b) to (b, a) when that cell has no data of its own (symmetric metrics;
        set False for IoA, homogeneity, completeness).
    diagonal : float, optional
        Value drawn on the diagonal cells without data (e.g. 1.0: a pattern compared with itself).
    annot, fmt : bool, str
        Write each cell's value with this format.
    cmap, vmin, vmax, colorbar
        Colour mapping.
    label : str, optional
        Colour-bar label, with the unit or metric (e.g. ``"IoU"``, ``"NMI (V-measure)"``); default: ``value``.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
        Rows are ``y`` categories, columns ``x`` categories (the union of both columns' values,
        sorted); cells without data are blank (NaN).
    """
    _check_columns(data, [x, y, value])
    if len(data) == 0:
        raise ArgumentValueError("data has no rows to draw")
    ax = plt.gca() if ax is None else ax
    cells = data.groupby([y, x], sort=True, dropna=False)[value].agg(agg)
    cats = sorted(set(data[x].tolist()) | set(data[y].tolist()), key=lambda v: (str(type(v)), v))
    idx = {c: i for i, c in enumerate(cats)}
    mat = np.full((len(cats), len(cats)), np.nan)
    for (yv, xv), v in cells.items():
        mat[idx[yv], idx[xv]] = v
    if symmetric:
        mirror = mat.T.copy()
        mat = np.where(np.isnan(mat), mirror, mat)
    if diagonal is not None:
        d = np.diag(mat).copy()
        np.fill_diagonal(mat, np.where(np.isnan(d), diagonal, d))
    image = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
    labels = [_fmt(c) for c in cats]
    ax.set_xticks(range(len(cats)), labels, rotation=45 if max(map(len, labels)) > 4 else 0, ha="right")
    ax.set_yticks(range(len(cats)), labels)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if annot:
        finite = mat[np.isfinite(mat)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(len(cats)):
            for j in range(len(cats)):
                if np.isfinite(mat[i, j]):
                    color = "black" if mat[i, j] > mid else "white"
                    ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center", color=color, fontsize=8)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=value if label is None else label)
    return ax


@checked_keywords(n_boot={"minimum": 0}, ci={"low": 0.0, "high": 1.0, "low_open": True, "high_open": True})
def correlation_plot(
    data,
    *,
    x: str,
    y: str,
    hue: str | None = None,
    method: str = "spearman",
    fit: bool = True,
    annotate: bool = True,
    n_boot: int = 1000,
    ci: float = 0.95,
    ax: Axes | None = None,
) -> Axes:
    """Scatter of ``y`` against ``x`` with a least-squares line and the correlation in the title.

    Parameters
    ----------
    data : pandas.DataFrame
    x, y : str
        Columns (e.g. a pattern similarity and a performance difference).
    hue : str, optional
        Column whose categories get one colour each (with a legend).
    method : {"spearman", "kendall", "pearson"}
        Coefficient reported (:func:`tokvis.analysis.correlation.correlate`, with its bootstrap
        interval).
    fit : bool
        Draw the least-squares line over all points.
    annotate : bool
        Put the coefficient, its interval and how both were obtained in the title
        (:func:`correlation_title`), e.g. ``"Spearman ρ = -0.64, 95% bootstrap CI [-0.98, 0.03] (n = 7)"``
        over ``"CI: percentile bootstrap, 1000 resamples of the 7 pairs; p = 0.024 (two-sided,
        scipy.stats.spearmanr)"``.
    n_boot : int
        Bootstrap resamples of the interval.
    ci : float
        Confidence level of the interval.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    from tokvis.analysis.correlation import correlate

    _check_columns(data, [x, y, hue])
    ax = plt.gca() if ax is None else ax
    xs = data[x].to_numpy(dtype=np.float64)
    ys = data[y].to_numpy(dtype=np.float64)
    if hue is None:
        ax.scatter(xs, ys, s=24, alpha=0.8)
    else:
        for key, part in data.groupby(hue, sort=True):
            ax.scatter(part[x].to_numpy(np.float64), part[y].to_numpy(np.float64), s=24, alpha=0.8, label=_fmt(key))
        ax.legend(title=hue, fontsize=8)
    ok = np.isfinite(xs) & np.isfinite(ys)
    if fit and ok.sum() >= 2 and np.ptp(xs[ok]) > 0:
        slope, intercept = np.polyfit(xs[ok], ys[ok], 1)
        line_x = np.array([xs[ok].min(), xs[ok].max()])
        ax.plot(line_x, slope * line_x + intercept, color="0.3", linewidth=1, linestyle="--")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if annotate:
        res = correlate(xs, ys, method=method, n_boot=n_boot, ci=ci)
        ax.set_title(correlation_title(res, n_boot=n_boot, ci=ci), fontsize=9)
    return ax


def correlation_title(result: dict, *, n_boot: int, ci: float = 0.95) -> str:
    """Title of a correlation (three short lines) saying how the interval and the p-value were obtained.

    Parameters
    ----------
    result : dict
        A :func:`tokvis.analysis.correlation.correlate` result (``r``, ``p``, ``ci_low``, ``ci_high``,
        ``n``, ``method``).
    n_boot : int
        The bootstrap resamples the interval came from (0: no interval).
    ci : float
        Its confidence level.

    Returns
    -------
    str
        ``"Spearman ρ = 0.52, 95% bootstrap CI [0.10, 0.81] (n = 12)"``, on a second line
        ``"CI: percentile bootstrap, 1000 resamples of the 12 pairs"`` and on a third
        ``"p = 0.083 (two-sided, scipy.stats.spearmanr)"`` (short lines: side-by-side panels' titles
        do not run into each other).
        Undefined coefficients (fewer than 3 pairs, a constant side) say so.
    """
    name, source = _COEFFICIENT[result["method"]]
    n = int(result["n"])
    if not np.isfinite(result["r"]):
        return f"{name} undefined (n = {n}: fewer than 3 pairs or a constant variable)"
    level = f"{ci * 100:g}%"
    if n_boot and np.isfinite(result["ci_low"]):
        head = (
            f"{name} = {result['r']:.2f}, {level} bootstrap CI [{result['ci_low']:.2f}, {result['ci_high']:.2f}] "
            f"(n = {n})"
        )
        how = f"CI: percentile bootstrap, {n_boot} resamples of the {n} pairs\n"
    else:
        head, how = f"{name} = {result['r']:.2f} (n = {n}, no interval)", ""
    return f"{head}\n{how}p = {result['p']:.2g} (two-sided, {source})"
