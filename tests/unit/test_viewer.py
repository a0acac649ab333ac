"""tokvis.viewer: the per-image data the viewer draws, checked against the Trace API and plain loops; the widget's
Python side (messages, bytes per image, validation, bad input)."""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np
import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.errors import DataError, TraceMismatchError
from tokvis.trace import Trace
from tokvis.viewer.data import open_panels, pack, panel_payload

IDS = [f"img{i}" for i in range(4)]


def _record(model, x, method, **kw):
    tokvis.patch(model, method, **kw)
    try:
        with torch.no_grad():
            _, t = tokvis.run_with_trace(model, x, image_ids=IDS, dataset="rand")
    finally:
        tokvis.unpatch(model)
    return t


@pytest.fixture(scope="module")
def traces():
    model, x = make_model("cls"), make_images("cls", 4)
    return {
        "topk": _record(model, x, "topk", keep_rate=0.6),
        "tome": _record(model, x, "tome", keep_rate=0.6),
        "vomix": _record(model, x, "vomix", r=0.25, residual="mix"),
        "x": x,
    }


@pytest.mark.parametrize("method", ["topk", "tome", "vomix"])
def test_payload_agrees_with_trace_at_every_block(traces, method):
    t = traces[method]
    panel = open_panels(t)[0]
    for i in range(t.num_images):
        d = panel_payload(panel, i)
        assert d["labels"].dtype == np.int16 and d["labels"].shape == (len(t.layers) + 1, t.num_patches)
        np.testing.assert_array_equal(d["depth"], t.depth()[i].numpy())
        for b in range(-1, t.meta.depth):
            slot = bisect.bisect_right(list(t.layers), b)  # the viewer's slot: recorded blocks <= b
            np.testing.assert_array_equal(d["labels"][slot], t.labels(b)[i].numpy())
            # the viewer's "own patch" test (depth > block) is the trace's kept()
            np.testing.assert_array_equal(d["depth"] > b, t.kept(b)[i].numpy())


def test_soft_weight_is_the_product_of_argmax_weights_along_the_chain(traces):
    t = traces["vomix"]
    assert "soft" in t.kinds.values()
    d = panel_payload(open_panels(t)[0], 1)
    assert d["weight"] is not None
    # plain loop: follow each patch through the decisions, multiplying soft[dst, token] at soft blocks
    for p in range(t.num_patches):
        tok, w = p, 1.0
        for s, dec in enumerate(t.decisions, 1):
            if tok >= 0:
                nxt = int(dec.dst[1, tok])
                if dec.kind == "soft" and nxt >= 0:
                    w *= float(dec.soft[1, nxt, tok])
                tok = nxt
            expect = 0.0 if tok < 0 else min(max(w, 0.0), 1.0)
            assert abs(int(d["weight"][s, p]) - round(expect * 255)) <= 1
    assert panel_payload(open_panels(traces["tome"])[0], 0)["weight"] is None


def test_explorer_messages_and_bytes_per_image(traces):
    w = tokvis.explore([traces["topk"], traces["tome"]], images=traces["x"].permute(0, 2, 3, 1).clamp(0, 1).numpy())
    sent = []
    w.send = lambda msg, buffers=None: sent.append((msg, buffers))
    w._on_msg(w, {"type": "need", "image": 2}, [])
    msg, buffers = sent[-1]
    assert msg["type"] == "data" and msg["image"] == 2 and len(msg["panels"]) == 2
    labels = np.frombuffer(buffers[0], "<i2").reshape(-1, traces["topk"].num_patches)
    np.testing.assert_array_equal(labels[-1], traces["topk"].labels(traces["topk"].layers[-1])[2].numpy())
    per_trace = sum(len(b) for b in buffers) / 2
    assert per_trace <= 50_000
    w._on_msg(w, {"type": "need_image", "image": 0}, [])
    assert sent[-1][0]["type"] == "image" and sent[-1][1][0][:2] == b"\xff\xd8"  # a JPEG
    w._on_msg(w, {"type": "need", "image": 99}, [])  # out of range: ignored
    assert len(sent) == 2
    w.block = 3
    assert w.block == 3
    with pytest.raises(DataError, match="block must be in"):
        w.block = 99
    with pytest.raises(DataError, match="image must be in"):
        w.image = 4


def test_bad_inputs(traces):
    t = traces["topk"]
    other = t.select([0, 1])
    with pytest.raises(TraceMismatchError, match="other images"):
        tokvis.explore([t, other])
    big = _record(make_model("patch32"), make_images("patch32", 4), "topk", keep_rate=0.5)
    with pytest.raises(TraceMismatchError, match="patch grid"):
        tokvis.explore([t, big])
    with pytest.raises(DataError, match="empty"):
        tokvis.explore([])
    with pytest.raises(DataError, match="titles"):
        tokvis.explore([t], labels=["a", "b"])
    with pytest.raises(DataError, match="images"):
        tokvis.explore(t, images=np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="Traces"):
        tokvis.explore([t, 3])


def test_images_reordered_by_id_and_grey_grid_note(traces):
    t = traces["topk"]
    rev = t.select([3, 2, 1, 0])
    w = tokvis.explore([t, rev])
    assert "grey grid" in w._config["note"]
    a, b = (pack(panel_payload(p, int(r[1]))) for p, r in zip(w.panels, w._rows, strict=True))
    assert a == b  # image 1 of panel 0 is image 2 of the reversed panel
    renamed = Trace(t.decisions, dataclasses.replace(t.meta, method="renamed"))
    assert open_panels([t, renamed])[1].title.startswith("renamed")


def test_notebook_output_keeps_a_static_picture(traces):
    from PIL import Image

    w = tokvis.explore([traces["topk"], traces["tome"]])
    w.block = 4
    data = w._repr_mimebundle_()
    data = data[0] if isinstance(data, tuple) else data
    assert "application/vnd.jupyter.widget-view+json" in data
    img = Image.open(__import__("io").BytesIO(data["image/png"]))
    assert img.width > img.height  # two panels side by side
    # the picture follows the state: another block draws other regions
    w.block = -1
    assert w.snapshot() != data["image/png"]
