"""The interface every reduction method implements, and what it is given.

A method is asked, at each reducing block, for a :class:`~tokvis.trace.LayerDecision`
given a :class:`ReductionContext` holding what it declared in ``needs``.  It
never touches the tokens itself: :func:`tokvis.methods.ops.apply_decision`
applies the decision, so the recorded decision is exactly what was computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from tokvis.errors import UnsupportedModelError
from tokvis.model import ModelInfo  # noqa: F401  (re-exported: methods import it from here)
from tokvis.trace import LayerDecision

NEEDS = frozenset({"keys", "cls_attn", "cls_attn_heads", "attn", "prev_attn_received"})
STAGES = ("before_block", "after_attn", "in_attention", "after_block")
#: where a method with a ``placement`` option reduces: the block's input (the study's models) or after its attention
PLACEMENTS = ("before_block", "after_attn")


def check_placement(value: Any) -> str:
    """``value`` if it is a valid ``placement`` option (one of :data:`PLACEMENTS`), else :class:`MethodOptionError`.

    Parameters
    ----------
    value : any
        The user's option.
    """
    from tokvis.errors import MethodOptionError
    from tokvis.validate import check_choice

    return check_choice("placement", value, PLACEMENTS, error=MethodOptionError)


@dataclass
class ReductionContext:
    """What a reducing block hands to its method.

    Attributes
    ----------
    layer : int
        Block index.
    x : Tensor [B, num_prefix + n, C]
        Tokens after the attention residual (the MLP has not run yet).
    size : Tensor [B, num_prefix + n]
        Patches represented by each token (prefix tokens: 1).
    num_prefix : int
        Prefix tokens at the front of ``x`` (never reduced).
    target : int
        Patch tokens the schedule asks to keep after this block.
    n_patches : int
        Patches of the input image.
    keys : Tensor [B, H, num_prefix + n, d] or None
        Attention keys (after ``k_norm``), if the method needs ``"keys"``.
    cls_attn : Tensor [B, n] or None
        Attention of the class token to each patch token, averaged over heads
        (softmax over all tokens), if the method needs ``"cls_attn"``.
    cls_attn_heads : Tensor [B, H, n] or None
        Attention of the class token to each patch token, per head (softmax over
        all tokens, proportional bias included), if the method needs
        ``"cls_attn_heads"``.  Computed from the class token's query row alone
        (``q_cls @ k^T``: no ``[B, H, T, T]`` map), in float32 for fp16 / bf16 models.
    attn : Tensor [B, H, T, T] or None
        Full attention probabilities, if the method needs ``"attn"`` (the one
        need that makes the block compute the explicit map instead of fused attention).
    prev_attn_received : Tensor [B, n] or None
        If the method needs ``"prev_attn_received"``: the attention each patch token
        *received* in the previous block (its column of the attention map summed over
        the heads and over every query, prefix tokens included), in float32 for fp16 /
        bf16 models; the previous block computes its explicit attention map for it.
        For ``stage="before_block"`` these are the tokens of ``x``.  ``None`` at block 0.
    queries, values : Tensor [B, H, T, d] or None
        Attention queries (after ``q_norm``) and values; given to methods of stage
        ``"in_attention"`` only, ``values`` only to those whose ``input_values`` is true.
    project_values : callable or None
        ``project_values(tokens [B, T', C]) -> v [B, H, T', d]``: the block's own ``norm1``
        and the value rows of its ``qkv`` projection applied to any token sequence, e.g. the
        reduced one (MCTF's one-step-ahead attention needs the values of the fused tokens
        only).  Stage ``"in_attention"`` only.
    stage : str
        Where in the block the decision is taken (see :class:`Method`).
    grid_size : tuple of int (h, w) or None
        Patch grid of the current input (differs from ``ModelInfo.grid_size`` for
        other image sizes under ``dynamic_img_size``); ``None`` when unknown (the
        model was not called on images, e.g. ``forward_features`` directly).
    compute_dtype : torch.dtype or None
        The dtype the model's matmuls run in at this block: the autocast dtype when
        the forward runs under ``torch.autocast`` (a method decides outside autocast,
        so its own float32 maths stays float32), else the dtype of ``x``.  A method
        with feature layers of its own (DynamicViT's score predictor, SiT's slot MLP)
        runs them in it, and its ranked outputs in float32.  ``None``: the dtype of ``x``.
    """

    layer: int
    x: torch.Tensor
    size: torch.Tensor
    num_prefix: int
    target: int
    n_patches: int
    keys: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    cls_attn_heads: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    prev_attn_received: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    values: torch.Tensor | None = None
    stage: str = "after_attn"
    project_values: Callable[[torch.Tensor], torch.Tensor] | None = None
    grid_size: tuple[int, int] | None = None
    compute_dtype: torch.dtype | None = None

    @property
    def n_in(self) -> int:
        return self.x.shape[1] - self.num_prefix

    @property
    def patch_size(self) -> torch.Tensor:
        return self.size[:, self.num_prefix :]


class Method(nn.Module):
    """Base class of reduction methods.

    Subclasses set the class attributes, validate their options in ``__init__``
    and implement :meth:`decide`.  A method is an ``nn.Module`` so that learned
    methods can carry parameters; it is attached to the model while patched.

    Class attributes
    ----------------
    name : str
        Registry name.
    kind : str
        Kind of the decisions it makes ("prune", "merge", "fuse", "soft").
    needs : frozenset of {"keys", "cls_attn", "cls_attn_heads", "attn", "prev_attn_received"}
        What the patched attention must compute for it (see :class:`ReductionContext`).
        Only ``"attn"`` materialises the ``[B, H, T, T]`` attention map; the
        others keep the block's fused attention (``"prev_attn_received"``: the block
        *before* each reducing block materialises its map).
    requires_class_token : bool
        The method ranks tokens by the class token's attention.
    conventions : tuple of {"keep_rate", "r"}
        Schedules the method supports.
    stage : {"after_attn", "before_block", "in_attention"}
        Where a reducing block asks for the decision:

        ``"after_attn"`` (ToMe, Top-K, EViT)
            after the attention residual, before the MLP; the context holds the
            tokens and what ``needs`` asked of the block's attention.
        ``"before_block"`` (DynamicViT-style predictors)
            on the block's input, before ``norm1``; no attention extras.  The
            block then runs on the reduced set.
        ``"in_attention"`` (methods that change attention itself)
            inside the attention, after ``q/k/v`` are computed; the context
            also holds ``queries`` and ``values``.  The decision is applied to
            the residual stream, and the attention output for the reduced set
            comes from :meth:`reduced_attention` (default: the queries reduced
            by the same decision, attending to the full keys and values).
        ``"after_block"`` (MCTF without one-step-ahead attention)
            on the block's output, after the MLP; the context holds the output
            tokens and what ``needs`` asked of the block's attention.
    decisions_version : int
        Bumped whenever a change to the method changes the decisions it takes on the same
        inputs; part of a run's identity (:func:`tokvis.identity.code_identity`), so a run
        store recorded by other code is reported as such and never resumed.
    """

    name: ClassVar[str] = ""
    decisions_version: ClassVar[int] = 1
    kind: ClassVar[str] = "prune"
    needs: ClassVar[frozenset[str]] = frozenset()
    requires_class_token: ClassVar[bool] = False
    #: what the class token is needed for, and what to do without one (the error message's two halves)
    class_token_use: ClassVar[str] = "ranks tokens by the class token's attention"
    no_class_token_hint: ClassVar[str] = "use a method that needs no class token, e.g. 'tome', 'dpcknn' or 'radial'"
    conventions: ClassVar[tuple[str, ...]] = ("keep_rate", "r")
    stage: ClassVar[str] = "after_attn"
    #: the patched attention adds log(size) to the attention logits (ToMe's proportional attention)
    proportional_attention: bool = False
    #: stage ``"in_attention"``: the block projects the values of its input tokens (``ctx.values``).  False
    #: for a method whose :meth:`reduced_attention` needs only the values of the reduced tokens
    #: (``ctx.project_values``): the block then computes only the queries and keys of its input (MCTF's
    #: one-step-ahead attention, as the authors' block does)
    input_values: bool = True

    def __init__(self) -> None:
        super().__init__()
        bad = set(self.needs) - NEEDS
        if bad:
            raise TypeError(f"{type(self).__name__}.needs has unknown entries {sorted(bad)}; known: {sorted(NEEDS)}")
        if self.stage not in STAGES:
            raise TypeError(f"{type(self).__name__}.stage must be one of {STAGES}: got {self.stage!r}")

    # -- to override ----------------------------------------------------------------------------
    def decide(self, ctx: ReductionContext) -> LayerDecision:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's options, for trace metadata (JSON-serialisable)."""
        return {}

    def check_model(self, info: ModelInfo) -> None:
        """Raise :class:`UnsupportedModelError` if the method cannot run on this model."""
        if self.stage == "in_attention" and info.gated_attention:
            raise UnsupportedModelError(
                f"method {self.name!r} reduces tokens inside the attention, which does not combine with "
                "gated attention (the gate is computed per input token)"
            )
        if self.requires_class_token and not info.has_class_token:
            raise UnsupportedModelError(
                f"method {self.name!r} {self.class_token_use}, but this model has no class token "
                f"(global average pooling); {self.no_class_token_hint}"
            )

    def reduced_attention(
        self,
        ctx: ReductionContext,
        decision: LayerDecision,
        *,
        scale: float,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output ``[B, H, num_prefix + n_out, d]`` for the reduced token set.

        Only for ``stage="in_attention"``.  The default reduces the queries with
        the decision (the same weighted merge as the tokens: a hard decision
        averages queries, a soft one mixes them) and lets them attend to the
        full, unreduced keys and values.  ``bias`` ``[B, T]`` is the additive
        logit bias per key (proportional attention), or ``None``.
        """
        from tokvis.methods.ops import apply_decision

        q, k, v = ctx.queries, ctx.keys, ctx.values
        assert q is not None and k is not None and v is not None
        B, H, T, d = q.shape
        flat = q.transpose(1, 2).reshape(B, T, H * d)
        q_red, _ = apply_decision(flat, ctx.size, decision, num_prefix=ctx.num_prefix)
        q_red = q_red.reshape(B, -1, H, d).transpose(1, 2)
        mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q_red, k, v, attn_mask=mask, scale=scale)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra training loss of the latest forward, added by :func:`tokvis.fit` (default ``None``).

        A method that returns a tensor here computes it while fitting (e.g.
        DynamicViT's keep-ratio loss) and clears it when read, so each forward
        contributes once.
        """
        return None

    def default_locations(self, depth: int, *, keep_rate=None, r=None) -> list[int] | None:
        """Blocks that reduce when the user gives no ``locations`` (default ``None``: the schedule's own).

        A method whose reference code reduces elsewhere by default says so here
        (MCTF: a count ``r`` at every block but the first).
        """
        return None

    def max_removal(self, n_in: int, convention: str) -> int:
        """Most patch tokens the method removes in one block (default: no cap).

        ``convention`` is "keep_rate" or "r"; the schedule's budget is raised to
        respect it (ToMe caps ``r`` at half the tokens).  A budget of no token at
        all is an error either way.
        """
        return n_in

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())
