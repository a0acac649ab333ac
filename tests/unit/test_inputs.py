"""Bad images get a typed error (or a warning) saying what was wrong; images are checked once per forward."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from PIL import Image

import tokvis
import tokvis.model
from tests.models import make_images, make_model
from tokvis.errors import ImageSizeError, ImageValueError


@pytest.fixture
def check_counter(monkeypatch):
    """Count calls of ``check_images`` through every tokvis module that binds it."""
    original = tokvis.model.check_images
    calls = []

    def counting(model, images):
        calls.append(tuple(images.shape))
        return original(model, images)

    for name, module in list(sys.modules.items()):
        if name.startswith("tokvis") and getattr(module, "check_images", None) is original:
            monkeypatch.setattr(module, "check_images", counting)
    return calls


@pytest.mark.parametrize("patched", [False, True])
def test_images_are_checked_once_per_forward(check_counter, patched):
    model, x = make_model(), make_images()
    if patched:
        tokvis.patch(model, "tome", r=4)
    tokvis.run_with_trace(model, x)
    assert len(check_counter) == 1
    with tokvis.record(model), torch.no_grad():
        model(x)
        model(x[:2])
    assert len(check_counter) == (3 if patched else 1)  # an unpatched model's own forward is timm's


@pytest.mark.parametrize("patched", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_raise_naming_the_images(patched, value):
    model, x = make_model(), make_images(n=4)
    if patched:
        tokvis.patch(model, "topk", keep_rate=0.5)
    x[1, 0, 3, 5] = value
    x[3, 2, 0, 0] = value
    with pytest.raises(ImageValueError, match=r"2 of 4 images .*NaN or infinite.*positions 1, 3") as info:
        tokvis.run_with_trace(model, x)
    assert isinstance(info.value, ImageSizeError)  # the README's error for bad images
    if patched:
        with pytest.raises(ImageValueError), torch.no_grad():
            model(x)  # the patched model checks its input without a recorder too


def test_finiteness_check_agrees_with_isfinite_all_including_overflowing_sums():
    """The one-reduction check (a sum) against ``torch.isfinite(x).all()``: NaN, +inf, -inf, +inf with -inf
    (a NaN sum), and finite values whose float32 sum overflows (no false alarm), in several dtypes."""
    from tokvis.model import _all_finite

    big = torch.finfo(torch.float32).max
    cases = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(2, 3, 8, 8).to(dtype)
        cases.append(x)
        for value in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[1, 2, 3, 4] = value
            cases.append(y)
        y = x.clone()
        y[0, 0, 0, 0], y[1, 0, 0, 0] = float("inf"), -float("inf")
        cases.append(y)
    cases.append(torch.full((2, 3, 8, 8), big))  # finite, but the float32 sum overflows
    cases.append(torch.full((2, 3, 8, 8), 1e300, dtype=torch.float64))  # finite, not representable in float32
    for x in cases:
        assert _all_finite(x) == bool(torch.isfinite(x).all()), (x.dtype, x.flatten()[:3])
    assert _all_finite(cases[-1]) and not _all_finite(cases[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_image_dtype_other_than_the_model_raises_with_the_conversion(dtype):
    model, x = make_model(), make_images()
    tokvis.patch(model, "tome", r=4)
    want = rf"images are {dtype} but the model's weights are torch.float32.*images.to"
    with pytest.raises(ImageSizeError, match=want):
        tokvis.run_with_trace(model, x.to(dtype))
    out, trace = tokvis.run_with_trace(model, x.to(dtype).to(torch.float32))  # the advised conversion works
    assert trace.num_images == 3 and torch.isfinite(out).all()


def test_float64_model_takes_float64_images():
    model, x = make_model(dtype=torch.float64), make_images(dtype=torch.float64)
    tokvis.patch(model, "tome", r=4)
    out, trace = tokvis.run_with_trace(model, x)
    assert out.dtype == torch.float64 and trace.num_images == 3
    with pytest.raises(ImageSizeError, match="torch.float32 but the model's weights are torch.float64"):
        tokvis.run_with_trace(model, x.float())


def test_autocast_accepts_other_float_images():
    model, x = make_model(), make_images()
    tokvis.patch(model, "topk", keep_rate=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, trace = tokvis.run_with_trace(model, x.to(torch.bfloat16))
    assert trace.num_images == 3 and torch.isfinite(out.float()).all()


def _save(path, size):
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


@pytest.mark.parametrize(
    "size,what",
    [((1, 1), "short side is only 1 px"), ((4000, 3), "aspect ratio"), ((3, 4000), "aspect ratio"), ((8, 300), "8 px")],
)
def test_extreme_images_warn_when_read(tmp_path, size, what):
    from tokvis.datasets import open_dataset

    _save(tmp_path / "odd.png", size)
    with pytest.warns(UserWarning, match=what) as record:
        image = open_dataset(tmp_path).load(0)  # the path `tokvis record` reads images through
    assert image.size == size
    assert "odd.png" in str(record[0].message) and f"{size[0]}x{size[1]}" in str(record[0].message)


@pytest.mark.parametrize("size", [(224, 224), (28, 28), (640, 200), (256, 384)])
def test_ordinary_images_read_without_warning(tmp_path, size):
    from tokvis.data import read_image

    _save(tmp_path / "ok.png", size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "ok.png").size == size
