"""`tokvis report`: the page's data agree with the run stores, bad inputs end in one line (exit 2) and lose nothing;
the page itself in headless Chromium and Firefox from file:// with the network refused (slow)."""

from __future__ import annotations

import base64
import json
import re
import zlib

import numpy as np
import pandas as pd
import pytest

import tokvis
from tests.browser import canvas_pixels, needs_browser, needs_firefox, open_page
from tests.integration.conftest import fails_cleanly, write_metrics
from tokvis.cli import main
from tokvis.store.verify import find_runs

KW = '{"img_size": 64, "patch_size": 8, "depth": 4}'
COMMON = ["--no-pretrained", "--model-kwargs", KW, "--data", "digits", "--limit", "6", "--batch-size", "6",
          "--device", "cpu", "--no-progress"]  # fmt: skip


def _record(out, *args):
    assert main(["record", "--model", "vit_tiny_patch16_224", *args, *COMMON, "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _record(root, "--method", "topk", "tome", "--keep-rate", "0.7", "0.5")
    _record(root, "--method", "vomix", "--r", "8", "--soft", "--method-options", '{"residual": "mix"}')
    write_metrics(root)
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(runs), "--out", str(out), "--images", "4"]) == 0
    return out


def _run_table(text):
    """The page's first table (the runs) as a DataFrame, parsed with the standard library's HTML parser."""
    from html.parser import HTMLParser

    rows: list[list[str]] = []

    class P(HTMLParser):
        cell = None
        done = False

        def handle_starttag(self, tag, attrs):
            if self.done:
                return
            if tag == "tr":
                rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None and not self.done:
                rows[-1].append(self.cell)
                self.cell = None
            elif tag == "table":
                self.done = True

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    P().feed(text)
    frame = pd.DataFrame(rows[1:], columns=rows[0])
    return frame.replace("", np.nan)


def _page_data(path):
    text = path.read_text()
    raw = re.search(r'<script type="application/json" id="tokvis-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(raw.replace("<\\/", "</"))


def test_page_data_agree_with_the_runs(runs, report):
    data = _page_data(report)
    (group,) = data["groups"]
    assert len(group["runs"]) == 5 and len(group["images"]) == 4
    for entry in group["runs"]:
        run = tokvis.load_run(runs / entry["run"])
        trace = run.trace()  # decisions rebuilt and composed: another path than the stored maps the page reads
        S, P = len(entry["layers"]) + 1, run.num_patches
        per = S * P * 2 + P * 2 + (S * P if entry["weight"] else 0)
        buf = zlib.decompress(base64.b64decode(entry["data"]))
        assert len(buf) == per * 4
        assert entry["weight"] == (run.meta.method == "vomix")
        for j, image in enumerate(group["images"]):
            i = run.image_ids.index(image["name"])
            rec = buf[j * per : (j + 1) * per]
            labels = np.frombuffer(rec[: S * P * 2], "<i2").reshape(S, P)
            for s, layer in enumerate([-1, *entry["layers"]]):
                np.testing.assert_array_equal(labels[s], trace.labels(layer)[i].numpy())
            np.testing.assert_array_equal(np.frombuffer(rec[S * P * 2 : S * P * 2 + P * 2], "<i2"), trace.depth()[i])
    # the same images for every run, evenly spread over the 6 recorded ones
    assert [im["name"] for im in group["images"]] == [tokvis.load_run(find_runs(runs)[0]).image_ids[i]
                                                      for i in (0, 2, 3, 5)]  # fmt: skip
    assert all(im["src"].startswith("data:image/jpeg;base64,") for im in group["images"])


def test_table_figures_and_similarity(report):
    text = report.read_text()
    table = _run_table(text)
    assert len(table) == 5 and table["fidelity"].notna().all()
    for section in ("by keep rate, standard convention", "by keep rate, study convention",
                    "by method, standard convention", "by method, study convention"):  # fmt: skip
        assert section in text
    assert " ± " in text
    for name in ("similarity_keep_rate", "global_maps", "overlays"):
        assert f"<h3>{name}" in text
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # nothing to fetch


def test_table_measures_match_the_metrics_file(runs, report):
    table = _run_table(report.read_text()).set_index("run")
    metrics = pd.read_csv(runs / "metrics.csv").set_index("run")
    for name, value in metrics["fidelity"].items():
        assert float(table.loc[name, "fidelity"]) == pytest.approx(value, abs=1e-4)


def test_bad_inputs_one_line_and_nothing_lost(runs, tmp_path, capsys, monkeypatch):
    import shutil

    from tokvis.store import RunLock

    out = tmp_path / "report.html"
    out.write_text("an earlier report")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_cleanly(capsys, ["report", str(empty), "--out", str(out)], "no run stores")
    fails_cleanly(capsys, ["report", str(runs), "--out", str(tmp_path)], "is a folder")
    fails_cleanly(capsys, ["report", str(runs), "--out", str(out), "--images", "7"], "--images 7")
    broken = tmp_path / "broken"
    shutil.copytree(runs, broken)
    first = find_runs(broken)[0]
    (first / "manifest.json").write_text((first / "manifest.json").read_text()[:-40])
    fails_cleanly(capsys, ["report", str(broken), "--out", str(out)], "tokvis verify")
    with RunLock(runs / find_runs(runs)[1].name, log=lambda *a: None):
        fails_cleanly(capsys, ["report", str(runs), "--out", str(out)], "is being recorded now")

    # a recording starts while the report reads the stores
    import tokvis.commands._report as R

    real = R.report_html

    def racing(runs_, *a, **kw):
        page = real(runs_, *a, **kw)
        lock = RunLock(runs_[2].path, log=lambda *a: None)
        lock.acquire()
        racing.lock = lock
        return page

    monkeypatch.setattr(R, "report_html", racing)
    try:
        fails_cleanly(capsys, ["report", str(runs), "--out", str(out), "--images", "2"], "was written while")
    finally:
        racing.lock.release()
    assert out.read_text() == "an earlier report"


@pytest.mark.slow
@pytest.mark.parametrize("browser", [pytest.param("chromium", marks=needs_browser),
                                     pytest.param("firefox", marks=needs_firefox)])  # fmt: skip
def test_report_in_a_browser(browser, runs, report, tmp_path):
    data = _page_data(report)
    group = data["groups"][0]
    viewer, sel = "#tv-viewer-0", "#tv-viewer-0 canvas.tv-canvas"
    with open_page(browser, "file://", tmp_path) as page:
        page.goto(report.as_uri())
        assert page.evaluate("typeof window.tokvisReady.then") == "function"  # the page's own globals are seen
        page.evaluate("window.tokvisReady")  # awaited: the labels inflated (DecompressionStream), the panels drawn
        assert page.evaluate(f"document.querySelectorAll('{sel}').length") == len(group["panels"])
        page.scroll_to(viewer)
        page.screenshot(tmp_path / "report_top.png")
        k = 0  # the first panel
        entry = group["runs"][group["panels"][k]]
        run = tokvis.load_run(runs / entry["run"])
        trace = run.trace()
        assert canvas_pixels(page, sel, k)[..., :3].std() > 10  # drawn: not one flat colour

        # keys step the slider; the step onto the first reducing block changes the drawn pixels, a step onto a
        # block without a reduction does not
        first = entry["layers"][0]
        page.focus(viewer)
        for b in range(first):
            before = canvas_pixels(page, sel, k)
            page.press("ArrowRight")
            assert page.attribute(viewer, "data-block") == str(b)
            assert (before == canvas_pixels(page, sel, k)).all()
        before = canvas_pixels(page, sel, k)
        page.press("ArrowRight")
        assert page.attribute(viewer, "data-block") == str(first)
        assert (before != canvas_pixels(page, sel, k)).any()
        page.press("ArrowRight")
        page.press("ArrowLeft")
        block = int(page.attribute(viewer, "data-block"))
        assert block == first and page.evaluate(f"document.querySelector('{viewer} .tv-slider').value") == str(first)

        # click the centre of a token of >= 2 patches: exactly its patches (trace.labels) are highlighted
        image = 1
        page.press("ArrowDown")
        page.wait_for(f"document.querySelector('{viewer}').dataset.image === '1'")
        page.evaluate("window.tokvisViewers[0].ready()")  # the image's labels are in and drawn
        i = run.image_ids.index(group["images"][image]["name"])
        labels = trace.labels(block)[i].numpy()
        kept = trace.kept(block)[i].numpy()
        sizes = np.bincount(labels[labels >= 0])
        own = next(p for p in range(run.num_patches) if kept[p] and labels[p] >= 0 and sizes[labels[p]] >= 2) \
            if entry["method"] != "topk" else int(np.nonzero(kept)[0][0])  # fmt: skip
        token = labels[own]
        expect = sorted(np.nonzero(labels == token)[0].tolist())
        bb = page.box(sel, k)
        gh, gw = run.grid_size
        cx = bb["x"] + (own % gw + 0.5) * bb["width"] / gw
        cy = bb["y"] + (own // gw + 0.5) * bb["height"] / gh
        page.move(bb["x"] + 2, bb["y"] + bb["height"] + 40)  # off the canvas
        plain = canvas_pixels(page, sel, k)
        page.move(cx, cy)
        assert page.evaluate("window.tokvisViewers[0].highlighted()")[k] == expect  # hover
        page.click(cx, cy)
        page.move(bb["x"] + 2, bb["y"] + bb["height"] + 40)
        state = page.evaluate("window.tokvisViewers[0].state()")
        assert state["selectedToken"] == token and state["selectedPanel"] == k
        assert page.evaluate("window.tokvisViewers[0].highlighted()")[k] == expect
        # read back from the drawn pixels: the patches whose interior changed are the token's
        shaded = canvas_pixels(page, sel, k)
        c = plain.shape[1] // gw
        changed = [p for p in range(run.num_patches)
                   if (plain[(p // gw) * c + c // 4, (p % gw) * c + c // 4] !=
                       shaded[(p // gw) * c + c // 4, (p % gw) * c + c // 4]).any()]  # fmt: skip
        assert changed == expect
        page.screenshot(tmp_path / "report_selected.png", viewer)
        # "save view as PNG": a PNG of every panel, downloaded
        page.download(f"{viewer} .tv-save", tmp_path / "saved_view.png")
        assert (tmp_path / "saved_view.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the pickers swap a panel's run
        page.select(f"{viewer} select.tv-pick-method", "vomix")
        page.evaluate("window.tokvisViewers[0].ready()")
        assert "vomix" in page.evaluate(f"document.querySelector('{viewer} .tv-title').textContent")
        page.screenshot(tmp_path / "report_vomix.png", viewer)
        # the slider: a click at its right end moves to the last block, and the panel redraws
        slider = f"{viewer} .tv-slider"
        page.scroll_to(slider)
        before = canvas_pixels(page, sel, k)
        s = page.box(slider)
        page.click(s["x"] + s["width"] - 2, s["y"] + s["height"] / 2)
        last = page.evaluate(f"document.querySelector('{slider}').max")
        assert int(last) > block and page.attribute(viewer, "data-block") == last
        assert (before != canvas_pixels(page, sel, k)).any()
        # sortable table: a click on the fidelity header sorts the rows by it
        column = page.evaluate("""Array.from(document.querySelectorAll('table.tv-table')[0].tHead.rows[0].cells)
                                  .findIndex((th) => th.textContent.includes('fidelity'))""")  # fmt: skip
        cells = f"""Array.from(document.querySelectorAll('table.tv-table')[0].tBodies[0].rows,
                               (r) => parseFloat(r.cells[{column}].textContent))"""
        page.click_on("table.tv-table thead th", column)
        values = page.evaluate(cells)
        assert values == sorted(values)
        page.click_on("table.tv-table thead th", column)  # again: descending
        assert page.evaluate(cells) == sorted(values, reverse=True)
    assert not page.outside, page.outside
    assert not page.errors(), page.console
    assert (tmp_path / "report_selected.png").stat().st_size > 1000


def test_seen_pixels_are_what_the_model_saw(runs):
    """The reloaded pixels, normalised and fed to the run's rebuilt model, reproduce the recorded decisions."""
    import torch

    from tokvis.data import data_config
    from tokvis.store import build_model, patch_for
    from tokvis.store.models import run_spec, seen_pixels

    run = tokvis.load_run(next(p for p in find_runs(runs) if "__tome__keep0.5" in p.name))
    pixels = seen_pixels(run, range(run.num_images))
    model = build_model(run_spec(run))
    cfg = data_config(model)
    assert pixels.shape == (run.num_images, *cfg["input_size"][1:], 3) and pixels.dtype == np.uint8
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    patch_for(model, run_spec(run))
    with torch.no_grad():
        _, trace = tokvis.run_with_trace(model, x)
    for layer in run.layers:
        np.testing.assert_array_equal(trace.labels(layer).numpy(), run.labels(layer))


def test_explore_a_run_whose_images_are_gone_draws_a_grey_grid_with_one_warning(runs, monkeypatch):
    import warnings

    import tokvis.datasets
    from tokvis.errors import DataError
    from tokvis.store import models

    def gone(spec, **kw):
        raise DataError(f"dataset {spec!r}: folder not found")

    monkeypatch.setattr(models, "_DATASETS", {})
    monkeypatch.setattr(tokvis.datasets, "open_dataset", gone)
    paths = find_runs(runs)[:2]
    w = tokvis.explore(paths)  # run folders, opened lazily
    sent = []
    w.send = lambda msg, buffers=None: sent.append((msg, buffers))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            w._on_msg(w, {"type": "need_image", "image": i}, [])
    assert [str(c.message) for c in caught if "grey grid" in str(c.message)] == [
        "tokvis.explore: the images cannot be read here (dataset 'digits': folder not found): patterns are drawn on "
        "a grey grid"
    ]
    assert all(m["type"] == "image" and not b and "grey grid" in m["note"] for m, b in sent)
    w._on_msg(w, {"type": "need", "image": 1}, [])
    assert sent[-1][0]["type"] == "data"
