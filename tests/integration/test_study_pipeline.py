"""The study end to end on tiny random-model runs: record -> evaluate -> compare -> figures (fast, in-process).

The glue between the commands: ``tokvis evaluate``'s table (every measure column, empty where a measure is
unavailable, a text ``measure`` note, the backbone as asked for) is what ``tokvis figures`` reads by default
from ``<runs>/metrics.csv``; ``tokvis compare --convention study`` works next to the standard convention.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from tokvis.cli import main

KW = '{"img_size": 32, "patch_size": 8, "depth": 4}'


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Six runs (topk, evit, tome x keep 0.7, 0.5), their metrics.csv, and the two compare tables."""
    root = tmp_path_factory.mktemp("study")
    runs = root / "runs"
    assert main(["record", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", KW,
                 "--method", "topk", "evit", "tome", "--keep-rate", "0.7", "0.5", "--data", "digits",
                 "--limit", "12", "--batch-size", "12", "--device", "cpu", "--no-progress", "--cls",
                 "--out", str(runs)]) == 0  # fmt: skip
    assert main(["evaluate", str(runs), "--out", str(runs / "metrics.csv"), "--device", "cpu", "--no-progress"]) == 0
    for name, extra in (("s.parquet", []), ("study.parquet", ["--convention", "study"])):
        assert main(["compare", str(runs), "--by", "keep_rate", "--out", str(root / name), *extra]) == 0
    return root


def test_study_findings_script_prints_the_tables_from_the_commands_outputs(study, capsys):
    """benchmarks/study_findings.py (the tables of docs/findings.md) on the commands' outputs; the second path is
    pandas on the same files."""
    from tests.scripts import load_benchmark

    mod = load_benchmark("study_findings")
    runs = study / "runs"
    assert main(["compare", str(runs), "--by", "method", "--out", str(study / "m.parquet")]) == 0
    capsys.readouterr()
    argv = [str(runs), "--keep", str(study / "s.parquet"), "--method", str(study / "m.parquet"), "--dataset",
            "digits", "--labelled", "digits", "--n-boot", "50"]  # fmt: skip
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    metrics = pd.read_csv(runs / "metrics.csv")
    row = metrics[(metrics.method == "tome") & (metrics.keep_rate == 0.5)].iloc[0]
    assert "| tome | " in out and f"{row['fidelity']:.3f}" in out
    pairs = pd.read_parquet(study / "m.parquet")
    tv = pairs[(pairs.metric == "iou") & (pairs.keep_rate == 0.7) & pairs.method_a.isin(["topk", "evit"])
               & pairs.method_b.isin(["topk", "evit"])]  # fmt: skip
    assert len(tv) and f"{tv[tv.layer == tv.layer.min()].value.mean():.3f}" in out.split("Top-K vs EViT")[1]
    assert "- to topk (iou" in out and "- to kmedoids: no kmedoids runs" in out
    keep = pd.read_parquet(study / "s.parquet")
    last = keep[(keep.method == "tome") & (keep.metric == "v_measure") & (keep.layer == keep.layer.max())]
    assert f"{last.value.mean():.3f}" in out.split("Consistency across keep rates")[1]


def test_evaluate_table_has_the_runs_and_a_text_measure_note(study):
    table = pd.read_csv(study / "runs" / "metrics.csv")
    assert len(table) == 6 and table["run"].is_unique
    assert set(table["method"]) == {"topk", "evit", "tome"} and set(table["keep_rate"]) == {0.7, 0.5}
    assert table["top1"].isna().all()  # a 1000-class head on 10-class digits: no top-1 ...
    assert table["measure"].str.contains("no top1").all()  # ... and the note says why
    assert table["knn_agreement"].notna().all() and table["fidelity"].between(-1, 1).all()


def test_compare_standard_and_study_conventions_agree_where_they_must(study):
    std = pd.read_parquet(study / "s.parquet")
    stu = pd.read_parquet(study / "study.parquet")
    assert {"run_a", "run_b", "stage", "layer", "metric", "value"} <= set(std.columns)
    assert {"iou", "v_measure"} <= set(std["metric"]) and {"IoU", "NMI"} <= set(stu["metric"])
    keys = ["run_a", "run_b", "layer", "image_id"]
    # IoU of non-empty kept sets and the V-measure (symmetric in homogeneity/completeness) are the same number
    # in both conventions
    for mine, theirs in (("iou", "IoU"), ("v_measure", "NMI")):
        a = std[std.metric == mine].set_index(keys)["value"].sort_index()
        b = stu[stu.metric == theirs].set_index(keys)["value"].sort_index()
        assert len(a) > 0 and a.index.equals(b.index)
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-9)
    assert std.groupby(["run_a", "run_b"]).ngroups == 3  # one pair of keep rates per method


def test_figures_finds_and_uses_evaluates_metrics_csv(study, tmp_path, capsys):
    figs = tmp_path / "figs"
    rc = main(["figures", str(study / "runs"), "--out", str(figs), "--only", "performance", "--n-boot", "50"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    # the empty top1 column is not chosen; the first preferred measure with values is
    assert "performance measure: knn_agreement" in out
    also = out.split("also in the table:")[1].split(";")[0]
    assert "'top1'" not in also and "decisions_match" not in also and "_unreduced" not in also
    assert "skipped performance" not in out
    assert (figs / "performance_correlation.png").read_bytes()[:4] == b"\x89PNG"


def test_figure_4_deltas_equal_the_metrics_table(study):
    """Two paths: pair_performance on compare's table and evaluate's CSV vs a difference read off the CSV."""
    from tokvis.commands.figures import _align_table
    from tokvis.plotting.figures import pair_performance
    from tokvis.store import find_runs, load_run

    runs = [load_run(p) for p in find_runs(study / "runs")]
    table = pd.read_csv(study / "runs" / "metrics.csv")
    pairs = pd.read_parquet(study / "s.parquet")
    got = pair_performance(pairs, _align_table(table, runs), by="keep_rate", measure="fidelity", metric="iou")
    assert len(got) == 2  # topk and evit (tome is merging: no IoU)
    by_name = table.set_index(["method", "keep_rate"])["fidelity"]
    for _, row in got.iterrows():
        want = by_name[(row["method"], float(row["keep_rate_a"]))] - by_name[(row["method"], float(row["keep_rate_b"]))]
        assert row["delta"] == pytest.approx(want)
        direct = pairs[(pairs.method == row["method"]) & (pairs.metric == "iou")]["value"].mean()
        assert row["similarity"] == pytest.approx(direct)


def test_figures_measure_that_evaluate_left_empty_is_one_line_exit_2(study, tmp_path, capsys):
    rc = main(["figures", str(study / "runs"), "--out", str(tmp_path / "f"), "--only", "performance",
               "--measure", "top1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--measure 'top1': the column is empty" in err and "knn_agreement" in err


def test_a_users_csv_naming_the_backbone_without_random_label_meets_the_runs(study, tmp_path, capsys):
    """An external table by fields (no run column) names the timm model; the runs label it '(random)'."""
    table = pd.read_csv(study / "runs" / "metrics.csv")
    user = table[["backbone", "method", "keep_rate", "dataset"]].assign(accuracy=np.linspace(0.5, 0.8, len(table)))
    assert (user["backbone"] == "vit_tiny_patch16_224").all()
    path = tmp_path / "acc.csv"
    user.to_csv(path, index=False)
    rc = main(["figures", str(study / "runs"), "--out", str(tmp_path / "f"), "--only", "performance",
               "--metrics", str(path), "--n-boot", "50"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "skipped performance" not in out and (tmp_path / "f" / "performance_correlation.png").is_file()


# ------------------------------------------------------------------------------------------------
# a local checkpoint through the CLI (tokvis record passes pretrained=True unless --no-pretrained)
# ------------------------------------------------------------------------------------------------
CKPT_KW = {"img_size": 32, "patch_size": 8, "depth": 2}


@pytest.fixture
def checkpoint(tmp_path):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **CKPT_KW)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def test_record_a_checkpoint_without_no_pretrained_records_its_weights(checkpoint, tmp_path, capsys):
    import torch

    from tokvis import zoo
    from tokvis.store import load_run

    kw = json.dumps({"arch": "vit_tiny_patch16_224", **CKPT_KW})
    out = tmp_path / "runs"
    rc = main(["record", "--model", str(checkpoint), "--model-kwargs", kw, "--method", "topk", "--keep-rate", "0.5",
               "--data", "digits", "--limit", "4", "--device", "cpu", "--no-progress", "--out", str(out)])  # fmt: skip
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    run = load_run(next(out.iterdir()))
    assert run.config["pretrained"] is True  # as asked; the file's weights were used
    # evaluate rebuilds the model from the manifest and reproduces the stored decisions
    assert main(["evaluate", str(out), "--out", str(tmp_path / "m.csv"), "--device", "cpu", "--no-progress"]) == 0
    assert pd.read_csv(tmp_path / "m.csv")["decisions_match"].tolist() == [1.0]
    # the same weights through zoo.create with pretrained=False (the other path) give the same model
    a = zoo.create(str(checkpoint), arch="vit_tiny_patch16_224", pretrained=True, **CKPT_KW)
    b = zoo.create(str(checkpoint), arch="vit_tiny_patch16_224", pretrained=False, **CKPT_KW)
    state = torch.load(checkpoint, weights_only=True)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]) and torch.equal(value, state[name])


def test_record_a_checkpoint_without_arch_is_one_line_exit_2(checkpoint, tmp_path, capsys):
    from tokvis.errors import TokvisError
    from tokvis.zoo import CheckpointArchError, create

    rc = main(["record", "--model", str(checkpoint), "--model-kwargs", json.dumps(CKPT_KW), "--method", "topk",
               "--keep-rate", "0.5", "--data", "digits", "--limit", "4", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "runs")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("tokvis record: error:") and '"arch"' in err
    with pytest.raises(CheckpointArchError, match="arch=") as info:
        create(str(checkpoint))
    assert isinstance(info.value, TokvisError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------
# the offline study: its sweep file and its data
# ------------------------------------------------------------------------------------------------
def test_study_offline_sweep_file_parses_and_its_grid_validates():
    """examples/study_offline.toml: every method x the study's keep rates, the learned ones fitted first by the
    sweep's [fit] table (a fit file not there yet is a planned fit); checked, not run."""
    from pathlib import Path

    import tokvis
    from tokvis.commands._run import check_grid
    from tokvis.commands.record import _load_sweep
    from tokvis.methods import get_method_class

    path = Path(__file__).parents[2] / "examples" / "study_offline.toml"
    specs, opts, fits = _load_sweep(path, plan_fits=True)
    learned = {m for m in tokvis.list_methods() if hasattr(get_method_class(m), "mark_fitted")} - {"dpcknn"}
    assert learned == {"dynamicvit", "sit", "patchmerger", "sinkhorn"}
    assert {s.method for s in specs} | {j["method"] for j in fits} == set(tokvis.list_methods())
    assert all(s.fitted is not None for s in specs if s.method in learned)  # learned runs use fitted files
    assert all(Path(j["file"]).parent == path.parent / "fits" for j in fits)
    assert {(j["epochs"], j["images"], j["held_out"]) for j in fits} <= {(2, 128, 32)}
    assert sorted({s.keep_rate for s in specs} | {j["keep_rate"] for j in fits}) == [0.25, 0.5, 0.7, 0.9]
    assert {s.backbone for s in specs} == {"dinov2_small_offline"} and all(s.pretrained for s in specs)
    assert {s.dataset for s in specs} == {"crops", "foolbox-imagenet"}
    assert len(specs) + 2 * len(fits) == len(tokvis.list_methods()) * 4 * 2  # a fit serves both datasets
    assert opts["out"] == path.parent / "runs_study"
    check_grid(specs)  # methods, options, model names and datasets: what `tokvis sweep` checks before recording


def test_crops_dataset_is_deterministic_and_each_crop_is_its_photos_box():
    from tokvis import data
    from tokvis.datasets import CROP_SCALES, crop_photo, open_dataset

    a, b = open_dataset("crops"), open_dataset("crops")
    per_photo = sum(steps * steps for _, steps in CROP_SCALES)
    photos = {crop_photo(i) for i in a.ids}
    assert len(a) == len(photos) * per_photo and len(photos) >= 29 and a.ids == b.ids
    assert len(set(a.ids)) == len(a.ids) and a.labels is None
    idx = a.ids.index("samples:chelsea@s0.50_r2c2")  # bottom-right half-size crop of a 385 x 256 photo
    got = np.asarray(a.load(idx))
    photo = np.asarray(data.load_sample("chelsea"))
    assert got.shape == (128, 128, 3)
    np.testing.assert_array_equal(got, photo[128:256, 385 - 128 : 385])  # the other path: slicing the photo
    np.testing.assert_array_equal(np.asarray(b.load(idx)), got)
    centre = np.asarray(a.load(a.ids.index("samples:chelsea@s1.00_r0c0")))
    np.testing.assert_array_equal(centre, photo[:, (385 - 256) // 2 : (385 - 256) // 2 + 256])
