"""Files a user shares are created with the user's umask (0644 under umask 022), never 0600,
and written through the one atomic writer (no temporary file left behind)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import tokvis
from tests.models import make_images, make_model, warns_if_unfitted
from tokvis import fitting, zoo
from tokvis.adapters.study_json import write_study_json
from tokvis.adapters.tables import to_csv, to_parquet


@pytest.fixture(scope="module")
def trace():
    model = make_model("cls")
    tokvis.patch(model, "topk", keep_rate=0.5)
    return tokvis.run_with_trace(model, make_images("cls", n=2), image_ids=["a", "b"])[1]


def _fitted_method(path):
    model = make_model()
    method = tokvis.create_method("dynamicvit", seed=0)
    tokvis.patch(model, method, keep_rate=0.5)
    with torch.no_grad(), warns_if_unfitted(model):
        model(make_images())  # creates the learned parameters
    return fitting.save_method(method, path)


def _weight_cache(path):
    source = path.with_name("source.onnx")
    source.write_bytes(b"x")
    zoo._write_cache(path, {"w": torch.zeros(3)}, source)
    return path


WRITERS = {
    "trace": lambda t, p: t.save(p / "t.trace"),
    "parquet": lambda t, p: to_parquet(t, p / "t.parquet"),
    "csv": lambda t, p: to_csv(t, p / "t.csv"),
    "study_json": lambda t, p: write_study_json(t, p / "t.json"),
    "fitted_method": lambda t, p: _fitted_method(p / "m.safetensors"),
    "weight_cache": lambda t, p: _weight_cache(p / "cache.safetensors"),
}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_written_files_follow_the_umask(tmp_path, trace, kind, umask):
    old = os.umask(umask)
    try:
        path = WRITERS[kind](trace, tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, trace, kind, monkeypatch):
    path = WRITERS[kind](trace, tmp_path)
    before = path.read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        WRITERS[kind](trace, tmp_path)
    assert path.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
