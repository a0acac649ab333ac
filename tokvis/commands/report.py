"""``tokvis report``: a sweep in one self-contained HTML file.

::

    tokvis report runs/ --out report.html                  # 12 images per run in the viewer
    tokvis report runs/ --out report.html --images 4 --metrics runs/metrics.csv

The page holds a sortable table of the runs (with ``tokvis evaluate``'s measures where a metrics file exists),
the viewer of :func:`tokvis.explore` for the same ``--images`` images of every run with method / schedule pickers,
the similarity summaries by keep rate and by method (mean ± std per stage, both conventions) and the
``tokvis figures`` set.  Everything is inline: it opens from disk with no network and no server.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    from tokvis.cli import int_at_least

    p = subparsers.add_parser(
        "report",
        help="a sweep in one self-contained HTML file (table, viewer, similarity, figures)",
        description="A sweep in one self-contained HTML file: run table, viewer, similarity, figures; it loads "
        "nothing from anywhere when opened.",
    )
    p.add_argument("runs", help="folder holding run stores (searched recursively)")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--images", type=int_at_least(1), default=12, help="images per run in the viewer (default 12)")
    p.add_argument("--metrics", default=None, help="tokvis evaluate's table (default <runs>/metrics.csv when present)")
    p.set_defaults(func=cmd_report)


def _check(args) -> tuple[Path, Path, Path | None]:
    from tokvis.errors import DataError

    root = Path(args.runs)
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "not found"
        raise DataError(f"{root} is {what}: pass the folder holding the run stores (tokvis record --out ...)")
    out = Path(args.out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder: pass a file name, e.g. --out {out / 'report.html'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise DataError(f"--out {out}: {out.parent} is a file, not a folder")
    metrics = Path(args.metrics) if args.metrics else (root / "metrics.csv")
    if args.metrics and not metrics.is_file():
        raise DataError(f"--metrics {metrics}: no such file (write one with tokvis evaluate ... --out FILE)")
    return root, out, metrics if metrics.is_file() else None


def _manifest_digest(path: Path) -> str | None:
    from tokvis.store import MANIFEST

    try:
        return json.loads((path / MANIFEST).read_text()).get("manifest_sha256")
    except (OSError, ValueError):
        return None


def _load(root: Path) -> list:
    from tokvis.errors import DataError
    from tokvis.store import StoreError, find_runs, load_run
    from tokvis.store.writer import recording_now

    paths = find_runs(root)
    if not paths:
        raise DataError(f"no run stores in {root}: record some first (tokvis record ... --out {root}, or tokvis sweep)")
    runs = []
    for p in paths:
        holder = recording_now(p)
        if holder:
            raise DataError(f"{p} is being recorded now ({holder}); make the report when the recording is done")
        try:
            runs.append(load_run(p))
        except StoreError as e:
            raise DataError(f"{' '.join(str(e).split())} (check it with `tokvis verify {p}`)") from None
    return runs


def cmd_report(args: argparse.Namespace) -> int:
    from tokvis.commands._report import report_html
    from tokvis.errors import DataError
    from tokvis.fileio import atomic_write
    from tokvis.store import StoreError
    from tokvis.store.writer import recording_now

    root, out, metrics = _check(args)
    t0 = time.perf_counter()
    runs = _load(root)
    before = {r.path: _manifest_digest(r.path) for r in runs}
    try:
        page = report_html(runs, root, images=args.images, metrics=metrics)
    except StoreError as e:  # a shard failing its checksum when read
        raise DataError(f"{' '.join(str(e).split())} (check it with `tokvis verify {root}`)") from None
    for r in runs:
        holder = recording_now(r.path)
        if holder or _manifest_digest(r.path) != before[r.path]:
            raise DataError(
                f"{r.path} was written while the report read it ({holder or 'its manifest changed'}); nothing was "
                f"written to {out}. Make the report again when the recording is done"
            )
    atomic_write(out, page)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB, {len(runs)} runs) in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
