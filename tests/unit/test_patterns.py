"""tokvis.analysis.patterns: agreement with scikit-learn per image, metric properties, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.metrics.cluster import contingency_matrix

from tokvis.analysis import patterns as P
from tokvis.errors import TraceMismatchError

SEED = 20231002

# metric name -> scikit-learn reference on one image's (already filtered) labels
SKLEARN = {
    "homogeneity": skm.homogeneity_score,
    "completeness": skm.completeness_score,
    "v_measure": skm.v_measure_score,
    "nmi": skm.normalized_mutual_info_score,
    "mutual_info": skm.mutual_info_score,
    "ari": skm.adjusted_rand_score,
    "ami": skm.adjusted_mutual_info_score,
}
FUNCTIONS = {
    "homogeneity": P.homogeneity,
    "completeness": P.completeness,
    "v_measure": P.v_measure,
    "nmi": P.normalized_mutual_info,
    "mutual_info": P.mutual_info,
    "ari": P.adjusted_rand_index,
    "ami": P.adjusted_mutual_info,
}
SYMMETRIC = ["v_measure", "nmi", "mutual_info", "ari", "ami"]
NORMALISED = ["homogeneity", "completeness", "v_measure", "nmi", "ari", "ami"]  # maximum 1.0


def random_labelings(rng, num_images=150, num_patches=30, drop=0.15):
    """Two batched labelings with a different number of groups per image and some dropped patches."""
    ka = rng.integers(1, 14, num_images)[:, None]
    kb = rng.integers(1, 14, num_images)[:, None]
    a = (rng.random((num_images, num_patches)) * ka).astype(np.int64)
    b = (rng.random((num_images, num_patches)) * kb).astype(np.int64)
    # sparse, non-contiguous label values must not matter
    a = a * 7 + 3
    a[rng.random(a.shape) < drop] = -1
    b[rng.random(b.shape) < drop] = -1
    # a few special rows: identical, relabelled copy, one group each, everything dropped
    b[0] = a[0]
    b[1] = np.where(a[1] >= 0, (a[1] * 5 + 11) % 1000, -1)
    a[2], b[2] = 4, 9
    a[3] = -1
    return a, b


def filtered(a_row, b_row, dropped):
    if dropped == "exclude":
        keep = (a_row >= 0) & (b_row >= 0)
        return a_row[keep], b_row[keep]
    return np.maximum(a_row, -1), np.maximum(b_row, -1)


def sklearn_reference(name, a_row, b_row):
    if a_row.size == 0:  # no patch left: identical empty partitions
        return 0.0 if name == "mutual_info" else 1.0
    return SKLEARN[name](a_row, b_row)


# --------------------------------------------------------------------------------------------
# agreement with scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelings():
    return random_labelings(np.random.default_rng(SEED))


@pytest.mark.parametrize("dropped", ["exclude", "group"])
def test_merge_scores_match_sklearn_per_image(labelings, dropped):
    a, b = labelings
    got = P.merge_scores(a, b, metrics=P.MERGE_METRICS, dropped=dropped)
    for name in P.MERGE_METRICS:
        assert got[name].shape == (a.shape[0],) and got[name].dtype == np.float64
        ref = np.array([sklearn_reference(name, *filtered(a[i], b[i], dropped)) for i in range(a.shape[0])])
        np.testing.assert_allclose(got[name], ref, rtol=1e-9, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_single_metric_functions_match_merge_scores(labelings, name):
    a, b = labelings
    np.testing.assert_array_equal(FUNCTIONS[name](a, b), P.merge_scores(a, b, metrics=[name])[name])


@pytest.mark.parametrize("average_method", ["arithmetic", "geometric", "min", "max"])
def test_nmi_and_ami_average_methods_match_sklearn(labelings, average_method):
    a, b = labelings
    nmi = P.normalized_mutual_info(a, b, average_method=average_method)
    ami = P.adjusted_mutual_info(a, b, average_method=average_method)
    for i in range(4, 80):
        x, y = filtered(a[i], b[i], "exclude")
        ref_nmi = skm.normalized_mutual_info_score(x, y, average_method=average_method)
        ref_ami = skm.adjusted_mutual_info_score(x, y, average_method=average_method)
        assert nmi[i] == pytest.approx(ref_nmi, rel=1e-9, abs=1e-10)
        assert ami[i] == pytest.approx(ref_ami, rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_v_measure_beta_matches_sklearn(labelings, beta):
    a, b = labelings
    got = P.v_measure(a, b, beta=beta)
    for i in range(4, 60):
        ref = skm.v_measure_score(*filtered(a[i], b[i], "exclude"), beta=beta)
        assert got[i] == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_realistic_merge_labelings_match_sklearn():
    # 196 patches, ~100 / 50 / 25 groups as in a 3-stage merging trace, composed stage by stage
    rng = np.random.default_rng(SEED + 1)
    n = 24
    rows = np.arange(n)[:, None]
    labels = []
    for _ in range(2):
        cur, size, stages = np.tile(np.arange(196), (n, 1)), 196, []
        for g in (100, 50, 25):
            mapping = rng.integers(0, g, (n, size))
            mapping[:, :g] = rng.permuted(np.tile(np.arange(g), (n, 1)), axis=1)
            cur, size = mapping[rows, cur], g
            stages.append(cur)
        labels.append(stages)
    for s in range(3):
        a, b = labels[0][s], labels[1][s]
        got = P.merge_scores(a, b, metrics=P.MERGE_METRICS)
        for name in P.MERGE_METRICS:
            ref = [SKLEARN[name](a[i], b[i]) for i in range(n)]
            np.testing.assert_allclose(got[name], ref, rtol=1e-9, atol=1e-10, err_msg=f"stage {s} {name}")


def test_large_label_values_are_relabelled_without_overflow(labelings):
    a, b = labelings
    big_a = np.where(a >= 0, a * 10**15 + 12345, -1)
    got = P.merge_scores(big_a, b, metrics=P.MERGE_METRICS)
    ref = P.merge_scores(a, b, metrics=P.MERGE_METRICS)
    for name in P.MERGE_METRICS:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-12)


def test_many_chunks_give_the_same_result(monkeypatch, labelings):
    a, b = labelings
    ref = P.merge_scores(a, b, metrics=P.MERGE_METRICS)
    monkeypatch.setattr(P, "_CHUNK_ENTRIES", 100)  # a few images per block
    got = P.merge_scores(a, b, metrics=P.MERGE_METRICS)
    for name in P.MERGE_METRICS:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8, np.uint16])
def test_integer_dtypes(dtype):
    rng = np.random.default_rng(SEED)
    a, b = rng.integers(0, 5, (20, 16)), rng.integers(0, 6, (20, 16))
    ref = P.merge_scores(a, b, metrics=P.MERGE_METRICS)
    got = P.merge_scores(a.astype(dtype), b.astype(dtype), metrics=P.MERGE_METRICS)
    for name in P.MERGE_METRICS:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12)


# --------------------------------------------------------------------------------------------
# contingency tables
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropped", ["exclude", "group"])
def test_contingency_matches_sklearn(labelings, dropped):
    a, b = labelings
    table = P.contingency(a, b, dropped=dropped)
    assert table.num_images == a.shape[0]
    assert np.all(np.diff(table.image) >= 0) and np.all(table.count > 0)
    for i in [0, 1, 2, 5, 17, 99]:
        x, y = filtered(a[i], b[i], dropped)
        rows, cols, dense = table.table(i)
        np.testing.assert_array_equal(rows, np.unique(x))
        np.testing.assert_array_equal(cols, np.unique(y))
        np.testing.assert_array_equal(dense, contingency_matrix(x, y))
        assert table.n[i] == x.size
    *_, empty = table.table(3)  # everything dropped in a[3]
    assert empty.shape == (0, 0) or dropped == "group"
    with pytest.raises(IndexError):
        table.table(a.shape[0])


def test_contingency_keeps_original_large_labels():
    a = np.array([[10**14, 10**14, 5, -1]])
    b = np.array([[1, 2, 2, 2]])
    t = P.contingency(a, b)
    np.testing.assert_array_equal(t.label_true, [5, 10**14, 10**14])
    np.testing.assert_array_equal(t.label_pred, [2, 1, 2])
    np.testing.assert_array_equal(t.count, [1, 1, 1])


# --------------------------------------------------------------------------------------------
# properties, parametrised over every metric
# --------------------------------------------------------------------------------------------

ALL_SCORES = [*P.MERGE_METRICS, "iou", "ioa"]


def compute(name, a, b, **kw):
    if name == "iou":
        return P.iou(a >= 0, b >= 0)
    if name == "ioa":
        return P.ioa(a >= 0, b >= 0)
    return FUNCTIONS[name](a, b, **kw)


@pytest.mark.parametrize("name", ALL_SCORES)
def test_identity_gives_the_maximum(labelings, name):
    a, _ = labelings
    same = compute(name, a, a)
    if name == "mutual_info":  # maximum is the entropy itself
        np.testing.assert_allclose(same, P.mutual_info(a, a))
        assert np.all(same >= P.mutual_info(a, np.roll(a, 1, axis=1)) - 1e-12)
    else:
        np.testing.assert_array_equal(same, 1.0)


@pytest.mark.parametrize("name", [*SYMMETRIC, "iou"])
def test_symmetry(labelings, name):
    a, b = labelings
    np.testing.assert_allclose(compute(name, a, b), compute(name, b, a), rtol=1e-12, atol=1e-12)


def test_homogeneity_is_completeness_with_arguments_swapped(labelings):
    a, b = labelings
    np.testing.assert_allclose(P.homogeneity(a, b), P.completeness(b, a), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ALL_SCORES)
def test_bounds(labelings, name):
    a, b = labelings
    values = compute(name, a, b)
    assert np.all(np.isfinite(values))
    low = -1.0 if name in ("ari", "ami") else 0.0
    high = np.log(a.shape[1]) if name == "mutual_info" else 1.0
    assert np.all(values >= low - 1e-12) and np.all(values <= high + 1e-12)


@pytest.mark.parametrize("name", P.MERGE_METRICS)
def test_invariant_to_label_permutation(labelings, name):
    a, b = labelings
    rng = np.random.default_rng(SEED + 2)
    perm = rng.permutation(a.max() + 1) + 1000  # a different labelling of the same groups
    a2 = np.where(a >= 0, perm[np.maximum(a, 0)], -1)
    np.testing.assert_allclose(compute(name, a2, b), compute(name, a, b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ALL_SCORES)
def test_one_image_gives_a_plain_float(name):
    a = np.array([0, 0, 1, 1, 2, -1])
    b = np.array([3, 3, 3, 4, 4, 4])
    value = compute(name, a, b)
    assert type(value) is float


@pytest.mark.parametrize("name", ALL_SCORES)
@pytest.mark.parametrize("dropped", ["exclude", "group"])
@pytest.mark.parametrize(
    "pair",
    [
        ([-1, -1, -1, -1], [0, 1, 2, 3]),  # all dropped on one side
        ([-1, -1, -1, -1], [-1, -1, -1, -1]),  # all dropped on both sides
        ([0, 0, 0, 0], [5, 5, 5, 5]),  # one group each
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # one group against singletons
        ([0, 1, 2, 3], [3, 2, 1, 0]),  # all singletons
        ([7, -1, -1, -1], [1, 1, 1, 1]),  # one patch left
        ([], []),  # no patches at all
    ],
)
def test_edge_cases_are_finite(name, dropped, pair):
    a, b = (np.array(x, dtype=np.int64) for x in pair)
    kw = {} if name in ("iou", "ioa") else {"dropped": dropped}
    value = compute(name, a, b, **kw)
    assert type(value) is float and np.isfinite(value)


def test_documented_edge_values():
    empty = np.array([-1, -1, -1])
    for name in NORMALISED:
        assert FUNCTIONS[name](empty, np.array([0, 1, 2])) == 1.0  # nothing left to compare
        assert FUNCTIONS[name]([2, 2, 2], [1, 1, 1]) == 1.0  # one group on both sides
    assert P.mutual_info(empty, empty) == 0.0
    # one group against several: sklearn's conventions
    assert P.homogeneity([0, 0, 0], [0, 1, 2]) == 1.0
    assert P.completeness([0, 0, 0], [0, 1, 2]) == 0.0
    for name in ["v_measure", "nmi", "ari", "ami"]:
        assert FUNCTIONS[name]([0, 0, 0], [0, 1, 2]) == 0.0
    # all-singleton partitions are identical: 1.0 (sklearn's AMI is ill-conditioned there)
    assert P.adjusted_mutual_info([0, 1, 2, 3], [3, 1, 2, 0]) == 1.0
    # dropped as its own group: agreeing on what to drop is agreement
    a, b = np.array([0, 0, -1, -1]), np.array([1, 1, -1, -1])
    assert P.v_measure(a, b, dropped="group") == 1.0
    assert P.v_measure(np.array([0, 0, -1, -1]), np.array([1, 1, 2, -1]), dropped="group") < 1.0


def test_iou_and_ioa_values_and_edge_cases():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
    b = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_allclose(P.iou(a, b), [1 / 3, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(P.ioa(a, b), [1 / 2, 1.0, 0.0, 1.0])  # empty B: vacuously covered
    np.testing.assert_allclose(P.ioa(b, a), [1 / 2, 1.0, 1.0, 0.0])
    # matches sklearn's jaccard_score where it is defined
    rng = np.random.default_rng(SEED)
    ka, kb = rng.random((50, 40)) < 0.6, rng.random((50, 40)) < 0.4
    ref = [skm.jaccard_score(ka[i], kb[i]) for i in range(50)]
    np.testing.assert_allclose(P.iou(ka, kb), ref, rtol=1e-12)
    np.testing.assert_allclose(P.iou(ka.astype(np.uint8), kb.astype(np.int64)), ref, rtol=1e-12)


def test_batch_of_zero_images():
    empty = np.zeros((0, 196), dtype=np.int64)
    out = P.merge_scores(empty, empty, metrics=P.MERGE_METRICS)
    assert all(v.shape == (0,) for v in out.values())
    assert P.iou(empty >= 0, empty >= 0).shape == (0,)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_shape_mismatch_is_a_trace_mismatch():
    with pytest.raises(TraceMismatchError, match=r"\(2, 4\) and \(2, 5\)"):
        P.v_measure(np.zeros((2, 4), int), np.zeros((2, 5), int))
    with pytest.raises(TraceMismatchError):
        P.iou(np.zeros(4, bool), np.zeros((1, 4), bool))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: P.v_measure(np.zeros((2, 3, 4), int), np.zeros((2, 3, 4), int)), r"labels_true must be 2-D"),
        (lambda: P.v_measure(np.zeros(3), np.zeros(3)), r"integer labels .* dtype is float64"),
        (lambda: P.v_measure(np.zeros(3, bool), np.zeros(3, bool)), r"integer labels"),
        (lambda: P.iou(np.zeros(3), np.zeros(3)), r"kept_a must be boolean .* float64"),
        (lambda: P.iou(np.array([0, 2]), np.array([0, 1])), r"values outside"),
        (lambda: P.merge_scores([0], [0], dropped="keep"), r"dropped must be one of"),
        (lambda: P.merge_scores([0], [0], metrics=["rand"]), r"each metric must be one of"),
        (lambda: P.v_measure([0], [0], beta=0), r"beta must be a number in \(0, inf\)"),
        (lambda: P.adjusted_mutual_info([0], [0], average_method="mean"), r"average_method"),
    ],
)
def test_invalid_input_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("module", ["patterns", "maps", "features", "correlation"])
def test_analysis_modules_do_not_import_torch(module):
    # the analysis code is pure numpy / scipy / sklearn (tokvis/__init__ itself may import torch)
    import ast
    import importlib

    path = importlib.import_module(f"tokvis.analysis.{module}").__file__
    tree = ast.parse(open(path, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    import sys

    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party <= {"numpy", "scipy", "sklearn", "pandas", "tokvis"}, third_party
