"""The explorer's budgets: report size and write time, widget opening on a large store, redraw time in the browser.

Run::

    python benchmarks/bench_report.py [--runs-dir DIR] [--images 12] [--big 50000] [--out DIR]
                                      [--browsers chromium firefox]

(i) ``tokvis report`` of a sweep shaped like the offline study (13 methods x 4 keep rates x 2 datasets = 104
runs of 12 images on a 16x16 patch grid, depth 12: a random-weight ViT-Ti with 14-pixel patches at 224, recorded
through ``tokvis record`` on two folders of synthetic photos; or the run stores in ``--runs-dir``): file size and
seconds to write; budget <= 5 MB and <= 60 s.
(ii) ``tokvis.explore`` on a ``--big``-image run store (one recorded batch repeated through the store writer):
seconds to open it and send the first image, and bytes per image change per trace; budget <= 2 s, <= 50 kB.
(iii) In headless Chromium and Firefox (Debian's ``chromium`` and ``firefox-esr``, driven as the tests drive them:
``tests/browser.py``), the report's viewer with 6 panels on the 16x16 grid: the redraw time of one block-slider
step, measured with ``performance.now()`` inside the page over every block, 5 sweeps; budget <= 16 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ["ats", "dpcknn", "dynamicvit", "evit", "kmedoids", "mctf", "patchmerger", "radial", "sinkhorn", "sit",
           "tome", "topk", "vomix"]  # fmt: skip
KEEP_RATES = ["0.9", "0.7", "0.5", "0.25"]
KW = '{"patch_size": 14, "depth": 12}'


def _photos(folder: Path, n: int, seed: int) -> None:
    """``n`` smooth synthetic photos (gradients and blobs) as JPEG files."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:320] / 256.0
    for i in range(n):
        img = np.zeros((256, 320, 3))
        for c in range(3):
            img[..., c] = rng.uniform(0.2, 0.8) + 0.3 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(0, 6)) * yy
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1.25), rng.uniform(0.05, 0.25)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 1, 3)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"photo{i:03d}.jpg", quality=90)


def make_sweep(root: Path, images: int) -> Path:
    """The study-shaped sweep of 104 runs under ``root/runs`` (recorded with ``tokvis record``)."""
    from tokvis.cli import main

    runs = root / "runs"
    for d, seed in (("photos_a", 0), ("photos_b", 1)):
        _photos(root / d, images, seed)
        args = ["record", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", KW,
                "--data", str(root / d), "--method", *METHODS, "--keep-rate", *KEEP_RATES,
                "--batch-size", str(images), "--device", "cpu", "--no-progress", "--out", str(runs)]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(args) == 0
    return runs


def bench_report(runs: Path, out: Path, images: int) -> Path:
    from tokvis.cli import main
    from tokvis.store import find_runs

    n = len(find_runs(runs))
    import os

    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(runs), "--out", str(out), "--images", str(images)]) == 0
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = out.stat().st_size / 1e6
    print(
        f"report: {n} runs x {images} images: {size:.2f} MB (budget 5), written in {dt:.1f} s (budget 60; "
        f"{cpu:.1f} s of CPU time, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    return out


def bench_open(runs: Path, tmp: Path, n: int) -> None:
    import importlib.util
    import sys

    import tokvis
    from tokvis.store import RunSpec, find_runs

    spec_ = importlib.util.spec_from_file_location("bench_record", Path(__file__).with_name("bench_record.py"))
    bench_record = importlib.util.module_from_spec(spec_)
    sys.modules["bench_record"] = bench_record
    spec_.loader.exec_module(bench_record)

    src = tokvis.load_run(next(p for p in find_runs(runs) if "__tome__keep0.5" in p.name))
    trace = src.trace()
    spec = RunSpec(backbone="vit_tiny_patch16_224", method="tome", dataset="synthetic", keep_rate=0.5,
                   shard_size=1000, pretrained=False, model_kwargs={"patch_size": 14, "depth": 12})  # fmt: skip
    big = bench_record._synthesize(tmp / "big", trace, [f"img{i:06d}" for i in range(n)], spec)
    times, sizes = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        w = tokvis.explore(big)
        _, buffers = w.payload(n // 2)
        times.append(time.perf_counter() - t0)
        sizes.append(sum(len(b) for b in buffers))
    for i in (1, 777, n - 1):
        sizes.append(sum(len(b) for b in w.payload(i)[1]))
    print(f"explore: open a {n}-image store and send one image: {statistics.median(times):.3f} s median of 3 "
          f"(max {max(times):.3f}; budget 2); {max(sizes) / 1000:.1f} kB per image change per trace "
          "(budget 50)")  # fmt: skip


def bench_redraw(report: Path, shots: Path | None, browser: str = "chromium") -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' browser harness
    from tests.browser import CHROMIUM, FIREFOX, open_page

    if (CHROMIUM if browser == "chromium" else FIREFOX) is None:
        print(f"redraw in {browser}: skipped, the browser is not installed")
        return
    with tempfile.TemporaryDirectory() as work:
        with open_page(browser, "file://", Path(work), width=1900, height=1200) as page:
            page.goto(report.as_uri())
            page.evaluate("window.tokvisReady")
            res = page.evaluate(
                """(() => { const v = window.tokvisViewers[0]; const n = v.canvases().length; const ms = [];
                    const depth = parseInt(document.querySelector('#tv-viewer-0 .tv-slider').max, 10) + 1;
                    for (let sweep = 0; sweep < 6; sweep++) for (let b = -1; b < depth; b++) {
                        const t0 = performance.now(); v.setState({block: b}); const dt = performance.now() - t0;
                        if (sweep > 0) ms.push(dt); }
                    ms.sort((a, b) => a - b);
                    return {panels: n, median: ms[ms.length >> 1], p95: ms[Math.floor(ms.length * 0.95)],
                            max: ms[ms.length - 1], steps: ms.length}; })()"""
            )
            if shots is not None:
                page.screenshot(shots / f"bench_6_panels_{browser}.png", "#tv-viewer-0")
    print(f"redraw per block step in {browser}, {res['panels']} panels on 16x16: median {res['median']:.2f} ms, "
          f"p95 {res['p95']:.2f} ms, max {res['max']:.2f} ms over {res['steps']} steps (budget 16)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default=None, help="existing run stores (default: record the study-shaped sweep)")
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--big", type=int, default=50_000, help="images in the large store of the opening benchmark")
    p.add_argument("--out", default=None, help="keep the report (and a screenshot) in this folder")
    p.add_argument("--browsers", nargs="+", default=["chromium", "firefox"], choices=["chromium", "firefox"],
                   help="measure the redraw in these headless browsers (Debian's chromium, firefox-esr)")  # fmt: skip
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_report_"))
    try:
        t0 = time.perf_counter()
        runs = Path(args.runs_dir) if args.runs_dir else make_sweep(tmp, args.images)
        if not args.runs_dir:
            print(f"recorded the 104-run sweep in {time.perf_counter() - t0:.0f} s")
        out_dir = Path(args.out) if args.out else tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        report = bench_report(runs, out_dir / "report.html", args.images)
        bench_open(runs, tmp, args.big)
        for browser in args.browsers:
            bench_redraw(report, out_dir if args.out else None, browser)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
