"""Recording reduction decisions: ``record()``, ``run_with_trace()``, ``report()``.

Recording is a context manager whose hooks are removed in ``finally``, also
when the forward raises.  Patched tokvis blocks announce their decisions with
:func:`report`; third-party reduction code can do the same.  Decisions are
detached and moved to the CPU (see below); nothing else is changed, so outputs are
identical with and without a recorder.

No host sync while recording: decisions stay on the model's device during the
forward; at its end one asynchronous copy per tensor goes to the host (pinned
memory, ``non_blocking`` on CUDA) and the :class:`Trace` is built (and checked)
only when ``rec.trace`` / ``rec.batches`` is first read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from tokvis.errors import TraceMismatchError
from tokvis.model import backbone_name, check_images, grid_for_input, is_patched, model_info, patch_state
from tokvis.trace import LayerDecision, Trace, TraceMeta
from tokvis.validate import checked_keywords

# module id -> recorders listening to it (patched models: every block; third-party: any submodule)
_LISTENERS: dict[int, list["Recorder"]] = {}


def report(module: nn.Module, decision: LayerDecision) -> None:
    """Announce a reduction ``decision`` made inside ``module``.

    A no-op unless a :func:`record` context is open on a model containing
    ``module``.  Third-party reduction code calls this with the module doing the
    reduction (any submodule of the recorded model) and a
    :class:`~tokvis.trace.LayerDecision` whose ``dst`` indexes the patch tokens
    entering the reduction (prefix tokens excluded).

    Parameters
    ----------
    module : nn.Module
        The module that made the reduction (any submodule of the recorded model).
    decision : LayerDecision
        What it decided, over the patch tokens entering the reduction.
    """
    if not _LISTENERS:
        return
    for rec in _LISTENERS.get(id(module), ()):
        rec._add(decision)


def _unique_ids(image_ids) -> list:
    """``image_ids`` as a list, refused when an id repeats: images are paired by id (compare, stores)."""
    from collections import Counter

    from tokvis.errors import ArgumentTypeError

    if isinstance(image_ids, (str, bytes)) or not hasattr(image_ids, "__iter__"):
        raise ArgumentTypeError(f"image_ids must be a sequence of ids, one per image: got {image_ids!r}")
    ids = list(image_ids)
    try:
        dup = [k for k, n in Counter(ids).items() if n > 1]
    except TypeError as e:
        raise ArgumentTypeError(f"image_ids must be hashable ids (str or int): {e}") from None
    if dup:
        raise TraceMismatchError(
            f"image_ids holds {len(dup)} id(s) more than once (e.g. {dup[0]!r}); each image needs its own id, "
            "since traces and runs pair images by id"
        )
    return ids


class Recorder:
    """Collects decisions while open; see :func:`record`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        image_ids: Sequence[Any] | None = None,
        dataset: str | None = None,
        store_scores: bool = True,
    ) -> None:
        self.model = model
        self.info = model_info(model)
        self.dataset = dataset
        self.store_scores = store_scores
        self._given_ids = _unique_ids(image_ids) if image_ids is not None else None
        self._batches: list[Trace] = []
        self._pending: list[tuple] = []  # forwards whose decisions are on their way to the host
        self._images = 0
        self._current: list[LayerDecision] | None = None
        self._grid: tuple[int, int] | None = None
        self._hooks: list[Any] = []
        self._ids: list[int] = []
        self._trace: Trace | None = None
        self._open = False

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        if self._open:
            raise RuntimeError("this recorder is already open")
        try:
            self._hooks.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._hooks.append(self.model.register_forward_hook(self._post_hook))
            self._ids = [id(m) for m in self.model.modules()]
            for i in self._ids:
                _LISTENERS.setdefault(i, []).append(self)
            self._open = True
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close()
        if exc_type is None:
            self._flush()
        else:
            self._current = None  # the failed forward's partial decisions are not a batch

    def _close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for i in self._ids:
            lst = _LISTENERS.get(i)
            if lst is not None:
                if self in lst:
                    lst.remove(self)
                if not lst:
                    del _LISTENERS[i]
        self._ids = []
        self._open = False

    # -- hooks ----------------------------------------------------------------------------------
    def _pre_hook(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self._flush()
        self._current = []
        from tokvis.backbones import backbone_for

        images = backbone_for(model).images(args, kwargs)
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            self._grid = grid_for_input(model, tuple(images.shape[-2:]))
            self._batch_size = int(images.shape[0])
        else:
            self._grid, self._batch_size = self.info.grid_size, None

    def _post_hook(self, model: nn.Module, args: tuple, output: Any) -> None:
        self._flush()

    def _add(self, decision: LayerDecision) -> None:
        if self._current is None:  # a forward that bypassed model() (e.g. forward_features)
            self._current, self._grid, self._batch_size = [], self.info.grid_size, None
        # kept on the model's device during the forward: no device-to-host copy (a host sync) per block
        d = decision._map(lambda t: t.detach())
        if not self.store_scores and d.score is not None:
            d = dataclasses.replace(d, score=None)
        self._current.append(d)

    def _flush(self) -> None:
        """End of a forward: start one asynchronous copy of its decisions to the host (CUDA: pinned memory,
        ``non_blocking``, one event); the trace is built when first asked for, never inside the forward."""
        if self._current is None:
            return
        decisions, self._current = self._current, None
        batch = self._batch_size if self._batch_size is not None else (decisions[0].batch_size if decisions else 0)
        start = self._images
        self._images += batch
        meta = self._meta(self._grid or self.info.grid_size, start, batch)
        host = [d._map(_start_copy) for d in decisions]
        event = None
        if any(d.dst.is_cuda for d in decisions):
            event = torch.cuda.Event()
            event.record()
        self._pending.append((host, meta, event))
        self._trace = None

    def _materialise(self) -> None:
        self._flush()
        while self._pending:
            host, meta, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()  # the copies of that forward have landed
            self._batches.append(Trace([d._map(_on_host) for d in host], meta))

    def _meta(self, grid: tuple[int, int], start: int, n: int) -> TraceMeta:
        st = patch_state(self.model)
        kw: dict[str, Any] = {}
        if st is not None:
            sch = st.schedule
            kw = dict(
                method=st.method.name or type(st.method).__name__,
                keep_rate=sch.keep_rate,
                r=sch.r_arg,
                locations=list(sch.locations),
                options=st.method.options(),
            )
        if self._given_ids is not None:
            if start + n > len(self._given_ids):
                raise TraceMismatchError(
                    f"{len(self._given_ids)} image ids were given but {start + n} images went through the model"
                )
            ids = self._given_ids[start : start + n]
        else:
            ids = list(range(start, start + n))
        return TraceMeta(
            grid_size=tuple(grid),
            num_prefix_tokens=self.info.num_prefix_tokens,
            depth=self.info.depth,
            backbone=backbone_name(self.model),
            dataset=self.dataset,
            image_ids=ids,
            **kw,
        )

    # -- result ---------------------------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        """All batches recorded so far, in order, as one :class:`Trace`."""
        self._materialise()
        if not self._batches:
            raise TraceMismatchError("nothing was recorded: run the model inside the `with record(model)` block")
        if self._trace is None:
            self._trace = self._batches[0] if len(self._batches) == 1 else Trace.concat(self._batches)
        return self._trace

    @property
    def batches(self) -> list[Trace]:
        """One trace per forward call."""
        self._materialise()
        return list(self._batches)


def _start_copy(t: torch.Tensor) -> torch.Tensor:
    """CUDA: start the copy into pinned host memory without waiting for the device; other devices later."""
    return t.to("cpu", non_blocking=True) if t.is_cuda else t


def _on_host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.to("cpu")


def record(
    model: nn.Module,
    *,
    image_ids: Sequence[Any] | None = None,
    dataset: str | None = None,
    store_scores: bool = True,
) -> Recorder:
    """Record every reduction decision of ``model`` while the context is open.

    Parameters
    ----------
    model : timm VisionTransformer
        Patched with :func:`tokvis.patch` (or reducing through :func:`report`).
    image_ids : sequence, optional
        Ids of the images, in the order they go through the model (default: 0, 1, ...).
    dataset : str, optional
        Dataset name stored in the trace metadata.
    store_scores : bool
        Keep the methods' ranking scores (default True).

    Examples
    --------
    >>> with tokvis.record(model) as rec:  # doctest: +SKIP
    ...     model(x1); model(x2)
    >>> trace = rec.trace                  # doctest: +SKIP
    """
    return Recorder(model, image_ids=image_ids, dataset=dataset, store_scores=store_scores)


@checked_keywords()
def run_with_trace(
    model: nn.Module,
    images: torch.Tensor,
    *,
    image_ids: Sequence[Any] | None = None,
    dataset: str | None = None,
    grad: bool = False,
) -> tuple[torch.Tensor, Trace]:
    """Run ``model(images)`` and return its output with the trace of its decisions.

    Parameters
    ----------
    model : nn.Module
        A timm ViT, patched (:func:`tokvis.patch`) or not (then the trace has no decisions).
    images : Tensor [B, 3, H, W]
        Preprocessed images (see :func:`tokvis.data.transform_for`).
    image_ids : sequence, optional
        Ids of the images, stored in the trace's metadata (default: 0, 1, ...).
    dataset : str, optional
        Name of the dataset, stored in the trace's metadata.
    grad : bool
        Keep autograd on (default off: runs under ``torch.no_grad()``).
    """
    if not is_patched(model):  # a patched model checks its input in its own forward pre-hook: once per forward
        check_images(model, images)
    with record(model, image_ids=image_ids, dataset=dataset) as rec, torch.set_grad_enabled(grad):
        out = model(images)
    return out, rec.trace
