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

A method that removes at most some tokens per block (``Method.max_removal``, ToMe's half) meets a
keep-rate budget it can reach; where it cannot, it removes its most.  The study's ToMe instead turns
the keep rate into removals, ``floor(N rho**(s-1)) - floor(N rho**s)`` at stage ``s``, each capped
(``tome.py:146,155,253`` of JoakimHaurum/TokenReduction): once a cap has bound, every later stage
keeps more than its budget.  A method asks for that rule with ``removals=True``
(:meth:`Schedule.capped_target`; ToMe's ``budget="study"``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

from tokvis.errors import ScheduleError
from tokvis.validate import check_float, check_int

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

    def stage_removal(self, layer: int, n_patches: int) -> int | None:
        """Under ``keep_rate``: the previous stage's budget minus this one's (``N`` before the first stage);
        ``None`` when the block does not reduce or under ``r``."""
        s = self.stage(layer)
        if s is None or self.keep_rate is None:
            return None
        return keep_rate_budget(n_patches, self.keep_rate, s - 1) - keep_rate_budget(n_patches, self.keep_rate, s)

    def capped_target(
        self,
        layer: int,
        n_in: int,
        n_patches: int,
        max_removal: Callable[[int, str], int],
        *,
        removals: bool = False,
    ) -> int | None:
        """:meth:`target`, raised where the method can remove at most ``max_removal(n_in, convention)`` tokens.

        ``removals=True`` (``keep_rate`` only): the block removes :meth:`stage_removal` tokens, capped, whatever
        entered it, as the study's ToMe does (see the module docstring); the same as the budget until a cap binds.
        """
        t = self.target(layer, n_in, n_patches)
        if t is None:
            return None
        cap = max_removal(n_in, self.convention)
        if removals and self.keep_rate is not None:
            return n_in - min(max(self.stage_removal(layer, n_patches) or 0, 0), cap, n_in)
        return max(min(t, n_in), n_in - cap)

    def check(
        self,
        n_patches: int,
        max_removal: Callable[[int, str], int] = lambda n, c: n - 1,
        *,
        removals: bool = False,
    ) -> None:
        """Raise :class:`ScheduleError` if the schedule is impossible for ``n_patches`` patches.

        Impossible: an ``r`` larger than the number of patches, or a block left
        with no patch token after the method's own cap (ToMe removes at most half
        the tokens of a block under the ``r`` convention).  ``removals``: as in
        :meth:`capped_target`.
        """
        if self.r is not None and max(removal(v, n_patches) for v in self.r) > n_patches:
            raise ScheduleError(
                f"r={self.r_arg} removes {max(self.r)} tokens in one block but the image has only "
                f"{n_patches} patches; use a smaller r"
            )
        n = n_patches
        for layer in self.locations:
            t = self.capped_target(layer, n, n_patches, max_removal, removals=removals)
            if t is None:
                continue
            budget = t
            if self.keep_rate is not None:  # the budget itself must be >= 1: the method's cap is no excuse
                budget = min(t, self.target(layer, n, n_patches))  # type: ignore[type-var]
            if budget < 1:
                what = (
                    f"keep_rate={self.keep_rate} keeps floor({n_patches} * {self.keep_rate}**{self.stage(layer)}) "
                    f"= {self.target(layer, n, n_patches)} tokens at block {layer}"
                    if self.keep_rate is not None
                    else f"r={self.r_arg} leaves no token at block {layer} ({n} tokens enter it)"
                )
                raise ScheduleError(f"{what} for {n_patches} patches; use a larger keep rate or a smaller r")
            n = t if removals else budget

    def describe(self) -> str:
        if self.keep_rate is not None:
            return f"keep_rate={self.keep_rate} at blocks {list(self.locations)}"
        return f"r={self.r_arg} at blocks {list(self.locations)}"


def removal(r: int | float, n_in: int) -> int:
    """Tokens removed by one block's ``r``: the count itself, or ``floor(r * n_in)`` for a fraction ``0 < r < 1``."""
    if isinstance(r, float):
        return int(math.floor(r * n_in + _EPS))
    return int(r)


_R_KINDS = "an int >= 0 (tokens removed per block), a fraction in (0, 1), or a list of them with one entry per block"


def _what(v) -> str:
    """How a wrong value is named in a message: strings are called strings (``'4'`` looks like 4)."""
    return f"the string {v!r}" if isinstance(v, (str, bytes)) else f"{v!r} ({type(v).__name__})"


def _check_r_value(v, where: str = "r") -> int | float:
    """One block's ``r``: an int >= 0 or a fraction in (0, 1) (``0.0`` means 0)."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return check_int(where, v, minimum=0, error=ScheduleError)
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        if v == 0.0:
            return 0
        return check_float(where, v, low=0.0, high=1.0, low_open=True, high_open=True, error=ScheduleError)
    raise ScheduleError(f"{where} must be {_R_KINDS}: got {_what(v)}")


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

    Parameters
    ----------
    depth : int
        Blocks of the model.
    keep_rate : float in (0, 1], optional
        Per-stage keep rate (the study's schedule).
    r : int or list of int, optional
        Tokens removed at each block, or one entry per block; give ``keep_rate`` or ``r``, not both.
    locations : list of int, optional
        Blocks that reduce (default: blocks at 1/4, 1/2 and 3/4 of the depth).

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
        keep_rate = check_float("keep_rate", keep_rate, low=0.0, high=1.0, low_open=True, error=ScheduleError)
        if locations is None:
            locs = default_locations(depth)
        return Schedule(depth=depth, keep_rate=keep_rate, r=None, locations=tuple(locs))

    # r convention
    if isinstance(r, (str, bytes)):  # a string is a sequence, but never a list of r values
        raise ScheduleError(f"r must be {_R_KINDS}: got {_what(r)}")
    if isinstance(r, numbers.Real) or isinstance(r, bool):
        r = _check_r_value(r)
        if locations is None:
            locs = list(range(depth))
        per_block = [r if i in locs else 0 for i in range(depth)]
        r_arg: int | float | list[int | float] = r
    else:
        if not isinstance(r, Sequence) and not hasattr(r, "__iter__"):
            raise ScheduleError(f"r must be {_R_KINDS}: got {_what(r)}")
        per_block = [_check_r_value(v, f"r[{i}]") for i, v in enumerate(r)]  # type: ignore[union-attr]
        if len(per_block) != depth:
            raise ScheduleError(f"an r list needs one entry per block ({depth}): got {len(per_block)}")
        if locations is not None:
            off = [i for i, v in enumerate(per_block) if v and i not in locs]
            if off:
                raise ScheduleError(f"r list removes tokens at blocks {off}, which are not in locations {locs}")
        else:
            locs = list(range(depth))
        r_arg = per_block
    return Schedule(depth=depth, keep_rate=None, r=tuple(per_block), locations=tuple(locs), r_arg=r_arg)


def _check_locations(locations: Sequence[int], depth: int) -> list[int]:
    if isinstance(locations, (str, bytes)) or not hasattr(locations, "__iter__"):
        raise ScheduleError(f"locations must be a list of block indices (ints): got {_what(locations)}")
    locs = list(locations)
    for v in locs:  # 2.5 or True are not block indices (int() would turn them into blocks 2 and 1)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise ScheduleError(f"locations must be a list of block indices (ints): got {_what(v)} in {locs!r}")
    locs = [int(v) for v in locs]
    if not locs:
        raise ScheduleError("locations is empty: give at least one block index")
    bad = [v for v in locs if not 0 <= v < depth]
    if bad:
        raise ScheduleError(f"locations {bad} are out of range: the model has {depth} blocks (0..{depth - 1})")
    if locs != sorted(set(locs)):
        raise ScheduleError(f"locations must be strictly ascending without repeats: got {locs}")
    return locs
