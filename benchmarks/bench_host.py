"""Host time per forward: how much CPU work (Python, dispatcher, kernel launches) a patched forward costs.

On a GPU an eager forward whose host time exceeds its device time is CPU-bound: the device waits for
launches, and a reduction that halves the FLOPs can be slower than the unreduced model.  This script
measures the host side on the CPU, where it can be measured anywhere: a ViT with the token count and depth
of the real model (ViT-B/16 at 224: 197 tokens, 12 blocks) but a tiny width (``--width 16``), one image and
one thread, so that the arithmetic is small and the time is mostly host work.  The configurations run in
interleaved rounds (``tokvis.bench.benchmark``); ``--tome-repo`` adds the official ToMe.

Run::

    python benchmarks/bench_host.py [--tome-repo PATH] [--methods tome topk mctf] [--repeats 15]

Prints milliseconds per forward (median of the rounds; plain and recorded) and the difference to the
unpatched model.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from tokvis.bench import benchmark, gpu_configs, spread_warnings


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--width", type=int, default=16, help="embedding width (2 heads)")
    p.add_argument("--methods", nargs="+", default=["tome", "topk", "mctf", "ats"])
    p.add_argument("--keep-rate", type=float, default=0.5)
    p.add_argument("--tome-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=10, help="forwards per configuration and round, timed together")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tome-repo", default=None, help="checkout of facebookresearch/ToMe: adds the official row")
    args = p.parse_args(argv)
    from timm.models.vision_transformer import VisionTransformer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.width, depth=args.depth, num_heads=2,
        num_classes=10,
    ).eval()  # fmt: skip
    images = torch.randn(1, 3, args.img_size, args.img_size)
    configs = gpu_configs(args.methods, keep_rate=args.keep_rate, tome_r=args.tome_r, tome_repo=args.tome_repo)
    print(
        f"ViT {args.img_size}/{args.patch_size}, depth {args.depth}, width {args.width}, 1 image, 1 thread, "
        f"torch {torch.__version__}: host time per forward, {args.repeats} interleaved rounds of {args.calls} forwards"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfitted learned methods warn
        rows = benchmark(
            model, images, configs, repeats=args.repeats, warmup=args.warmup, progress=None, calls=args.calls
        )
    base = 1e3 / rows[0].images_per_s
    print(f"{'config':<26} {'ms/forward':>10} {'+ms':>7} {'recorded':>9} {'spread':>7}")
    for r in rows:
        ms = 1e3 / r.images_per_s
        rec = 1e3 / r.recorded_images_per_s if r.recorded_images_per_s == r.recorded_images_per_s else float("nan")
        print(f"{r.config:<26} {ms:>10.2f} {ms - base:>+7.2f} {rec:>9.2f} {r.spread:>7.2f}")
    for line in spread_warnings(rows):
        print(line)
    return rows


if __name__ == "__main__":
    main()
