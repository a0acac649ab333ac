"""Aten operators dispatched per forward, per method: a device-free proxy for kernel launches.

On a GPU every aten operator that is not a view launches (at least) one kernel, and at ViT-B sizes the
small kernels of the matching and merging cost as much as the FLOPs they save.  This script counts them
on the CPU, in one ``torch.no_grad()`` forward of a random-init timm ViT (``pretrained=False``, no
download), with a ``TorchDispatchMode``:

- ``ops``: every aten operator of the patched forward; ``kernels``: those that do work on a device (not
  views, nor allocations (``empty``), ``_unsafe_view`` or the 0-dim host scalars of ``scalar_tensor``);
- ``unpatched``: the same for the unpatched model (the op count of a block does not depend on its
  token count, so the difference is what patching adds);
- ``red/blk``: ops (and kernels) dispatched inside the reduction -- ``method.decide`` plus
  ``apply_decision`` (``patching._decide_and_apply``) -- per reducing block;
- ``other``: ops the patched forward adds outside the reduction (proportional-attention bias,
  returned keys, ...): patched - unpatched - reduction;
- ``MB`` and ``red MB/blk``: a proxy for the memory traffic of the forward and of one reduction, in MB
  (10^6 bytes): every kernel reads its tensor arguments and writes its outputs (an in-place kernel reads
  and writes its target), each counted by :func:`footprint` (the distinct elements: an ``expand``ed
  index is read once).  On a GPU, eager small kernels are bound by these bytes, not by their FLOPs;
  caches and fusion (``torch.compile``) make the real traffic lower.  ``--dtype fp16`` measures a
  ``.half()`` model (the setting of the GPU benchmark).

ToMe runs at ``r=16`` and at ``keep_rate``, MCTF at keep rate 0.7, every other registered method at
``--keep-rate`` (learned methods unfitted).  ``--tome-repo PATH`` (a checkout of facebookresearch/ToMe)
adds the official ToMe at ``r=16``; its reduction is ``bipartite_soft_matching`` + ``merge_wavg`` (the
key mean over heads is in its attention, so not counted there; tokvis counts it in ``decide``).

Run::

    python benchmarks/bench_ops.py [--model vit_small_patch16_224] [--batch 2] [--methods tome topk]
    python benchmarks/bench_ops.py --detail tome     # also the reduction's operators, by name
    python benchmarks/bench_ops.py --dtype fp16 --batch 8 --methods tome   # traffic of a .half() model
    python benchmarks/bench_ops.py --model vit_tiny_patch16_224 --img-size 64 --depth 4   # tiny
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import tokvis
import tokvis.patching as patching
from tokvis.bench import gpu_configs, official_tome

#: operators that launch no kernel besides views: allocations, aliases, host-side 0-dim scalars
NO_KERNEL = frozenset({"empty", "empty_strided", "new_empty", "_unsafe_view", "lift_fresh", "scalar_tensor"})


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t``: a dimension of stride 0 (``expand``) counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def traffic(args, kwargs, out) -> int:
    """Bytes a kernel reads (its tensor arguments, except an ``out=`` tensor) and writes (its outputs)."""
    kwargs = dict(kwargs or {})
    kwargs.pop("out", None)  # returned as the output: written, not read
    read = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    written = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return sum(footprint(t) for t in read + written)


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched and the bytes their kernels move (:func:`traffic`), and
    separately those inside :meth:`reduction` scopes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = collections.Counter()  # name -> count, whole forward
        self.red = collections.Counter()  # name -> count, inside the reduction
        self.bytes = 0  # kernels' traffic, whole forward
        self.red_bytes = 0  # inside the reduction
        self.red_bytes_by = collections.Counter()  # name -> bytes, inside the reduction
        self.depth = 0
        self.blocks = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        free = bool(func.is_view) or name in NO_KERNEL
        key = (name, free)
        self.ops[key] += 1
        if self.depth:
            self.red[key] += 1
        out = func(*args, **(kwargs or {}))
        if not free:
            moved = traffic(args, kwargs, out)
            self.bytes += moved
            if self.depth:
                self.red_bytes += moved
                self.red_bytes_by[name] += moved
        return out

    @contextlib.contextmanager
    def reduction(self, block: bool):
        self.blocks += block and self.depth == 0
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def wrap(self, fn, *, block: bool = True):
        """``fn`` counted as reduction; a call from outside any reduction starts a reducing block if ``block``."""

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self.reduction(block):
                return fn(*args, **kwargs)

        return wrapped


def _total(c: collections.Counter, *, kernels: bool = False) -> int:
    return sum(n for (_, free), n in c.items() if not (kernels and free))


@dataclass
class Row:
    label: str
    ops: int = 0
    kernels: int = 0
    blocks: int = 0
    red_ops: float = 0.0
    red_kernels: float = 0.0
    other: int = 0
    mb: float = 0.0  # kernels' traffic of the forward, 10^6 bytes
    red_mb: float = 0.0  # per reducing block
    detail: collections.Counter = field(default_factory=collections.Counter)
    detail_bytes: collections.Counter = field(default_factory=collections.Counter)
    skipped: str = ""


def count(model: torch.nn.Module, images: torch.Tensor, wrap: dict | None = None) -> OpCounter:
    """Ops of one forward; ``wrap`` = {module: [function names]} counted as the reduction (patched back).
    A call of the first function of a module's list starts a reducing block."""
    counter = OpCounter()
    saved = []
    for mod, names in (wrap or {}).items():
        for i, name in enumerate(names):
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, counter.wrap(getattr(mod, name), block=i == 0))
    try:
        with torch.no_grad(), counter:
            model(images)
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
    return counter


def row_from(label: str, c: OpCounter, base: OpCounter) -> Row:
    ops, red = _total(c.ops), _total(c.red)
    per = max(c.blocks, 1)
    return Row(
        label,
        ops=ops,
        kernels=_total(c.ops, kernels=True),
        blocks=c.blocks,
        red_ops=red / per,
        red_kernels=_total(c.red, kernels=True) / per,
        other=ops - _total(base.ops) - red,
        mb=c.bytes / 1e6,
        red_mb=c.red_bytes / 1e6 / per,
        detail=c.red,
        detail_bytes=c.red_bytes_by,
    )


def format_table(rows: list[Row], base: OpCounter) -> str:
    head = (
        f"{'config':<26} {'ops':>7} {'kernels':>8} {'unpatched':>10} {'blocks':>6} "
        f"{'red ops/blk':>11} {'red kern/blk':>12} {'other':>6} {'MB':>9} {'red MB/blk':>10}"
    )
    lines = [head]
    lines.append(
        f"{'unpatched':<26} {_total(base.ops):>7} {_total(base.ops, kernels=True):>8} {_total(base.ops):>10} "
        f"{0:>6} {0:>11.1f} {0:>12.1f} {0:>6} {base.bytes / 1e6:>9.2f} {0:>10.3f}"
    )
    for r in rows:
        if r.skipped:
            lines.append(f"{r.label:<26} skipped: {r.skipped}")
            continue
        lines.append(
            f"{r.label:<26} {r.ops:>7} {r.kernels:>8} {_total(base.ops):>10} {r.blocks:>6} "
            f"{r.red_ops:>11.1f} {r.red_kernels:>12.1f} {r.other:>6} {r.mb:>9.2f} {r.red_mb:>10.3f}"
        )
    return "\n".join(lines)


def format_detail(row: Row) -> str:
    per = max(row.blocks, 1)
    items = sorted(row.detail.items(), key=lambda kv: (-kv[1], kv[0]))
    cells = [
        f"{name}{' (no kernel)' if free else f' ({row.detail_bytes[name] / 1e6 / per:.3f} MB)'} {n / per:g}"
        for (name, free), n in items
    ]
    return f"{row.label}: reduction ops per reducing block: " + ", ".join(cells)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random init)")
    p.add_argument("--batch", type=int, default=2, help="images per forward (op counts hardly depend on it)")
    p.add_argument("--img-size", type=int, default=None, help="model input size (tiny runs)")
    p.add_argument("--depth", type=int, default=None, help="number of blocks (tiny runs)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--keep-rate", type=float, default=0.5)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="model and image dtype")
    p.add_argument("--tome-r", type=int, default=16, help="the ToMe r row (0: none)")
    p.add_argument("--tome-repo", default=None, help="checkout of facebookresearch/ToMe: adds the official row")
    p.add_argument("--detail", nargs="*", default=None, help="print the reduction's ops of these configs")
    return p


def main(argv=None) -> list[Row]:
    args = parser().parse_args(argv)
    import timm

    kw = {k: v for k, v in (("img_size", args.img_size), ("depth", args.depth)) if v is not None}
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = timm.create_model(args.model, pretrained=False, **kw).eval().to(dtype)
    images = torch.randn(args.batch, 3, *model.patch_embed.img_size, dtype=dtype)
    methods = list(args.methods or tokvis.list_methods())
    print(
        f"model {args.model} (random init) {kw or ''}, batch {args.batch}, {args.dtype}, torch {torch.__version__}, cpu"
    )
    base = count(model, images)
    rows = []
    off = official_tome(args.tome_repo, args.tome_r) if args.tome_r else None
    if off is not None:
        import sys

        tome_timm = sys.modules["tome.patch.timm"]  # the module (tome.patch.timm is also a function's name)
        official = off(copy.deepcopy(model))
        c = count(official, images, {tome_timm: ["bipartite_soft_matching", "merge_wavg"]})
        rows.append(row_from(f"official tome r={args.tome_r}", c, base))
    for label, method, kw in gpu_configs(methods, keep_rate=args.keep_rate, tome_r=args.tome_r)[1:]:
        try:
            tokvis.patch(model, method, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unfitted learned methods warn
                c = count(model, images, {patching: ["_decide_and_apply"]})
        except tokvis.errors.TokvisError as e:  # a method that cannot run on this model is listed, not fatal
            rows.append(Row(label, skipped=str(e)))
            continue
        finally:
            tokvis.unpatch(model)
        rows.append(row_from(label, c, base))
    print(format_table(rows, base))
    if args.detail is not None:
        wanted = set(args.detail)
        for r in rows:
            if not r.skipped and (not wanted or r.label in wanted or r.label.split()[0] in wanted):
                print(format_detail(r))
    return rows


if __name__ == "__main__":
    main()
