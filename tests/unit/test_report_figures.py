"""The report embeds each raster figure in the smaller honest form: JPEG for photos, lossless PNG for flat maps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tokvis.commands._report import JPEG_IF_BELOW, _smaller_raster

ASSETS = Path(__file__).parents[2] / "tokvis" / "assets" / "images"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_a_photo_is_embedded_as_jpeg_close_to_the_png():
    photo = np.asarray(Image.open(ASSETS / "astronaut.jpg").convert("RGB").resize((256, 256)))
    png = _png(photo)
    kind, data = _smaller_raster(png)
    assert kind == "jpeg" and len(data) <= JPEG_IF_BELOW * len(png)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    assert decoded.shape == photo.shape
    assert np.abs(decoded - photo).mean() < 4.0  # quality 85: a few grey levels on average


def test_a_flat_colour_map_stays_lossless_png():
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
    flat = np.kron(cells, np.ones((16, 16, 1), dtype=np.uint8))  # a 16 x 16 map of flat patches, 256 px wide
    png = _png(flat)
    kind, data = _smaller_raster(png)
    assert kind == "png" and data == png


def test_a_palette_png_of_a_plot_keeps_its_pixels_close():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokvis.commands._report import _palette_png

    fig, ax = plt.subplots(figsize=(4, 3))
    for k in range(3):
        ax.errorbar(range(20), np.sin(np.arange(20) / 3 + k), yerr=0.1, marker="o", label=f"block {k}")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    png = buf.getvalue()
    small = _palette_png(png)
    before = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    after = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"), dtype=np.float64)
    assert after.shape == before.shape and len(small) < len(png)
    assert np.abs(after - before).mean() < 1.0 and np.abs(after - before).max() <= 64
