"""benchmarks/bench_ops.py counts the aten operators of every method's forward (tiny model, no weights)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tokvis

pytestmark = pytest.mark.slow  # a subprocess over every method (~15 s), like the other benchmark scripts' tests

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ops_has_a_row_per_method_with_positive_counts():
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_ops.py", "--model", "vit_tiny_patch16_224", "--img-size", "64",
         "--depth", "4", "--batch", "2", "--detail", "tome"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}  # config -> ops, kernels, unpatched, blocks, reduction ops / block, reduction kernels / block, other
    for line in res.stdout.splitlines():
        cells = line.split()
        if len(cells) > 7 and all(c.lstrip("-").replace(".", "", 1).isdigit() for c in cells[-7:]):
            rows[" ".join(cells[:-7])] = [float(c) for c in cells[-7:]]
    for method in tokvis.list_methods():
        label = next((k for k in rows if k.split()[0] == method), None)
        assert label is not None, f"no row for {method}:\n{res.stdout}"
    for label, (ops, kernels, unpatched, blocks, red_ops, red_kernels, _) in rows.items():
        assert ops >= kernels > 0 and unpatched > 0, label
        if label != "unpatched":
            assert blocks > 0 and red_ops >= red_kernels > 0, label
    assert "tome r=16" in rows and "reduction ops per reducing block" in res.stdout
