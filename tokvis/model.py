"""What tokvis needs to know about a timm ViT: prefix tokens, grid, image checks (no patching).

The one low module that :mod:`tokvis.patching` and :mod:`tokvis.recording` both import (and
neither of them is imported here), so that patching and recording do not depend on each other
in a circle:

``tokvis.model``  <-  ``tokvis.recording``  <-  ``tokvis.patching``

The patch state of a patched model lives in ``model._tokvis`` (set by :func:`tokvis.patch`,
removed by :func:`tokvis.unpatch`); :func:`patch_state` and :func:`is_patched` read it here so
that recording can describe a patched model without importing the patching code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokvis.backbones.base import ModelInfo
from tokvis.backbones.timm_vit import attn_dim, timm_classes
from tokvis.errors import ImageSizeError, ImageValueError

__all__ = [
    "ModelInfo",
    "model_info",
    "backbone_name",
    "grid_for_input",
    "check_images",
    "is_patched",
    "patch_state",
    "timm_classes",
    "attn_dim",
]


def model_info(model: nn.Module) -> ModelInfo:
    """Check that ``model`` is a supported vision transformer and describe it.

    The model's family adapter (:func:`tokvis.backbones.backbone_for`) checks its blocks.

    Raises
    ------
    UnsupportedModelError
        Not a model of a supported family, or a block / attention layer of a kind
        tokvis cannot patch; the message names the unsupported part.
    """
    from tokvis.backbones import backbone_for

    return backbone_for(model).describe(model)


def backbone_name(model: nn.Module) -> str:
    """The name traces record for the model (the zoo's label, timm's architecture, or the class name)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(getattr(model, "_tokvis_name", None) or cfg.get("architecture") or type(model).__name__)


def grid_for_input(model: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    """Patch grid the model produces for an input of size ``hw``."""
    from tokvis.backbones import backbone_for

    return backbone_for(model).grid_for_input(model, hw)


def _model_dtype(pe: Any) -> torch.dtype | None:
    weight = getattr(getattr(pe, "proj", None), "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else None


def check_images(model: nn.Module, images: Any) -> None:
    """Raise :class:`ImageSizeError` if ``images`` cannot go through ``model``.

    Checks: a float tensor ``[B, C, H, W]`` with the model's channel count and floating dtype
    (under ``torch.autocast`` any float dtype passes: autocast casts), finite pixel values, and
    either the model's fixed input size, or (``dynamic_img_size=True``) sides divisible by the
    patch size (unless the model pads dynamically).

    Images are never converted silently: a float16 / float64 batch for a float32 model raises
    with the conversion to make (``images.to(torch.float32)``).  The finiteness check reads one
    boolean back from the images' device (one synchronisation per forward, before the model runs).

    Raises
    ------
    ImageSizeError
        Wrong type, number of dimensions, dtype, channels or size.
    ImageValueError
        Some images hold NaN or infinite pixels (a subclass of ``ImageSizeError``); the message
        names how many and which batch positions.
    """
    if not isinstance(images, torch.Tensor):
        raise ImageSizeError(f"images must be a float tensor [B, 3, H, W]: got {type(images).__name__}")
    if images.dim() != 4:
        raise ImageSizeError(
            f"images must be 4-D [B, C, H, W]: shape is {tuple(images.shape)}"
            + ("; add a batch dimension with images.unsqueeze(0)" if images.dim() == 3 else "")
        )
    if not images.is_floating_point():
        raise ImageSizeError(
            f"images must be a float tensor (normalised with the model's transform): dtype is {images.dtype}; "
            "use tokvis.data.transform_for(model)"
        )
    from tokvis.backbones import backbone_for

    bb = backbone_for(model)
    pe = bb.patch_embed(model)
    dtype = _model_dtype(pe)
    if dtype is not None and images.dtype != dtype and not torch.is_autocast_enabled(images.device.type):
        raise ImageSizeError(
            f"images are {images.dtype} but the model's weights are {dtype}: convert the images with "
            f"images.to({dtype}) (or the model with model.to({images.dtype}))"
        )
    chans = getattr(pe.proj, "in_channels", None)
    if chans is not None and images.shape[1] != chans:
        raise ImageSizeError(f"the model takes {chans}-channel images: got {images.shape[1]} channels")
    H, W = images.shape[-2:]
    ph, pw = pe.patch_size
    if bb.dynamic_img_size(model):
        if not getattr(pe, "dynamic_img_pad", False) and (H % ph or W % pw):
            raise ImageSizeError(
                f"image size {H}x{W} is not divisible by the patch size {ph}x{pw}; resize or crop to a "
                f"multiple, e.g. {H // ph * ph}x{W // pw * pw}"
            )
    elif getattr(pe, "strict_img_size", True) and (H, W) != tuple(pe.img_size):
        h, w = pe.img_size
        raise ImageSizeError(
            f"the model expects {h}x{w} images: got {H}x{W}. Resize the images (tokvis.data.transform_for) "
            "or create the model with dynamic_img_size=True for other sizes"
        )
    elif H % ph or W % pw:
        raise ImageSizeError(f"image size {H}x{W} is not divisible by the patch size {ph}x{pw}")
    # one host sync per forward, at its entry; not on the meta device (no values) nor inside torch.compile
    # (a host read there breaks the graph in two: compiled forwards trust their inputs)
    if (
        images.numel()
        and images.device.type != "meta"
        and not torch.compiler.is_compiling()
        and not _all_finite(images)
    ):
        bad = (~torch.isfinite(images.detach())).flatten(1).any(1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ImageValueError(
            f"{len(bad)} of {images.shape[0]} images hold NaN or infinite pixels (batch positions {shown}); "
            "the model would return NaN and a meaningless trace. Check how the images were read and normalised"
        )


def _all_finite(images: torch.Tensor) -> bool:
    """Whether every value is finite, with one reduction and one host read in the common case: a sum is
    finite exactly when all its terms are, unless it overflows, and a non-finite sum (NaN or inf pixels, or an
    overflow) is checked value by value.  ``isfinite(images).all()`` writes a mask of the whole batch first
    (one CPU thread, measured: 229 vs 10 us for one 224 px image, 43 vs 0.8 ms for 64)."""
    if bool(torch.isfinite(images.detach().sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(images).all())


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`tokvis.patch` has patched ``model`` (and :func:`tokvis.unpatch` has not undone it).

    Parameters
    ----------
    model : nn.Module
        Any model.
    """
    return getattr(model, "_tokvis", None) is not None


def patch_state(model: nn.Module) -> Any:
    """The patch state :func:`tokvis.patch` attached to ``model`` (method, schedule, ...), or ``None``."""
    return getattr(model, "_tokvis", None)
