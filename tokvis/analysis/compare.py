"""Compare the reduction patterns of many traces at once: the study's three pairings as tidy tables.

:func:`compare` pairs traces by their metadata (``trace.meta``: backbone, method, dataset,
keep rate / r) and measures, per pair, per compared block and per image, how similar the two
patterns are.  The three pairings of the "Which Tokens to Use?" study are ``by=`` values:

* ``by="keep_rate"`` -- across keep rates (or ``r``) of one method, same backbone and dataset;
* ``by="backbone"`` -- across capacities (backbones) at one method and keep rate;
* ``by="method"`` -- across methods at one backbone and keep rate;

and ``by="dataset"`` pairs traces of one model recorded under two dataset names (per-image
comparison needs the *same* images; to compare datasets of different images use
:func:`compare_maps` on the global maps).

Which metric applies to which kind of decision
----------------------------------------------
* **pruning patterns** (decisions of kind ``"prune"`` or ``"fuse"``): which patches are still their
  own token, ``trace.kept(layer)``; metrics ``"iou"`` and ``"ioa"`` (``|A & B| / |B|``, the fraction
  of B's kept patches that A keeps too).
* **merging patterns** (kind ``"merge"`` or ``"soft"``; soft assignments use their arg-max): which
  token holds each patch, ``trace.labels(layer)``; metrics ``"homogeneity"``, ``"completeness"``,
  ``"v_measure"``, ``"nmi"``, ``"ari"``, ``"ami"`` (and ``"mutual_info"``), computed in one pass
  by :func:`tokvis.analysis.patterns.merge_scores` with trace A as the reference
  (``labels_true``) and trace B as the compared pattern (``labels_pred``).

The family of a trace at a block is that of its last decision at or before the block (its first
decision for blocks before any reduction).  A pair is measured with the metrics of its family;
a pair of a pruning and a merging pattern has no common metric and gives no rows.  Requested
metrics that apply to no pair raise :class:`~tokvis.errors.TraceMismatchError`.

Which blocks are compared
-------------------------
``layers=None`` compares the blocks where both traces recorded a decision, and requires them to be
the same blocks (the study's "stages"); otherwise the error names both sets.  ``layers=[...]``
compares the state after any given blocks (``trace.labels(layer)`` is defined for every block),
e.g. ToMe reducing in every block against Top-K at blocks 3, 6, 9.

Conventions
-----------
``convention="standard"`` (default) gives tokvis's definitions under tokvis's metric names.
``convention="study"`` reproduces the columns of the study's analysis scripts
(``reduction_methods_analysis/compare_pruning_*.py``, ``compare_merging_*.py``,
``compare_heatmaps.py``) under the study's names: :func:`compare` gives ``IoU``, ``IoA`` (0.0 when the
intersection is empty, so also for two empty sets), ``Homogeneity`` and ``Completeness`` (the study's
argument order: tokvis's completeness and homogeneity of the pair, swapped) and ``NMI`` (the study's
name for the V-measure); :func:`compare_maps` gives ``KLD12`` (KL(B || A) in bits), ``KLD21``
(KL(A || B) in bits), ``JSD`` (the study's variant built on the reversed KL, see
:func:`tokvis.analysis.maps.js_divergence`), ``PCC``, ``SCC``, ``EMD`` and ``SIM``.  Metrics can be
requested by either name (``metric="v_measure"`` or ``"NMI"``); ARI, AMI and mutual information are
not in the study and are refused under its convention.  Formulas and sources: the ``Conventions``
sections of :mod:`tokvis.analysis.patterns`, :mod:`tokvis.analysis.maps` and
:mod:`tokvis.analysis.features`.

Pair order
----------
Within a pair, A is the trace with the *higher* keep rate (the study's "model A"; traces
scheduled by ``r`` count as lower keep rate the larger their total ``r``), or the first in sorted
order of backbone / method / dataset name.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tokvis.analysis import maps as _maps
from tokvis.analysis import patterns as _patterns
from tokvis.analysis.patterns import check_convention
from tokvis.errors import (
    AnalysisOptionError,
    ArgumentTypeError,
    ArgumentValueError,
    BlockIndexError,
    TraceMismatchError,
)
from tokvis.validate import check_choice, check_int, check_names, check_trace, did_you_mean

__all__ = [
    "BY",
    "MAP_METRICS",
    "MAPS",
    "MERGE_METRICS",
    "PRUNE_METRICS",
    "STUDY_MAP_METRICS",
    "STUDY_PATTERN_METRICS",
    "compare",
    "compare_maps",
    "global_maps",
    "pattern_family",
]

#: Metrics of pruning patterns (kept sets).
PRUNE_METRICS = ("iou", "ioa")
#: Metrics of merging patterns (labels).
MERGE_METRICS = ("homogeneity", "completeness", "v_measure", "nmi", "ari", "ami", "mutual_info")
#: ``by=`` values of :func:`compare`.
BY = ("keep_rate", "backbone", "method", "dataset")
#: Map metrics of :func:`compare_maps` (``"kl"`` is KL(A || B), ``"kl_reverse"`` KL(B || A)).
MAP_METRICS = ("kl", "kl_reverse", "js", "pcc", "scc", "emd", "sim")
#: The study's column names of the pattern metrics (``compare(convention="study")``).
STUDY_PATTERN_METRICS = {
    "iou": "IoU",
    "ioa": "IoA",
    "homogeneity": "Homogeneity",
    "completeness": "Completeness",
    "v_measure": "NMI",
}
#: The study's column names of the map metrics (``compare_maps(convention="study")``), in its order:
#: ``KLD12`` = KL(B || A) and ``KLD21`` = KL(A || B), both in bits.
STUDY_MAP_METRICS = {
    "kl_reverse": "KLD12",
    "kl": "KLD21",
    "js": "JSD",
    "pcc": "PCC",
    "scc": "SCC",
    "emd": "EMD",
    "sim": "SIM",
}
#: Maps of :func:`global_maps`.
MAPS = ("depth", "keep_frequency", "merge_size")

_DEFAULT_METRICS = {"prune": ("iou", "ioa"), "merge": ("v_measure", "homogeneity", "completeness", "ari")}
_STUDY_DEFAULT_METRICS = {"prune": ("iou", "ioa"), "merge": ("homogeneity", "completeness", "v_measure")}
_FAMILY = {"prune": "prune", "fuse": "prune", "merge": "merge", "soft": "merge"}
_FIELDS = ("backbone", "method", "dataset", "keep_rate", "r")
_VARYING = {"keep_rate": ("keep_rate", "r"), "backbone": ("backbone",), "method": ("method",), "dataset": ("dataset",)}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _np(x) -> np.ndarray:
    """numpy view of a torch tensor (duck-typed: no torch import here) or array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _field(trace, name: str):
    return _hashable(getattr(trace.meta, name, None))


def _describe(trace, i: int) -> str:
    m = trace.meta
    sched = f"keep_rate={m.keep_rate}" if m.keep_rate is not None else f"r={m.r}"
    return f"trace {i} ({m.backbone}/{m.method}/{m.dataset}, {sched})"


def pattern_family(trace, layer: int) -> str:
    """``"prune"`` or ``"merge"``: the family of ``trace``'s pattern after block ``layer``.

    The family of the last decision at or before ``layer`` (kinds ``prune``/``fuse`` -> ``"prune"``,
    ``merge``/``soft`` -> ``"merge"``); before the first decision, the family of the first one.
    A trace without decisions is ``"prune"`` (every patch is kept).

    Parameters
    ----------
    trace : Trace or Run
        A recorded trace or a run store.
    layer : int
        A recorded block of ``trace``.
    """
    check_trace("trace", trace)
    kinds = trace.kinds  # {layer: kind}: tokvis.Trace and lazily read run stores (tokvis.load_run) both have it
    if not kinds:
        return "prune"
    layers = sorted(kinds)
    before = [lay for lay in layers if lay <= layer]
    return _FAMILY[kinds[before[-1] if before else layers[0]]]


def _metric_list(metric, convention: str = "standard") -> tuple[str, ...] | None:
    """Requested pattern metrics as tokvis names (study names are accepted under the study convention)."""
    if metric is None:
        return None
    names = check_names("metric", metric)
    if not names:
        raise ArgumentValueError("metric must name at least one metric")
    if convention == "study":
        from_study = {v: k for k, v in STUDY_PATTERN_METRICS.items()} | {"nmi": "v_measure"}
        out = []
        for name in names:
            std = from_study.get(name, name)
            if std not in STUDY_PATTERN_METRICS:
                raise AnalysisOptionError(
                    f"metric {name!r} is not a column of the study; under convention='study' choose among "
                    f"{', '.join(map(repr, STUDY_PATTERN_METRICS.values()))} (or their tokvis names "
                    f"{', '.join(map(repr, STUDY_PATTERN_METRICS))}), or use convention='standard'"
                )
            if std not in out:
                out.append(std)
        return tuple(out)
    for name in names:
        check_choice("metric", name, PRUNE_METRICS + MERGE_METRICS)
    return names


def _schedule_rank(trace) -> float:
    """Sort key of a schedule: larger = keeps more tokens (keep rate; -total r)."""
    m = trace.meta
    if m.keep_rate is not None:
        return float(m.keep_rate)
    if m.r is None:
        return float("inf")
    r = m.r if isinstance(m.r, (list, tuple)) else [m.r]
    return -float(sum(r))


def _align(a, b, ia: int, ib: int) -> np.ndarray | None:
    """Row order of ``b`` matching ``a``'s image ids, ``None`` when already aligned; errors name the difference."""
    if tuple(a.grid_size) != tuple(b.grid_size):
        raise TraceMismatchError(
            f"{_describe(a, ia)} has a {tuple(a.grid_size)} patch grid but {_describe(b, ib)} has "
            f"{tuple(b.grid_size)}: patterns of different grids cannot be compared per image "
            "(use compare_maps on global maps of the same grid, or record at the same input size)"
        )
    ids_a, ids_b = list(a.image_ids), list(b.image_ids)
    for t, i, ids in ((a, ia, ids_a), (b, ib, ids_b)):
        if len(set(ids)) != len(ids):
            seen: set = set()
            dup = next(k for k in ids if k in seen or seen.add(k))
            raise TraceMismatchError(
                f"{_describe(t, i)} holds image id {dup!r} more than once: images are paired by id, so each id must "
                "be unique (record each image once, or select unique ones with Trace.select)"
            )
    if ids_a == ids_b:
        return None
    missing_b = [i for i in ids_a if i not in set(ids_b)]
    missing_a = [i for i in ids_b if i not in set(ids_a)]
    if missing_a or missing_b or len(ids_a) != len(ids_b):
        raise TraceMismatchError(
            f"{_describe(a, ia)} and {_describe(b, ib)} were recorded on different images "
            f"({len(ids_a)} vs {len(ids_b)} images; only in A: {missing_b[:5]}, only in B: {missing_a[:5]}); "
            "per-image comparison needs the same images (select them with Trace.select, or use compare_maps)"
        )
    if len(set(ids_a)) != len(ids_a):
        raise TraceMismatchError(f"{_describe(a, ia)} has repeated image ids; cannot align images by id")
    pos = {k: j for j, k in enumerate(ids_b)}
    return np.array([pos[k] for k in ids_a], dtype=np.int64)


def _layers_for(a, b, ia: int, ib: int, layers) -> list[int]:
    if layers is None:
        if tuple(a.layers) != tuple(b.layers):
            raise TraceMismatchError(
                f"{_describe(a, ia)} reduces at blocks {list(a.layers)} but {_describe(b, ib)} at "
                f"{list(b.layers)}; pass layers=[...] to compare the patterns after chosen blocks"
            )
        return list(a.layers)
    out = []
    for layer in layers:
        layer = check_int("layers entry", layer)
        for t, i in ((a, ia), (b, ib)):
            if not 0 <= layer < t.meta.depth:
                raise TraceMismatchError(f"layer {layer} is not a block of {_describe(t, i)} (depth {t.meta.depth})")
        out.append(layer)
    return out


def _same_metadata_error(traces: Sequence, i: int, j: int, by: str) -> TraceMismatchError:
    """Two traces agree on every field :func:`compare` pairs by: say what (else) differs and what to do."""
    a, b = traces[i], traces[j]
    what = ", ".join(f"{f}={_field(a, f)!r}" for f in _FIELDS if _field(a, f) is not None)
    head = f"traces {i} and {j} have the same {what or 'metadata'}, so compare(by={by!r}) cannot tell them apart"
    if tuple(a.grid_size) != tuple(b.grid_size):
        return TraceMismatchError(
            f"{head}; they differ in patch grid: {tuple(a.grid_size)} vs {tuple(b.grid_size)} (different input "
            "sizes). Record both at one input size to compare them per image, or compare their global maps with "
            "compare_maps after resizing to one grid"
        )
    ids_a, ids_b = list(a.image_ids), list(b.image_ids)
    if ids_a != ids_b:
        set_a, set_b = set(ids_a), set(ids_b)
        only_a = [k for k in ids_a if k not in set_b]
        only_b = [k for k in ids_b if k not in set_a]
        if not only_a and not only_b:
            diff = "the same images in a different order"
            todo = "if they are two recordings of one run, keep one"
        else:
            diff = (
                f"different images ({len(ids_a)} vs {len(ids_b)}; only in trace {i}: {only_a[:5]}, "
                f"only in trace {j}: {only_b[:5]})"
            )
            todo = (
                "if they are batches of one recording, join them with Trace.concat first; if they are two "
                "datasets, give them distinct meta.dataset names and compare with by='dataset' on the same images "
                "or with compare_maps"
            )
        return TraceMismatchError(f"{head}; they hold {diff}: {todo}")
    return TraceMismatchError(
        f"{head}; they also hold the same images ({len(ids_a)}) on the same grid: the same recording twice? "
        "Pass each recording once"
    )


def _unpaired_error(traces: Sequence, by: str) -> TraceMismatchError:
    """No two traces differ only in ``by``: name the other fields that differ, with their values."""
    varying = _VARYING[by]
    fixed = [f for f in _FIELDS if f not in varying]
    differ = {}
    for f in fixed:
        values = [_field(t, f) for t in traces]
        if len(set(map(repr, values))) > 1:
            differ[f] = values
    detail = "; ".join(
        f"{f}: " + ", ".join(f"trace {i}: {v!r}" for i, v in enumerate(vals)) for f, vals in differ.items()
    )
    hint = ""
    if set(differ) <= {"keep_rate", "r"}:
        hint = " (one is scheduled by keep_rate and another by r: record them under one schedule convention)"
    return TraceMismatchError(
        f"compare(by={by!r}) pairs traces that differ only in {'/'.join(varying)}, but these {len(traces)} traces "
        f"also differ in {', '.join(differ)} ({detail}){hint}: no pair to compare. Pass traces that agree on "
        f"{', '.join(differ)}, or compare along one of those fields with by=..."
    )


def _pairs(traces: Sequence, by: str) -> list[tuple[int, int]]:
    varying = _VARYING[by]
    fixed = [f for f in _FIELDS if f not in varying]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(traces):
        groups.setdefault(tuple(_field(t, f) for f in fixed), []).append(i)
    pairs = []
    for members in groups.values():
        seen: dict[tuple, int] = {}
        for i in members:
            key = tuple(_field(traces[i], f) for f in varying)
            if key in seen:
                raise _same_metadata_error(traces, seen[key], i, by)
            seen[key] = i
        if by == "keep_rate":
            order = sorted(members, key=lambda i: -_schedule_rank(traces[i]))
        else:
            order = sorted(members, key=lambda i: str(_field(traces[i], by)))
        pairs.extend(itertools.combinations(order, 2))
    if len(traces) > 1:
        if not pairs:
            raise _unpaired_error(traces, by)
        alone = sorted(set(range(len(traces))) - {i for p in pairs for i in p})
        if alone:
            warnings.warn(
                f"compare(by={by!r}): {', '.join(_describe(traces[i], i) for i in alone)} "
                f"{'has' if len(alone) == 1 else 'have'} no partner differing only in {'/'.join(varying)} "
                "and is left out of the table",
                UserWarning,
                stacklevel=3,
            )
    return pairs


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def compare(
    traces: Iterable, *, by: str, metric=None, layers=None, dropped: str = "exclude", convention: str = "standard"
):
    """Per-image pattern similarity of every pair of traces that differ only in ``by``.

    Parameters
    ----------
    traces : iterable of Trace
        Traces of the same images (``trace.meta.image_ids``; rows are aligned by id), each with
        metadata ``backbone``, ``method``, ``dataset``, ``keep_rate`` / ``r``.
    by : {"keep_rate", "backbone", "method", "dataset"}
        The field that varies within a pair; traces agreeing on every other field are grouped and
        every pair within a group is compared (``"keep_rate"`` varies ``keep_rate`` and ``r``).
    metric : str or list of str, optional
        Any of :data:`PRUNE_METRICS` and :data:`MERGE_METRICS`.  Default: ``iou``, ``ioa`` for
        pruning pairs and ``v_measure``, ``homogeneity``, ``completeness``, ``ari`` for merging
        pairs.  See the module docstring for which metric applies to which pair.
    layers : list of int, optional
        Blocks after which to compare; default: the blocks both traces reduce at (must agree).
    dropped : {"exclude", "group"}
        Merging metrics: patches dropped in either pattern are left out, or each pattern's dropped
        patches form one group (see :mod:`tokvis.analysis.patterns`).
    convention : {"standard", "study"}
        ``"study"``: the study's metrics, names and values (``IoU``, ``IoA``, ``Homogeneity``,
        ``Completeness``, ``NMI``; see the module docstring).  Default metrics under it: all of them.

    Returns
    -------
    pandas.DataFrame
        Long form, one row per (pair, block, image, metric): the fields not varied (``backbone``,
        ``method``, ``dataset``, ``keep_rate``, ``r``), the varied ones as ``<field>_a`` and
        ``<field>_b``, then ``family`` (``"prune"``/``"merge"``), ``layer`` (block index),
        ``stage`` (0-based position among the compared blocks), ``image_id``, ``metric`` and
        ``value`` (float).  A single trace (nothing to pair) gives an empty table with these columns;
        a trace with no partner among several is left out with a ``UserWarning`` naming it.

    Raises
    ------
    TraceMismatchError
        When two traces of a pair differ in images, patch grid or reduction blocks (the message names
        the difference), when two traces agree on every field (the message says whether they differ in
        grid or images, and what to do), when several traces give no pair at all because they also
        differ in a field other than ``by`` (the message names those fields and their values), or when
        no pair can be measured with the requested metrics.
    """
    import pandas as pd

    check_convention(convention)
    check_choice("by", by, BY)
    check_choice("dropped", dropped, ("exclude", "group"))
    if layers is not None and (isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple, range))):
        raise ArgumentTypeError(f"layers must be a list of block indices, e.g. layers=[12]: got {layers!r}")
    traces = _check_traces(traces)
    requested = _metric_list(metric, convention)
    defaults = _DEFAULT_METRICS if convention == "standard" else _STUDY_DEFAULT_METRICS
    varying = _VARYING[by]
    fixed = [f for f in _FIELDS if f not in varying]
    columns = [*fixed, *(f"{f}_{s}" for f in varying for s in "ab"), "family", "layer", "stage", "image_id"]
    columns += ["metric", "value"]

    chunks: list[dict[str, Any]] = []
    skipped_mixed = 0
    pairs = _pairs(traces, by)
    for ia, ib in pairs:
        a, b = traces[ia], traces[ib]
        order = _align(a, b, ia, ib)
        compared = _layers_for(a, b, ia, ib, layers)
        ids = np.empty(a.num_images, dtype=object)
        ids[:] = list(a.image_ids)
        base = {f: _field(a, f) for f in fixed}
        for f in varying:
            base[f"{f}_a"], base[f"{f}_b"] = _field(a, f), _field(b, f)
        for stage, layer in enumerate(compared):
            fam_a, fam_b = pattern_family(a, layer), pattern_family(b, layer)
            if fam_a != fam_b:
                skipped_mixed += 1
                continue
            family = fam_a
            names = defaults[family] if requested is None else requested
            applicable = PRUNE_METRICS if family == "prune" else MERGE_METRICS
            names = [m for m in names if m in applicable]
            if not names:
                continue
            values = _pair_values(a, b, order, layer, family, names, dropped, convention)
            for name in names:
                chunks.append(
                    {
                        **base,
                        "family": family,
                        "layer": layer,
                        "stage": stage,
                        "image_id": ids,
                        "metric": name if convention == "standard" else STUDY_PATTERN_METRICS[name],
                        "value": values[name],
                    }  # fmt: skip
                )
    if not chunks and pairs and requested is None and skipped_mixed:
        raise TraceMismatchError(
            f"compare(by={by!r}): every compared pair mixes a pruning and a merging pattern ({skipped_mixed} "
            "pair-blocks), and no pattern metric applies to both: compare methods of one family "
            "(pruning: topk, evit, ats ...; merging: tome, kmedoids ...), or compare global maps with compare_maps"
        )
    if not chunks:
        if requested is not None and pairs:
            raise TraceMismatchError(
                f"none of the metrics {list(requested)} applies to the compared pairs: IoU/IoA need pruning "
                f"patterns (kind prune/fuse) on both sides, merge metrics merging patterns (merge/soft)"
                + (f"; {skipped_mixed} pair-blocks mixed a pruning and a merging pattern" if skipped_mixed else "")
            )
        return pd.DataFrame({c: pd.Series(dtype=float if c == "value" else object) for c in columns})
    n = [len(c["value"]) for c in chunks]
    data = {}
    for c in columns:
        if c in ("image_id", "value"):
            data[c] = np.concatenate([np.asarray(ch[c]) for ch in chunks])
        else:
            data[c] = np.repeat(np.array([ch[c] for ch in chunks], dtype=object), n)
    df = pd.DataFrame(data, columns=columns)
    df["value"] = df["value"].astype(np.float64)
    df["layer"] = df["layer"].astype(np.int64)
    df["stage"] = df["stage"].astype(np.int64)
    return df


def _pair_values(a, b, order, layer: int, family: str, names, dropped: str, convention: str) -> dict[str, np.ndarray]:
    if family == "prune":
        ka, kb = _np(a.kept(layer)), _np(b.kept(layer))
        if order is not None:
            kb = kb[order]
        out = {}
        if "iou" in names:
            out["iou"] = _patterns.iou(ka, kb, convention=convention)
        if "ioa" in names:
            out["ioa"] = _patterns.ioa(ka, kb, convention=convention)
        return out
    la, lb = _np(a.labels(layer)), _np(b.labels(layer))
    if order is not None:
        lb = lb[order]
    if convention == "study":
        # the study called homogeneity_completeness_v_measure(labels_B, labels_A): B is labels_true
        names = tuple(names)
        values = _patterns.merge_scores(lb, la, metrics=names, dropped=dropped)
        return values
    return _patterns.merge_scores(la, lb, metrics=tuple(names), dropped=dropped)


# --------------------------------------------------------------------------------------------
# global maps
# --------------------------------------------------------------------------------------------


def _check_traces(traces) -> list:
    """``traces`` as a list of Trace-like objects (a Trace, a loaded run); typed errors otherwise."""
    import os

    if traces is None or isinstance(traces, (str, bytes, os.PathLike)) or not hasattr(traces, "__iter__"):
        raise ArgumentTypeError(f"traces must be a list of Traces or loaded runs: got {traces!r}")
    if hasattr(traces, "meta") and hasattr(traces, "labels"):
        raise ArgumentTypeError("traces must be a list of Traces: got one Trace; pass [trace_a, trace_b]")
    traces = list(traces)
    for i, t in enumerate(traces):
        if isinstance(t, (str, os.PathLike)):
            raise ArgumentTypeError(f"traces[{i}] is a path ({t!s}): open run stores with tokvis.load_run(path) first")
        if not (hasattr(t, "meta") and hasattr(t, "labels") and hasattr(t, "kept")):
            raise ArgumentTypeError(f"traces[{i}] is not a Trace: got {type(t).__name__}")
    return traces


def global_maps(trace, *, layer: int | None = None) -> dict[str, np.ndarray]:
    """Global spatial maps of a trace over its images.

    Parameters
    ----------
    trace : Trace
    layer : int, optional
        Block after which keep frequency and merge size are taken; default: the last block with a
        decision (every patch kept and unmerged when the trace has none).

    Returns
    -------
    dict
        ``"depth"`` (mean token depth, :func:`tokvis.analysis.maps.depth_map`), ``"keep_frequency"``
        and ``"merge_size"``, each float64 ``[h, w]``.
    """
    if isinstance(trace, (list, tuple)) or not (hasattr(trace, "meta") and hasattr(trace, "kept")):
        what = "a list: pass one trace (or run), not a list" if isinstance(trace, (list, tuple)) else repr(trace)
        raise ArgumentTypeError(f"trace must be a Trace or a loaded run: got {what}")
    if layer is None:
        layer = trace.layers[-1] if len(trace.layers) else -1
    else:
        depth = trace.meta.depth
        layer = check_int("layer", layer, error=ArgumentTypeError)
        check_int("layer", layer, minimum=-1, maximum=depth - 1, error=BlockIndexError)
    grid = tuple(trace.grid_size)
    return {
        "depth": _maps.depth_map(_np(trace.depth()), grid_size=grid),
        "keep_frequency": _maps.keep_frequency(_np(trace.kept(layer)), grid_size=grid),
        "merge_size": _maps.merge_size_map(_np(trace.labels(layer)), grid_size=grid),
    }


def _map_metric(name: str, p: np.ndarray, q: np.ndarray, convention: str = "standard") -> float:
    if name == "kl":  # KL(A || B); under the study convention kl_divergence(q, p) is KL(p || q) in bits
        return _maps.kl_divergence(p, q) if convention == "standard" else _maps.kl_divergence(q, p, convention="study")
    if name == "kl_reverse":  # KL(B || A)
        return _maps.kl_divergence(q, p) if convention == "standard" else _maps.kl_divergence(p, q, convention="study")
    if name == "js":
        return _maps.js_divergence(p, q, convention=convention)
    if name == "pcc":
        return _maps.pcc(p, q)
    if name == "scc":
        return _maps.scc(p, q)
    if name == "emd":
        return _maps.emd(p, q)
    return _maps.sim(p, q)


def compare_maps(trace_a, trace_b, *, metrics=None, maps=MAPS, layer=None, convention: str = "standard"):
    """Compare the global maps of two traces (which may be of different images, e.g. datasets).

    Parameters
    ----------
    trace_a, trace_b : Trace
        Traces with the same patch grid.
    metrics : str or iterable of str, optional
        Any of :data:`MAP_METRICS`; ``"kl"`` is KL(A || B) and ``"kl_reverse"`` KL(B || A).  Under
        ``convention="study"`` the study's names of :data:`STUDY_MAP_METRICS` are accepted too.
        Default: all of them (under the study convention in the study's column order).
    maps : str or iterable of str
        Any of :data:`MAPS` (the study compares ``"depth"``, its ``Mean-Token-Depth-Spatial``).
    layer : int, optional
        Block of the keep-frequency and merge-size maps (see :func:`global_maps`); default: each
        trace's last reduction block.
    convention : {"standard", "study"}
        ``"standard"``: KL (smoothed, ``eps=1e-12``) and JS in nats, under tokvis's names.  ``"study"``:
        the study's ``compare_heatmaps.py`` columns ``KLD12`` (KL(B || A)), ``KLD21`` (KL(A || B)), both
        unsmoothed in bits, ``JSD`` (its variant on the reversed KL: unbounded, ``inf`` where a map is
        0), ``PCC``, ``SCC``, ``EMD``, ``SIM``.  PCC, SCC, EMD and SIM (the MIT saliency benchmark's, min-max
        rescaled) are the same under both.

    Returns
    -------
    pandas.DataFrame
        One row per (map, metric): ``backbone_a``, ``method_a``, ``dataset_a``, ``keep_rate_a``,
        ``r_a``, the same with ``_b``, ``map``, ``layer_a``, ``layer_b``, ``metric``, ``value``.
    """
    import pandas as pd

    check_convention(convention)
    _check_traces([trace_a, trace_b])
    study = convention == "study"
    if metrics is None:
        metrics = tuple(STUDY_MAP_METRICS) if study else MAP_METRICS
    metrics = check_names("metrics", metrics)
    maps = check_names("maps", maps)
    from_study = {v: k for k, v in STUDY_MAP_METRICS.items()} if study else {}
    metrics = tuple(dict.fromkeys(from_study.get(m, m) for m in metrics))
    for m in metrics:
        if m not in MAP_METRICS:
            names = MAP_METRICS + (tuple(STUDY_MAP_METRICS.values()) if study else ())
            hint = ""
            if not study and m in STUDY_MAP_METRICS.values():
                hint = " (a name of the study: pass convention='study' to use it)"
            raise ArgumentValueError(
                f"metrics must be among {', '.join(map(repr, names))}: got {m!r}{hint or did_you_mean(m, names)}"
            )
    for m in maps:
        check_choice("maps", m, MAPS)
    if tuple(trace_a.grid_size) != tuple(trace_b.grid_size):
        raise TraceMismatchError(
            f"trace A has a {tuple(trace_a.grid_size)} patch grid but trace B has {tuple(trace_b.grid_size)}: "
            "maps of different grids cannot be compared"
        )
    la = layer if layer is not None else (trace_a.layers[-1] if len(trace_a.layers) else -1)
    lb = layer if layer is not None else (trace_b.layers[-1] if len(trace_b.layers) else -1)
    ma, mb = global_maps(trace_a, layer=la), global_maps(trace_b, layer=lb)
    meta = {}
    for f in _FIELDS:
        meta[f"{f}_a"], meta[f"{f}_b"] = _field(trace_a, f), _field(trace_b, f)
    rows = [
        {
            **meta,
            "map": name,
            "layer_a": la,
            "layer_b": lb,
            "metric": STUDY_MAP_METRICS[m] if study else m,
            "value": _map_metric(m, ma[name], mb[name], convention),
        }
        for name in maps
        for m in metrics
    ]
    return pd.DataFrame(rows, columns=[*meta, "map", "layer_a", "layer_b", "metric", "value"])
