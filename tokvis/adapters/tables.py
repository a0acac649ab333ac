"""Traces and result tables as Parquet / CSV files.

A trace is written in long form, one row per image x reduction block x patch, with columns

``image`` (0-based position), ``image_id``, ``layer`` (block index), ``kind`` (decision kind),
``patch`` (row-major patch index), ``row``, ``col`` (its grid position), ``label`` (the token
holding the patch after the block, -1 = dropped; ``trace.labels(layer)``), ``kept`` (the patch is
still its own token; ``trace.kept(layer)``) and ``depth`` (``trace.depth()``, repeated per block).

The trace metadata (:class:`~tokvis.trace.TraceMeta`) and each block's ``n_out`` travel with the
table: in the Parquet schema metadata, and in a first CSV line ``# tokvis-trace-table {json}``.
:func:`read_trace` rebuilds a trace whose ``labels`` and ``kept`` at every block equal the
original's, so every pattern metric is identical.  Optional decision data (weights, soft
assignments, scores) is not part of the table; use :meth:`Trace.save` for a lossless copy.

Result tables (any ``pandas.DataFrame``, e.g. from :func:`tokvis.analysis.compare`) are written as
they are and read back with :func:`read_table`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tokvis.errors import TraceFileError, TraceMismatchError
from tokvis.fileio import atomic_write

__all__ = ["read_table", "read_trace", "to_csv", "to_parquet", "trace_table"]

TABLE_FORMAT = "tokvis-trace-table"
TABLE_VERSION = 1
_CSV_PREFIX = "# " + TABLE_FORMAT + " "
_COLUMNS = ("image", "image_id", "layer", "kind", "patch", "row", "col", "label", "kept", "depth")


def _is_trace(obj) -> bool:
    return hasattr(obj, "decisions") and hasattr(obj, "labels") and hasattr(obj, "meta")


def _header(trace) -> dict[str, Any]:
    return {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "meta": trace.meta.to_json(),
        "layers": [{"layer": d.layer, "kind": d.kind, "n_out": d.n_out} for d in trace.decisions],
        "num_images": trace.num_images,
    }


def trace_table(trace):
    """The long-form table of a trace (see the module docstring) as a ``pandas.DataFrame``."""
    import pandas as pd

    B, n = trace.num_images, trace.num_patches
    h, w = trace.grid_size
    layers = list(trace.layers)
    L = len(layers)
    depth = trace.depth().numpy()
    labels = np.stack([trace.labels(layer).numpy() for layer in layers], axis=1) if L else np.zeros((B, 0, n))
    kept = np.stack([trace.kept(layer).numpy() for layer in layers], axis=1) if L else np.zeros((B, 0, n), bool)
    ids = list(trace.image_ids)
    if len({type(i) for i in ids}) > 1:
        ids = [str(i) for i in ids]  # one column type for Parquet
    img = np.repeat(np.arange(B), L * n)
    id_col = np.empty(B, dtype=object)
    id_col[:] = ids
    kinds = np.array([d.kind for d in trace.decisions], dtype=object)
    patch = np.tile(np.arange(n), B * L)
    return pd.DataFrame(
        {
            "image": img.astype(np.int64),
            "image_id": id_col[img],
            "layer": np.tile(np.repeat(np.array(layers, dtype=np.int64), n), B),
            "kind": np.tile(np.repeat(kinds, n), B),
            "patch": patch.astype(np.int64),
            "row": (patch // w).astype(np.int64),
            "col": (patch % w).astype(np.int64),
            "label": labels.reshape(-1).astype(np.int64),
            "kept": kept.reshape(-1).astype(bool),
            "depth": np.repeat(depth[:, None, :], L, axis=1).reshape(-1).astype(np.int64),
        },
        columns=list(_COLUMNS),
    )


def to_parquet(obj, path) -> Path:
    """Write a trace (long form, with its metadata) or a DataFrame to a Parquet file.

    Parameters
    ----------
    obj : Trace or pandas.DataFrame
    path : path

    Returns
    -------
    Path
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_trace(obj):
        table = pa.Table.from_pandas(trace_table(obj), preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[b"tokvis"] = json.dumps(_header(obj)).encode()
        table = table.replace_schema_metadata(meta)
    elif isinstance(obj, pd.DataFrame):
        table = pa.Table.from_pandas(obj, preserve_index=False)
    else:
        raise TypeError(f"obj must be a Trace or a pandas DataFrame: got {type(obj).__name__}")
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def to_csv(obj, path) -> Path:
    """Write a trace (long form, metadata in a first ``#`` line) or a DataFrame to a CSV file."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_trace(obj):

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(_CSV_PREFIX + json.dumps(_header(obj)) + "\n")
                trace_table(obj).to_csv(f, index=False)

    elif isinstance(obj, pd.DataFrame):

        def write(tmp: Path) -> None:
            obj.to_csv(tmp, index=False)

    else:
        raise TypeError(f"obj must be a Trace or a pandas DataFrame: got {type(obj).__name__}")
    return atomic_write(path, write)


def _read(path) -> tuple[Any, dict | None]:
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise TraceFileError(f"no table file at {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise TraceFileError(f"{path} is not a readable Parquet file: {type(e).__name__}: {e}") from e
        raw = (table.schema.metadata or {}).get(b"tokvis")
        header = json.loads(raw) if raw else None
        return table.to_pandas(), header
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    header = None
    skip = 0
    if first.startswith(_CSV_PREFIX):
        try:
            header = json.loads(first[len(_CSV_PREFIX) :])
        except json.JSONDecodeError as e:
            raise TraceFileError(f"{path}: the tokvis header line is not valid JSON ({e})") from e
        skip = 1
    try:
        df = pd.read_csv(path, skiprows=skip)
    except Exception as e:
        raise TraceFileError(f"{path} is not a readable CSV file: {type(e).__name__}: {e}") from e
    return df, header


def read_table(path):
    """Read a table written by :func:`to_parquet` / :func:`to_csv` (by suffix: ``.parquet``/``.pq``, else CSV).

    Returns
    -------
    pandas.DataFrame
        For a trace file, its long-form table.
    """
    return _read(path)[0]


def read_trace(path):
    """Rebuild a trace from a file written by :func:`to_parquet` / :func:`to_csv` of a trace.

    Returns
    -------
    Trace
        Same metadata, blocks, kinds, ``labels`` and ``kept`` as the written trace.  A token that
        holds no kept patch records ``keep=False`` (not observable from patch-level maps; it does
        not change ``labels`` or ``kept``).

    Raises
    ------
    TraceFileError
        Not a trace table, or its rows are incomplete or inconsistent.
    """
    import torch

    from tokvis.trace import LayerDecision, Trace, TraceMeta

    df, header = _read(path)
    if header is None or header.get("format") != TABLE_FORMAT:
        raise TraceFileError(f"{path} is not a tokvis trace table (no tokvis metadata); read it with read_table")
    if header.get("version") != TABLE_VERSION:
        raise TraceFileError(f"{path}: trace table version {header.get('version')} is not supported")
    meta = TraceMeta.from_json(header["meta"])
    infos = header["layers"]
    B = int(header["num_images"])
    n = meta.grid_size[0] * meta.grid_size[1]
    L = len(infos)
    missing = [c for c in ("image", "layer", "patch", "label", "kept") if c not in df.columns]
    if missing:
        raise TraceFileError(f"{path}: columns {missing} are missing")
    if len(df) != B * L * n:
        raise TraceFileError(f"{path}: {len(df)} rows but {B} images x {L} blocks x {n} patches = {B * L * n}")
    layer_pos = {int(info["layer"]): k for k, info in enumerate(infos)}
    try:
        img = df["image"].to_numpy(np.int64)
        lay = np.array([layer_pos[int(v)] for v in df["layer"].to_numpy()], dtype=np.int64) if L else np.zeros(0, int)
        patch = df["patch"].to_numpy(np.int64)
    except (KeyError, ValueError) as e:
        raise TraceFileError(f"{path}: image / layer / patch columns are inconsistent with the metadata ({e})") from e
    if (img < 0).any() or (img >= B).any() or (patch < 0).any() or (patch >= n).any():
        raise TraceFileError(f"{path}: image or patch index out of range")
    flat = (img * L + lay) * n + patch
    if np.unique(flat).size != flat.size:
        raise TraceFileError(f"{path}: repeated (image, layer, patch) rows")
    labels = np.empty(B * L * n, dtype=np.int64)
    kept = np.empty(B * L * n, dtype=bool)
    labels[flat] = df["label"].to_numpy(np.int64)
    kept_col = df["kept"]
    if kept_col.dtype == object:
        kept_col = kept_col.astype(str).str.lower().map({"true": True, "false": False, "1": True, "0": False})
        if kept_col.isna().any():
            raise TraceFileError(f"{path}: the kept column must hold booleans")
    kept[flat] = kept_col.to_numpy(bool)
    labels = labels.reshape(B, L, n)
    kept = kept.reshape(B, L, n)

    prev_l = np.broadcast_to(np.arange(n, dtype=np.int64), (B, n))
    prev_k = np.ones((B, n), dtype=bool)
    slots = n
    decisions = []
    rows = np.arange(B)[:, None]
    for k, info in enumerate(infos):
        lab, kp = labels[:, k], kept[:, k]
        n_out = int(info["n_out"])
        alive = prev_l >= 0
        if (lab >= n_out).any() or (lab < -1).any():
            raise TraceFileError(f"{path}: labels at block {info['layer']} outside [-1, {n_out})")
        if ((~alive) & (lab >= 0)).any() or (kp & ~prev_k).any() or (kp & (lab < 0)).any():
            raise TraceFileError(f"{path}: block {info['layer']} revives a dropped or merged patch")
        dst = np.full((B, slots), -1, dtype=np.int64)
        keep = np.zeros((B, slots), dtype=bool)
        pb, pp = np.nonzero(alive)
        dst[pb, prev_l[pb, pp]] = lab[pb, pp]
        if not np.array_equal(np.where(alive, dst[rows, np.maximum(prev_l, 0)], -1), np.where(alive, lab, -1)):
            raise TraceMismatchError(f"{path}: block {info['layer']} splits a token of the previous block")
        kb, kq = np.nonzero(prev_k & alive)
        keep[kb, prev_l[kb, kq]] = kp[kb, kq]
        decisions.append(
            LayerDecision(
                layer=int(info["layer"]),
                kind="merge" if info["kind"] == "soft" else info["kind"],  # soft weights are not in the table
                dst=torch.from_numpy(dst),
                keep=torch.from_numpy(keep),
                n_out=n_out,
            )
        )
        prev_l, prev_k, slots = lab, kp, n_out
    return Trace(decisions, meta)
