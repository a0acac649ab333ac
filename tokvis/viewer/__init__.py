"""Interactive views of reduction patterns: :func:`explore` (a Jupyter widget) and the HTML report's viewer.

Both draw with one JavaScript module (``viewer.js``, with ``viewer.css``): a block slider over every block,
regions with their borders, dropped patches dimmed, a mark on each merged token's own patch, hover and click
to see a token's patches and merge history, several traces side by side kept in sync.  The Python side
(:mod:`tokvis.viewer.data`) computes what is drawn from the Trace / Run API and sends it as binary buffers,
only for the images on screen.
"""

from __future__ import annotations

import io
import warnings
from importlib import resources
from typing import Any, Sequence

import numpy as np

from tokvis.errors import ArgumentTypeError, DataError
from tokvis.validate import checked_keywords
from tokvis.viewer.data import Panel, check_panels, open_panels, pack, panel_payload

__all__ = ["explore", "Explorer", "viewer_js", "viewer_css"]


def viewer_js() -> str:
    """The shared viewer module (``createViewer``) as text."""
    return resources.files(__package__).joinpath("viewer.js").read_text(encoding="utf-8")


def viewer_css() -> str:
    """The viewer's style sheet as text."""
    return resources.files(__package__).joinpath("viewer.css").read_text(encoding="utf-8")


def _widget_js() -> str:
    return viewer_js() + "\n" + resources.files(__package__).joinpath("widget.js").read_text(encoding="utf-8")


def jpeg(pixels: np.ndarray, quality: int = 88) -> bytes:
    """uint8 ``[H, W, 3]`` pixels as JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _as_pixels(images, n: int) -> list[np.ndarray]:
    """User images as uint8 ``[H, W, 3]`` arrays: an array ``[N, H, W, 3]`` (uint8, or floats in [0, 1]) or a list
    of PIL images / arrays."""
    from PIL import Image

    if isinstance(images, (str, bytes, Image.Image)) or not hasattr(images, "__iter__"):
        raise ArgumentTypeError(
            f"images: an array [N, H, W, 3] or a list of images (PIL or arrays) is needed: got {type(images).__name__}"
        )
    items = list(images)
    if len(items) != n:
        raise DataError(f"images: {len(items)} images for {n} in the traces; pass one per image, in trace order")
    out = []
    for i, im in enumerate(items):
        if isinstance(im, Image.Image):
            a = np.asarray(im.convert("RGB"))
        else:
            a = np.asarray(im)
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
                a = np.moveaxis(a, 0, -1)
            if a.dtype != np.uint8:
                if not np.issubdtype(a.dtype, np.floating) or np.nanmin(a) < 0 or np.nanmax(a) > 1:
                    raise DataError(f"images[{i}]: floats in [0, 1] or uint8 are needed: got {a.dtype}")
                a = (a * 255).round().astype(np.uint8)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        if a.ndim != 3 or a.shape[-1] not in (1, 3):
            raise DataError(f"images[{i}]: an [H, W, 3] image is needed: got shape {a.shape}")
        out.append(np.broadcast_to(a, (*a.shape[:2], 3)))
    return out


class ImageSource:
    """The pixels behind the panels: given images, the run's dataset through its recording transform, or none.

    Parameters
    ----------
    panels : list of Panel
    images : array-like, optional
        One image per image of panel 0 (see :func:`explore`).
    """

    def __init__(self, panels: Sequence[Panel], images=None):
        from tokvis.viewer.data import _is_run

        self._given = _as_pixels(images, panels[0].num_images) if images is not None else None
        self._run = next((p.source for p in panels if _is_run(p.source)), None) if images is None else None
        #: the panel whose image positions :meth:`pixels` and :meth:`jpeg` take
        self.panel = [p.source for p in panels].index(self._run) if self._run is not None else 0
        self.note = ""
        if self._given is None and self._run is None:
            self.note = "no images given (images=...): patterns are drawn on a grey grid"
        self._cache: dict[int, bytes | None] = {}

    @property
    def available(self) -> bool:
        return self._given is not None or self._run is not None

    def pixels(self, rows: Sequence[int]) -> np.ndarray | None:
        """uint8 ``[n, H, W, 3]`` for image positions ``rows`` of the source's panel, or None when unavailable."""
        if self._given is not None:
            return np.stack([self._given[i] for i in rows])
        if self._run is None:
            return None
        from tokvis.store.models import seen_pixels

        try:
            return seen_pixels(self._run, list(rows))
        except Exception as e:  # noqa: BLE001 - any failure to read the dataset: one warning, grey grid
            self._missing(e)
            return None

    def _missing(self, e: Exception) -> None:
        why = " ".join(str(e).split()) or type(e).__name__
        self.note = f"the images cannot be read here ({why}): patterns are drawn on a grey grid"
        self._run = None
        warnings.warn(f"tokvis.explore: {self.note}", UserWarning, stacklevel=3)

    def jpeg(self, row: int) -> bytes | None:
        if row not in self._cache:
            px = self.pixels([row])
            self._cache[row] = None if px is None else jpeg(px[0])
        return self._cache[row]


def _widget_class():
    try:
        import anywidget
        import traitlets
    except ImportError as e:
        from tokvis.errors import MissingDependencyError

        raise MissingDependencyError(
            f"tokvis.explore needs anywidget ({e}): pip install 'tokvis[explore]' (or pip install anywidget)"
        ) from e

    class Explorer(anywidget.AnyWidget):
        """The explorer widget (made by :func:`explore`): ``block``, ``image``, ``selected_token`` are synced.

        Parameters
        ----------
        panels : list of Panel
        images : ImageSource
        """

        _esm = _widget_js()
        _css = viewer_css()
        _config = traitlets.Dict().tag(sync=True)
        block = traitlets.Int(-1).tag(sync=True)
        image = traitlets.Int(0).tag(sync=True)
        selected_token = traitlets.Int(-1).tag(sync=True)
        selected_panel = traitlets.Int(0).tag(sync=True)

        def __init__(self, panels: list[Panel], images: ImageSource, **kw):
            self.panels = panels
            self._rows = check_panels(panels)
            self._images = images
            self.bytes_sent = 0
            self._depth = max(p.depth for p in panels)
            config = {
                "panels": [p.describe() for p in panels],
                "num_images": panels[0].num_images,
                "image_names": [str(v) for v in panels[0].image_ids[:5000]],
                "note": images.note,
                "has_images": images.available,
            }
            super().__init__(_config=config, **kw)
            self.on_msg(self._on_msg)

        @traitlets.validate("block")
        def _check_block(self, proposal):
            b = proposal["value"]
            if not -1 <= b < self._depth:
                raise DataError(f"block must be in [-1, {self._depth - 1}]: got {b}")
            return b

        @traitlets.validate("image")
        def _check_image(self, proposal):
            i = proposal["value"]
            n = self.panels[0].num_images
            if not 0 <= i < n:
                raise DataError(f"image must be in [0, {n - 1}] (position in the traces): got {i}")
            return i

        @traitlets.validate("selected_panel")
        def _check_panel(self, proposal):
            k = proposal["value"]
            if not 0 <= k < len(self.panels):
                raise DataError(f"selected_panel must be in [0, {len(self.panels) - 1}]: got {k}")
            return k

        def payload(self, image: int) -> tuple[dict[str, Any], list[bytes]]:
            """The message and buffers that carry image ``image`` of every panel to the browser."""
            panels, buffers = [], []
            for k, p in enumerate(self.panels):
                data = panel_payload(p, int(self._rows[k][image]))
                bufs = pack(data)
                panels.append({"weight": data["weight"] is not None})
                buffers.extend(bufs)
            return {"type": "data", "image": int(image), "panels": panels}, buffers

        def snapshot(self, *, dpi: int = 60) -> bytes:
            """The current view (image, block) of every panel as a static PNG (matplotlib), for where widgets
            do not render; it is part of the widget's notebook output.

            Parameters
            ----------
            dpi : int
                Resolution of the PNG.
            """
            import matplotlib

            from tokvis.plotting.overlay import merge_overlay

            with matplotlib.rc_context({"figure.dpi": dpi}):
                from matplotlib.figure import Figure

                fig = Figure(figsize=(2.6 * len(self.panels), 2.9), layout="constrained")
                axes = fig.subplots(1, len(self.panels), squeeze=False)[0]
                row = int(self._rows[self._images.panel][self.image])
                px = self._images.pixels([row])
                for k, (ax, p) in enumerate(zip(axes, self.panels, strict=True)):
                    data = panel_payload(p, int(self._rows[k][self.image]))
                    b = min(self.block, p.depth - 1)
                    slot = sum(1 for lay in p.layers if lay <= b)
                    gh, gw = p.grid_size
                    img = px[0] if px is not None else np.full((gh * 8, gw * 8, 3), 0.55)
                    merge_overlay(img, data["labels"][slot], grid_size=(gh, gw), kept=data["depth"] > b, ax=ax)
                    ax.set_title(f"{p.title}\nblock {self.block}", fontsize=8)
                    ax.axis("off")
                buf = io.BytesIO()
                fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05)
            return buf.getvalue()

        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs)
            if isinstance(bundle, tuple):  # (data, metadata)
                data = dict(bundle[0])
                data["image/png"] = self.snapshot()
                return data, bundle[1]
            bundle = dict(bundle or {})
            bundle["image/png"] = self.snapshot()
            return bundle

        def _on_msg(self, _widget, content, _buffers) -> None:
            kind, image = content.get("type"), int(content.get("image", -1))
            if not 0 <= image < self.panels[0].num_images:
                return
            if kind == "need":
                msg, buffers = self.payload(image)
            elif kind == "need_image":
                data = self._images.jpeg(int(self._rows[self._images.panel][image]))
                msg, buffers = {"type": "image", "image": image, "note": self._images.note}, ([data] if data else [])
            else:
                return
            self.bytes_sent += sum(len(b) for b in buffers)
            self.send(msg, buffers)

    return Explorer


_EXPLORER = None


def __getattr__(name: str):
    if name == "Explorer":
        global _EXPLORER
        if _EXPLORER is None:
            _EXPLORER = _widget_class()
        return _EXPLORER
    raise AttributeError(name)


@checked_keywords()
def explore(runs_or_traces, images=None, *, labels: Sequence[str] | None = None):
    """An interactive viewer of reduction patterns (an anywidget widget for Jupyter, VS Code, Colab).

    A block slider over every block (-1 = the input) with ←/→, regions and their borders, dropped patches dimmed,
    a mark on each merged token's own patch; hover a patch to outline its token (size, block it joined at or was
    dropped at), click to shade the token's source patches by the block each was merged in (soft assignments:
    arg-max, opacity = weight); several traces side by side, in sync; an image picker (↑/↓) and "save view as
    PNG".  Labels travel as int16 buffers, only for the image on screen.

    Parameters
    ----------
    runs_or_traces : Trace, Run, run folder, or a list of them
        Shown side by side; run folders are opened lazily (:func:`tokvis.load_run`).  All need the same patch
        grid and the same images (matched by id).
    images : array-like, optional
        The pixels under the patterns, one per image (``[N, H, W, 3]`` uint8 or floats in [0, 1], or a list of
        PIL images).  Default for run stores: the pixels the model saw, reloaded from the run's dataset with its
        recording transform; for traces, or when the dataset cannot be read, a grey grid (with one warning line).
    labels : list of str, optional
        Panel titles (default: method, schedule, backbone).

    Returns
    -------
    Explorer
        The widget; ``w.block``, ``w.image`` (position), ``w.selected_token`` (token index at the current block in
        panel ``w.selected_panel``, -1 = none) are read and set from Python.

    Raises
    ------
    tokvis.errors.TraceMismatchError
        Traces of different patch grids or image sets.
    tokvis.errors.DataError
        Nothing to show, unknown objects, ``labels`` or ``images`` of the wrong length or form.
    """
    panels = open_panels(runs_or_traces, labels)
    cls = __getattr__("Explorer")
    return cls(panels, ImageSource(panels, images))
