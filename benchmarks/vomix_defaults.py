"""VoMix settings by measurement: cosine fidelity of the pooled feature on the real DINOv2 backbone.

For each VoMix setting (residual mix / drop, vote weight count / similarity, tau) and each schedule
(r = 0.05 per block, r = 0.10 per block, keep_rate = 0.7), the pooled feature of the patched model is
compared with the unreduced model's (mean cosine similarity over the images), next to ToMe at the
same schedule and ToMe interpolated at VoMix's exact FLOPs (ToMe measured over a range of r around
it).  FLOPs: ``tokvis.bench.count_flops`` per image.  Also prints, at r = 0.10, how unevenly the
removals fall over the image (share of the top rows' patches that are no longer their own token after
the last block, against the bottom rows').

Run: python benchmarks/vomix_defaults.py [--images 26] [--taus 0.03,0.1,0.3,1] [--residuals mix,drop]
     [--vote-weights count,similarity] [--threads 2]
Images: the bundled samples and foolbox's ImageNet samples (26 in all).  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

import numpy as np
import torch

import tokvis
from tokvis.bench import count_flops

SCHEDULES = {"r=0.05/block": {"r": 0.05}, "r=0.10/block": {"r": 0.10}, "keep_rate 0.7": {"keep_rate": 0.7}}
TOME_R = {"r=0.05/block": [0.03, 0.04, 0.05, 0.06, 0.07], "r=0.10/block": [0.08, 0.09, 0.10, 0.11, 0.12]}
TOME_KEEP = {"keep_rate 0.7": [0.6, 0.65, 0.7, 0.75, 0.8]}


def load(n_images: int):
    model = tokvis.zoo.create("dinov2_small_offline").eval()
    a, ids_a = tokvis.data.load_images(model)
    try:
        b, ids_b = tokvis.data.load_images(model, source="foolbox-imagenet")
    except tokvis.errors.DataError as e:  # foolbox not installed: the bundled photos only
        print(f"(foolbox samples unavailable: {e})")
        b, ids_b = a[:0], []
    images = torch.cat([a, b])[:n_images]
    return model, images, (ids_a + ids_b)[:n_images]


def fidelity(model, images, ref, method, schedule, options, *, trace=False):
    tokvis.patch(model, method, **schedule, **options)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if trace:
                out, tr = tokvis.run_with_trace(model, images)
            else:
                out, tr = model(images), None
            flops = count_flops(model, images[:1])
    finally:
        tokvis.unpatch(model)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    return float(cos.mean()), flops / 1e9, tr


def row_bias(trace) -> tuple[float, float]:
    """Share of the top quarter's / bottom quarter's patches no longer their own token after the last block."""
    h, w = trace.grid_size
    gone = ~trace.kept(trace.meta.depth - 1)
    gone = gone.reshape(-1, h, w).float()
    q = max(h // 4, 1)
    return float(gone[:, :q].mean()), float(gone[:, -q:].mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=26)
    ap.add_argument("--taus", default="0.03,0.1,0.3,1")
    ap.add_argument("--residuals", default="mix,drop")
    ap.add_argument("--vote-weights", default="count,similarity")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    taus = [float(t) for t in args.taus.split(",")]
    t0 = time.time()
    model, images, ids = load(args.images)
    with torch.no_grad():
        ref = model(images)
    base_gf = count_flops(model, images[:1]) / 1e9
    print(
        f"DINOv2 ViT-S/14 offline, {len(ids)} images, unreduced {base_gf:.2f} GFLOPs/image "
        f"(2 per multiply-add: {base_gf / 2:.2f} GMACs, the papers' 'GFLOPs')"
    )

    # ToMe curves (fidelity against FLOPs) around each schedule
    tome = {}
    for name, sched in SCHEDULES.items():
        pts = []
        key, values = ("r", TOME_R[name]) if "r" in sched else ("keep_rate", TOME_KEEP[name])
        for v in values:
            f, gf, _ = fidelity(model, images, ref, "tome", {key: v}, {})
            pts.append((gf, f, v))
        tome[name] = sorted(pts)
        same = [p for p in pts if p[2] == sched[key]][0]
        print(f"tome {name}: same schedule {same[1]:.4f} @ {same[0]:.2f} GF; curve " +
              ", ".join(f"{key}={v}: {f:.4f}@{gf:.2f}" for gf, f, v in tome[name]))  # fmt: skip

    def tome_at(name, gf):
        xs, ys = [p[0] for p in tome[name]], [p[1] for p in tome[name]]
        return float(np.interp(gf, xs, ys))

    rows = []
    for residual, weight, tau in itertools.product(args.residuals.split(","), args.vote_weights.split(","), taus):
        opts = {"residual": residual, "vote_weight": weight, "tau": tau}
        cells = []
        for name, sched in SCHEDULES.items():
            f, gf, tr = fidelity(model, images, ref, "vomix", sched, opts, trace=name == "r=0.10/block")
            cells.append((f, gf, tome_at(name, gf)))
            if tr is not None:
                top, bottom = row_bias(tr)
        rows.append((opts, cells, (top, bottom)))
        print(f"vomix {opts}: " + ", ".join(f"{f:.4f}@{gf:.2f} (ToMe {t:.4f})" for f, gf, t in cells) +
              f"; r=0.10 removed top/bottom rows {top:.2f}/{bottom:.2f}", flush=True)  # fmt: skip

    print()
    print("| setting | " + " | ".join(SCHEDULES) + " | removed top / bottom rows (r=0.10) |")
    print("|---|" + "---|" * (len(SCHEDULES) + 1))
    cells = []
    for name, sched in SCHEDULES.items():
        key = "r" if "r" in sched else "keep_rate"
        same = [p for p in tome[name] if p[2] == sched[key]][0]
        cells.append(f"{same[1]:.4f} @ {same[0]:.2f} GF")
    print("| ToMe (default), same schedule | " + " | ".join(cells) + " | |")
    for opts, cs, (top, bottom) in sorted(rows, key=lambda r: -sum(c[0] for c in r[1])):
        label = f"VoMix residual={opts['residual']}, vote_weight={opts['vote_weight']}, tau={opts['tau']:g}"
        body = " | ".join(f"{f:.4f} @ {gf:.2f} GF (ToMe {t:.4f})" for f, gf, t in cs)
        print(f"| {label} | {body} | {top:.2f} / {bottom:.2f} |")
    print(f"\n(ToMe x at matched FLOPs: ToMe's fidelity interpolated at VoMix's FLOPs; {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
