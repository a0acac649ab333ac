"""The figure scripts in benchmarks/ run end to end (tiny settings; the figures themselves are not tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import needs_offline_weights
from tests.scripts import load_benchmark

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


def test_bench_precision_has_a_row_per_configuration_and_mode():
    """The script runs end to end on the offline backbone: a row per configuration (ToMe r=16 and keep rate,
    Top-K) and mode, agreements within [0, 1], and an unpatched row per mode."""
    out = _run(
        "benchmarks/bench_precision.py", "--images", "3", "--methods", "tome", "topk", "--modes", "bf16-autocast",
        "bf16-model", "--source", "samples", "--threads", "1",
    )  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["tome"], ["topk"])]
    assert len(rows) == 6, out
    assert sum(line.startswith("unpatched") for line in out.splitlines()) == 2
    for row in rows:
        same, same_last, v_last, iou_last, err = map(float, row[-6:-1])
        assert 0 <= same <= 1 and 0 <= same_last <= 1 and 0 <= v_last <= 1 and 0 <= iou_last <= 1 and err >= 0


def test_partition_agreement_counts_relabelled_partitions_as_the_same():
    """``canonical`` renames tokens by first appearance: the same partition under other token numbers is the
    same (sklearn's adjusted Rand index is 1 exactly for those), a moved patch or a dropped one is not."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    bench_precision = load_benchmark("bench_precision")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=(50, 40))
    perm = rng.permutation(6)
    b = perm[a]  # the same partitions, other numbers
    c = a.copy()
    c[:, 0] = (c[:, 0] + 1) % 6  # patch 0 moved to another group
    d = a.copy()
    d[:, 1] = -1  # patch 1 dropped
    ca = bench_precision.canonical(a)
    for other, expect in ((b, True), (c, None), (d, False)):
        same = (ca == bench_precision.canonical(other)).all(1)
        if expect is None:  # same exactly where sklearn says the partitions are equal
            expect = np.array([adjusted_rand_score(x, y) == 1.0 for x, y in zip(a, other, strict=True)])
        assert np.array_equal(same, np.broadcast_to(expect, same.shape))
