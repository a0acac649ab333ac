"""Import ToMe-style source matrices as traces.

ToMe's source tracking (``model._tome_info["source"]`` with ``trace_source=True``) keeps, after
every block, a matrix ``source [B, tokens, original tokens]`` with ``source[b, t, p] = 1`` when
original token ``p`` is part of current token ``t``.  It is cumulative: the matrix after block
``l`` already contains every earlier merge.  When the model has a class token (or other prefix
tokens) the first ``num_prefix`` rows and columns belong to them; they are never merged with
patches and are removed here.

A list of matrices (one per reducing block, in block order) becomes one merge decision per
matrix: the decision at block ``l_k`` maps each token of matrix ``k - 1`` to the token of matrix
``k`` that contains its patches.  The matrices must be nested (every earlier token lies inside one
later token), otherwise :class:`~tokvis.errors.TraceMismatchError` is raised.

A source matrix does not say which token of a merged group was the destination; the token with
the lowest index among those merged into one output is taken as its destination (this only affects
``trace.kept``, never ``trace.labels``).  Columns that no row covers are dropped patches (``-1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokvis.errors import TraceMismatchError

__all__ = ["from_tome_source"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_from_source(src: np.ndarray, num_prefix: int, grid, index: int) -> np.ndarray:
    """``[B, N]`` token (row, prefix rows removed) holding each patch; -1 = in no row."""
    if src.ndim != 3:
        raise ValueError(f"source {index} must be 3-D [B, tokens, original tokens]: shape is {src.shape}")
    if src.dtype == np.bool_:
        src = src.astype(np.float64)
    if not np.issubdtype(src.dtype, np.number):
        raise ValueError(f"source {index} must be numeric: dtype is {src.dtype}")
    B, T, P = src.shape
    n = grid[0] * grid[1]
    if P != n + num_prefix:
        raise TraceMismatchError(
            f"source {index} has {P} columns but the grid {tuple(grid)} has {n} patches plus "
            f"num_prefix={num_prefix} prefix tokens = {n + num_prefix}; check num_prefix and grid_size"
        )
    if T < num_prefix:
        raise TraceMismatchError(f"source {index} has {T} rows, fewer than num_prefix={num_prefix}")
    member = src != 0
    if num_prefix:
        # prefix tokens stay alone: their block is the identity and they share nothing with patches
        pre = member[:, :num_prefix]
        eye = np.eye(num_prefix, dtype=bool)
        if not (
            bool((pre[:, :, :num_prefix] == eye).all())
            and not pre[:, :, num_prefix:].any()
            and not member[:, num_prefix:, :num_prefix].any()
        ):
            raise TraceMismatchError(
                f"source {index}: the first {num_prefix} rows/columns are not prefix tokens kept alone "
                "(a prefix token is merged with patches, or num_prefix is wrong)"
            )
    patches = member[:, num_prefix:, num_prefix:]  # [B, T', N]
    count = patches.sum(axis=1)
    if (count > 1).any():
        b, p = np.argwhere(count > 1)[0]
        raise TraceMismatchError(
            f"source {index}: patch {p} of image {b} belongs to {int(count[b, p])} tokens; a hard "
            "assignment (each patch in at most one token) is needed"
        )
    labels = np.where(count > 0, patches.argmax(axis=1), -1).astype(np.int64)
    return labels


def from_tome_source(
    source,
    *,
    layers: Sequence[int],
    depth: int,
    grid_size=None,
    num_prefix: int = 0,
    backbone: str | None = None,
    method: str | None = "tome",
    r=None,
    dataset: str | None = None,
    image_ids=None,
):
    """A Trace from ToMe-style source matrices.

    Parameters
    ----------
    source : array or tensor [B, tokens, original tokens], or a list of them
        Cumulative source matrices after the blocks ``layers`` (one per block, in order).  Non-zero
        entries mean membership.
    layers : list of int
        Block index of each matrix (ascending); a single int for a single matrix.
    depth : int
        Number of blocks of the model.
    grid_size : (h, w), optional
        Patch grid; default: square, from the number of patch columns.
    num_prefix : int
        Prefix tokens (class, distillation, registers) in the first rows and columns of each matrix:
        1 for ToMe on a ViT with a class token.
    backbone, method, r, dataset, image_ids
        Metadata of the trace.

    Returns
    -------
    Trace
        One ``"merge"`` decision per matrix.
    """
    import torch

    from tokvis.trace import LayerDecision, Trace, TraceMeta

    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    layers = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(v) for v in layers]
    if len(layers) != len(sources):
        raise ValueError(f"{len(sources)} source matrices but {len(layers)} layers: give one block per matrix")
    if not sources:
        raise ValueError("source must hold at least one matrix")
    if isinstance(num_prefix, bool) or int(num_prefix) != num_prefix or num_prefix < 0:
        raise ValueError(f"num_prefix must be a non-negative integer: got {num_prefix!r}")
    arrays = [_np(s) for s in sources]
    if grid_size is None:
        if arrays[0].ndim != 3:
            raise ValueError(f"source 0 must be 3-D [B, tokens, original tokens]: shape is {arrays[0].shape}")
        n = arrays[0].shape[2] - num_prefix
        side = int(round(np.sqrt(max(n, 0))))
        if side * side != n or n <= 0:
            raise ValueError(f"{n} patch columns do not form a square grid: pass grid_size=(h, w)")
        grid_size = (side, side)
    grid = tuple(int(v) for v in grid_size)
    n = grid[0] * grid[1]
    B = arrays[0].shape[0]
    prev = np.broadcast_to(np.arange(n, dtype=np.int64), (B, n))
    prev_slots = n
    rows = np.arange(B)[:, None]
    decisions = []
    for k, (arr, layer) in enumerate(zip(arrays, layers, strict=True)):
        if arr.ndim == 3 and arr.shape[0] != B:
            raise TraceMismatchError(f"source {k} has {arr.shape[0]} images but source 0 has {B}")
        lab = _labels_from_source(arr, num_prefix, grid, k)
        n_out = arr.shape[1] - num_prefix
        alive = prev >= 0
        # dst of every earlier token: the later token holding its patches; nested check by gathering back
        dst = np.full((B, prev_slots), -1, dtype=np.int64)
        pb, pp = np.nonzero(alive)
        dst[pb, prev[pb, pp]] = lab[pb, pp]
        back = np.where(alive, dst[rows, np.maximum(prev, 0)], -1)
        if not np.array_equal(back, np.where(alive, lab, -1)) or ((~alive) & (lab >= 0)).any():
            raise TraceMismatchError(
                f"source {k} (block {layer}) is not nested in the previous matrix: a token was split, or a "
                "dropped patch came back; source matrices must be cumulative (ToMe's _tome_info['source'])"
            )
        keep = np.zeros((B, prev_slots), dtype=bool)
        valid = dst >= 0
        # lowest-index member of each output group is its destination
        key = np.where(valid, dst, n_out + prev_slots)
        order = np.argsort(key, axis=1, kind="stable")
        srt = np.take_along_axis(key, order, axis=1)
        first = np.ones_like(srt, dtype=bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        first &= srt < n_out + prev_slots
        np.put_along_axis(keep, order, first, axis=1)
        decisions.append(
            LayerDecision(
                layer=layer,
                kind="merge",
                dst=torch.from_numpy(dst),
                keep=torch.from_numpy(keep),
                n_out=int(n_out),
            )
        )
        prev, prev_slots = lab, n_out
    meta = TraceMeta(
        grid_size=grid,
        num_prefix_tokens=int(num_prefix),
        depth=int(depth),
        backbone=backbone,
        method=method,
        r=r,
        locations=list(layers),
        dataset=dataset,
        image_ids=None if image_ids is None else list(image_ids),
    )
    return Trace(decisions, meta)
