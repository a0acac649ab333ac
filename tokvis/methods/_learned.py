"""Shared machinery of the learned reduction methods (DynamicViT, SiT, PatchMerger, Sinkhorn, DPC-KNN's learned merge).

A learned method owns one small module per reduction location (block), in
``method.reducers[str(block)]``.  The modules are created lazily at the first
forward that reduces at that block, because their shapes depend on what is
only known then: the embedding width and, for the soft methods, the number of
output slots (the block's token budget).  Each is initialised from its own
generator seeded by ``(seed, block)``, so the initial parameters do not depend
on the order of creation.  Loading a state dict into a fresh method creates
the modules from the tensors' shapes (see :meth:`LearnedMethod._load_from_state_dict`).

A learned method whose parameters were neither fitted (:func:`tokvis.fit`) nor
loaded warns once (``UserWarning``) at its first reduction: its patterns are
random until fitted.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokvis.errors import MethodOptionError, TokvisError
from tokvis.methods.base import Method, ReductionContext
from tokvis.methods.ops import decision_dtype
from tokvis.trace import LayerDecision
from tokvis.validate import check_int

_HALF = (torch.float16, torch.bfloat16)


def init_linear(lin: nn.Linear, g: torch.Generator, std: float = 0.02) -> None:
    """Truncated-normal weights (std 0.02, as timm initialises ViT layers), zero bias."""
    with torch.no_grad():
        w = torch.randn(lin.weight.shape, generator=g) * std
        lin.weight.copy_(w.clamp(-2 * std, 2 * std))
        if lin.bias is not None:
            lin.bias.zero_()


def linear_in(layer: nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``layer(x)`` computed in ``dtype``: inputs and parameters cast to it (no-ops when they already are).

    A learned method's modules keep float32 parameters in fp16 / bf16 models (:meth:`LearnedMethod._apply`);
    its feature layers run in the model's compute dtype with this, its ranked outputs in float32."""
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), layer.weight.to(dtype), bias)


def layer_norm_in(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` in ``x``'s dtype (as autocast and the model's own norms run it), whatever the parameters'."""
    w = None if norm.weight is None else norm.weight.to(x.dtype)
    b = None if norm.bias is None else norm.bias.to(x.dtype)
    return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps)


def identity_decision(ctx: ReductionContext) -> LayerDecision:
    """The decision of a block whose budget keeps every token: nothing is reduced (kind "prune")."""
    B, n = ctx.x.shape[0], ctx.n_in
    dst = torch.arange(n, device=ctx.x.device).expand(B, n).clone()
    keep = torch.ones(B, n, dtype=torch.bool, device=ctx.x.device)
    return LayerDecision(ctx.layer, "prune", dst, keep, n_out=n)


def soft_decision(
    layer: int, soft: torch.Tensor, *, score: torch.Tensor | None = None, mix: torch.Tensor | None = None
) -> LayerDecision:
    """A ``kind="soft"`` decision from a row-normalised assignment ``soft [B, n_out, n_in]``.

    ``dst[b, i]`` is the slot receiving the largest share of input ``i``
    (arg-max over slots of column ``i``); ``keep[b, i]`` is true when input
    ``i`` is the largest contributor (arg-max over inputs) of that slot, so at
    most one input per slot is "kept" and kept inputs hold distinct tokens.
    ``score`` defaults to each input's total mass ``soft.sum(1)``; ``mix`` ``[B, n_in, C]``
    names the tokens the assignment mixes when they are not the inputs themselves
    (:attr:`~tokvis.trace.LayerDecision.mix`).
    """
    dst = soft.argmax(1)  # [B, n_in]
    top = soft.argmax(2)  # [B, n_out]: top contributor of each slot
    keep = top.gather(1, dst) == torch.arange(soft.shape[2], device=soft.device)
    if score is None:
        score = soft.sum(1)
    return LayerDecision(layer, "soft", dst, keep, n_out=int(soft.shape[1]), soft=soft, score=score, mix=mix)


class LearnedMethod(Method):
    """Base class of methods with learned per-block parameters.

    Subclasses implement :meth:`make_reducer` (a fresh module for one block),
    :meth:`reducer_shape` (``(embed_dim, n_out)`` from a block's state-dict
    entries) and :meth:`reduce` (the decision, given the block's module).

    Parameters
    ----------
    seed : int >= 0
        Seeds the initial parameters; block ``l`` uses seed ``seed * 1_000_003 + l``.
    """

    #: True when the modules' shapes depend on the number of output slots (soft methods)
    slots_in_shape: ClassVar[bool] = True
    #: name of the per-location module list in the study's (TokenReduction) models
    study_prefix: ClassVar[str] = "cluster_layers"
    #: options that give the decisions of a method file saved before they existed (the former defaults, before
    #: ``decisions_version`` 2): :func:`tokvis.fitting.load_method` fills them in where the file names none
    former_options: ClassVar[dict[str, Any]] = {}
    #: False for an instance without parameters to fit (DPC-KNN with ``merge="average"``)
    learned: bool = True
    #: Adam learning rate :func:`tokvis.fit` uses when none is given
    fit_lr: ClassVar[float] = 3e-3
    #: the tokens reach :meth:`reduce` in float32 for fp16 / bf16 models (small modules that assign or score
    #: tokens directly: PatchMerger, Sinkhorn); False: in the model's dtype, for a method that runs its own
    #: feature layers in the model's compute dtype and only its ranked outputs in float32 (DynamicViT, SiT)
    float32_tokens: ClassVar[bool] = True

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.seed = check_int("seed", seed, minimum=0, error=MethodOptionError)
        self.reducers = nn.ModuleDict()
        self.register_buffer("fitted", torch.tensor(False))
        # a host copy of the buffer, so that a forward never reads the (device) buffer: a sync per block
        self._is_fitted = False
        self._warned = False
        self._fitting = False

    # -- to override -----------------------------------------------------------------------------
    def make_reducer(self, dim: int, n_out: int, g: torch.Generator) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def reducer_shape(self, entries: dict[str, torch.Tensor]) -> tuple[int, int]:  # pragma: no cover
        raise NotImplementedError

    def reduce(self, module: nn.Module, ctx: ReductionContext) -> LayerDecision:  # pragma: no cover
        raise NotImplementedError

    def study_key_map(self) -> dict[str, str]:  # pragma: no cover
        """Study module path (inside one location's module) -> this method's name, per tensor."""
        raise NotImplementedError

    # -- machinery -------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @property
    def is_fitted(self) -> bool:
        """Whether the parameters were fitted or loaded (a host flag kept equal to the ``fitted`` buffer)."""
        return self._is_fitted

    def mark_fitted(self, value: bool = True) -> None:
        self.fitted.fill_(bool(value))
        self._is_fitted = bool(value)

    def reducer(self, layer: int, dim: int, n_out: int, like: torch.Tensor) -> nn.Module:
        """The module of block ``layer``, created (seeded) if it does not exist yet."""
        key = str(layer)
        if key not in self.reducers:
            self._create_reducer(key, layer, dim, n_out, like)
        mod = self.reducers[key]
        have = self.reducer_shape({**dict(mod.named_parameters()), **dict(mod.named_buffers())})
        want = (dim, n_out if self.slots_in_shape else have[1])
        if have != want:
            what = f"{have[1]} output slots" if self.slots_in_shape else f"width {have[0]}"
            raise TokvisError(
                f"method {self.name!r} has parameters for block {layer} with embed_dim={have[0]}"
                + (f", {have[1]} output slots" if self.slots_in_shape else "")
                + f" ({what}), but this model / schedule needs embed_dim={dim}"
                + (f" and {n_out} slots" if self.slots_in_shape else "")
                + "; fit (tokvis.fit) or load parameters for this model and keep rate, or use a fresh method"
            )
        return mod

    @torch.compiler.disable  # seeded creation (a torch.Generator) cannot be traced: once, on the first forward
    def _create_reducer(self, key: str, layer: int, dim: int, n_out: int, like: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        dtype = decision_dtype(like.dtype)  # float32 for fp16 / bf16 models (see _apply)
        self.reducers[key] = self.make_reducer(dim, n_out, g).to(device=like.device, dtype=dtype)

    def decide(self, ctx: ReductionContext) -> LayerDecision:
        if ctx.target >= ctx.n_in:  # nothing to reduce: exactly the unpatched block
            return identity_decision(ctx)
        # no warning inside torch.compile's trace (it would break the graph): an eager forward warns
        if not self.is_fitted and not self._fitting and not self._warned and not torch.compiler.is_compiling():
            self._warned = True
            warnings.warn(
                f"learned method {self.name!r} has neither fitted nor loaded parameters: its patterns are random "
                "until fitted. Fit it with tokvis.fit(model, method, images, ...) or load parameters with "
                "tokvis.fitting.load_method(path) / load_study_checkpoint(method, state_dict)",
                UserWarning,
                stacklevel=2,
            )
        mod = self.reducer(ctx.layer, ctx.x.shape[-1], ctx.target, ctx.x)
        dtype = decision_dtype(ctx.x.dtype)
        if self.float32_tokens and ctx.x.dtype != dtype:  # fp16 / bf16 tokens: scored and assigned in float32
            ctx = dataclasses.replace(ctx, x=ctx.x.to(dtype))
        return self.reduce(mod, ctx)

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply`` (``.to()``, ``.cuda()``, ``.half()``, ...), but the per-block modules'
        parameters stay float32 when the model goes to fp16 / bf16: a learned scorer's outputs are ranked, and
        half-precision scores tie (a ``.bfloat16()`` model's unfitted DynamicViT kept sets overlapped
        float32's at IoU 0.13).  Methods with feature layers of their own (DynamicViT, SiT:
        ``float32_tokens = False``) run those in the model's compute dtype (:func:`linear_in`,
        ``ReductionContext.compute_dtype``) and only their ranked outputs in float32; the others get float32
        tokens.  float64 stays."""
        super()._apply(fn, recurse)
        self.reducers._apply(lambda t: t.float() if t.dtype in _HALF else t, recurse)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # create the per-block modules named in the state dict before torch loads into them
        head = prefix + "reducers."
        blocks: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in state_dict.items():
            if k.startswith(head):
                block, _, rest = k[len(head) :].partition(".")
                blocks.setdefault(block, {})[rest] = v
        for block, entries in blocks.items():
            if block in self.reducers:
                continue
            if not block.isdigit():
                errors.append(f"reducers.{block}: block keys must be block indices")
                continue
            try:
                dim, n_out = self.reducer_shape(entries)
            except KeyError as e:
                errors.append(f"reducers.{block}: missing tensor {e}")
                continue
            like = next(iter(entries.values()))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(block))
            self.reducers[block] = self.make_reducer(dim, n_out, g).to(dtype=decision_dtype(like.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        flag = state_dict.get(prefix + "fitted")
        if isinstance(flag, torch.Tensor) and flag.numel() == 1 and not flag.is_meta:
            self._is_fitted = bool(flag)  # once, at load time (not in a forward)


def load_study_checkpoint(
    method: LearnedMethod, state_dict: dict[str, torch.Tensor], *, locations=(3, 6, 9)
) -> LearnedMethod:
    """Load the parameters of a model trained with the study's code (TokenReduction repository).

    The study's models hold one module per reduction location in
    ``score_predictor.{i}`` (DynamicViT) or ``cluster_layers.{i}`` (SiT,
    PatchMerger, Sinkhorn), ``i`` counting the locations in ascending order;
    location ``i`` maps to block ``locations[i]`` here.  The tensor names inside
    each module are mapped by the method's :meth:`LearnedMethod.study_key_map`
    (documented in each method's docstring); tensors of one element are
    reshaped (SiT's ``scale`` is ``[1, 1, 1]`` there, a scalar here).  Backbone
    tensors and anything else are ignored; a ``{"model": ...}`` wrapper and a
    ``module.`` prefix (DataParallel) are removed.

    Parameters
    ----------
    method : LearnedMethod
        Modified in place (parameters created or replaced) and marked fitted.
    state_dict : dict of str -> Tensor
        The study model's state dict (or a checkpoint holding it under "model").
    locations : sequence of int
        The blocks of the study's ``reduction_loc`` (default ``[3, 6, 9]``, the study's default).

    Returns
    -------
    method

    Raises
    ------
    WeightsError
        No tensor of this method's study modules is present, a location index
        has no block in ``locations``, or a tensor's shape does not fit.
    """
    from tokvis.errors import WeightsError

    if not isinstance(method, LearnedMethod) or not method.learned:
        raise MethodOptionError(
            f"load_study_checkpoint needs a learned method (dynamicvit, sit, patchmerger, sinkhorn, dpcknn with "
            f"merge='learned'): got {getattr(method, 'name', '') or type(method).__name__} with options "
            f"{method.options() if isinstance(method, Method) else {}}"
        )
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    locs = [int(v) for v in locations]
    key_map = method.study_key_map()
    head = method.study_prefix + "."
    ours: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        if not k.startswith(head):
            continue
        idx, _, rest = k[len(head) :].partition(".")
        if not idx.isdigit() or rest not in key_map:
            raise WeightsError(
                f"unexpected tensor {k!r} in the study checkpoint for {method.name!r}; known names inside "
                f"{method.study_prefix}.<i>: {sorted(key_map)}"
            )
        if int(idx) >= len(locs):
            raise WeightsError(
                f"the checkpoint has a module for reduction location {idx} but locations={locs} names only "
                f"{len(locs)}; pass the study run's reduction_loc as locations="
            )
        ours[f"reducers.{locs[int(idx)]}.{key_map[rest]}"] = v
    if not ours:
        raise WeightsError(
            f"no tensor named {method.study_prefix}.<i>.* in the checkpoint: it was not trained with the study's "
            f"{method.name!r} model"
        )
    blocks = {k.split(".")[1] for k in ours}
    for b in blocks:  # replace existing modules so shapes come from the checkpoint
        if b in method.reducers:
            del method.reducers[b]
    probe = {}
    for b in blocks:
        entries = {k.split(".", 2)[2]: v for k, v in ours.items() if k.split(".")[1] == b}
        dim, n_out = method.reducer_shape(entries)
        g = torch.Generator().manual_seed(0)
        probe[b] = method.make_reducer(dim, n_out, g).state_dict()
    for k, v in list(ours.items()):
        _, b, name = k.split(".", 2)
        want = probe[b].get(name)
        if want is None:
            continue
        if v.shape != want.shape:
            if v.numel() == want.numel() == 1:
                ours[k] = v.reshape(want.shape)
            else:
                raise WeightsError(
                    f"tensor for {k} has shape {tuple(v.shape)}, expected {tuple(want.shape)} from the other tensors"
                )
    missing = [f"reducers.{b}.{n}" for b in blocks for n in probe[b] if f"reducers.{b}.{n}" not in ours]
    if missing:
        raise WeightsError(f"the study checkpoint lacks tensors for {missing}")
    full = {**ours, "fitted": torch.tensor(True)}
    device = method.fitted.device
    method.load_state_dict({k: v.to(device) for k, v in full.items()}, strict=False)
    method.mark_fitted(True)
    return method
