"""Merge-region overlays and keep masks, per image and per layer.

Every drawing function works on one :class:`matplotlib.axes.Axes`: it takes ``ax=None``
(the current Axes is used then) and returns the Axes it drew on.  Nothing here calls
``plt.show``.

Conventions
-----------
image
    ``[H, W, 3]`` float in ``[0, 1]`` (numpy or torch); ``[3, H, W]`` tensors/arrays and
    ``uint8`` images are accepted and converted.  When ``H`` or ``W`` is not a multiple of the
    patch grid, the image is resampled (nearest neighbour) to the *nearest* multiple of the grid
    (at least one pixel per patch) so that each patch covers a whole block of pixels.
labels
    1-D int, length ``h * w``, the row-major patch grid: the output token holding each original
    patch, ``-1`` = dropped.  Patches sharing a label form one *region*.
kept
    1-D bool, length ``h * w``: the patch's own token is still there (pruning: kept; merging: the
    patch is the destination / centre of its region).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke

from tokvis.errors import ArgumentTypeError, ArgumentValueError, ImageSizeError, TraceMismatchError
from tokvis.validate import (
    check_choice,
    check_color,
    check_figure_or_axes,
    check_float,
    check_legend_location,
    check_path,
    check_trace,
    checked_keywords,
    optional,
)

__all__ = [
    "drawn_entries",
    "keep_mask",
    "legend_handles",
    "merge_overlay",
    "overlay_legend",
    "save_figure",
    "trace_overlays",
]


# ----------------------------------------------------------------------------------------------
# input normalisation
# ----------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_image(image: Any) -> np.ndarray:
    """``[H, W, 3]`` float64 in [0, 1] from numpy/torch, HWC or CHW, float or uint8."""
    array = _to_numpy(image)
    if array.ndim == 3 and array.shape[-1] != 3 and array.shape[0] == 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:  # grey-level
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ImageSizeError(f"image must be [H, W, 3] (or [3, H, W]): shape is {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ImageSizeError(f"image must hold real numbers: dtype is {array.dtype}")
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def _grid(grid_size: Any) -> tuple[int, int]:
    if isinstance(grid_size, (int, np.integer)):
        gh = gw = int(grid_size)
    else:
        try:
            gh, gw = (int(v) for v in grid_size)
        except (TypeError, ValueError):
            raise ImageSizeError(f"grid_size must be an int or (h, w): got {grid_size!r}") from None
    if gh < 1 or gw < 1:
        raise ImageSizeError(f"grid_size must be positive: got {(gh, gw)}")
    return gh, gw


def _fit_to_grid(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Resample (nearest neighbour) to the nearest multiple of the grid in each dimension."""
    gh, gw = grid
    h, w = image.shape[:2]
    new_h = max(gh, round(h / gh) * gh)
    new_w = max(gw, round(w / gw) * gw)
    if (new_h, new_w) == (h, w):
        return image
    rows = np.minimum(((np.arange(new_h) + 0.5) * h / new_h).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * w / new_w).astype(np.intp), w - 1)
    return image[rows[:, None], cols[None, :]]


def _patch_vector(values: Any, grid: tuple[int, int], name: str, dtype: type) -> np.ndarray:
    array = _to_numpy(values)
    n = grid[0] * grid[1]
    if array.shape == grid:  # accept an (h, w) map as well
        array = array.reshape(-1)
    if array.ndim != 1 or array.shape[0] != n:
        raise TraceMismatchError(f"{name} must be 1-D of length h*w = {n} for grid {grid}: shape is {array.shape}")
    if dtype is bool:
        return array.astype(bool)
    is_int = np.issubdtype(array.dtype, np.integer)
    if array.size and not is_int and not np.all(np.equal(np.mod(array, 1), 0)):
        raise TraceMismatchError(f"{name} must hold integers: dtype is {array.dtype}")
    return array.astype(np.int64)


def _pixel_patch_index(shape: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` row-major patch index of every pixel (H, W are multiples of the grid)."""
    h, w = shape
    gh, gw = grid
    rows = np.arange(h) // (h // gh)
    cols = np.arange(w) // (w // gw)
    return rows[:, None] * gw + cols[None, :]


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _region_means(image: np.ndarray, pixel_labels: np.ndarray) -> np.ndarray:
    """Replace each region's pixels (label >= 0) by the region's mean colour; vectorised."""
    out = image.copy()
    valid = pixel_labels >= 0
    if not valid.any():
        return out
    _, compact = np.unique(pixel_labels[valid], return_inverse=True)
    compact = compact.reshape(-1)
    counts = np.bincount(compact)
    pixels = image[valid]  # [n_valid, 3]
    means = (
        np.stack([np.bincount(compact, weights=pixels[:, c], minlength=counts.size) for c in range(3)], axis=1)
        / counts[:, None]
    )
    out[valid] = means[compact]
    return out


def _border_segments(label_grid: np.ndarray, patch: tuple[float, float]) -> np.ndarray:
    """Segments ``[n, 2, 2]`` (data coordinates, imshow's default extent) along every patch
    edge whose two sides have different labels."""
    ph, pw = patch
    segments = []
    # vertical edges: between columns j-1 and j
    ii, jj = np.nonzero(label_grid[:, 1:] != label_grid[:, :-1])
    x = (jj + 1) * pw - 0.5
    segments.append(np.stack([np.stack([x, ii * ph - 0.5], 1), np.stack([x, (ii + 1) * ph - 0.5], 1)], 1))
    # horizontal edges: between rows i-1 and i
    ii, jj = np.nonzero(label_grid[1:, :] != label_grid[:-1, :])
    y = (ii + 1) * ph - 0.5
    segments.append(np.stack([np.stack([jj * pw - 0.5, y], 1), np.stack([(jj + 1) * pw - 0.5, y], 1)], 1))
    return np.concatenate(segments, axis=0).astype(float)


@checked_keywords(border_color=optional(check_color), dropped_color=optional(check_color), linewidth={"low": 0.0})
def merge_overlay(
    image: Any,
    labels: Any,
    *,
    grid_size: int | tuple[int, int],
    kept: Any = None,
    ax: Axes | None = None,
    border_color: Any = "white",
    dim: float = 0.25,
    mode: str = "mean",
    dropped_color: Any = None,
    linewidth: float = 0.6,
    kept_pixels: bool = False,
    fill_alpha: float = 0.5,
) -> Axes:
    """Draw the merge regions of one image: regions tinted with their mean colour, borders between them.

    Parameters
    ----------
    image : array-like, shape (H, W, 3)
        Float image in ``[0, 1]`` (numpy or torch; ``[3, H, W]`` and ``uint8`` accepted).  If
        ``H`` or ``W`` is not a multiple of the grid, the image is resampled (nearest neighbour)
        to the nearest multiple; the drawn image then has that size.
    labels : array-like of int, shape (h * w,)
        Token holding each patch (row-major grid), ``-1`` = dropped.  An ``(h, w)`` map is
        accepted too.
    grid_size : int or (int, int)
        Patch grid ``(h, w)``.
    kept : array-like of bool, shape (h * w,), optional
        The patch's own token is still there.  When given, the kept patch of every region with
        more than one patch (the destination / centre of a merge) is marked with a small dot
        in ``border_color``; singleton regions are not marked (they are trivially their own
        token).  Kept patches whose label is ``-1`` are inconsistent and are treated as dropped.
    ax : matplotlib.axes.Axes, optional
        Where to draw; the current Axes when omitted.
    border_color : color or None, default "white"
        Colour of the thin lines drawn along patch edges whose two sides belong to different
        regions (a dropped patch counts as its own label ``-1``).  ``None`` draws no borders.
    dim : float in [0, 1], default 0.25
        Dropped patches (label ``-1``) show their original pixels multiplied by ``dim``.
    mode : {"mean", "image"}, default "mean"
        ``"mean"`` fills each region with the mean colour of its pixels; ``"image"`` keeps the
        original pixels (only borders, markers and dimming are drawn).
    dropped_color : color, optional
        Paint dropped patches in this flat colour instead of dimming them.
    linewidth : float, default 0.6
        Border line width in points.
    kept_pixels : bool, default False
        With ``mode="mean"``: patches that are still a token of their own (regions of one patch:
        kept, not merged) show their real pixels instead of a flat patch-mean colour; only merged
        regions (two or more patches) are filled with their mean colour.  Without it a kept patch
        is drawn flat while a dropped one keeps its (dimmed) detail.
    fill_alpha : float in [0, 1], default 0.5
        With ``mode="mean"``: opacity of the mean colour over the image's own pixels.  The default
        tints each region and keeps the image visible; ``1.0`` fills flat, ``0.0`` draws borders only.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn on: one ``AxesImage`` (the rendered ``[H', W', 3]`` float array), a
        ``LineCollection`` of borders (when ``border_color`` is not None and any border exists),
        and a scatter of kept markers (when ``kept`` is given and any region is merged).
        Ticks are turned off.  ``ax.tokvis_overlay`` is the set of :func:`legend_handles` entries
        that were drawn (``"dot"``, ``"fill"``, ``"border"``, ``"kept_flat"``, ``"kept_pixels"``,
        ``"dropped"``), so that a legend lists only those.

    Raises
    ------
    ImageSizeError
        The image is not ``[H, W, 3]``, or ``grid_size`` is invalid.
    TraceMismatchError
        ``labels`` / ``kept`` do not have ``h * w`` entries.
    """
    check_choice("mode", mode, ("mean", "image"))
    dim = check_float("dim", dim, low=0.0, high=1.0)
    fill_alpha = check_float("fill_alpha", fill_alpha, low=0.0, high=1.0)
    grid = _grid(grid_size)
    img = _fit_to_grid(_as_image(image), grid)
    label_vec = _patch_vector(labels, grid, "labels", int)
    label_vec = np.where(label_vec < 0, -1, label_vec)
    kept_vec = None if kept is None else _patch_vector(kept, grid, "kept", bool)

    pixel_index = _pixel_patch_index(img.shape[:2], grid)
    pixel_labels = label_vec[pixel_index]
    out = _region_means(img, pixel_labels) if mode == "mean" else img.copy()
    if mode == "mean" and fill_alpha < 1.0:
        out = fill_alpha * out + (1.0 - fill_alpha) * img
    valid = label_vec >= 0
    sizes = np.bincount(label_vec[valid]) if valid.any() else np.zeros(0, int)
    single = np.zeros(label_vec.shape, dtype=bool)
    single[valid] = sizes[label_vec[valid]] == 1
    if kept_pixels and mode == "mean":
        own = single[pixel_index]
        out[own] = img[own]
    drawn = set()
    if mode == "mean" and (valid & ~single).any() and fill_alpha > 0:
        drawn.add("fill")
    if single.any():
        drawn.add("kept_pixels" if mode == "image" or kept_pixels or fill_alpha == 0 else "kept_flat")
    dropped = pixel_labels < 0
    if dropped.any():
        drawn.add("dropped")
        if dropped_color is not None:
            out[dropped] = np.asarray(to_rgb(dropped_color))
        else:
            out[dropped] = img[dropped] * float(dim)

    if ax is None:
        ax = plt.gca()
    ax.imshow(out)
    ax.set_xticks([])
    ax.set_yticks([])

    patch = (img.shape[0] // grid[0], img.shape[1] // grid[1])
    label_grid = label_vec.reshape(grid)
    if border_color is not None:
        segments = _border_segments(label_grid, patch)
        if len(segments):
            drawn.add("border")
            ax.add_collection(LineCollection(segments, colors=[border_color], linewidths=linewidth, label="borders"))
    if kept_vec is not None:
        sizes = np.bincount(label_vec[label_vec >= 0]) if (label_vec >= 0).any() else np.zeros(0, int)
        merged = np.zeros_like(kept_vec)
        has = label_vec >= 0
        merged[has] = sizes[label_vec[has]] > 1
        marked = np.nonzero(kept_vec & merged)[0]
        if marked.size:
            drawn.add("dot")
            ys = (marked // grid[1] + 0.5) * patch[0] - 0.5
            xs = (marked % grid[1] + 0.5) * patch[1] - 0.5
            marker_color = "white" if border_color is None else border_color
            ax.scatter(xs, ys, s=4, c=[to_rgb(marker_color)], marker="o", linewidths=0, label="kept")
    # keep imshow's extent even though collections were added
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.tokvis_overlay = frozenset(drawn)
    return ax


def keep_mask(
    image: Any,
    kept: Any,
    *,
    grid_size: int | tuple[int, int],
    ax: Axes | None = None,
    dim: float = 0.25,
) -> Axes:
    """Draw an image with its pruned patches dimmed.

    Parameters
    ----------
    image : array-like, shape (H, W, 3)
        Float image in ``[0, 1]`` (see :func:`merge_overlay` for accepted forms and resizing).
    kept : array-like of bool, shape (h * w,)
        ``True`` where the patch's own token is still there.
    grid_size : int or (int, int)
        Patch grid ``(h, w)``.
    ax : matplotlib.axes.Axes, optional
        Where to draw; the current Axes when omitted.
    dim : float in [0, 1], default 0.25
        Pruned patches show their pixels multiplied by ``dim``; kept patches are unchanged.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn on (one ``AxesImage``; no borders, no markers; ticks off).
    """
    grid = _grid(grid_size)
    kept_vec = _patch_vector(kept, grid, "kept", bool)
    labels = np.where(kept_vec, np.arange(kept_vec.size), -1)
    return merge_overlay(image, labels, grid_size=grid, ax=ax, border_color=None, dim=dim, mode="image")


# ----------------------------------------------------------------------------------------------
# legend
# ----------------------------------------------------------------------------------------------


def legend_handles(
    *,
    dim: float = 0.25,
    dropped_color: Any = None,
    border_color: Any = "white",
    kept_pixels: bool = False,
    mode: str = "mean",
    merged: bool = True,
    fill_alpha: float = 0.5,
    drawn: Any = None,
) -> list:
    """Legend entries explaining an overlay drawn by :func:`merge_overlay` with the same options.

    Parameters
    ----------
    dim, dropped_color, border_color, kept_pixels, mode, fill_alpha
        The options the overlay was drawn with (the entries describe exactly what they do).
    merged : bool, default True
        Include the entries of merged regions (dot, fill, borders); ``False`` for pruning-only
        figures (:func:`keep_mask`).
    drawn : set of str, optional
        Only the entries of these kinds (``ax.tokvis_overlay`` of the panels drawn: ``"dot"``, ``"fill"``,
        ``"border"``, ``"kept_flat"``, ``"kept_pixels"``, ``"dropped"``); all that the options allow when
        omitted.

    Returns
    -------
    list of matplotlib artists (``Line2D`` / ``Patch``), each with its label.
    """
    dim = check_float("dim", dim, low=0.0, high=1.0)
    fill_alpha = check_float("fill_alpha", fill_alpha, low=0.0, high=1.0)
    check_choice("mode", mode, ("mean", "image"))
    edge = "0.3"
    fill = "flat fill" if fill_alpha == 1.0 else f"tint {fill_alpha:.0%}"
    entries = []  # (kind, handle)
    if merged:
        dot = "white" if border_color is None else border_color
        entries.append(
            (
                "dot",
                Line2D(
                    [],
                    [],
                    marker="o",
                    linestyle="none",
                    markersize=5,
                    markerfacecolor=to_rgb(dot),
                    markeredgecolor=edge,
                    label="dot: merge destination (kept)",
                ),
            )
        )
        if mode == "mean" and fill_alpha > 0:
            entries.append(
                (
                    "fill",
                    Patch(
                        facecolor="tab:blue",
                        alpha=max(fill_alpha, 0.2),
                        edgecolor=edge,
                        label=f"{fill}: merged region, mean colour",
                    ),
                )
            )
        if border_color is not None:
            entries.append(
                (
                    "border",
                    Line2D(
                        [],
                        [],
                        color=to_rgb(border_color),
                        linewidth=1.5,
                        label="line: region border",
                        path_effects=[withStroke(linewidth=2.5, foreground="0.35")],
                    ),
                )
            )
    if mode == "image" or kept_pixels or fill_alpha == 0:
        entries.append(
            ("kept_pixels", Patch(facecolor="none", edgecolor=edge, hatch="..", label="real pixels: token kept as is"))
        )
    elif merged:
        entries.append(
            (
                "kept_flat",
                Patch(
                    facecolor="0.6",
                    alpha=max(fill_alpha, 0.2),
                    edgecolor=edge,
                    label=f"{fill}: token kept as is",
                ),
            )
        )
    if dropped_color is not None:
        entries.append(
            ("dropped", Patch(facecolor=to_rgb(dropped_color), edgecolor=edge, label="solid colour: dropped patch"))
        )
    else:
        entries.append(
            ("dropped", Patch(facecolor=(dim * 0.8,) * 3, edgecolor=edge, label=f"dimmed (x{dim:g}): dropped patch"))
        )
    keep = None if drawn is None else set(drawn)
    return [h for kind, h in entries if keep is None or kind in keep]  # fmt: skip


def drawn_entries(target: Any) -> frozenset | None:
    """What the overlays on a figure or Axes drew (the union of their ``ax.tokvis_overlay``), or None if none.

    Parameters
    ----------
    target : Figure or Axes
        Where :func:`merge_overlay` drew.
    """
    axes = [target] if isinstance(target, Axes) else list(target.axes)
    sets = [a.tokvis_overlay for a in axes if hasattr(a, "tokvis_overlay")]
    return frozenset().union(*sets) if sets else None


@checked_keywords(target=check_figure_or_axes, loc=check_legend_location, ncols={"minimum": 1})
def overlay_legend(target: Any = None, *, loc: str = "outside lower center", ncols: int | None = None, **options: Any):
    """Add the legend of :func:`legend_handles` to a figure (default: below the panels) or an Axes.

    Parameters
    ----------
    target : Figure or Axes, optional
        Where to put it; the current figure when omitted.  A figure gets a figure legend (``loc``
        may use matplotlib's ``"outside ..."`` positions with the constrained layout).
    loc : str
        Legend location.
    ncols : int, optional
        Columns (default: all entries on as few rows as fit, at most 3 per row).
    **options
        Passed to :func:`legend_handles` (``dim``, ``dropped_color``, ``border_color``, ``kept_pixels``,
        ``mode``, ``merged``, ``fill_alpha``, ``drawn``).  Without ``drawn``, the entries are those the
        overlays on ``target`` drew (:func:`drawn_entries`).

    Returns
    -------
    matplotlib.legend.Legend
    """
    target = plt.gcf() if target is None else target
    if "drawn" not in options:
        options["drawn"] = drawn_entries(target)
    handles = legend_handles(**options)
    ncols = min(3, len(handles)) if ncols is None else ncols
    if isinstance(target, Axes) and loc.startswith("outside"):
        loc = "upper left"
        return target.legend(handles=handles, loc=loc, bbox_to_anchor=(1.02, 1.0), fontsize=7, ncols=1)
    if not isinstance(target, Axes) and loc.startswith("outside") and target.get_layout_engine() is None:
        loc = "lower center"
    return target.legend(handles=handles, loc=loc, fontsize=7, ncols=ncols, frameon=False)


# ----------------------------------------------------------------------------------------------
# whole traces
# ----------------------------------------------------------------------------------------------


def _image_list(images: Any) -> list[np.ndarray] | Any:
    """Indexable per-image access without converting the whole batch."""
    if hasattr(images, "ndim") and images.ndim == 4:
        return images
    if isinstance(images, (list, tuple)):
        return images
    raise ImageSizeError("images must be a [B, 3, H, W] (or [B, H, W, 3]) batch or a list of [H, W, 3] arrays")


def _method_title(meta: Any) -> str | None:
    if meta is None:
        return None
    parts = []
    method = getattr(meta, "method", None)
    if method:
        parts.append(str(method))
    keep_rate = getattr(meta, "keep_rate", None)
    if keep_rate is not None:
        parts.append(f"keep rate {keep_rate:g}" if isinstance(keep_rate, (int, float)) else f"keep rate {keep_rate}")
    r = getattr(meta, "r", None)
    if r is not None:
        parts.append(f"r={r}")
    return " · ".join(parts) if parts else None


@checked_keywords()
def trace_overlays(
    trace: Any,
    images: Any,
    *,
    layers: Sequence[int] | None = None,
    image_index: int | Sequence[int] | None = None,
    titles: bool = True,
    axes: Any = None,
    fig_kwargs: dict[str, Any] | None = None,
    legend: bool = True,
    **overlay_kwargs: Any,
) -> Figure:
    """Grid of merge overlays: one row per image, the original image then one column per layer.

    Parameters
    ----------
    trace : tokvis.Trace
        Recorded decisions (uses ``layers``, ``grid_size``, ``num_images``, ``labels(layer)``,
        ``kept(layer)`` and ``meta``).
    images : torch.Tensor or list of array-like
        The traced images already in ``[0, 1]`` (e.g. :func:`tokvis.data.denormalize`):
        a ``[B, 3, H, W]`` (or ``[B, H, W, 3]``) batch, or a list of ``[H, W, 3]`` arrays, in
        the trace's image order.
    layers : sequence of int, optional
        Recorded layers to show; all of ``trace.layers`` when omitted.
    image_index : int or sequence of int, optional
        Which images (rows); all images when omitted.
    titles : bool, default True
        Title every panel (``"image"``; ``"block 3 · 137 tokens"`` where 137 is the number of
        distinct labels >= 0 in that image at that layer), label each row with its image id
        when ``trace.meta.image_ids`` is known, and put the method (and keep rate / r when
        known) in the figure's title.
    axes : array-like of Axes, shape (rows, 1 + len(layers)), optional
        Draw into these Axes instead of creating a figure.
    fig_kwargs : dict, optional
        Passed to :func:`matplotlib.pyplot.subplots` (default ``figsize``: 2.2 inches per panel).
    legend : bool, default True
        Add a figure legend below the panels saying what the dot, the flat fill, the borders and
        the dimming mean (:func:`overlay_legend`, with the overlay options used).
    **overlay_kwargs
        Passed to :func:`merge_overlay` (``border_color``, ``dim``, ``mode``, ``kept_pixels``, ...).

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the grid.

    Raises
    ------
    TraceMismatchError
        A requested layer was not recorded, an image index is out of range, the number of
        images does not match the trace, or ``axes`` has the wrong shape.
    """
    check_trace("trace", trace)
    recorded = tuple(int(layer) for layer in trace.layers)
    layers = recorded if layers is None else tuple(int(layer) for layer in layers)
    missing = [layer for layer in layers if layer not in recorded]
    if missing:
        raise TraceMismatchError(f"layers {missing} were not recorded; recorded layers: {list(recorded)}")
    num_images = int(trace.num_images)
    if image_index is None:
        rows = list(range(num_images))
    elif isinstance(image_index, (int, np.integer)):
        rows = [int(image_index)]
    else:
        rows = [int(i) for i in image_index]
    if not rows or not layers:
        raise ArgumentValueError(
            f"{'image_index' if not rows else 'layers'} is empty: give at least one, or None for all"
        )
    bad = [i for i in rows if not 0 <= i < num_images]
    if bad:
        raise TraceMismatchError(f"image_index {bad} out of range for a trace of {num_images} images")
    batch = _image_list(images)
    if len(batch) != num_images:
        raise TraceMismatchError(f"got {len(batch)} images for a trace of {num_images} images")

    n_rows, n_cols = len(rows), 1 + len(layers)
    if axes is None:
        kwargs = {"figsize": (2.2 * n_cols, 2.2 * n_rows + (0.3 if titles else 0.0)), "layout": "constrained"}
        kwargs.update(fig_kwargs or {})
        fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, **kwargs)
    else:
        axes = np.asarray(axes, dtype=object)
        if axes.size != n_rows * n_cols:
            raise TraceMismatchError(f"axes must hold {n_rows} x {n_cols} Axes: got {axes.size}")
        axes = axes.reshape(n_rows, n_cols)
        fig = axes[0, 0].figure

    grid = tuple(int(v) for v in trace.grid_size)
    labels_by_layer = {layer: _to_numpy(trace.labels(layer)) for layer in layers}
    kept_by_layer = {layer: _to_numpy(trace.kept(layer)) for layer in layers}
    image_ids = getattr(getattr(trace, "meta", None), "image_ids", None)
    for r, i in enumerate(rows):
        image = _as_image(batch[i])
        ax = axes[r, 0]
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles:
            ax.set_title("image", fontsize=9)
            if image_ids is not None and i < len(image_ids):
                ax.set_ylabel(str(image_ids[i]), fontsize=9)
        for c, layer in enumerate(layers, start=1):
            labels = labels_by_layer[layer][i]
            merge_overlay(image, labels, grid_size=grid, kept=kept_by_layer[layer][i], ax=axes[r, c], **overlay_kwargs)
            if titles:
                n_tokens = int(np.unique(labels[labels >= 0]).size)
                noun = "token" if n_tokens == 1 else "tokens"
                axes[r, c].set_title(f"block {layer} · {n_tokens} {noun}", fontsize=9)
    if titles:
        heading = _method_title(getattr(trace, "meta", None))
        if heading:
            fig.suptitle(heading)
    if legend:
        keys = ("dim", "dropped_color", "border_color", "kept_pixels", "mode", "fill_alpha")
        overlay_legend(fig, **{k: v for k, v in overlay_kwargs.items() if k in keys})
    return fig


def save_figure(fig: Figure, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a figure, creating missing parent folders.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure.
    path : str or Path
        Output file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...).
    **savefig_kwargs
        Passed to :meth:`matplotlib.figure.Figure.savefig` (default ``dpi=150``,
        ``bbox_inches="tight"``).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    check_path("path", path)
    if not hasattr(fig, "savefig"):
        raise ArgumentTypeError(f"fig must be a matplotlib Figure: got {type(fig).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"dpi": 150, "bbox_inches": "tight"}
    kwargs.update(savefig_kwargs)
    fig.savefig(path, **kwargs)
    return path
