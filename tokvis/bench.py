"""Throughput, FLOPs and recording overhead of patched models.

Figures, not assertions: these functions measure and print; targets are
checked by reading their output (``tokvis bench``, ``benchmarks/``), never by
timed unit tests.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@contextlib.contextmanager
def _explicit_attention(model: nn.Module) -> Iterator[None]:
    """Switch timm attention to its explicit (matmul + softmax) path.

    ``torch.utils.flop_counter`` does not count the CPU kernel behind
    ``scaled_dot_product_attention``; the explicit path computes the same
    attention with countable matmuls.
    """
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, v in saved:
            m.fused_attn = v


def count_flops(model: nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward pass over ``images`` (multiply-add = 2 FLOPs), with torch's flop counter."""
    with _explicit_attention(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return float(counter.get_total_flops())


def time_forward(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class BenchRow:
    config: str
    images_per_s: float
    gflops_per_image: float
    flops_ratio: float  # FLOPs of the unpatched model / FLOPs of this one
    speedup: float  # throughput / unpatched throughput
    speedup_per_flops: float  # speedup / flops_ratio
    recorded_images_per_s: float
    record_overhead: float  # recorded wall time / unrecorded wall time
    fidelity: float  # mean cosine similarity of the outputs to the unpatched model's


def benchmark(
    model: nn.Module,
    images: torch.Tensor,
    configs: Sequence[tuple[str, str | None, dict]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] | None = print,
) -> list[BenchRow]:
    """Measure throughput, FLOPs and recording overhead for several patch configurations.

    Parameters
    ----------
    model : timm VisionTransformer
        Patched and unpatched in turn (left unpatched at the end).
    images : Tensor [B, 3, H, W]
    configs : list of (label, method or None, patch kwargs)
        ``None`` = the unpatched model (the reference; put it first).
    repeats, warmup : int
        Timed and untimed forward passes per measurement.  Recorded and plain
        passes are interleaved so both see the same machine load.
    """
    from tokvis import patch, record, unpatch

    label_width = max(len(label) for label, _, _ in configs) if configs else 0

    rows: list[BenchRow] = []
    base_ips = base_flops = None
    unpatch(model)
    with torch.no_grad():
        reference = model(images).flatten(1)
    B = images.shape[0]
    for label, method, kw in configs:
        unpatch(model)
        if method is not None:
            patch(model, method, **kw)
        flops = count_flops(model, images)

        def plain() -> None:
            with torch.no_grad():
                model(images)

        def recorded() -> None:
            with torch.no_grad(), record(model):
                model(images)

        for _ in range(warmup):
            plain()
            recorded()
        t_plain, t_rec = [], []
        for _ in range(repeats):  # interleaved
            t_plain += time_forward(plain, repeats=1, warmup=0)
            t_rec += time_forward(recorded, repeats=1, warmup=0)
        tp, tr = statistics.median(t_plain), statistics.median(t_rec)
        with torch.no_grad():
            out = model(images).flatten(1)
        fidelity = float(torch.nn.functional.cosine_similarity(out, reference, dim=-1).mean())
        ips = B / tp
        if base_ips is None:
            base_ips, base_flops = ips, flops
        fr = base_flops / flops
        row = BenchRow(
            config=label,
            images_per_s=ips,
            gflops_per_image=flops / B / 1e9,
            flops_ratio=fr,
            speedup=ips / base_ips,
            speedup_per_flops=(ips / base_ips) / fr,
            recorded_images_per_s=B / tr,
            record_overhead=tr / tp,
            fidelity=fidelity,
        )
        rows.append(row)
        if progress:
            progress(format_rows([row], header=len(rows) == 1, label_width=label_width))
    unpatch(model)
    return rows


_COLUMNS = [  # (field, width, format)
    ("config", 26, "s"),
    ("images_per_s", 12, ".2f"),
    ("gflops_per_image", 16, ".2f"),
    ("flops_ratio", 11, ".2f"),
    ("speedup", 8, ".2f"),
    ("speedup_per_flops", 17, ".2f"),
    ("recorded_images_per_s", 21, ".2f"),
    ("record_overhead", 15, ".3f"),
    ("fidelity", 8, ".3f"),
]


def format_rows(rows: Sequence[BenchRow], *, header: bool = True, label_width: int = 0) -> str:
    """Fixed-width text table of benchmark rows; the config column is at least ``label_width`` wide."""
    width = max([label_width, _COLUMNS[0][1], *(len(r.config) for r in rows)])
    columns = [("config", width, "s"), *_COLUMNS[1:]]
    lines = []
    if header:
        lines.append(" ".join(f"{name:<{w}}" if fmt == "s" else f"{name:>{w}}" for name, w, fmt in columns))
    for r in rows:
        d = asdict(r)
        lines.append(
            " ".join(f"{d[name]:<{w}{fmt}}" if fmt == "s" else f"{d[name]:>{w}{fmt}}" for name, w, fmt in columns)
        )
    return "\n".join(lines)


FOUNDATION_CONFIGS: list[tuple[str, str | None, dict]] = [
    ("unpatched", None, {}),
    ("tome r=16", "tome", {"r": 16}),
    ("tome keep_rate=0.5", "tome", {"keep_rate": 0.5}),
    ("topk keep_rate=0.5", "topk", {"keep_rate": 0.5}),
    ("evit keep_rate=0.5", "evit", {"keep_rate": 0.5}),
]


def summarize_targets(rows: Sequence[BenchRow]) -> str:
    """The foundation targets, read off one run: recording overhead <= 1.03 and
    ToMe r=16 speed-up >= 0.9 x its FLOPs reduction."""
    by = {r.config: r for r in rows}
    lines = []
    worst = max(rows, key=lambda r: r.record_overhead)
    lines.append(
        f"recording overhead (recorded / plain wall time): worst {worst.record_overhead:.3f} ({worst.config}), "
        f"target <= 1.03: {'met' if worst.record_overhead <= 1.03 else 'NOT met'}"
    )
    tome = by.get("tome r=16")
    if tome is not None:
        verdict = "met" if tome.speedup_per_flops >= 0.9 else "NOT met"
        lines.append(
            f"tome r=16: speed-up {tome.speedup:.2f}x for a FLOPs reduction of {tome.flops_ratio:.2f}x -> "
            f"ratio {tome.speedup_per_flops:.2f}, target >= 0.9: {verdict}"
        )
    return "\n".join(lines)


def fitted_method_path(directory: str | os.PathLike, spec: str, keep_rate: float) -> Path:
    """Where the benchmark scripts keep a method spec fitted for ``keep_rate``: ``<dir>/<spec>_keep<rate>.safetensors``.

    ``spec`` is a name or ``name:key=value,...``; its ``:`` becomes ``_``.
    """
    return Path(directory) / f"{spec.replace(':', '_')}_keep{keep_rate:g}.safetensors"


def method_configs(
    methods: Sequence[str], keep_rates: Sequence[float] = (0.7, 0.5)
) -> list[tuple[str, str | None, dict]]:
    """The unpatched reference followed by every method at every keep rate."""
    configs: list[tuple[str, str | None, dict]] = [("unpatched", None, {})]
    configs += [(f"{m} keep_rate={k:g}", m, {"keep_rate": k}) for m in methods for k in keep_rates]
    return configs
