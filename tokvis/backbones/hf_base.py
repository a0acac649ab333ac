"""What the Hugging Face ``transformers`` vision transformers share: pre-norm encoder layers with separate query /
key / value projections, described to patching by the names of their modules.

A family (``hf_dinov2``, ``hf_vit``, ``hf_clip``, ``hf_siglip``) is a :class:`HFPreNormViT` with its class names and
module names; no method of the adapter branches on the family.  The patched layer computes the attention itself
(tokvis' fused attention with its extension points), so the model's attention implementation
(``config._attn_implementation``) is not used, and what ``transformers`` collects through the attention modules
(``output_attentions``) would be missing: such calls are refused (:func:`check_hf_call`), as are attention masks
(token reduction changes the sequence length).  Position embeddings are absolute (added before the first layer):
there are no positions to follow.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.backbones.base import Backbone
from tokvis.errors import DataError, TokvisError, UnsupportedModelError

#: the lowest transformers version whose ViT, DINOv2, CLIP and SigLIP layers all have the layout the adapters read
#: (separate ``q_proj`` / ``k_proj`` / ``v_proj``: DINOv2 has them from 5.18 on; 5.0 - 5.17 fail the adapter tests)
MIN_TRANSFORMERS = "5.18.0"


class _Dropout:
    """An attention-probability dropout of rate ``p`` (HF modules hold a float, not a module)."""

    def __init__(self, p: float, training: bool) -> None:
        self.p, self.training = float(p), training

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return F.dropout(t, self.p, self.training) if self.p else t


class HFAttentionView:
    """What the patched attention reads from an attention module (``scale``, ``fused_attn``, ``attn_drop``,
    ``training``), for an HF attention module (``scaling`` or ``scale``; ``attention_dropout`` or ``dropout``).

    Parameters
    ----------
    module : nn.Module
        An HF self-attention module.
    """

    fused_attn = True

    def __init__(self, module: nn.Module) -> None:
        scale = getattr(module, "scaling", None)
        self.scale = float(module.scale if scale is None else scale)
        self.training = module.training
        p = getattr(module, "attention_dropout", None)
        self.attn_drop = _Dropout(module.dropout if p is None else p, module.training)


def check_hf_call(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise :class:`~tokvis.errors.TokvisError` for an HF call a patched model cannot honour.

    Parameters
    ----------
    model : nn.Module
        A patched ``transformers`` model.
    args, kwargs : tuple, dict
        The call's arguments.
    """
    if kwargs.get("attention_mask") is not None:
        raise TokvisError(
            "token reduction changes the sequence length, so an attention mask cannot be used with a patched "
            "model; call it without attention_mask (or tokvis.unpatch(model) first)"
        )
    wants = kwargs.get("output_attentions")
    if wants is None:
        wants = getattr(getattr(model, "config", None), "output_attentions", False)
    if wants:
        raise TokvisError(
            "a patched model computes its attention in tokvis, so output_attentions=True would return no "
            "attention maps; call it with output_attentions=False (and config.output_attentions=False) and use "
            "tokvis.attention_maps(model, images) for the maps"
        )


def _classes(names: tuple[str, ...]) -> tuple[type, ...]:
    """The classes ``"module:Class"`` that can be imported (none when transformers is missing)."""
    out = []
    for name in names:
        module, _, cls = name.partition(":")
        try:
            out.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def _path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class HFPreNormViT(Backbone):
    """A ``transformers`` vision transformer of pre-norm layers, described by module names (subclass per family)."""

    #: "module:Class" of the accepted models and of their layers
    model_classes: tuple[str, ...] = ()
    layer_classes: tuple[str, ...] = ()
    #: in the base model (``model.base_model``): the layers and the patch convolution
    layers_path = "encoder.layer"
    patch_conv_path = "embeddings.patch_embeddings.projection"
    #: in a layer: the norms, the attention, its output projection, layer scales (or ""), drop path (or "")
    norm1_name, norm2_name, attention_name, out_proj_name = "norm1", "norm2", "attention", "o_proj"
    ls1_name, ls2_name, drop_name = "", "", ""
    has_class_token = True
    #: the model interpolates its position embedding to any image size by itself
    dynamic = False
    input_name = "pixel_values"
    #: the classifier head of a model class that has one (its input is the pooled feature), else ""
    classifier_name = ""
    #: the pooled feature of an output without ``pooler_output``: "cls" (the first token) or "mean" (of the tokens)
    fallback_pool = "cls"

    def accepts(self, model: nn.Module) -> bool:
        classes = _classes(self.model_classes)
        return bool(classes) and isinstance(model, classes)

    def describe(self, model: nn.Module):
        from tokvis.backbones.base import ModelInfo

        layer_classes = _classes(self.layer_classes)
        blocks = self.blocks(model)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(f"the model has no encoder layers ({self.layers_path})")
        for i, blk in enumerate(blocks):
            base = getattr(type(blk), "_tokvis_original_class", type(blk))
            if base not in layer_classes:
                raise UnsupportedModelError(
                    f"layer {i} is a {base.__module__}.{base.__name__}; tokvis supports "
                    + " / ".join(c.__name__ for c in layer_classes)
                )
            attn = getattr(blk, self.attention_name)
            if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", self.out_proj_name)):
                raise UnsupportedModelError(
                    f"layer {i}'s attention has no q_proj / k_proj / v_proj / {self.out_proj_name}: this transformers "
                    f"version lays the model out differently from the ones tokvis supports (transformers>="
                    f'{MIN_TRANSFORMERS}): pip install "tokvis[hf]" --upgrade'
                )
        cfg = model.config
        pe = self.patch_embed(model)
        grid = tuple(int(s) // int(p) for s, p in zip(pe.img_size, pe.patch_size, strict=True))
        return ModelInfo(
            depth=len(blocks),
            num_prefix_tokens=int(self.has_class_token) + int(getattr(cfg, "num_register_tokens", 0) or 0),
            has_class_token=self.has_class_token,
            embed_dim=int(cfg.hidden_size),
            num_heads=int(cfg.num_attention_heads),
            grid_size=grid,  # type: ignore[arg-type]
            dynamic_img_size=self.dynamic,
        )

    def blocks(self, model: nn.Module) -> nn.Module:
        return _path(model.base_model, self.layers_path)

    def attention(self, block: nn.Module) -> Any:
        return HFAttentionView(getattr(block, self.attention_name))

    def norm1(self, block, x):
        return getattr(block, self.norm1_name)(x)

    def project(self, block, h, positions, rope=None):
        attn = getattr(block, self.attention_name)
        B, T, _ = h.shape
        shape = (B, T, -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        return q, k, v, None

    def attention_output(self, block, heads, gate):
        B, H, T, d = heads.shape
        return getattr(getattr(block, self.attention_name), self.out_proj_name)(
            heads.transpose(1, 2).reshape(B, T, H * d)
        )

    def _residual(self, block, y, scale_name):
        if scale_name:
            y = getattr(block, scale_name)(y)
        return getattr(block, self.drop_name)(y) if self.drop_name else y

    def attention_residual(self, block, y):
        return self._residual(block, y, self.ls1_name)

    def mlp_residual(self, block, x):
        return self._residual(block, block.mlp(getattr(block, self.norm2_name)(x)), self.ls2_name)

    # -- inputs -----------------------------------------------------------------------------------
    def patch_embed(self, model: nn.Module) -> Any:
        conv = _path(model.base_model, self.patch_conv_path)
        cfg = model.config
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
        return SimpleNamespace(
            proj=conv, patch_size=tuple(conv.kernel_size), img_size=tuple(int(s) for s in size), dynamic_img_pad=False
        )

    def dynamic_img_size(self, model: nn.Module) -> bool:
        return self.dynamic

    def grid_for_input(self, model, hw):
        ph, pw = self.patch_embed(model).patch_size
        return int(hw[0]) // ph, int(hw[1]) // pw

    def check_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        check_hf_call(model, args, kwargs)

    # -- images in, features out ------------------------------------------------------------------
    def data_config(self, model: nn.Module) -> dict[str, Any]:
        cfg = getattr(model, "_tokvis_data_config", None)
        if cfg is None:
            raise DataError(
                f"the image transform of a transformers {type(model).__name__} comes from its image processor "
                "(preprocessor_config.json), which tokvis does not know for this model: load it with "
                "tokvis.zoo.create('hf:<repo id or folder>'), or give the processor with "
                "tokvis.hf_zoo.set_image_processor(model, processor)"
            )
        return dict(cfg)

    def _head(self, model: nn.Module) -> nn.Module | None:
        return getattr(model, self.classifier_name, None) if self.classifier_name else None

    def num_classes(self, model: nn.Module) -> int:
        head = self._head(model)
        return int(head.out_features) if isinstance(head, nn.Linear) else 0

    def pooled_and_logits(self, model, x):
        head = self._head(model)
        if head is None:
            out = model(pixel_values=x)
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                tokens = out.last_hidden_state
                pooled = tokens[:, 0] if self.fallback_pool == "cls" else tokens.mean(1)
            return pooled, None
        seen: list[torch.Tensor] = []  # the head's input is the pooled feature
        handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            out = model(pixel_values=x)
        finally:
            handle.remove()
        return seen[-1], (out.logits if isinstance(head, nn.Linear) else None)
