"""tokvis.adapters: study JSON, ToMe source matrices, Parquet/CSV tables."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.adapters import (
    from_tome_source,
    read_study_json,
    read_table,
    read_trace,
    to_csv,
    to_parquet,
    write_study_json,
)
from tokvis.analysis import compare
from tokvis.errors import TraceFileError, TraceMismatchError

IDS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def recorded():
    """Traces of the tiny model: {(method, schedule): trace}."""
    torch.set_grad_enabled(False)
    model = make_model("cls")
    x = make_images("cls", 4)
    out = {}
    for method, kw in (
        ("topk", {"keep_rate": 0.7}),
        ("topk", {"keep_rate": 0.5}),
        ("evit", {"keep_rate": 0.7}),
        ("evit", {"keep_rate": 0.5}),
        ("tome", {"keep_rate": 0.7}),
        ("tome", {"keep_rate": 0.5}),
        ("tome", {"r": 4}),
    ):
        tokvis.patch(model, method, **kw)
        _, out[(method, str(kw))] = tokvis.run_with_trace(model, x, image_ids=IDS, dataset="rand")
    tokvis.unpatch(model)
    torch.set_grad_enabled(True)
    return out


def _assert_same_patterns(t, u):
    assert u.layers == t.layers
    assert u.image_ids == t.image_ids
    assert [d.kind for d in u.decisions] == [d.kind for d in t.decisions]
    for layer in t.layers:
        assert torch.equal(u.labels(layer), t.labels(layer)), layer
        assert torch.equal(u.kept(layer), t.kept(layer)), layer
    assert torch.equal(u.depth(), t.depth())


# --------------------------------------------------------------------------------------------
# study JSON
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["topk", "evit", "tome"])
def test_study_json_round_trip_gives_identical_metrics(recorded, tmp_path, method):
    t07, t05 = recorded[(method, "{'keep_rate': 0.7}")], recorded[(method, "{'keep_rate': 0.5}")]
    path = write_study_json(t05, tmp_path / "export.json")
    back = read_study_json(path, grid_size=t05.grid_size, depth=t05.meta.depth, method=method, dataset="rand",
                           backbone=t05.meta.backbone)  # fmt: skip
    _assert_same_patterns(t05, back)
    assert back.meta.keep_rate == 0.5 and back.meta.locations == list(t05.layers)
    metric = ["iou", "ioa"] if method != "tome" else ["v_measure", "ari", "homogeneity", "completeness"]
    before = compare([t07, t05], by="keep_rate", metric=metric)
    after = compare([t07, back], by="keep_rate", metric=metric)
    np.testing.assert_array_equal(before.value.to_numpy(), after.value.to_numpy())
    # the file is the study's format: model keys, one entry per image with Stage-<block> entries
    raw = json.loads(path.read_text())
    assert {"Model", "Ratio", "Location", "Top1-Acc", "Top5-Acc", "Params"} <= set(raw)
    assert set(raw["a"]) == {f"Stage-{layer}" for layer in t05.layers}


def test_study_json_evit_without_tokvis_extension_keeps_kept_sets(recorded, tmp_path):
    t = recorded[("evit", "{'keep_rate': 0.5}")]
    raw = json.loads(write_study_json(t, tmp_path / "e.json").read_text())
    for name in IDS:
        for stage in raw[name].values():
            stage.pop("Source_Slot")
    back = read_study_json(raw, grid_size=t.grid_size, depth=t.meta.depth)
    for layer in t.layers:
        assert torch.equal(back.kept(layer), t.kept(layer))
        # fused groups may be permuted, but the partition of the patches is the same
        a, b = t.labels(layer).numpy(), back.labels(layer).numpy()
        assert ((a >= 0) == (b >= 0)).all()


def _hand_export():
    # grid 2 x 3 = 6 patches (ids 0..5, class token not counted), reductions after blocks 1 and 2
    return {
        "Model": "topk_small",
        "Ratio": [0.6],
        "Location": [1, 2],
        "Top1-Acc": 70.0,
        "Top5-Acc": 90.0,
        "Params": 22.0,
        "img_prune": {
            "Predictions": [1, 2],
            "Target": 1,
            "Loss": 0.5,
            "Stage-1": {"Kept_Token": [4, 0, 2]},  # slot order = score order
            "Stage-2": {"Kept_Token": [2, 4]},
        },
    }


def test_hand_written_study_json_pruning():
    t = read_study_json(_hand_export(), grid_size=(2, 3), depth=4)
    assert t.layers == (1, 2) and t.image_ids == ["img_prune"] and t.meta.method == "topk_small"
    assert t.meta.keep_rate == 0.6 and t.meta.options["study"]["Top1-Acc"] == 70.0
    assert t.labels(1).tolist() == [[1, -1, 2, -1, 0, -1]]
    assert t.kept(1).tolist() == [[True, False, True, False, True, False]]
    assert t.labels(2).tolist() == [[-1, -1, 0, -1, 1, -1]]
    assert t.depth().tolist() == [[2, 1, 4, 1, 4, 1]]
    assert [d.kind for d in t.decisions] == ["prune", "prune"]
    # ids counting the class token as 0
    shifted = copy.deepcopy(_hand_export())
    shifted["img_prune"]["Stage-1"]["Kept_Token"] = [5, 1, 3]
    shifted["img_prune"]["Stage-2"]["Kept_Token"] = [3, 5]
    u = read_study_json(shifted, grid_size=(2, 3), depth=4, id_offset=1)
    assert torch.equal(u.labels(2), t.labels(2))


def test_hand_written_study_json_evit_and_merging():
    export = {
        "Model": "evit",
        "Ratio": [0.5],
        "Location": [1, 2],
        # EViT: the fused token is appended last; at stage 2 the previous fused token is kept (slot 0)
        "fuse": {"Stage-1": {"Kept_Token": [4, 0, -1]}, "Stage-2": {"Kept_Token": [-1, 4, -1]}},
    }
    t = read_study_json(export, grid_size=(2, 3), depth=4)
    assert [d.kind for d in t.decisions] == ["fuse", "fuse"]
    assert t.labels(1).tolist() == [[1, 2, 2, 2, 0, 2]]
    assert t.kept(1).tolist() == [[True, False, False, False, True, False]]
    assert t.labels(2).tolist() == [[2, 0, 0, 0, 1, 0]]
    assert t.kept(2).tolist() == [[False, False, False, False, True, False]]
    merging = {
        "Model": "tome",
        "Ratio": [0.5],
        "Location": [1, 2],
        # ToMe: per stage, the output slot of every entering token (class token excluded)
        "m": {"Stage-1": {"Assignment_Maps": [0, 0, 1, 2, 1, 2]}, "Stage-2": {"Assignment_Maps": [0, 1, 0]}},
    }
    u = read_study_json(merging, grid_size=(2, 3), depth=4)
    assert [d.kind for d in u.decisions] == ["merge", "merge"]
    assert u.labels(1).tolist() == [[0, 0, 1, 2, 1, 2]]
    assert u.labels(2).tolist() == [[0, 0, 1, 0, 1, 0]]
    # without "Keep", the first entering token of each group is its destination
    assert u.kept(1).tolist() == [[True, False, True, True, False, False]]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda e: e["img_prune"].pop("Stage-2"), "image 'img_prune', Stage-2: missing"),
        (lambda e: e["img_prune"]["Stage-1"].update(Kept_Token=[4, 0, 9]), r"image 'img_prune', Stage-1: .*\[0, 6\)"),
        (lambda e: e["img_prune"]["Stage-1"].update(Kept_Token="4,0"), "Stage-1: 'Kept_Token' must be a list"),
        (lambda e: e["img_prune"]["Stage-2"].update(Kept_Token=[1]), "Stage-2: 'Kept_Token' keeps patch 1"),
        (lambda e: e["img_prune"]["Stage-1"].update(Kept_Token=[4, 4]), "Stage-1: 'Kept_Token' repeats"),
        (lambda e: e["img_prune"]["Stage-1"].clear(), "Stage-1: neither 'Kept_Token' nor 'Assignment_Maps'"),
        (
            lambda e: e["img_prune"].update({"Stage-1": {"Assignment_Maps": [0, 1]}}),
            "img_prune', Stage-1: 'Assignment_Maps' has 2 entries but 6",
        ),
        (lambda e: e.update(img2=[1, 2]), "image 'img2': expected an object"),
    ],
)
def test_malformed_study_json_names_image_and_stage(edit, match):
    export = copy.deepcopy(_hand_export())
    edit(export)
    with pytest.raises(TraceFileError, match=match):
        read_study_json(export, grid_size=(2, 3), depth=4)


def test_study_json_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TraceFileError, match="not valid JSON"):
        read_study_json(bad, grid_size=(2, 3), depth=4)
    with pytest.raises(TraceFileError, match="no study JSON file"):
        read_study_json(tmp_path / "missing.json", grid_size=(2, 3), depth=4)
    with pytest.raises(TraceFileError, match="no image entries"):
        read_study_json({"Model": "x", "Location": [1]}, grid_size=(2, 3), depth=4)


# --------------------------------------------------------------------------------------------
# ToMe source matrices
# --------------------------------------------------------------------------------------------


def _sources(trace, num_prefix):
    """Cumulative ToMe-style source matrices [B, prefix + tokens, prefix + patches] from a trace."""
    out = []
    for d in trace.decisions:
        lab = trace.labels(d.layer)
        B, n = lab.shape
        s = torch.zeros(B, num_prefix + d.n_out, num_prefix + n)
        for p in range(num_prefix):
            s[:, p, p] = 1
        b, q = torch.nonzero(lab >= 0, as_tuple=True)
        s[b, num_prefix + lab[b, q], num_prefix + q] = 1
        out.append(s)
    return out


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_from_tome_source_matches_the_trace(recorded, num_prefix):
    t = recorded[("tome", "{'r': 4}")]
    u = from_tome_source(_sources(t, num_prefix), layers=t.layers, depth=t.meta.depth, num_prefix=num_prefix,
                         image_ids=IDS, r=4)  # fmt: skip
    assert u.grid_size == t.grid_size  # inferred square grid
    for layer in t.layers:
        assert torch.equal(u.labels(layer), t.labels(layer))
    assert u.meta.num_prefix_tokens == num_prefix and u.meta.method == "tome" and u.image_ids == IDS
    assert [d.kind for d in u.decisions] == ["merge"] * len(t.layers)


def test_from_tome_source_errors(recorded):
    t = recorded[("tome", "{'r': 4}")]
    src = _sources(t, 1)
    with pytest.raises(TraceMismatchError, match="num_prefix"):
        from_tome_source(src, layers=t.layers, depth=t.meta.depth, num_prefix=0, grid_size=t.grid_size)
    with pytest.raises(TraceMismatchError, match="not nested"):
        from_tome_source(src[::-1], layers=t.layers, depth=t.meta.depth, num_prefix=1)
    broken = src[0].clone()
    broken[0, 1, 0] = 1  # the class token merged with a patch token
    with pytest.raises(TraceMismatchError, match="prefix tokens"):
        from_tome_source(broken, layers=t.layers[0], depth=t.meta.depth, num_prefix=1)
    with pytest.raises(ValueError, match="one block per matrix"):
        from_tome_source(src, layers=[1], depth=t.meta.depth, num_prefix=1)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("key", [("evit", "{'keep_rate': 0.5}"), ("tome", "{'r': 4}"), ("topk", "{'keep_rate': 0.7}")])
def test_trace_table_round_trip(recorded, tmp_path, fmt, key):
    t = recorded[key]
    path = tmp_path / f"t.{fmt}"
    (to_parquet if fmt == "parquet" else to_csv)(t, path)
    back = read_trace(path)
    _assert_same_patterns(t, back)
    assert back.meta == t.meta
    table = read_table(path)
    assert len(table) == t.num_images * len(t.layers) * t.num_patches
    row = table[(table.image == 1) & (table.layer == t.layers[-1])].sort_values("patch")
    np.testing.assert_array_equal(row.label.to_numpy(), t.labels(t.layers[-1])[1].numpy())
    np.testing.assert_array_equal(row.depth.to_numpy(), t.depth()[1].numpy())


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_result_table_round_trip_and_not_a_trace(recorded, tmp_path, fmt):
    df = compare([recorded[("topk", "{'keep_rate': 0.7}")], recorded[("topk", "{'keep_rate': 0.5}")]], by="keep_rate")
    path = tmp_path / f"r.{fmt}"
    (to_parquet if fmt == "parquet" else to_csv)(df, path)
    back = read_table(path)
    pd.testing.assert_series_equal(back.value, df.value)
    assert list(back.columns) == list(df.columns)
    with pytest.raises(TraceFileError, match="not a tokvis trace table"):
        read_trace(path)
    with pytest.raises(TypeError, match="Trace or a pandas DataFrame"):
        to_parquet([1, 2], tmp_path / "x.parquet")
