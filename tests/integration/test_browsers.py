"""The browser harness can fail: in both browsers, a page's errors, console errors and requests outside its own
files are seen (slow)."""

from __future__ import annotations

import pytest

from tests.browser import needs_browser, needs_firefox, open_page

PAGE = """<!doctype html><html><body><p id="x">hi</p><img src="https://tokvis.invalid/a.png"><script>
console.error("boom"); fetch("http://tokvis.invalid/x").catch(() => {});
setTimeout(() => { document.body.dataset.done = "1"; throw new Error("bang"); }, 10);
</script></body></html>"""


@pytest.mark.slow
@pytest.mark.parametrize("browser", [pytest.param("chromium", marks=needs_browser),
                                     pytest.param("firefox", marks=needs_firefox)])  # fmt: skip
def test_page_errors_and_outside_requests_are_seen(browser, tmp_path):
    path = tmp_path / "page.html"
    path.write_text(PAGE)
    with open_page(browser, "file://", tmp_path) as page:
        page.goto(path.as_uri())
        page.wait_for("document.body.dataset.done === '1'")
        page.wait_for("performance.now() > 0")  # one more round trip: the error thrown above is logged
    assert sorted(page.outside) == ["http://tokvis.invalid/x", "https://tokvis.invalid/a.png"]
    texts = [text for _, text in page.errors()]
    assert any("boom" in t for t in texts) and any("bang" in t for t in texts), page.console
