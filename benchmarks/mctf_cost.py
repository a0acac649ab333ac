"""tokvis MCTF against the official MCTF: FLOPs in the four official configurations, and CPU speed.

Run::

    python benchmarks/mctf_cost.py --mctf-repo path/to/mlvlab/MCTF [--models deit_tiny_patch16_224 ...]
        [--batch 8] [--repeats 5] [--threads 1] [--no-timing | --no-flops]

FLOPs: both models counted with ``torch.utils.flop_counter.FlopCounterMode`` (:func:`tokvis.bench.count_flops`,
the same call on both), printed as GMACs per image (multiply-adds, the papers' "GFLOPs"), with the operators
whose counts differ.  The official model is the authors' DeiT (``models/deit.py``) with the timm model's
random weights, set up as their evaluation scripts (:func:`tokvis.bench.official_mctf`): the paper default
(r=16 at blocks 1-11, one-step-ahead on), one-step-ahead off, bidirection off, MCTF-Fast (r=0.35 at blocks
3, 6, 9).

Speed: the unpatched model, the official MCTF and tokvis MCTF at the paper setting on the first model, timed
in the same interleaved rounds (:func:`tokvis.bench.benchmark`, medians; random images, fp32, CPU).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

CONFIGS = [  # label, r, tokvis options (the official switches follow from them)
    ("paper default (r=16, blocks 1-11)", 16, {}),
    ("one-step-ahead off", 16, {"one_step_ahead": False}),
    ("bidirection off", 16, {"bidirectional": False}),
    ("MCTF-Fast (r=0.35, blocks 3, 6, 9)", 0.35, {}),
]


def official_for(repo: str, r: float, options: dict):
    """The preparer of the official model matching a tokvis configuration."""
    from tokvis.bench import official_mctf

    return official_mctf(
        repo,
        r,
        one_step_ahead=options.get("one_step_ahead", True),
        bidirectional=options.get("bidirectional", True),
    )


def _by_operator(model, images) -> dict[str, float]:
    from tokvis.bench import _explicit_attention

    with _explicit_attention(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return {str(op): float(v) for op, v in counter.get_flop_counts()["Global"].items()}


def flops_table(repo: str, models: list[str], batch: int) -> list[tuple[str, str, float, float]]:
    """Rows ``(model, config, official GMACs, tokvis GMACs)`` per image; prints them as they come."""
    import timm

    import tokvis
    from tokvis.bench import count_flops

    rows = []
    print(f"{'model':<24} {'configuration':<36} {'official GMACs':>14} {'tokvis GMACs':>12} {'tokvis/official':>15}")
    for name in models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        images = torch.randn(batch, 3, 224, 224)
        for label, r, options in CONFIGS:
            official = official_for(repo, r, options)(model)
            ours = tokvis.patch(copy.deepcopy(model), "mctf", r=r, **options)
            off = count_flops(official, images) / 2 / batch / 1e9
            tok = count_flops(ours, images) / 2 / batch / 1e9
            rows.append((name, label, off, tok))
            print(f"{name:<24} {label:<36} {off:>14.4f} {tok:>12.4f} {tok / off:>15.4f}")
            a, b = _by_operator(official, images), _by_operator(ours, images)
            diff = {k: (a.get(k, 0.0), b.get(k, 0.0)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            if diff:
                print(
                    f"{'':<24}   by operator (GMACs per image, official / tokvis): "
                    + ", ".join(
                        f"{k} {u / 2 / batch / 1e9:.3f} / {v / 2 / batch / 1e9:.3f}" for k, (u, v) in diff.items()
                    )
                )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mctf-repo", required=True, help="checkout of mlvlab/MCTF")
    p.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the timing (default 1)")
    p.add_argument("--no-timing", action="store_true", help="FLOPs only")
    p.add_argument("--no-flops", action="store_true", help="timing only")
    p.add_argument("--timing-model", default="deit_small_patch16_224")
    args = p.parse_args()

    from tokvis.bench import benchmark

    if official_for(args.mctf_repo, 16, {}) is None:
        raise SystemExit(2)
    if not args.no_flops:
        flops_table(args.mctf_repo, args.models, args.batch)
    if args.no_timing:
        return
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.timing_model, pretrained=False).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    print(
        f"\nCPU speed, {args.timing_model} (random init), batch {args.batch}, fp32, {args.threads} thread(s), "
        f"torch {torch.__version__}, {args.repeats} interleaved rounds after 1 warm-up (medians)"
    )
    configs = [
        ("unpatched", None, {}),
        ("official mctf r=16", official_for(args.mctf_repo, 16, {}), {}),
        ("tokvis mctf r=16", "mctf", {"r": 16}),
    ]
    rows = benchmark(model, images, configs, repeats=args.repeats, warmup=1, record=False, progress=None)
    base = rows[0].images_per_s
    print(f"{'config':<22} {'images/s':>9} {'min':>8} {'max':>8} {'GMACs/img':>9} {'speed-up':>8}")
    for r in rows:
        print(
            f"{r.config:<22} {r.images_per_s:>9.2f} {r.images_per_s_min:>8.2f} {r.images_per_s_max:>8.2f} "
            f"{r.gmacs_per_image:>9.3f} {r.images_per_s / base:>8.2f}"
        )
    tok, off = rows[2].images_per_s, rows[1].images_per_s
    print(f"tokvis / official images/s: {tok / off:.3f} (target >= 1)")


if __name__ == "__main__":
    main()
