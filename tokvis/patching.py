"""Apply / remove a reduction method on a timm ``VisionTransformer``.

Patching swaps the class of every timm ``Block`` for a subclass whose
``forward`` calls the block's *own* submodules in timm's order (``norm1``,
``attn.qkv``, ``attn.q_norm`` / ``k_norm``, ``attn.norm``, ``attn.gate``,
``attn.proj``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``,
``drop_path2``), so LayerScale, qk-norm and gated / scale-normed attention keep
working.  No timm forward is copied.  At a reducing block the method is asked
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

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.errors import TokvisError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import apply_decision, decision_dtype
from tokvis.methods.registry import create_method
from tokvis.model import (  # noqa: F401  (model_info, check_images, ... stay importable from here)
    ModelInfo,
    attn_dim,
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
    q, k, v, gate = _qkv(attn, x)
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
    return _attention_output(attn, out, gate), extras


def _qkv(attn: nn.Module, x: torch.Tensor):
    """Queries, keys, values ``[B, H, T, d]`` (after q/k norm) and the output gate of a timm Attention."""
    B, T, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v, gate


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


def _attention_output(attn: nn.Module, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Heads ``[B, H, T, d]`` -> tokens ``[B, T, C]`` through the module's norm, gate and projection."""
    B, _, T, _ = out.shape
    out = out.transpose(1, 2).reshape(B, T, attn_dim(attn))
    norm = getattr(attn, "norm", None)  # scale-norm (timm >= 1.0.16)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


# --------------------------------------------------------------------------------------------------
# patch state and the patched block


@dataclass
class PatchState:
    """Everything a patched model carries, shared by its blocks."""

    method: Method
    schedule: Schedule
    info: ModelInfo
    hook: Any = None
    # per forward
    size: torch.Tensor | None = None
    n_patches: int = 0
    grid: tuple[int, int] | None = None  # patch grid of the images of the current call (input hook)

    checked: set = field(default_factory=set)

    def begin(self, x: torch.Tensor) -> None:
        self.size = None
        self.n_patches = x.shape[1] - self.info.num_prefix_tokens
        if self.n_patches not in self.checked:  # other input sizes (dynamic_img_size) need their own check
            self.schedule.check(self.n_patches, self.method.max_removal)
            self.checked.add(self.n_patches)


def _patched_block_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    st: PatchState = self._tokvis_state
    if attn_mask is not None or is_causal:
        raise TokvisError(
            "token reduction changes the sequence length, so attention masks / causal attention cannot be "
            "used with a patched model; tokvis.unpatch(model) first"
        )
    layer = self._tokvis_index
    p = st.info.num_prefix_tokens
    if layer == 0:  # every forward enters at block 0: reset the per-forward state
        st.begin(x)
    method = st.method
    n_in = x.shape[1] - p
    target = st.schedule.capped_target(layer, n_in, st.n_patches, method.max_removal)
    if target is not None and method.stage == "before_block":
        ctx = _context(st, layer, x, target, stage="before_block")
        x, _ = _decide_and_apply(self, st, ctx)
        target = None
    bias = st.size.log() if method.proportional_attention and st.size is not None else None
    h = self.norm1(x)
    if target is not None and method.stage == "in_attention":
        q, k, v, gate = _qkv(self.attn, h)
        mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
        # the explicit [B, H, T, T] map only for a method that uses it (MCTF); the class-token rows are one
        # query row each, and the reduced attention itself stays fused (Method.reduced_attention)
        probs = _probs(self.attn, q, k, mask) if "attn" in method.needs else None
        cls_attn = None
        if "cls_attn" in method.needs:
            cls_attn = probs[:, :, 0, p:].mean(1) if probs is not None else _cls_row(self.attn, q, k, mask, p)
        ctx = _context(
            st, layer, x, target, stage="in_attention", keys=k, queries=q, values=v, attn=probs, cls_attn=cls_attn,
            cls_attn_heads=_cls_heads(self.attn, q, k, mask, p) if "cls_attn_heads" in method.needs else None,
            project=lambda t: _qkv(self.attn, self.norm1(t))[:3],
        )  # fmt: skip
        x, decision = _decide_and_apply(self, st, ctx)
        out = method.reduced_attention(ctx, decision, scale=self.attn.scale, bias=bias)
        x = x + self.drop_path1(self.ls1(_attention_output(self.attn, out, gate)))
    else:
        needs = method.needs if target is not None else ()
        out, extras = attention_forward(
            self.attn,
            h,
            bias=bias,
            num_prefix=p,
            need_keys="keys" in needs,
            need_cls="cls_attn" in needs,
            need_cls_heads="cls_attn_heads" in needs,
            need_attn="attn" in needs,
        )
        x = x + self.drop_path1(self.ls1(out))
        if target is not None and method.stage == "after_attn":
            ctx = _context(
                st, layer, x, target, keys=extras.keys, cls_attn=extras.cls_attn,
                cls_attn_heads=extras.cls_attn_heads, attn=extras.attn,
            )  # fmt: skip
            x, _ = _decide_and_apply(self, st, ctx)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    if target is not None and method.stage == "after_block":  # on the block's output (MCTF without one-step-ahead)
        ctx = _context(
            st, layer, x, target, stage="after_block", keys=extras.keys, cls_attn=extras.cls_attn,
            cls_attn_heads=extras.cls_attn_heads, attn=extras.attn,
        )  # fmt: skip
        x, _ = _decide_and_apply(self, st, ctx)
    return x


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
    info = model_info(model)
    if isinstance(method, str):
        method_obj = create_method(method, **options)
    elif isinstance(method, Method):
        if options:
            raise TypeError(f"options {sorted(options)} are given to a method object; set them on the object")
        method_obj = method
    else:
        raise TypeError(f"method must be a registered name or a tokvis Method: got {type(method).__name__}")
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
    schedule.check(info.num_patches, method_obj.max_removal)
    if is_patched(model):
        unpatch(model)
    method_obj.to(next(model.parameters()).device)
    state = PatchState(method=method_obj, schedule=schedule, info=info)
    for i, blk in enumerate(model.blocks):
        blk.__class__ = _patched_class(type(blk))
        blk._tokvis_index = i
        blk._tokvis_state = state
    model.tokvis_method = method_obj  # registered submodule: learned parameters follow .to() / state_dict
    state.hook = model.register_forward_pre_hook(_input_check_hook)
    model._tokvis = state
    return model


def _input_check_hook(model: nn.Module, args: tuple) -> None:
    if args:
        check_images(model, args[0])
        model._tokvis.grid = grid_for_input(model, tuple(args[0].shape[-2:]))


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
    for blk in model.blocks:
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
