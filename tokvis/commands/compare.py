"""``tokvis compare``: per-image pattern similarity of run stores, as a tidy table and a printed summary.

::

    tokvis compare runs/ --by keep_rate --out similarity.parquet      # across keep rates, per method
    tokvis compare runs/ --by method --metrics iou v_measure --out similarity.csv

Runs are found under the given folders, grouped into comparable sets (the same backbone, method,
dataset, schedule and recording options, except the ``--by`` field) and compared with
:func:`tokvis.analysis.compare` on the lazily read stores.  The table has one row per (pair,
block, image, metric), plus ``run_a`` / ``run_b`` (the run directories of the pair).  The summary
prints mean +- standard deviation over the images per pair, stage and metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import warnings
from pathlib import Path

from tokvis.errors import DataError, TraceMismatchError

#: metadata fields every pair agrees on except the ``--by`` one (as :mod:`tokvis.analysis.compare` pairs them)
_FIELDS = ("backbone", "method", "dataset", "keep_rate", "r")
_VARYING = {"keep_rate": ("keep_rate", "r"), "backbone": ("backbone",), "method": ("method",), "dataset": ("dataset",)}
#: recording options that make runs incomparable unless they are what varies
_OPTIONS = ("pretrained", "model_kwargs", "seed", "locations", "method_options")
_OPTIONS_OF = {"backbone": ("pretrained", "model_kwargs", "seed"), "method": ("method_options", "locations")}


def register(subparsers) -> None:
    from tokvis.analysis.compare import BY, MERGE_METRICS, PRUNE_METRICS
    from tokvis.cli import int_at_least

    p = subparsers.add_parser(
        "compare",
        help="pattern similarity of run stores (IoU for pruning, V-measure ... for merging): table + summary",
        description="Finds run stores under PATHS, pairs the runs that differ only in --by, and writes one row per "
        "(pair, block, image, metric) to --out (.parquet or .csv); prints mean +- std per pair, stage and metric.",
    )
    p.add_argument("paths", nargs="+", help="run directories or folders holding them")
    p.add_argument("--by", required=True, choices=BY, help="the field that varies within a pair")
    p.add_argument("--out", required=True, help="output table (.parquet or .csv)")
    p.add_argument(
        "--metrics", nargs="+", choices=PRUNE_METRICS + MERGE_METRICS, default=None, metavar="METRIC",
        help=f"default: iou, ioa (pruning) and v_measure, homogeneity, completeness, ari (merging); any of "
        f"{', '.join(PRUNE_METRICS + MERGE_METRICS)}",
    )  # fmt: skip
    p.add_argument(
        "--layers", nargs="+", type=int_at_least(0), default=None,
        help="blocks after which to compare (default: the blocks where both runs reduce, which must agree)",
    )  # fmt: skip
    p.add_argument(
        "--dropped", choices=("exclude", "group"), default="exclude",
        help="merging metrics: leave dropped patches out (default) or treat each side's dropped patches as one group",
    )  # fmt: skip
    p.add_argument(
        "--convention", choices=("standard", "study"), default="standard",
        help="standard (default) or the study's conventions (tokvis.analysis.compare(convention='study'))",
    )  # fmt: skip
    p.set_defaults(func=cmd_compare)


def _value(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


class _Relabelled:
    """A run whose ``meta.backbone`` names its model options too (two models under one timm name)."""

    def __init__(self, run, backbone: str):
        self._run = run
        self.meta = dataclasses.replace(run.meta, backbone=backbone)

    def __getattr__(self, name):
        return getattr(self._run, name)


def _groups(runs: list, by: str) -> tuple[list[list[int]], list[str]]:
    """Indices of comparable runs (groups of two or more); fields that differ when no group forms."""
    varying = _VARYING[by]
    fixed_meta = [f for f in _FIELDS if f not in varying]
    fixed_opts = [o for o in _OPTIONS if o not in _OPTIONS_OF.get(by, ())]

    def key(run) -> tuple:
        opts = [run.meta.locations if o == "locations" else run.config.get(o) for o in fixed_opts]  # blocks used
        return tuple(_value(getattr(run.meta, f)) for f in fixed_meta) + tuple(_value(v) for v in opts)

    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(key(run), []).append(i)
    paired = [g for g in groups.values() if len(g) > 1]
    differ = []
    for j, name in enumerate([*fixed_meta, *fixed_opts]):
        values = sorted({str(k[j]) for k in groups})
        if len(values) > 1:
            differ.append(f"{name} ({', '.join(values[:4])}{', ...' if len(values) > 4 else ''})")
    return paired, differ


def _backbone_labels(runs: list) -> list:
    """For ``--by backbone``: runs of one model name with different options get distinct labels."""
    by_name: dict[str, set] = {}
    for r in runs:
        by_name.setdefault(r.meta.backbone, set()).add(_opts(r))
    out = []
    for r in runs:
        if len(by_name[r.meta.backbone]) > 1:
            out.append(_Relabelled(r, f"{r.meta.backbone}{_opts(r)}"))
        else:
            out.append(r)
    return out


def _opts(run) -> str:
    return json.dumps({k: run.config.get(k) for k in ("model_kwargs", "pretrained", "seed")}, sort_keys=True)


def _compare(runs: list, names: list[str], args):
    from tokvis.analysis.compare import compare
    from tokvis.store import StoreError

    kw = dict(by=args.by, metric=args.metrics, layers=args.layers, dropped=args.dropped)
    if args.convention != "standard":
        if "convention" not in inspect.signature(compare).parameters:
            raise DataError(
                f"--convention {args.convention}: this tokvis's analysis.compare has no conventions yet; "
                "use --convention standard (or update tokvis)"
            )
        kw["convention"] = args.convention
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = compare(runs, **kw)
    except TraceMismatchError as e:
        legend = ", ".join(f"trace {i} = {n}" for i, n in enumerate(names))
        raise TraceMismatchError(f"{e} [{legend}]") from e
    except StoreError as e:
        raise StoreError(f"{e} (check the runs with `tokvis verify`)") from e
    for w in caught:
        legend = ", ".join(f"trace {i} = {n}" for i, n in enumerate(names))
        warnings.warn(f"{w.message} [{legend}]", w.category, stacklevel=2)
    return df


def _run_columns(df, runs: list, names: list[str], by: str):
    """``run_a`` / ``run_b``: the run directory of each side (the varied fields identify it in its group)."""
    varying = _VARYING[by]
    index = {tuple(_value(getattr(r.meta, f)) for f in varying): n for r, n in zip(runs, names, strict=True)}
    for side in "ab":
        keys = list(zip(*[df[f"{f}_{side}"].map(_value) for f in varying], strict=True))
        df.insert(len(df.columns) - 2, f"run_{side}", [index[k] for k in keys])
    return df


def summary(df) -> str:
    """Mean +- std over the images, per pair, stage (block) and metric."""
    if df.empty:
        return "no rows"
    lines = []
    stats = (
        df.groupby(["run_a", "run_b", "stage", "layer", "metric"], sort=False)["value"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    for (a, b), part in stats.groupby(["run_a", "run_b"], sort=False):
        lines.append(f"{a}  vs  {b}")
        for _, s in part.iterrows():
            std = 0.0 if s["count"] < 2 else s["std"]
            lines.append(
                f"    stage {s['stage']} (block {s['layer']:>2})  {s['metric']:<13} "
                f"{s['mean']:.3f} +- {std:.3f}  (n={s['count']})"
            )
    return "\n".join(lines)


def _where(run) -> str:
    """The run's folder as the user can find it: relative to the working directory when it lies below it."""
    path = Path(run.path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from tokvis.commands.evaluate import check_table_out, write_table
    from tokvis.store import load_runs_in

    out = check_table_out(args.out)
    runs = load_runs_in(args.paths)
    names = [r.path.name for r in runs]
    if len(runs) < 2:
        raise TraceMismatchError(
            f"only one run found ({names[0]}): compare --by {args.by} needs two or more runs that differ only in "
            f"{args.by}; record more (e.g. other keep rates) or pass more folders"
        )
    if args.by == "backbone":
        runs = _backbone_labels(runs)
    groups, differ = _groups(runs, args.by)
    if not groups:
        by_rate = {run.config.get("keep_rate") is not None for run in runs}
        if by_rate == {True, False}:
            raise TraceMismatchError(
                f"no two of the {len(runs)} runs are comparable along --by {args.by}: some are scheduled by keep "
                "rate (--keep-rate) and others by r (tokens removed per block, --r), so their reducing blocks and "
                "token counts differ. Record the runs you compare under one schedule: all with --keep-rate, or all "
                "with --r"
            )
        raise TraceMismatchError(
            f"no two of the {len(runs)} runs are comparable along --by {args.by}: they also differ in "
            f"{'; '.join(differ)}. Compare along one of those fields (--by), or pass runs that agree on them"
        )
    alone = sorted(set(range(len(runs))) - {i for g in groups for i in g})
    if alone:
        warnings.warn(
            f"left out (no run differing from it only in {args.by}): {', '.join(_where(runs[i]) for i in alone)}",
            UserWarning,
            stacklevel=1,
        )
    tables = []
    for g in groups:
        gruns, gnames = [runs[i] for i in g], [names[i] for i in g]
        df = _compare(gruns, gnames, args)
        tables.append(_run_columns(df, gruns, gnames, args.by))
    df = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    if df.empty:
        raise TraceMismatchError(
            f"nothing to measure: every pair of runs compared along --by {args.by} mixes a pruning and a merging "
            "pattern (IoU/IoA need pruning on both sides, V-measure/ARI ... merging on both); compare methods of one "
            "family, or compare their global maps"
        )
    path = write_table(df, out)
    print(summary(df))
    pairs = df[["run_a", "run_b"]].drop_duplicates().shape[0]
    print(f"wrote {len(df)} rows ({pairs} pairs, {len(runs)} runs) to {path}")
    return 0
