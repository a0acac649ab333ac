"""`tokvis evaluate` on tiny recorded runs: measures agree with a direct computation; bad inputs: one line, exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tokvis
from tokvis import zoo
from tokvis.cli import main
from tokvis.data import transform_for
from tokvis.datasets import open_dataset

from .test_compare_cli import KWARGS, record, run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return record(tmp_path_factory.mktemp("runs") / "runs")


@pytest.fixture(scope="module")
def metrics(runs, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("m") / "metrics.csv"
    assert (
        main(["evaluate", str(runs), "--out", str(out), "--batch-size", "4", "--device", "cpu", "--no-progress"]) == 0
    )
    return pd.read_csv(out).set_index("run")


def _direct(method: str | None, keep_rate: float | None):
    """Pooled features and logits of the model the runs were recorded with, computed here without tokvis.evaluate."""
    import json

    torch.manual_seed(0)
    model = zoo.create("vit_tiny_patch16_224", pretrained=False, **json.loads(KWARGS)).eval()
    ds = open_dataset("digits").subset(12)
    t = transform_for(model)
    x = torch.stack([t(ds.load(i)) for i in range(12)])
    if method:
        tokvis.patch(model, method, keep_rate=keep_rate)
    with torch.no_grad():
        pooled, logits = [], []
        for i in range(0, 12, 4):
            f = model.forward_features(x[i : i + 4])
            pooled.append(model.forward_head(f, pre_logits=True))
            logits.append(model(x[i : i + 4]))
    return torch.cat(pooled).numpy(), torch.cat(logits).numpy(), np.array(ds.labels)


def test_columns_and_notes(metrics):
    assert list(metrics.reset_index().columns[:7]) == [
        "run", "backbone", "method", "keep_rate", "r", "dataset", "n_images"
    ]  # fmt: skip
    assert (metrics["n_images"] == 12).all() and set(metrics["method"]) == {"topk", "tome"}
    assert (metrics["measure"] == "fidelity, agreement, top1, knn(k=5)").all()
    assert (metrics["decisions_match"] == 1.0).all()  # the rebuilt model reproduces the stored decisions


def test_fidelity_and_agreement_equal_a_direct_computation(metrics):
    ref, ref_logits, labels = _direct(None, None)
    red, red_logits, _ = _direct("topk", 0.5)
    cos = (ref * red).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(red, axis=1))
    row = metrics.loc[run_dir(Path("."), "topk", "0.5").name]
    np.testing.assert_allclose(row["fidelity"], cos.mean(), rtol=1e-5)
    assert row["fidelity"] < 0.999  # the reduction changes the features
    assert row["agreement"] == pytest.approx((ref_logits.argmax(1) == red_logits.argmax(1)).mean())
    assert row["top1"] == pytest.approx((red_logits.argmax(1) == labels).mean())
    assert row["top1_unreduced"] == pytest.approx((ref_logits.argmax(1) == labels).mean())


@pytest.mark.parametrize("method", ["topk", "tome"])
def test_keep_rate_one_equals_the_unreduced_model(metrics, method):
    row = metrics.loc[run_dir(Path("."), method, "1").name]
    assert row["agreement"] == 1.0 and row["top1"] == row["top1_unreduced"]
    assert row["knn_agreement"] == 1.0 and row["knn_top1"] == row["knn_top1_unreduced"]
    np.testing.assert_allclose(row["fidelity"], 1.0, rtol=1e-6)


def test_unreduced_top1_is_the_same_for_every_run(metrics):
    """One cached unreduced pass per (backbone, dataset, images): every run sees the same baseline."""
    _, ref_logits, labels = _direct(None, None)
    np.testing.assert_allclose(metrics["top1_unreduced"], (ref_logits.argmax(1) == labels).mean())


def test_headless_and_unlabelled(tmp_path, capsys):
    """No head: fidelity only, the note says why; a labelled set with a mismatched head: no top1, said so."""
    kwargs = KWARGS.replace('"num_classes": 10', '"num_classes": 0')
    runs = record(tmp_path / "runs", methods=("topk",), keep_rates=("0.5",), extra=("--model-kwargs", kwargs))
    out = tmp_path / "m.parquet"
    assert main(["evaluate", str(runs), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    row = pd.read_parquet(out).iloc[0]
    assert row["measure"].startswith("fidelity, knn(k=5); no top1/agreement: the model has no classifier head")
    assert pd.isna(row["top1"]) and pd.isna(row["agreement"]) and 0 < row["fidelity"] < 1
    runs = record(
        tmp_path / "runs1000",
        methods=("topk",),
        keep_rates=("0.5",),
        extra=("--model-kwargs", KWARGS.replace('"num_classes": 10', '"num_classes": 7')),
    )
    out = tmp_path / "m.csv"
    assert main(["evaluate", str(runs), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    row = pd.read_csv(out).iloc[0]
    assert "no top1: the head has 7 classes but dataset 'digits' has 10 classes" in row["measure"]
    assert pd.isna(row["top1"]) and 0 <= row["agreement"] <= 1


def test_accuracy_csv_merged(runs, tmp_path, capsys):
    acc = tmp_path / "acc.csv"
    name = run_dir(Path("."), "tome", "0.5").name
    acc.write_text(f"run,accuracy\n{name},0.731\n")
    sub = tmp_path / "sub"
    shutil.copytree(runs / name, sub / name)
    out = tmp_path / "m.csv"
    assert main(["evaluate", str(sub), "--out", str(out), "--accuracy-csv", str(acc), "--no-progress"]) == 0
    row = pd.read_csv(out).iloc[0]
    assert row["accuracy"] == 0.731 and "accuracy (external CSV)" in row["measure"]


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def _error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("tokvis evaluate: error:")
    return err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["evaluate", str(tmp_path / "empty"), "--out", str(tmp_path / "m.csv")])
    assert "no run stores found" in err and not (tmp_path / "m.csv").exists()


def test_model_cannot_be_rebuilt(tmp_path, capsys):
    """A run recorded from a checkpoint file that is gone since: the run and the reason, one line."""
    import json

    import timm

    kw = json.loads(KWARGS)
    ckpt = tmp_path / "tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).state_dict(), ckpt)
    rc = main([
        "record", "--model", str(ckpt), "--model-kwargs", json.dumps({**kw, "arch": "vit_tiny_patch16_224"}),
        "--no-pretrained", "--method", "topk", "--keep-rate", "0.5", "--data", "digits", "--limit", "4",
        "--device", "cpu", "--no-progress", "--out", str(tmp_path / "runs"),
    ])  # fmt: skip
    assert rc == 0
    ckpt.unlink()
    err = _error(capsys, ["evaluate", str(tmp_path / "runs"), "--out", str(tmp_path / "m.csv")])
    assert "tiny.pth__topk__keep0.5__digits: cannot rebuild its model" in err and "Checkpoint file not found" in err
    assert not (tmp_path / "m.csv").exists()


def test_accuracy_csv_missing_columns(runs, tmp_path, capsys):
    acc = tmp_path / "acc.csv"
    acc.write_text("name,acc\nx,1\n")
    err = _error(capsys, ["evaluate", str(runs), "--out", str(tmp_path / "m.csv"), "--accuracy-csv", str(acc)])
    assert "misses the column(s) accuracy" in err


@pytest.mark.parametrize("name, needle", [("m.txt", "unknown table format '.txt'"), ("d", "is a directory")])
def test_bad_out(runs, tmp_path, capsys, name, needle):
    (tmp_path / "d").mkdir()
    assert needle in _error(capsys, ["evaluate", str(runs), "--out", str(tmp_path / name)])


def test_incomplete_run_says_verify(runs, tmp_path, capsys):
    name = run_dir(Path("."), "topk", "0.5").name
    shutil.copytree(runs / name, tmp_path / "sub" / name)
    sorted((tmp_path / "sub" / name).glob("shard-*.safetensors"))[0].unlink()
    err = _error(capsys, ["evaluate", str(tmp_path / "sub"), "--out", str(tmp_path / "m.csv")])
    assert "tokvis verify" in err


def test_changed_weights_are_flagged(runs, tmp_path, monkeypatch):
    """A model rebuilt with other weights than recorded: decisions_match < 1 and a warning, not a silent result."""
    import dataclasses

    from tokvis import evaluate as ev
    from tokvis.evaluate import evaluate

    build = ev.build_model
    monkeypatch.setattr(ev, "build_model", lambda spec: build(dataclasses.replace(spec, seed=spec.seed + 1)))
    name = run_dir(Path("."), "topk", "0.5").name
    with pytest.warns(UserWarning, match="reproduces the stored decisions on only"):
        df = evaluate(runs / name, device="cpu", batch_size=4)
    assert df["decisions_match"].iloc[0] < 1.0


def test_a_bf16_run_is_evaluated_in_bf16(tmp_path, monkeypatch):
    """A run recorded with ``--amp bf16`` is evaluated under the same autocast, so its decisions are reproduced
    (evaluated in float32, ToMe on the real backbone had reproduced 1 of 6; on these tiny random models
    bf16 flips near-ties too); the unreduced forward runs in the run's precision as well."""
    import dataclasses

    import tokvis.evaluate as ev

    out = record(tmp_path / "runs", methods=("tome", "kmedoids"), keep_rates=("0.5",), extra=("--amp", "bf16"))
    df = ev.evaluate(out, device="cpu", batch_size=4)
    assert (df["decisions_match"] == 1.0).all(), df[["run", "decisions_match"]]
    # evaluated without the run's autocast (as before), its stored decisions are not all reproduced
    amp_context = ev.amp_context
    monkeypatch.setattr(
        ev, "amp_context", lambda spec, device: amp_context(dataclasses.replace(spec, amp=False), device)
    )
    with pytest.warns(UserWarning, match="reproduces the stored decisions on only"):
        mismatched = ev.evaluate(out, device="cpu", batch_size=4)
    assert (mismatched["decisions_match"] < 1.0).any()
