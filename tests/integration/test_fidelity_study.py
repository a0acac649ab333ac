"""benchmarks/fidelity_study.py: its partition composition (fast), and the study's models against tokvis (slow,
only with a checkout of the study's repository in ``TOKVIS_STUDY_REPO``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.scripts import load_benchmark

STUDY_REPO = os.environ.get("TOKVIS_STUDY_REPO")


@pytest.fixture(scope="module")
def harness():
    return load_benchmark("fidelity_study")


def test_kept_tokens_compose_as_validate_py(harness):
    """validate.py:207-215: each stage indexes the previous stage's kept list; negative entries (ATS padding)
    are dropped first, except for EViT, whose -1 (its fused token) indexes the previous list's last entry."""
    viz = {"Kept_Tokens": {3: np.array([[5, 1, 7, 2], [0, 3, -1, -1]]), 6: np.array([[3, 0, -1], [1, 0, -1]])}}
    # image 0: stage 1 keeps patches 5, 1, 7, 2; stage 2 keeps list positions 3 and 0 -> patches 2 and 5
    # image 1: stage 1 keeps 0 and 3 (two padding slots); stage 2 keeps positions 1 and 0 -> patches 3 and 0
    got = harness.study_partitions(viz, "kept", [3, 6])
    assert got == [[{1, 2, 5, 7}, {0, 3}], [{2, 5}, {0, 3}]]
    # EViT: stage 1's list ends with its fused token (-1); at stage 2 the fused token at position 4 is kept and
    # the new fused token (-1) takes the previous list's last entry, -1 again: only real patches are counted
    evit = {"Kept_Tokens": {3: np.array([[5, 1, 7, 2, -1]]), 6: np.array([[4, 2, -1]])}}
    assert harness.study_partitions(evit, "kept", [3, 6], fused_token=True) == [[{1, 2, 5, 7}], [{7}]]


def test_assignment_maps_compose_as_analysis_utils(harness):
    """analysis_utils.map_cluster_centers: a patch's label at stage s is the stage's entry at its earlier label;
    ToMe's maps are floats."""
    viz = {"Assignment_Maps": {3: np.array([[0.0, 0.0, 1.0, 2.0, 1.0, 3.0]]), 6: np.array([[1, 0, 1, 0]])}}
    got = harness.study_partitions(viz, "assign", [3, 6])
    assert got[0] == [frozenset({frozenset({0, 1}), frozenset({2, 4}), frozenset({3}), frozenset({5})})]
    # stage 2 merges tokens 0 and 2 (patches 0, 1, 3) and tokens 1 and 3 (patches 2, 4, 5)
    assert got[1] == [frozenset({frozenset({0, 1, 3}), frozenset({2, 4, 5})})]


def test_tokvis_partitions_read_the_trace(harness):
    """The same forms from a tokvis trace: kept sets and groups of labels."""
    import tokvis
    from tests.models import make_images, make_model

    model, x = make_model("cls"), make_images("cls", n=2)
    tokvis.patch(model, "topk", keep_rate=0.5)
    _, trace = tokvis.run_with_trace(model, x)
    kept = harness.tokvis_partitions(trace, "kept")
    assert [len(k) for k in kept[0]] == [32, 32]
    assert kept[1][0] <= kept[0][0]
    groups = harness.tokvis_partitions(trace, "assign")
    assert len(groups[0][0]) == 32 and all(len(g) == 1 for g in groups[0][0])  # pruning: singletons


@pytest.mark.slow
@pytest.mark.skipif(not STUDY_REPO, reason="set TOKVIS_STUDY_REPO to a checkout of JoakimHaurum/TokenReduction")
@pytest.mark.parametrize("method", ["topk", "evit", "ats", "tome", "dynamicvit"])
@pytest.mark.parametrize("rate", [0.7, 0.25])
def test_study_models_equal_tokvis_in_float64(harness, method, rate):
    """The study's own model files (imported unmodified) and tokvis's defaults: the same tokens per stage,
    identical partitions for every image at every stage, and logits equal up to float64 rounding."""
    assert (Path(STUDY_REPO) / "models" / "evit.py").is_file(), f"{STUDY_REPO} is not a TokenReduction checkout"
    r = harness.compare(STUDY_REPO, method, rate, dtype=torch.float64)
    assert r["study_tokens"] == r["tokvis_tokens"]
    assert r["identical"] == [r["n_images"]] * 3
    assert r["dlogit"] < 1e-9
    assert not r["missing"]
