"""``hf:`` model names (tokvis.hf_zoo through tokvis.zoo.create): tiny random transformers models saved to folders,
the image transform from their processors, identities, and the typed errors (no network: folders and a fake cache)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import tokvis
from tests.hf_models import hf_output, hf_processor, save_hf, transformers
from tokvis import data, hf_zoo, zoo
from tokvis.errors import MissingDependencyError, UnsupportedModelError, WeightsError

FAMILIES = ["vit", "vit_cls", "clip", "siglip"]
CLASSES = {"vit": "ViTModel", "vit_cls": "ViTForImageClassification", "clip": "CLIPVisionModel",
           "siglip": "SiglipVisionModel"}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_folder_loads_as_its_class_with_its_weights(family, tmp_path):
    """The class comes from the config (ViTForImageClassification from its architectures); the loaded model
    computes what the saved one does; a patched copy records a trace named after the folder."""
    saved = save_hf(family, tmp_path)
    model = zoo.create(f"hf:{tmp_path}")
    assert type(model).__name__ == CLASSES[family] and not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf_output(model(x)), hf_output(saved(x)), rtol=0, atol=0)
    tokvis.patch(model, "tome", r=4)
    _, trace = tokvis.run_with_trace(model, x)
    assert trace.meta.backbone == f"hf:{tmp_path}"
    random = zoo.create(f"hf:{tmp_path}", pretrained=False)  # the architecture, other weights
    with torch.no_grad():
        assert not torch.allclose(hf_output(random(x)), hf_output(saved(x)))
    assert random._tokvis_name.endswith("(random)")


def test_the_vision_tower_of_a_full_clip_checkpoint(tmp_path):
    """A CLIPModel folder loads as its CLIPVisionModel with the vision weights (the text tower is left out)."""
    from tests.hf_models import HF_TINY

    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    full = transformers.CLIPModel(transformers.CLIPConfig(vision_config=HF_TINY, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    hf_processor("clip").save_pretrained(tmp_path)
    model = zoo.create(f"hf:{tmp_path}")
    assert type(model).__name__ == "CLIPVisionModel"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).pooler_output, full.vision_model(x).pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_transform_is_the_image_processors(family, tmp_path):
    """transform_for (timm's transform from the processor's settings) gives the pixels transformers' own processor
    gives, on the bundled photos (PIL resampling on both sides; a centre crop may sit one pixel apart)."""
    save_hf(family, tmp_path)
    model = zoo.create(f"hf:{tmp_path}")
    transform = data.transform_for(model)
    processor = hf_processor(family, pil=True)
    for name, image in data.load_samples():
        ours = transform(image).numpy()
        theirs = np.asarray(processor(images=image, return_tensors="pt")["pixel_values"][0])
        assert ours.shape == theirs.shape == (3, 64, 64), name
        # torchvision rounds the crop's offset half to even, transformers down: allow one pixel of shift
        shifted = [
            np.abs(ours[:, 1 + dy : 63 + dy, 1 + dx : 63 + dx] - theirs[:, 1:63, 1:63]).max()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        assert min(shifted) < 0.05, (name, shifted)  # 0.05 after normalising: about 3 of 255 levels
    images, _ = data.load_images(model)
    assert images.shape[1:] == (3, 64, 64)
    # a model of another size than the processor's: its own size wins, as timm's built img_size does
    assert hf_zoo.processor_data_config(processor.to_dict(), image_size=(32, 32))["input_size"] == (3, 32, 32)


def test_processor_settings_are_converted_or_refused():
    cfg_in = {"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
              "resample": 3, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}  # fmt: skip
    cfg = hf_zoo.processor_data_config(cfg_in)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_mode"] == "center" and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (0.4, 0.5, 0.6)
    assert int(224 / cfg["crop_pct"]) == 256  # timm resizes the short side to crop / crop_pct
    odd = hf_zoo.processor_data_config({**cfg_in, "size": {"shortest_edge": 255}, "crop_size": 224})
    assert int(224 / odd["crop_pct"]) == 255  # and a ratio that does not divide evenly still gives 255
    for bad, what in [
        ({"do_resize": False}, "do_resize"),
        ({"size": {"shortest_edge": 224}}, "centre crop"),
        ({"size": {"height": 224, "width": 224}, "rescale_factor": 1.0}, "rescales"),
        ({"size": {"shortest_edge": 224, "longest_edge": 300}, "do_center_crop": True, "crop_size": 224}, "longest"),
        ({"size": {"height": 224, "width": 224}, "image_mean": None}, "image_mean"),
    ]:
        with pytest.raises(UnsupportedModelError, match=what):
            hf_zoo.processor_data_config({"image_mean": 0.5, "image_std": 0.5, **bad})


def test_no_processor_is_a_typed_error_until_one_is_given(tmp_path):
    save_hf("vit", tmp_path, processor=False)
    model = zoo.create(f"hf:{tmp_path}")
    with pytest.raises(tokvis.errors.DataError, match="set_image_processor"):
        data.transform_for(model)
    hf_zoo.set_image_processor(model, hf_processor("vit"))
    assert data.data_config(model)["input_size"] == (3, 64, 64)


def test_identity_names_the_model_and_its_revision(tmp_path):
    from tokvis.identity import backbone_identity, describe_backbone

    save_hf("clip", tmp_path)
    ident = backbone_identity(zoo.create(f"hf:{tmp_path}"))
    assert ident == {"name": f"hf:{tmp_path}", "depth": 6, "width": 64, "grid": [8, 8], "revision": None}
    assert describe_backbone({**ident, "revision": "abc"}).startswith(f"hf:{tmp_path}@abc (depth 6")


def test_other_model_types_and_bad_names_are_refused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BeitModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'beit' model.*dinov2"):
        zoo.create(f"hf:{tmp_path}")
    with pytest.raises(WeightsError, match="does not exist"):
        zoo.create(f"hf:{tmp_path}/missing")
    with pytest.raises(WeightsError, match="holds no transformers model config"):
        zoo.create(f"hf:{tmp_path.parent}")
    with pytest.raises(UnsupportedModelError, match="names no model"):
        zoo.create("hf:")
    with pytest.raises(UnsupportedModelError, match="revision"):
        zoo.create("hf:org/name@")


def test_model_kwargs_are_config_attributes_of_their_type(tmp_path):
    save_hf("vit", tmp_path)
    model = zoo.create(f"hf:{tmp_path}", pretrained=False, image_size=32)
    assert tokvis.model.model_info(model).grid_size == (4, 4)
    assert data.data_config(model)["input_size"] == (3, 32, 32)  # the model's size wins over the processor's
    with pytest.raises(TypeError, match="no attribute 'img_size'"):
        zoo.create(f"hf:{tmp_path}", img_size=32)
    with pytest.raises(TypeError, match="image_size"):
        zoo.create(f"hf:{tmp_path}", image_size="32")
    with pytest.raises(WeightsError, match="does not hold every weight|could not be loaded"):
        zoo.create(f"hf:{tmp_path}", image_size=32)  # pretrained: position embeddings of another size


def test_without_transformers_a_typed_line_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "tokvis\[hf\]"'):
        zoo.create(f"hf:{tmp_path}")


def test_too_old_transformers_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.6")
    with pytest.raises(MissingDependencyError, match=f"transformers>={hf_zoo.MIN_TRANSFORMERS}.*4.57.6"):
        hf_zoo.require_transformers()


def test_offline_and_not_cached_is_a_typed_error_naming_the_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match=f"not in the Hugging Face cache \\({constants.HF_HUB_CACHE}"):
        zoo.create("hf:tokvis-made-up/no-such-model")


def test_record_and_sweep_check_hf_names_before_building(tmp_path):
    """The grid check accepts hf: names and the offline HF entry without reading anything, and refuses a folder
    that is not there."""
    from tokvis.commands._run import check_backbone

    check_backbone("dinov2_small_offline_hf")
    check_backbone("hf:tokvis-made-up/no-such-model")  # the Hub is asked only when the model is built
    with pytest.raises(WeightsError, match="does not exist"):
        check_backbone(f"hf:{tmp_path}/missing")
    with pytest.raises(UnsupportedModelError, match="Unknown timm model"):
        check_backbone("dinov2_small_offline_hff")


def test_a_machine_without_internet_gets_the_cache_error_fast(unreachable_hub, tmp_path):
    """No offline flag, the Hub endpoint refuses connections: one probe, then the cache-only error (no retries)."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=f"not in the Hugging Face cache \\({tmp_path / 'hub'}.*no connection to"):
        zoo.create("hf:tokvis-made-up/no-such-model")
    assert time.perf_counter() - t0 < 60  # huggingface_hub's retries would take minutes
