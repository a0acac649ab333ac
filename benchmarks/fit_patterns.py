"""Are fitted learned methods' patterns non-random?  Agreement with the unreduced model's attention.

Fits each learned method (dynamicvit, sit, patchmerger, sinkhorn) on the real
DINOv2 ViT-S/14 by distillation, on random crops / flips of the 20 bundled
ImageNet photos, and evaluates on photos not used in fitting: the 6 bundled
sample photos and ``--eval-crops`` random crops of them.  At the first reduction
location, each method's per-patch importance (``LayerDecision.score``:
DynamicViT's predicted keep log-probability; for the soft methods the total
assignment mass a patch gives to the output slots, ``soft.sum(1)``) is compared
with the unreduced model's class-token attention at that block (Top-K's score)
by :func:`tokvis.analysis.importance_agreement`:

* IoU of the top-``k`` patches (``k`` the block's budget) with Top-K's kept set;
* Spearman correlation of the two scores over the patches;

and with the unreduced model's attention rollout from its class token to the
tokens the method decides on (:func:`tokvis.attention.attention_rollout`: what
the final features draw on, through every later block), by Spearman correlation;

each against a **random method** (the same scores on shuffled patch positions,
``--n-random`` draws): its mean, 95% interval and the one-sided p-value.
Printed for the unfitted (seeded random parameters) and the fitted method; the
figure goes to ``--out``.  A method is given as ``name`` or
``name:key=value,...`` (method options, values parsed as JSON), e.g.
``sinkhorn:eps=0.1``.  ``--save DIR`` writes each fitted method to
``DIR/<label>_keep<rate>.safetensors`` (``benchmarks/bench_methods.py --fitted DIR``
reads them).

    python benchmarks/fit_patterns.py [--images 256] [--epochs 3] [--keep-rate 0.5] [--methods ...]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import tokvis
from tokvis import data, fitting, zoo
from tokvis.analysis import importance_agreement
from tokvis.attention import attention_rollout
from tokvis.bench import fitted_method_path
from tokvis.methods import create_method, parse_method_spec

METHODS = ["dynamicvit", "sit", "patchmerger", "sinkhorn"]
#: (printed name, reference, statistic of importance_agreement, panel title)
STATS = [
    ("iou", "cls", "iou", "IoU of top-k with Top-K"),
    ("spearman", "cls", "spearman", "Spearman with CLS attn"),
    ("rollout_spearman", "rollout", "spearman", "Spearman with attn rollout"),
]


def first_decision(model, method, images, keep_rate):
    tokvis.patch(model, method, keep_rate=keep_rate)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unfitted learned methods warn
        _, trace = tokvis.run_with_trace(model, images)
    tokvis.unpatch(model)
    return trace.decision(trace.layers[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="training crops of the 20 ImageNet photos")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=None, help="default: each method's fit_lr")
    ap.add_argument("--keep-rate", type=float, default=0.5)
    ap.add_argument("--eval-crops", type=int, default=58, help="held-out crops of the sample photos (+ the 6 photos)")
    ap.add_argument("--n-random", type=int, default=2000, help="draws of the random method")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--methods", nargs="+", default=METHODS, help="name or name:key=value,...")
    ap.add_argument("--save", default=None, help="directory for the fitted methods")
    ap.add_argument("--out", default="figures/fit_patterns.png")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = zoo.create("dinov2_small_offline")
    train = fitting.augmented_images(model, args.images, seed=0, sources=("imagenet",))
    photos, _ = data.load_images(model)
    evals = photos
    if args.eval_crops:
        evals = torch.cat([photos, fitting.augmented_images(model, args.eval_crops, seed=1, sources=("samples",))])
    ref = first_decision(model, create_method("topk"), evals, args.keep_rate)
    k, n = ref.n_out, ref.n_in
    # rollout to the tokens entering the block (methods deciding before it) or leaving its attention
    rollout = {s: attention_rollout(model, evals, start=s) for s in (ref.layer, ref.layer + 1)}
    print(f"block {ref.layer}: keep {k} of {n} patches; reference: the unreduced model's CLS attention there")
    print(
        f"fitting on {len(train)} crops of the 20 ImageNet photos ({args.epochs} epochs); evaluating on "
        f"{len(evals)} images (the 6 sample photos and {args.eval_crops} crops of them); random method: "
        f"{args.n_random} draws"
    )
    rows = []
    for spec in args.methods:
        name, options = parse_method_spec(spec)
        method = create_method(name, **{"seed": 0, **options})
        d0 = first_decision(model, method, evals, args.keep_rate)
        loss0 = fitting.distillation_loss(model, method, evals, keep_rate=args.keep_rate)
        t0 = time.perf_counter()
        tokvis.fit(model, method, train, keep_rate=args.keep_rate, epochs=args.epochs, lr=args.lr, progress=False)
        secs = time.perf_counter() - t0
        d1 = first_decision(model, method, evals, args.keep_rate)
        loss1 = fitting.distillation_loss(model, method, evals, keep_rate=args.keep_rate)
        refs = {"cls": ref.score, "rollout": rollout[ref.layer if method.stage == "before_block" else ref.layer + 1]}
        # agreement[phase][reference]: phase 0 unfitted, 1 fitted
        agreement = [
            {r: importance_agreement(d.score, refs[r], k=k, n_random=args.n_random, seed=phase) for r in refs}
            for phase, d in enumerate((d0, d1))
        ]
        rows.append((spec, agreement))
        if args.save:
            fitting.save_method(method, fitted_method_path(args.save, spec, args.keep_rate))
        for stat, r, key, _ in STATS:
            a0, a1 = agreement[0][r], agreement[1][r]
            lo, hi = a1[f"random_{key}_ci"]
            print(
                f"{spec:<22} {stat:<16} unfitted {a0[f'{key}_mean']:+.3f} -> fitted {a1[f'{key}_mean']:+.3f}   "
                f"random method {a1[f'random_{key}_mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]   "
                f"p(fitted) {a1[f'{key}_p']:.4f}",
                flush=True,
            )
        print(f"{spec:<22} held-out 1-cos {loss0:.4f} -> {loss1:.4f}   fit {secs:.0f} s", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STATS), figsize=(6 + 2.4 * len(rows), 3.8), layout="constrained")
    x = np.arange(len(rows))
    for ax, (_, r, key, title) in zip(axes, STATS, strict=True):
        ax.bar(x - 0.2, [a[0][r][f"{key}_mean"] for _, a in rows], 0.4, label="unfitted (seeded)", color="0.7")
        ax.bar(x + 0.2, [a[1][r][f"{key}_mean"] for _, a in rows], 0.4, label="fitted", color="C0")
        for i, (_, a) in enumerate(rows):
            lo, hi = a[1][r][f"random_{key}_ci"]
            ax.fill_between([i - 0.45, i + 0.45], lo, hi, color="C3", alpha=0.35, lw=0,
                            label="random method (95%)" if i == 0 else None)  # fmt: skip
        ax.set_xticks(x, [spec for spec, _ in rows], rotation=15)
        ax.set_title(f"{title}\n(block {ref.layer}, keep {args.keep_rate:g}, {len(evals)} held-out images)", fontsize=9)
        if key == "spearman":
            ax.axhline(0, color="k", lw=0.8)
    axes[0].legend(fontsize=8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
