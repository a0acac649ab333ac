"""Tests for tokvis.plotting.overlay, on the drawn artists (image arrays, line segments, titles)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.figure import Figure

from tokvis.errors import ImageSizeError, TraceMismatchError
from tokvis.plotting.overlay import (
    drawn_entries,
    keep_mask,
    legend_handles,
    merge_overlay,
    overlay_legend,
    save_figure,
    trace_overlays,
)

GRID = (4, 5)  # h, w
PATCH = 6  # pixels per patch side -> image 24 x 30


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def image():
    return np.random.default_rng(0).random((GRID[0] * PATCH, GRID[1] * PATCH, 3))


@pytest.fixture
def labels():
    # two merged regions (0 and 1), singletons, and dropped patches (-1)
    grid = np.array(
        [
            [0, 0, 1, 1, 2],
            [0, 0, 1, 3, 4],
            [5, -1, -1, 6, 7],
            [8, 9, 10, 11, -1],
        ]
    )
    return grid.reshape(-1)


def _drawn(ax):
    return np.asarray(ax.get_images()[0].get_array())


def _patch(array, k, grid=GRID, patch=PATCH):
    i, j = divmod(k, grid[1])
    return array[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]


def _segments(ax):
    collections = [c for c in ax.collections if isinstance(c, LineCollection)]
    if not collections:
        return set()
    assert len(collections) == 1
    return {tuple(map(tuple, np.round(seg, 6))) for seg in collections[0].get_segments()}


# ---------------------------------------------------------------------------------------------
# merge_overlay
# ---------------------------------------------------------------------------------------------


def test_returns_axes_with_image_of_expected_shape(image, labels):
    _fig, ax = plt.subplots()
    out = merge_overlay(image, labels, grid_size=GRID, ax=ax)
    assert out is ax and isinstance(out, Axes)
    assert len(ax.get_images()) == 1
    assert _drawn(ax).shape == image.shape
    assert ax.get_xticks().size == 0 and ax.get_yticks().size == 0


def test_uses_current_axes_when_ax_is_none(image, labels):
    _fig, ax = plt.subplots()
    assert merge_overlay(image, labels, grid_size=GRID) is ax


def test_region_pixels_equal_mean_colour_of_region(image, labels):
    _, ax = plt.subplots()
    merge_overlay(image, labels, grid_size=GRID, ax=ax, fill_alpha=1.0)
    drawn = _drawn(ax)
    # independent per-label mean with plain Python loops
    sums, counts = {}, {}
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            k = (y // PATCH) * GRID[1] + x // PATCH
            label = int(labels[k])
            if label < 0:
                continue
            sums[label] = sums.get(label, np.zeros(3)) + image[y, x]
            counts[label] = counts.get(label, 0) + 1
    for k, label in enumerate(labels):
        if label >= 0:
            expected = sums[int(label)] / counts[int(label)]
            np.testing.assert_allclose(_patch(drawn, k), np.broadcast_to(expected, (PATCH, PATCH, 3)), atol=1e-12)
    # patches of one region share one colour; a singleton is the mean of its own patch
    np.testing.assert_allclose(_patch(drawn, 0)[0, 0], _patch(drawn, 6)[3, 3])
    np.testing.assert_allclose(_patch(drawn, 4)[0, 0], _patch(image, 4).reshape(-1, 3).mean(0))


def test_dropped_patches_are_dimmed(image, labels):
    _, ax = plt.subplots()
    merge_overlay(image, labels, grid_size=GRID, ax=ax, dim=0.3)
    drawn = _drawn(ax)
    for k in np.nonzero(labels < 0)[0]:
        np.testing.assert_allclose(_patch(drawn, k), 0.3 * _patch(image, k))


def test_dropped_color_paints_flat(image, labels):
    _, ax = plt.subplots()
    merge_overlay(image, labels, grid_size=GRID, ax=ax, dropped_color="black")
    drawn = _drawn(ax)
    for k in np.nonzero(labels < 0)[0]:
        assert np.all(_patch(drawn, k) == 0.0)


def test_mode_image_keeps_original_pixels(image, labels):
    _, ax = plt.subplots()
    merge_overlay(image, labels, grid_size=GRID, ax=ax, mode="image")
    drawn = _drawn(ax)
    for k in np.nonzero(labels >= 0)[0]:
        np.testing.assert_allclose(_patch(drawn, k), _patch(image, k))


def test_kept_pixels_shows_real_pixels_of_unmerged_tokens_only(image, labels):
    _, ax = plt.subplots()
    merge_overlay(image, labels, grid_size=GRID, ax=ax, kept_pixels=True, dim=0.5, fill_alpha=1.0)
    drawn = _drawn(ax)
    sizes = np.bincount(labels[labels >= 0])
    for k, label in enumerate(labels):
        if label < 0:
            np.testing.assert_allclose(_patch(drawn, k), 0.5 * _patch(image, k))
        elif sizes[label] == 1:  # its own token: real pixels, not the flat patch mean
            np.testing.assert_allclose(_patch(drawn, k), _patch(image, k))
            assert np.ptp(_patch(drawn, k).reshape(-1, 3), axis=0).max() > 0
        else:  # merged regions keep their flat mean colour
            members = [j for j in range(labels.size) if labels[j] == label]
            mean = np.concatenate([_patch(image, j).reshape(-1, 3) for j in members]).mean(0)
            np.testing.assert_allclose(_patch(drawn, k), np.broadcast_to(mean, (PATCH, PATCH, 3)), atol=1e-12)
    _, ax2 = plt.subplots()
    merge_overlay(image, labels, grid_size=GRID, ax=ax2, fill_alpha=1.0)
    assert (
        np.ptp(_patch(_drawn(ax2), 4).reshape(-1, 3), axis=0).max() == 0
    )  # without the option the kept patch 4 is flat


def test_legend_handles_describe_the_options():
    labels = [h.get_label() for h in legend_handles()]
    assert labels[0].startswith("dot:") and any(t.startswith("tint 50%: merged region") for t in labels)
    assert any(t.startswith("flat fill: merged region") for t in map(Artist.get_label, legend_handles(fill_alpha=1)))
    assert any(t == "dimmed (x0.25): dropped patch" for t in labels) and any("border" in t for t in labels)
    labels = [h.get_label() for h in legend_handles(dropped_color="red", kept_pixels=True, border_color=None, dim=0.1)]
    assert "solid colour: dropped patch" in labels and "real pixels: token kept as is" in labels
    assert not any("border" in t or "dimmed" in t for t in labels)
    pruning = [h.get_label() for h in legend_handles(merged=False, mode="image")]
    assert not any(t.startswith(("dot", "flat fill", "tint")) for t in pruning)
    with pytest.raises(ValueError, match="dim"):
        legend_handles(dim=2.0)
    fig, ax = plt.subplots()
    leg = overlay_legend(ax, dim=0.4)
    assert ax.get_legend() is leg and "dimmed (x0.4): dropped patch" in [t.get_text() for t in leg.get_texts()]


def test_translucent_fill_blends_the_region_mean_over_the_pixels(image, labels):
    flat_ax, tint_ax, none_ax = plt.subplots(1, 3)[1]
    merge_overlay(image, labels, grid_size=GRID, ax=flat_ax, fill_alpha=1.0)
    merge_overlay(image, labels, grid_size=GRID, ax=tint_ax, fill_alpha=0.3)
    merge_overlay(image, labels, grid_size=GRID, ax=none_ax, fill_alpha=0.0)
    flat, tint, borders_only = _drawn(flat_ax), _drawn(tint_ax), _drawn(none_ax)
    for k, label in enumerate(labels):
        if label >= 0:
            np.testing.assert_allclose(_patch(tint, k), 0.3 * _patch(flat, k) + 0.7 * _patch(image, k), atol=1e-12)
            np.testing.assert_allclose(_patch(borders_only, k), _patch(image, k))  # the image itself
    assert "fill" in tint_ax.tokvis_overlay and "fill" not in none_ax.tokvis_overlay
    with pytest.raises(ValueError, match="fill_alpha"):
        merge_overlay(image, labels, grid_size=GRID, fill_alpha=1.5)


def test_legend_lists_only_what_the_panel_drew(image):
    """Entries are checked against the artists and pixels of the panel, not against the options."""
    pruned = np.where(np.arange(20) % 3 == 0, -1, np.arange(20))  # Top-K-like: singletons and dropped patches
    merged = np.arange(20) // 2  # ToMe-like: pairs, nothing dropped
    kept = np.arange(20) % 2 == 0
    fig, (ax_p, ax_m) = plt.subplots(1, 2)
    merge_overlay(image, pruned, kept=pruned >= 0, grid_size=GRID, ax=ax_p)
    merge_overlay(image, merged, kept=kept, grid_size=GRID, ax=ax_m)
    for ax in (ax_p, ax_m):
        leg = overlay_legend(ax)
        texts = [t.get_text() for t in leg.get_texts()]
        has_dots = any(isinstance(c, PathCollection) and len(c.get_offsets()) for c in ax.collections)
        has_borders = bool(_segments(ax))
        assert any(t.startswith("dot:") for t in texts) == has_dots
        assert any("region border" in t for t in texts) == has_borders
        drawn = _drawn(ax)
        dimmed = any(np.allclose(_patch(drawn, k), 0.25 * _patch(image, k)) for k in range(20))
        assert any("dropped patch" in t for t in texts) == dimmed
    assert ax_p.tokvis_overlay == {"border", "kept_flat", "dropped"}  # no merge dot, no merged fill
    assert ax_m.tokvis_overlay == {"border", "dot", "fill"}  # nothing dropped
    assert drawn_entries(fig) == ax_p.tokvis_overlay | ax_m.tokvis_overlay


def test_borders_only_between_differing_labels(image, labels):
    _, ax = plt.subplots()
    merge_overlay(image, labels, grid_size=GRID, ax=ax, border_color="red", fill_alpha=1.0)
    segments = _segments(ax)
    grid = labels.reshape(GRID)

    def vertical(i, j):  # edge between patch (i, j-1) and (i, j)
        x = j * PATCH - 0.5
        return ((x, i * PATCH - 0.5), (x, (i + 1) * PATCH - 0.5))

    def horizontal(i, j):  # edge between patch (i-1, j) and (i, j)
        y = i * PATCH - 0.5
        return ((j * PATCH - 0.5, y), ((j + 1) * PATCH - 0.5, y))

    expected = set()
    for i in range(GRID[0]):
        for j in range(1, GRID[1]):
            if grid[i, j] != grid[i, j - 1]:
                expected.add(vertical(i, j))
    for i in range(1, GRID[0]):
        for j in range(GRID[1]):
            if grid[i, j] != grid[i - 1, j]:
                expected.add(horizontal(i, j))
    assert segments == expected
    # spot checks: inside merged region 0 there is no border; between regions 0 and 1 there is
    assert vertical(0, 1) not in segments and horizontal(1, 0) not in segments
    assert vertical(0, 2) in segments and vertical(1, 2) in segments
    # two dropped neighbours share label -1: no border; dropped vs region: border
    assert vertical(2, 2) not in segments and vertical(2, 1) in segments
    # colour of the lines
    collection = next(c for c in ax.collections if isinstance(c, LineCollection))
    np.testing.assert_allclose(collection.get_colors()[0][:3], [1, 0, 0])
    # borders do not touch the pixel data: every merged pixel is still its region's mean
    drawn = _drawn(ax)
    assert np.all(_patch(drawn, 0) == _patch(drawn, 0)[0, 0])


def test_no_border_collection_when_disabled_or_one_region(image):
    _, ax = plt.subplots()
    merge_overlay(image, np.zeros(20, int), grid_size=GRID, ax=ax)
    assert _segments(ax) == set()
    _, ax2 = plt.subplots()
    merge_overlay(image, np.arange(20), grid_size=GRID, ax=ax2, border_color=None)
    assert _segments(ax2) == set()


def test_kept_marks_destinations_of_merged_regions_only(image, labels):
    kept = np.zeros(20, bool)
    kept[[0, 2, 4, 8, 9]] = True  # 0: region 0 dest; 2: region 1 dest; 4, 8, 9: singletons
    _, ax = plt.subplots()
    merge_overlay(image, labels, grid_size=GRID, kept=kept, ax=ax)
    markers = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(markers) == 1
    centres = np.round(markers[0].get_offsets(), 6).tolist()
    expected = [[(k % GRID[1] + 0.5) * PATCH - 0.5, (k // GRID[1] + 0.5) * PATCH - 0.5] for k in (0, 2)]
    assert sorted(centres) == sorted(expected)


def test_torch_inputs_and_chw(image, labels):
    _, ax = plt.subplots()
    chw = torch.from_numpy(image).permute(2, 0, 1).float()
    merge_overlay(chw, torch.from_numpy(labels), grid_size=GRID, kept=torch.ones(20, dtype=torch.bool), ax=ax)
    assert _drawn(ax).shape == image.shape


def test_indivisible_image_resized_to_nearest_multiple(labels):
    img = np.random.default_rng(1).random((25, 29, 3))  # nearest multiples of (4, 5): 24 x 30
    _, ax = plt.subplots()
    merge_overlay(img, labels, grid_size=GRID, ax=ax)
    assert _drawn(ax).shape == (24, 30, 3)


def test_bad_inputs_raise_typed_errors(image, labels):
    _, ax = plt.subplots()
    with pytest.raises(TraceMismatchError, match="length h\\*w = 20"):
        merge_overlay(image, labels[:-1], grid_size=GRID, ax=ax)
    with pytest.raises(TraceMismatchError, match="kept"):
        merge_overlay(image, labels, grid_size=GRID, kept=np.ones(3, bool), ax=ax)
    with pytest.raises(ImageSizeError):
        merge_overlay(np.zeros((24, 30)), labels, grid_size=(4, 5, 6), ax=ax)
    with pytest.raises(ImageSizeError):
        merge_overlay(np.zeros((24, 30, 4)), labels, grid_size=GRID, ax=ax)
    with pytest.raises(ValueError, match="mode"):
        merge_overlay(image, labels, grid_size=GRID, ax=ax, mode="median")


# ---------------------------------------------------------------------------------------------
# keep_mask
# ---------------------------------------------------------------------------------------------


def test_keep_mask_dims_pruned_patches(image):
    kept = np.ones(20, bool)
    kept[[3, 7, 19]] = False
    _, ax = plt.subplots()
    assert keep_mask(image, kept, grid_size=GRID, ax=ax, dim=0.5) is ax
    drawn = _drawn(ax)
    for k in range(20):
        factor = 1.0 if kept[k] else 0.5
        np.testing.assert_allclose(_patch(drawn, k), factor * _patch(image, k))
    assert _segments(ax) == set()


# ---------------------------------------------------------------------------------------------
# trace_overlays
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeTrace:
    """Implements the part of the Trace API the overlays use."""

    labels_by_layer: dict[int, torch.Tensor]
    grid_size: tuple[int, int] = GRID
    meta: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(method="tome", keep_rate=None, r=4))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.labels_by_layer))

    @property
    def num_images(self) -> int:
        return next(iter(self.labels_by_layer.values())).shape[0]

    def labels(self, layer: int) -> torch.Tensor:
        return self.labels_by_layer[layer]

    def kept(self, layer: int) -> torch.Tensor:
        labels = self.labels_by_layer[layer]
        kept = torch.zeros_like(labels, dtype=torch.bool)
        for b in range(labels.shape[0]):
            seen = set()
            for k, label in enumerate(labels[b].tolist()):
                if label >= 0 and label not in seen:
                    seen.add(label)
                    kept[b, k] = True
        return kept


@pytest.fixture
def trace(labels):
    layer1 = torch.stack([torch.arange(20), torch.from_numpy(labels)])  # 20 and 12 tokens
    merged = labels.copy()
    merged[merged == 3] = 1
    layer5 = torch.stack([torch.from_numpy(labels), torch.from_numpy(merged)])  # 12 and 11
    return FakeTrace({1: layer1, 5: layer5})


def _titles(fig):
    return [[ax.get_title() for ax in row] for row in np.asarray(fig.axes).reshape(-1, 3)]


def test_trace_overlays_grid_and_titles(trace, image):
    images = torch.from_numpy(np.stack([image, image[::-1].copy()])).permute(0, 3, 1, 2)
    fig = trace_overlays(trace, images)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2 * 3
    assert _titles(fig) == [
        ["image", "block 1 · 20 tokens", "block 5 · 12 tokens"],
        ["image", "block 1 · 12 tokens", "block 5 · 11 tokens"],
    ]
    assert fig._suptitle is not None and fig._suptitle.get_text() == "tome · r=4"
    (legend,) = fig.legends  # what the dot, fill, borders and dimming mean
    assert any(t.get_text().startswith("dot:") for t in legend.get_texts())
    assert [ax.get_ylabel() for ax in fig.axes] == ["", "", "", "", "", ""]  # meta has no image_ids
    for ax in fig.axes:
        assert len(ax.get_images()) == 1
        assert np.asarray(ax.get_images()[0].get_array()).shape == image.shape


def test_trace_overlays_selection_list_images_no_titles(trace, image):
    fig = trace_overlays(trace, [image, image], layers=[5], image_index=1, titles=False, fill_alpha=1.0)
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["", ""]
    assert fig._suptitle is None
    # the panel shows image 1 at block 5: patch 2 (label 1) and patch 8 (label 3 -> 1) share a colour
    drawn = _drawn(fig.axes[1])
    np.testing.assert_allclose(_patch(drawn, 2)[0, 0], _patch(drawn, 8)[0, 0])


def test_trace_overlays_row_labels_and_singular_token(image):
    labels = torch.stack([torch.zeros(20, dtype=torch.long), torch.arange(20)])
    meta = SimpleNamespace(method="evit", keep_rate=0.7, image_ids=["cat", "cup"])
    fig = trace_overlays(FakeTrace({2: labels}, meta=meta), [image, image])
    assert _titles2(fig) == [["image", "block 2 · 1 token"], ["image", "block 2 · 20 tokens"]]
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["cat", "cup"]
    assert fig._suptitle.get_text() == "evit · keep rate 0.7"


def _titles2(fig):
    return [[ax.get_title() for ax in row] for row in np.asarray(fig.axes).reshape(-1, 2)]


def test_trace_overlays_into_given_axes(trace, image):
    fig, axes = plt.subplots(2, 3)
    out = trace_overlays(trace, [image, image], axes=axes)
    assert out is fig
    assert all(len(ax.get_images()) == 1 for ax in axes.ravel())


def test_trace_overlays_errors(trace, image):
    with pytest.raises(TraceMismatchError, match="not recorded"):
        trace_overlays(trace, [image, image], layers=[2])
    with pytest.raises(TraceMismatchError, match="out of range"):
        trace_overlays(trace, [image, image], image_index=[5])
    with pytest.raises(TraceMismatchError, match="images"):
        trace_overlays(trace, [image])
    with pytest.raises(TraceMismatchError, match="axes"):
        trace_overlays(trace, [image, image], axes=plt.subplots(1, 2)[1])


def test_save_figure_creates_parents(tmp_path, trace, image):
    fig = trace_overlays(trace, [image, image])
    path = save_figure(fig, tmp_path / "a" / "b" / "overlay.png")
    assert path == tmp_path / "a" / "b" / "overlay.png"
    assert path.is_file() and path.stat().st_size > 0
