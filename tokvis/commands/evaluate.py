"""``tokvis evaluate``: per-run performance figures (accuracy, agreement, fidelity, k-NN) as one CSV.

::

    tokvis evaluate runs/ --out runs/metrics.csv
    tokvis evaluate runs/ --out runs/metrics.csv --accuracy-csv published.csv   # external accuracies merged in

Each run's model is rebuilt from its manifest and run unreduced and reduced on the run's images
(see :mod:`tokvis.evaluate` for the measures and when each is available).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokvis.errors import DataError
from tokvis.validate import check_out_file

_TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def check_table_out(path: str, flag: str = "--out") -> Path:
    """A table output path: a known extension (.csv, .parquet, .pq), not a directory."""
    out = Path(path)
    if out.is_dir() or path.endswith(("/", "\\")):
        raise DataError(f"{flag} {path} is a directory: give a file name ending in .csv or .parquet")
    check_out_file(flag, path, error=DataError)
    if out.suffix.lower() not in _TABLE_SUFFIXES:
        raise DataError(
            f"{flag} {path}: unknown table format {out.suffix or '(no extension)'!r}; end the name in .csv or .parquet"
        )
    return out


def write_table(df, out: Path) -> Path:
    from tokvis.adapters.tables import to_csv, to_parquet

    return to_csv(df, out) if out.suffix.lower() == ".csv" else to_parquet(df, out)


def register(subparsers) -> None:
    from tokvis.cli import int_at_least

    p = subparsers.add_parser(
        "evaluate",
        help="per-run performance figures: top-1 / agreement with a head, feature fidelity and k-NN without",
        description="Rebuilds each run's model from its manifest, runs the run's images unreduced and reduced, "
        "and writes one row per run: top1 and agreement (classifier head; top1 when the head's classes are the "
        "dataset's), fidelity (cosine of pooled features to the unreduced model), knn_top1 / knn_agreement "
        "(labelled data), accuracy (from --accuracy-csv), decisions_match, and a 'measure' note.",
    )
    p.add_argument("paths", nargs="+", help="run directories or folders holding them")
    p.add_argument("--out", required=True, help="output table (.csv or .parquet)")
    p.add_argument(
        "--accuracy-csv", default=None,
        help="external accuracies: columns accuracy and run, or backbone, method, dataset, keep_rate and/or r",
    )  # fmt: skip
    p.add_argument("--k", type=int_at_least(1), default=5, help="neighbours of the k-NN measures (default 5)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tokvis.distributed import resolve_device
    from tokvis.evaluate import MEASURES, evaluate, read_accuracy_csv

    out = check_table_out(args.out)
    if args.accuracy_csv is not None:
        read_accuracy_csv(args.accuracy_csv)  # a bad CSV fails before any model is run
    resolve_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    df = evaluate(
        args.paths, accuracy_csv=args.accuracy_csv, batch_size=args.batch_size, device=args.device, k=args.k,
        progress=not args.no_progress and sys.stderr.isatty(), log=print,
    )  # fmt: skip
    path = write_table(df, out)
    shown = [m for m in MEASURES if df[m].notna().any()]
    print(f"wrote {len(df)} runs x measures {', '.join(shown)} to {path}")
    return 0
