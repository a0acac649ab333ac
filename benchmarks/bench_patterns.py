"""Benchmark: per-image pattern similarity, tokvis (vectorised) vs a per-image scikit-learn loop.

Synthetic traces of two reduction methods on the same images: ``--images`` images x 3 stages x 196
patches (14 x 14 grid).  Pruning patterns keep nested sets of 137 / 96 / 67 patches; merging
patterns have 100 / 50 / 25 groups per stage (each stage merges the previous stage's groups, as a
real trace does).  Measured: IoU of the kept sets + V-measure + ARI of the merge labels, for every
image and stage.

* tokvis: ``iou`` and one ``merge_scores(metrics=("v_measure", "ari"))`` call per stage.
* baseline ("the study's approach"): a Python loop over images calling
  ``sklearn.metrics.v_measure_score`` and ``adjusted_rand_score`` per image, with IoU computed
  per image by numpy.  It is timed on a subsample (``--baseline-images``) and extrapolated
  linearly to all images (the loop's cost is the same for every image).

Peak memory: ``tracemalloc`` peak of a separate tokvis pass (NumPy reports its buffers to
tracemalloc), and the process's maximum resident set size (includes the synthetic inputs).

Run: ``python benchmarks/bench_patterns.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import tracemalloc

import numpy as np

from tokvis.analysis.patterns import iou, merge_scores

NUM_PATCHES = 196
KEEP = (137, 96, 67)
GROUPS = (100, 50, 25)


def _surjective(rng: np.random.Generator, num_images: int, size: int, groups: int) -> np.ndarray:
    """Per image, a random map of ``size`` items onto ``groups`` groups, every group non-empty."""
    noise = rng.random((num_images, size))
    rank = np.argsort(np.argsort(noise, axis=1), axis=1)
    rest = rng.integers(0, groups, size=(num_images, size))
    return np.where(rank < groups, rank, rest).astype(np.int32)


def make_patterns(num_images: int, seed: int = 0):
    """Kept masks and merge labels of two methods: lists over stages of [num_images, 196]."""
    rng = np.random.default_rng(seed)
    rows = np.arange(num_images)[:, None]
    kept, labels = [], []
    for _method in range(2):
        # pruning: rank patches by a noisy score, keep the top KEEP[s] at stage s (nested sets)
        score = rng.random((num_images, NUM_PATCHES))
        rank = np.argsort(np.argsort(-score, axis=1), axis=1)
        kept.append([rank < k for k in KEEP])
        # merging: each stage maps the previous stage's tokens onto fewer groups
        stage_labels, current = (
            [],
            np.broadcast_to(np.arange(NUM_PATCHES, dtype=np.int32), (num_images, NUM_PATCHES)),
        )
        size = NUM_PATCHES
        for g in GROUPS:
            mapping = _surjective(rng, num_images, size, g)
            current = mapping[rows, current]
            stage_labels.append(np.ascontiguousarray(current))
            size = g
        labels.append(stage_labels)
    return kept, labels


def run_tokvis(kept, labels):
    out = []
    for s in range(len(KEEP)):
        res = merge_scores(labels[0][s], labels[1][s], metrics=("v_measure", "ari"))
        out.append((iou(kept[0][s], kept[1][s]), res["v_measure"], res["ari"]))
    return out


def run_sklearn_loop(kept, labels, num_images: int):
    from sklearn.metrics import adjusted_rand_score, v_measure_score

    out = []
    for s in range(len(KEEP)):
        ka, kb, la, lb = kept[0][s], kept[1][s], labels[0][s], labels[1][s]
        vals = np.empty((num_images, 3))
        for i in range(num_images):
            vals[i, 0] = np.logical_and(ka[i], kb[i]).sum() / np.logical_or(ka[i], kb[i]).sum()
            vals[i, 1] = v_measure_score(la[i], lb[i])
            vals[i, 2] = adjusted_rand_score(la[i], lb[i])
        out.append(vals)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--baseline-images", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n, nb = args.images, min(args.baseline_images, args.images)

    t0 = time.perf_counter()
    kept, labels = make_patterns(n, args.seed)
    t_gen = time.perf_counter() - t0
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    print(f"synthetic patterns: {n} images x {len(KEEP)} stages x {NUM_PATCHES} patches ({t_gen:.1f} s)")

    t0 = time.perf_counter()
    ours = run_tokvis(kept, labels)
    t_ours = time.perf_counter() - t0

    sub_kept = [[k[:nb] for k in method] for method in kept]
    sub_labels = [[lab[:nb] for lab in method] for method in labels]
    t0 = time.perf_counter()
    ref = run_sklearn_loop(sub_kept, sub_labels, nb)
    t_loop_sub = time.perf_counter() - t0
    t_loop = t_loop_sub * n / nb

    # the two paths must agree on the subsample
    for s in range(len(KEEP)):
        got = np.stack([x[:nb] for x in ours[s]], axis=1)
        if not np.allclose(got, ref[s], rtol=1e-9, atol=1e-12):
            sys.exit(f"stage {s}: tokvis and scikit-learn disagree (max abs diff {np.abs(got - ref[s]).max()})")

    tracemalloc.start()
    run_tokvis(kept, labels)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    print("IoU + V-measure + ARI, all images and stages")
    print(f"  tokvis (vectorised)        : {t_ours:8.2f} s")
    print(
        f"  per-image sklearn loop     : {t_loop:8.2f} s  (measured {t_loop_sub:.2f} s on {nb} images, "
        f"extrapolated linearly to {n})"
    )
    print(f"  speed-up                   : {t_loop / t_ours:8.1f} x")
    print(f"  tokvis peak traced memory  : {peak / 2**20:8.1f} MiB (tracemalloc, inputs excluded)")
    print(f"  process max RSS            : {maxrss_kib / 2**10:8.1f} MiB (includes the synthetic inputs)")
    print("  results agree with scikit-learn on the subsample (rtol 1e-9)")


if __name__ == "__main__":
    main()
