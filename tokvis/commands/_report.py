"""``tokvis report``'s page (built here, for the command line): one self-contained HTML file of a sweep (table,
figures, similarity, the viewer).

Everything is inline: the viewer's JavaScript and CSS, the figures (SVG for plots, PNG for maps), the images
(JPEG) and the labels (int16, zlib-deflated, base64).  The page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tokvis.errors import DataError, TokvisError
from tokvis.viewer import ImageSource, jpeg, viewer_css, viewer_js
from tokvis.viewer.data import Panel, _title, deflate, pack, panel_payload

__all__ = ["choose_images", "report_html"]

#: the page may load nothing: inline scripts and styles, images from data: URLs only
_CSP = "default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_FIELDS = ("backbone", "method", "keep_rate", "r", "locations", "dataset")
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 18px 28px; color: #1d1d1d; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; }
table.tv-table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 14px; }
.tv-table th, .tv-table td { border: 1px solid #ddd; padding: 2px 7px; text-align: right; }
.tv-table th { background: #f3f3f3; cursor: pointer; user-select: none; }
.tv-table td.tv-text, .tv-table th.tv-text { text-align: left; }
.tv-table th[data-sort=asc]::after { content: " ▲"; } .tv-table th[data-sort=desc]::after { content: " ▼"; }
.tv-figure { margin: 10px 0 20px; } .tv-figure img { max-width: 100%; border: 1px solid #eee; }
.tv-muted { color: #666; font-size: 12.5px; }
"""


def choose_images(ids_per_run: Sequence[Sequence[Any]], n: int) -> list[Any]:
    """The same ``n`` image ids for every run: evenly spaced over the ids all runs hold, in the first run's order.

    Parameters
    ----------
    ids_per_run : list of lists
        Each run's image ids.
    n : int
        How many images.

    Raises
    ------
    tokvis.errors.DataError
        ``n`` larger than the images the runs have in common.
    """
    common = set(ids_per_run[0]).intersection(*map(set, ids_per_run[1:]))
    ids = [i for i in ids_per_run[0] if i in common]
    if n > len(ids):
        raise DataError(
            f"--images {n} is more than the {len(ids)} images the runs hold in common; pass --images <= {len(ids)}"
        )
    picks = np.unique(np.round(np.linspace(0, len(ids) - 1, n)).astype(int)) if n > 1 else np.array([0])
    return [ids[i] for i in picks]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], text_cols: Sequence[int] = ()) -> str:
    cls = lambda j: ' class="tv-text"' if j in text_cols else ""  # noqa: E731
    head = "".join(f"<th{cls(j)}>{html.escape(h)}</th>" for j, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(j)}>{html.escape(_fmt(v))}</td>" for j, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f'<table class="tv-table tv-sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _run_rows(runs, root: Path, metrics: tuple | None) -> str:
    names = [str(r.path.relative_to(root)) if r.path.is_relative_to(root) else r.path.name for r in runs]
    measures: list[str] = []
    values: list[dict[str, Any]] = [{} for _ in runs]
    if metrics is not None:
        table, measures = metrics
        for i, r in enumerate(runs):
            m = r.meta
            rows = table[table["run"].astype(str) == r.path.name] if "run" in table.columns else table.iloc[:0]
            if len(rows) != 1:
                rows = table[
                    (table["method"] == m.method)
                    & (table["backbone"].astype(str) == str(m.backbone))
                    & (table["dataset"].astype(str) == str(m.dataset))
                    & (np.isclose(table["keep_rate"].astype(float), m.keep_rate) if m.keep_rate is not None
                       else table["keep_rate"].isna())
                ]  # fmt: skip
            if len(rows) == 1:
                values[i] = {c: rows.iloc[0][c] for c in measures}
    headers = ["run", *_FIELDS, "blocks", "images", *measures]
    rows = []
    for r, name, vals in zip(runs, names, values, strict=True):
        m = r.meta
        rows.append([name, *(getattr(m, f) for f in _FIELDS), list(r.layers), r.num_images,
                     *(vals.get(c) for c in measures)])  # fmt: skip
    return _table(headers, rows, text_cols=(0, 1, 2, 5, 6, 7))


def _figures_html(runs, root: Path, metrics_path: Path | None, log) -> str:
    import argparse

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokvis.commands.figures import FIGURES, _choose_keep_rate, make_figures

    parts: list[str] = []

    def emit(fig, name: str) -> None:
        # SVG where it is the smaller file: plots of lines and markers; figures holding images (maps, overlays)
        # as PNG, whose SVG would embed the same raster and more (one rendering per figure: half the time)
        # (measured on the test sweep: a similarity plot 29 kB as SVG with text as text, 39 kB as PNG; the maps and
        # overlays 21-35 kB as PNG, 36-138 kB as SVG)
        raster = any(ax.images for ax in fig.axes)
        buf = io.BytesIO()
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            fig.savefig(buf, format="png" if raster else "svg", dpi=90, bbox_inches="tight")
        kind, data = ("png" if raster else "svg+xml"), buf.getvalue()
        if raster:
            kind, data = _smaller_raster(data)
        elif len(data) > SVG_CHECK_ABOVE:  # many markers and error bars: a palette PNG may be far smaller
            png = io.BytesIO()
            fig.savefig(png, format="png", dpi=90, bbox_inches="tight")
            small = _palette_png(png.getvalue())
            if len(small) < len(data):
                kind, data = "png", small
        plt.close(fig)
        parts.append(
            f'<div class="tv-figure"><h3>{html.escape(name)}</h3>'
            f'<img alt="{html.escape(name)}" src="data:image/{kind};base64,{_b64(data)}"></div>'
        )

    args = argparse.Namespace(
        metrics=str(metrics_path) if metrics_path else None, measure=None, image_index=0, n_boot=200
    )
    make_figures(runs, args, root, FIGURES, _choose_keep_rate(runs, None), emit)
    return (
        "\n".join(parts)
        or '<p class="tv-muted">no figure could be made from these runs (see the command\'s output)</p>'
    )


#: a raster figure is embedded as JPEG when that is at most this fraction of its PNG (photos: overlays on real
#: images, ~1 MB as PNG); flat-colour maps and plots stay lossless PNG
JPEG_IF_BELOW = 0.5


#: an SVG plot larger than this is also rendered as a palette PNG, and the smaller is embedded
SVG_CHECK_ABOVE = 100_000


def _palette_png(png: bytes) -> bytes:
    """A plot's PNG with its colours reduced to a 256-colour palette (no dithering): a line plot has a few
    colours plus their antialiasing, so it looks the same at a fraction of the bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(out, "PNG", optimize=True)
    return out.getvalue()


def _smaller_raster(png: bytes) -> tuple[str, bytes]:
    """``("png", png)``, or ``("jpeg", bytes)`` when the figure is a photo-like raster that JPEG (quality 85)
    stores in under :data:`JPEG_IF_BELOW` of the PNG's bytes (measured on the offline study's report: the four
    overlay figures on real crops were 4.5 MB of its 8.5 MB as PNG)."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    lossy = jpeg(pixels, 85)
    return ("jpeg", lossy) if len(lossy) <= JPEG_IF_BELOW * len(png) else ("png", png)


def _similarity_html(runs) -> str:
    from tokvis.analysis import compare

    out = []
    for by in ("keep_rate", "method"):
        for convention in ("standard", "study"):
            out.append(f"<h3>by {by.replace('_', ' ')}, {convention} convention</h3>")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    df = compare(runs, by=by, convention=convention)
            except TokvisError as e:
                out.append(f'<p class="tv-muted">{html.escape(" ".join(str(e).split()))}</p>')
                continue
            if not len(df):
                out.append('<p class="tv-muted">no pair of runs differs only in this field</p>')
                continue
            varied = [c for c in df.columns if c.endswith(("_a", "_b"))]
            fixed = [c for c in ("backbone", "dataset", "method", "keep_rate", "r") if c in df.columns]
            keys = [*fixed, *varied, "metric"]
            g = df.groupby([*keys, "stage"], dropna=False)["value"].agg(["mean", "std"]).reset_index()
            stages = sorted(g["stage"].unique())
            rows = []
            for key, part in g.groupby(keys, dropna=False, sort=True):
                cells = {int(s): f"{mu:.3f} ± {0.0 if np.isnan(sd) else sd:.3f}" for s, mu, sd in
                         zip(part["stage"], part["mean"], part["std"], strict=True)}  # fmt: skip
                rows.append([*key, *(cells.get(int(s), "") for s in stages)])
            headers = [*keys, *(f"stage {int(s)}" for s in stages)]
            out.append(_table(headers, rows, text_cols=tuple(range(len(keys)))))
    return "\n".join(out)


def _viewer_groups(runs, n_images: int, log) -> list[dict[str, Any]]:
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((str(r.meta.dataset), tuple(r.grid_size)), []).append(r)
    out = []
    for (dataset, grid), members in groups.items():
        members = sorted(members, key=lambda r: (str(r.meta.method), -(r.meta.keep_rate or 0), str(r.meta.r)))
        for r in members:
            if n_images > r.num_images:
                raise DataError(
                    f"--images {n_images} is more than run {r.path.name} holds ({r.num_images} images); "
                    f"pass --images <= {r.num_images}"
                )
        ids = choose_images([r.image_ids for r in members], n_images)
        entries = []
        for r in members:
            where = {v: i for i, v in enumerate(r.image_ids)}
            panel = Panel(r, _title(r))
            blobs, weight = [], False
            for image_id in ids:
                payload = panel_payload(panel, where[image_id])
                weight = payload["weight"] is not None
                blobs.extend(pack(payload))
            m = r.meta
            sched = f"keep {m.keep_rate:g}" if m.keep_rate is not None else f"r={m.r}"
            entries.append({**panel.describe(), "run": r.path.name, "method": str(m.method), "schedule": sched,
                            "weight": weight, "backbone_label": str(m.backbone),
                            "data": _b64(deflate(b"".join(blobs)))})  # fmt: skip
        first = members[0]
        source = ImageSource([Panel(first, "")])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = source.pixels([first.image_ids.index(i) for i in ids])
        if pixels is None:
            log(f"report: dataset {dataset!r}: {source.note}")
        images = [{"name": str(i), "src": None if pixels is None else "data:image/jpeg;base64," + _b64(jpeg(px, 85))}
                  for i, px in zip(ids, pixels if pixels is not None else [None] * len(ids), strict=True)]  # fmt: skip
        # default panels: one run per method at the keep rate most methods have, up to 6
        rates = [r.meta.keep_rate for r in members]
        common = max(set(rates), key=lambda k: (rates.count(k), -(k or 0)))
        panels, seen = [], set()
        for j, r in enumerate(members):
            if r.meta.keep_rate == common and r.meta.method not in seen and len(panels) < 6:
                panels.append(j)
                seen.add(r.meta.method)
        out.append({"title": f"{dataset}, {grid[0]}x{grid[1]} patches", "grid": list(grid), "runs": entries,
                    "images": images, "note": "" if pixels is not None else source.note, "panels": panels})  # fmt: skip
    return out


def report_html(runs, root: Path, *, images: int = 12, metrics: Path | None = None, log=print) -> str:
    """The report page of ``runs`` as one HTML string.

    Parameters
    ----------
    runs : list of tokvis.store.Run
        Loaded runs (:func:`tokvis.load_run`).
    root : Path
        The folder they were found in (names in the table are relative to it).
    images : int
        Images per run in the viewer, the same for every run of a dataset and grid.
    metrics : Path, optional
        ``tokvis evaluate``'s table; its measures become columns of the run table.
    log : callable
        Where notes (skipped figures, unreadable images) go.
    """
    from tokvis.commands.figures import _align_table, read_performance_table

    metric_cols = None
    if metrics is not None:
        table, numeric, _ = read_performance_table(metrics)
        metric_cols = (_align_table(table, runs), numeric)
    groups = _viewer_groups(runs, images, log)
    data = json.dumps({"groups": groups}, separators=(",", ":")).replace("</", "<\\/")
    viewers = "".join(
        f"<h3>{html.escape(g['title'])}: {len(g['runs'])} runs, {len(g['images'])} images</h3>"
        f'<div id="tv-viewer-{n}"></div>'
        for n, g in enumerate(groups)
    )
    script = viewer_js() + "\n" + resources.files("tokvis.viewer").joinpath("report.js").read_text(encoding="utf-8")
    script = script.replace("</script", "<\\/script")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>tokvis report: {len(runs)} runs</title>
<style>{viewer_css()}{_CSS}</style></head>
<body>
<h1>tokvis report: {len(runs)} runs in {html.escape(root.name or str(root))}</h1>
<p class="tv-muted">Click a column header to sort. Viewer: ←/→ block, ↑/↓ image, hover a patch, click a token.</p>
<h2>Runs</h2>
{_run_rows(runs, root, metric_cols)}
<h2>Explore</h2>
{viewers}
<h2>Similarity (mean ± std over images, per stage)</h2>
{_similarity_html(runs)}
<h2>Figures</h2>
{_figures_html(runs, root, metrics, log)}
<script type="application/json" id="tokvis-data">{data}</script>
<script>{script}</script>
</body></html>
"""
