"""Headless Chromium for the viewer tests: Debian's chromium driven by Playwright (its own download cannot work
offline), with every request outside the page's own origin refused and recorded."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or importlib.util.find_spec("playwright") is None,
    reason="needs chromium (apt-get install chromium; .ci/run installs it) and playwright (the dev extra)",
)


@contextlib.contextmanager
def browser_page(allowed_prefix: str, *, width: int = 1500, height: int = 1100):
    """A page whose requests outside ``allowed_prefix`` are aborted; yields ``(page, console, outside)``: console
    messages and page errors as ``(type, text)``, and the refused URLs."""
    from playwright.sync_api import sync_playwright

    console: list[tuple[str, str]] = []
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-proxy-server"])
        try:
            ctx = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
            page = ctx.new_page()

            def route(r):
                url = r.request.url
                if url.startswith(allowed_prefix) or url.startswith(("data:", "blob:")):
                    r.continue_()
                else:
                    outside.append(url)
                    r.abort()

            ctx.route("**/*", route)
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.append(("pageerror", f"{e.message}\n{e.stack}")))
            yield page, console, outside
        finally:
            browser.close()


def canvas_pixels(page, selector: str, index: int = 0):
    """RGBA pixels of the ``index``-th canvas matching ``selector`` as a numpy array ``[H, W, 4]``."""
    import numpy as np

    data = page.evaluate(
        """([sel, i]) => { const c = document.querySelectorAll(sel)[i];
            return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""",
        [selector, index],
    )
    w, h, px = data
    return np.asarray(px, dtype=np.uint8).reshape(h, w, 4)
