"""Shared token operations.  Pure tensor code: nothing here knows about models.

:func:`apply_decision` is the one function that applies any
:class:`~tokvis.trace.LayerDecision` to the tokens and their sizes, so what a
recorder stores is exactly what the model computed.  The helpers below build
decisions (rank-and-keep, bipartite matching) and are shared by the methods.
"""

from __future__ import annotations

import torch

from tokvis.trace import LayerDecision
from tokvis.validate import check_choice


def apply_decision(
    x: torch.Tensor, size: torch.Tensor, decision: LayerDecision, *, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a reduction to a token sequence.

    Parameters
    ----------
    x : Tensor [B, num_prefix + n_in, C]
        Tokens; prefix tokens (class, distillation, registers) come first and are
        passed through unchanged.
    size : Tensor [B, num_prefix + n_in]
        Number of original patches each token represents (prefix tokens: 1).
    decision : LayerDecision
        ``dst`` [B, n_in] output slots (-1 = dropped), optional ``weight`` and
        ``soft`` assignment, optional ``size_scale`` (multiplies the input sizes).
    num_prefix : int
        Number of prefix tokens.

    Returns
    -------
    x_out : Tensor [B, num_prefix + n_out, C]
        Output token ``j`` is the weighted mean ``sum_i w_i x_i / sum_i w_i`` over
        the inputs with ``dst_i = j`` (``w`` = ``decision.weight``, 1 if absent), or
        the weighted sum ``sum_i w_i x_i`` when ``decision.weighted_sum`` (EViT's fused token);
        for soft decisions ``x_out = soft @ x`` (``soft @ decision.mix`` when the
        decision names the tokens it mixes; rows of ``soft`` are normalised
        by the method, or not: the study's Sinkhorn; computed sparsely when the kept tokens feed only their own
        slot, see :func:`_soft_apply`).
    size_out : Tensor [B, num_prefix + n_out]
        Sum of the sizes of the inputs of each output token (soft: ``soft @ size``),
        each input size first multiplied by ``decision.size_scale`` when given.
    """
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    psize, tsize = size[:, :num_prefix], size[:, num_prefix:]
    B, n_in, C = patches.shape
    if decision.dst.shape != (B, n_in):
        raise ValueError(
            f"decision at block {decision.layer} is for {tuple(decision.dst.shape)} tokens, the block has {(B, n_in)}"
        )
    n_out = decision.n_out
    if decision.size_scale is not None:  # soft keep: scale the input sizes, not the tokens
        tsize = tsize * decision.size_scale.to(tsize.dtype)
    if decision.soft is not None:
        mixed = patches if decision.mix is None else decision.mix.to(patches.dtype)
        out = _soft_apply(decision.soft.to(patches.dtype), mixed, decision)
        new_size = torch.bmm(decision.soft.to(tsize.dtype), tsize.unsqueeze(-1)).squeeze(-1)
    elif (
        n_out == n_in
        and patches.device.type == "cpu"
        and not torch.compiler.is_compiling()  # a host read breaks the graph
        and bool(_identity_rows(decision).all())
    ):  # the CPU has no device to wait for: return the very tensor (bit for bit, the same memory layout)
        return (x, size) if decision.size_scale is None else (x, torch.cat([psize, tsize], 1))
    elif n_out == n_in:  # images the decision leaves in place keep their tokens bit for bit
        out, new_size = merge_tokens(
            patches, decision.dst, n_out, decision.weight, tsize, normalize=not decision.weighted_sum
        )
        same = _identity_rows(decision)  # [B, 1] on the device: no host sync
        out = torch.where(same[..., None], patches, out)
        new_size = torch.where(same, tsize, new_size)
    else:  # the merged tokens come after the prefix tokens (merge_tokens writes them there)
        x_out, new_size = merge_tokens(
            patches, decision.dst, n_out, decision.weight, tsize, prefix=prefix, normalize=not decision.weighted_sum
        )
        return x_out, torch.cat([psize, new_size], 1)
    return torch.cat([prefix, out], 1), torch.cat([psize, new_size], 1)


def _soft_apply(soft: torch.Tensor, patches: torch.Tensor, d: LayerDecision) -> torch.Tensor:
    """``soft @ patches``, sparse when the kept tokens feed only their own slot (VoMix-style mixing).

    When every row keeps the same number of tokens and the column of each kept
    token is zero except at its ``dst`` slot, only the other (removed) tokens'
    columns need a product: ``m * n_out * C`` instead of ``n_in * n_out * C``.
    A method that builds this structure says so (``d.soft_kept_own``: ``n_out``
    kept tokens per image, as VoMix does by construction); nothing is checked on
    the host (no device sync).  Any other soft decision (learned assignments, a
    decision read from a trace) gets the dense product.
    """
    B, n_out, n_in = soft.shape
    if not d.soft_kept_own or B == 0 or n_in == 0:
        return torch.bmm(soft, patches)
    keep = d.keep
    m = n_in - n_out
    own = soft.gather(1, d.dst.clamp(min=0)[:, None, :]).squeeze(1)  # [B, n_in]: entry at the token's slot
    order = keep.to(torch.int8).argsort(dim=1, stable=True)  # removed first, then kept (by position)
    removed, kept = order[:, :m], order[:, m:]
    C = patches.shape[-1]
    out = patches.new_zeros(B, n_out, C)
    own_kept = own.gather(1, kept)[..., None] * patches.gather(1, kept[..., None].expand(-1, -1, C))
    out.scatter_add_(1, d.dst.gather(1, kept)[..., None].expand(-1, -1, C), own_kept)
    if m:
        cols = soft.gather(2, removed[:, None, :].expand(-1, n_out, -1))  # [B, n_out, m]
        out = out + torch.bmm(cols, patches.gather(1, removed[..., None].expand(-1, -1, C)))
    return out


def mix_into_kept(
    values: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Mix removed tokens into kept ones: ``(v_j + sum_s w_sj v_s) / (1 + sum_s w_sj)`` per kept token ``j``.

    Sparse: costs ``m * k * c`` (the removed tokens' rows only), VoMix's mixing.

    Parameters
    ----------
    values : Tensor [B, n, c]
    kept : LongTensor [B, k]
        Positions of the kept tokens (output ``j`` is ``kept[:, j]``).
    removed : LongTensor [B, m]
        Positions of the removed tokens.
    weight : Tensor [B, m, k]
        Mass each removed token sends to each kept token (rows sum to 1 for VoMix).

    Returns
    -------
    Tensor [B, k, c]
    """
    c = values.shape[-1]
    v_kept = values.gather(1, kept[..., None].expand(-1, -1, c))
    if removed.shape[1] == 0:
        return v_kept
    w = weight.to(values.dtype)
    v_rem = values.gather(1, removed[..., None].expand(-1, -1, c))
    num = v_kept + torch.bmm(w.transpose(1, 2), v_rem)
    return num / (1 + w.sum(1))[..., None]


def mix_matrix(kept: torch.Tensor, removed: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """Dense ``[B, k, n]`` form of :func:`mix_into_kept` (rows sum to 1), for recording a soft decision."""
    B, k = kept.shape
    soft = weight.new_zeros(B, k, n)
    soft.scatter_(2, kept[..., None], 1.0)
    if removed.shape[1]:
        soft.scatter_(2, removed[:, None, :].expand(-1, k, -1), weight.transpose(1, 2))
    return soft / soft.sum(-1, keepdim=True)


def _identity_rows(d: LayerDecision) -> torch.Tensor:
    """``[B, 1]`` bool: the decision keeps every token of the image in its own slot.  A device tensor, so
    that applying a decision never waits for the device (a ``bool(...)`` here was a host sync per block)."""
    ar = torch.arange(d.n_in, device=d.dst.device)
    return (d.dst == ar).all(1, keepdim=True)


def rank_keep(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` highest-scoring tokens of each row, in their original order.

    Parameters
    ----------
    score : Tensor [B, n]
    k : int, 0 <= k <= n

    Returns
    -------
    dst : LongTensor [B, n]
        Output slot of each kept token (its rank among the kept tokens by original
        position), -1 for the others.
    keep : BoolTensor [B, n]
    """
    B, n = score.shape
    if k >= n:
        ar = torch.arange(n, device=score.device).expand(B, n)
        return ar.clone(), torch.ones(B, n, dtype=torch.bool, device=score.device)
    top = score.topk(k, dim=1, sorted=False).indices
    keep = torch.zeros(B, n, dtype=torch.bool, device=score.device)
    keep.scatter_(1, top, True)
    dst = slots_from_keep(keep)
    return dst, keep


def slots_from_keep(keep: torch.Tensor) -> torch.Tensor:
    """Output slot of every token marked in ``keep``: its rank by original position; -1 elsewhere."""
    return torch.where(keep, keep.cumsum(1) - 1, -1)  # a bool cumsum counts in int64


ORDERS = ("official", "original")


def bipartite_split(num_tokens: int, num_prefix: int = 0, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions, among the patch tokens, of ToMe's sets A and B.

    The split alternates over the *whole* sequence, prefix tokens included, as in
    the official ToMe and MCTF code: sequence position ``t`` is in set A when
    ``t`` is even.  With one class token (``num_prefix=1``) the class token is
    position 0 of A, so patch ``j`` (sequence position ``j + 1``) is in A when
    ``j`` is odd; with no prefix token, patch ``j`` is in A when ``j`` is even.

    Returns
    -------
    a_pos, b_pos : LongTensor
        Patch indices (0-based among the ``num_tokens`` patch tokens) in A and in B.
    """
    first_a = num_prefix % 2  # first patch index whose sequence position is even
    a_pos = torch.arange(first_a, num_tokens, 2, device=device)
    b_pos = torch.arange(1 - first_a, num_tokens, 2, device=device)
    return a_pos, b_pos


def bipartite_matching(
    metric: torch.Tensor, r: int, *, num_prefix: int = 0, order: str = "official"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of ToMe's bipartite soft matching on patch tokens.

    The tokens are split into sets A and B alternately over the whole sequence
    (:func:`bipartite_split`: ``num_prefix`` prefix tokens come first and set the
    parity; they are never merged and receive nothing).  Every A token finds its
    most similar B token (cosine similarity); the ``r`` A tokens with the most
    similar partners are merged into them.  The cap ``r <= n // 2`` is the
    caller's to apply.

    Parameters
    ----------
    metric : Tensor [B, n, c]
        Features of the patch tokens (ToMe: keys averaged over heads).
    r : int
        Tokens to remove.
    num_prefix : int
        Prefix tokens before the patch tokens in the sequence (class,
        distillation, register tokens).
    order : {"official", "original"}
        Order of the surviving tokens (the output slots).  ``"official"``: as the
        official ToMe code concatenates them: the unmerged A tokens, then the B
        tokens by position.  The unmerged A tokens are in position order when the
        model has prefix tokens (ToMe sorts them to keep the class token first),
        and otherwise in the order of decreasing best similarity (the official
        code does not sort them when there is no class token).  ``"original"``:
        every survivor keeps its original relative order (tokvis before 0.x).

    Returns
    -------
    dst : LongTensor [B, n]
        Output slot of each token; merged A tokens take the slot of their partner.
    keep : BoolTensor [B, n]
        False for the merged A tokens.
    """
    check_choice("order", order, ORDERS)
    B, n, _ = metric.shape
    dev = metric.device
    fa = num_prefix % 2  # A: patches fa, fa + 2, ...; B: 1 - fa, 3 - fa, ... (bipartite_split, as strided views)
    na, nb = (n + 1 - fa) // 2, (n + fa) // 2
    metric = metric.to(decision_dtype(metric.dtype))  # fp16 / bf16 keys: similarities in float32
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = metric[:, fa::2] @ metric[:, 1 - fa :: 2].transpose(1, 2)  # [B, na, nb]
    best, partner = sim.max(dim=-1)  # [B, na]
    edges = best.argsort(dim=-1, descending=True, stable=True)
    merged_a = edges[:, :r]  # indices within A
    keep = torch.ones(B, n, dtype=torch.bool, device=dev)
    keep_a = keep[:, fa::2].scatter_(1, merged_a, False)  # in place, through the view
    dst = torch.empty(B, n, dtype=torch.long, device=dev)
    dst_a, dst_b = dst[:, fa::2], dst[:, 1 - fa :: 2]
    n_unm = na - r  # unmerged A tokens
    if order == "original":  # survivors in position order; merged A tokens take their partner's slot
        torch.sub(keep.cumsum(1), 1, out=dst)
        dst_a.scatter_(1, merged_a, dst_b.gather(1, partner.gather(1, merged_a)))
    elif num_prefix > 0:  # unmerged A tokens by position (slot = rank among them), then the B tokens
        slot_a = torch.where(keep_a, keep_a.cumsum(1), partner + (n_unm + 1))
        sub_into(dst_a, slot_a, 1)
        dst_b.copy_(torch.arange(n_unm, n_unm + nb, device=dev))
    else:  # unmerged A tokens in the order of decreasing best similarity, then the B tokens
        slots = torch.arange(n_unm + nb, device=dev)
        dst_a.scatter_(1, edges[:, r:], slots[:n_unm].expand(B, -1))
        dst_a.scatter_(1, merged_a, partner.gather(1, merged_a) + n_unm)
        dst_b.copy_(slots[n_unm:])
    return dst, keep


def sub_into(view: torch.Tensor, a: torch.Tensor, b) -> None:
    """``view[...] = a - b`` with no temporary in eager mode; under ``torch.compile`` (where dynamo breaks the
    graph on a strided ``out=`` tensor) as a copy, which inductor fuses."""
    if torch.compiler.is_compiling():
        view.copy_(a - b)
    else:
        torch.sub(a, b, out=view)


def slots_of(survivors: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of an output order: ``survivors [B, n_out]`` lists the input token of each output slot.

    Returns ``dst [B, n]`` with the slot of each listed token and -1 for the others.
    """
    B, n_out = survivors.shape
    dst = torch.full((B, n), -1, dtype=torch.long, device=survivors.device)
    slots = torch.arange(n_out, device=survivors.device).expand(B, -1)
    return dst.scatter_(1, survivors, slots)


def compose(dst_first: torch.Tensor, dst_second: torch.Tensor) -> torch.Tensor:
    """Slot of each input after two successive reductions (-1 stays -1)."""
    return torch.where(dst_first >= 0, dst_second.gather(1, dst_first.clamp(min=0)), -1)


def merge_mean(values: torch.Tensor, dst: torch.Tensor, n_out: int, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``values [B, n, c]`` per output slot ``dst [B, n]`` (-1 = dropped).

    Output slots that receive no input are 0.

    Sums are accumulated in float32 (or float64 for float64 inputs) whatever the dtypes of ``values`` and
    ``weight`` (fp16 / bf16 models, autocast): a sum of up to ``n`` weighted tokens in half precision loses
    the small contributions; the result has the dtype of ``values``.
    """
    return merge_tokens(values, dst, n_out, weight)[0]


def merge_tokens(
    values: torch.Tensor,
    dst: torch.Tensor,
    n_out: int,
    weight: torch.Tensor | None,
    size: torch.Tensor | None = None,
    *,
    prefix: torch.Tensor | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`merge_mean` (``weight=None``: equal weights) and, when ``size [B, n]`` is given, its sum per slot.

    ``prefix [B, q, c]``, when given, is put first in the output, unchanged (``[B, q + n_out, c]``).
    ``normalize=False``: the weighted sum per slot instead of the weighted mean (no division by the
    summed weights; :attr:`~tokvis.trace.LayerDecision.weighted_sum`).

    Few and large kernels: the weighted values go into one zeroed buffer ``[B, n_out + 1, c]`` (slot
    ``n_out`` collects the dropped tokens) with one ``scatter_add_``, and the weights and the sizes,
    stacked, into a ``[B, n_out + 1, 2]`` part of the same allocation with another; outside autograd,
    the division writes the mean, in the values' dtype, straight after the prefix tokens (no cast, no
    ``cat`` of the tokens).  The sizes are summed in their own dtype (the buffer's, but for float32
    sizes of a float64 merge).
    """
    B, n, c = values.shape
    # the weights' dtype counts (equal weights are ones in the sizes' dtype, as tokvis always had them)
    ref = weight if weight is not None else size if size is not None else values
    acc = decision_dtype(values.dtype, ref.dtype)
    idx = dst.remainder(n_out + 1)  # -1 (dropped) -> the spare slot n_out
    w = None if weight is None else weight.to(acc)
    together = size is not None and size.dtype == acc
    k, rows = 1 + int(together), B * (n_out + 1)
    flat = values.new_zeros(rows * (c + k), dtype=acc)  # one fill for the sums of values, weights, sizes
    num = flat[: rows * c].view(B, n_out + 1, c)
    # values * w promotes to acc (w is acc, acc >= the values' dtype): no separate cast of the values
    num.scatter_add_(1, idx[..., None].expand(B, n, c), values.to(acc) if w is None else values * w[..., None])
    w = torch.ones_like(dst, dtype=acc) if w is None else w
    side = flat[rows * c :].view(B, n_out + 1, k)  # a view taken after the first in-place sum (torch.compile)
    side.scatter_add_(1, idx[..., None].expand(B, n, k), torch.stack([w, size], -1) if together else w[..., None])
    num, den = num[:, :n_out], side[:, :n_out, :1].clamp_min(torch.finfo(acc).tiny)
    if not normalize:  # the weighted sum: divide by one (exact), so the paths below stay the same
        den = torch.ones((), dtype=acc, device=num.device)
    if prefix is None:
        out = (num / den).to(values.dtype)
    elif torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (prefix.requires_grad or num.requires_grad or den.requires_grad)
    ):  # out= below has no autograd, and dynamo breaks the graph on a strided out= (inductor fuses this anyway)
        out = torch.cat([prefix, (num / den).to(values.dtype)], 1)
    else:
        q = prefix.shape[1]
        out = values.new_empty(B, q + n_out, c)
        if q:
            out[:, :q] = prefix
        torch.div(num, den, out=out[:, q:])  # float32 division, rounded once to the values' dtype
    if size is None:
        return out, None
    if together:
        return out, side[:, :n_out, 1]
    return out, size.new_zeros(B, n_out + 1).scatter_add_(1, idx, size)[:, :n_out]


def decision_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype tokvis does decision maths in: float64 when an input is float64, else float32.

    Used for matching similarities, distances, merge sums and the class-token attention row, so that
    fp16 / bf16 models and autocast rank and partition tokens from float32 values (bf16 has 8 bits of
    mantissa: ranking cosine similarities in it ties most of them).
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32
