"""Apply / remove a reduction method on a vision transformer (timm ``VisionTransformer``, ``Eva``, ...).

Patching swaps the class of every block for a subclass whose ``forward`` calls
the block's *own* submodules through the model family's adapter
(:mod:`tokvis.backbones`: for timm's ViT ``norm1``, ``attn.qkv``,
``attn.q_norm`` / ``k_norm``, ``attn.norm``, ``attn.gate``, ``attn.proj``,
``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``), so
LayerScale, qk-norm, gated / scale-normed attention and rotary embeddings keep
working.  No library forward is copied.  At a reducing block the method is asked
for a decision after the attention residual and before the MLP; the one shared
:func:`tokvis.methods.ops.apply_decision` applies it.

Extension points of the patched attention (:func:`attention_forward`): an
additive logit ``bias`` (ToMe's proportional attention adds ``log(size)``),
and the returned keys / class-token attention row (head mean or per head) /
full attention map that a method declares in ``needs``.  Only ``"attn"``
computes the explicit ``[B, H, T, T]`` map; the class-token rows come from the
class token's query alone, beside the fused ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.backbones import Backbone, TokenPositions, backbone_for
from tokvis.backbones.timm_vit import TimmViT
from tokvis.errors import ArgumentTypeError, MethodOptionError, TokvisError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import apply_decision, decision_dtype
from tokvis.methods.registry import create_method
from tokvis.model import (  # noqa: F401  (model_info, check_images, ... stay importable from here)
    ModelInfo,
    backbone_name,
    check_images,
    grid_for_input,
    is_patched,
    model_info,
    patch_state,
)
from tokvis.recording import report
from tokvis.schedule import Schedule, make_schedule
from tokvis.trace import LayerDecision
from tokvis.validate import check_choice

#: where a merged token sits for rotary position embeddings (:func:`patch`'s ``merge_position``)
MERGE_POSITIONS = ("destination", "mean")

__all__ = ["patch", "unpatch", "is_patched", "model_info", "attention_forward", "check_images"]


# --------------------------------------------------------------------------------------------------
# attention with extension points


@dataclass
class AttentionExtras:
    keys: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    cls_attn_heads: torch.Tensor | None = None
    attn: torch.Tensor | None = None


def attention_forward(
    attn: nn.Module,
    x: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    num_prefix: int = 1,
    need_keys: bool = False,
    need_cls: bool = False,
    need_cls_heads: bool = False,
    need_attn: bool = False,
) -> tuple[torch.Tensor, AttentionExtras]:
    """timm ``Attention.forward`` through the module's own layers, with extension points.

    Parameters
    ----------
    attn : timm Attention
    x : Tensor [B, T, C]
        Normalised tokens (output of ``norm1``).
    bias : Tensor [B, T], optional
        Added to the attention logits of every query for each key (proportional
        attention: ``log(size)``).
    num_prefix : int
        Prefix tokens; the class token, when asked for, is token 0.
    need_keys, need_cls, need_cls_heads, need_attn : bool
        Also return the keys ``[B, H, T, d]``, the head-mean class-token attention
        to the patch tokens ``[B, T - num_prefix]``, the per-head one
        ``[B, H, T - num_prefix]`` (always the one-row path, :func:`_cls_heads`),
        or the full attention probabilities ``[B, H, T, T]``.
    """
    q, k, v, gate = _TIMM_VIT.project(_AttnHolder(attn), x, None)
    out, extras = _attend(
        attn, q, k, v, bias=bias, num_prefix=num_prefix, need_keys=need_keys, need_cls=need_cls,
        need_cls_heads=need_cls_heads, need_attn=need_attn,
    )  # fmt: skip
    return _TIMM_VIT.attention_output(_AttnHolder(attn), out, gate), extras


_TIMM_VIT = TimmViT()


class _AttnHolder:
    """A stand-in block that holds only an attention module (for :func:`attention_forward`)."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn


def _attend(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    num_prefix: int,
    need_keys: bool = False,
    need_cls: bool = False,
    need_cls_heads: bool = False,
    need_attn: bool = False,
) -> tuple[torch.Tensor, AttentionExtras]:
    """The attention heads ``[B, H, T, d]`` of ``q``, ``k``, ``v`` (fused unless the map is needed) and the
    extras asked for; ``attn`` gives the scale, dropout and whether the module uses the fused kernel."""
    mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
    extras = AttentionExtras(keys=k if need_keys else None)
    if need_cls_heads:
        extras.cls_attn_heads = _cls_heads(attn, q, k, mask, num_prefix)
    if need_attn or not attn.fused_attn:
        probs = _probs(attn, q, k, mask)
        out = attn.attn_drop(probs) @ v
        if need_attn:
            extras.attn = probs
        if need_cls:
            extras.cls_attn = probs[:, :, 0, num_prefix:].mean(1)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
        )
        if need_cls:
            extras.cls_attn = _cls_row(attn, q, k, mask, num_prefix)
    return out, extras


def _probs(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1)


def _cls_row(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, num_prefix: int):
    """Head-mean attention of the class token to the patch tokens ``[B, T - num_prefix]`` (:func:`_cls_heads`)."""
    return _cls_heads(attn, q, k, mask, num_prefix).mean(1)


def _cls_heads(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, num_prefix: int):
    """Attention of the class token to the patch tokens per head ``[B, H, T - num_prefix]``: one query row
    (``q_cls @ k^T``, not the full map; ``mask`` is the additive logit bias ``[B, 1, 1, T]``), in float32
    for fp16 / bf16 models so that rankings do not tie."""
    dt = decision_dtype(q.dtype)
    dev = q.device.type
    with _autocast_off(dev, _autocast_dtype(dev)):
        row = _probs(attn, q[:, :, :1].to(dt), k.to(dt), None if mask is None else mask.to(dt))
    return row[:, :, 0, num_prefix:]


# --------------------------------------------------------------------------------------------------
# patch state and the patched block


@dataclass
class PatchState:
    """Everything a patched model carries, shared by its blocks."""

    method: Method
    schedule: Schedule
    info: ModelInfo
    backbone: Backbone = field(default_factory=TimmViT)
    #: options of the positions that follow the tokens (``merge_position``)
    position_options: dict = field(default_factory=dict)
    hook: Any = None
    model_ref: Any = None  # weakref to the patched model (no module cycle)
    # per forward
    size: torch.Tensor | None = None
    positions: TokenPositions | None = None  # of the current tokens (rotary families), None: unreduced / none
    n_patches: int = 0
    grid: tuple[int, int] | None = None  # patch grid of the images of the current call (input hook)
    # (block, [B, n]): attention received by each patch token in that block, for the next reducing block
    # of a method that needs "prev_attn_received" (see _attn_received)
    attn_received: tuple[int, torch.Tensor] | None = None

    checked: set = field(default_factory=set)

    def begin(self, x: torch.Tensor) -> None:
        self.size = None
        self.attn_received = None
        self.n_patches = x.shape[1] - self.info.num_prefix_tokens
        if self.n_patches not in self.checked:  # other input sizes (dynamic_img_size) need their own check
            self.schedule.check(self.n_patches, self.method.max_removal, removals=keep_rate_removals(self.method))
            self.checked.add(self.n_patches)


def _patched_block_forward(
    self,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    rope: Any = None,
    **kwargs: Any,  # what a transformers encoder passes on to its layers (checked at the model's call)
):
    st: PatchState = self._tokvis_state
    bb = st.backbone
    if attn_mask is not None or is_causal:
        raise TokvisError(
            "token reduction changes the sequence length, so attention masks / causal attention cannot be "
            "used with a patched model; tokvis.unpatch(model) first"
        )
    layer = self._tokvis_index
    p = st.info.num_prefix_tokens
    if layer == 0:  # every forward enters at block 0: reset the per-forward state
        st.begin(x)
        st.positions = bb.start_positions(st.model_ref(), st.position_options, rope, x, st.grid)
    method = st.method
    n_in = x.shape[1] - p
    target = st.schedule.capped_target(
        layer, n_in, st.n_patches, method.max_removal, removals=keep_rate_removals(method)
    )
    if target is not None and method.stage == "before_block":
        ctx = _context(st, layer, x, target, stage="before_block", prev_attn_received=_prev_received(st, layer))
        x, _ = _decide_and_apply(self, st, ctx)
        target = None
    bias = st.size.log() if method.proportional_attention and st.size is not None else None
    attn = bb.attention(self)
    h = bb.norm1(self, x)
    in_attention = target is not None and method.stage == "in_attention"
    if in_attention and not method.input_values:
        # the values of the reduced tokens only (ctx.project_values): q and k of the input
        (q, k), v, gate = bb.project_parts(self, h, st.positions, rope, "qk"), None, None  # gated: refused
    else:
        q, k, v, gate = bb.project(self, h, st.positions, rope)
    if in_attention:
        mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
        # the explicit [B, H, T, T] map only for a method that uses it (MCTF); the class-token rows are one
        # query row each, and the reduced attention itself stays fused (Method.reduced_attention)
        probs = _probs(attn, q, k, mask) if "attn" in method.needs else None
        cls_attn = None
        if "cls_attn" in method.needs:
            cls_attn = probs[:, :, 0, p:].mean(1) if probs is not None else _cls_row(attn, q, k, mask, p)
        ctx = _context(
            st, layer, x, target, stage="in_attention", keys=k, queries=q, values=v, attn=probs, cls_attn=cls_attn,
            cls_attn_heads=_cls_heads(attn, q, k, mask, p) if "cls_attn_heads" in method.needs else None,
            project_values=lambda t: bb.project_parts(self, bb.norm1(self, t), None, None, "v"),
        )  # fmt: skip
        x, decision = _decide_and_apply(self, st, ctx)
        out = method.reduced_attention(ctx, decision, scale=attn.scale, bias=bias)
        x = x + bb.attention_residual(self, bb.attention_output(self, out, gate))
    else:
        needs = method.needs if target is not None else ()
        hand_on = "prev_attn_received" in method.needs and _next_reduces(st, layer, x.shape[1] - p)
        out, extras = _attend(
            attn,
            q,
            k,
            v,
            bias=bias,
            num_prefix=p,
            need_keys="keys" in needs,
            need_cls="cls_attn" in needs,
            need_cls_heads="cls_attn_heads" in needs,
            need_attn="attn" in needs or hand_on,
        )
        x = x + bb.attention_residual(self, bb.attention_output(self, out, gate))
        if target is not None and method.stage == "after_attn":
            ctx = _context(
                st, layer, x, target, keys=extras.keys, cls_attn=extras.cls_attn,
                cls_attn_heads=extras.cls_attn_heads, attn=extras.attn, prev_attn_received=_prev_received(st, layer),
            )  # fmt: skip
            x, _ = _decide_and_apply(self, st, ctx)
        if hand_on:
            st.attn_received = (layer, _attn_received(extras.attn, p))
    x = x + bb.mlp_residual(self, x)
    if target is not None and method.stage == "after_block":  # on the block's output (MCTF without one-step-ahead)
        ctx = _context(
            st, layer, x, target, stage="after_block", keys=extras.keys, cls_attn=extras.cls_attn,
            cls_attn_heads=extras.cls_attn_heads, attn=extras.attn,
        )  # fmt: skip
        x, _ = _decide_and_apply(self, st, ctx)
    return x


def keep_rate_removals(method: Method) -> bool:
    """The method turns a keep rate into per-stage removals (``Schedule.capped_target(removals=True)``):
    its ``keep_rate_removals`` attribute, False when it has none (ToMe's ``budget="study"`` sets it)."""
    return bool(getattr(method, "keep_rate_removals", False))


def _attn_received(probs: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Attention received by each patch token ``[B, n]``: the map ``[B, H, T, T]`` summed over heads and queries
    (float32 for fp16 / bf16 maps), for the need ``"prev_attn_received"`` of the next block's method."""
    return probs.to(decision_dtype(probs.dtype)).sum((1, 2))[:, num_prefix:]


def _next_reduces(st: PatchState, layer: int, n: int) -> bool:
    """Block ``layer + 1`` will remove tokens from the ``n`` patch tokens this block outputs (a block whose budget
    keeps them all leaves this block's fused attention alone: ``keep_rate=1.0`` stays bit for bit unpatched)."""
    if layer + 1 >= st.info.depth:
        return False
    target = st.schedule.capped_target(
        layer + 1, n, st.n_patches, st.method.max_removal, removals=keep_rate_removals(st.method)
    )
    return target is not None and target < n


def _prev_received(st: PatchState, layer: int) -> torch.Tensor | None:
    """The attention received in block ``layer - 1`` when that block handed it on, else ``None``."""
    if st.attn_received is None or st.attn_received[0] != layer - 1:
        return None
    return st.attn_received[1]


def _context(st: PatchState, layer: int, x: torch.Tensor, target: int, **extras) -> ReductionContext:
    # sizes are float32 whatever the model's dtype (fp16 / bf16 count sizes > 256 / 2048 inexactly)
    size = st.size if st.size is not None else x.new_ones(x.shape[:2], dtype=decision_dtype(x.dtype))
    grid = st.grid if st.grid is not None and st.grid[0] * st.grid[1] == st.n_patches else None
    if grid is None and st.info.num_patches == st.n_patches:
        grid = st.info.grid_size
    return ReductionContext(
        layer=layer,
        x=x,
        size=size,
        num_prefix=st.info.num_prefix_tokens,
        target=target,
        n_patches=st.n_patches,
        grid_size=grid,
        **extras,
    )


def _decide_and_apply(block: nn.Module, st: PatchState, ctx: ReductionContext) -> tuple[torch.Tensor, LayerDecision]:
    """Ask the method, announce the decision to recorders, apply it to the tokens and their sizes.

    Outside autocast: a method computes in the dtypes it chooses (float32 decision maths,
    :func:`~tokvis.methods.ops.decision_dtype`), which autocast would silently lower (its matmuls, such as
    ToMe's similarities, ran in bf16 / fp16 under ``torch.autocast`` and flipped partitions a ``.bfloat16()``
    model keeps); the tokens are applied in their own dtype, as in an fp16 / bf16 model.
    """
    dev = ctx.x.device.type
    low = _autocast_dtype(dev)
    ctx.compute_dtype = low or ctx.x.dtype
    with _autocast_off(dev, low):
        decision = st.method.decide(ctx)
        _check_decision(decision, ctx.layer, ctx.x.shape[0], ctx.n_in, st.method)
        report(block, decision)
        x, st.size = apply_decision(ctx.x, ctx.size, decision, num_prefix=ctx.num_prefix)
        if st.positions is not None:
            st.positions = st.positions.follow(decision)
    return x, decision


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast lowers to on ``device_type``, ``None`` when autocast is off there."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_off(device_type: str, autocast_dtype: torch.dtype | None):
    """A context that disables autocast on ``device_type`` when it is on (``autocast_dtype``, from
    :func:`_autocast_dtype`), else does nothing."""
    return torch.autocast(device_type, enabled=False) if autocast_dtype is not None else nullcontext()


def _check_decision(d: LayerDecision, layer: int, B: int, n_in: int, method: Method) -> None:
    if not isinstance(d, LayerDecision):
        raise TypeError(f"method {method.name!r} returned {type(d).__name__}, not a LayerDecision")
    if d.layer != layer or d.dst.shape != (B, n_in):
        raise ValueError(
            f"method {method.name!r} returned a decision for block {d.layer} shaped {tuple(d.dst.shape)}; "
            f"expected block {layer} shaped {(B, n_in)}"
        )


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(
            f"Tokvis{cls.__name__}",
            (cls,),
            {"forward": _patched_block_forward, "_tokvis_original_class": cls, "__module__": __name__},
        )
    return _PATCHED_CLASSES[cls]


# --------------------------------------------------------------------------------------------------
# public API


def patch(
    model: nn.Module,
    method: str | Method,
    *,
    keep_rate: float | None = None,
    r: int | Sequence[int] | None = None,
    locations: Sequence[int] | None = None,
    merge_position: str = "destination",
    **options,
) -> nn.Module:
    """Patch ``model`` in place with a token reduction method and return it.

    Parameters
    ----------
    model : timm VisionTransformer
    method : str or Method
        A registered name (see :func:`tokvis.list_methods`) or a method object.
    keep_rate : float in (0, 1], optional
        Per-stage keep rate: stage ``s`` of ``locations`` keeps ``floor(N * keep_rate**s)``
        patch tokens (default locations: blocks at 1/4, 1/2, 3/4 of the depth).
    r : int or list of int, optional
        Tokens removed at each block (ToMe convention), or one entry per block.
        Give ``keep_rate`` or ``r``, not both.
    locations : list of int, optional
        Blocks where reductions happen.
    merge_position : {"destination", "mean"}
        Models with rotary position embeddings (timm ``Eva``: DINOv3, EVA-02, RoPE ViTs): the
        position a merged token is rotated with, the position of its destination token (the
        default: every token stays on the grid the model was trained on) or the mean of its
        sources' coordinates weighted as the tokens are (the analogue of what merging does to an
        absolute position embedding).  Pruned tokens always keep their own position.  Models with
        absolute position embeddings have no positions to follow: the option does not change them.
    **options
        Method options (when ``method`` is a name).

    Returns
    -------
    model
        The same model, patched.

    Raises
    ------
    UnsupportedModelError, ScheduleError, UnknownMethodError, MethodOptionError

    Notes
    -----
    Patching an already patched model replaces its method (it never stacks).
    ``keep_rate=1.0`` / ``r=0`` leave the outputs equal to the unpatched model's.
    """
    backbone = backbone_for(model)
    info = backbone.describe(model)
    check_choice("merge_position", merge_position, MERGE_POSITIONS, error=MethodOptionError)
    if isinstance(method, str):
        method_obj = create_method(method, **options)
    elif isinstance(method, Method):
        if options:
            raise ArgumentTypeError(
                f"options {sorted(options)} are given with a method object ({method.name!r}); set them when creating "
                f"it (tokvis.create_method({method.name!r}, ...)), or pass the name {method.name!r} with the options"
            )
        method_obj = method
    else:
        raise ArgumentTypeError(
            f"method must be a registered name (tokvis.list_methods()) or a tokvis Method: got {method!r}"
        )
    if locations is None:  # a method may follow its reference code's default locations (MCTF)
        locations = method_obj.default_locations(info.depth, keep_rate=keep_rate, r=r)
    schedule = make_schedule(info.depth, keep_rate=keep_rate, r=r, locations=locations)
    conv = "keep_rate" if keep_rate is not None else "r"
    if conv not in method_obj.conventions:
        raise TokvisError(
            f"method {method_obj.name!r} does not support {conv}=; use "
            + " or ".join(f"{c}=" for c in method_obj.conventions)
        )
    method_obj.check_model(info)
    schedule.check(info.num_patches, method_obj.max_removal, removals=keep_rate_removals(method_obj))
    if is_patched(model):
        unpatch(model)
    method_obj.to(next(model.parameters()).device)
    state = PatchState(
        method=method_obj, schedule=schedule, info=info, backbone=backbone,
        position_options={"merge_position": merge_position}, model_ref=weakref.ref(model),
    )  # fmt: skip
    backbone.check_positions(model, state.position_options)
    for i, blk in enumerate(backbone.blocks(model)):
        blk.__class__ = _patched_class(type(blk))
        blk._tokvis_index = i
        blk._tokvis_state = state
    model.tokvis_method = method_obj  # registered submodule: learned parameters follow .to() / state_dict
    state.hook = model.register_forward_pre_hook(_input_check_hook, with_kwargs=True)
    model._tokvis = state
    return model


def _input_check_hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
    bb = model._tokvis.backbone
    bb.check_call(model, args, kwargs)
    images = bb.images(args, kwargs)
    if images is not None:
        check_images(model, images)
        model._tokvis.grid = grid_for_input(model, tuple(images.shape[-2:]))


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original modules exactly (a no-op for an unpatched model).

    Parameters
    ----------
    model : nn.Module
        A model patched by :func:`patch` (or an unpatched one).
    """
    state: PatchState | None = getattr(model, "_tokvis", None)
    if state is None:
        return model
    for blk in state.backbone.blocks(model):
        orig = getattr(type(blk), "_tokvis_original_class", None)
        if orig is not None:
            blk.__class__ = orig
        for name in ("_tokvis_index", "_tokvis_state"):
            if name in blk.__dict__:
                delattr(blk, name)
    if state.hook is not None:
        state.hook.remove()
    if "tokvis_method" in model._modules:
        del model._modules["tokvis_method"]
    del model._tokvis
    return model
