"""Token budgets per block from ``keep_rate`` / ``r`` / ``locations``.

Two conventions are supported, mutually exclusive:

``keep_rate=rho``
    The study's compounding schedule.  Reductions happen at ``locations``
    (default: the blocks at 1/4, 1/2 and 3/4 of the depth, ``[3, 6, 9]`` for 12
    blocks).  Stage ``s`` (1-based, in location order) keeps
    ``floor(N * rho**s)`` patch tokens, ``N`` being the number of patches of the
    input image.
``r``
    ToMe's convention: ``r`` tokens are removed at each block.  ``r`` is an int
    (applied at every block, or only at ``locations`` when given) or a list with
    one entry per block.  A float ``0 < r < 1`` (MCTF / VoMix) is a fraction:
    ``floor(r * n_in)`` of the ``n_in`` patch tokens entering the block are removed.

``keep_rate=1.0`` or ``r=0`` keeps every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from tokvis.errors import ScheduleError

_EPS = 1e-9


def default_locations(depth: int) -> list[int]:
    """Blocks at 1/4, 1/2 and 3/4 of ``depth`` (``[3, 6, 9]`` for 12 blocks)."""
    return sorted({int(depth * f) for f in (0.25, 0.5, 0.75)})


@dataclass(frozen=True)
class Schedule:
    """Where and how much to reduce.  Build it with :func:`make_schedule`."""

    depth: int
    keep_rate: float | None
    r: tuple[int | float, ...] | None  # one entry per block (float in (0, 1): a fraction), r convention only
    locations: tuple[int, ...]
    r_arg: int | float | list[int | float] | None = None  # r as the user gave it, for metadata

    def stage(self, layer: int) -> int | None:
        """1-based stage index of block ``layer``, or ``None`` if it does not reduce."""
        try:
            return self.locations.index(layer) + 1
        except ValueError:
            return None

    def target(self, layer: int, n_in: int, n_patches: int) -> int | None:
        """Patch tokens to keep after block ``layer``; ``None`` if the block does not reduce.

        Parameters
        ----------
        layer : int
            Block index.
        n_in : int
            Patch tokens entering the block.
        n_patches : int
            Patches of the input image (``N`` of the keep-rate schedule).
        """
        s = self.stage(layer)
        if s is None:
            return None
        if self.keep_rate is not None:
            return keep_rate_budget(n_patches, self.keep_rate, s)
        assert self.r is not None
        if self.r[layer] == 0:
            return None
        return max(n_in - removal(self.r[layer], n_in), 0)

    @property
    def convention(self) -> str:
        return "keep_rate" if self.keep_rate is not None else "r"

    def capped_target(
        self, layer: int, n_in: int, n_patches: int, max_removal: Callable[[int, str], int]
    ) -> int | None:
        """:meth:`target`, raised where the method can remove at most ``max_removal(n_in, convention)`` tokens."""
        t = self.target(layer, n_in, n_patches)
        if t is None:
            return None
        return max(min(t, n_in), n_in - max_removal(n_in, self.convention))

    def check(self, n_patches: int, max_removal: Callable[[int, str], int] = lambda n, c: n - 1) -> None:
        """Raise :class:`ScheduleError` if the schedule is impossible for ``n_patches`` patches.

        Impossible: an ``r`` larger than the number of patches, or a block left
        with no patch token after the method's own cap (ToMe removes at most half
        the tokens of a block under the ``r`` convention).
        """
        if self.r is not None and max(removal(v, n_patches) for v in self.r) > n_patches:
            raise ScheduleError(
                f"r={self.r_arg} removes {max(self.r)} tokens in one block but the image has only "
                f"{n_patches} patches; use a smaller r"
            )
        n = n_patches
        for layer in self.locations:
            t = self.capped_target(layer, n, n_patches, max_removal)
            if t is None:
                continue
            if self.keep_rate is not None:  # the budget itself must be met: the method's cap is no excuse
                t = min(t, self.target(layer, n, n_patches))  # type: ignore[type-var]
            if t < 1:
                what = (
                    f"keep_rate={self.keep_rate} keeps floor({n_patches} * {self.keep_rate}**{self.stage(layer)}) "
                    f"= {self.target(layer, n, n_patches)} tokens at block {layer}"
                    if self.keep_rate is not None
                    else f"r={self.r_arg} leaves no token at block {layer} ({n} tokens enter it)"
                )
                raise ScheduleError(f"{what} for {n_patches} patches; use a larger keep rate or a smaller r")
            n = t

    def describe(self) -> str:
        if self.keep_rate is not None:
            return f"keep_rate={self.keep_rate} at blocks {list(self.locations)}"
        return f"r={self.r_arg} at blocks {list(self.locations)}"


def removal(r: int | float, n_in: int) -> int:
    """Tokens removed by one block's ``r``: the count itself, or ``floor(r * n_in)`` for a fraction ``0 < r < 1``."""
    if isinstance(r, float):
        return int(math.floor(r * n_in + _EPS))
    return int(r)


def _check_r_value(v) -> int | float:
    if isinstance(v, bool):
        raise ScheduleError(f"r must be an int, a fraction in (0, 1), or a list of them: got {v!r}")
    if isinstance(v, float):
        if v == 0.0:
            return 0
        if not 0.0 < v < 1.0:  # also rejects nan
            raise ScheduleError(
                f"a float r is a fraction of the tokens removed per block and must be in (0, 1): got {v}; "
                "pass an int for a number of tokens"
            )
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ScheduleError(f"r must be an int, a fraction in (0, 1), or a list of them: got {v!r}") from None


def keep_rate_budget(n_patches: int, keep_rate: float, stage: int) -> int:
    """``floor(n_patches * keep_rate**stage)``, robust to float round-off (0.7**2 * 100 = 49, not 48)."""
    return int(math.floor(n_patches * keep_rate**stage + _EPS))


def make_schedule(
    depth: int,
    *,
    keep_rate: float | None = None,
    r: int | Sequence[int] | None = None,
    locations: Sequence[int] | None = None,
) -> Schedule:
    """Validate the user's ``keep_rate`` / ``r`` / ``locations`` and build a :class:`Schedule`.

    Raises
    ------
    ScheduleError
        For both or neither of keep_rate and r, a keep rate outside (0, 1], a
        negative r, an r list of the wrong length, or locations out of range.
    """
    if keep_rate is not None and r is not None:
        raise ScheduleError("keep_rate and r are mutually exclusive: pass one of them")
    if keep_rate is None and r is None:
        raise ScheduleError("pass keep_rate= (fraction kept per stage, in (0, 1]) or r= (tokens removed per block)")
    if locations is not None:
        locs = _check_locations(locations, depth)
    if keep_rate is not None:
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)):
            raise ScheduleError(f"keep_rate must be a number in (0, 1]: got {keep_rate!r}")
        keep_rate = float(keep_rate)
        if not (0.0 < keep_rate <= 1.0) or math.isnan(keep_rate):
            raise ScheduleError(f"keep_rate must be in (0, 1]: got {keep_rate}")
        if locations is None:
            locs = default_locations(depth)
        return Schedule(depth=depth, keep_rate=keep_rate, r=None, locations=tuple(locs))

    # r convention
    if isinstance(r, bool):
        raise ScheduleError(f"r must be an int or a list of ints: got {r!r}")
    if isinstance(r, float):
        r = _check_r_value(r)
    if isinstance(r, (int, float)):
        if r < 0:
            raise ScheduleError(f"r must be >= 0 (tokens removed per block): got {r}")
        if locations is None:
            locs = list(range(depth))
        per_block = [r if i in locs else 0 for i in range(depth)]
        r_arg: int | list[int] = r
    else:
        try:
            per_block = [_check_r_value(v) for v in r]  # type: ignore[union-attr]
        except TypeError:
            raise ScheduleError(f"r must be an int or a list of ints: got {r!r}") from None
        if len(per_block) != depth:
            raise ScheduleError(f"an r list needs one entry per block ({depth}): got {len(per_block)}")
        if any(v < 0 for v in per_block):
            raise ScheduleError(f"r must be >= 0 at every block: got {per_block}")
        if locations is not None:
            off = [i for i, v in enumerate(per_block) if v and i not in locs]
            if off:
                raise ScheduleError(f"r list removes tokens at blocks {off}, which are not in locations {locs}")
        else:
            locs = list(range(depth))
        r_arg = per_block
    return Schedule(depth=depth, keep_rate=None, r=tuple(per_block), locations=tuple(locs), r_arg=r_arg)


def _check_locations(locations: Sequence[int], depth: int) -> list[int]:
    try:
        locs = [int(v) for v in locations]
    except (TypeError, ValueError):
        raise ScheduleError(f"locations must be a list of block indices: got {locations!r}") from None
    if not locs:
        raise ScheduleError("locations is empty: give at least one block index")
    bad = [v for v in locs if not 0 <= v < depth]
    if bad:
        raise ScheduleError(f"locations {bad} are out of range: the model has {depth} blocks (0..{depth - 1})")
    if locs != sorted(set(locs)):
        raise ScheduleError(f"locations must be strictly ascending without repeats: got {locs}")
    return locs
