"""tokvis.analysis.correlation: coefficients, p-values and bootstrap intervals against scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tokvis.analysis import correlation as C
from tokvis.errors import TraceMismatchError

SEED = 5
SCIPY = {"spearman": stats.spearmanr, "kendall": stats.kendalltau, "pearson": stats.pearsonr}


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=40)
    y = 0.6 * x + rng.normal(size=40)
    y[[3, 17]] = np.nan
    x[25] = np.inf
    return x, y


@pytest.mark.parametrize("method", C.METHODS)
def test_coefficient_and_p_value_match_scipy_after_pairwise_deletion(xy, method):
    x, y = xy
    res = C.correlate(x, y, method=method)
    keep = np.isfinite(x) & np.isfinite(y)
    ref = SCIPY[method](x[keep], y[keep])
    assert res["n"] == 37 and res["method"] == method
    assert res["r"] == pytest.approx(ref.statistic, rel=1e-12)
    assert res["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert res["ci_low"] < res["r"] < res["ci_high"]
    assert {type(v) for k, v in res.items() if k not in ("n", "method")} == {float}
    assert type(res["n"]) is int


@pytest.mark.parametrize("method", C.METHODS)
def test_vectorised_bootstrap_matches_a_loop_over_resamples(xy, method):
    x, y = xy
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n_boot, ci = 300, 0.9
    res = C.correlate(x, y, method=method, n_boot=n_boot, ci=ci, seed=123)
    idx = np.random.default_rng(123).integers(0, x.size, (n_boot, x.size))  # same draws
    boot = np.array([SCIPY[method](x[i], y[i]).statistic for i in idx])
    low, high = np.quantile(boot, [0.05, 0.95])
    assert res["ci_low"] == pytest.approx(low, rel=1e-10)
    assert res["ci_high"] == pytest.approx(high, rel=1e-10)


def test_interval_close_to_scipy_bootstrap(xy):
    x, y = xy
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    res = C.correlate(x, y, method="pearson", n_boot=2000, seed=1)
    ref = stats.bootstrap(
        (x, y),
        lambda a, b: stats.pearsonr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=2000,
        method="percentile",
        random_state=2,
    ).confidence_interval
    # different random draws: agreement up to Monte-Carlo error
    assert res["ci_low"] == pytest.approx(ref.low, abs=0.05)
    assert res["ci_high"] == pytest.approx(ref.high, abs=0.05)


def test_kendall_on_large_samples_uses_the_scipy_path():
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=C._KENDALL_PAIRWISE_MAX_N + 50)
    y = x + rng.normal(size=x.size)
    res = C.correlate(x, y, method="kendall", n_boot=20, seed=3)
    idx = np.random.default_rng(3).integers(0, x.size, (20, x.size))
    boot = [stats.kendalltau(x[i], y[i]).statistic for i in idx]
    assert res["ci_low"] == pytest.approx(np.quantile(boot, 0.025), rel=1e-10)


def test_seed_makes_intervals_reproducible(xy):
    x, y = xy
    a = C.correlate(x, y, n_boot=200, seed=9)
    assert a == C.correlate(x, y, n_boot=200, seed=9)
    assert a["ci_low"] != C.correlate(x, y, n_boot=200, seed=10)["ci_low"]


def test_undefined_cases_give_nan_not_errors():
    res = C.correlate([1.0, 2.0], [3.0, 1.0])
    assert res["n"] == 2 and np.isnan(res["r"]) and np.isnan(res["p"]) and np.isnan(res["ci_low"])
    res = C.correlate([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], method="pearson")
    assert res["n"] == 4 and np.isnan(res["r"])
    res = C.correlate([np.nan] * 5, np.arange(5.0))
    assert res["n"] == 0 and np.isnan(res["r"])
    res = C.correlate(np.arange(10.0), np.arange(10.0) ** 2, n_boot=0)
    assert res["r"] == pytest.approx(1.0) and np.isnan(res["ci_low"]) and np.isnan(res["ci_high"])


def test_perfect_and_symmetric():
    x = np.arange(12.0)
    for method in C.METHODS:
        res = C.correlate(x, 2 * x + 1, method=method, n_boot=50)
        assert res["r"] == pytest.approx(1.0) and res["ci_low"] == pytest.approx(1.0)
        rng = np.random.default_rng(SEED)
        a, b = rng.normal(size=15), rng.normal(size=15)
        ab, ba = C.correlate(a, b, method=method), C.correlate(b, a, method=method)
        assert ab["r"] == pytest.approx(ba["r"]) and ab["ci_low"] == pytest.approx(ba["ci_low"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"x": [1, 2, 3], "y": [1, 2]}, TraceMismatchError, r"3 vs 2"),
        ({"x": [[1, 2]], "y": [[1, 2]]}, ValueError, r"x must be 1-D"),
        ({"x": ["a", "b"], "y": [1, 2]}, ValueError, r"x must be numeric"),
        ({"x": [1, 2], "y": [1, 2], "method": "kendal"}, ValueError, r"method must be one of"),
        ({"x": [1, 2], "y": [1, 2], "n_boot": -1}, ValueError, r"n_boot"),
        ({"x": [1, 2], "y": [1, 2], "ci": 95}, ValueError, r"ci must be a number in"),
    ],
)
def test_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        C.correlate(**kwargs)


# --------------------------------------------------------------------------------------------
# tidy tables
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(SEED)
    n = 30
    df = pd.DataFrame(
        {
            "backbone": np.repeat(["deit_s", "deit_b"], n // 2),
            "layer": np.tile([3, 6, 9], n // 3),
            "acc_diff": rng.normal(size=n),
        }
    )
    df["iou"] = df["acc_diff"] + rng.normal(size=n)
    df["v_measure"] = rng.normal(size=n)
    df.loc[4, "iou"] = np.nan
    return df


def test_correlation_table_rows(frame):
    table = C.correlation_table(frame, x="acc_diff", y=["iou", "v_measure"], method=["spearman", "pearson"], n_boot=100)
    assert list(table.columns) == ["x", "y", "correlation", "r", "p", "ci_low", "ci_high", "n"]
    assert len(table) == 4
    assert table["y"].tolist() == ["iou", "iou", "v_measure", "v_measure"]
    row = table[(table.y == "iou") & (table.correlation == "spearman")].iloc[0]
    ref = C.correlate(frame["acc_diff"], frame["iou"], method="spearman", n_boot=100)
    assert row["r"] == ref["r"] and row["ci_low"] == ref["ci_low"] and row["n"] == 29


def test_correlation_table_by_groups(frame):
    table = C.correlation_table(frame, x="acc_diff", y="iou", by=["backbone", "layer"], n_boot=50)
    assert list(table.columns[:2]) == ["backbone", "layer"]
    assert len(table) == 6
    assert table[["backbone", "layer"]].values.tolist() == sorted(table[["backbone", "layer"]].values.tolist())
    part = frame[(frame.backbone == "deit_b") & (frame.layer == 6)]
    ref = C.correlate(part["acc_diff"], part["iou"], n_boot=50)
    row = table[(table.backbone == "deit_b") & (table.layer == 6)].iloc[0]
    assert row["r"] == pytest.approx(ref["r"]) and row["n"] == ref["n"]
    one = C.correlation_table(frame, x="acc_diff", y="iou", by="backbone", n_boot=0)
    assert one["backbone"].tolist() == ["deit_b", "deit_s"]


def test_correlation_table_accepts_nullable_columns(frame):
    df = frame.astype({"iou": "Float64"})
    df.loc[7, "iou"] = pd.NA
    table = C.correlation_table(df, x="acc_diff", y="iou", n_boot=0)
    assert table["n"].iloc[0] == 28


def test_correlation_table_validation(frame):
    with pytest.raises(ValueError, match=r"columns not in df: \['accuracy'\]"):
        C.correlation_table(frame, x="accuracy", y="iou")
    with pytest.raises(ValueError, match="method must be one of"):
        C.correlation_table(frame, x="acc_diff", y="iou", method=["spearman", "rank"])
    with pytest.raises(ValueError, match="DataFrame"):
        C.correlation_table({"a": [1]}, x="a", y="a")


def test_correlation_table_keeps_a_method_grouping_column(frame):
    df = frame.assign(method=np.where(np.arange(len(frame)) % 2, "tome", "topk"))
    table = C.correlation_table(df, x="acc_diff", y="iou", by="method", method=["spearman", "pearson"], n_boot=0)
    assert table["method"].tolist() == ["tome", "tome", "topk", "topk"]
    assert table["correlation"].tolist() == ["spearman", "pearson"] * 2
    with pytest.raises(ValueError, match="clash"):
        C.correlation_table(df.assign(n=1), x="acc_diff", y="iou", by="n")
