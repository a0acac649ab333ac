"""Radial patterns: keep the patches nearest the image centre (the study's static baseline)."""

from __future__ import annotations

import math

import torch

from tokvis.errors import MethodOptionError, UnsupportedModelError
from tokvis.methods.base import Method, ModelInfo, ReductionContext
from tokvis.methods.ops import slots_from_keep
from tokvis.methods.registry import register_method
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice

NORMS = ("l1", "l2", "linf")


def radial_distance(grid_size: tuple[int, int], norm: str) -> torch.Tensor:
    """Distance of every patch centre to the image centre, in half-patch units.

    Patch ``(i, j)`` has its centre at ``(i + 1/2, j + 1/2)`` and the image centre
    is ``(h/2, w/2)``; doubling both gives integer offsets ``2i + 1 - h`` and
    ``2j + 1 - w``, so distances are exact and ties are exact.  ``"l2"`` returns
    the *squared* Euclidean distance (same order, still an integer).

    Parameters
    ----------
    grid_size : (h, w)
    norm : {"l1", "l2", "linf"}

    Returns
    -------
    LongTensor [h * w]
        Row-major (raster) order of the patches.
    """
    h, w = grid_size
    di = (2 * torch.arange(h) + 1 - h).abs().view(h, 1).expand(h, w)
    dj = (2 * torch.arange(w) + 1 - w).abs().view(1, w).expand(h, w)
    if norm == "l1":
        d = di + dj
    elif norm == "l2":
        d = di * di + dj * dj
    elif norm == "linf":
        d = torch.maximum(di, dj)
    else:  # pragma: no cover - validated by the method
        raise ValueError(norm)
    return d.reshape(-1)


def radial_order(grid_size: tuple[int, int], norm: str) -> torch.Tensor:
    """Patches from the nearest to the farthest from the centre.

    Sort keys, most significant first: the distance under ``norm``, the squared
    Euclidean distance, the Chebyshev distance, the raster index.  The first three
    are invariant to left-right and up-down flips, so whenever a budget ends
    between two distinct key values the kept set is flip-symmetric; only patches
    tied on all three (mirror images of each other) are ordered by raster index.

    Returns
    -------
    LongTensor [h * w]
        Raster indices of the patches, nearest first.
    """
    keys = [radial_distance(grid_size, k) for k in (norm, "l2", "linf")]
    order = torch.arange(grid_size[0] * grid_size[1])
    for key in reversed(keys):  # least significant first; stable sorts give a lexicographic order
        order = order[torch.sort(key[order], stable=True).indices]
    return order


@register_method("radial")
class Radial(Method):
    """Static radial pruning: keep the ``target`` patches nearest the image centre.

    The pattern ignores the image: every image of every batch keeps the same
    patches.  Distances are measured between patch centres and the centre of the
    patch grid, under the ``norm`` chosen (L1: a diamond, L2: a disc, L-inf: a
    square); ties are broken by :func:`radial_order` (flip-invariant keys first,
    then raster order), so the result is deterministic.

    Mapping current tokens to original patches: radial only ever prunes, keeps
    tokens in their original order, and each stage keeps the centre-nearest
    tokens among the ones left.  The ``n_in`` tokens entering any reducing block
    are therefore exactly the ``n_in`` centre-nearest patches of the whole grid
    (in raster order), and the ``target`` kept ones are the ``target``
    centre-nearest patches.  No state is carried between blocks: each decision
    is recomputed from ``(grid, n_in, target)``.

    The grid is the one of the current input (``ReductionContext.grid_size``,
    right for ``dynamic_img_size`` inputs of any size); if it is unknown (the
    model's blocks were called without going through ``model(images)``) the
    model's default grid is used when the patch count matches, else a square
    grid is assumed when the count is a perfect square, else an error is raised.

    Parameters
    ----------
    norm : {"l1", "l2", "linf"}
        Distance to the centre (default "l2").
    """

    kind = "prune"

    def __init__(self, *, norm: str = "l2") -> None:
        super().__init__()
        self.norm = check_choice("norm", norm, NORMS, error=MethodOptionError)
        self._info: ModelInfo | None = None
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def options(self) -> dict:
        return {"norm": self.norm}

    def check_model(self, info: ModelInfo) -> None:
        super().check_model(info)
        self._info = info

    def _grid(self, ctx: ReductionContext) -> tuple[int, int]:
        if ctx.grid_size is not None:
            return tuple(ctx.grid_size)  # type: ignore[return-value]
        n = ctx.n_patches
        if self._info is not None and self._info.num_patches == n:
            return self._info.grid_size
        side = math.isqrt(n)
        if side * side == n:
            return (side, side)
        raise UnsupportedModelError(
            f"radial needs the patch grid, but the grid of this {n}-patch input is unknown and {n} is not a "
            "square number; call the model on images (model(images)) so tokvis sees the input size"
        )

    def _ranks(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, distance) for a grid, cached."""
        if grid not in self._cache:
            self._cache[grid] = (radial_order(grid, self.norm), radial_distance(grid, self.norm))
        return self._cache[grid]

    def _rows(self, grid, n_in: int, target: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep, score) of one image at a block, made on the host once and cached on the device (a copy
        from the host in every forward would wait for a GPU)."""
        key = (grid, n_in, target, device, dtype)
        if key not in self._rows_cache:
            order, dist = self._ranks(grid)
            # original patches of the current tokens: the n_in centre-nearest, in raster order
            present = order[:n_in].sort().values
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            self._rows_cache[key] = ((rank[present] < target).to(device), (-dist[present]).to(device, dtype))
        return self._rows_cache[key]

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        grid = self._grid(ctx)
        B, n_in, dev = ctx.x.shape[0], ctx.n_in, ctx.x.device
        if n_in > grid[0] * grid[1]:
            raise UnsupportedModelError(
                f"radial got {n_in} patch tokens for a {grid[0]}x{grid[1]} grid; it must reduce every stage itself"
            )
        keep_row, score_row = self._rows(grid, n_in, ctx.target, dev, ctx.x.dtype)
        keep = keep_row.expand(B, n_in).clone()
        score = score_row.expand(B, n_in).clone()
        return LayerDecision(ctx.layer, "prune", slots_from_keep(keep), keep, n_out=min(ctx.target, n_in), score=score)
