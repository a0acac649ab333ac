"""tokvis.explore in a real notebook: a Jupyter server on 127.0.0.1, Notebook 7 in headless Chromium; a click in the
widget reaches ``w.selected_token`` in the kernel, and ``w.block`` set in the kernel redraws the widget (slow)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import tokvis
from tests.browser import browser_page, canvas_pixels, needs_browser
from tokvis.cli import main
from tokvis.store.verify import find_runs

ROOT = Path(__file__).resolve().parents[2]
KW = '{"img_size": 64, "patch_size": 8, "depth": 4}'

pytestmark = [pytest.mark.slow, needs_browser]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path, cells: list[str]) -> None:
    nb = {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": src}
            for i, src in enumerate(cells)
        ],  # fmt: skip
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb))


@pytest.fixture
def server(tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}  # fmt: skip
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "notebook", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.port_retries=0",
         "--allow-root"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((tmp_path / "jupyter.log").read_text()) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("the Jupyter server did not start in 120 s")
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run_cell(page, index: int) -> None:
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def test_widget_in_notebook(server, tmp_path):
    runs = tmp_path / "runs"
    common = ["--no-pretrained", "--model-kwargs", KW, "--data", "digits", "--limit", "3", "--batch-size", "3",
              "--device", "cpu", "--no-progress", "--out", str(runs)]  # fmt: skip
    assert main(["record", "--model", "vit_tiny_patch16_224", "--method", "tome", "topk", "--keep-rate", "0.5",
                 *common]) == 0  # fmt: skip
    paths = sorted(find_runs(runs), key=lambda p: "topk" in p.name)  # tome first
    _notebook(tmp_path / "explore.ipynb", [
        f"import tokvis\nw = tokvis.explore({[str(p) for p in paths]!r})\nw",
        'print("STATE", w.selected_panel, w.selected_token, w.block, w.image)',
        "w.block = 1",
    ])  # fmt: skip
    base, token = server
    run = tokvis.load_run(paths[0])
    trace = run.trace()
    gh, gw = run.grid_size
    with browser_page(base) as (page, console, outside):
        page.goto(f"{base}/notebooks/explore.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=300_000)
        page.wait_for_timeout(1500)  # the kernel starts
        _run_cell(page, 0)
        page.wait_for_selector(".tv-viewer canvas.tv-canvas", timeout=300_000)
        page.wait_for_function(
            "() => { const i = document.querySelector('.tv-viewer .tv-info');"
            " return i && !/loading/.test(i.textContent) }",
            timeout=300_000,
        )
        viewer = page.locator(".tv-viewer").first
        viewer.screenshot(path=str(tmp_path / "widget_opened.png"))
        # keys move the block (-1 -> 3) in the browser
        page.locator(".tv-viewer .tv-block").first.click()
        for _ in range(4):
            page.keyboard.press("ArrowRight")
        assert viewer.get_attribute("data-block") == "3"
        # click the centre of the own patch of a merged token in the first panel
        labels, kept = trace.labels(3)[0].numpy(), trace.kept(3)[0].numpy()
        sizes = np.bincount(labels[labels >= 0])
        own = next(p for p in range(run.num_patches) if kept[p] and labels[p] >= 0 and sizes[labels[p]] >= 2)
        canvas = page.locator(".tv-viewer canvas.tv-canvas").first
        bb = canvas.bounding_box()
        page.mouse.click(bb["x"] + (own % gw + 0.5) * bb["width"] / gw, bb["y"] + (own // gw + 0.5) * bb["height"] / gh)
        highlighted = page.evaluate("document.querySelector('.tv-viewer').tokvisViewer.highlighted()")
        assert highlighted[0] == np.nonzero(labels == labels[own])[0].tolist()
        viewer.screenshot(path=str(tmp_path / "widget_selected.png"))
        page.wait_for_timeout(500)  # the change reaches the kernel
        _run_cell(page, 1)
        out = page.locator(".jp-Cell").nth(1).locator(".jp-OutputArea-output")
        out.wait_for(timeout=300_000)
        state = re.search(r"STATE (-?\d+) (-?\d+) (-?\d+) (-?\d+)", out.text_content()).groups()
        assert tuple(map(int, state)) == (0, int(labels[own]), 3, 0)
        # w.block set in the kernel redraws the widget
        before = canvas_pixels(page, ".tv-viewer canvas.tv-canvas", 0)
        _run_cell(page, 2)
        page.wait_for_function("document.querySelector('.tv-viewer').dataset.block === '1'", timeout=300_000)
        assert (before != canvas_pixels(page, ".tv-viewer canvas.tv-canvas", 0)).any()
        viewer.screenshot(path=str(tmp_path / "widget_block1.png"))
    assert not outside, outside
    errors = [m for m in console if m[0] in ("pageerror", "error") and not _jupyters_own(m[1])]
    assert not errors, errors


def _jupyters_own(text: str) -> bool:
    """An error thrown inside Notebook 7's own bundles (its first stack frame in the server's /static/ or
    lab/extensions/ files; e.g. a settings schema of an unrelated installed extension), not by the widget, which
    anywidget loads from a blob: URL."""
    frames = [line.strip() for line in text.splitlines() if line.strip().startswith("at ")]
    if "blob:" in text or "createViewer" in text:
        return False
    return bool(frames) and any(k in frames[0] for k in ("/static/", "/lab/extensions/"))
