"""Read and write the JSON exports of the "Which Tokens to Use?" study.

The study's validation script writes one JSON object per model::

    {
      "Model": "...", "Ratio": [0.7], "Location": [3, 6, 9],
      "Top1-Acc": 79.1, "Top5-Acc": 94.6, "Params": 22.1,
      "<image name>": {
        "Predictions": [...], "Target": ..., "Loss": ...,
        "Stage-3": {"Kept_Token": [...]}            # pruning methods
        "Stage-6": {"Assignment_Maps": [...]}       # merging methods
        ...
      },
      ...
    }

``Stage-<b>`` is the block ``b`` whose output holds the reduced token set (the same convention as
:attr:`tokvis.LayerDecision.layer`).

``Kept_Token`` (pruning)
    Absolute patch ids of the output tokens of the stage, in output-slot order: slot ``j`` holds
    patch ``Kept_Token[j]``.  The ids count **patches only**: the study's Top-K / EViT rank
    ``attn[:, :, 0, 1:]`` (the class token's attention to the patch tokens), so patch 0 is the
    top-left patch and the class token has no id.  Exports that count the class token as id 0 are
    read with ``id_offset=1``.  ``-1`` marks a token that is not a single patch: EViT appends its
    fused token as the *last* slot; a ``-1`` in any other slot is the previous stage's fused token,
    kept.  A stage with a fused slot becomes a decision of kind ``"fuse"`` (every input token that is
    not kept goes to the fused slot), otherwise ``"prune"`` (not kept = dropped).
``Assignment_Maps`` (merging)
    For every token entering the stage (the previous stage's output slots; the patches at the
    first stage), the output slot it is merged into, ``-1`` = dropped; prefix tokens excluded
    (the study's ToMe export removes the class token's column and row).  This is exactly
    :attr:`LayerDecision.dst`; the stage becomes a decision of kind ``"merge"``.  The study's format
    does not say which token of a group is its destination; tokvis writes that as an extra
    per-stage key ``"Keep"`` (booleans, one per entering token) which the study's scripts ignore.
    Without it, the first entering token of each group (lowest index) is taken as its destination,
    which only affects ``trace.kept`` of merging stages, never ``trace.labels``.

A stage holding both keys is read as merging (``Assignment_Maps``); ``Kept_Token`` is then ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokvis.errors import TraceFileError
from tokvis.fileio import atomic_write

__all__ = ["read_study_json", "write_study_json", "STUDY_MODEL_KEYS"]

#: Top-level keys of a study export that describe the model, not an image.
STUDY_MODEL_KEYS = ("Model", "Ratio", "Location", "Top1-Acc", "Top5-Acc", "Params")
_STAGE = "Stage-"
_PAD = -2  # id of a slot that does not exist for this image (batches padded to the widest image)


def _load(path_or_obj) -> tuple[dict, str]:
    if isinstance(path_or_obj, Mapping):
        return dict(path_or_obj), "<object>"
    path = Path(os.fspath(path_or_obj))
    if not path.is_file():
        raise TraceFileError(f"no study JSON file at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise TraceFileError(f"{path} is not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise TraceFileError(f"{path} is not a UTF-8 text file ({e})") from e
    if not isinstance(obj, dict):
        raise TraceFileError(f"{path}: a study export is a JSON object: got {type(obj).__name__}")
    return obj, str(path)


def _int_list(value, where: str, key: str) -> np.ndarray:
    if not isinstance(value, list):
        raise TraceFileError(f"{where}: {key!r} must be a list of integers: got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.ndim != 1 or (arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number))):
        raise TraceFileError(f"{where}: {key!r} must be a flat list of integers")
    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise TraceFileError(f"{where}: {key!r} must hold integers: got non-integer values")
    return arr.astype(np.int64)


def _stage_block(name: str, where: str) -> int:
    try:
        return int(name[len(_STAGE) :])
    except ValueError:
        raise TraceFileError(f"{where}: stage key {name!r} is not 'Stage-<block index>'") from None


def read_study_json(
    path_or_obj,
    *,
    grid_size,
    depth: int,
    locations: Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    id_offset: int = 0,
    backbone: str | None = None,
    method: str | None = None,
    dataset: str | None = None,
    images: Sequence[str] | None = None,
):
    """Read a study export (per image, per stage ``Kept_Token`` / ``Assignment_Maps``) into a Trace.

    Parameters
    ----------
    path_or_obj : path or dict
        The JSON file, or its already-parsed object.
    grid_size : (h, w)
        Patch grid of the model (not stored in the export), e.g. ``(14, 14)`` for 224 px, patch 16.
    depth : int
        Number of blocks of the model (not stored in the export).
    locations : list of int, optional
        Blocks to read; default: the export's ``"Location"`` (every ``Stage-<b>`` found when absent).
        Each must have a ``Stage-<b>`` entry in every image.
    num_prefix_tokens : int
        Prefix tokens of the model (metadata only; they never appear in decisions).
    id_offset : int
        Subtracted from every ``Kept_Token`` id: 0 for the study's exports (patch ids), 1 when the
        ids count the class token as 0.
    backbone, method, dataset : str, optional
        Metadata; ``method`` defaults to the export's ``"Model"``.
    images : list of str, optional
        Image names to read, in this order; default: every image of the export, in file order.

    Returns
    -------
    Trace
        One decision per stage; ``meta.image_ids`` are the image names; ``meta.keep_rate`` is the
        export's ``"Ratio"`` when it holds one value; ``meta.options["study"]`` keeps ``Model``,
        ``Ratio``, ``Top1-Acc``, ``Top5-Acc`` and ``Params``.

    Raises
    ------
    TraceFileError
        Malformed input; the message names the image and the stage.
    """
    import torch

    from tokvis.trace import LayerDecision, Trace, TraceMeta

    obj, src = _load(path_or_obj)
    try:
        h, w = (int(v) for v in grid_size)
    except (TypeError, ValueError):
        raise ValueError(f"grid_size must be a pair (h, w): got {grid_size!r}") from None
    n = h * w
    if h <= 0 or w <= 0:
        raise ValueError(f"grid_size must be positive: got {(h, w)}")
    if int(depth) <= 0:
        raise ValueError(f"depth must be a positive number of blocks: got {depth!r}")
    names = [k for k in obj if k not in STUDY_MODEL_KEYS]
    if images is not None:
        missing = [k for k in images if k not in obj or k in STUDY_MODEL_KEYS]
        if missing:
            raise TraceFileError(f"{src}: images not in the export: {missing[:5]}")
        names = list(images)
    if not names:
        raise TraceFileError(f"{src}: the export holds no image entries")
    for name in names:
        if not isinstance(obj[name], dict):
            raise TraceFileError(f"{src}, image {name!r}: expected an object of stages, got {type(obj[name]).__name__}")
    if locations is None:
        locations = obj.get("Location")
        if locations is None:
            first = obj[names[0]]
            locations = sorted(_stage_block(k, f"{src}, image {names[0]!r}") for k in first if k.startswith(_STAGE))
    if isinstance(locations, int):
        locations = [locations]
    try:
        blocks = [int(b) for b in locations]
    except (TypeError, ValueError):
        raise TraceFileError(f"{src}: 'Location' must be a list of block indices: got {locations!r}") from None
    if blocks != sorted(set(blocks)):
        raise TraceFileError(f"{src}: reduction locations must be ascending and distinct: got {blocks}")
    for b in blocks:
        if not 0 <= b < int(depth):
            raise TraceFileError(f"{src}: stage at block {b} but depth is {depth}")

    B = len(names)
    # per image: ids of the tokens entering the current stage (patch id, -1 = not a single patch)
    token_ids = [np.arange(n, dtype=np.int64) for _ in range(B)]
    decisions = []
    for b in blocks:
        stage = f"{_STAGE}{b}"
        dsts, keeps, outs, kinds = [], [], [], []
        for i, name in enumerate(names):
            where = f"{src}, image {name!r}, {stage}"
            entry = obj[name].get(stage)
            if not isinstance(entry, dict):
                raise TraceFileError(f"{where}: missing (or not an object); stages present: "
                                     f"{sorted(k for k in obj[name] if str(k).startswith(_STAGE))}")  # fmt: skip
            n_in = int(np.count_nonzero(token_ids[i] != _PAD))  # padding slots sit at the end
            ids_in = token_ids[i][:n_in]
            if "Assignment_Maps" in entry:
                dst = _int_list(entry["Assignment_Maps"], where, "Assignment_Maps")
                if dst.size != n_in:
                    raise TraceFileError(
                        f"{where}: 'Assignment_Maps' has {dst.size} entries but {n_in} tokens enter this stage"
                    )
                if dst.size and (dst.min() < -1 or dst.max() >= n_in):
                    raise TraceFileError(f"{where}: 'Assignment_Maps' values must be in [-1, {n_in}): "
                                         f"got {int(dst.min())} .. {int(dst.max())}")  # fmt: skip
                n_out = int(dst.max()) + 1 if dst.size else 0
                if "Keep" in entry:
                    keep = np.asarray(entry["Keep"])
                    if keep.shape != dst.shape or keep.dtype != np.bool_:
                        raise TraceFileError(f"{where}: 'Keep' must be {dst.size} booleans")
                    keep = keep & (dst >= 0)
                else:
                    keep = np.zeros(n_in, dtype=bool)
                    valid = np.flatnonzero(dst >= 0)
                    _, first = np.unique(dst[valid], return_index=True)
                    keep[valid[first]] = True
                new_ids = np.full(n_out, -1, dtype=np.int64)
                mask = keep & (dst >= 0)
                new_ids[dst[mask]] = ids_in[mask]
                kinds.append("merge")
            elif "Kept_Token" in entry:
                kept_ids = _int_list(entry["Kept_Token"], where, "Kept_Token")
                real = kept_ids != -1
                kept_ids = np.where(real, kept_ids - id_offset, -1)
                if np.any(kept_ids[real] < 0) or np.any(kept_ids[real] >= n):
                    raise TraceFileError(
                        f"{where}: 'Kept_Token' ids must be patch ids in [0, {n}) (after id_offset={id_offset}): "
                        f"got {kept_ids[real].min()} .. {kept_ids[real].max()}; is id_offset right?"
                    )
                if np.unique(kept_ids[real]).size != int(real.sum()):
                    raise TraceFileError(f"{where}: 'Kept_Token' repeats a patch id")
                pos = {int(p): j for j, p in enumerate(ids_in) if p >= 0}
                dst = np.full(n_in, -1, dtype=np.int64)
                keep = np.zeros(n_in, dtype=bool)
                if "Source_Slot" in entry:  # tokvis extension: exact input slot of every output slot
                    source = _int_list(entry["Source_Slot"], where, "Source_Slot")
                    if source.shape != kept_ids.shape or source.min(initial=0) < -1 or source.max(initial=0) >= n_in:
                        raise TraceFileError(f"{where}: 'Source_Slot' needs one entry in [-1, {n_in}) per slot")
                    fused = np.flatnonzero(source == -1)
                    if fused.size > 1 or np.unique(source[source >= 0]).size != int((source >= 0).sum()):
                        raise TraceFileError(f"{where}: 'Source_Slot' repeats an input slot or has several fused slots")
                    fused_slot = int(fused[0]) if fused.size else -1
                    ok = source >= 0
                    if not np.array_equal(ids_in[source[ok]], kept_ids[ok]):
                        raise TraceFileError(f"{where}: 'Source_Slot' disagrees with 'Kept_Token'")
                    dst[source[ok]], keep[source[ok]] = np.flatnonzero(ok), True
                else:
                    fused_slot = kept_ids.size - 1 if kept_ids.size and kept_ids[-1] == -1 else -1
                    # earlier fused tokens kept again: matched to the entering tokens without a patch id, in order
                    unresolved = list(np.flatnonzero(ids_in == -1))
                    for j, p in enumerate(kept_ids):
                        if j == fused_slot:
                            continue
                        if p >= 0:
                            if int(p) not in pos:
                                raise TraceFileError(
                                    f"{where}: 'Kept_Token' keeps patch {int(p)}, which is no longer its own token "
                                    "before this stage"
                                )
                            src_slot = pos[int(p)]
                        else:
                            if not unresolved:
                                raise TraceFileError(
                                    f"{where}: 'Kept_Token' has -1 in slot {j} (a kept fused token) but no fused "
                                    "token enters this stage"
                                )
                            src_slot = int(unresolved.pop(0))
                        dst[src_slot], keep[src_slot] = j, True
                if fused_slot >= 0:
                    dst[~keep] = fused_slot
                n_out = kept_ids.size
                new_ids = kept_ids.copy()
                kinds.append("fuse" if fused_slot >= 0 else "prune")
            else:
                raise TraceFileError(f"{where}: neither 'Kept_Token' nor 'Assignment_Maps' is present: "
                                     f"keys are {sorted(entry)}")  # fmt: skip
            dsts.append(dst)
            keeps.append(keep)
            outs.append(n_out)
            token_ids[i] = new_ids
        kind_set = set(kinds)
        if kind_set == {"prune", "fuse"}:
            kind = "fuse"  # EViT makes no fused token when nothing is dropped
        elif len(kind_set) > 1:
            raise TraceFileError(f"{src}, {stage}: images mix pruning and merging entries ({sorted(kind_set)})")
        else:
            kind = kinds[0]
        width = max(d.size for d in dsts)
        dst_t = torch.full((B, width), -1, dtype=torch.int64)
        keep_t = torch.zeros((B, width), dtype=torch.bool)
        for i in range(B):
            dst_t[i, : dsts[i].size] = torch.from_numpy(dsts[i])
            keep_t[i, : keeps[i].size] = torch.from_numpy(keeps[i])
        decisions.append(LayerDecision(layer=b, kind=kind, dst=dst_t, keep=keep_t, n_out=max(outs)))
        for i in range(B):  # pad entering ids to the batch's slot count
            if token_ids[i].size < max(outs):
                token_ids[i] = np.concatenate([token_ids[i], np.full(max(outs) - token_ids[i].size, _PAD)])
    ratio = obj.get("Ratio")
    keep_rate = None
    if isinstance(ratio, list) and len(ratio) == 1 and isinstance(ratio[0], (int, float)):
        keep_rate = float(ratio[0])
    elif isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        keep_rate = float(ratio)
    study = {k: obj[k] for k in STUDY_MODEL_KEYS if k in obj and k != "Location"}
    model = obj.get("Model")
    meta = TraceMeta(
        grid_size=(h, w),
        num_prefix_tokens=int(num_prefix_tokens),
        depth=int(depth),
        backbone=backbone,
        method=method if method is not None else (model if isinstance(model, str) else None),
        keep_rate=keep_rate,
        locations=blocks,
        dataset=dataset,
        image_ids=list(names),
        options={"study": study} if study else {},
    )
    try:
        return Trace(decisions, meta)
    except ValueError as e:
        raise TraceFileError(f"{src}: the stages do not chain into a valid trace ({e})") from e


def write_study_json(trace, path, *, model: str | None = None, accuracy: Mapping[str, Any] | None = None) -> Path:
    """Write a trace in the study's export format (see the module docstring).

    Pruning and fusing decisions are written as ``Kept_Token`` (absolute patch ids, ``-1`` for a
    fused token), merging and soft ones (arg-max) as ``Assignment_Maps`` plus tokvis's ``Keep``.
    :func:`read_study_json` of the written file gives a trace with the same ``labels`` and ``kept``
    at every block, hence identical metrics.

    Parameters
    ----------
    trace : Trace
    path : path
        Output file (parent directories are created).
    model : str, optional
        The ``"Model"`` entry; default ``trace.meta.method``.
    accuracy : mapping, optional
        Values for ``"Top1-Acc"``, ``"Top5-Acc"`` and ``"Params"`` (``null`` when absent: the study's
        scripts expect the keys to exist).

    Returns
    -------
    Path
    """
    meta = trace.meta
    accuracy = dict(accuracy or {})
    out: dict[str, Any] = {
        "Model": model if model is not None else meta.method,
        "Ratio": [meta.keep_rate] if meta.keep_rate is not None else [],
        "Location": list(trace.layers),
        "Top1-Acc": accuracy.get("Top1-Acc"),
        "Top5-Acc": accuracy.get("Top5-Acc"),
        "Params": accuracy.get("Params"),
    }
    ids = [str(i) for i in trace.image_ids]
    if len(set(ids)) != len(ids):
        raise TraceFileError("image ids must be distinct to be JSON keys: got repeated ids")
    clash = [i for i in ids if i in STUDY_MODEL_KEYS]
    if clash:
        raise TraceFileError(f"image ids {clash} clash with the study's model keys {STUDY_MODEL_KEYS}")
    per_image: list[dict[str, Any]] = [{} for _ in ids]
    for d in trace.decisions:
        stage = f"{_STAGE}{d.layer}"
        dst = d.dst.numpy()
        keep = d.keep.numpy()
        if d.kind in ("prune", "fuse"):
            labels = trace.labels(d.layer).numpy()
            kept = trace.kept(d.layer).numpy()
            for i in range(len(ids)):
                n_out = int(dst[i].max()) + 1 if dst.shape[1] else 0
                slots = np.full(n_out, -1, dtype=np.int64)
                p = np.flatnonzero(kept[i])
                slots[labels[i, p]] = p  # slots without a kept patch hold fused tokens: -1
                source = np.full(n_out, -1, dtype=np.int64)
                k = np.flatnonzero(keep[i] & (dst[i] >= 0))
                source[dst[i, k]] = k  # the new fused slot receives tokens but keeps none: -1
                per_image[i][stage] = {"Kept_Token": slots.tolist(), "Source_Slot": source.tolist()}
        else:
            for i in range(len(ids)):
                row = dst[i]
                # trailing padding (tokens that do not exist for this image) is cut off
                n_in = _entering(trace, d, i)
                per_image[i][stage] = {
                    "Assignment_Maps": row[:n_in].tolist(),
                    "Keep": keep[i, :n_in].tolist(),
                }
    for name, entry in zip(ids, per_image, strict=True):
        out[name] = entry
    return atomic_write(path, json.dumps(out))


def _entering(trace, d, i: int) -> int:
    """Number of tokens entering decision ``d`` for image ``i`` (the previous stage's slot count)."""
    prev = [x for x in trace.decisions if x.layer < d.layer]
    if not prev:
        return trace.num_patches
    p = prev[-1]
    row = p.dst[i].numpy()
    return int(row.max()) + 1 if row.size and row.max() >= 0 else 0
