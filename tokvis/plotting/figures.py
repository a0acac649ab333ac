"""The study's figures, each an Axes-level function on tidy data (or a figure of overlays).

=====================================  ============================================================
figure                                  function (data)
=====================================  ============================================================
1 similarity vs keep rate               :func:`similarity_vs_keep_rate` (``compare(runs, by="keep_rate")``)
2 similarity vs backbone                :func:`similarity_vs_backbone` (``compare(runs, by="backbone")``)
3 global maps and their correlation     :mod:`tokvis.plotting.maps` (``global_map_grid``,
                                        ``map_correlation_matrix``, ``split_half_reliability``)
4 Spearman of Δperformance              :func:`performance_correlation` on :func:`pair_performance`
                                        (pattern similarity, or :func:`cls_similarity`, per pair of runs)
5 overlays of every method              :func:`method_overlays` (traces + images)
6 feature sources / fused tokens        :func:`token_sources`, :func:`feature_source_view` (VoMix Fig. 4),
                                        :func:`fused_token_views` (MCTF Fig. 2: one trace per ablation)
=====================================  ============================================================

Pattern similarity follows the study: IoU for pruning methods (kept sets), V-measure -- which the
study calls NMI -- for merging methods (labels), labelled ``"NMI (V-measure)"``.  Lines of several
stages are drawn with different markers and line styles and a small horizontal offset, so that
curves that coincide stay visible and every legend entry can be told apart.

Performance tables (``tokvis evaluate``, or a user's CSV) have one row per run with the columns
``run, backbone, method, keep_rate, dataset`` and a measure column (``top1``, ``fidelity``, ...).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tokvis.errors import ArgumentTypeError, DataError, TraceMismatchError
from tokvis.plotting.overlay import _as_image, _grid, legend_handles, merge_overlay
from tokvis.plotting.stats import correlation_title
from tokvis.validate import as_array, check_choice, check_float, check_int, check_trace, check_traces, checked_keywords

__all__ = [
    "METRIC_LABELS",
    "cls_similarity",
    "feature_source_view",
    "fused_token_views",
    "method_overlays",
    "pair_performance",
    "performance_correlation",
    "similarity_vs_backbone",
    "similarity_vs_keep_rate",
    "source_weights",
    "token_sources",
]

#: Axis labels of similarity metrics: the names of the printed tables (``tokvis compare``'s ``v_measure`` is what the
#: study's scripts call NMI).
METRIC_LABELS = {
    "iou": "IoU",
    "ioa": "IoA",
    "v_measure": "v_measure",
    "nmi": "NMI",
    "homogeneity": "homogeneity",
    "completeness": "completeness",
    "ari": "ARI",
    "ami": "AMI",
    "mutual_info": "mutual information (nats)",
    "cka": "CLS-feature similarity (linear CKA)",
}
#: The study's metric per pattern family.
STUDY_METRIC = {"prune": "iou", "merge": "v_measure"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_STYLES = ("-", "--", ":", "-.")
_FIELDS = ("backbone", "method", "dataset", "keep_rate")


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def _frame(data, columns) -> Any:
    import pandas as pd

    if not isinstance(data, pd.DataFrame):
        raise DataError(f"data must be a pandas DataFrame: got {type(data).__name__}")
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise DataError(f"columns not in data: {missing}; available: {list(data.columns)}")
    if not len(data):
        raise DataError("data has no rows to draw")
    return data


def _one(data, column: str, value, what: str):
    """Rows of ``data`` where ``column == value``; ``value=None`` requires a single value there."""
    values = sorted({_fmt(v) for v in data[column].dropna()})
    if value is None:
        if len(values) > 1:
            raise DataError(f"data holds several {what}s {values}: pass {column}=... to choose one")
        return data
    part = data[data[column].map(_fmt) == _fmt(value)]
    if not len(part):
        raise DataError(f"no rows with {column}={value!r}; available: {values}")
    return part


def _errors(values: np.ndarray, errorbar: str) -> float:
    if values.size < 2:
        return 0.0
    if errorbar == "sd":
        return float(np.std(values, ddof=1))
    if errorbar == "se":
        return float(np.std(values, ddof=1) / np.sqrt(values.size))
    return float(1.96 * np.std(values, ddof=1) / np.sqrt(values.size))  # "ci": normal 95% of the mean


_ERRORBAR_TEXT = {"sd": "mean ± std over images", "se": "mean ± s.e.m. over images", "ci": "mean, 95% CI over images"}


def _pair_similarity(data, *, varying: str, metric, hue: str, errorbar: str, ax, title: str) -> Axes:
    check_choice("errorbar", errorbar, tuple(_ERRORBAR_TEXT), error=DataError)
    a, b = f"{varying}_a", f"{varying}_b"
    _frame(data, [a, b, "metric", "value", hue, "family"])
    if metric is None:
        families = sorted(set(data["family"]))
        if len(families) > 1:
            raise DataError(f"data mixes pruning and merging patterns ({families}): pass metric=... or one method")
        metric = STUDY_METRIC[families[0]]
    part = data[data["metric"] == metric]
    if not len(part):
        raise DataError(f"no rows of metric {metric!r}; available: {sorted(set(data['metric']))}")
    if varying == "keep_rate":
        order = sorted({(x, y) for x, y in zip(part[a], part[b], strict=True)}, key=lambda p: (-p[0], -p[1]))
    else:
        order = sorted({(x, y) for x, y in zip(part[a], part[b], strict=True)}, key=lambda p: (str(p[0]), str(p[1])))
    pos = {p: i for i, p in enumerate(order)}
    levels = sorted(set(part[hue]), key=lambda v: (str(type(v)), v))
    names = {v: _fmt(v) for v in levels}
    hue_title = hue
    if hue == "stage" and "layer" in part:  # name a stage by the block it reduces at, as the overlays do
        blocks = {v: sorted({int(b) for b in part.loc[part[hue] == v, "layer"]}) for v in levels}
        names = {v: "block " + "/".join(map(str, b)) for v, b in blocks.items()}
        hue_title = "reduction at"
    width = 0.3 if len(levels) > 1 else 0.0
    ax = plt.gca() if ax is None else ax
    for k, level in enumerate(levels):
        rows = part[part[hue] == level]
        xs, means, errs = [], [], []
        for pair, grp in rows.groupby([a, b], sort=False):
            values = grp["value"].to_numpy(np.float64)
            values = values[np.isfinite(values)]
            if not values.size:
                continue
            offset = (k / max(1, len(levels) - 1) - 0.5) * width if len(levels) > 1 else 0.0
            xs.append(pos[tuple(pair)] + offset)
            means.append(values.mean())
            errs.append(_errors(values, errorbar))
        srt = np.argsort(xs)
        ax.errorbar(
            np.asarray(xs)[srt], np.asarray(means)[srt], yerr=np.asarray(errs)[srt], label=names[level],
            marker=_MARKERS[k % len(_MARKERS)], linestyle=_STYLES[k % len(_STYLES)], capsize=3, markersize=5,
        )  # fmt: skip
    ax.set_xticks(range(len(order)), [f"{_fmt(x)} vs {_fmt(y)}" for x, y in order], rotation=30, ha="right")
    ax.set_xlabel(f"{varying.replace('_', ' ')} pair (A vs B)")
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)}, {_ERRORBAR_TEXT[errorbar]}")
    ax.set_title(title, fontsize=9)
    ax.legend(title=hue_title, fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if len(order) == 1:  # one tick: the dodged points are the blocks of one pair, not a trend
        ax.text(0.5, 0.02, f"one {varying.replace('_', ' ')} pair: record more {varying.replace('_', ' ')}s "
                "for a trend", transform=ax.transAxes, ha="center", va="bottom", fontsize=7, color="0.3")  # fmt: skip
    return ax


@checked_keywords()
def similarity_vs_keep_rate(
    data, *, method=None, metric: str | None = None, hue: str = "stage", errorbar: str = "sd", ax: Axes | None = None
) -> Axes:
    """Figure 1: pattern similarity between keep rates of one method (constant backbone), per stage.

    Parameters
    ----------
    data : pandas.DataFrame
        :func:`tokvis.analysis.compare` with ``by="keep_rate"`` (columns ``keep_rate_a``,
        ``keep_rate_b``, ``method``, ``backbone``, ``family``, ``stage``, ``metric``, ``value``).
    method : str, optional
        The method drawn (required when ``data`` holds several).
    metric : str, optional
        Default: the study's, IoU for pruning, V-measure ("NMI (V-measure)") for merging.
    hue : str
        One line per value of this column (default per stage).
    errorbar : {"sd", "se", "ci"}
        Spread over images: standard deviation (default), standard error, or normal 95% interval of the mean.
    ax : Axes, optional

    Returns
    -------
    Axes
        One errorbar line per ``hue`` level (distinct marker and line style, slightly offset), x = keep-rate pair.
    """
    _frame(data, ["method", "backbone"])
    part = _one(data, "method", method, "method")
    part = _one(part, "backbone", None, "backbone")
    name = part["method"].iloc[0]
    return _pair_similarity(part, varying="keep_rate", metric=metric, hue=hue, errorbar=errorbar, ax=ax,
                            title=f"{name}: similarity across keep rates\n{part['backbone'].iloc[0]}")  # fmt: skip


@checked_keywords()
def similarity_vs_backbone(
    data,
    *,
    method=None,
    keep_rate=None,
    metric: str | None = None,
    hue: str = "stage",
    errorbar: str = "sd",
    ax: Axes | None = None,
) -> Axes:
    """Figure 2: pattern similarity between backbones (capacities) of one method at one keep rate.

    Parameters
    ----------
    data : pandas.DataFrame
        :func:`tokvis.analysis.compare` with ``by="backbone"`` (``backbone_a``, ``backbone_b``, ...).
    method, keep_rate : optional
        Which method and keep rate (required when ``data`` holds several).
    metric, hue, errorbar, ax
        As in :func:`similarity_vs_keep_rate`.

    Returns
    -------
    Axes
    """
    _frame(data, ["method", "keep_rate"])
    part = _one(data, "method", method, "method")
    part = _one(part, "keep_rate", keep_rate, "keep rate")
    name, kr = part["method"].iloc[0], part["keep_rate"].iloc[0]
    return _pair_similarity(part, varying="backbone", metric=metric, hue=hue, errorbar=errorbar, ax=ax,
                            title=f"{name}, keep rate {_fmt(kr)}:\nsimilarity across backbones")  # fmt: skip


# --------------------------------------------------------------------------------------------
# figure 4: performance
# --------------------------------------------------------------------------------------------


def _key(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    try:
        return f"{float(v):.6g}"
    except (TypeError, ValueError):
        return str(v)


@checked_keywords()
def pair_performance(pairs, performance, *, by: str, measure: str, metric: str | None = None, reference=None):
    """Per pair of runs: mean similarity and the difference of a performance measure.

    Parameters
    ----------
    pairs : pandas.DataFrame
        Tidy pair rows with the fields not varied (``backbone``, ``method``, ``dataset``, ``keep_rate``),
        ``<by>_a``, ``<by>_b``, ``metric`` and ``value``: :func:`tokvis.analysis.compare` output or
        :func:`cls_similarity`.  Values are averaged over images and stages of each pair.
    performance : pandas.DataFrame
        One row per run: ``backbone``, ``method``, ``keep_rate``, ``dataset`` and ``measure``.
    by : str
        The field varied within a pair (``"keep_rate"``, ``"backbone"``, ``"method"``).
    measure : str
        Column of ``performance`` (e.g. ``"top1"``, ``"fidelity"``).
    metric : str, optional
        Keep only rows of this metric (default: every metric, one row per pair and metric).
    reference : optional
        Keep only pairs with this ``<by>`` value on one side (e.g. ``"topk"``), oriented so that B is the
        reference: the similarity to the reference and ``delta = measure(A) - measure(reference)``.

    Returns
    -------
    pandas.DataFrame
        ``backbone, method, dataset, keep_rate`` (the fixed ones), ``<by>_a``, ``<by>_b``, ``metric``,
        ``similarity`` (mean), ``n_values``, ``measure_a``, ``measure_b``, ``delta`` (A - B).  Pairs whose
        runs have no performance row are left out.
    """
    import pandas as pd

    check_choice("by", by, ("keep_rate", "backbone", "method", "dataset"), error=DataError)
    a, b = f"{by}_a", f"{by}_b"
    _frame(pairs, [a, b, "metric", "value"])
    _frame(performance, [*_FIELDS, measure])
    fixed = [f for f in _FIELDS if f != by and f in pairs.columns]
    part = pairs if metric is None else pairs[pairs["metric"] == metric]
    if not len(part):
        raise DataError(f"no rows of metric {metric!r}; available: {sorted(set(pairs['metric']))}")
    grouped = (
        part.assign(**{c: part[c].map(_key) for c in [*fixed, a, b]})
        .groupby([*fixed, a, b, "metric"], sort=True)["value"]
        .agg(similarity="mean", n_values="count")
        .reset_index()
    )
    if reference is not None:
        ref = _key(reference)
        keep = (grouped[a] == ref) ^ (grouped[b] == ref)
        if not keep.any():
            raise DataError(
                f"no pair with {by}={reference!r} on one side; present: {sorted(set(grouped[a]) | set(grouped[b]))}"
            )
        grouped = grouped[keep].copy()
        swap = grouped[a] == ref
        grouped.loc[swap, [a, b]] = grouped.loc[swap, [b, a]].to_numpy()
    perf = performance.assign(**{c: performance[c].map(_key) for c in _FIELDS})[[*_FIELDS, measure]]
    dups = perf[perf.duplicated(list(_FIELDS), keep=False)]
    for side in ("a", "b"):  # several rows for a run of a pair: which one is meant?
        need = grouped[[*fixed, f"{by}_{side}"]].rename(columns={f"{by}_{side}": by})
        clash = need.merge(dups, on=[*fixed, by]) if len(dups) else dups
        if len(clash):
            row = clash.iloc[0]
            raise DataError(
                f"performance table has several rows for {dict(row[list(_FIELDS)])}: keep one row per run "
                "(backbone, method, keep_rate, dataset)"
            )
    out = grouped
    for side in ("a", "b"):
        renamed = perf.rename(columns={by: f"{by}_{side}", measure: f"measure_{side}"})
        out = out.merge(renamed, on=[*fixed, f"{by}_{side}"], how="inner")
    out["delta"] = out["measure_a"].astype(np.float64) - out["measure_b"].astype(np.float64)
    return pd.DataFrame(out)


@checked_keywords(n_boot={"minimum": 0}, ci={"low": 0.0, "high": 1.0, "low_open": True, "high_open": True})
def performance_correlation(
    data,
    *,
    x: str = "similarity",
    y: str = "delta",
    hue: str | None = None,
    measure: str | None = None,
    xlabel: str | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    ax: Axes | None = None,
) -> Axes:
    """Figure 4: Spearman correlation of Δperformance with a similarity, with a bootstrap interval.

    Parameters
    ----------
    data : pandas.DataFrame
        E.g. :func:`pair_performance` (``similarity``, ``delta``).
    x, y : str
        Columns: similarity (x) and performance difference (y).
    hue : str, optional
        Colour the points by this column (e.g. ``"method_a"``).
    measure : str, optional
        Name of the performance measure, written on the y axis (``"Δ top1 (A - B)"``): say which was used.
    xlabel : str, optional
        x-axis label (default from the metric: IoU, NMI (V-measure), linear CKA ...).
    n_boot, ci
        Bootstrap resamples and level of the interval
        (:func:`tokvis.analysis.correlation.correlate`, percentile bootstrap over pairs).
    ax : Axes, optional

    Returns
    -------
    Axes
        A scatter per ``hue`` level (one without), the least-squares line, and the title
        ``"Spearman ρ = ..., 95% bootstrap CI [..] (n = ...)"`` over how CI and p were obtained.
    """
    from tokvis.analysis.correlation import correlate

    n_boot = check_int("n_boot", n_boot, minimum=0, error=DataError)
    _frame(data, [x, y] + ([hue] if hue else []))
    ax = plt.gca() if ax is None else ax
    xs = data[x].to_numpy(np.float64)
    ys = data[y].to_numpy(np.float64)
    if hue is None:
        ax.scatter(xs, ys, s=28, alpha=0.85)
    else:
        for k, (level, part) in enumerate(data.groupby(hue, sort=True)):
            ax.scatter(part[x].to_numpy(np.float64), part[y].to_numpy(np.float64), s=28, alpha=0.85,
                       marker=_MARKERS[k % len(_MARKERS)], label=_fmt(level))  # fmt: skip
        ax.legend(title=hue, fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ok = np.isfinite(xs) & np.isfinite(ys)
    if ok.sum() >= 2 and np.ptp(xs[ok]) > 0:
        slope, intercept = np.polyfit(xs[ok], ys[ok], 1)
        line = np.array([xs[ok].min(), xs[ok].max()])
        ax.plot(line, slope * line + intercept, color="0.3", linewidth=1, linestyle="--", label="_fit")
    metric = data["metric"].iloc[0] if "metric" in data.columns and data["metric"].nunique() == 1 else None
    ax.set_xlabel(xlabel or (METRIC_LABELS.get(metric, metric) if metric else x))
    ax.set_ylabel(f"Δ {measure} (A - B)" if measure else y)
    res = correlate(xs, ys, method="spearman", n_boot=n_boot, ci=ci)
    ax.set_title(correlation_title(res, n_boot=n_boot, ci=ci), fontsize=8)
    return ax


@checked_keywords()
def cls_similarity(runs: Sequence, *, by: str, block: int = -1):
    """Linear CKA between the class-token features of every pair of runs that differ only in ``by``.

    Parameters
    ----------
    runs : sequence of Run
        Run stores recorded with ``--cls`` (``run.cls_features()``), on the same images.
    by : str
        The varied field (``"keep_rate"``, ``"backbone"``, ``"method"``).
    block : int
        Block whose output feature is compared (default the last).

    Returns
    -------
    pandas.DataFrame
        Pair rows like :func:`tokvis.analysis.compare` (fixed fields, ``<by>_a``, ``<by>_b``), with
        ``metric="cka"`` and ``value`` (one value per pair, over all images).
    """
    import itertools

    import pandas as pd

    from tokvis.analysis.features import linear_cka

    check_choice("by", by, ("keep_rate", "backbone", "method", "dataset"), error=DataError)
    fixed = [f for f in _FIELDS if f != by]
    groups: dict[tuple, list] = {}
    for run in runs:
        groups.setdefault(tuple(_key(getattr(run.meta, f, None)) for f in fixed), []).append(run)
    rows = []
    for key, members in groups.items():
        for ra, rb in itertools.combinations(members, 2):
            if list(ra.image_ids) != list(rb.image_ids):
                raise TraceMismatchError(
                    f"{ra.path.name} and {rb.path.name} hold different images: CLS features are compared per image"
                )
            va, vb = getattr(ra.meta, by), getattr(rb.meta, by)
            if _key(va) == _key(vb):
                continue  # same value of the varied field (e.g. option ablations): not a pair along `by`
            fa, fb = np.asarray(ra.cls_features())[:, block], np.asarray(rb.cls_features())[:, block]
            if by == "keep_rate" and (va or 0) < (vb or 0):
                (va, fa), (vb, fb) = (vb, fb), (va, fa)
            rows.append({**dict(zip(fixed, key, strict=True)), f"{by}_a": va, f"{by}_b": vb, "metric": "cka",
                         "value": linear_cka(fa, fb)})  # fmt: skip
    return pd.DataFrame(rows, columns=[*fixed, f"{by}_a", f"{by}_b", "metric", "value"])


# --------------------------------------------------------------------------------------------
# figure 5: overlays of every method
# --------------------------------------------------------------------------------------------


def _last_layer(trace, layer):
    if layer is None:
        if not len(trace.layers):
            raise TraceMismatchError(f"{_name(trace)} recorded no reduction: nothing to draw")
        return int(trace.layers[-1])
    return int(layer)


def _check_image_index(trace, image_index: int) -> None:
    if not 0 <= image_index < trace.num_images:
        raise TraceMismatchError(
            f"image_index {image_index} out of range for {_name(trace)} ({trace.num_images} images)"
        )


def _name(trace) -> str:
    meta = getattr(trace, "meta", None)
    return str(getattr(meta, "method", None) or "trace")


def _row(x, i: int) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)[i]


@checked_keywords(image_index={"minimum": 0}, ncols={"minimum": 1})
def method_overlays(
    traces: Sequence,
    image,
    *,
    image_index: int = 0,
    layer: int | None = None,
    titles: Sequence[str] | None = None,
    kept_pixels: bool = False,
    legend: bool = True,
    axes: Any = None,
    ncols: int | None = None,
    **overlay_kwargs: Any,
) -> Figure:
    """Figure 5: the merge / keep overlay of every method on one image, in a grid, each panel with its legend.

    Parameters
    ----------
    traces : sequence of Trace or Run
        One per method (same image grid), usually at one keep rate.
    image : array [H, W, 3] in [0, 1]
        The image (``image_index`` of every trace).
    image_index : int
        Row of the traces.
    layer : int, optional
        Block drawn (default: each trace's last reduction block).
    titles : sequence of str, optional
        Panel titles (default: the method and its keep rate / r).
    kept_pixels : bool
        Tokens kept as themselves show their real pixels (:func:`tokvis.plotting.overlay.merge_overlay`).
    legend : bool
        Under each panel, a legend of what that panel draws (the dot, the fill, the borders, the
        dimming): a pruning method's panel has no merge entries, a merging method's no dropped patch.
    axes : sequence of Axes, optional
    ncols : int, optional
        Panels per row (default: up to 5).
    **overlay_kwargs
        Passed to :func:`~tokvis.plotting.overlay.merge_overlay`.

    Returns
    -------
    Figure
    """
    traces = check_traces("traces", traces)
    traces = list(traces)
    if not traces:
        raise DataError("traces is empty: pass one trace or run per method")
    grids = {tuple(t.grid_size) for t in traces}
    if len(grids) > 1:
        raise TraceMismatchError(f"traces have different patch grids {sorted(grids)}: draw them separately")
    img = _as_image(image)
    n = len(traces)
    if titles is not None and len(titles) != n:
        raise DataError(f"titles must have one entry per trace ({n}): got {len(titles)}")
    if axes is None:
        ncols = min(5, n) if ncols is None else check_int("ncols", ncols, minimum=1, error=DataError)
        nrows = -(-n // ncols)
        height = 2.6 + (0.8 if legend else 0.0)
        fig, grid_axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(2.8 * ncols, height * nrows),
                                      layout="constrained")  # fmt: skip
        axes = list(grid_axes.flat)
        for ax in axes[n:]:
            ax.set_visible(False)
        axes = axes[:n]
    else:
        axes = list(np.asarray(axes, dtype=object).flat)
        if len(axes) != n:
            raise DataError(f"axes must hold {n} Axes: got {len(axes)}")
        fig = axes[0].figure
    grid = next(iter(grids))
    for k, (t, ax) in enumerate(zip(traces, axes, strict=True)):
        _check_image_index(t, image_index)
        lay = _last_layer(t, layer)
        merge_overlay(img, _row(t.labels(lay), image_index), kept=_row(t.kept(lay), image_index), grid_size=grid,
                      ax=ax, kept_pixels=kept_pixels, **overlay_kwargs)  # fmt: skip
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
        else:
            m = t.meta
            sched = f"keep {m.keep_rate:g}" if m.keep_rate is not None else f"r={m.r}"
            ax.set_title(f"{_name(t)}\n{sched}, block {lay}", fontsize=9)
    if legend:
        keys = ("dim", "dropped_color", "border_color", "mode", "fill_alpha")
        options = {k: v for k, v in overlay_kwargs.items() if k in keys}
        for ax in axes:
            handles = legend_handles(kept_pixels=kept_pixels, drawn=ax.tokvis_overlay, **options)
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=6, frameon=False)
    return fig


# --------------------------------------------------------------------------------------------
# figure 6: feature sources (VoMix) and fused tokens under ablations (MCTF)
# --------------------------------------------------------------------------------------------


@checked_keywords(image_index={"minimum": 0})
def source_weights(trace, *, layer: int | None = None, image_index: int = 0, queries: bool = False) -> np.ndarray:
    """What fraction of each output token comes from each original patch, after block ``layer``.

    Soft decisions (VoMix mixing, SiT, PatchMerger, Sinkhorn; ``LayerDecision.soft``) are composed as
    row-normalised matrices ``W_l = S_l W_{l-1}``; hard decisions contribute their assignment, weighted by
    ``LayerDecision.weight`` when the method records one (size-weighted merges).  Without decisions
    (a run store's labels only) the hard labels are used: each token is the mean of the patches it holds.

    Parameters
    ----------
    trace : Trace or Run
        A recorded trace (soft decisions need a :class:`~tokvis.trace.Trace`; a run store gives hard labels).
    layer : int, optional
        The block after which the tokens are taken (default: the last recorded one).
    image_index : int
        Which image of the trace.
    queries : bool
        Instead of the tokens, the queries mixed into them at block ``layer``: the decision's
        ``query_soft`` (VoMix with ``residual="drop"``) times the sources of the tokens entering the
        block.  Block ``layer`` must have recorded it (a run store only with ``--soft``).

    Returns
    -------
    ndarray float64 [num_tokens, num_patches]
        Rows sum to 1 (a token with no source is a zero row).
    """
    check_trace("trace", trace)
    if not isinstance(queries, (bool, np.bool_)):
        raise ArgumentTypeError(f"queries must be True or False: got {queries!r}")
    _check_image_index(trace, image_index)
    lay = _last_layer(trace, layer)
    if not queries:
        return _token_sources(trace, lay, image_index)
    d = _query_decision(trace, lay)
    if d is None:
        raise DataError(
            f"block {lay} of {_name(trace)} recorded no query mixing (LayerDecision.query_soft): only VoMix with "
            "residual='drop' records it, and a run store keeps it only when recorded with --soft"
        )
    before = max((int(k) for k in trace.layers if k < lay), default=-1)
    src = _token_sources(trace, before, image_index)
    if src.shape[0] > d.n_in:
        raise TraceMismatchError(f"block {lay}: a decision over {d.n_in} tokens follows {src.shape[0]}")
    src = np.pad(src, ((0, d.n_in - src.shape[0]), (0, 0)))  # slots holding no patch: zero rows
    w = _row(d.query_soft, image_index).astype(np.float64) @ src
    return w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def _query_decision(trace, lay: int):
    """The decision recorded at block ``lay`` if it holds a query mixing (``query_soft``), else None."""
    for d in getattr(trace, "decisions", ()):
        if d.layer == lay and d.query_soft is not None:
            return d
    return None


def _token_sources(trace, lay: int, image_index: int) -> np.ndarray:
    """:func:`source_weights` of the tokens after block ``lay`` (-1: the patches themselves)."""
    n = int(trace.num_patches)
    decisions = getattr(trace, "decisions", None)
    if decisions is not None and any(d.soft is not None for d in decisions):
        w = np.eye(n)
        for d in decisions:
            if d.layer > lay:
                break
            if d.soft is not None:
                m = _row(d.soft, image_index).astype(np.float64)
            else:
                dst = _row(d.dst, image_index)
                weight = np.ones(dst.shape) if d.weight is None else _row(d.weight, image_index).astype(np.float64)
                m = np.zeros((d.n_out, dst.size))
                ok = dst >= 0
                m[dst[ok], np.nonzero(ok)[0]] = weight[ok]
            if m.shape[1] != w.shape[0]:
                raise TraceMismatchError(f"block {d.layer}: a decision over {m.shape[1]} tokens follows {w.shape[0]}")
            w = m @ w
            w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
        return w
    labels = _row(trace.labels(lay), image_index)
    tokens = int(labels.max()) + 1 if (labels >= 0).any() else 0
    w = np.zeros((tokens, n))
    ok = labels >= 0
    w[labels[ok], np.nonzero(ok)[0]] = 1.0
    return w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)


@checked_keywords(vmax={"low": 0.0, "low_open": True})
def token_sources(
    image,
    weights,
    *,
    grid_size,
    ax: Axes | None = None,
    title: str | None = None,
    colorbar: bool = True,
    vmax: float | None = None,
    min_weight: float = 0.01,
) -> Axes:
    """One output token's sources: the image dimmed, each patch tinted by its contribution to the token.

    Parameters
    ----------
    image : array [H, W, 3] in [0, 1]
    weights : array [num_patches] or [h, w]
        Contribution of each patch (a row of :func:`source_weights`).
    grid_size : (h, w)
    ax, title, colorbar
        The colour bar is labelled ``"contribution to the token (fraction)"``.
    vmax : float, optional
        Top of the colour scale (default: this token's largest weight); give panels that share one
        colour bar the same ``vmax``.
    min_weight : float in [0, 1)
        Patches contributing less are not tinted (default 1 %, the threshold the titles of
        :func:`feature_source_view` count): a soft mixing gives every removed token a tiny weight
        in every kept one, which the colour map's dark end would draw as black holes.

    Returns
    -------
    Axes
        Two images: the dimmed photo and the contribution heatmap (transparent below ``min_weight`` and where 0).
    """
    weights = as_array("weights", weights)
    gh, gw = _grid(grid_size)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != gh * gw:
        raise TraceMismatchError(f"weights must have h*w = {gh * gw} entries: got {w.size}")
    img = _as_image(image)
    ax = plt.gca() if ax is None else ax
    h, wd = img.shape[:2]
    ax.imshow(img * 0.45, extent=(-0.5, gw - 0.5, gh - 0.5, -0.5))
    floor = check_float("min_weight", min_weight, low=0.0, high=1.0, high_open=True, error=DataError)
    heat = np.ma.masked_where((w < floor) | (w <= 0), w).reshape(gh, gw)
    top = vmax if vmax is not None else max(float(w.max()), 1e-12)
    extent = (-0.5, gw - 0.5, gh - 0.5, -0.5)
    im = ax.imshow(heat, cmap="magma", alpha=0.8, vmin=0, vmax=top, interpolation="nearest", extent=extent)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, label="contribution to the token (fraction)", shrink=0.8)
    return ax


@checked_keywords(image_index={"minimum": 0})
def feature_source_view(
    trace,
    image,
    *,
    image_index: int = 0,
    layer: int | None = None,
    tokens: int | Sequence[int] = 4,
    axes: Any = None,
    queries: bool | None = None,
) -> Figure:
    """Figure 6 (VoMix Fig. 4): for a few output tokens of the last block, the original patches mixed into each.

    Parameters
    ----------
    trace : Trace or Run
        With soft decisions (``--soft`` runs / traces of soft methods) the mixing weights are shown;
        otherwise the hard assignment (:func:`source_weights`).
    image : array [H, W, 3] in [0, 1]
    image_index : int
    layer : int, optional
        Default: the last reduction block.
    tokens : int or sequence of int
        Token indices, or how many to show: the tokens that draw on the most patches (those holding
        >= 1 % of the token), ties broken by the weight outside the token's largest source.
    axes : sequence of Axes, optional
        One per token.
    queries : bool, optional
        Draw the queries mixed into the tokens at block ``layer`` (``source_weights(..., queries=True)``)
        instead of the tokens.  Default: when that block recorded a query mixing, as VoMix does under
        its default ``residual="drop"`` (its tokens are pruned; only their queries are mixed).

    Returns
    -------
    Figure
    """
    check_trace("trace", trace)
    lay = _last_layer(trace, layer)
    if queries is None:
        queries = _query_decision(trace, lay) is not None
    w = source_weights(trace, layer=lay, image_index=image_index, queries=queries)
    if isinstance(tokens, (int, np.integer)):
        count = check_int("tokens", tokens, minimum=1, error=DataError)
        spread = (w >= 0.01).sum(axis=1)
        outside = w.sum(axis=1) - w.max(axis=1, initial=0.0)  # mass not on the largest source
        chosen = [int(i) for i in np.lexsort((-outside, -spread))[: min(count, w.shape[0])]]
    else:
        chosen = [int(i) for i in tokens]
        if not chosen:
            raise DataError("tokens is empty: give token indices, or how many tokens to show")
        bad = [i for i in chosen if not 0 <= i < w.shape[0]]
        if bad:
            raise DataError(f"tokens {bad} do not exist after block {lay} ({w.shape[0]} tokens)")
    if axes is None:
        fig, axes = plt.subplots(1, len(chosen), squeeze=False, figsize=(2.4 * len(chosen), 2.7), layout="constrained")
        axes = axes[0]
    else:
        axes = list(np.asarray(axes, dtype=object).flat)
        fig = axes[0].figure
    top = max(float(w[chosen].max()), 1e-12)  # one colour scale for the panels' one colour bar
    for ax, tok in zip(axes, chosen, strict=True):
        n_src = int((w[tok] >= 0.01).sum())
        token_sources(image, w[tok], grid_size=trace.grid_size, ax=ax, title=f"token {tok}: {n_src} patches >= 1%",
                      colorbar=ax is axes[-1], vmax=top)  # fmt: skip
    soft = any(getattr(d, "soft", None) is not None for d in getattr(trace, "decisions", ()))
    mixed = soft and max(int((w[t] >= 0.01).sum()) for t in chosen) > 1
    how = "the tokens drawing on the most patches" if isinstance(tokens, (int, np.integer)) else "chosen tokens"
    options = dict(getattr(getattr(trace, "meta", None), "options", None) or {})
    if queries:
        kind = (f"mixed queries of {how}: each token keeps its own patch (residual='drop'); its query mixes in the "
                "removed tokens' queries")  # fmt: skip
    elif mixed:
        kind = f"soft mixing weights of {how}"
    elif _name(trace) == "vomix" and options.get("residual", "drop") == "drop":
        kind = (f"{how}: hard assignment; the query mixing of residual='drop' is not in this trace "
                "(record the run again with --soft to store it)")  # fmt: skip
    else:
        kind = f"hard assignment of {how} (soft decisions, e.g. --soft, show mixing weights)"
    what = "queries mixed into output tokens at" if queries else "sources of output tokens after"
    kind = textwrap.fill(kind, width=max(40, int(11 * fig.get_figwidth())))  # ~11 characters per inch at 10 pt
    fig.suptitle(f"{_name(trace)}: {what} block {lay}\n{kind}", fontsize=10)
    return fig


@checked_keywords(image_index={"minimum": 0})
def fused_token_views(
    traces: Sequence,
    image,
    *,
    labels: Sequence[str] | None = None,
    image_index: int = 0,
    layer: int | None = None,
    kept_pixels: bool = True,
    axes: Any = None,
) -> Figure:
    """Figure 6 (MCTF Fig. 2): fused tokens of one image under criteria ablations, one panel per trace.

    Parameters
    ----------
    traces : sequence of Trace or Run
        The same method with different options, e.g. MCTF with ``criteria="similarity"``, then
        + informativeness, then + size.
    image : array [H, W, 3] in [0, 1]
    labels : sequence of str, optional
        Panel titles (default: the options that differ between the traces, from ``meta.options``).
    image_index, layer, kept_pixels, axes
        As in :func:`method_overlays`.

    Returns
    -------
    Figure
    """
    traces = check_traces("traces", traces)
    traces = list(traces)
    if labels is None:
        opts = [dict(getattr(t.meta, "options", None) or {}) for t in traces]
        keys = sorted({k for o in opts for k in o if len({repr(p.get(k)) for p in opts}) > 1})
        labels = [", ".join(f"{k}={o.get(k)}" for k in keys) or _name(t) for o, t in zip(opts, traces, strict=True)]
    fig = method_overlays(traces, image, image_index=image_index, layer=layer, titles=list(labels),
                          kept_pixels=kept_pixels, axes=axes)  # fmt: skip
    fig.suptitle(f"{_name(traces[0])}: fused tokens under criteria ablations", fontsize=10)
    return fig
