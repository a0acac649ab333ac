"""The tables of docs/findings.md from a study's run stores and the outputs of the study commands.

::

    tokvis sweep examples/study_offline.toml
    tokvis evaluate examples/runs_study --out examples/runs_study/metrics.csv
    tokvis compare examples/runs_study --by keep_rate --out keep.parquet
    tokvis compare examples/runs_study --by method --out method.parquet
    python benchmarks/study_findings.py examples/runs_study --keep keep.parquet --method method.parquet

Prints Markdown: performance per method and keep rate, Top-K vs EViT, consistency of each method's patterns
across keep rates, the global maps' split-half reliability (halves of the images and halves of the photos) with
their correlation to Top-K's map, and the Spearman correlation of Δperformance with the similarity to Top-K
(pruning methods) and to K-Medoids (merging methods), with a percentile bootstrap interval.  Every number is a
mean over images (and stages where said) of what the commands wrote; nothing is recomputed differently here.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tokvis.analysis.compare import global_maps
from tokvis.analysis.correlation import correlate
from tokvis.datasets import crop_photo
from tokvis.plotting.figures import pair_performance
from tokvis.plotting.maps import split_half_reliability
from tokvis.store import load_runs_in

KEEP_RATES = (0.9, 0.7, 0.5, 0.25)


def _table(df: pd.DataFrame, fmt: str = "{:.3f}") -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join([df.index.name or ""] + cols) + " |", "|" + "---|" * (len(cols) + 1)]

    def cell(v) -> str:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            return str(v)
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return "" if math.isnan(v) else fmt.format(v)

    for idx in df.index:  # column by column, so integer columns stay integers
        lines.append("| " + " | ".join([str(idx)] + [cell(df.at[idx, c]) for c in df.columns]) + " |")
    return "\n".join(lines)


def performance(metrics: pd.DataFrame, measure: str, dataset: str) -> pd.DataFrame:
    """``measure`` per method (rows) and keep rate (columns) on ``dataset``."""
    part = metrics[(metrics["dataset"] == dataset) & metrics["keep_rate"].notna()]
    out = part.pivot_table(index="method", columns="keep_rate", values=measure, aggfunc="mean")
    out = out[[k for k in KEEP_RATES if k in out.columns]]
    out.index.name, out.columns = "method", [f"keep {k:g}" for k in out.columns]
    return out


def topk_vs_evit(method_pairs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """IoU of Top-K's and EViT's kept sets per keep rate (rows) and stage (columns), mean over images."""
    part = method_pairs[
        (method_pairs["dataset"] == dataset)
        & (method_pairs["metric"] == "iou")
        & (method_pairs[["method_a", "method_b"]].apply(set, axis=1) == {"topk", "evit"})
    ]
    out = part.pivot_table(index="keep_rate", columns="layer", values="value", aggfunc="mean")
    out.index.name, out.columns = "keep rate", [f"block {c}" for c in out.columns]
    return out.sort_index(ascending=False)


def across_keep_rates(keep_pairs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Per method, last stage: IoU and IoA (pruning) or V-measure (merging), over all keep-rate pairs and adjacent
    ones (0.9-0.7, 0.7-0.5, 0.5-0.25)."""
    part = keep_pairs[keep_pairs["dataset"] == dataset]
    last = part.groupby("method")["layer"].transform("max")
    part = part[part["layer"] == last]
    order = {k: i for i, k in enumerate(KEEP_RATES)}
    adjacent = (part["keep_rate_a"].map(order) - part["keep_rate_b"].map(order)).abs() == 1
    rows = {}
    for method, g in part.groupby("method"):
        fam = g["family"].iloc[0]
        metric = "iou" if fam == "prune" else "v_measure"
        m = g[g["metric"] == metric]
        row = {"family": fam, "metric": metric, "all pairs": m["value"].mean(),
               "adjacent pairs": m.loc[adjacent.loc[m.index], "value"].mean()}  # fmt: skip
        row["IoA (pruning)"] = g.loc[g["metric"] == "ioa", "value"].mean() if fam == "prune" else float("nan")
        rows[method] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "method"
    return out


def global_map_reliability(runs, keep_rate: float, dataset: str, reference: str = "topk") -> pd.DataFrame:
    """Split-half reliability of each method's mean-depth map (halves of the images / of the photos) and the
    Pearson r of the map with ``reference``'s, next to the ceiling ``sqrt(rel_a * rel_ref)`` (by photo)."""
    chosen = {str(r.meta.method): r for r in runs if r.meta.keep_rate == keep_rate and str(r.meta.dataset) == dataset}
    maps, rows = {}, {}
    for method, run in sorted(chosen.items()):
        photos = [crop_photo(i) for i in run.image_ids]
        maps[method] = global_maps(run)["depth"].ravel()
        rows[method] = {
            "images": run.num_images,
            "photos": len(set(photos)),
            "r (halves of images)": split_half_reliability(run)["r"],
            "r (halves of photos)": split_half_reliability(run, groups=photos)["r"] if len(set(photos)) > 1 else np.nan,
        }
    out = pd.DataFrame.from_dict(rows, orient="index")
    if reference in maps:
        ref = maps[reference]
        out[f"PCC with {reference}"] = [float(np.corrcoef(maps[m], ref)[0, 1]) for m in out.index]
        rel = out["r (halves of photos)"].clip(lower=0)
        out["ceiling"] = np.sqrt(rel * rel[reference])
    out.index.name = "method"
    return out


def proxy(method_pairs, metrics, *, reference: str, metric: str, measure: str, dataset: str, n_boot: int, seed=0):
    """Spearman ρ of Δmeasure (method − reference) with the similarity to the reference, over methods × keep rates."""
    part = method_pairs[(method_pairs["dataset"] == dataset) & (method_pairs["metric"] == metric)]
    perf = metrics[metrics["dataset"] == dataset]
    pairs = pair_performance(part, perf, by="method", measure=measure, metric=metric, reference=reference)
    res = correlate(pairs["similarity"].to_numpy(), pairs["delta"].to_numpy(), method="spearman", n_boot=n_boot,
                    seed=seed)  # fmt: skip
    return pairs, res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="folder of the study's run stores (tokvis sweep's out)")
    p.add_argument("--metrics", type=Path, default=None, help="tokvis evaluate's table (default: RUNS/metrics.csv)")
    p.add_argument("--keep", type=Path, required=True, help="tokvis compare --by keep_rate output")
    p.add_argument("--method", type=Path, required=True, help="tokvis compare --by method output")
    p.add_argument("--dataset", default="crops", help="dataset of the pattern and map tables (default crops)")
    p.add_argument("--labelled", default="foolbox-imagenet", help="labelled dataset for k-NN agreement")
    p.add_argument("--measure", default="fidelity", help="performance measure of the proxy correlations")
    p.add_argument("--map-keep-rate", type=float, default=0.5)
    p.add_argument("--n-boot", type=int, default=2000)
    args = p.parse_args(argv)

    metrics = pd.read_csv(args.metrics or args.runs / "metrics.csv")
    keep_pairs, method_pairs = pd.read_parquet(args.keep), pd.read_parquet(args.method)
    runs = load_runs_in([args.runs])
    say = print
    say(f"## Performance: {args.measure} on {args.dataset}\n")
    say(_table(performance(metrics, args.measure, args.dataset)))
    if args.labelled in set(metrics["dataset"]):
        say(f"\n## k-NN agreement with the unreduced model on {args.labelled}\n")
        say(_table(performance(metrics, "knn_agreement", args.labelled), "{:.2f}"))
    say(f"\n## Top-K vs EViT: IoU of the kept sets ({args.dataset})\n")
    say(_table(topk_vs_evit(method_pairs, args.dataset)))
    say(f"\n## Consistency across keep rates, last stage ({args.dataset})\n")
    say(_table(across_keep_rates(keep_pairs, args.dataset)))
    say(f"\n## Global mean-depth maps at keep rate {args.map_keep_rate:g} ({args.dataset})\n")
    say(_table(global_map_reliability(runs, args.map_keep_rate, args.dataset), "{:.2f}"))
    say(f"\n## Similarity as a proxy for Δ{args.measure} ({args.dataset})\n")
    for reference, metric in (("topk", "iou"), ("kmedoids", "v_measure")):
        if reference not in set(method_pairs["method_a"]) | set(method_pairs["method_b"]):
            say(f"- to {reference}: no {reference} runs")
            continue
        pairs, res = proxy(method_pairs, metrics, reference=reference, metric=metric, measure=args.measure,
                           dataset=args.dataset, n_boot=args.n_boot)  # fmt: skip
        lo, hi = res["ci_low"], res["ci_high"]
        say(f"- to {reference} ({metric}, mean over images and stages), {len(pairs)} method x keep-rate pairs "
            f"({', '.join(sorted(set(pairs['method_a'])))}): Spearman rho = {res['r']:.2f}, "
            f"95% percentile bootstrap CI [{lo:.2f}, {hi:.2f}] "
            f"({args.n_boot} resamples of the pairs), p = {res['p']:.3g} (scipy)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
