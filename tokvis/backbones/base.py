"""The backbone interface: what patching needs from a family of vision transformers.

A :class:`Backbone` adapter describes one family (timm ``VisionTransformer``, timm ``Eva``, ...)
to :mod:`tokvis.patching` without the patched block or any method knowing which family it is:

* the model's blocks, and its prefix tokens, grid and widths (:meth:`Backbone.describe`);
* per block: the pre-attention norm, the attention projections (queries, keys, values after their
  q/k norms and rotary embeddings, and an output gate), the attention's scale, the path from the
  heads back to the residual stream (scale-norm, gate, projection, layer scale, drop path), and
  the MLP branch;
* the positions of the tokens (:class:`TokenPositions`), for families whose attention uses them
  (rotary embeddings): they follow every decision so that each token keeps its position.

Every adapter calls the model's own modules; none copies a library's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokvis.errors import UnsupportedModelError
from tokvis.trace import LayerDecision

__all__ = ["Backbone", "ModelInfo", "TokenPositions", "check_timm_blocks", "timm_data_config", "timm_model_info"]


@dataclass(frozen=True)
class ModelInfo:
    """What a method may want to know about the model it is applied to."""

    depth: int
    num_prefix_tokens: int
    has_class_token: bool
    embed_dim: int
    num_heads: int
    grid_size: tuple[int, int]
    dynamic_img_size: bool
    gated_attention: bool = False

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


class TokenPositions:
    """Per-forward positions of the patch tokens of a patched model (none for absolute embeddings).

    A family with positions applied inside the attention (rotary embeddings) returns one of these
    from :meth:`Backbone.start_positions`; patching calls :meth:`follow` after each decision.
    """

    def follow(self, decision: LayerDecision) -> "TokenPositions":  # pragma: no cover - abstract
        """The positions of the tokens ``decision`` produces."""
        raise NotImplementedError


class Backbone:
    """Adapter of one model family (subclass per family; instances are stateless).

    The default implementations fit timm-style pre-norm blocks (``norm1``, ``attn``, ``ls1``,
    ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``); a family overrides what differs.
    """

    #: short name of the family, e.g. "timm-vit"
    family: str = ""

    # -- the model --------------------------------------------------------------------------------
    def accepts(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (its class, not yet its blocks)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self, model: nn.Module) -> Any:
        """Check every block of ``model`` and return its :class:`ModelInfo`.

        Raises
        ------
        UnsupportedModelError
            A block or attention layer of a kind the adapter cannot patch.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def blocks(self, model: nn.Module) -> nn.Module:
        """The transformer blocks, in order (an ``nn.Sequential`` or ``nn.ModuleList``)."""
        return model.blocks

    # -- one block --------------------------------------------------------------------------------
    def attention(self, block: nn.Module) -> nn.Module:
        """The block's attention module (``scale``, ``fused_attn``, ``attn_drop`` are read from it)."""
        return block.attn

    def norm1(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The block's pre-attention normalisation."""
        return block.norm1(x)

    def project(
        self, block: nn.Module, h: torch.Tensor, positions: TokenPositions | None, rope: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Queries, keys, values ``[B, H, T, d]`` (q/k norms and positions applied) and the output gate.

        Parameters
        ----------
        block : nn.Module
        h : Tensor [B, T, C]
            Normalised tokens (output of :meth:`norm1`).
        positions : TokenPositions or None
            Positions of the current tokens (``None``: the unreduced sequence).
        rope : Any
            What the model passed to the block for its positions (rotary table), if anything.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def project_parts(
        self, block: nn.Module, h: torch.Tensor, positions: TokenPositions | None, rope: Any, parts: str
    ) -> Any:
        """Some of :meth:`project`'s outputs: ``parts="qk"`` -> ``(q, k)``, ``parts="v"`` -> ``v``.

        For a method that projects only what it uses (MCTF's one-step-ahead attention: queries and
        keys of the block's input, values of the fused tokens alone).  The default computes every
        projection and picks; an adapter that can run only the rows it needs overrides it.
        """
        q, k, v, _ = self.project(block, h, positions, rope)
        return (q, k) if parts == "qk" else v

    def attention_output(self, block: nn.Module, heads: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Heads ``[B, H, T, d]`` -> tokens ``[B, T, C]`` through the attention's norm, gate and projection."""
        attn = self.attention(block)
        B, H, T, d = heads.shape
        out = heads.transpose(1, 2).reshape(B, T, H * d)
        norm = getattr(attn, "norm", None)  # scale-norm
        if norm is not None:
            out = norm(out)
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))

    def attention_residual(self, block: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The attention branch's contribution to the residual stream (layer scale, drop path)."""
        return block.drop_path1(block.ls1(y))

    def mlp_residual(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch's contribution to the residual stream for tokens ``x``."""
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    # -- positions --------------------------------------------------------------------------------
    def start_positions(
        self, model: nn.Module, options: dict, rope: Any, x: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> TokenPositions | None:
        """Positions of the unreduced tokens ``x`` (patch ``grid`` of the input) at block 0 (``None``: none)."""
        return None

    def check_positions(self, model: nn.Module, options: dict) -> None:
        """Raise :class:`~tokvis.errors.UnsupportedModelError` if the position options cannot be honoured."""

    # -- inputs -----------------------------------------------------------------------------------
    #: the keyword of the images in the model's forward (besides the first positional argument)
    input_name: str = "x"

    def images(self, args: tuple, kwargs: dict) -> Any:
        """The images of a call ``model(*args, **kwargs)`` (``None`` when it has none)."""
        return args[0] if args else kwargs.get(self.input_name)

    def check_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Raise a :class:`~tokvis.errors.TokvisError` for call options a patched model cannot honour."""

    def patch_embed(self, model: nn.Module) -> Any:
        """The patch embedding: ``proj`` (the convolution), ``patch_size``, ``img_size``, and optionally
        ``strict_img_size`` / ``dynamic_img_pad`` (timm's ``PatchEmbed`` or a view with those attributes)."""
        return model.patch_embed

    def dynamic_img_size(self, model: nn.Module) -> bool:
        """Whether the model takes images of other sizes than ``patch_embed(model).img_size``."""
        return bool(getattr(model, "dynamic_img_size", False))

    def grid_for_input(self, model: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid the model produces for an input of size ``hw``."""
        pe = model.patch_embed
        if getattr(model, "dynamic_img_size", False):
            return tuple(int(v) for v in pe.dynamic_feat_size(hw))  # type: ignore[return-value]
        return tuple(int(v) for v in pe.grid_size)  # type: ignore[return-value]

    # -- images in, features out ------------------------------------------------------------------
    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """timm's data configuration (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
        ``crop_mode``) of the images the model takes: what :func:`tokvis.data.transform_for` builds its
        transform from."""
        return timm_data_config(model)

    def num_classes(self, model: nn.Module) -> int:
        """Classes of the model's classifier head (0: no head)."""
        return int(getattr(model, "num_classes", 0) or 0)

    def pooled_and_logits(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward of ``model`` on images ``x``: the pooled final feature ``[B, C]`` (pre-logits, what the
        head classifies) and the logits ``[B, classes]`` (``None`` without a head)."""
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        return pooled, (model.forward_head(feats) if self.num_classes(model) else None)


def check_timm_blocks(
    blocks: Any, block_cls: type, attention_classes: tuple[type, ...], block_hint: str, attention_hint: str
) -> None:
    """Raise :class:`~tokvis.errors.UnsupportedModelError` unless every block is a ``block_cls`` (patched or
    not) with an attention of one of ``attention_classes``; the hints end the messages (what is supported)."""
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise UnsupportedModelError("the model has no sequence of blocks (model.blocks)")
    for i, blk in enumerate(blocks):
        base = getattr(type(blk), "_tokvis_original_class", type(blk))
        if base is not block_cls:
            raise UnsupportedModelError(f"block {i} is a {base.__module__}.{base.__name__}; {block_hint}")
        if type(blk.attn) not in attention_classes:
            a = type(blk.attn)
            raise UnsupportedModelError(f"block {i} uses attention {a.__module__}.{a.__name__}; {attention_hint}")


def timm_model_info(model: nn.Module) -> Any:
    """:class:`ModelInfo` of a checked timm model with ``blocks``, ``patch_embed``,
    ``num_prefix_tokens``, ``cls_token`` and ``embed_dim`` (ViT and Eva alike)."""
    blocks = model.blocks
    return ModelInfo(
        depth=len(blocks),
        num_prefix_tokens=int(model.num_prefix_tokens),
        has_class_token=getattr(model, "cls_token", None) is not None,
        embed_dim=int(model.embed_dim),
        num_heads=int(blocks[0].attn.num_heads),
        grid_size=tuple(int(v) for v in model.patch_embed.grid_size),  # type: ignore[arg-type]
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        gated_attention=any(getattr(b.attn, "gate", None) is not None for b in blocks),
    )


def _model_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) the model's patch embedding was built for, or None when it does not say."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        return None
    if isinstance(img_size, int):
        return (img_size, img_size)
    try:
        h, w = (int(v) for v in img_size)
    except (TypeError, ValueError):
        return None
    return (h, w)


def timm_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data configuration of a timm model, at the input size the model was built with.

    ``timm.data.resolve_data_config`` reads the *pretrained* config, which can report another
    input size than the one the model was created with (a ``vit_tiny_patch16_224`` created with
    ``img_size=64`` still reports 224); the model's ``patch_embed.img_size`` wins.

    Parameters
    ----------
    model : nn.Module
        A timm model (anything ``timm.data.resolve_data_config`` accepts).
    """
    import timm.data

    cfg = dict(timm.data.resolve_data_config({}, model=model))
    size = _model_input_size(model)
    if size is not None:
        cfg["input_size"] = (cfg.get("input_size", (3,))[0], *size)
    return cfg
