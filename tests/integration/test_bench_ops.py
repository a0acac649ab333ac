"""benchmarks/bench_ops.py counts the aten operators of every method's forward (tiny model, no weights)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokvis
from tests.scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess over every method (~15 s), like the other benchmark scripts' tests
def test_bench_ops_has_a_row_per_method_with_positive_counts():
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_ops.py", "--model", "vit_tiny_patch16_224", "--img-size", "64",
         "--depth", "4", "--batch", "2", "--detail", "tome"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}  # config -> ops, kernels, unpatched, blocks, reduction ops and kernels / block, other, MB, red MB/blk
    for line in res.stdout.splitlines():
        cells = line.split()
        if len(cells) > 9 and all(c.lstrip("-").replace(".", "", 1).isdigit() for c in cells[-9:]):
            rows[" ".join(cells[:-9])] = [float(c) for c in cells[-9:]]
    for method in tokvis.list_methods():
        label = next((k for k in rows if k.split()[0] == method), None)
        assert label is not None, f"no row for {method}:\n{res.stdout}"
    for label, (ops, kernels, unpatched, blocks, red_ops, red_kernels, _, mb, red_mb) in rows.items():
        assert ops >= kernels > 0 and unpatched > 0 and mb > 0, label
        if label != "unpatched":
            assert blocks > 0 and red_ops >= red_kernels > 0 and mb > red_mb * blocks > 0, label
    assert "tome r=16" in rows and "reduction ops per reducing block" in res.stdout
    assert " MB) " in res.stdout  # the detail gives each operator's traffic


def test_traffic_counts_distinct_elements_read_and_written():
    """The traffic proxy against sums written out by hand: an expanded index is read once, an in-place kernel
    reads and writes its target, an ``out=`` tensor is only written, a view moves nothing."""
    bench_ops = load_benchmark("bench_ops")
    buf = torch.zeros(2, 5, 3)  # 30 float32
    idx = torch.zeros(2, 4, 1, dtype=torch.long)  # 8 int64, expanded to [2, 4, 3]
    src = torch.ones(2, 4, 3, dtype=torch.float16)  # 24 half
    with bench_ops.OpCounter() as c:
        buf.scatter_add_(1, idx.expand(2, 4, 3), src.float())
    # _to_copy: 24 * 2 read + 24 * 4 written; scatter_add_: 30 * 4 read + 8 * 8 + 24 * 4 read + 30 * 4 written
    assert c.bytes == (48 + 96) + (120 + 64 + 96 + 120)
    assert bench_ops.footprint(idx.expand(2, 4, 3)) == 64
    with bench_ops.OpCounter() as c:
        torch.add(src, src, out=torch.empty(2, 4, 3, dtype=torch.float16))
        src[:, 1:].transpose(1, 2)
    assert c.bytes == 48 + 48 + 48  # two reads and one write; the views move nothing


@pytest.mark.slow
def test_bench_host_prints_a_row_per_configuration():
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_host.py", "--depth", "2", "--img-size", "64", "--repeats", "1",
         "--warmup", "1", "--methods", "tome", "topk"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("config"))
    rows = {" ".join(line.split()[:-4]): [float(c) for c in line.split()[-4:]] for line in lines[head + 1 :]
            if line and not line.startswith("warning")}  # fmt: skip
    assert set(rows) == {"unpatched", "tome r=16", "tome keep_rate=0.5", "topk keep_rate=0.5"}, res.stdout
    assert rows["unpatched"][1] == 0.0 and all(r[0] > 0 for r in rows.values())
    assert all(r[2] > 0 for k, r in rows.items() if k != "unpatched")  # recorded forwards timed
