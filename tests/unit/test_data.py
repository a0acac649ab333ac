"""Tests for tokvis.data: bundled samples, foolbox samples, transforms, error handling."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokvis import data
from tokvis.errors import DataError, TokvisError

ASSET_DIR = Path(data.__file__).parent / "assets" / "images"
HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None
needs_foolbox = pytest.mark.skipif(not HAS_FOOLBOX, reason="foolbox (data files only) not installed")


@pytest.fixture(scope="module")
def tiny_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0).eval()


# ---------------------------------------------------------------------------------------------
# bundled samples
# ---------------------------------------------------------------------------------------------


def test_sample_names_are_the_shipped_files():
    names = data.sample_names()
    assert 5 <= len(names) <= 8
    assert names == sorted(names)
    for expected in ("chelsea", "coffee", "astronaut", "rocket"):
        assert expected in names
    shipped = sorted(p.stem for p in ASSET_DIR.glob("*.jpg"))
    assert names == shipped


@pytest.mark.parametrize("name", data.sample_names())
def test_every_sample_loads_as_rgb(name):
    image = data.load_sample(name)
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert min(image.size) == 256
    assert (ASSET_DIR / f"{name}.jpg").stat().st_size < 60_000


def test_load_samples_default_and_subset():
    pairs = data.load_samples()
    assert [n for n, _ in pairs] == data.sample_names()
    assert all(im.mode == "RGB" for _, im in pairs)
    subset = data.load_samples(["rocket", "chelsea"])
    assert [n for n, _ in subset] == ["rocket", "chelsea"]


def test_licence_lists_every_shipped_image():
    text = (ASSET_DIR / "LICENSE.md").read_text(encoding="utf-8")
    for path in ASSET_DIR.iterdir():
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            row = next((line for line in text.splitlines() if line.startswith(f"| `{path.name}`")), None)
            assert row is not None, f"{path.name} missing from LICENSE.md"
            assert "scikit-image" in text and "skimage/data/" in row
            assert re.search(r"CC0|[Pp]ublic domain", row), row


def test_unknown_sample_lists_available_names():
    with pytest.raises(DataError) as info:
        data.load_sample("no_such_image")
    message = str(info.value)
    assert "no_such_image" in message
    for name in data.sample_names():
        assert name in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, TokvisError)


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------


def test_corrupt_file_raises_data_error_naming_it(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00\x01this is not an image\xff" * 10)
    with pytest.raises(DataError, match="broken.jpg"):
        data.read_image(bad)


def test_truncated_image_raises_data_error(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated.png"):
        data.read_image(truncated)


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="nothing.png"):
        data.read_image(tmp_path / "nothing.png")


def test_read_image_converts_grey_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((10, 12), 77, dtype=np.uint8)).save(path)
    with pytest.warns(UserWarning, match=r"is 12x10 pixels: its short side is only 10 px"):
        image = data.read_image(path)  # tiny on purpose: the warning is part of reading it
    assert image.mode == "RGB" and image.size == (12, 10)
    assert np.asarray(image)[0, 0].tolist() == [77, 77, 77]


# ---------------------------------------------------------------------------------------------
# foolbox samples
# ---------------------------------------------------------------------------------------------


@needs_foolbox
def test_foolbox_imagenet_labels_parsed_from_file_names():
    samples = data.foolbox_samples("imagenet")
    assert len(samples) == 20
    folder = data.foolbox_data_dir()
    expected = {}
    for path in folder.glob("imagenet_*_*.jpg"):
        _, index, label = path.stem.split("_")
        expected[f"imagenet_{index}"] = int(label)
    assert {sid: label for sid, _, label in samples} == expected
    ids = [sid for sid, _, _ in samples]
    assert ids == sorted(ids)
    assert {sid: label for sid, _, label in samples}["imagenet_07"] == 609
    assert all(isinstance(label, int) for _, _, label in samples)
    assert all(im.mode == "RGB" for _, im, _ in samples)


@needs_foolbox
@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "mnist", "fashionMNIST"])
def test_foolbox_other_kinds(kind):
    samples = data.foolbox_samples(kind)
    assert len(samples) == 20
    assert all(sid.startswith(f"{kind}_") for sid, _, _ in samples)
    assert all(im.mode == "RGB" for _, im, _ in samples)
    if kind == "cifar10":  # must not pick up cifar100 files
        assert all(0 <= label < 10 for _, _, label in samples)


@needs_foolbox
def test_foolbox_unknown_kind():
    with pytest.raises(DataError, match="imagenet"):
        data.foolbox_samples("svhn")


def test_foolbox_absent_tells_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps foolbox==3\.3\.4"):
        data.foolbox_samples("imagenet")


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------


def test_transform_uses_the_models_actual_size(tiny_vit):
    assert data.data_config(tiny_vit)["input_size"] == (3, 64, 64)
    transform = data.transform_for(tiny_vit)
    x = transform(data.load_sample("chelsea"))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    with torch.no_grad():
        tiny_vit(x[None])  # the model accepts it


def test_train_transform_also_model_size(tiny_vit):
    x = data.transform_for(tiny_vit, train=True)(data.load_sample("coffee"))
    assert x.shape == (3, 64, 64)


def test_load_images_samples(tiny_vit):
    images, ids = data.load_images(tiny_vit, ["astronaut", "rocket"])
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert ids == ["astronaut", "rocket"]
    all_images, all_ids = data.load_images(tiny_vit)
    assert all_ids == data.sample_names() and all_images.shape[0] == len(all_ids)


@needs_foolbox
def test_load_images_foolbox(tiny_vit):
    images, ids = data.load_images(tiny_vit, source="foolbox-mnist")
    assert images.shape == (20, 3, 64, 64)
    assert ids[0] == "mnist_00"
    one, one_id = data.load_images(tiny_vit, ["imagenet_07"], source="foolbox-imagenet")
    assert one.shape == (1, 3, 64, 64) and one_id == ["imagenet_07"]
    with pytest.raises(DataError, match="imagenet_99"):
        data.load_images(tiny_vit, ["imagenet_99"], source="foolbox-imagenet")


def test_load_images_unknown_source(tiny_vit):
    with pytest.raises(DataError, match="foolbox-imagenet"):
        data.load_images(tiny_vit, source="imagenet-val")


def test_denormalize_round_trip(tiny_vit):
    pil = data.load_sample("astronaut").resize((64, 64))
    images, _ = data.load_images(tiny_vit, ["astronaut"])
    out = data.denormalize(images, tiny_vit)
    assert out.shape == (1, 64, 64, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    single = data.denormalize(images[0], tiny_vit)
    assert single.shape == (64, 64, 3)
    np.testing.assert_allclose(single, out[0])
    # exact inverse of the normalisation timm applied
    cfg = data.data_config(tiny_vit)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    raw = (images[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(single, raw, atol=1e-6)
    # and close to the source photo (the transform only resizes / crops)
    assert abs(single.mean() - np.asarray(pil).mean() / 255) < 0.05


def test_denormalize_rejects_bad_shape(tiny_vit):
    with pytest.raises(DataError, match="shape"):
        data.denormalize(torch.zeros(2, 4, 8, 8), tiny_vit)


def test_one_data_config_under_both_names():
    """zoo.data_config and data.data_config are one function: the size the model was built with wins
    (timm's resolve_data_config alone reports the pretrained 224 for a vit_tiny built at 64)."""
    from tokvis import zoo

    assert zoo.data_config is data.data_config
    model = zoo.create("vit_tiny_patch16_224", pretrained=False, img_size=64)
    assert zoo.data_config(model)["input_size"] == data.data_config(model)["input_size"] == (3, 64, 64)
