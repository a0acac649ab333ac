"""Recording reduction decisions: ``record()``, ``run_with_trace()``, ``report()``.

Recording is a context manager whose hooks are removed in ``finally``, also
when the forward raises.  Patched tokvis blocks announce their decisions with
:func:`report`; third-party reduction code can do the same.  Decisions are
detached and moved to the CPU; nothing else is changed, so outputs are
identical with and without a recorder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from tokvis.errors import TraceMismatchError
from tokvis.model import backbone_name, check_images, grid_for_input, is_patched, model_info, patch_state
from tokvis.trace import LayerDecision, Trace, TraceMeta

# module id -> recorders listening to it (patched models: every block; third-party: any submodule)
_LISTENERS: dict[int, list["Recorder"]] = {}


def report(module: nn.Module, decision: LayerDecision) -> None:
    """Announce a reduction ``decision`` made inside ``module``.

    A no-op unless a :func:`record` context is open on a model containing
    ``module``.  Third-party reduction code calls this with the module doing the
    reduction (any submodule of the recorded model) and a
    :class:`~tokvis.trace.LayerDecision` whose ``dst`` indexes the patch tokens
    entering the reduction (prefix tokens excluded).
    """
    if not _LISTENERS:
        return
    for rec in _LISTENERS.get(id(module), ()):
        rec._add(decision)


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
        self._given_ids = list(image_ids) if image_ids is not None else None
        self._batches: list[Trace] = []
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
            self._hooks.append(self.model.register_forward_pre_hook(self._pre_hook))
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
    def _pre_hook(self, model: nn.Module, args: tuple) -> None:
        self._flush()
        self._current = []
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            self._grid = grid_for_input(model, tuple(args[0].shape[-2:]))
            self._batch_size = int(args[0].shape[0])
        else:
            self._grid, self._batch_size = self.info.grid_size, None

    def _post_hook(self, model: nn.Module, args: tuple, output: Any) -> None:
        self._flush()

    def _add(self, decision: LayerDecision) -> None:
        if self._current is None:  # a forward that bypassed model() (e.g. forward_features)
            self._current, self._grid, self._batch_size = [], self.info.grid_size, None
        d = decision.to("cpu")
        if not self.store_scores and d.score is not None:
            d = dataclasses.replace(d, score=None)
        self._current.append(d)

    def _flush(self) -> None:
        if self._current is None:
            return
        decisions, self._current = self._current, None
        batch = self._batch_size if self._batch_size is not None else (decisions[0].batch_size if decisions else 0)
        start = sum(t.num_images for t in self._batches)
        self._batches.append(Trace(decisions, self._meta(self._grid or self.info.grid_size, start, batch)))
        self._trace = None

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
        self._flush()
        if not self._batches:
            raise TraceMismatchError("nothing was recorded: run the model inside the `with record(model)` block")
        if self._trace is None:
            self._trace = self._batches[0] if len(self._batches) == 1 else Trace.concat(self._batches)
        return self._trace

    @property
    def batches(self) -> list[Trace]:
        """One trace per forward call."""
        self._flush()
        return list(self._batches)


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
    images : Tensor [B, 3, H, W]
        Preprocessed images (see :func:`tokvis.data.transform_for`).
    grad : bool
        Keep autograd on (default off: runs under ``torch.no_grad()``).
    """
    if not is_patched(model):  # a patched model checks its input in its own forward pre-hook: once per forward
        check_images(model, images)
    with record(model, image_ids=image_ids, dataset=dataset) as rec, torch.set_grad_enabled(grad):
        out = model(images)
    return out, rec.trace
