"""What the viewer draws, per panel and image: token labels at every block, the block each patch stopped being
its own token, and soft assignment weights, computed from the Trace / Run API and packed as binary buffers.

A panel's *slots* are the states between reductions: slot 0 is before the first recorded block (every patch its
own token), slot ``s`` the state after the ``s``-th recorded block.  Block ``b`` (``-1 .. depth-1``) shows the
slot of the last recorded block ``<= b``; the viewer maps blocks to slots with the panel's ``layers``.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tokvis.errors import DataError, TraceMismatchError

__all__ = ["Panel", "open_panels", "panel_payload", "pack", "check_panels"]


@dataclass
class Panel:
    """One side-by-side panel of the viewer: a Trace or a lazily opened run store, with its title.

    Parameters
    ----------
    source : tokvis.trace.Trace or tokvis.store.Run
        Where the decisions come from.
    title : str
        Shown above the panel.
    """

    source: Any
    title: str

    @property
    def meta(self):
        return self.source.meta if not _is_run(self.source) else self.source._meta_base

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.source.grid_size)  # type: ignore[return-value]

    @property
    def depth(self) -> int:
        return int(self.meta.depth)

    @property
    def layers(self) -> list[int]:
        return [int(v) for v in self.source.layers]

    @property
    def kinds(self) -> list[str]:
        k = self.source.kinds
        return [k[lay] for lay in self.layers]

    @property
    def num_images(self) -> int:
        return int(self.source.num_images)

    @property
    def image_ids(self) -> list:
        return list(self.source.image_ids)

    def describe(self) -> dict[str, Any]:
        """The panel's static description for the viewer (JSON)."""
        return {
            "title": self.title,
            "grid": list(self.grid_size),
            "depth": self.depth,
            "layers": self.layers,
            "kinds": self.kinds,
        }


def _is_run(obj) -> bool:
    from tokvis.store import Run

    return isinstance(obj, Run)


def _title(source) -> str:
    m = source.meta if not _is_run(source) else source._meta_base
    sched = f"keep {m.keep_rate:g}" if m.keep_rate is not None else (f"r={m.r}" if m.r is not None else "")
    parts = [str(m.method or "?"), sched, str(m.backbone or "")]
    return " · ".join(p for p in parts if p)


def open_panels(runs_or_traces, labels: Sequence[str] | None = None) -> list[Panel]:
    """Panels from traces, loaded runs or run folders (opened lazily with :func:`tokvis.load_run`).

    Parameters
    ----------
    runs_or_traces : Trace, Run, path, or a list of them
        What to show side by side.
    labels : list of str, optional
        One title per panel (default: method, schedule and backbone).

    Returns
    -------
    list of Panel

    Raises
    ------
    tokvis.errors.DataError
        Nothing to show, an object that is neither, or ``labels`` of another length.
    tokvis.store.StoreError
        A run folder that cannot be opened (missing, corrupt, incomplete).
    """
    from tokvis.store import load_run
    from tokvis.trace import Trace

    items = list(runs_or_traces) if isinstance(runs_or_traces, (list, tuple)) else [runs_or_traces]
    if not items:
        raise DataError("explore needs at least one trace or run store: got an empty list")
    sources = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            sources.append(load_run(Path(item)))
        elif isinstance(item, Trace) or _is_run(item):
            sources.append(item)
        else:
            raise DataError(
                f"item {i} is a {type(item).__name__}: pass Traces, loaded runs (tokvis.load_run) or run folders"
            )
    if labels is not None:
        labels = [str(v) for v in labels]
        if len(labels) != len(sources):
            raise DataError(f"labels: {len(labels)} titles for {len(sources)} panels; give one per panel")
    panels = [Panel(s, labels[i] if labels else _title(s)) for i, s in enumerate(sources)]
    check_panels(panels)
    return panels


def check_panels(panels: Sequence[Panel]) -> list[np.ndarray]:
    """Check that the panels can be shown side by side; the position of each shown image in every panel.

    Returns
    -------
    list of int arrays
        ``rows[k][i]``: the position in panel ``k`` of image ``i`` of panel 0 (images are matched by id).

    Raises
    ------
    tokvis.errors.TraceMismatchError
        Panels with different patch grids, or different image sets.
    """
    first = panels[0]
    ids = first.image_ids
    rows = [np.arange(len(ids))]
    for k, p in enumerate(panels[1:], 1):
        if p.grid_size != first.grid_size:
            raise TraceMismatchError(
                f"panel {k} ({p.title}) has a {p.grid_size[0]}x{p.grid_size[1]} patch grid, panel 0 ({first.title}) "
                f"{first.grid_size[0]}x{first.grid_size[1]}: show traces of one input size side by side"
            )
        other = p.image_ids
        if other == ids:
            rows.append(np.arange(len(ids)))
            continue
        where = {v: i for i, v in enumerate(other)}
        missing = [v for v in ids if v not in where]
        if missing or len(other) != len(ids):
            extra = len(set(other) - set(ids))
            raise TraceMismatchError(
                f"panel {k} ({p.title}) holds other images than panel 0 ({first.title}): {len(missing)} of panel 0's "
                f"{len(ids)} images missing (e.g. {missing[:3]}), {extra} others; show runs of the same images side "
                "by side (select them with Trace.select)"
            )
        rows.append(np.array([where[v] for v in ids]))
    return rows


def _soft_in_weight(soft: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Weight of each input token in the output token it is assigned to (its arg-max): ``soft[dst[i], i]``."""
    w = np.zeros(dst.shape[-1], np.float64)
    ok = dst >= 0
    w[ok] = soft[dst[ok], np.nonzero(ok)[0]]
    return w


def panel_payload(panel: Panel, index: int) -> dict[str, np.ndarray | None]:
    """What the viewer needs of one image of one panel.

    Parameters
    ----------
    panel : Panel
    index : int
        Image position in the panel's source.

    Returns
    -------
    dict
        ``labels`` int16 ``[S, P]`` (slot ``s``: the trace's ``labels`` after the ``s``-th recorded block, slot 0
        before any), ``depth`` int16 ``[P]`` (the trace's ``depth()``: first block after which the patch is not its
        own token), ``weight`` uint8 ``[S, P]`` or None: for soft assignments, the product over the soft blocks of
        each patch's weight in its arg-max token (x 255), where the source holds the assignment matrix.
    """
    src = panel.source
    layers = panel.layers
    P = panel.grid_size[0] * panel.grid_size[1]
    if _is_run(src):
        shard, j = _shard_row(src, index)
        labels = [np.asarray(shard.labels(-1)[j])] + [np.asarray(shard.labels(lay)[j]) for lay in layers]
        depth = np.asarray(shard.depth()[j]) if layers else np.full(P, panel.depth)
        softs = {}
        for lay, kind in zip(layers, panel.kinds, strict=True):
            if kind == "soft" and shard.has(f"soft.{lay}"):
                softs[lay] = (np.asarray(shard.array(f"soft.{lay}")[j]), np.asarray(shard.array(f"dst.{lay}")[j]))
    else:
        labels = [src.labels(-1)[index].numpy()] + [src.labels(lay)[index].numpy() for lay in layers]
        depth = src.depth()[index].numpy()
        softs = {}
        for d in src.decisions:
            if d.kind == "soft" and d.soft is not None:
                softs[d.layer] = (d.soft[index].double().numpy(), d.dst[index].numpy())
    out: dict[str, np.ndarray | None] = {
        "labels": np.stack(labels).astype(np.int16),
        "depth": np.asarray(depth).astype(np.int16),
        "weight": None,
    }
    if softs:
        w = np.ones(P)
        ws = [w]
        for s, lay in enumerate(layers, 1):
            prev = labels[s - 1].astype(np.int64)
            if lay in softs:
                w_in = _soft_in_weight(*softs[lay])
                w = np.where(prev >= 0, w * w_in[np.clip(prev, 0, None)], 0.0)
            w = np.where(labels[s] >= 0, w, 0.0)
            ws.append(w)
        out["weight"] = np.round(np.clip(np.stack(ws), 0, 1) * 255).astype(np.uint8)
    return out


def _shard_row(run, index: int):
    """The shard holding image ``index`` of a run and the row in it (from the manifest, no shard opened)."""
    start = 0
    for shard in run.iter_shards():
        if index < start + shard.num_images:
            return shard, index - start
        start += shard.num_images
    raise IndexError(f"image {index} out of range: the run holds {start} images")


def pack(payload: dict[str, np.ndarray | None]) -> list[bytes]:
    """A payload's arrays as little-endian byte buffers in a fixed order (labels, depth[, weight])."""
    bufs = [payload["labels"].astype("<i2").tobytes(), payload["depth"].astype("<i2").tobytes()]
    if payload["weight"] is not None:
        bufs.append(payload["weight"].tobytes())
    return bufs


def deflate(data: bytes) -> bytes:
    """zlib-compressed bytes (the browser inflates them with ``DecompressionStream("deflate")``)."""
    return zlib.compress(data, 9)
