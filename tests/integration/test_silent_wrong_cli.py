"""Issue 20 §2 on the command line: each silent wrong result is now an error (one line, exit 2) or is fixed.

Tiny random ViTs on the bundled digits (seconds each).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.integration.conftest import fails_cleanly
from tests.integration.test_record_fitted import COMMON, TINY, _fit
from tokvis.cli import main
from tokvis.commands.record import load_sweep
from tokvis.store import RunConfigError, load_run, verify_run

SWEEP = (
    'out = "runs"\nbackbones = ["vit_tiny_patch16_224"]\nmodel_kwargs = {img_size = 32, patch_size = 8}\n'
    'methods = ["topk"]\ndatasets = ["digits"]\nkeep_rates = [0.5]\nlimit = 4\ndevice = "cpu"\n'
)


@pytest.mark.parametrize(
    "line, key",
    [
        ('cls = "no"', "cls"),
        ('scores = "false"', "scores"),
        ('skip_bad = "false"', "skip_bad"),
        ('pretrained = "false"', "pretrained"),
        ("soft = 1", "soft"),
        ('hash_inputs = "true"', "hash_inputs"),
        ("out = 5", "out"),
        ('amp = "yes"', "amp"),
        ('model_kwargs = "img_size=32"', "model_kwargs"),
        ('locations = "1"', "locations"),
        ('limit = "4"', "limit"),
        ("device = 0", "device"),
        ("backbones = [3]", "backbones"),
    ],
)
def test_every_typed_sweep_key_is_type_checked(tmp_path, capsys, line, key):
    body = SWEEP
    for k in ("out", "model_kwargs", "limit", "device", "backbones"):  # replace a key the sweep already sets
        if line.startswith(f"{k} ="):
            body = "\n".join(x for x in body.splitlines() if not x.startswith(f"{k} =")) + "\n"
    f = tmp_path / "sweep.toml"
    f.write_text(body + line + "\n")
    with pytest.raises(RunConfigError, match=rf"{key} must be") as e:
        load_sweep(f)
    if '"false"' in line:
        assert "without quotes" in str(e.value)
    fails_cleanly(capsys, ["sweep", str(f), "--no-progress"], f"{key} must be")
    assert not (tmp_path / "runs").exists()


def test_sweep_booleans_given_as_booleans_are_read(tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text(SWEEP + "cls = true\nscores = false\npretrained = false\nskip_bad = true\n")
    (spec,), opts = load_sweep(f)
    assert spec.cls is True and spec.scores is False and spec.pretrained is False and opts["skip_bad"] is True


@pytest.fixture(scope="module")
def fitted_depth4(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("fit4") / "sit.safetensors")  # fitted on vit_tiny, depth 12 by default


def test_fitted_file_on_another_backbone_is_an_error_naming_both(tmp_path, capsys, fitted_depth4):
    from tokvis import fitting

    fitted = fitting.method_file_info(fitted_depth4)["fit_info"]["backbone"]
    assert fitted["name"] == "vit_tiny_patch16_224" and fitted["grid"] == [4, 4]
    deeper = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
              json.dumps({"img_size": 32, "patch_size": 8, "depth": 6})]  # fmt: skip
    line = fails_cleanly(
        capsys, ["record", *deeper, "--fitted", str(fitted_depth4), *COMMON, "--out", str(tmp_path / "r")],
        "was fitted on vit_tiny_patch16_224 (depth 12",
    )  # fmt: skip
    assert "this run's backbone is vit_tiny_patch16_224 (depth 6" in line and "--fitted-other-backbone" in line
    deit = ["--model", "deit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
            json.dumps({"img_size": 32, "patch_size": 8})]  # fmt: skip
    line = fails_cleanly(
        capsys, ["record", *deit, "--fitted", str(fitted_depth4), *COMMON, "--out", str(tmp_path / "r")],
        "this run's backbone is deit_tiny_patch16_224",
    )  # fmt: skip
    assert not list(tmp_path.glob("r/*/shard-*"))  # nothing recorded
    # the explicit override records, and says so in the run's configuration
    out = tmp_path / "ok"
    argv = ["record", *deit, "--fitted", str(fitted_depth4), "--fitted-other-backbone", *COMMON, "--out", str(out)]
    assert main(argv) == 0
    (run_dir,) = out.iterdir()
    assert load_run(run_dir).config["fitted_other_backbone"] is True
    # the backbone it was fitted on records without the override
    assert main(["record", *TINY, "--fitted", str(fitted_depth4), *COMMON, "--out", str(tmp_path / "same")]) == 0


def test_skip_bad_with_no_readable_image_exits_2_and_is_never_complete(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    out = tmp_path / "runs"
    argv = ["record", *TINY, "--method", "topk", "--keep-rate", "0.5", "--data", str(data), "--skip-bad",
            "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    fails_cleanly(capsys, argv, "no readable image")
    for run_dir in out.iterdir():
        assert verify_run(run_dir).status != "complete"
    fails_cleanly(capsys, argv, "no readable image")  # a rerun does not adopt an empty shard as complete


@pytest.mark.parametrize("made_by", ["this tokvis", "an older tokvis"])
def test_verify_and_compare_agree_on_an_empty_run(tmp_path, capsys, monkeypatch, made_by):
    """A run with no image (every image unreadable): `verify` never says COMPLETE, and `compare` refuses it
    for the reason `verify` gives (issue 20 §2, §4).  An older tokvis left such a run marked complete with an
    empty shard: the same store is made here by skipping the refusal of today's record."""
    from tokvis.store import writer

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    out = tmp_path / "runs"
    argv = ["record", *TINY, "--method", "topk", "--keep-rate", "0.5", "--data", str(data), "--skip-bad",
            "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    if made_by == "an older tokvis":
        monkeypatch.setattr(writer, "_refuse_empty", lambda *a: None)
        assert main(argv) == 0
        status, reason = "CORRUPT", "the run holds no image"
    else:
        fails_cleanly(capsys, argv, "no readable image")
        status, reason = "INCOMPLETE", "(0 of 1 shards)"
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "COMPLETE" not in printed.replace("INCOMPLETE", "") and "0 complete" in printed
    assert printed.startswith(status) and ("0/1 shards, 0 images" in printed or "1/1 shards, 0 images" in printed)
    line = fails_cleanly(capsys, ["compare", str(out), "--by", "keep_rate", "--out", str(tmp_path / "s.csv")], reason)
    assert "verify" in line  # and points at the command that says the same
    if status == "CORRUPT":
        assert reason in printed  # the very words verify printed
    else:
        assert "incomplete" in line


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "runs"
    argv = ["record", *TINY, "--method", "topk", "--keep-rate", "0.5", "--data", "digits", "--limit", "20",
            "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.mark.filterwarnings("default::UserWarning")  # the test asserts the warning the CLI prints
def test_evaluate_k_larger_than_possible_writes_the_k_used(tmp_path, capsys, small_run):
    csv = tmp_path / "m.csv"
    assert main(["evaluate", str(small_run), "--k", "50", "--out", str(csv)]) == 0
    assert "used k=19" in capsys.readouterr().err
    note = pd.read_csv(csv)["measure"].iloc[0]
    assert "knn(k=19" in note and "knn(k=50)" not in note


@pytest.mark.parametrize("value, match", [("-0.5", "out of range"), ("nan", "empty or NaN"), ("", "empty or NaN"),
                                          ("101", "out of range")])  # fmt: skip
def test_accuracy_csv_range_and_nan(tmp_path, capsys, small_run, value, match):
    (run_dir,) = small_run.iterdir()
    acc = tmp_path / "acc.csv"
    acc.write_text(f"run,accuracy\n{run_dir.name},{value}\n")
    line = fails_cleanly(
        capsys, ["evaluate", str(small_run), "--accuracy-csv", str(acc), "--out", str(tmp_path / "m.csv")], match
    )
    if match == "out of range":
        assert "fractions in [0, 1] or percentages in [0, 100]" in line


def test_accuracy_csv_percentages_and_fractions_are_kept_as_given(tmp_path, small_run):
    from tokvis.evaluate import read_accuracy_csv

    (run_dir,) = small_run.iterdir()
    acc = tmp_path / "acc.csv"
    for value in (72.5, 0.725, 0, 100):
        acc.write_text(f"run,accuracy\n{run_dir.name},{value}\n")
        assert read_accuracy_csv(acc)["accuracy"].iloc[0] == value


@pytest.mark.parametrize("column, value", [("fidelity", 5.0), ("fidelity", -3.0), ("agreement", 1.5)])
def test_figures_metrics_out_of_range_is_refused(tmp_path, capsys, small_run, column, value):
    (run_dir,) = small_run.iterdir()
    run = load_run(run_dir)
    row = {"run": run_dir.name, "backbone": run.config["backbone"], "method": "topk", "keep_rate": 0.5, "r": None}
    table = pd.DataFrame([{**row, "dataset": run.config["dataset_name"], column: value}])
    metrics = tmp_path / "metrics.csv"
    table.to_csv(metrics, index=False)
    argv = ["figures", str(small_run), "--metrics", str(metrics), "--only", "performance", "--out",
            str(tmp_path / "fig")]  # fmt: skip
    line = fails_cleanly(capsys, argv, "out of range")
    assert column in line and ("[-1, 1]" if column == "fidelity" else "[0, 1]") in line


def test_run_store_labels_out_of_range_or_of_a_wrong_type_are_typed(small_run):
    """Issue 20 §3 names ``Run.labels(9)``: a run store's, not only a trace's (TokvisError subclasses of the
    matching built-in: BlockIndexError, ArgumentTypeError)."""
    from tokvis.errors import TokvisError

    (run_dir,) = small_run.iterdir()
    run = load_run(run_dir)
    for call in (lambda: run.labels(99), lambda: run.kept(99), lambda: run.labels(-9)):
        with pytest.raises(IndexError, match=r"layer must be in \[-1, \d+\]") as e:
            call()
        assert isinstance(e.value, TokvisError)
    for value in ("1", 1.5, None):
        with pytest.raises(TypeError, match="layer must be a block index") as e:
            run.labels(value)
        assert isinstance(e.value, TokvisError)
    assert run.labels(run.layers[-1]).shape[0] == 20  # an existing block still reads
