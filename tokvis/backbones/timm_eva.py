"""Adapter of timm's ``Eva`` (EVA-02, DINOv3, the RoPE ViTs, PE): rotary position embeddings that follow the tokens.

``Eva`` passes a rotary table to every block (``blk(x, rope=...)``: ``[N, 2d]`` sin|cos rows, or
``[H, N, 2d]`` per head for the mixed RoPE); the patched block applies it to the current tokens'
queries and keys through :class:`RotaryPositions`:

* before any reduction the table is used as given (keep rate 1.0 / r = 0 is the unpatched model);
* a pruned token keeps its own row, gathered per image (each image keeps other tokens);
* a merged token gets, with ``merge_position="destination"`` (the default), the row of its group's
  destination (the token :attr:`~tokvis.trace.LayerDecision.keep` marks; a soft slot without one:
  the input with the largest weight in it), or with ``merge_position="mean"`` the rotary embedding
  of the mean of its sources' coordinates, weighted as :func:`~tokvis.methods.ops.apply_decision`
  weights the tokens (size-weighted for ToMe).  Coordinates are the rotary module's own (its grid is
  affine in the patch index, so this is the weighted mean position on the image), and the embedding
  at a fractional coordinate uses the module's own frequencies (:func:`rope_from_coords`; axial
  ``RotaryEmbeddingCat`` and ``RotaryEmbeddingDinoV3``).

The default keeps every token on the lattice of positions the model was trained on, is the same
operation as pruning (a gather of the model's own table rows), and works for every rotary variant;
the mean is the analogue of what merging does to an absolute embedding, but gives positions between
grid points that no pretrained RoPE model has seen.  ``benchmarks/rope_merge_position.py`` measures
the two on a pretrained model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.backbones.base import Backbone, TokenPositions, check_timm_blocks, timm_model_info
from tokvis.errors import UnsupportedModelError
from tokvis.trace import LayerDecision


def eva_classes() -> tuple[type, type, tuple[type, ...]]:
    """timm's ``Eva`` model, ``EvaBlock`` and the attention classes an ``EvaBlock`` may hold."""
    from timm.layers.attention import AttentionRope
    from timm.models import eva

    return eva.Eva, eva.EvaBlock, (eva.EvaAttention, AttentionRope)


class TimmEva(Backbone):
    """timm ``Eva`` with pre-norm ``EvaBlock`` s (``EvaAttention`` or ``AttentionRope``).

    Handled through the module's own layers: fused ``qkv`` with its separate ``q_bias`` / ``v_bias``
    (added in the projection or after it, ``qkv_bias_separate``) or separate ``q_proj`` / ``k_proj`` /
    ``v_proj`` (grouped-query heads repeated as timm does), qk-norm, rotary embeddings (interleaved
    or half layout), scale-norm, gate, ``gamma_1`` / ``gamma_2`` layer scale, and any MLP (SwiGLU,
    GluMlp, Mlp with scale-norm).
    """

    family = "timm-eva"

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, eva_classes()[0])

    def describe(self, model: nn.Module):
        _, EvaBlock, attentions = eva_classes()
        blocks = getattr(model, "blocks", None)
        check_timm_blocks(
            blocks, EvaBlock, attentions,
            "tokvis supports timm's pre-norm EvaBlock only (not EvaBlockPostNorm: its norms sit after the "
            "residual branches)",
            "tokvis supports EvaAttention and AttentionRope in Eva models",
        )  # fmt: skip
        p = int(model.num_prefix_tokens)
        for i, blk in enumerate(blocks):
            if int(getattr(blk.attn, "num_prefix_tokens", p)) != p:
                raise UnsupportedModelError(
                    f"block {i}'s attention skips the rotary embedding on {blk.attn.num_prefix_tokens} prefix "
                    f"tokens but the model has {p}; tokvis cannot tell which tokens are patches"
                )
        return timm_model_info(model)

    def project(self, block, h, positions, rope=None):
        attn = block.attn
        B, T, _ = h.shape
        gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
        if attn.qkv is not None:
            q_bias = getattr(attn, "q_bias", None)
            if q_bias is None:
                qkv = attn.qkv(h)
            else:  # EvaAttention: the key has no bias (a zero buffer), the others are parameters of the module
                bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
                qkv = attn.qkv(h) + bias if attn.qkv_bias_separate else F.linear(h, attn.qkv.weight, bias)
            q, k, v = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.q_proj(h).reshape(B, T, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(h).reshape(B, T, -1, q.shape[-1]).transpose(1, 2)
            v = attn.v_proj(h).reshape(B, T, -1, q.shape[-1]).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            from timm.layers.pos_embed_sincos import apply_rot_embed_cat

            emb = rope if positions is None else positions.embed(rope)
            npt, half = attn.num_prefix_tokens, bool(getattr(attn, "rotate_half", False))
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], emb, half=half)], 2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], emb, half=half)], 2).type_as(v)
        groups = int(getattr(attn, "num_kv_groups", 1))
        if groups > 1:  # grouped-query attention: kv head h // groups serves query head h
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v, gate

    def attention_residual(self, block, y):
        if block.gamma_1 is not None:
            y = block.gamma_1 * y
        return block.drop_path1(y)

    def mlp_residual(self, block, x):
        y = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            y = block.gamma_2 * y
        return block.drop_path2(y)

    def check_positions(self, model: nn.Module, options: dict) -> None:
        rope = getattr(model, "rope", None)
        if options.get("merge_position") == "mean" and rope is not None and not _timm_builds_grids():
            import timm

            raise UnsupportedModelError(
                f"merge_position='mean' evaluates rotary embeddings at fractional coordinates through timm's own "
                f"grid builder, which timm {timm.__version__} does not have; upgrade timm (>= 1.0.31) or use "
                "merge_position='destination'"
            )
        if options.get("merge_position") == "mean" and rope is not None and _coord_system(rope) is None:
            raise UnsupportedModelError(
                f"merge_position='mean' needs rotary embeddings at fractional coordinates, which tokvis computes for "
                f"timm's RotaryEmbeddingCat and RotaryEmbeddingDinoV3; this model uses {type(rope).__name__}. "
                "Use merge_position='destination'"
            )

    def start_positions(self, model, options, rope, x, grid=None):
        if rope is None:
            return None
        n = x.shape[1] - int(model.num_prefix_tokens)
        mean = options.get("merge_position") == "mean"
        coords = None
        if mean:
            if grid is None or grid[0] * grid[1] != n:
                grid = tuple(int(v) for v in model.patch_embed.grid_size)
            coords = rope_coords(model.rope, grid).to(x.device)[None].expand(x.shape[0], -1, -1)
        return RotaryPositions(model.rope if mean else None, index=None, coords=coords, merged=None)


class RotaryPositions(TokenPositions):
    """Which rotary table row each current patch token uses, and (``merge_position="mean"``) its coordinates.

    Parameters
    ----------
    rope_module : nn.Module or None
        The model's rotary module (``"mean"`` only: embeddings at fractional coordinates).
    index : LongTensor [B, n] or None
        Table row of each patch token (``None``: the unreduced sequence, row ``i`` for token ``i``).
    coords : Tensor [B, n, 2] or None
        Coordinates in the rotary module's grid (``"mean"`` only).
    merged : BoolTensor [B, n] or None
        Tokens whose coordinates are a mean of several sources (their embedding is computed, not gathered).
    """

    def __init__(self, rope_module, *, index, coords, merged) -> None:
        self.rope_module, self.index, self.coords, self.merged = rope_module, index, coords, merged

    def follow(self, decision: LayerDecision) -> "RotaryPositions":
        rep = representatives(decision)
        B, n_in = decision.dst.shape
        index = self.index if self.index is not None else torch.arange(n_in, device=rep.device).expand(B, n_in)
        new_index = index.gather(1, rep)
        if self.coords is None:
            return RotaryPositions(None, index=new_index, coords=None, merged=None)
        from tokvis.methods.ops import apply_decision

        ones = self.coords.new_ones(B, n_in)
        coords, _ = apply_decision(self.coords, ones, decision, num_prefix=0)
        own = self.coords.gather(1, rep[..., None].expand(-1, -1, 2))
        merged = (coords != own).any(-1)
        if self.merged is not None:
            merged = merged | self.merged.gather(1, rep)
        return RotaryPositions(self.rope_module, index=new_index, coords=coords, merged=merged)

    def embed(self, table: torch.Tensor) -> torch.Tensor:
        """The rows of ``table`` (``[N, 2d]``, ``[H, N, 2d]`` or with a batch in front) for the current tokens,
        ``[B, 1 or H, n, 2d]``."""
        if self.index is None:
            return table
        t = table
        while t.dim() < 4:
            t = t.unsqueeze(0)
        B, n = self.index.shape
        t = t.expand(B, -1, -1, -1)
        idx = self.index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
        out = t.gather(2, idx)
        if self.merged is not None and self.coords is not None:
            at = rope_from_coords(self.rope_module, self.coords).to(out.dtype)[:, None]  # [B, 1, n, 2d]
            out = torch.where(self.merged[:, None, :, None], at, out)
        return out


def representatives(decision: LayerDecision) -> torch.Tensor:
    """``[B, n_out]``: the input token whose position each output slot takes (``merge_position="destination"``).

    The slot's destination (``keep``) when it has one, else the input with the largest weight in the slot
    (soft assignments: the largest entry of the slot's row).
    """
    dst, keep = decision.dst, decision.keep
    B, n_in = dst.shape
    valid = dst >= 0
    slot = dst.clamp(min=0)[:, None, :]
    if decision.soft is not None:
        A = decision.soft.float().clone()
    else:
        w = decision.weight.float() if decision.weight is not None else torch.ones_like(dst, dtype=torch.float32)
        A = w.new_zeros(B, decision.n_out, n_in).scatter_(1, slot, ((w.abs() + 1e-6) * valid)[:, None, :])
    bonus = A.new_zeros(A.shape).scatter_(1, slot, (keep & valid).float()[:, None, :])
    return (A + bonus * (A.abs().amax() + 1)).argmax(-1)


def _timm_builds_grids() -> bool:
    """timm has the rotary grid builder and layout helpers ``merge_position="mean"`` uses (timm >= 1.0.31)."""
    from timm.layers import pos_embed_sincos as ps

    return hasattr(ps, "_build_grid") and hasattr(ps, "_rope_layout")


def _coord_system(rope: nn.Module) -> tuple[dict, Any] | None:
    """The grid options and frequencies of a rotary module tokvis can evaluate at any coordinate, else ``None``."""
    import math

    from timm.layers import pos_embed_sincos as ps

    if type(rope) is ps.RotaryEmbeddingCat:
        grid_type = rope.grid_type or ("pixel" if rope.in_pixels else "index")
        opts = dict(
            grid_type=grid_type, ref_feat_shape=rope.ref_feat_shape, grid_offset=rope.grid_offset,
            grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords,
        )  # fmt: skip
        return opts, lambda: rope._compute_bands(dtype=torch.float32)
    if type(rope) is ps.RotaryEmbeddingDinoV3:
        opts = dict(
            grid_type="centered", grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
            normalize_coords=rope.normalize_coords,
        )  # fmt: skip
        return opts, lambda: 2 * math.pi / rope.periods.float()
    return None


def rope_coords(rope: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """``[H*W, 2]``: the rotary module's coordinates of the patches of a ``grid`` (row-major), as it builds them."""
    from timm.layers.pos_embed_sincos import _build_grid

    system = _coord_system(rope)
    assert system is not None
    return _build_grid(list(grid), **system[0]).flatten(0, 1)


def rope_from_coords(rope: nn.Module, coords: torch.Tensor) -> torch.Tensor:
    """Rotary sin|cos rows ``[..., 2d]`` at any coordinates ``[..., 2]`` (the module's grid units) with the
    module's own frequencies and layout; at the grid's coordinates they are the module's table."""
    from timm.layers.pos_embed_sincos import _rope_layout

    system = _coord_system(rope)
    assert system is not None
    freqs = system[1]().to(coords.device)
    angles = (coords.float()[..., None] * freqs).flatten(-2)
    half = bool(getattr(rope, "rotate_half", False))
    return torch.cat([_rope_layout(angles.sin(), half), _rope_layout(angles.cos(), half)], -1)
