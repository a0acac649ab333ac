"""The study's method defaults beside tokvis's earlier variants: fidelity on the real DINOv2 backbone.

Issue 17 made tokvis's defaults reproduce the study's model files ("Which Tokens to Use?", Haurum et
al., ICCVW 2023); the variants tokvis had before stay available as options.  This prints, for each
row of :data:`ROWS` (a method and its options) and each keep rate (0.7 and 0.5 at the default
locations), the fidelity -- the mean cosine similarity of the pooled feature to the unreduced
model's -- on ``zoo.create("dinov2_small_offline")`` (real DINOv2 ViT-S/14 weights) and foolbox's 20
ImageNet photos, with the patch tokens left after the last reducing block (mean over the images) and
the GFLOPs per image (torch's count, 2 per multiply-add: half of it is GMACs).  Learned methods need fitted
parameters and are not in the rows (their options are measured by
benchmarks/fidelity_study.py against the study's code).

Run: python benchmarks/study_variants.py [--rates 0.7 0.5] [--threads 2]
Prints a markdown table.  Extend :data:`ROWS` with further ``(method, options, what)`` rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import tokvis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vomix_defaults import fidelity  # noqa: E402  (the same measurement: patched pooled feature vs unreduced)

#: (method, options, what the row is): the study's default first, then tokvis's earlier variants
ROWS: list[tuple[str, dict, str]] = [
    ("topk", {}, "study default"),
    ("evit", {}, "study default: fused token = attention-weighted sum"),
    ("evit", {"fused": "mean"}, "earlier tokvis: fused token = attention-weighted mean"),
    ("ats", {}, "study default: nearest cumulative score, sequence order"),
    ("ats", {"sampling": "sorted"}, "earlier tokvis: sorted inverse CDF, fitting images keep all"),
    ("tome", {}, "study default: per-stage removals capped at half"),
    ("tome", {"budget": "exact"}, "earlier tokvis: exact budget by repeated matching"),
    ("kmedoids", {}, "study default: block input, start from attention received, weight x total distance"),
    ("kmedoids", {"init": "cls_attn", "update": "within_cluster"}, "earlier tokvis: after attention, CLS start"),
    ("dpcknn", {}, "study default (--equal_weight): block input, average merge"),
    ("dpcknn", {"placement": "after_attn"}, "earlier tokvis: after the attention"),
]


def load_images():
    """The offline DINOv2 ViT-S/14 and foolbox's ImageNet photos transformed for it."""
    model = tokvis.zoo.create("dinov2_small_offline").eval()
    images, ids = tokvis.data.load_images(model, source="foolbox-imagenet")
    return model, images, ids


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.7, 0.5])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, images, ids = load_images()
    with torch.no_grad():
        ref = model(images)
    print(f"dinov2_small_offline, {len(ids)} foolbox ImageNet photos; fidelity = mean cos(pooled, unreduced)")
    head = " | ".join(f"keep {r}: fidelity, tokens, GFLOPs (2 per MAC)" for r in args.rates)
    print(f"| method | options | what | {head} |")
    print("|---|---|---|" + "---|" * len(args.rates))
    for method, options, what in ROWS:
        cells = []
        for rate in args.rates:
            cos, gflops, trace = fidelity(model, images, ref, method, {"keep_rate": rate}, options, trace=True)
            tokens = float(trace.token_counts(trace.layers[-1]).float().mean())
            cells.append(f"{cos:.4f}, {tokens:.1f}, {gflops:.2f}")
        print(f"| {method} | {options or 'defaults'} | {what} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
