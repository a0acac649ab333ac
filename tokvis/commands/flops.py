"""``tokvis flops``: tokvis's GMACs beside every published FLOPs figure of a setting tokvis implements.

::

    tokvis flops                      # every row of tokvis/assets/published_flops.json
    tokvis flops --rows "DeiT-S" "EViT DeiT-S keep 0.5"
    tokvis flops --tome-repo path/to/facebookresearch/ToMe   # ToMe rows also counted on the official code

(``tokvis bench --flops`` prints the same table.)  Architectures only: timm models with random weights, no
download.  The papers' "GFLOPs" are GMACs (10^9 multiply-adds); so is every figure printed here.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "flops",
        help="tokvis's GMACs per image beside the published figures (papers' 'GFLOPs' are GMACs), offline",
        description="For each published setting (tokvis/assets/published_flops.json): tokvis's GMACs per 224x224 "
        "image (torch.utils.flop_counter, multiply-adds), the published figure, its source and the relative "
        "difference.  Exit code 1 when a row differs from its figure by more than 2 %% (beyond its rounding).",
    )
    p.add_argument("--rows", nargs="+", default=None, metavar="LABEL", help="only these rows (default: all)")
    p.add_argument(
        "--tome-repo",
        default=None,
        metavar="PATH",
        help="a checkout of facebookresearch/ToMe: every ToMe row is also counted on the official code (same "
        "model and weights); the off-the-shelf rows, which have no published figure, are checked against it",
    )
    p.set_defaults(func=cmd_flops)


def cmd_flops(args: argparse.Namespace) -> int:
    """Print the table row by row, then the sources; 1 when a row disagrees with its published figure."""
    from tokvis.bench import FLOPS_TOLERANCE, flops_table, format_flops_row, format_flops_sources

    first = [True]

    def show(row) -> None:
        print(format_flops_row(row, header=first[0]), flush=True)
        first[0] = False

    rows = flops_table(args.rows, progress=show, tome_repo=getattr(args, "tome_repo", None))
    print(format_flops_sources(rows))
    bad = [r.label for r in rows if r.agrees is False]
    published = [r for r in rows if r.published is not None]
    official = [r for r in rows if r.published is None and r.agrees is not None]  # checked against the official code
    line = (
        f"{sum(bool(r.agrees) for r in published)} of {len(published)} published figures reproduced within "
        f"{FLOPS_TOLERANCE:.0%} (or their rounding)"
    )
    if official:
        agree = sum(bool(r.agrees) for r in official)
        line += f"; {agree} of {len(official)} rows without one equal the official code's count"
    print(line + (f"; differing: {bad}" if bad else ""))
    return 1 if bad else 0
