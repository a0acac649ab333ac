"""``tokvis figures``: the study's figures from run stores, named, as PNG (PDF / SVG on request).

::

    tokvis figures runs/ --out figures/                       # every figure whose inputs exist
    tokvis figures runs/ --out figures/ --only keep_rate global_maps --format png pdf
    tokvis figures runs/ --metrics runs/metrics.csv --measure top1   # figure 4 from tokvis evaluate's table

Figures (``--only`` names) and what each needs (a figure whose inputs are absent is skipped with one line
saying why):

``keep_rate``    similarity across keep rates, per method (>= 2 keep rates of a method)
``backbone``     similarity across backbones at one keep rate (>= 2 backbones of a method and keep rate)
``global_maps``  mean token depth maps of every method at one keep rate, with split-half reliability,
                 and their method x method PCC matrix (>= 2 methods for the matrix)
``performance``  Spearman ρ of Δperformance with CLS-feature similarity (runs recorded with ``--cls``) and
                 with pattern similarity to Top-K / K-Medoids (a performance table: ``--metrics``, default
                 ``<runs>/metrics.csv``)
``overlays``     overlays of every method at one keep rate on one image (its dataset must be readable)
``sources``      VoMix feature sources (a ``vomix`` run) and MCTF fused tokens under criteria ablations
                 (>= 2 ``mctf`` runs differing in options, e.g. in sub-folders)

Every file is written atomically; each path is printed.  ``--keep-rate`` chooses the keep rate of the
figures at one keep rate (default: the one most methods were recorded at; ties: the lowest).
"""

from __future__ import annotations

import argparse
import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

FIGURES = ("keep_rate", "backbone", "global_maps", "performance", "overlays", "sources")
FORMATS = ("png", "pdf", "svg")
_KEYS = ("run", "backbone", "method", "keep_rate", "dataset", "r")
#: measures figure 4 uses by default, first found first (``--measure`` chooses another)
_PREFERRED = ("top1", "accuracy", "knn_agreement", "agreement", "fidelity")
#: numeric columns of tokvis evaluate's table that are no performance measure of a run
_NOT_MEASURES = ("decisions_match",)
_EPILOG = "figures (--only) and what each needs:\n" + re.sub(
    r"^``(\w+)``", r"\1    ", __doc__.split("saying why):\n\n")[1].split("\n\nEvery")[0], flags=re.M
).replace("``", "")


def register(subparsers) -> None:
    f = subparsers.add_parser(
        "figures",
        help="the study's figures from run stores (PNG; PDF/SVG on request)",
        description="The study's figures from run stores, named, as PNG (PDF / SVG on request); each path is "
        "printed, and a figure whose inputs are absent is skipped with one line saying why.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("runs", help="folder holding run stores (searched recursively)")
    f.add_argument("--out", default="figures", help="output folder (default figures/)")
    f.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"figures to make: {', '.join(FIGURES)}")
    f.add_argument("--format", nargs="+", default=["png"], metavar="FMT", help="png (default), pdf, svg")
    f.add_argument("--keep-rate", type=float, default=None, help="keep rate of the one-keep-rate figures")
    f.add_argument("--metrics", default=None, help="performance CSV (default <runs>/metrics.csv when present)")
    f.add_argument(
        "--measure", default=None,
        help=f"performance measure (default: the one with values for the most runs; ties: the first of "
        f"{', '.join(_PREFERRED)})",
    )  # fmt: skip
    f.add_argument("--image-index", type=int, default=0, help="image of the overlay figures (default 0)")
    f.add_argument("--dpi", type=int, default=120, help="PNG resolution (default 120)")
    f.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of intervals (default 1000)")
    f.set_defaults(func=cmd_figures)


# --------------------------------------------------------------------------------------------
# arguments and inputs
# --------------------------------------------------------------------------------------------


def _check_args(args) -> tuple[Path, Path, list[str], list[str]]:
    from tokvis.cli import _check_out_dir
    from tokvis.errors import DataError
    from tokvis.validate import check_float, check_int

    root = Path(args.runs)
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "not found"
        raise DataError(f"{root} is {what}: pass the folder holding the run stores (tokvis record --out ...)")
    out = _check_out_dir(args.out)
    only = list(dict.fromkeys(args.only or FIGURES))
    unknown = [n for n in only if n not in FIGURES]
    if unknown:
        raise DataError(f"--only: unknown figure {', '.join(map(repr, unknown))}; figures: {', '.join(FIGURES)}")
    formats = list(dict.fromkeys(f.lower().lstrip(".") for f in args.format))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise DataError(f"--format: unknown format {', '.join(map(repr, bad))}; formats: {', '.join(FORMATS)}")
    if args.keep_rate is not None:
        check_float("--keep-rate", args.keep_rate, low=0.0, high=1.0, low_open=True, error=DataError)
    check_int("--dpi", args.dpi, minimum=10, maximum=1200, error=DataError)
    check_int("--n-boot", args.n_boot, minimum=0, error=DataError)
    check_int("--image-index", args.image_index, minimum=0, error=DataError)
    if args.metrics is not None and not Path(args.metrics).is_file():
        raise DataError(f"--metrics {args.metrics}: no such file (write one with tokvis evaluate ... --out FILE)")
    return root, out, only, formats


def _load_runs(root: Path) -> list:
    from tokvis.errors import DataError, TokvisError
    from tokvis.store import load_run
    from tokvis.store.verify import find_runs

    paths = find_runs(root)
    if not paths:
        raise DataError(
            f"no run stores in {root}: record some first (tokvis record ... --out {root}, or tokvis sweep FILE)"
        )
    runs = []
    for p in paths:
        try:
            runs.append(load_run(p))
        except TokvisError as e:
            print(f"skipped run {p}: {' '.join(str(e).split())}", flush=True)
    if not runs:
        raise DataError(f"none of the {len(paths)} run stores in {root} can be read (see above; tokvis verify {root})")
    return runs


def _m(run, field: str):
    return getattr(run.meta, field, None)


def _save(fig, out: Path, name: str, formats: list[str], dpi: int, written: list[Path]) -> None:
    import matplotlib.pyplot as plt

    from tokvis.fileio import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
        path = out / f"{name}.{fmt}"
        atomic_write(path, buf.getvalue())
        written.append(path)
        print(path, flush=True)
    plt.close(fig)


def _skip(name: str, why: str) -> None:
    print(f"skipped {name}: {why}", flush=True)


def _groups(runs, fields) -> dict[tuple, list]:
    out: dict[tuple, list] = {}
    for r in runs:
        out.setdefault(tuple(_m(r, f) for f in fields), []).append(r)
    return out


def _suffix(key: tuple, many: bool) -> str:
    import re

    if not many:
        return ""
    return "_" + "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(k)) for k in key if k is not None)


def _choose_keep_rate(runs, wanted):
    from tokvis.errors import DataError

    rates = Counter(_m(r, "keep_rate") for r in runs if _m(r, "keep_rate") is not None)
    if not rates:
        return None
    if wanted is not None:
        close = [k for k in rates if abs(k - wanted) < 1e-9]
        if not close:
            raise DataError(f"--keep-rate {wanted:g}: no run at that keep rate; recorded: {sorted(rates)}")
        return close[0]
    top = max(rates.values())
    return min(k for k, c in rates.items() if c == top)


# --------------------------------------------------------------------------------------------
# the figures
# --------------------------------------------------------------------------------------------


def _grid_axes(n: int, width: float = 5.2, height: float = 4.0):
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(width * cols, height * rows), layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _fig_keep_rate(runs, emit) -> None:
    from tokvis.analysis import compare
    from tokvis.plotting.figures import similarity_vs_keep_rate

    groups = _groups([r for r in runs if _m(r, "keep_rate") is not None], ("backbone", "dataset"))
    made = False
    for key, members in groups.items():
        by_method = _groups(members, ("method",))
        methods = sorted((k[0], v) for k, v in by_method.items() if len({_m(r, "keep_rate") for r in v}) >= 2)
        if not methods:
            continue
        fig, axes = _grid_axes(len(methods))
        for ax, (_method, rs) in zip(axes, methods, strict=True):
            similarity_vs_keep_rate(compare(rs, by="keep_rate"), ax=ax)
        emit(fig, "similarity_keep_rate" + _suffix(key, len(groups) > 1))
        made = True
    if not made:
        _skip("keep_rate", "needs a method recorded at >= 2 keep rates on one backbone and dataset")


def _fig_backbone(runs, emit) -> None:
    from tokvis.analysis import compare
    from tokvis.errors import TraceMismatchError
    from tokvis.plotting.figures import similarity_vs_backbone

    groups = _groups(runs, ("method", "keep_rate", "dataset"))
    usable = {k: v for k, v in groups.items() if len({_m(r, "backbone") for r in v}) >= 2}
    if not usable:
        backbones = sorted({str(_m(r, "backbone")) for r in runs})
        _skip("backbone", f"needs >= 2 backbones of one method and keep rate; found {len(backbones)}: {backbones}")
        return
    tables = []
    for key, rs in sorted(usable.items(), key=lambda kv: str(kv[0])):
        try:
            tables.append((key, compare(rs, by="backbone")))
        except TraceMismatchError as e:
            _skip(f"backbone ({key[0]}, keep rate {key[1]})", " ".join(str(e).split()))
    if not tables:
        return
    fig, axes = _grid_axes(len(tables))
    for ax, (_key, df) in zip(axes, tables, strict=True):
        similarity_vs_backbone(df, ax=ax)
    emit(fig, "similarity_backbone")


def _fig_global_maps(runs, keep_rate, emit) -> None:
    import matplotlib.pyplot as plt

    from tokvis.analysis.compare import global_maps
    from tokvis.datasets import crop_photo
    from tokvis.plotting.maps import global_map_grid, map_correlation_matrix, map_correlations, split_half_reliability

    chosen = [r for r in runs if _m(r, "keep_rate") == keep_rate] if keep_rate is not None else []
    if not chosen:
        _skip("global_maps", "needs runs scheduled by a keep rate")
        return
    groups = _groups(chosen, ("backbone", "dataset"))
    for key, members in groups.items():
        members = sorted(members, key=lambda r: str(_m(r, "method")))
        names = [str(_m(r, "method")) for r in members]
        if len(set(names)) != len(names):
            _skip(f"global_maps {key}", f"several runs of one method at keep rate {keep_rate:g}: {names}")
            continue
        maps = {n: global_maps(r)["depth"] for n, r in zip(names, members, strict=True)}
        rel, by_photo = {}, False
        for n, r in zip(names, members, strict=True):
            photos = [crop_photo(i) for i in r.image_ids]  # crops of one photo stay on one side of a split
            if len(set(photos)) >= 2:
                rel[n] = split_half_reliability(r, groups=photos)["r"]
                by_photo |= len(set(photos)) < r.num_images
        n_img = min(r.num_images for r in members)
        title = f"{key[0]}, {key[1]}, keep rate {keep_rate:g}: mean token depth ({n_img} images)"
        if by_photo:
            title += "; split-half r over halves of the photos"
        notes = {n: note for n, r in zip(names, members, strict=True) if (note := _positional_note(r))}
        fig = global_map_grid(maps, reliability=rel or None, suptitle=title, notes=notes or None)
        emit(fig, "global_maps" + _suffix(key, len(groups) > 1))
        if len(members) >= 2:
            fig, ax = plt.subplots(figsize=(1.0 * len(members) + 3, 0.8 * len(members) + 2.5), layout="constrained")
            map_correlation_matrix(map_correlations(members), reliability=rel or None, ax=ax)
            ax.set_title(f"{key[0]}, keep rate {keep_rate:g}: " + ax.get_title(), fontsize=9)
            emit(fig, "map_correlation" + _suffix(key, len(groups) > 1))
        else:
            _skip(f"global_maps (PCC matrix, {key[0]}, {key[1]})", f"needs >= 2 methods at keep rate {keep_rate:g}")


def _check_ranges(table, columns, path) -> None:
    """Known measures lie in their range (fidelity a cosine in [-1, 1], the others fractions); NaN is 'missing'."""
    from tokvis.errors import DataError
    from tokvis.evaluate import MEASURE_RANGES

    for c in columns:
        if c not in MEASURE_RANGES:
            continue
        lo, hi = MEASURE_RANGES[c]
        if c == "accuracy":
            hi = 100.0  # an external accuracy may be a percentage
        values = table[c]
        out = values[(values < lo) | (values > hi)]
        if len(out):
            raise DataError(
                f"--metrics {path}: {c} {float(out.iloc[0]):g} (row {out.index[0] + 2}) is out of range: {c} lies in "
                f"[{lo:g}, {hi:g}]; check the table (write it with tokvis evaluate)"
            )


def read_performance_table(path: Path):
    """``tokvis evaluate``'s table (or a user's CSV) in wide form, its numeric measure columns with values and
    those that are empty.

    Parameters
    ----------
    path : Path
        The CSV file (long form with ``measure`` / ``value`` columns, or one column per measure).
    """
    import pandas as pd

    from tokvis.errors import DataError

    try:
        table = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"--metrics {path}: not a readable CSV ({' '.join(str(e).split())})") from None
    missing = [c for c in _KEYS[1:5] if c not in table.columns]
    if missing:
        raise DataError(f"--metrics {path}: columns {missing} missing; a performance table has {', '.join(_KEYS[:5])}")
    if {"measure", "value"} <= set(table.columns):  # long form: one row per run and measure
        keys = [c for c in _KEYS if c in table.columns]
        # repeated keys (e.g. ablation runs of one name in sub-folders) stay separate rows; figure 4 refuses
        # them only where a pair uses them
        table = table.assign(_row=table.groupby([*keys, "measure"], dropna=False).cumcount())
        table = table.set_index([*keys, "_row", "measure"])["value"].unstack("measure").reset_index()
        table = table.drop(columns="_row")
        table.columns.name = None
    numeric = [
        c
        for c in table.columns
        if c not in _KEYS and pd.api.types.is_numeric_dtype(table[c]) and not str(c).startswith(("n_", "num_"))
    ]
    # tokvis evaluate writes every measure column, empty where a measure is unavailable (no top1 without a
    # matching head), a text 'measure' note and bookkeeping columns that are no performance measure
    _check_ranges(table, numeric, path)
    empty = [c for c in numeric if table[c].isna().all()]
    numeric = [c for c in numeric if c not in empty and c not in _NOT_MEASURES and not str(c).endswith("_unreduced")]
    return table, numeric, empty


def _performance_table(args, root: Path):
    from tokvis.errors import DataError

    path = Path(args.metrics) if args.metrics else root / "metrics.csv"
    if not path.is_file():
        return None, None, f"no performance table ({path} not found; write one with tokvis evaluate, or --metrics)"
    table, numeric, empty = read_performance_table(path)
    measure = args.measure
    if measure is None:
        preferred = list(dict.fromkeys([c for c in _PREFERRED if c in numeric] + numeric))
        if not preferred:
            raise DataError(f"--metrics {path}: no numeric measure column; columns: {list(table.columns)}")
        # the measure with values for the most runs (e.g. fidelity on every dataset over k-NN agreement on the
        # one labelled set), ties in the order of preference
        coverage = {c: int(table[c].notna().sum()) for c in preferred}
        measure = max(preferred, key=lambda c: (coverage[c], -preferred.index(c)))
        if len(numeric) > 1:
            print(f"performance measure: {measure} (also in the table: {[c for c in numeric if c != measure]}; "
                  "choose with --measure)", flush=True)  # fmt: skip
    elif measure in empty:
        raise DataError(
            f"--measure {measure!r}: the column is empty in {path} (see its 'measure' notes for why); "
            f"measures with values: {numeric}"
        )
    elif measure not in numeric:
        raise DataError(f"--measure {measure!r}: not a numeric column of {path}; measures: {numeric}")
    return table, measure, None


def _align_table(table, runs):
    """The performance table's run fields as the run stores label them, so its rows meet the pairs.

    ``tokvis evaluate`` (and a user's CSV) name the backbone as it was asked for (``vit_tiny_patch16_224``);
    run metadata labels random weights ``vit_tiny_patch16_224(random)``.  Rows with a ``run`` name of one of
    the runs take that run's fields; other rows take the metadata label of their backbone name when it has
    exactly one.
    """
    fields = ("backbone", "method", "keep_rate", "dataset")
    by_name: dict[str, set] = {}
    labels: dict[str, set] = {}
    for r in runs:
        by_name.setdefault(r.path.name, set()).add(tuple(_m(r, f) for f in fields))
        labels.setdefault(str(r.config.get("backbone", _m(r, "backbone"))), set()).add(_m(r, "backbone"))
    table = table.copy()
    table["backbone"] = table["backbone"].astype(object)
    for i in table.index:
        name = table.at[i, "run"] if "run" in table.columns else None
        found = by_name.get(str(name)) if isinstance(name, str) else None
        if found and len(found) == 1:
            values = next(iter(found))
            for f, v in zip(fields, values, strict=True):
                if v is not None:
                    table.at[i, f] = v
        else:
            label = labels.get(str(table.at[i, "backbone"]))
            if label and len(label) == 1:
                table.at[i, "backbone"] = next(iter(label))
    return table


def _fig_performance(runs, args, root: Path, emit) -> None:
    import matplotlib.pyplot as plt

    from tokvis.analysis import compare
    from tokvis.errors import DataError, TokvisError
    from tokvis.plotting.figures import cls_similarity, pair_performance, performance_correlation

    table, measure, why = _performance_table(args, root)
    if table is None:
        _skip("performance", why)
        return
    table = _align_table(table, runs)
    panels: list[tuple[str, Any]] = []
    with_cls = [r for r in runs if r.config.get("cls")]
    if with_cls:
        try:
            sim = cls_similarity(with_cls, by="keep_rate")
            if len(sim):
                panels.append(("(a) CLS-feature similarity across keep rates",
                               pair_performance(sim, table, by="keep_rate", measure=measure)))  # fmt: skip
        except DataError as e:
            _skip("performance (CLS-feature similarity)", " ".join(str(e).split()))
    for ref, label in (("topk", "Top-K"), ("kmedoids", "K-Medoids")):
        parts = []
        for key, members in _groups(runs, ("backbone", "dataset", "keep_rate")).items():
            refs = [r for r in members if _m(r, "method") == ref]
            if not refs or key[2] is None:
                continue
            for r in members:
                if _m(r, "method") == ref:
                    continue
                try:
                    df = compare([refs[0], r], by="method", layers=list(refs[0].layers))
                except TokvisError:  # pairs without common blocks, metric or images are left out
                    continue
                if len(df):
                    parts.append(df)
        if parts:
            import pandas as pd

            pairs = pd.concat(parts, ignore_index=True)
            try:
                got = pair_performance(pairs, table, by="method", measure=measure, reference=ref)
            except DataError as e:
                _skip(f"performance (similarity to {label})", " ".join(str(e).split()))
                continue
            metric = "iou" if ref == "topk" else "v_measure"
            got = got[got.metric == metric]
            if len(got):
                panels.append((f"pattern similarity to {label}", got))
    panels = [(t, d) for t, d in panels if len(d)]
    if not panels:
        _skip("performance", f"no pair of runs with both a similarity and a {measure!r} row in the performance table")
        return
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.2 * len(panels), 4.2), layout="constrained")
    for ax, (title, data) in zip(axes[0], panels, strict=True):
        hue = "method_a" if "method_a" in data.columns else ("method" if "method" in data.columns else None)
        performance_correlation(data, hue=hue, measure=measure, n_boot=args.n_boot, ax=ax)
        ax.set_title(f"{title}\n{ax.get_title()}", fontsize=8)
    fig.suptitle(f"Δ{measure} vs similarity (measure: {measure})", fontsize=10)
    emit(fig, "performance_correlation")


def _image_for(run, index: int):
    """The run's image ``index`` as [H, W, 3] in [0, 1]: the pixels its model saw (:func:`tokvis.store.seen_pixels`)."""
    from tokvis.store.models import seen_pixels

    if not 0 <= index < run.num_images:
        raise KeyError(index)
    return seen_pixels(run, [index])[0] / 255.0


def _fig_overlays(runs, keep_rate, args, emit) -> None:
    from tokvis.errors import TokvisError
    from tokvis.plotting.figures import method_overlays

    chosen = [r for r in runs if keep_rate is not None and _m(r, "keep_rate") == keep_rate]
    if not chosen:
        _skip("overlays", "needs runs scheduled by a keep rate")
        return
    groups = _groups(chosen, ("backbone", "dataset"))
    for key, members in groups.items():
        members = sorted(members, key=lambda r: str(_m(r, "method")))
        if args.image_index >= min(r.num_images for r in members):
            _skip("overlays", f"--image-index {args.image_index}: the runs hold {members[0].num_images} images")
            continue
        try:
            image = _image_for(members[0], args.image_index)
        except (TokvisError, OSError, KeyError) as e:
            _skip("overlays", f"the images of dataset {key[1]!r} cannot be read here ({' '.join(str(e).split())})")
            continue
        fig = method_overlays(members, image, image_index=args.image_index)
        fig.suptitle(f"{key[0]}, keep rate {keep_rate:g}, image {members[0].image_ids[args.image_index]}")
        emit(fig, "overlays" + _suffix(key, len(groups) > 1))
        fig = method_overlays(members, image, image_index=args.image_index, kept_pixels=True)
        fig.suptitle(f"{key[0]}, keep rate {keep_rate:g}: kept tokens with their real pixels")
        emit(fig, "overlays_pixels" + _suffix(key, len(groups) > 1))


def _positional_note(run) -> str | None:
    """Why ToMe's depth map is stripes: the official bipartite split alternates by position (docs/findings.md)."""
    if _m(run, "method") != "tome" or (_m(run, "options") or {}).get("order", "official") != "official":
        return None
    width = int(run.grid_size[1])
    shape = "columns" if width % 2 == 0 else "a checkerboard"
    return f"fixed by position: the official split alternates {shape}"


def _fig_sources(runs, args, emit) -> None:
    from tokvis.errors import TokvisError
    from tokvis.plotting.figures import feature_source_view, fused_token_views

    vomix = [r for r in runs if _m(r, "method") == "vomix"]
    if vomix:
        run = vomix[0]
        try:
            image = _image_for(run, min(args.image_index, run.num_images - 1))
            source = run.trace() if run.config.get("soft") else run
            fig = feature_source_view(source, image, image_index=min(args.image_index, run.num_images - 1))
            emit(fig, "feature_sources_vomix")
        except (TokvisError, OSError, KeyError) as e:
            _skip("sources (VoMix)", " ".join(str(e).split()))
    else:
        _skip("sources (VoMix)", "needs a vomix run (tokvis record --method vomix --r ...; --soft for mixing weights)")
    mctf = _groups([r for r in runs if _m(r, "method") == "mctf"], ("backbone", "dataset", "keep_rate"))
    ablations = [v for v in mctf.values() if len({repr(sorted((_m(r, "options") or {}).items())) for r in v}) >= 2]
    if not ablations:
        _skip("sources (MCTF)", "needs >= 2 mctf runs with different options (e.g. criteria), in sub-folders")
        return
    members = ablations[0]
    try:
        image = _image_for(members[0], min(args.image_index, members[0].num_images - 1))
    except (TokvisError, OSError, KeyError) as e:
        _skip("sources (MCTF)", " ".join(str(e).split()))
        return
    emit(fused_token_views(members, image, image_index=min(args.image_index, members[0].num_images - 1)),
         "fused_tokens_mctf")  # fmt: skip


def make_figures(runs, args, root: Path, only, keep_rate, emit) -> None:
    """Every figure of ``only`` (:data:`FIGURES` names) from ``runs``, each passed to ``emit(fig, name)``; a figure
    whose inputs are absent is skipped with one printed line (``args``: the options of ``tokvis figures``)."""
    import matplotlib.pyplot as plt

    from tokvis.errors import TraceMismatchError
    from tokvis.store import StoreError

    steps = {
        "keep_rate": lambda: _fig_keep_rate(runs, emit),
        "backbone": lambda: _fig_backbone(runs, emit),
        "global_maps": lambda: _fig_global_maps(runs, keep_rate, emit),
        "performance": lambda: _fig_performance(runs, args, root, emit),
        "overlays": lambda: _fig_overlays(runs, keep_rate, args, emit),
        "sources": lambda: _fig_sources(runs, args, emit),
    }
    for name in FIGURES:
        if name not in only:
            continue
        try:
            steps[name]()
        except (TraceMismatchError, StoreError) as e:  # runs that cannot be compared, a shard failing its checksum
            plt.close("all")
            _skip(name, " ".join(str(e).split()))


def cmd_figures(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")

    from tokvis.errors import DataError

    root, out, only, formats = _check_args(args)
    runs = _load_runs(root)
    keep_rate = _choose_keep_rate(runs, args.keep_rate)
    written: list[Path] = []

    def emit(fig, name: str) -> None:
        _save(fig, out, name, formats, args.dpi, written)

    make_figures(runs, args, root, only, keep_rate, emit)
    if not written:
        raise DataError(
            f"no figure could be made from the {len(runs)} runs in {root} (each figure's reason is printed above)"
        )
    print(f"wrote {len(written)} files to {out.resolve()} from {len(runs)} runs", flush=True)
    return 0
