"""tokvis.plotting.stats, tested on the drawn artists."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from tokvis.analysis.correlation import correlate
from tokvis.plotting.stats import correlation_plot, similarity_matrix


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _pairs():
    # two images per pair; cell means: (0.9, 0.7) -> 0.8, (0.9, 0.5) -> 0.5, (0.7, 0.5) -> 0.65
    return pd.DataFrame(
        {
            "keep_rate_a": [0.9, 0.9, 0.9, 0.9, 0.7, 0.7],
            "keep_rate_b": [0.7, 0.7, 0.5, 0.5, 0.5, 0.5],
            "value": [0.7, 0.9, 0.5, 0.5, 0.6, 0.7],
        }
    )


def test_similarity_matrix_cells_and_labels():
    fig, ax = plt.subplots()
    out = similarity_matrix(_pairs(), diagonal=1.0, ax=ax)
    assert out is ax
    mat = ax.images[0].get_array()
    # categories sorted ascending: 0.5, 0.7, 0.9; rows = keep_rate_b, columns = keep_rate_a
    expect = np.array([[1.0, 0.65, 0.5], [0.65, 1.0, 0.8], [0.5, 0.8, 1.0]])
    np.testing.assert_allclose(np.ma.filled(mat, np.nan), expect)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "0.7", "0.9"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.5", "0.7", "0.9"]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["1.00", "0.65", "0.50", "0.65", "1.00", "0.80", "0.50", "0.80", "1.00"])
    assert ax.get_xlabel() == "keep_rate_a" and ax.get_ylabel() == "keep_rate_b"
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "value"  # colour bar, labelled
    fig, ax = plt.subplots()
    similarity_matrix(_pairs(), label="IoU (kept sets)", ax=ax)
    assert fig.axes[1].get_ylabel() == "IoU (kept sets)"


def test_similarity_matrix_asymmetric_and_blank_cells():
    fig, ax = plt.subplots()
    similarity_matrix(_pairs(), symmetric=False, annot=False, colorbar=False, agg="max", ax=ax)
    mat = ax.images[0].get_array()
    assert mat.mask[0, 0] and mat.mask[2, 1]  # no data, no mirroring, no diagonal
    assert mat[1, 2] == pytest.approx(0.9)  # max of the (b=0.7, a=0.9) cell
    assert not ax.texts and len(fig.axes) == 1


def test_similarity_matrix_uses_current_axes_and_validates():
    fig, ax = plt.subplots()
    assert similarity_matrix(_pairs(), colorbar=False) is ax
    with pytest.raises(ValueError, match="columns not in data"):
        similarity_matrix(_pairs(), x="method_a", y="method_b")
    with pytest.raises(ValueError, match="no rows"):
        similarity_matrix(_pairs().iloc[:0])


def test_correlation_plot_artists():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=30)
    df = pd.DataFrame({"sim": x, "gap": 1 - x + 0.1 * rng.normal(size=30), "kind": ["a", "b", "c"] * 10})
    fig, ax = plt.subplots()
    out = correlation_plot(df, x="sim", y="gap", hue="kind", n_boot=100, ax=ax)
    assert out is ax
    assert len(ax.collections) == 3  # one scatter per hue level
    assert sum(len(c.get_offsets()) for c in ax.collections) == 30
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
    (line,) = ax.lines
    slope, intercept = np.polyfit(df.sim, df.gap, 1)
    xs, ys = line.get_data()
    np.testing.assert_allclose(ys, slope * np.asarray(xs) + intercept)
    res = correlate(df.sim, df.gap, n_boot=100)
    head, how, p_line = ax.get_title().split("\n")
    assert head == f"Spearman ρ = {res['r']:.2f}, 95% bootstrap CI [{res['ci_low']:.2f}, {res['ci_high']:.2f}] (n = 30)"
    # the title says how the interval and the p-value were obtained
    p = f"p = {res['p']:.2g} (two-sided, scipy.stats.spearmanr)"
    assert how == "CI: percentile bootstrap, 100 resamples of the 30 pairs" and p_line == p
    assert ax.get_xlabel() == "sim" and ax.get_ylabel() == "gap"


def test_correlation_title_methods_levels_and_undefined():
    from tokvis.plotting.stats import correlation_title

    x, y = np.arange(10.0), np.arange(10.0) ** 2
    kendall = correlation_title(correlate(x, y, method="kendall", n_boot=50, ci=0.9), n_boot=50, ci=0.9)
    assert kendall.startswith("Kendall τb = 1.00, 90% bootstrap CI") and "scipy.stats.kendalltau" in kendall
    none = correlation_title(correlate(x, y, method="pearson", n_boot=0), n_boot=0)
    assert none.startswith("Pearson r = ") and "no interval" in none and "bootstrap" not in none
    assert "undefined (n = 2" in correlation_title(correlate([1.0, 2.0], [2.0, 1.0]), n_boot=10)


def test_correlation_plot_without_fit_or_hue():
    df = pd.DataFrame({"u": [1.0, 2.0, 3.0, 4.0], "v": [4.0, 3.0, 1.0, 2.0]})
    fig, ax = plt.subplots()
    correlation_plot(df, x="u", y="v", fit=False, annotate=False, ax=ax)
    assert not ax.lines and ax.get_title() == "" and len(ax.collections) == 1
    with pytest.raises(ValueError, match="columns not in data"):
        correlation_plot(df, x="u", y="w")
