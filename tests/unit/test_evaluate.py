"""tokvis.evaluate helpers: leave-one-out k-NN against scikit-learn, the accuracy CSV reader and merge."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tokvis.errors import DataError
from tokvis.evaluate import COLUMNS, knn_predict, merge_accuracy, read_accuracy_csv


def _sklearn_loo(features, labels, k):
    from sklearn.neighbors import KNeighborsClassifier

    out = []
    for i in range(len(features)):
        rest = np.arange(len(features)) != i
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(features[rest], labels[rest])
        out.append(clf.predict(features[i : i + 1])[0])
    return np.array(out)


@pytest.mark.parametrize("k, n_classes", [(1, 4), (3, 2), (5, 2)])
def test_knn_agrees_with_sklearn_leave_one_out(k, n_classes):
    """Odd k with two classes (or k=1) has no ties: both paths must give the same labels."""
    rng = np.random.default_rng(k)
    labels = rng.integers(0, n_classes, 40)
    features = rng.normal(size=(40, 8)) + labels[:, None] * 0.8
    got = knn_predict(features, labels, k=k, chunk=7)  # chunks smaller than n: the diagonal of each chunk
    np.testing.assert_array_equal(got, _sklearn_loo(features, labels, k))
    assert 0 < (got == labels).mean() <= 1


def test_knn_tie_goes_to_the_nearest():
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.4]])
    labels = np.array([0, 1, 2, 3])
    # neighbours of image 3 by cosine: 1 (label 1), then 0 (label 0): one vote each, label 1 is nearer
    assert knn_predict(features, labels, k=2)[3] == 1


def test_knn_bad_input():
    with pytest.raises(ValueError, match="at least 2 images"):
        knn_predict(np.ones((1, 3)), [0])
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        knn_predict(np.ones((3, 2)), [0, 1])


def _table():
    rows = [
        dict(run="bb__topk__keep0.5__digits", backbone="bb", method="topk", keep_rate=0.5, r=None, dataset="digits"),
        dict(run="bb__tome__r4__digits", backbone="bb", method="tome", keep_rate=None, r=4, dataset="digits"),
    ]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["measure"] = "fidelity; no knn: the dataset has no labels"
    return df


def test_accuracy_csv_by_run(tmp_path):
    p = tmp_path / "acc.csv"
    p.write_text("run,accuracy\nbb__tome__r4__digits,71.5\n")
    df = merge_accuracy(_table(), read_accuracy_csv(p))
    assert df["accuracy"].tolist()[1] == 71.5 and pd.isna(df["accuracy"].tolist()[0])
    assert df["measure"].iloc[1] == "fidelity, accuracy (external CSV); no knn: the dataset has no labels"


def test_accuracy_csv_by_fields(tmp_path):
    p = tmp_path / "acc.csv"
    p.write_text("backbone,method,dataset,keep_rate,r,accuracy\nbb,topk,digits,0.50,,0.8\nbb,tome,digits,,4,0.7\n")
    df = merge_accuracy(_table(), read_accuracy_csv(p))
    assert df["accuracy"].tolist() == [0.8, 0.7]


def test_accuracy_csv_unmatched_row_warns(tmp_path):
    p = tmp_path / "acc.csv"
    p.write_text("run,accuracy\nsomething_else,0.5\n")
    with pytest.warns(UserWarning, match="match no evaluated run"):
        merge_accuracy(_table(), read_accuracy_csv(p))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("run,acc\nx,1\n", "misses the column(s) accuracy"),
        ("method,accuracy\ntopk,1\n", "backbone, dataset, keep_rate/r"),
        ("run,accuracy\nx,high\n", "accuracy must be a number: got 'high' (row 2)"),
        ("run,accuracy\nx,1\nx,2\n", "has two rows for x"),
        ("", "not a readable CSV"),
    ],
)
def test_accuracy_csv_bad(tmp_path, text, needle):
    p = tmp_path / "acc.csv"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        merge_accuracy(_table(), read_accuracy_csv(p))
    assert needle in str(e.value)


def test_accuracy_csv_missing(tmp_path):
    with pytest.raises(DataError, match="accuracy CSV not found"):
        read_accuracy_csv(tmp_path / "nope.csv")
