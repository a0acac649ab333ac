"""The figure scripts in benchmarks/ run end to end (tiny settings; the figures themselves are not tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import needs_offline_weights

pytestmark = [pytest.mark.slow, needs_offline_weights]

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_fit_patterns_then_bench_methods_with_the_fitted_method(tmp_path):
    out = _run(
        "benchmarks/fit_patterns.py", "--images", "4", "--epochs", "1", "--eval-crops", "2", "--n-random", "20",
        "--methods", "dynamicvit", "sinkhorn:eps=0.1", "--save", str(tmp_path), "--out", str(tmp_path / "f.png"),
    )  # fmt: skip
    for spec in ("dynamicvit", "sinkhorn:eps=0.1"):
        for stat in ("iou", "spearman", "rollout_spearman"):
            assert any(line.split()[:2] == [spec, stat] and "random method" in line for line in out.splitlines())
    assert (tmp_path / "f.png").stat().st_size > 0
    assert (tmp_path / "sinkhorn_eps=0.1_keep0.5.safetensors").is_file()
    out = _run(
        "benchmarks/bench_methods.py", "--batch-size", "2", "--repeats", "1", "--keep-rates", "0.5",
        "--methods", "dynamicvit", "sinkhorn:eps=0.1", "topk", "--fitted", str(tmp_path),
    )  # fmt: skip
    rows = [line.split() for line in out.splitlines()]
    labels = [" ".join(r[:3]) for r in rows if len(r) > 3]
    assert "dynamicvit keep_rate=0.5 fitted" in labels and "sinkhorn:eps=0.1 keep_rate=0.5 fitted" in labels
    assert "topk keep_rate=0.5" in [" ".join(r[:2]) for r in rows]
