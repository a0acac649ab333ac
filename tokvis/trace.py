"""The central data of tokvis: per-block reduction decisions and traces of them.

A :class:`LayerDecision` says, for one block and a batch of images, where each
patch token entering the reduction goes: to which output token (``dst``),
whether it survives as its own token (``keep``), with which weight it was
merged, and which score the method ranked it by.  A :class:`Trace` is the
ordered tuple of decisions for a batch of images plus metadata, and composes
them into patch-level maps (``labels``, ``kept``, ``depth``) with one gather
per layer, never a dense ``N x N`` product.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from tokvis.errors import ArgumentValueError, BlockIndexError, TraceFileError, TraceMismatchError
from tokvis.fileio import atomic_write
from tokvis.validate import check_path

KINDS = ("prune", "merge", "fuse", "soft")
TRACE_FORMAT = "tokvis-trace"
#: Version 2 adds ``header_sha256`` (the metadata is checksummed too); version 1 files are still read.
TRACE_VERSION = 2
_READABLE_VERSIONS = (1, 2)

_OPTIONAL = ("weight", "soft", "score", "size_scale", "query_soft")


@dataclass(frozen=True, eq=False)
class LayerDecision:
    """One reduction step for a batch of images.

    Parameters
    ----------
    layer : int
        0-based block index; the block's output holds the reduced token set.
    kind : {"prune", "merge", "fuse", "soft"}
        What kind of reduction it is.
    dst : LongTensor [B, n_in]
        Output slot (0 .. n_out-1) of each input patch token, -1 = dropped.
    keep : BoolTensor [B, n_in]
        The input token survives as its own output token (pruning: kept; merging:
        it is the destination / medoid / centre of its group).
    n_out : int
        Number of patch tokens after the reduction (prefix tokens excluded).
    weight : FloatTensor [B, n_in], optional
        Contribution of each token to its output token; ``None`` = equal weights.
    soft : FloatTensor [B, n_out, n_in], optional
        Full soft assignment (only for ``kind="soft"``); ``dst`` then holds its arg-max.
    score : FloatTensor [B, n_in], optional
        The ranking signal the method used (CLS attention, similarity, ...).
    size_scale : FloatTensor [B, n_in], optional
        "Soft keep": multiplies the size of each input token before the reduction
        is applied, leaving the tokens themselves unchanged (``None`` = 1).  With
        proportional attention (``log(size)`` added to the attention logits) a
        token scaled towards 0 stops being attended; DynamicViT's fitting uses it
        with an identity ``dst`` as a differentiable keep mask.
    soft_kept_own : bool
        A promise by the method, for ``soft`` decisions: every image keeps exactly
        ``n_out`` tokens (``keep``) and each kept token feeds only its own ``dst``
        slot (its column of ``soft`` is zero elsewhere), as VoMix's mixing does by
        construction.  :func:`tokvis.methods.ops.apply_decision` then computes
        ``soft @ x`` sparsely without checking the structure on the host.  A
        runtime hint only: not saved with a trace (a loaded decision gets the dense product).
    weighted_sum : bool
        Output token ``j`` is the weighted *sum* ``sum_i w_i x_i`` of its inputs instead of their
        weighted mean (default False: ``sum_i w_i x_i / sum_i w_i``).  Sizes are summed either way.
        EViT's fused token as the study and EViT's code make it (the dropped tokens times their
        class attention, unnormalised); a token alone in its slot with weight 1 is unchanged.
        Saved with a trace (in the header, only when true).
    mix : FloatTensor [B, n_in, C], optional
        For ``soft`` decisions: the tokens the assignment mixes, when they are not the
        input tokens themselves (``x_out = soft @ mix``): the study's PatchMerger mixes
        the layer-normalised tokens, its Sinkhorn the L2-normalised ones.  Applied by
        :func:`tokvis.methods.ops.apply_decision`; runtime only, like ``soft_kept_own``:
        not saved with a trace, and dropped by :meth:`to` and :meth:`index`.
    query_soft : FloatTensor [B, n_out, n_in], optional
        For decisions taken inside the attention whose reduced queries are not the tokens' own
        reduction: row ``j`` holds the weights by which the input tokens' queries are mixed into
        output token ``j``'s query (rows sum to 1).  VoMix with ``residual="drop"`` records it:
        the tokens are pruned (``kind="prune"``) while each kept token's query mixes in the removed
        tokens' queries.  ``None`` when the queries are reduced like the tokens (or not at all).
        Descriptive only: :func:`tokvis.methods.ops.apply_decision` does not read it.  Saved with a
        trace; a run store keeps it only when recorded with ``soft=True`` (``--soft``).
    """

    layer: int
    kind: str
    dst: torch.Tensor
    keep: torch.Tensor
    n_out: int
    weight: torch.Tensor | None = None
    soft: torch.Tensor | None = None
    score: torch.Tensor | None = None
    size_scale: torch.Tensor | None = None
    soft_kept_own: bool = False
    weighted_sum: bool = False
    mix: torch.Tensor | None = None
    query_soft: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ArgumentValueError(f"kind must be one of {KINDS}: got {self.kind!r}")
        if self.dst.dim() != 2:
            raise ArgumentValueError(f"dst must be 2-D [B, n_in]: shape is {tuple(self.dst.shape)}")
        if self.dst.dtype != torch.int64:
            raise ArgumentValueError(f"dst must be int64: dtype is {self.dst.dtype}")
        if self.keep.shape != self.dst.shape or self.keep.dtype != torch.bool:
            raise ArgumentValueError(
                f"keep must be a bool tensor shaped like dst {tuple(self.dst.shape)}: "
                f"got {self.keep.dtype} {tuple(self.keep.shape)}"
            )
        for name in ("weight", "score", "size_scale"):
            t = getattr(self, name)
            if t is not None and t.shape != self.dst.shape:
                raise ArgumentValueError(
                    f"{name} must be shaped like dst {tuple(self.dst.shape)}: got {tuple(t.shape)}"
                )
        expect = (self.dst.shape[0], int(self.n_out), self.dst.shape[1])
        for name in ("soft", "query_soft"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != expect:
                raise ArgumentValueError(f"{name} must have shape {expect} [B, n_out, n_in]: got {tuple(t.shape)}")
        if self.soft is None and self.kind == "soft":
            raise ArgumentValueError("a decision of kind 'soft' needs the soft assignment matrix")
        if self.soft_kept_own and self.soft is None:
            raise ArgumentValueError("soft_kept_own describes a soft assignment matrix: the decision has none")
        if self.weighted_sum and self.soft is not None:
            raise ArgumentValueError("weighted_sum describes a hard assignment (dst and weight): the decision is soft")
        if self.mix is not None and (self.soft is None or tuple(self.mix.shape[:2]) != tuple(self.dst.shape)):
            raise ArgumentValueError(
                f"mix must be the [B, n_in, C] tokens a soft assignment mixes (B, n_in = {tuple(self.dst.shape)}): "
                f"got {tuple(self.mix.shape)}" + ("" if self.soft is not None else " without a soft assignment")
            )

    @property
    def batch_size(self) -> int:
        return int(self.dst.shape[0])

    @property
    def n_in(self) -> int:
        return int(self.dst.shape[1])

    def to(self, device: torch.device | str = "cpu") -> "LayerDecision":
        """A copy with every tensor detached and moved to ``device``."""
        return self._map(lambda t: t.detach().to(device))

    def index(self, rows: slice | Sequence[int] | torch.Tensor) -> "LayerDecision":
        """The decision restricted to some images of the batch."""
        return self._map(lambda t: t[rows])

    def assignment_matrix(self) -> torch.Tensor:
        """Dense hard assignment ``A [B, n_out, n_in]`` with ``A[b, dst, i] = 1`` (for tests and small inputs)."""
        B, n = self.dst.shape
        a = torch.zeros(B, self.n_out + 1, n, dtype=torch.float64)
        idx = torch.where(self.dst >= 0, self.dst, self.n_out)
        a.scatter_(1, idx.unsqueeze(1), 1.0)
        return a[:, : self.n_out]

    def _map(self, fn) -> "LayerDecision":
        kw = {name: (None if getattr(self, name) is None else fn(getattr(self, name))) for name in _OPTIONAL}
        return dataclasses.replace(self, dst=fn(self.dst), keep=fn(self.keep), mix=None, **kw)


@dataclass(frozen=True)
class TraceMeta:
    """What a trace was recorded on.  Every field is plain JSON-serialisable data.

    Attributes
    ----------
    grid_size : tuple of int
        Patch grid ``(h, w)``.
    num_prefix_tokens : int
        Class, distillation and register tokens in front of the patches (never reduced).
    depth : int
        Blocks of the model.
    backbone, method : str, optional
        The model's name and the reduction method's registered name.
    keep_rate : float, optional
        The per-stage keep rate, when the schedule has one.
    r : int or list of int, optional
        Tokens removed per block, when the schedule is given by ``r``.
    locations : list of int, optional
        Blocks that reduce.
    dataset : str, optional
        The dataset's name.
    image_ids : list, optional
        One id per image, in order.
    options : dict
        The method's options (:meth:`tokvis.Method.options`).
    """

    grid_size: tuple[int, int]
    num_prefix_tokens: int
    depth: int
    backbone: str | None = None
    method: str | None = None
    keep_rate: float | None = None
    r: list[int] | int | None = None
    locations: list[int] | None = None
    dataset: str | None = None
    image_ids: list[Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid_size"] = list(self.grid_size)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TraceMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TraceFileError(f"trace metadata has unknown fields {sorted(unknown)}; written by a newer tokvis?")
        d = dict(d)
        d["grid_size"] = tuple(int(v) for v in d["grid_size"])
        return cls(**d)

    def comparable_key(self) -> tuple:
        return (self.grid_size, self.num_prefix_tokens, self.depth)


class Trace:
    """Every reduction decision of a model on a set of images, in block order.

    Parameters
    ----------
    decisions : iterable of LayerDecision
        One per block where a reduction happened, ascending block index, all with
        the same batch size.
    meta : TraceMeta
        Grid size, number of prefix tokens, model depth and descriptive metadata.
    """

    def __init__(self, decisions: Iterable[LayerDecision], meta: TraceMeta):
        decisions = tuple(decisions)
        layers = [d.layer for d in decisions]
        if layers != sorted(set(layers)):
            raise TraceMismatchError(f"decisions must have strictly ascending layers: got {layers}")
        n = meta.grid_size[0] * meta.grid_size[1]
        sizes = {d.batch_size for d in decisions}
        if len(sizes) > 1:
            raise TraceMismatchError(f"decisions disagree on the number of images: {sorted(sizes)}")
        expect_in = n
        for d in decisions:
            if d.n_in < expect_in or (d.n_in > expect_in and bool((d.dst[:, expect_in:] >= 0).any())):
                raise TraceMismatchError(
                    f"decision at block {d.layer} takes {d.n_in} tokens but the previous step produced {expect_in}"
                )
            if d.layer >= meta.depth:
                raise TraceMismatchError(f"decision at block {d.layer} but the model has {meta.depth} blocks")
            expect_in = d.n_out
        self._decisions = decisions
        self._by_layer = {d.layer: d for d in decisions}
        self.meta = meta
        self._num_images = sizes.pop() if sizes else len(meta.image_ids or [])
        if meta.image_ids is not None and len(meta.image_ids) != self._num_images:
            raise TraceMismatchError(f"{len(meta.image_ids)} image ids for {self._num_images} images in the decisions")
        self._labels_cache: dict[int, torch.Tensor] = {}
        self._kept_cache: dict[int, torch.Tensor] = {}

    # -- basic properties ------------------------------------------------------------------------
    @property
    def decisions(self) -> tuple[LayerDecision, ...]:
        return self._decisions

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(d.layer for d in self._decisions)

    @property
    def kinds(self) -> dict[int, str]:
        """Kind of the decision at each recorded block (``{layer: "prune" | "merge" | "fuse" | "soft"}``)."""
        return {d.layer: d.kind for d in self._decisions}

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.meta.grid_size)  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_images(self) -> int:
        return self._num_images

    @property
    def image_ids(self) -> list[Any]:
        return list(self.meta.image_ids) if self.meta.image_ids is not None else list(range(self.num_images))

    def __len__(self) -> int:
        return len(self._decisions)

    def __repr__(self) -> str:
        m = self.meta
        sched = f"keep_rate={m.keep_rate}" if m.keep_rate is not None else f"r={m.r}"
        return (
            f"Trace(method={m.method!r}, backbone={m.backbone!r}, {sched}, images={self.num_images}, "
            f"grid={self.grid_size}, layers={self.layers})"
        )

    def decision(self, layer: int) -> LayerDecision:
        """The decision recorded at block ``layer``."""
        try:
            return self._by_layer[int(layer)]
        except KeyError:
            raise KeyError(f"no decision recorded at block {layer}; recorded blocks: {self.layers}") from None

    # -- composition -----------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> int:
        return check_block_index(layer, self.meta.depth)

    def labels(self, layer: int) -> torch.Tensor:
        """Token (after block ``layer``) holding each original patch; -1 = dropped.

        Returns
        -------
        LongTensor [num_images, num_patches]
            ``layer`` may be any block index; before the first decision every patch
            is its own token (``labels = arange``).
        """
        layer = self._check_layer(layer)
        key = max((d.layer for d in self._decisions if d.layer <= layer), default=-1)
        if key not in self._labels_cache:
            self._compose_until(key)
        return self._labels_cache[key]

    def kept(self, layer: int) -> torch.Tensor:
        """Whether each patch's own token is still there after block ``layer``.

        Returns
        -------
        BoolTensor [num_images, num_patches]
            ``kept`` implies ``labels >= 0``.
        """
        layer = self._check_layer(layer)
        key = max((d.layer for d in self._decisions if d.layer <= layer), default=-1)
        if key not in self._kept_cache:
            self._compose_until(key)
        return self._kept_cache[key]

    def _compose_until(self, key: int) -> None:
        B, n = self.num_images, self.num_patches
        labels = torch.arange(n, dtype=torch.int64).expand(B, n).clone()
        kept = torch.ones(B, n, dtype=torch.bool)
        self._labels_cache.setdefault(-1, labels)
        self._kept_cache.setdefault(-1, kept)
        for d in self._decisions:
            if d.layer > key:
                break
            if d.layer in self._labels_cache:
                labels, kept = self._labels_cache[d.layer], self._kept_cache[d.layer]
                continue
            alive = labels >= 0
            idx = labels.clamp(min=0)
            new_labels = torch.where(alive, d.dst.gather(1, idx), -1)
            kept = kept & alive & d.keep.gather(1, idx)
            labels = new_labels
            self._labels_cache[d.layer], self._kept_cache[d.layer] = labels, kept

    def depth(self) -> torch.Tensor:
        """First block after which each patch is no longer its own token.

        Returns
        -------
        LongTensor [num_images, num_patches]
            The model's depth (number of blocks) for patches that stay their own
            token to the end.
        """
        out = torch.full((self.num_images, self.num_patches), self.meta.depth, dtype=torch.int64)
        for d in reversed(self._decisions):
            out = torch.where(~self.kept(d.layer), d.layer, out)
        return out

    def token_counts(self, layer: int) -> torch.Tensor:
        """Number of distinct patch tokens per image after block ``layer`` that hold at least one patch."""
        lab = self.labels(layer)
        n_out = max(int(lab.max()) + 2, 1)
        present = torch.zeros(self.num_images, n_out, dtype=torch.bool)
        present.scatter_(1, lab + 1, True)
        return present[:, 1:].sum(1)

    # -- batching --------------------------------------------------------------------------------
    def select(self, rows: Sequence[int] | slice) -> "Trace":
        """The trace restricted to some images (by position)."""
        ids = self.image_ids
        if isinstance(rows, slice):
            sel = ids[rows]
            rows_t: Any = rows
        else:
            rows_t = torch.as_tensor(list(rows), dtype=torch.int64)
            sel = [ids[i] for i in rows_t.tolist()]
        meta = dataclasses.replace(self.meta, image_ids=sel)
        return Trace([d.index(rows_t) for d in self._decisions], meta)

    @staticmethod
    def concat(traces: Sequence["Trace"]) -> "Trace":
        """Join traces of the same model and method on different images (batches of one recording)."""
        if not traces:
            raise TraceMismatchError("concat needs at least one trace")
        first = traces[0]
        for i, t in enumerate(traces[1:], 1):
            if t.meta.comparable_key() != first.meta.comparable_key():
                raise TraceMismatchError(
                    f"trace {i} has grid/prefix/depth {t.meta.comparable_key()} but trace 0 has "
                    f"{first.meta.comparable_key()}; inputs of different sizes cannot share one trace"
                )
            if t.layers != first.layers:
                raise TraceMismatchError(f"trace {i} has reductions at blocks {t.layers}, trace 0 at {first.layers}")
        decisions = []
        for j in range(len(first.layers)):
            parts = [t._decisions[j] for t in traces]
            decisions.append(_concat_decisions(parts))
        ids: list[Any] = []
        offset = 0
        for t in traces:
            if t.meta.image_ids is None:
                ids.extend(range(offset, offset + t.num_images))
            else:
                ids.extend(t.meta.image_ids)
            offset += t.num_images
        return Trace(decisions, dataclasses.replace(first.meta, image_ids=ids))

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace losslessly to ``path`` (safetensors with JSON metadata and checksums).

        The file is written to a temporary name and renamed (:func:`tokvis.fileio.atomic_write`,
        with the user's umask), so an interrupted save never leaves a half-written file under
        ``path``.  The header holds a SHA-256 of the tensors and one of the header itself
        (``header_sha256``), so an edited ``grid_size``, kind or method is caught on load.
        """
        from safetensors.torch import save as st_save

        tensors: dict[str, torch.Tensor] = {}
        layer_info = []
        for d in self._decisions:
            p = f"L{d.layer}."
            tensors[p + "dst"] = d.dst.contiguous()
            tensors[p + "keep"] = d.keep.contiguous()
            for name in _OPTIONAL:
                t = getattr(d, name)
                if t is not None:
                    tensors[p + name] = t.contiguous()
            info = {"layer": d.layer, "kind": d.kind, "n_out": d.n_out}
            if d.weighted_sum:  # only when true: the headers of every other trace stay as they were
                info["weighted_sum"] = True
            layer_info.append(info)
        header = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "meta": self.meta.to_json(),
            "layers": layer_info,
            "num_images": self.num_images,
            "sha256": _digest(tensors),
        }
        header["header_sha256"] = _header_digest(header)
        blob = st_save(tensors, metadata={"tokvis": json.dumps(header)})
        return atomic_write(path, blob)


def check_block_index(layer: int, depth: int) -> int:
    """``layer`` as an int in ``[-1, depth - 1]`` (-1 = before the first block), else BlockIndexError."""
    import operator

    from tokvis.errors import ArgumentTypeError

    try:
        if isinstance(layer, bool):
            raise TypeError
        layer = operator.index(layer)
    except TypeError:
        want = f"a block index (an integer in [-1, {depth - 1}])"
        raise ArgumentTypeError(f"layer must be {want}: got {layer!r}") from None
    if not -1 <= layer < depth:
        raise BlockIndexError(f"layer must be in [-1, {depth - 1}] (block index): got {layer}")
    return layer


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _header_digest(header: dict[str, Any]) -> str:
    """SHA-256 of a trace header's canonical JSON, without its own ``header_sha256`` field."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _pad(t: torch.Tensor | None, n: int, fill) -> torch.Tensor | None:
    if t is None or t.shape[1] == n:
        return t
    pad = torch.full((t.shape[0], n - t.shape[1], *t.shape[2:]), fill, dtype=t.dtype)
    return torch.cat([t, pad], 1)


def _concat_decisions(parts: Sequence[LayerDecision]) -> LayerDecision:
    first = parts[0]
    kinds = {p.kind for p in parts}
    if len(kinds) > 1:
        raise TraceMismatchError(f"block {first.layer} has decisions of different kinds {sorted(kinds)}")
    n_in = max(p.n_in for p in parts)
    n_out = max(p.n_out for p in parts)
    for name in _OPTIONAL:
        present = {getattr(p, name) is not None for p in parts}
        if len(present) > 1:
            raise TraceMismatchError(f"block {first.layer}: some batches recorded {name!r} and others did not")
    if len({p.weighted_sum for p in parts}) > 1:
        raise TraceMismatchError(f"block {first.layer}: some batches summed their merged tokens and others averaged")
    kw: dict[str, Any] = {
        "dst": torch.cat([_pad(p.dst, n_in, -1) for p in parts]),
        "keep": torch.cat([_pad(p.keep, n_in, False) for p in parts]),
    }
    for name in ("weight", "score", "size_scale"):
        if getattr(first, name) is not None:
            kw[name] = torch.cat([_pad(getattr(p, name), n_in, 0.0) for p in parts])
    for name in ("soft", "query_soft"):  # [B, n_out, n_in]: padded in both token dimensions
        if getattr(first, name) is not None:
            pad = torch.nn.functional.pad
            kw[name] = torch.cat([pad(getattr(p, name), (0, n_in - p.n_in, 0, n_out - p.n_out)) for p in parts])
    return LayerDecision(layer=first.layer, kind=first.kind, n_out=n_out, weighted_sum=first.weighted_sum, **kw)


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace written by :meth:`Trace.save`.

    Parameters
    ----------
    path : str or PathLike
        A file written by :meth:`Trace.save`.

    Raises
    ------
    TraceFileError
        If the file is missing, truncated, corrupt or not a tokvis trace.
    """
    check_path("path", path)
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TraceFileError(f"no trace file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("tokvis")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for bad headers / short files
        raise TraceFileError(
            f"{path} is not a readable trace file (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from e
    if raw is None:
        raise TraceFileError(f"{path} is a safetensors file but not a tokvis trace (no 'tokvis' metadata)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraceFileError(f"{path}: trace metadata is not valid JSON ({e})") from e
    if header.get("format") != TRACE_FORMAT:
        raise TraceFileError(f"{path}: unknown format {header.get('format')!r}")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise TraceFileError(
            f"{path}: the trace header's version is {version!r} ({type(version).__name__}), not an integer; "
            "the header was edited or written by another program. Save the trace again with Trace.save"
        )
    if version not in _READABLE_VERSIONS:
        raise TraceFileError(
            f"{path}: trace format version {version} is not supported "
            f"(this tokvis reads versions {', '.join(map(str, _READABLE_VERSIONS))}); "
            + ("upgrade tokvis" if version > TRACE_VERSION else "save the trace again with this tokvis")
        )
    if version >= 2 and header.get("header_sha256") != _header_digest(header):
        raise TraceFileError(
            f"{path}: the trace header (metadata, layer kinds, method ...) does not match its checksum; "
            "it was edited or is corrupt. Record the trace again"
        )
    if _digest(tensors) != header.get("sha256"):
        raise TraceFileError(f"{path}: checksum mismatch, the file is corrupt")
    decisions = []
    try:
        for info in header["layers"]:
            p = f"L{info['layer']}."
            decisions.append(
                LayerDecision(
                    layer=int(info["layer"]),
                    kind=info["kind"],
                    n_out=int(info["n_out"]),
                    dst=tensors[p + "dst"],
                    keep=tensors[p + "keep"],
                    weighted_sum=info.get("weighted_sum", False) is True,
                    **{name: tensors.get(p + name) for name in _OPTIONAL},
                )
            )
        meta = TraceMeta.from_json(header["meta"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, TraceFileError):
            raise
        raise TraceFileError(f"{path}: trace content is inconsistent ({type(e).__name__}: {e})") from e
    return Trace(decisions, meta)
