"""tokvis.plotting.maps: split-half reliability (against a loop reference) and the drawn map artists."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from tokvis.errors import DataError, TraceMismatchError
from tokvis.plotting.maps import (
    DEPTH_LABEL,
    global_map,
    global_map_grid,
    map_correlation_matrix,
    split_half_reliability,
)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _values(n=40, p=36, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    signal = np.linspace(0, 3, p)
    return signal + noise * rng.normal(size=(n, p))


def test_split_half_reliability_matches_a_loop_reference():
    v = _values(n=11)
    got = split_half_reliability(v, n_splits=25, seed=3)
    rng = np.random.default_rng(3)
    perms = np.argsort(rng.random((25, 11)), axis=1)
    rs = [np.corrcoef(v[p[:5]].mean(0), v[p[5:10]].mean(0))[0, 1] for p in perms]
    assert got["r_half"] == pytest.approx(np.mean(rs))
    assert got["r"] == pytest.approx(np.mean([2 * r / (1 + r) for r in rs]))
    assert got["n_images"] == 11 and got["n_splits"] == 25 and got["spearman_brown"]
    plain = split_half_reliability(v, n_splits=25, seed=3, spearman_brown=False)
    assert plain["r"] == pytest.approx(plain["r_half"]) and plain["r"] < got["r"]


def test_split_half_reliability_by_groups_matches_a_loop_reference():
    """Whole groups on each side of a split: a plain loop over groups is the second path."""
    v = _values(n=13)
    groups = ["p3", "p1", "p1", "p2", "p3", "p0", "p2", "p4", "p4", "p1", "p0", "p3", "p2"]
    got = split_half_reliability(v, n_splits=30, seed=5, groups=groups)
    names = sorted(set(groups))  # the order np.unique gives
    rng = np.random.default_rng(5)
    perms = np.argsort(rng.random((30, len(names))), axis=1)
    rs = []
    for p in perms:
        left = [i for i, g in enumerate(groups) if g in {names[k] for k in p[:2]}]
        right = [i for i, g in enumerate(groups) if g in {names[k] for k in p[2:4]}]
        assert not set(left) & set(right)
        rs.append(np.corrcoef(v[left].mean(0), v[right].mean(0))[0, 1])
    assert got["r_half"] == pytest.approx(np.mean(rs))
    assert got["r"] == pytest.approx(np.mean([2 * r / (1 + r) for r in rs]))
    assert got["n_groups"] == 5 and got["n_images"] == 13


def test_split_half_reliability_by_groups_is_lower_when_groups_share_content():
    """Crops of one photo share content: random halves overstate the reliability, halves of photos do not."""
    rng = np.random.default_rng(0)
    photos = rng.normal(size=(8, 36))  # each photo its own map, no common signal
    v = np.repeat(photos, 10, axis=0) + 0.1 * rng.normal(size=(80, 36))
    groups = np.repeat(np.arange(8), 10)
    assert split_half_reliability(v)["r"] > 0.9
    assert abs(split_half_reliability(v, groups=groups)["r"]) < 0.5
    singletons = split_half_reliability(v, groups=np.arange(80), n_splits=400)["r"]
    assert singletons == pytest.approx(split_half_reliability(v, n_splits=400)["r"], abs=0.02)


def test_split_half_reliability_orders_signal_and_noise():
    clean = split_half_reliability(_values(noise=0.1))["r"]
    noisy = split_half_reliability(_values(noise=30.0))["r"]
    assert clean > 0.99 and abs(noisy) < 0.5


def test_split_half_reliability_reads_depth_of_a_trace_like_object():
    v = _values(n=6)

    class Run:
        def depth(self):
            return v

    assert split_half_reliability(Run()) == split_half_reliability(v)


def test_split_half_reliability_bad_inputs():
    with pytest.raises(DataError, match="at least 2 images"):
        split_half_reliability(np.zeros((1, 4)))
    with pytest.raises(DataError, match="num_images, num_patches"):
        split_half_reliability(np.zeros(4))
    with pytest.raises(DataError, match="n_splits"):
        split_half_reliability(np.zeros((4, 4)), n_splits=0)
    with pytest.raises(DataError, match="one label per image"):
        split_half_reliability(np.zeros((4, 4)), groups=[0, 1])
    with pytest.raises(DataError, match="at least 2 groups"):
        split_half_reliability(np.zeros((4, 4)), groups=[0, 0, 0, 0])
    constant = split_half_reliability(np.ones((4, 4)))
    assert np.isnan(constant["r"]) and constant["n_splits"] == 0


def test_global_map_title_colorbar_and_values():
    m = np.arange(12.0).reshape(3, 4)
    fig, ax = plt.subplots()
    assert global_map(m, ax=ax, title="topk", reliability=0.876) is ax
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), m)
    assert ax.get_title() == "topk\nsplit-half r = 0.88"
    (cbar_ax,) = [a for a in fig.axes if a is not ax]
    assert cbar_ax.get_ylabel() == DEPTH_LABEL == "mean depth (block)"
    with pytest.raises(DataError, match="2-D"):
        global_map(np.zeros(4))


def test_global_map_grid_shares_one_labelled_colorbar():
    maps = {"topk": np.full((2, 2), 3.0), "tome": np.arange(4.0).reshape(2, 2) + 5, "evit": np.ones((2, 2))}
    fig = global_map_grid(maps, reliability={"topk": 0.5, "tome": 0.25}, ncols=2, suptitle="keep 0.5")
    panels = [a for a in fig.axes if a.get_images()]
    assert [a.get_title().split("\n")[0] for a in panels] == ["topk", "tome", "evit"]
    assert panels[0].get_title().endswith("split-half r = 0.50") and "split-half" not in panels[2].get_title()
    assert {a.get_images()[0].get_clim() for a in panels} == {(1.0, 8.0)}  # one colour scale
    cbars = [a for a in fig.axes if a.get_ylabel() == DEPTH_LABEL]
    assert len(cbars) == 1
    assert sum(not a.get_visible() for a in fig.axes) == 1  # the 4th cell of the 2x2 grid is hidden
    with pytest.raises(DataError, match="empty"):
        global_map_grid({})


def test_map_correlation_matrix_cells_and_diagonal():
    df = pd.DataFrame({"method_a": ["evit", "evit", "tome"], "method_b": ["tome", "topk", "topk"],
                       "value": [0.2, 0.9, -0.4]})  # fmt: skip
    fig, ax = plt.subplots()
    assert map_correlation_matrix(df, reliability={"evit": 0.8, "topk": 0.95}, ax=ax) is ax
    mat = ax.get_images()[0].get_array()
    expect = np.array([[0.8, 0.2, 0.9], [0.2, np.nan, -0.4], [0.9, -0.4, 0.95]])
    np.testing.assert_allclose(np.ma.filled(mat, np.nan), expect)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["evit", "tome", "topk"]
    italic = sorted(t.get_text() for t in ax.texts if t.get_fontstyle() == "italic")
    assert italic == ["0.80", "0.95"] and "split-half reliability" in ax.get_title()
    assert ax.get_images()[0].get_clim() == (-1.0, 1.0)
    assert any(a.get_ylabel() == "PCC of mean depth maps" for a in fig.axes)


def test_map_correlation_matrix_bad_inputs():
    with pytest.raises(DataError, match="no rows"):
        map_correlation_matrix(pd.DataFrame({"method_a": [], "method_b": [], "value": []}))
    with pytest.raises(DataError, match="columns not in data"):
        map_correlation_matrix(pd.DataFrame({"a": [1]}))
    with pytest.raises(TraceMismatchError, match="both named 'topk'"):
        map_correlation_matrix(pd.DataFrame({"method_a": ["topk"], "method_b": ["topk"], "value": [1.0]}))


def test_global_map_note_under_the_reliability():
    """ToMe's stripes get their explanation in the panel (tokvis figures adds it for official-split ToMe runs)."""
    from types import SimpleNamespace

    from tokvis.commands.figures import _positional_note

    maps = {"tome": np.tile([1.0, 2.0], (4, 2)), "topk": np.ones((4, 4))}
    note = "fixed by position: the official split alternates columns"
    fig = global_map_grid(maps, reliability={"tome": 1.0}, notes={"tome": note})
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles[0].splitlines() == ["tome", "split-half r = 1.00", note] and titles[1] == "topk"

    def run(method, width, **options):
        meta = SimpleNamespace(method=method, options=options)
        return SimpleNamespace(meta=meta, grid_size=(4, width))

    assert _positional_note(run("tome", 16)) == note
    assert _positional_note(run("tome", 15)).endswith("alternates a checkerboard")
    assert _positional_note(run("tome", 16, order="original")) is None and _positional_note(run("topk", 16)) is None
