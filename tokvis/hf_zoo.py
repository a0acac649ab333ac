"""Hugging Face ``transformers`` models by name: ``"hf:<repo id>[@revision]"`` or ``"hf:<folder>"``.

:func:`tokvis.zoo.create` loads every name that starts with ``hf:`` with :func:`load_hf`, so the
same name works wherever tokvis takes a model name (``tokvis record --model``, a sweep's
``backbones``, ``tokvis fit``, ``tokvis evaluate``'s rebuilt runs).

* The class comes from the config's ``model_type``: ``vit`` (``ViTForImageClassification`` when the
  config's ``architectures`` name it, else ``ViTModel``), ``dinov2`` (``Dinov2Model``),
  ``dinov2_with_registers``, ``clip`` / ``clip_vision_model`` (``CLIPVisionModel``: the vision tower of
  a full CLIP checkpoint), ``siglip`` / ``siglip_vision_model`` (``SiglipVisionModel``).  Any other
  type is refused with an :class:`~tokvis.errors.UnsupportedModelError`.
* A folder (an existing directory, or a name starting with ``/``, ``.`` or ``~``) is read from disk
  (``save_pretrained``); anything else is a Hub repo id, read from the Hugging Face cache or
  downloaded.  Without network (``HF_HUB_OFFLINE=1``, or the Hub unreachable) a repo that is not in
  the cache gives a :class:`~tokvis.errors.WeightsError` naming the cache folder.
* The image transform comes from the model's own image processor settings
  (``preprocessor_config.json``), converted to timm's data configuration (:func:`processor_data_config`):
  :func:`tokvis.data.transform_for` then builds the same kind of transform as for a timm model.
* The name the traces and run manifests record is ``hf:<repo id>@<commit>`` (the revision the files
  were read at), and :func:`tokvis.identity.backbone_identity` holds the name and the revision.
* ``transformers`` is an optional extra (``pip install "tokvis[hf]"``); without it, or with a version
  older than :data:`MIN_TRANSFORMERS`, an ``hf:`` name is a :class:`~tokvis.errors.MissingDependencyError`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from tokvis.backbones.hf_base import MIN_TRANSFORMERS
from tokvis.errors import MissingDependencyError, UnsupportedModelError, WeightsError

__all__ = [
    "HF_PREFIX",
    "MIN_TRANSFORMERS",
    "MODEL_TYPES",
    "check_hf_name",
    "load_hf",
    "hf_cache_dir",
    "is_hf_name",
    "processor_data_config",
    "set_image_processor",
]

HF_PREFIX = "hf:"
_INSTALL = 'pip install "tokvis[hf]"'

#: config ``model_type`` -> the transformers classes tokvis loads it as (the first unless the config's
#: ``architectures`` name another of them)
MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "vit": ("ViTModel", "ViTForImageClassification"),
    "dinov2": ("Dinov2Model",),
    "dinov2_with_registers": ("Dinov2WithRegistersModel",),
    "clip": ("CLIPVisionModel",),
    "clip_vision_model": ("CLIPVisionModel",),
    "siglip": ("SiglipVisionModel",),
    "siglip_vision_model": ("SiglipVisionModel",),
}

#: PIL resampling filters (``resample`` in an image processor's settings) -> timm's interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def is_hf_name(name: Any) -> bool:
    """Whether ``name`` is an ``hf:`` model name.

    Parameters
    ----------
    name : Any
        A model name given to :func:`tokvis.zoo.create`.
    """
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def _looks_like_folder(ref: str) -> bool:
    repo = ref.partition("@")[0]
    return Path(ref).expanduser().is_dir() or ref.startswith(("/", ".", "~")) or repo.count("/") > 1


def _parse(name: str) -> tuple[str, str | None, bool]:
    """``(repo id or folder, revision or None, is a folder)`` of an ``hf:`` name."""
    ref = name[len(HF_PREFIX) :].strip()
    if not ref:
        raise UnsupportedModelError(
            f"model name {name!r} names no model: use hf:<repo id> (e.g. hf:google/vit-base-patch16-224), "
            "hf:<repo id>@<revision> or hf:<folder saved with save_pretrained>"
        )
    if _looks_like_folder(ref):
        return str(Path(ref).expanduser()), None, True
    repo, at, revision = ref.partition("@")
    if at and not revision:
        raise UnsupportedModelError(f"model name {name!r}: give a revision after '@' (a branch, tag or commit)")
    return repo, revision or None, False


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        out.append(int(digits) if digits else 0)
    return tuple(out)


def require_transformers(what: str = "an hf: model") -> Any:
    """The ``transformers`` module, or a :class:`~tokvis.errors.MissingDependencyError` saying how to install it.

    Parameters
    ----------
    what : str
        What needs it (named in the message).
    """
    try:
        import transformers
    except ImportError as err:
        raise MissingDependencyError(
            f"{what} needs Hugging Face transformers, which is not installed: {_INSTALL}"
        ) from err
    if _version_tuple(transformers.__version__) < _version_tuple(MIN_TRANSFORMERS):
        raise MissingDependencyError(
            f"{what} needs transformers>={MIN_TRANSFORMERS} (its attention layout: q_proj / k_proj / v_proj); "
            f"transformers {transformers.__version__} is installed: {_INSTALL} --upgrade"
        )
    return transformers


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache folder (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).

    Returns
    -------
    pathlib.Path
    """
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_hf_name(name: str) -> None:
    """Raise unless ``name`` can name an ``hf:`` model (cheap: nothing is read or downloaded).

    Parameters
    ----------
    name : str
        ``"hf:<repo id>[@revision]"`` or ``"hf:<folder>"``.

    Raises
    ------
    MissingDependencyError
        transformers is missing or too old.
    UnsupportedModelError
        The name is empty or malformed.
    WeightsError
        A folder that does not exist.
    """
    ref, _, local = _parse(name)
    require_transformers(f"model {name!r}")
    if local and not Path(ref).is_dir():
        raise WeightsError(f"model {name!r}: the folder {ref} does not exist (a folder saved with save_pretrained)")


@contextlib.contextmanager
def _quiet(transformers: Any):
    """transformers' loading reports (the unused text tower of a CLIP checkpoint, ...) and progress bars off."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text.split(". ")[0] if text else type(err).__name__).rstrip(".")


def _fetch_error(name: str, repo: str, err: BaseException, *, offline: bool, why_offline: str) -> WeightsError:
    if offline:
        cache = hf_cache_dir()
        return WeightsError(
            f"model {name!r}: {repo} is not in the Hugging Face cache ({cache}, set by HF_HOME / HF_HUB_CACHE) and "
            f"the Hub cannot be reached ({why_offline}). Download it once with network access (e.g. "
            f"`hf download {repo}`, or unset HF_HUB_OFFLINE), point HF_HOME to a cache that holds it, or save the "
            f"model to a folder (save_pretrained) and use 'hf:/path/to/folder'"
        )
    else:
        return WeightsError(
            f"model {name!r}: {repo} could not be read from the Hugging Face Hub ({type(err).__name__}: "
            f"{_first_sentence(err)}). Check the repo id and revision (a private repo needs `hf auth login`), or use "
            "a folder saved with save_pretrained: 'hf:/path/to/folder'"
        )


def _cached_commit(repo: str, revision: str | None) -> str | None:
    """The commit a Hub repo's files were read at: the snapshot folder its cached ``config.json`` lies in."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(found, str) and Path(found).parent.parent.name == "snapshots":
        return Path(found).parent.name
    return revision


def _model_class(transformers: Any, config: Any, name: str) -> type:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        classes = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise UnsupportedModelError(
            f"model {name!r} is a transformers {model_type!r} model ({classes}); tokvis loads the model types "
            f"{', '.join(MODEL_TYPES)} (ViT, DINOv2, CLIP and SigLIP vision transformers)"
        )
    choices = MODEL_TYPES[model_type]
    wanted = [c for c in choices if c in (getattr(config, "architectures", None) or [])]
    return getattr(transformers, (wanted or choices)[0])


def _apply_kwargs(config: Any, kwargs: dict, name: str) -> None:
    """Model keyword arguments are config attributes that already exist, with values of their type."""
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise TypeError(f"{type(config).__name__} of {name!r} has no attribute {key!r}")
        old = getattr(config, key)
        kinds = (int, float) if isinstance(old, float) else (type(old),)
        if old is not None and (not isinstance(value, kinds) or isinstance(value, bool) != isinstance(old, bool)):
            raise TypeError(f"{key} of {name!r} is a {type(old).__name__} ({old!r}): got {value!r}")
        setattr(config, key, value)


def load_hf(
    name: str, *, pretrained: bool = True, unreachable: Any = None, offline_mode: Any = None, **kwargs: Any
) -> torch.nn.Module:
    """Load a ``transformers`` vision transformer by ``hf:`` name (see the module's description).

    Parameters
    ----------
    name : str
        ``"hf:<repo id>"``, ``"hf:<repo id>@<revision>"`` (branch, tag or commit) or ``"hf:<folder>"``.
    pretrained : bool, default True
        Load the weights; ``False``: the config's architecture with random weights (seeded by the caller).
    unreachable : callable, optional
        ``() -> bool``: the Hub cannot be reached (asked only for a repo id without ``HF_HUB_OFFLINE``);
        :func:`tokvis.zoo.create` passes its one-attempt probe.
    offline_mode : callable, optional
        ``(active: bool) -> context manager`` putting huggingface_hub in offline mode (cached files only).
    **kwargs
        Config attributes to change (e.g. ``image_size``), each an attribute the config has, of its type.

    Returns
    -------
    torch.nn.Module
        The model in ``eval()`` mode, float32, on the CPU; ``_tokvis_name`` is the name traces record.

    Raises
    ------
    MissingDependencyError
        transformers is not installed or too old.
    UnsupportedModelError
        The config's ``model_type`` is not one tokvis supports.
    WeightsError
        The files could not be read: not in the cache while offline (the message names the cache folder),
        a repo or folder without a model, weights missing from the checkpoint.
    TypeError
        A keyword argument the config does not have, or of another type.
    """
    from huggingface_hub import constants

    ref, revision, local = _parse(name)
    transformers = require_transformers(f"model {name!r}")
    if local and not Path(ref).is_dir():
        raise WeightsError(f"model {name!r}: the folder {ref} does not exist (a folder saved with save_pretrained)")
    env_offline = bool(constants.HF_HUB_OFFLINE)
    unreachable = not local and not env_offline and unreachable is not None and bool(unreachable())
    offline = not local and (env_offline or unreachable)
    why = "HF_HUB_OFFLINE is set" if env_offline else "no connection to " + str(constants.ENDPOINT)
    where = {"revision": revision} if revision else {}
    with (offline_mode or (lambda active: contextlib.nullcontext()))(unreachable), _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(ref, **where)
        except (OSError, ValueError) as err:
            if local:
                raise WeightsError(
                    f"model {name!r}: the folder {ref} holds no transformers model config ({_first_sentence(err)}); "
                    "save a model there with model.save_pretrained(folder)"
                ) from err
            raise _fetch_error(name, ref, err, offline=offline, why_offline=why) from err
        cls = _model_class(transformers, config, name)
        config = cls.config_class.from_pretrained(ref, **where)  # CLIP / SigLIP: the vision part of a full config
        _apply_kwargs(config, kwargs, name)
        if pretrained:
            try:
                model, info = cls.from_pretrained(
                    ref, config=config, dtype=torch.float32, output_loading_info=True, **where
                )
            except (OSError, ValueError, RuntimeError) as err:
                if offline and not local:
                    raise _fetch_error(name, ref, err, offline=True, why_offline=why) from err
                raise WeightsError(f"model {name!r}: its weights could not be loaded ({_first_sentence(err)})") from err
            missing = [k for k in info.get("missing_keys", ()) if not k.endswith("mask_token")]
            if missing or info.get("mismatched_keys"):
                bad = missing or [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
                raise WeightsError(
                    f"model {name!r}: its checkpoint does not hold every weight of {cls.__name__} ({len(bad)} "
                    f"missing or of another shape, e.g. {bad[:3]}); check the model keyword arguments, or use the "
                    "checkpoint's own class"
                )
        else:
            model = cls(config)
        try:
            settings = transformers.ImageProcessingMixin.get_image_processor_dict(ref, **where)[0]
        except (OSError, ValueError):
            settings = None
    commit = None if local else _cached_commit(ref, revision)
    hf_name = f"{HF_PREFIX}{ref}"
    model._tokvis_hf = {"name": hf_name, "revision": commit}
    model._tokvis_name = (f"{hf_name}@{commit}" if commit else hf_name) + ("" if pretrained else "(random)")
    if settings is not None:
        set_image_processor(model, settings)
    return model.float().eval()


def processor_data_config(settings: dict, *, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """timm's data configuration of an image processor's settings (``preprocessor_config.json``).

    Resize to ``size`` (``{"height", "width"}``: to that size; ``{"shortest_edge"}``: the short side, then
    the centre ``crop_size``), with ``resample``; scale to [0, 1]; normalise with ``image_mean`` /
    ``image_std``.  timm's evaluation transform does the same with ``crop_mode="squash"`` (height and
    width) or ``"center"`` and ``crop_pct = crop / shortest edge``.

    Parameters
    ----------
    settings : dict
        The image processor's settings (``processor.to_dict()``).
    image_size : (int, int), optional
        The model's input size: it replaces the processor's output size, keeping the crop fraction (as
        timm's data configuration does with the model's ``img_size``).

    Returns
    -------
    dict
        ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``.

    Raises
    ------
    UnsupportedModelError
        Settings the transform cannot reproduce (no resize, another rescale factor, a non-square crop after
        a shortest-edge resize, a longest-edge limit).
    """
    import math

    s = dict(settings)

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"the model's image processor ({s.get('image_processor_type', 'settings')}) {what}, which tokvis' "
            "image transform does not reproduce; prepare the images yourself and call the model directly"
        )

    if not s.get("do_resize", True):
        raise refuse("does not resize the images (do_resize=False)")
    if s.get("do_rescale", True) and abs(float(s.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise refuse(f"rescales by {s.get('rescale_factor')} instead of 1/255")
    if not s.get("do_rescale", True):
        raise refuse("does not rescale the pixels to [0, 1] (do_rescale=False)")
    resample = s.get("resample", 2)
    resample = int(getattr(resample, "value", resample))
    if resample not in _RESAMPLE:
        raise refuse(f"resamples with filter {resample}")
    if s.get("do_normalize", True):
        mean, std = s.get("image_mean"), s.get("image_std")
        if mean is None or std is None:
            raise refuse("normalises without image_mean / image_std in its settings")
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    size = s.get("size")
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = s.get("crop_size") if s.get("do_center_crop") else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if not isinstance(size, dict):
        raise refuse(f"has size {size!r}")
    if size.get("longest_edge") is not None:
        raise refuse("limits the longest edge")
    if "height" in size and "width" in size:
        out = (int(size["height"]), int(size["width"]))
        if crop and (int(crop["height"]), int(crop["width"])) != out:
            raise refuse(f"crops {crop} out of a {out} resize")
        mode, pct = "squash", 1.0
    elif "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if not crop or int(crop["height"]) != int(crop["width"]):
            raise refuse(f"resizes the short side to {short} without a square centre crop (crop_size {crop})")
        side = int(crop["height"])
        if side > short:
            raise refuse(f"crops {side} px out of a {short} px short side")
        out, mode, pct = (side, side), "center", side / short
        while math.floor(side / pct) < short:  # timm resizes to floor(crop / crop_pct): make that the short side
            pct = math.nextafter(pct, 0.0)
    else:
        raise refuse(f"has size {size}")
    if image_size is not None:
        out = (int(image_size[0]), int(image_size[1]))
    return {
        "input_size": (3, *out),
        "interpolation": _RESAMPLE[resample],
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": pct,
        "crop_mode": mode,
    }


def set_image_processor(model: torch.nn.Module, processor: Any) -> torch.nn.Module:
    """Give a ``transformers`` model the image transform of ``processor`` (what :func:`load_hf` does itself).

    Parameters
    ----------
    model : torch.nn.Module
        A supported ``transformers`` model (:func:`tokvis.backbones.backbone_for`).
    processor : image processor, dict, str or os.PathLike
        An image processor object, its settings (``to_dict()``), or a repo id / folder holding a
        ``preprocessor_config.json``.

    Returns
    -------
    model
        The same model; :func:`tokvis.data.transform_for` now builds its transform.
    """
    from tokvis.backbones import backbone_for

    adapter = backbone_for(model)
    if isinstance(processor, (str, os.PathLike)):
        transformers = require_transformers("reading an image processor")
        processor = transformers.ImageProcessingMixin.get_image_processor_dict(os.fspath(processor))[0]
    settings = processor if isinstance(processor, dict) else processor.to_dict()
    size = None if adapter.dynamic_img_size(model) else adapter.patch_embed(model).img_size
    model._tokvis_data_config = processor_data_config(settings, image_size=size)
    return model
