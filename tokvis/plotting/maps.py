"""Global reduction maps: heatmaps of mean token depth, their method x method correlation, and
the split-half reliability that says which differences between maps are real.

Axes-level functions (``ax=None``, return the Axes): :func:`global_map`, :func:`map_correlation_matrix`.
Figure-level: :func:`global_map_grid` (one panel per method with one shared, labelled colour bar).
Data: :func:`split_half_reliability` (numpy only) and :func:`map_correlations` (a tidy table of map
correlations between traces or run stores, from :func:`tokvis.analysis.compare.compare_maps`).

Split-half reliability
----------------------
A global map is a mean over images; with few images it is noisy, and two methods' maps can differ
(or correlate) by chance.  :func:`split_half_reliability` splits the images at random into two halves
of equal size, computes the map of each half, and correlates the two maps (Pearson over patch
positions).  This is repeated ``n_splits`` times and the coefficients are averaged.  Because each
half holds only half of the images, the coefficient underestimates the reliability of the map from
all images; the Spearman-Brown prophecy formula ``2 r / (1 + r)`` corrects for that
(``spearman_brown=True``, the default).  A correlation between two methods' maps cannot exceed (about)
the square root of the product of their reliabilities; values near 0 mean the map is noise.

Images that are not independent (several crops of one photo) make a random split overstate the
reliability: crops of one photo land on both sides.  ``groups`` (e.g. the photo of each crop,
:func:`tokvis.datasets.crop_photo`) splits whole groups instead, which is the honest figure;
``tokvis figures`` passes the photo of each image (for other datasets every image is its own group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from tokvis.errors import ArgumentTypeError, DataError, TraceMismatchError
from tokvis.validate import as_array, check_colormap, check_int, check_seed, check_traces, checked_keywords

__all__ = [
    "DEPTH_LABEL",
    "global_map",
    "global_map_grid",
    "map_correlation_matrix",
    "map_correlations",
    "split_half_reliability",
]

#: Colour-bar label of mean token depth maps (the unit is a block index).
DEPTH_LABEL = "mean depth (block)"


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _map_2d(m, name: str) -> np.ndarray:
    arr = as_array(name, m)
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{name} must be a 2-D [h, w] map: shape is {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------
# reliability
# --------------------------------------------------------------------------------------------


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair (NaN where a row is constant)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


@checked_keywords(seed=check_seed)
def split_half_reliability(
    values, *, n_splits: int = 200, spearman_brown: bool = True, seed: int = 0, groups: Sequence | None = None
) -> dict[str, float | int]:
    """Split-half reliability of a global map (see the module docstring).

    Parameters
    ----------
    values : array [num_images, num_patches], a Trace or a run store
        Per-image values whose mean over images is the map, e.g. ``trace.depth()`` for the mean
        depth map (a trace or :func:`tokvis.load_run` result is read with ``.depth()``).
    n_splits : int >= 1
        Random splits averaged.
    spearman_brown : bool
        Correct each half-sample coefficient to the full sample: ``2 r / (1 + r)``.
    seed : int
        Random state of the splits (fixed: repeated calls agree).
    groups : sequence [num_images], optional
        A label per image (e.g. the photo a crop was cut from): each split puts half of the groups,
        whole, on each side (with an odd number of groups one is left out), and each half's map is the
        mean over its images.  Default: every image its own group, halves of equal size.

    Returns
    -------
    dict
        ``r`` (the mean coefficient, corrected when ``spearman_brown``), ``r_half`` (the mean
        uncorrected half-vs-half Pearson r), ``n_images``, ``n_groups``, ``n_splits`` (splits with a
        defined coefficient), ``spearman_brown`` (bool).  ``r`` is NaN when every split has a constant
        half map (e.g. a method that reduces nothing).

    Raises
    ------
    DataError
        Fewer than 2 images (or groups), not a 2-D array, or ``groups`` of another length.
    """
    n_splits = check_int("n_splits", n_splits, minimum=1, error=DataError)
    if hasattr(values, "depth") and not isinstance(values, np.ndarray):
        values = values.depth()
    arr = as_array("values", values)
    if arr.ndim != 2:
        raise DataError(f"values must be [num_images, num_patches]: shape is {arr.shape}")
    n = arr.shape[0]
    if n < 2:
        raise DataError(f"split-half reliability needs at least 2 images: got {n}; record more images")
    rng = np.random.default_rng(seed)
    if groups is None:
        half = n // 2
        perms = np.argsort(rng.random((n_splits, n)), axis=1)
        first = arr[perms[:, :half]].mean(axis=1)  # [n_splits, num_patches]
        second = arr[perms[:, half : 2 * half]].mean(axis=1)
        n_groups = n
    else:
        labels = np.asarray(list(groups), dtype=object)
        if labels.shape != (n,):
            raise DataError(f"groups must give one label per image ({n}): got {labels.shape[0]}")
        _, member = np.unique(labels.astype(str), return_inverse=True)
        n_groups = int(member.max()) + 1
        if n_groups < 2:
            raise DataError("split-half reliability by groups needs at least 2 groups: every image is in one")
        sums = np.zeros((n_groups, arr.shape[1]))
        np.add.at(sums, member, arr)
        counts = np.bincount(member, minlength=n_groups).astype(np.float64)
        half = n_groups // 2
        perms = np.argsort(rng.random((n_splits, n_groups)), axis=1)
        rows = np.arange(n_splits)[:, None]
        sides = []
        for part in (perms[:, :half], perms[:, half : 2 * half]):
            mask = np.zeros((n_splits, n_groups))
            mask[rows, part] = 1.0
            sides.append((mask @ sums) / (mask @ counts)[:, None])
        first, second = sides
    r = _pearson(first, second)
    r = r[np.isfinite(r)]
    out: dict[str, float | int] = {
        "n_images": int(n), "n_groups": int(n_groups), "n_splits": int(r.size), "spearman_brown": bool(spearman_brown),
    }  # fmt: skip
    if not r.size:
        out.update(r=float("nan"), r_half=float("nan"))
        return out
    corrected = 2 * r / (1 + r) if spearman_brown else r
    with np.errstate(invalid="ignore", divide="ignore"):
        out.update(r=float(np.mean(corrected)), r_half=float(np.mean(r)))
    return out


# --------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------


@checked_keywords(cmap=check_colormap, reliability={"nan": True})
def global_map(
    data,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    label: str = DEPTH_LABEL,
    reliability: float | None = None,
    note: str | None = None,
) -> Axes:
    """One global map as a heatmap over the patch grid.

    Parameters
    ----------
    data : array [h, w]
        The map (e.g. ``tokvis.analysis.compare.global_maps(trace)["depth"]``).
    ax : Axes, optional
    title : str, optional
        Panel title; the split-half reliability is appended on a second line when given.
    cmap, vmin, vmax
        Colour mapping (pass the same ``vmin`` / ``vmax`` to panels that share a colour bar).
    colorbar : bool
        Draw a colour bar labelled ``label``.
    label : str
        What the colour means, with its unit (default ``"mean depth (block)"``).
    reliability : float, optional
        Split-half reliability of the map (:func:`split_half_reliability`), shown under the title.
    note : str, optional
        A last title line that explains the map (e.g. why a pattern is fixed by position).

    Returns
    -------
    Axes
        One ``AxesImage`` of the map; ticks off.
    """
    m = _map_2d(data, "data")
    ax = plt.gca() if ax is None else ax
    image = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    lines = [title] if title else []
    if reliability is not None:
        lines.append(f"split-half r = {reliability:.2f}")
    if note:
        lines.append(note)
    if lines:
        ax.set_title("\n".join(lines), fontsize=9)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=label)
    return ax


@checked_keywords(cmap=check_colormap, ncols={"minimum": 1})
def global_map_grid(
    maps: Mapping[str, Any],
    *,
    reliability: Mapping[str, float] | None = None,
    label: str = DEPTH_LABEL,
    cmap: str = "viridis",
    ncols: int | None = None,
    suptitle: str | None = None,
    axes: Any = None,
    notes: Mapping[str, str] | None = None,
) -> Figure:
    """A grid of global maps (one panel per name) with one shared colour bar.

    Parameters
    ----------
    maps : mapping name -> array [h, w]
        E.g. method name -> mean depth map; drawn in the mapping's order.
    reliability : mapping name -> float, optional
        Split-half reliability per map, written under each panel title (a map without an entry gets none).
    label : str
        Colour-bar label with unit (default ``"mean depth (block)"``).
    cmap : str
    ncols : int, optional
        Panels per row (default: up to 5).
    suptitle : str, optional
        Figure title.
    axes : array of Axes, optional
        Draw into these (at least ``len(maps)``; extra ones are hidden).
    notes : mapping name -> str, optional
        A note under a panel's title (:func:`global_map`'s ``note``).

    Returns
    -------
    Figure
        All panels share ``vmin`` / ``vmax`` (the range over all maps) and one colour bar.
    """
    if not isinstance(maps, Mapping):
        raise ArgumentTypeError(f"maps must be a mapping of name -> [h, w] array (a dict): got {type(maps).__name__}")
    if not maps:
        raise DataError("maps is empty: pass at least one map (name -> [h, w] array)")
    arrays = {str(k): _map_2d(v, f"maps[{k!r}]") for k, v in maps.items()}
    lo = min(float(np.nanmin(a)) for a in arrays.values())
    hi = max(float(np.nanmax(a)) for a in arrays.values())
    if hi <= lo:
        hi = lo + 1e-9
    n = len(arrays)
    if axes is None:
        ncols = min(5, n) if ncols is None else check_int("ncols", ncols, minimum=1, error=DataError)
        nrows = -(-n // ncols)
        fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(2.3 * ncols + 0.8, 2.4 * nrows + 0.4),
                                 layout="constrained")  # fmt: skip
    else:
        axes = np.asarray(axes, dtype=object)
        if axes.size < n:
            raise DataError(f"axes must hold at least {n} Axes: got {axes.size}")
        fig = axes.flat[0].figure
    flat = list(np.asarray(axes, dtype=object).flat)
    for ax, (name, m) in zip(flat[:n], arrays.items(), strict=True):
        rel = None if reliability is None else reliability.get(name)
        note = None if notes is None else notes.get(name)
        global_map(m, ax=ax, title=name, cmap=cmap, vmin=lo, vmax=hi, colorbar=False, reliability=rel, note=note)
    for ax in flat[n:]:
        ax.set_visible(False)
    mappable = plt.cm.ScalarMappable(norm=Normalize(lo, hi), cmap=cmap)
    fig.colorbar(mappable, ax=flat[:n], label=label, shrink=0.9)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


# --------------------------------------------------------------------------------------------
# correlations between maps
# --------------------------------------------------------------------------------------------


def map_correlations(traces, *, map: str = "depth", metric: str = "pcc"):
    """Correlation of the global maps of every pair of traces (or run stores), as a tidy table.

    Parameters
    ----------
    traces : iterable of Trace or Run
        Usually one per method at one backbone and keep rate.
    map : str
        One of :data:`tokvis.analysis.compare.MAPS` (default the mean depth map).
    metric : str
        One of :data:`tokvis.analysis.compare.MAP_METRICS` (default ``"pcc"``).

    Returns
    -------
    pandas.DataFrame
        :func:`tokvis.analysis.compare.compare_maps` rows of every pair (``method_a``, ``method_b``,
        ..., ``map``, ``metric``, ``value``).
    """
    traces = check_traces("traces", traces)
    import itertools

    import pandas as pd

    from tokvis.analysis.compare import compare_maps

    traces = list(traces)
    if len(traces) < 2:
        raise DataError(f"map correlations need at least 2 traces or runs: got {len(traces)}")
    rows = [compare_maps(a, b, metrics=metric, maps=map) for a, b in itertools.combinations(traces, 2)]
    return pd.concat(rows, ignore_index=True)


@checked_keywords()
def map_correlation_matrix(
    data,
    *,
    x: str = "method_a",
    y: str = "method_b",
    value: str = "value",
    reliability: Mapping[str, float] | None = None,
    label: str = "PCC of mean depth maps",
    annot: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Method x method matrix of map correlations; the diagonal holds each map's split-half reliability.

    Parameters
    ----------
    data : pandas.DataFrame
        Tidy rows with the two names in ``x`` / ``y`` and the coefficient in ``value``
        (:func:`map_correlations`); the matrix is symmetric (each pair drawn in both cells).
    x, y, value : str
        Column names.
    reliability : mapping name -> float, optional
        Split-half reliability of each map (:func:`split_half_reliability`), drawn on the diagonal and
        annotated in italics; without it the diagonal is blank.  An off-diagonal value close to the
        reliabilities means the maps agree as far as their noise allows.
    label : str
        Colour-bar label.
    annot : bool
        Write each cell's value.
    ax : Axes, optional

    Returns
    -------
    Axes
        One ``AxesImage`` (colour range -1 .. 1, diverging), tick labels = the names (sorted).
    """
    import pandas as pd

    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame: got {type(data).__name__}")
    missing = [c for c in (x, y, value) if c not in data.columns]
    if missing:
        raise DataError(f"columns not in data: {missing}; available: {list(data.columns)}")
    if not len(data):
        raise DataError("data has no rows to draw: pass map correlations of at least one pair")
    names = sorted({str(v) for v in data[x]} | {str(v) for v in data[y]})
    idx = {k: i for i, k in enumerate(names)}
    mat = np.full((len(names), len(names)), np.nan)
    cells = data.groupby([data[y].astype(str), data[x].astype(str)])[value].mean()
    for (yv, xv), v in cells.items():
        if yv == xv:
            raise TraceMismatchError(f"two maps are both named {xv!r}: pass one map per {x.removesuffix('_a')}")
        mat[idx[yv], idx[xv]] = mat[idx[xv], idx[yv]] = v
    if reliability is not None:
        for k, v in reliability.items():
            if str(k) in idx:
                mat[idx[str(k)], idx[str(k)]] = v
    ax = plt.gca() if ax is None else ax
    image = ax.imshow(np.ma.masked_invalid(mat), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    if annot:
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(mat[i, j]):
                    color = "white" if abs(mat[i, j]) > 0.6 else "black"
                    style = "italic" if i == j else "normal"
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8,
                            fontstyle=style)  # fmt: skip
    title = "PCC between global maps"
    if reliability is not None:
        title += "\n(diagonal, italic: split-half reliability)"
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, label=label)
    return ax
