"""Headless browsers for the viewer tests, with every request outside the page's own files refused and recorded:
Debian's chromium driven by Playwright (its own download cannot work offline), and Debian's firefox-esr driven
through Marionette (``open_page`` gives both one API, `Page`)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

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


# ------------------------------------------------------------------------------------------------------------------
# One page API for both browsers: the report test is written once against `Page` and runs in Chromium (Playwright)
# and in Firefox (Debian's firefox-esr driven through its built-in Marionette protocol; Playwright needs its own
# patched Firefox, which cannot be downloaded here).

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")

needs_firefox = pytest.mark.skipif(
    FIREFOX is None or importlib.util.find_spec("marionette_driver") is None,
    reason="needs firefox (apt-get install firefox-esr; .ci/run installs it) and marionette_driver (the dev extra)",
)

# WebDriver's code points for the keys the viewer reads
_KEYS = {"ArrowLeft": "\ue012", "ArrowUp": "\ue013", "ArrowRight": "\ue014", "ArrowDown": "\ue015"}


class Page:
    """The slice of a browser page the viewer tests use; ``console`` collects ``(type, text)`` messages and page
    errors, ``outside`` the refused requests outside the allowed prefix (Firefox fills both as its `open_page`
    block ends; read them after it)."""

    console: list[tuple[str, str]]
    outside: list[str]

    def goto(self, url: str) -> None:
        raise NotImplementedError

    def evaluate(self, expression: str, arg=None):
        """Value of a JS expression, awaited if a promise; a function is called (on ``arg`` if given)."""
        raise NotImplementedError

    def press(self, key: str) -> None:
        raise NotImplementedError

    def move(self, x: float, y: float) -> None:
        """Move the mouse to viewport coordinates (CSS pixels)."""
        raise NotImplementedError

    def click(self, x: float, y: float) -> None:
        raise NotImplementedError

    def screenshot(self, path, selector: str | None = None) -> None:
        """Save a PNG of the viewport, or of the first element matching ``selector``."""
        raise NotImplementedError

    def download(self, selector: str, path) -> None:
        """Click the first element matching ``selector`` and save the file it downloads to ``path``."""
        raise NotImplementedError

    # shared by both browsers: plain DOM through evaluate
    def wait_for(self, expression: str, timeout: float = 60.0) -> None:
        """Poll until the JS expression is truthy."""
        end = time.monotonic() + timeout
        while not self.evaluate(f"!!({expression})"):
            if time.monotonic() > end:
                raise TimeoutError(f"waited {timeout:.0f} s for {expression}")
            time.sleep(0.05)

    def box(self, selector: str, index: int = 0) -> dict:
        """Bounding box in viewport coordinates of the ``index``-th element matching ``selector``."""
        return self.evaluate(
            """([sel, i]) => { const r = document.querySelectorAll(sel)[i].getBoundingClientRect();
                return {x: r.x, y: r.y, width: r.width, height: r.height}; }""",
            [selector, index],
        )

    def scroll_to(self, selector: str, index: int = 0) -> None:
        self.evaluate("([sel, i]) => document.querySelectorAll(sel)[i].scrollIntoView({block: 'center'})",
                      [selector, index])  # fmt: skip

    def focus(self, selector: str) -> None:
        self.evaluate("(sel) => document.querySelector(sel).focus()", selector)

    def click_on(self, selector: str, index: int = 0) -> None:
        """A real mouse click on the centre of the ``index``-th element matching ``selector``."""
        self.scroll_to(selector, index)
        b = self.box(selector, index)
        self.click(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2)

    def attribute(self, selector: str, name: str):
        return self.evaluate("([sel, a]) => document.querySelector(sel).getAttribute(a)", [selector, name])

    def select(self, selector: str, value: str) -> None:
        """Choose ``value`` in the first ``<select>`` matching ``selector``, as a user's choice does (input, change)."""
        self.evaluate(
            """([sel, v]) => { const s = document.querySelector(sel); s.value = v;
                s.dispatchEvent(new Event('input', {bubbles: true}));
                s.dispatchEvent(new Event('change', {bubbles: true})); }""",
            [selector, value],
        )

    def errors(self) -> list[tuple[str, str]]:
        return [m for m in self.console if m[0] in ("error", "pageerror")]


class _PlaywrightPage(Page):
    def __init__(self, page, console, outside):
        self.page, self.console, self.outside = page, console, outside

    def goto(self, url):
        self.page.goto(url)

    def evaluate(self, expression, arg=None):
        return self.page.evaluate(expression) if arg is None else self.page.evaluate(expression, arg)

    def press(self, key):
        self.page.keyboard.press(key)

    def move(self, x, y):
        self.page.mouse.move(x, y)

    def click(self, x, y):
        self.page.mouse.click(x, y)

    def screenshot(self, path, selector=None):
        (self.page.locator(selector).first if selector else self.page).screenshot(path=str(path))

    def download(self, selector, path):
        with self.page.expect_download() as dl:
            self.page.locator(selector).first.click()
        dl.value.save_as(path)


class _MarionettePage(Page):
    def __init__(self, client, downloads: Path):
        self.m, self.downloads, self.console, self.outside = client, downloads, [], []

    def goto(self, url):
        self.m.navigate(url)

    def evaluate(self, expression, arg=None):
        # sandbox=None: in the page's own scope (a sandbox sees the page's window through an Xray, without the
        # globals its scripts set, such as window.tokvisViewers); a returned promise is awaited
        if arg is None:  # as in Playwright, a function is called
            return self.m.execute_script(f"const v = ({expression}); return typeof v === 'function' ? v() : v;",
                                         sandbox=None)  # fmt: skip
        return self.m.execute_script(f"return ({expression})(arguments[0]);", script_args=[arg], sandbox=None)

    def _actions(self, kind, steps, **params):
        seq = {"type": kind, "id": kind, "actions": steps}
        if params:
            seq["parameters"] = params
        self.m.actions.perform([seq])

    def press(self, key):
        k = _KEYS.get(key, key)
        self._actions("key", [{"type": "keyDown", "value": k}, {"type": "keyUp", "value": k}])

    def move(self, x, y):
        self._actions("pointer", [{"type": "pointerMove", "x": round(x), "y": round(y)}], pointerType="mouse")

    def click(self, x, y):
        self._actions("pointer", [{"type": "pointerMove", "x": round(x), "y": round(y)},
                                  {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}],
                      pointerType="mouse")  # fmt: skip

    def screenshot(self, path, selector=None):
        from marionette_driver.by import By

        element = self.m.find_element(By.CSS_SELECTOR, selector) if selector else None
        Path(path).write_bytes(self.m.screenshot(element=element, format="binary", full=False))

    def download(self, selector, path, timeout: float = 30.0):
        before = set(self.downloads.iterdir())
        self.click_on(selector)
        end = time.monotonic() + timeout
        while True:  # the file is complete once no .part file is left beside it
            new = set(self.downloads.iterdir()) - before
            done = [p for p in new if p.suffix != ".part"]
            if done and not any(p.suffix == ".part" for p in new):
                shutil.copyfile(done[0], path)
                return
            if time.monotonic() > end:
                raise TimeoutError(f"no download in {timeout:.0f} s after clicking {selector}")
            time.sleep(0.05)


# privileged scripts. In the parent process (chrome context): refuse every http(s) request outside the allowed
# prefix (arguments[0]), recording those a page made. In the page's process (a system sandbox): the page's errors
# and console messages, which Firefox keeps per window.
_FIREFOX_GUARD = """
  const seen = [], allowed = arguments[0];
  Services.obs.addObserver({ observe(subject) {
    const ch = subject.QueryInterface(Ci.nsIHttpChannel), url = ch.URI.spec;
    if (url.startsWith(allowed)) return;
    const p = ch.loadInfo && ch.loadInfo.triggeringPrincipal;
    if (p && !p.isSystemPrincipal) seen.push(url);
    ch.cancel(Cr.NS_ERROR_ABORT);
  } }, "http-on-modify-request");
  window.tokvisOutside = seen;
"""
_FIREFOX_OUTSIDE = "return Array.from(window.tokvisOutside || []);"
_FIREFOX_CONSOLE = """
  const id = window.windowGlobalChild.innerWindowId, out = [];
  for (const m of Services.console.getMessageArray() || []) {
    if (!(m instanceof Ci.nsIScriptError) || m.innerWindowID !== id) continue;
    const quiet = m.flags & (Ci.nsIScriptError.warningFlag | Ci.nsIScriptError.infoFlag);
    out.push([quiet ? "warning" : "pageerror", `${m.errorMessage} (${m.sourceName}:${m.lineNumber})`]);
  }
  const storage = Cc["@mozilla.org/consoleAPI-storage;1"].getService(Ci.nsIConsoleAPIStorage);
  for (const e of storage.getEvents()) {
    if (e.innerID === id) out.push([e.level, Array.from(e.arguments || [], String).join(" ")]);
  }
  return out;
"""


def _firefox_prefs(downloads: Path) -> dict:
    return {
        "marionette.port": 0,  # a free port, written to the profile's MarionetteActivePort
        "browser.shell.checkDefaultBrowser": False,
        "browser.startup.homepage_override.mstone": "ignore",
        "browser.startup.page": 0,
        "datareporting.policy.dataSubmissionEnabled": False,
        "datareporting.healthreport.uploadEnabled": False,
        "toolkit.telemetry.reportingpolicy.firstRun": False,
        "app.update.disabledForTesting": True,
        "app.normandy.enabled": False,
        "browser.safebrowsing.update.enabled": False,
        "network.captive-portal-service.enabled": False,
        "network.connectivity-service.enabled": False,
        "extensions.update.enabled": False,
        # nothing leaves the machine, whoever asks: every proxy is a closed port
        "network.proxy.type": 1,
        "network.proxy.http": "127.0.0.1",
        "network.proxy.http_port": 9,
        "network.proxy.ssl": "127.0.0.1",
        "network.proxy.ssl_port": 9,
        "network.proxy.no_proxies_on": "",
        # downloads go to a folder, unasked
        "browser.download.folderList": 2,
        "browser.download.dir": str(downloads),
        "browser.download.useDownloadDir": True,
        "browser.download.always_ask_before_handling_new_types": False,
        "browser.download.alwaysOpenPanel": False,
        "browser.download.start_downloads_in_tmp_dir": False,
    }


@contextlib.contextmanager
def _firefox_page(allowed_prefix: str, workdir: Path, width: int, height: int, timeout: float = 120.0):
    import warnings

    with warnings.catch_warnings():  # its dependencies (mozinfo, mozrunner) import deprecated modules
        warnings.simplefilter("ignore", DeprecationWarning)
        from marionette_driver.marionette import Marionette

    profile, downloads = workdir / "firefox-profile", workdir / "firefox-downloads"
    profile.mkdir(parents=True)
    downloads.mkdir()
    (profile / "user.js").write_text(
        "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in _firefox_prefs(downloads).items())
    )
    log = open(workdir / "firefox.log", "w")
    env = {**os.environ, "MOZ_HEADLESS": "1", "MOZ_REMOTE_ALLOW_SYSTEM_ACCESS": "1"}  # the privileged scripts
    proc = subprocess.Popen(
        [FIREFOX, "--headless", "--marionette", "--no-remote", "--profile", str(profile)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    client = None
    try:
        port_file, end = profile / "MarionetteActivePort", time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"firefox did not start Marionette (see {workdir / 'firefox.log'})")
            time.sleep(0.1)
        client = Marionette(host="127.0.0.1", port=int(port_file.read_text()), startup_timeout=int(timeout))
        client.start_session()
        client.set_window_rect(width=width, height=height)
        with client.using_context(client.CONTEXT_CHROME):
            client.execute_script(_FIREFOX_GUARD, script_args=[allowed_prefix])
        page = _MarionettePage(client, downloads)
        yield page
        # the body ran to its end: what the page logged and asked for (read before the page goes)
        page.console.extend(map(tuple, client.execute_script(_FIREFOX_CONSOLE, sandbox="system")))
        with client.using_context(client.CONTEXT_CHROME):
            page.outside.extend(client.execute_script(_FIREFOX_OUTSIDE))
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.delete_session()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def open_page(browser: str, allowed_prefix: str, workdir: Path, *, width: int = 1500, height: int = 1100):
    """A `Page` in headless ``"chromium"`` or ``"firefox"``; requests outside ``allowed_prefix`` are refused and
    recorded in ``page.outside``. Firefox keeps its profile, log and downloads in ``workdir``."""
    if browser == "chromium":
        with browser_page(allowed_prefix, width=width, height=height) as (page, console, outside):
            yield _PlaywrightPage(page, console, outside)
    elif browser == "firefox":
        with _firefox_page(allowed_prefix, Path(workdir), width, height) as page:
            yield page
    else:
        raise ValueError(f"unknown browser {browser!r}")
