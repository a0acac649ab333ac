"""torch.distributed helpers for recording with several processes (``torchrun``).

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` set in the
environment) :func:`setup` initialises the default process group: gloo on CPU, nccl when
recording on CUDA.  Without those variables everything is a single process and
:func:`barrier` is a no-op.  Work is split by whole shards: rank ``k`` of ``n`` records the
pending shards ``pending[k::n]`` (:func:`assign`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

T = TypeVar("T")

__all__ = ["Context", "setup", "teardown", "barrier", "assign", "launched_by_torchrun", "resolve_device"]


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size``; ``initialized`` if it set up the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment says this process is one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def setup(*, device: str = "cpu") -> Context:
    """Initialise torch.distributed when launched by torchrun; a single-process context otherwise.

    Parameters
    ----------
    device : {"cpu", "cuda"}
        Picks the backend: gloo for CPU, nccl for CUDA.

    Returns
    -------
    Context
    """
    import torch.distributed as dist

    if not launched_by_torchrun():
        return Context()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if dist.is_initialized():
        return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, backend=backend)
    if backend == "nccl":
        import torch

        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return Context(rank=rank, world_size=world, local_rank=local, backend=backend, initialized=True)


def barrier(ctx: Context) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(ctx: Context, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (the object itself in a single process)."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(ctx: Context) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.initialized:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def assign(items: Sequence[T], ctx: Context) -> list[T]:
    """This rank's share of ``items`` (round robin, disjoint, together complete)."""
    return list(items[ctx.rank :: ctx.world_size])


def resolve_device(device: str, ctx=None) -> str:
    """``cpu``, ``cuda``, ``cuda:<n>`` or ``auto`` as a torch device string for this process (``cuda`` under
    torchrun: this process's ``cuda:<local rank>``).  ``RunConfigError`` for anything else or missing CUDA."""
    import torch

    from tokvis.store.format import RunConfigError

    if not isinstance(device, str) or (device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:")):
        raise RunConfigError(f"device must be cpu, cuda, cuda:<n> or auto: got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunConfigError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
        if device == "cuda" and ctx is not None and ctx.distributed:
            device = f"cuda:{ctx.local_rank}"
    return device
