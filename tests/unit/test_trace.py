"""Trace storage round trip, corrupt files, concat/select, metadata."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.errors import TraceFileError, TraceMismatchError
from tokvis.trace import LayerDecision, Trace, TraceMeta


@pytest.fixture(scope="module")
def traces():
    out = {}
    for method, kw in [("tome", {"r": 6}), ("topk", {"keep_rate": 0.5}), ("evit", {"keep_rate": 0.7})]:
        model = make_model("registers")
        tokvis.patch(model, method, **kw)
        _, out[method] = tokvis.run_with_trace(
            model, make_images("registers", n=4), image_ids=list("abcd"), dataset="noise"
        )
    return out


def _assert_same(a: Trace, b: Trace):
    assert a.meta == b.meta
    assert a.layers == b.layers
    for da, db in zip(a.decisions, b.decisions, strict=True):
        assert (da.layer, da.kind, da.n_out) == (db.layer, db.kind, db.n_out)
        for name in ("dst", "keep", "weight", "soft", "score", "size_scale", "query_soft"):
            ta, tb = getattr(da, name), getattr(db, name)
            assert (ta is None) == (tb is None)
            if ta is not None:
                assert ta.dtype == tb.dtype and torch.equal(ta, tb)


@pytest.mark.parametrize("method", ["tome", "topk", "evit"])
def test_save_load_round_trip(tmp_path, traces, method):
    t = traces[method]
    path = t.save(tmp_path / "sub" / f"{method}.trace")
    loaded = tokvis.load_trace(path)
    _assert_same(t, loaded)
    assert loaded.meta.image_ids == list("abcd")
    assert loaded.meta.dataset == "noise"
    assert loaded.meta.method == method
    assert torch.equal(loaded.labels(5), t.labels(5))
    assert torch.equal(loaded.depth(), t.depth())
    assert not list((tmp_path / "sub").glob("*.tmp")), "no temporary file left behind"


def test_query_mixing_survives_save_select_and_concat(tmp_path):
    """VoMix under residual="drop" records its query mixing (query_soft [B, n_out, n_in]); it is kept by every
    operation on traces: save / load, select (rows), concat (batches)."""
    model, x = make_model("registers"), make_images("registers", n=4)
    tokvis.patch(model, "vomix", r=0.25)
    with torch.no_grad():
        _, t = tokvis.run_with_trace(model, x, image_ids=list("abcd"))
        _, t01 = tokvis.run_with_trace(model, x[:2], image_ids=list("ab"))
        _, t23 = tokvis.run_with_trace(model, x[2:], image_ids=list("cd"))
    assert t.decisions and all(d.kind == "prune" and d.query_soft is not None for d in t.decisions)
    _assert_same(t, tokvis.load_trace(t.save(tmp_path / "v.trace")))
    sel = t.select([3, 1])
    for d, s in zip(t.decisions, sel.decisions, strict=True):
        assert torch.equal(s.query_soft, d.query_soft[[3, 1]])
    both = Trace.concat([t01, t23])
    for d, c in zip(t.decisions, both.decisions, strict=True):
        torch.testing.assert_close(c.query_soft, d.query_soft)  # batches of 2 vs 4: close, not bit-equal
    with pytest.raises(ValueError, match="query_soft must have shape"):
        d = t.decisions[0]
        LayerDecision(d.layer, "prune", d.dst, d.keep, n_out=d.n_out, query_soft=d.query_soft[:, 1:])


def test_truncated_file(tmp_path, traces):
    path = traces["tome"].save(tmp_path / "t.trace")
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.trace"
        bad.write_bytes(data[:cut])
        with pytest.raises(TraceFileError, match="cut"):
            tokvis.load_trace(bad)


def test_flipped_byte_is_detected(tmp_path, traces):
    path = traces["topk"].save(tmp_path / "t.trace")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFileError, match="checksum"):
        tokvis.load_trace(path)


def test_not_a_trace(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(TraceFileError, match="not a tokvis trace"):
        tokvis.load_trace(tmp_path / "x.safetensors")
    (tmp_path / "garbage").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TraceFileError):
        tokvis.load_trace(tmp_path / "garbage")
    with pytest.raises(TraceFileError, match="no trace file"):
        tokvis.load_trace(tmp_path / "missing.trace")


def test_failed_save_keeps_existing_file(tmp_path, traces, monkeypatch):
    path = traces["tome"].save(tmp_path / "t.trace")
    before = path.read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        traces["topk"].save(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_newer_version_refused(tmp_path, traces):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = traces["tome"].save(tmp_path / "t.trace")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["tokvis"])
    header["version"] = 99
    save_file(load_file(str(path)), str(path), metadata={"tokvis": json.dumps(header)})
    with pytest.raises(TraceFileError, match="version 99"):
        tokvis.load_trace(path)


def test_concat_and_select(traces):
    t = traces["tome"]
    parts = [t.select([0, 1]), t.select(slice(2, 4))]
    joined = Trace.concat(parts)
    _assert_same(joined, t)
    with pytest.raises(TraceMismatchError, match="blocks"):
        Trace.concat([t, traces["topk"]])


def test_concat_pads_variable_token_counts():
    meta = TraceMeta(grid_size=(2, 2), num_prefix_tokens=1, depth=3)
    d1 = LayerDecision(1, "prune", torch.tensor([[0, -1, 1, -1]]), torch.tensor([[True, False, True, False]]), n_out=2)
    d2 = LayerDecision(1, "prune", torch.tensor([[0, 1, 2, -1]]), torch.tensor([[True, True, True, False]]), n_out=3)
    joined = Trace.concat([Trace([d1], meta), Trace([d2], meta)])
    assert joined.decision(1).n_out == 3
    assert joined.labels(1).tolist() == [[0, -1, 1, -1], [0, 1, 2, -1]]


def test_decision_validation():
    with pytest.raises(ValueError, match="kind"):
        LayerDecision(0, "drop", torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), n_out=1)
    with pytest.raises(ValueError, match="int64"):
        LayerDecision(0, "prune", torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 2, dtype=torch.bool), n_out=1)
    with pytest.raises(ValueError, match="soft"):
        LayerDecision(0, "soft", torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), n_out=1)
    meta = TraceMeta(grid_size=(2, 2), num_prefix_tokens=1, depth=3)
    bad = LayerDecision(0, "prune", torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), n_out=1)
    with pytest.raises(TraceMismatchError, match="takes 3 tokens"):
        Trace([bad], meta)


def test_unknown_layer_errors(traces):
    t = traces["topk"]
    with pytest.raises(KeyError, match="recorded blocks"):
        t.decision(0)
    with pytest.raises(IndexError, match="layer must be in"):
        t.labels(6)


def _rewrite_header(path, edit):
    """Rewrite a saved trace with its JSON header changed by ``edit`` (tensors untouched)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["tokvis"])
    edit(header)
    save_file(load_file(str(path)), str(path), metadata={"tokvis": json.dumps(header)})


def _set_grid(h):
    h["meta"]["grid_size"] = [h["meta"]["grid_size"][1] + 1, h["meta"]["grid_size"][0]]


def _set_kind(h):
    h["layers"][0]["kind"] = "merge" if h["layers"][0]["kind"] != "merge" else "prune"


def _set_method(h):
    h["meta"]["method"] = "evit"


@pytest.mark.parametrize("edit", [_set_grid, _set_kind, _set_method], ids=["grid_size", "kind", "method"])
def test_edited_header_is_refused(tmp_path, traces, edit):
    path = traces["topk"].save(tmp_path / "t.trace")
    tokvis.load_trace(path)  # intact: loads
    _rewrite_header(path, edit)
    with pytest.raises(TraceFileError, match="header .* does not match its checksum"):
        tokvis.load_trace(path)


def test_string_version_gets_a_sensible_message(tmp_path, traces):
    path = traces["tome"].save(tmp_path / "t.trace")
    _rewrite_header(path, lambda h: h.update(version="1"))
    with pytest.raises(TraceFileError) as info:
        tokvis.load_trace(path)
    msg = str(info.value)
    assert "'1' (str), not an integer" in msg
    assert "reads version 1" not in msg


def test_version_1_files_are_still_read(tmp_path, traces):
    """Files of the previous format (no header checksum) load unchanged."""
    path = traces["evit"].save(tmp_path / "t.trace")

    def to_v1(h):
        h["version"] = 1
        del h["header_sha256"]

    _rewrite_header(path, to_v1)
    _assert_same(traces["evit"], tokvis.load_trace(path))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_trace_file_mode_follows_umask(tmp_path, traces, umask):
    old = os.umask(umask)
    try:
        path = traces["tome"].save(tmp_path / f"u{umask:o}.trace")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
