"""The unreduced model's attention: per-block attention maps and attention rollout.

Reference patterns to compare reduction decisions with (e.g. with
:func:`tokvis.analysis.importance_agreement`):

* :func:`attention_maps` -- head-mean (or per-head) attention probabilities of
  chosen blocks of an *unpatched* timm ViT, computed through each block's own
  attention layers (the same path as a patched block: q/k norm, scale);
* :func:`attention_rollout` -- attention rollout (Abnar & Zuidema, 2020): how
  much the model's pooled output (the class token -- with the distillation
  token on distilled models -- or the mean of the patch tokens under average
  pooling) draws on each patch token at the input of a block, through the
  attention of that block and every later one.  Each block's head-mean
  attention ``A`` is mixed with the residual connection,
  ``residual * I + (1 - residual) * A``, and the mixes are multiplied from the
  last block back to ``start``.  Rows of every factor sum to 1, so the rollout
  of one image sums to 1 over all tokens (prefix included); the patch part is
  returned.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tokvis.backbones import backbone_for
from tokvis.errors import MethodOptionError, TokvisError
from tokvis.model import check_images, grid_for_input, is_patched, model_info
from tokvis.patching import _probs
from tokvis.validate import check_choice, check_float, check_int

__all__ = ["attention_maps", "attention_rollout"]


def _check_model(model: nn.Module, images: torch.Tensor):
    info = model_info(model)
    if is_patched(model):
        raise TokvisError(
            "attention_maps / attention_rollout describe the unreduced model: tokvis.unpatch(model) first"
        )
    check_images(model, images)
    return info


@torch.no_grad()
def attention_maps(
    model: nn.Module, images: torch.Tensor, *, blocks: Sequence[int] | None = None, heads: str = "mean"
) -> dict[int, torch.Tensor]:
    """Attention probabilities of an unpatched timm ViT.

    Parameters
    ----------
    model : timm VisionTransformer (unpatched)
    images : Tensor [B, 3, H, W]
        Transformed for the model.
    blocks : sequence of int, optional
        Block indices (default: every block).
    heads : {"mean", "all"}
        Average over the heads (``[B, T, T]``) or keep them (``[B, heads, T, T]``).

    Returns
    -------
    dict
        Block index -> probabilities over all ``T`` tokens (prefix first), rows summing to 1.
    """
    info = _check_model(model, images)
    check_choice("heads", heads, ("mean", "all"), error=MethodOptionError)
    wanted = list(range(info.depth) if blocks is None else blocks)
    for b in wanted:
        check_int(f"blocks (the model has {info.depth})", b, minimum=0, maximum=info.depth - 1, error=IndexError)
    return _maps(model, images, wanted, heads)


@torch.no_grad()
def _maps(model: nn.Module, images: torch.Tensor, blocks: Sequence[int], heads: str) -> dict[int, torch.Tensor]:
    """:func:`attention_maps` for a checked model, images and block list."""
    out: dict[int, torch.Tensor] = {}

    bb = backbone_for(model)
    seq = bb.blocks(model)

    def hook(index: int):
        def store(module: nn.Module, args, kwargs) -> None:  # the block's input, through its own layers
            x = args[0] if args else kwargs["x"]
            q, k, _, _ = bb.project(module, bb.norm1(module, x), None, kwargs.get("rope"))
            probs = _probs(bb.attention(module), q, k, None)
            out[index] = probs.mean(1) if heads == "mean" else probs

        return store

    handles = [seq[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in sorted(set(blocks))]
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return dict(sorted(out.items()))


def attention_rollout(model: nn.Module, images: torch.Tensor, *, start: int = 0, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout from the model's pooled output to the patch tokens entering block ``start``.

    Parameters
    ----------
    model : timm VisionTransformer (unpatched)
    images : Tensor [B, 3, H, W]
    start : int
        First block whose attention is rolled out (0: the rollout reaches the
        patch embeddings; a reduction location ``L`` deciding before block ``L``
        is compared with ``start=L``, one deciding after its attention with ``start=L + 1``).
        ``start == depth`` gives the pooling weights alone.
    residual : float in [0, 1]
        Weight of the identity (the residual connection) in each block's mix (0.5 in the paper).

    Returns
    -------
    Tensor [B, num_patches]
        Non-negative; together with the prefix tokens' share each image's values sum to 1.
    """
    info = _check_model(model, images)
    depth = info.depth
    start = check_int(f"start (the model has {depth} blocks)", start, minimum=0, maximum=depth, error=MethodOptionError)
    residual = check_float("residual", residual, low=0.0, high=1.0, error=MethodOptionError)
    p = info.num_prefix_tokens
    gh, gw = grid_for_input(model, tuple(images.shape[-2:]))
    T = p + gh * gw
    pool = getattr(model, "global_pool", None)
    row = images.new_zeros(images.shape[0], 1, T, dtype=torch.float32)
    if pool == "token" and info.has_class_token and getattr(model, "dist_token", None) is not None:
        row[:, 0, :2] = 0.5  # distilled models pool the mean of the class and distillation tokens
    elif pool == "token" and info.has_class_token:
        row[:, 0, 0] = 1.0  # the class token is token 0
    elif pool == "avg":
        row[:, 0, p:] = 1.0 / (T - p)  # timm's average pooling over the patch tokens
    else:
        raise TokvisError(f"attention_rollout follows class-token or average pooling; this model pools with {pool!r}")
    maps = _maps(model, images, range(start, depth), "mean") if start < depth else {}
    eye = torch.eye(T, device=row.device)
    for block in sorted(maps, reverse=True):  # pooled output <- last block <- ... <- block `start`
        row = row @ (residual * eye + (1.0 - residual) * maps[block].float())
    return row[:, 0, p:]
