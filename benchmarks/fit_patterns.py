"""Are fitted learned methods' patterns non-random?  Agreement with Top-K before and after fitting.

Fits each learned method (dynamicvit, sit, patchmerger, sinkhorn) on the real
DINOv2 ViT-S/14 by distillation, on random crops / flips of the 20 bundled
ImageNet photos, and evaluates on the 6 bundled sample photos (not used in
fitting).  At the first reduction location, each method's per-patch importance
(DynamicViT: predicted keep log-probability; soft methods: the total assignment
mass a patch gives to the output slots, ``soft.sum(1)``) is compared with the
unreduced model's class-token attention (Top-K's score at that block):

* IoU of the top-``k`` patches (``k`` the block's budget) with Top-K's kept set;
* Spearman correlation of the two scores over the patches.

Printed for the unfitted (seeded random) and the fitted method, with the chance
IoU of two random ``k``-subsets; the bar chart goes to figures/fit_patterns.png.

    python benchmarks/fit_patterns.py [--images 128] [--epochs 2] [--keep-rate 0.5]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import tokvis
from tokvis import data, fitting, zoo
from tokvis.methods import create_method

METHODS = ["dynamicvit", "sit", "patchmerger", "sinkhorn"]


def first_decision(model, method, images, keep_rate):
    tokvis.patch(model, method, keep_rate=keep_rate)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, trace = tokvis.run_with_trace(model, images)
    tokvis.unpatch(model)
    return trace.decision(trace.layers[0])


def agreement(score, ref_score, k):
    ious, rhos = [], []
    for s, r in zip(score.numpy(), ref_score.numpy(), strict=True):
        a, b = set(np.argsort(-s)[:k]), set(np.argsort(-r)[:k])
        ious.append(len(a & b) / len(a | b))
        rhos.append(spearmanr(s, r).statistic)
    return float(np.mean(ious)), float(np.mean(rhos))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help="default: each method's fit_lr")
    ap.add_argument("--keep-rate", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", default="figures/fit_patterns.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = zoo.create("dinov2_small_offline")
    train = fitting.augmented_images(model, args.images, seed=0, sources=("imagenet",))
    evals, ids = data.load_images(model)
    ref = first_decision(model, create_method("topk"), evals, args.keep_rate)
    k, n = ref.n_out, ref.n_in
    chance = (k * k / n) / (2 * k - k * k / n)
    print(f"block {ref.layer}: keep {k} of {n} patches; chance IoU of random top-k sets {chance:.3f}")
    print(f"fitting on {len(train)} crops of the ImageNet photos, evaluating on {len(ids)} sample photos")
    rows = []
    for name in args.methods:
        method = create_method(name, seed=0)
        d0 = first_decision(model, method, evals, args.keep_rate)
        loss0 = fitting.distillation_loss(model, method, evals, keep_rate=args.keep_rate)
        t0 = time.perf_counter()
        tokvis.fit(model, method, train, keep_rate=args.keep_rate, epochs=args.epochs, lr=args.lr, progress=False)
        secs = time.perf_counter() - t0
        d1 = first_decision(model, method, evals, args.keep_rate)
        loss1 = fitting.distillation_loss(model, method, evals, keep_rate=args.keep_rate)
        iou0, rho0 = agreement(d0.score, ref.score, k)
        iou1, rho1 = agreement(d1.score, ref.score, k)
        rows.append((name, iou0, iou1, rho0, rho1, loss0, loss1, secs))
        print(
            f"{name:<12} IoU with Top-K {iou0:.3f} -> {iou1:.3f}   Spearman {rho0:+.3f} -> {rho1:+.3f}   "
            f"held-out 1-cos {loss0:.4f} -> {loss1:.4f}   fit {secs:.0f} s",
            flush=True,
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    x = np.arange(len(rows))
    panels = [(axes[0], (1, 2), "IoU of top-k with Top-K"), (axes[1], (3, 4), "Spearman with CLS attn")]
    for ax, (i0, i1), title in panels:
        ax.bar(x - 0.2, [r[i0] for r in rows], 0.4, label="unfitted (random)", color="0.7")
        ax.bar(x + 0.2, [r[i1] for r in rows], 0.4, label="fitted", color="C0")
        ax.set_xticks(x, [r[0] for r in rows])
        ax.set_title(f"{title} (block {ref.layer}, keep rate {args.keep_rate})")
    axes[0].axhline(chance, color="k", ls="--", lw=1, label="chance")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[0].legend(fontsize=8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
