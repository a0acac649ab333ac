"""`tokvis compare` on tiny recorded runs: the table agrees with direct metrics; bad inputs: one line, exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tokvis.analysis import patterns
from tokvis.cli import main
from tokvis.store import load_run

ROOT = Path(__file__).resolve().parents[2]
KWARGS = '{"img_size": 32, "patch_size": 8, "depth": 4, "num_classes": 10}'


def record(out: Path, *, methods=("topk", "tome"), keep_rates=("1.0", "0.5"), data="digits", extra=()) -> Path:
    """Record tiny random-weight runs in-process (a few seconds); the folder holding them."""
    rc = main([
        "record", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", KWARGS,
        "--method", *methods, "--keep-rate", *keep_rates, "--data", data, "--limit", "12",
        "--shard-size", "8", "--batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(out), *extra,
    ])  # fmt: skip
    assert rc == 0
    return out


def run_dir(root: Path, method: str, keep: str, data: str = "digits") -> Path:
    return root / f"vit_tiny_patch16_224__{method}__keep{keep}__{data}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return record(tmp_path_factory.mktemp("runs") / "runs")


def _subset(tmp_path: Path, runs: Path, *names: tuple[str, str]) -> Path:
    dst = tmp_path / "subset"
    for method, keep in names:
        shutil.copytree(run_dir(runs, method, keep), run_dir(dst, method, keep))
    return dst


def _error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("tokvis compare: error:")
    return err


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------


def test_compare_by_keep_rate_agrees_with_direct_metrics(runs, tmp_path, capsys):
    out = tmp_path / "sim.parquet"
    assert main(["compare", str(runs), "--by", "keep_rate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    df = pd.read_parquet(out)
    assert set(df["method"]) == {"topk", "tome"}
    a, b = load_run(run_dir(runs, "topk", "1")), load_run(run_dir(runs, "topk", "0.5"))
    iou = df[(df.method == "topk") & (df.metric == "iou")]
    assert set(iou["run_a"]) == {a.path.name} and set(iou["run_b"]) == {b.path.name}  # A = the higher keep rate
    for layer in a.layers:
        rows = iou[iou.layer == layer].set_index("image_id").loc[a.image_ids]
        np.testing.assert_allclose(rows["value"].to_numpy(), patterns.iou(a.kept(layer), b.kept(layer)))
    a, b = load_run(run_dir(runs, "tome", "1")), load_run(run_dir(runs, "tome", "0.5"))
    vm = df[(df.method == "tome") & (df.metric == "v_measure")]
    layer = a.layers[-1]
    rows = vm[vm.layer == layer].set_index("image_id").loc[a.image_ids]
    direct = patterns.merge_scores(a.labels(layer), b.labels(layer), metrics=("v_measure",))["v_measure"]
    np.testing.assert_allclose(rows["value"].to_numpy(), direct)
    # the printed summary is the mean +- std over the images of each pair, stage and metric
    mean, std = direct.mean(), direct.std(ddof=1)
    stage = len(a.layers) - 1
    assert f"stage {stage} (block {layer:>2})  v_measure     {mean:.3f} +- {std:.3f}  (n={len(direct)})" in printed
    assert f"wrote {len(df)} rows (2 pairs, 4 runs)" in printed


def test_compare_csv_and_metrics(runs, tmp_path, capsys):
    out = tmp_path / "sim.csv"
    assert main(["compare", str(runs), "--by", "keep_rate", "--metrics", "iou", "ari", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert set(df["metric"]) == {"iou", "ari"}
    assert set(df.loc[df.metric == "iou", "method"]) == {"topk"} and set(df.loc[df.metric == "ari", "method"]) == {
        "tome"
    }


def test_compare_by_backbone_tells_models_of_one_name_apart(runs, tmp_path, capsys):
    """Two tiny models under one timm name (different depth) are two backbones, not the same run twice."""
    other = record(
        tmp_path / "deeper", methods=("topk",), keep_rates=("0.5",),
        extra=("--locations", "1", "2", "3", "--model-kwargs", KWARGS.replace('"depth": 4', '"depth": 5')),
    )  # fmt: skip
    both = _subset(tmp_path, runs, ("topk", "0.5"))
    shutil.copytree(run_dir(other, "topk", "0.5"), both / "deeper")
    out = tmp_path / "b.csv"
    assert main(["compare", str(both), "--by", "backbone", "--out", str(out), "--metrics", "iou"]) == 0
    df = pd.read_csv(out)
    assert len(df) == 12 * 3 and df["backbone_a"].iloc[0] != df["backbone_b"].iloc[0]
    assert '"depth": 4' in " ".join(df["backbone_a"].tolist() + df["backbone_b"].tolist())


# ------------------------------------------------------------------------------------------------
# bad inputs: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["compare", str(tmp_path / "empty"), "--by", "keep_rate", "--out", str(tmp_path / "s.csv")])
    assert "no run stores found" in err and "tokvis record" in err
    assert not (tmp_path / "s.csv").exists()


def test_missing_folder(tmp_path, capsys):
    err = _error(capsys, ["compare", str(tmp_path / "nope"), "--by", "method", "--out", str(tmp_path / "s.csv")])
    assert "no such directory" in err


def test_incomparable_runs_name_the_field(runs, tmp_path, capsys):
    sub = _subset(tmp_path, runs, ("topk", "0.5"), ("tome", "1"))
    err = _error(capsys, ["compare", str(sub), "--by", "keep_rate", "--out", str(tmp_path / "s.csv")])
    assert "differ in method (tome, topk)" in err
    assert not (tmp_path / "s.csv").exists()


def test_single_run(runs, tmp_path, capsys):
    sub = _subset(tmp_path, runs, ("topk", "0.5"))
    err = _error(capsys, ["compare", str(sub), "--by", "keep_rate", "--out", str(tmp_path / "s.csv")])
    assert "only one run found" in err


@pytest.mark.filterwarnings("default::UserWarning")  # the test asserts the warning the CLI prints
def test_left_out_run_is_named_with_its_folder(runs, tmp_path, capsys, monkeypatch):
    """A run name recurs across folders (runs/ and runs_opt/): the warning says which folder's run is left out."""
    _subset(tmp_path, runs, ("topk", "1"), ("topk", "0.5"))  # -> subset/
    second = tmp_path / "runs_opt"
    shutil.copytree(run_dir(runs, "tome", "1"), run_dir(second, "tome", "1"))
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "subset", "runs_opt", "--by", "keep_rate", "--out", "s.csv"]) == 0
    err = capsys.readouterr().err
    assert "warning: left out" in err
    assert f"runs_opt/{run_dir(second, 'tome', '1').name}" in err and "subset/" not in err


def test_mixed_families_only(runs, tmp_path, capsys):
    sub = _subset(tmp_path, runs, ("topk", "0.5"), ("tome", "0.5"))
    err = _error(capsys, ["compare", str(sub), "--by", "method", "--out", str(tmp_path / "s.csv")])
    assert "mixes a pruning and a merging pattern" in err
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--by", "size"], "argument --by: invalid choice: 'size'"),
        (["--by", "keep_rate", "--metrics", "iou", "dice"], "argument --metrics: invalid choice: 'dice'"),
        (["--by", "keep_rate", "--convention", "paper"], "argument --convention: invalid choice"),
    ],
)
def test_unknown_choices(runs, tmp_path, capsys, argv, needle):
    rc = None
    with pytest.raises(SystemExit) as exc:
        rc = main(["compare", str(runs), *argv, "--out", str(tmp_path / "s.csv")])
    assert rc is None and exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("tokvis compare: error:")


@pytest.mark.parametrize("name, needle", [("s.xlsx", "unknown table format '.xlsx'"), ("s", "no extension")])
def test_out_unknown_extension(runs, tmp_path, capsys, name, needle):
    err = _error(capsys, ["compare", str(runs), "--by", "keep_rate", "--out", str(tmp_path / name)])
    assert needle in err and ".parquet" in err


def test_out_is_a_directory(runs, tmp_path, capsys):
    (tmp_path / "d.csv").mkdir()
    err = _error(capsys, ["compare", str(runs), "--by", "keep_rate", "--out", str(tmp_path / "d.csv")])
    assert "is a directory" in err


def test_corrupt_shard_says_verify(runs, tmp_path, capsys):
    sub = _subset(tmp_path, runs, ("topk", "1"), ("topk", "0.5"))
    shard = sorted(run_dir(sub, "topk", "0.5").glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: caught by the checksum when read
    shard.write_bytes(bytes(data))
    err = _error(capsys, ["compare", str(sub), "--by", "keep_rate", "--out", str(tmp_path / "s.csv")])
    assert "tokvis verify" in err
    assert not (tmp_path / "s.csv").exists()


def test_incomplete_run_says_verify(runs, tmp_path, capsys):
    sub = _subset(tmp_path, runs, ("topk", "1"), ("topk", "0.5"))
    sorted(run_dir(sub, "topk", "0.5").glob("shard-*.safetensors"))[-1].unlink()
    err = _error(capsys, ["compare", str(sub), "--by", "keep_rate", "--out", str(tmp_path / "s.csv")])
    assert "tokvis verify" in err and "topk__keep0.5" in err


def test_convention_study_before_or_after_it_lands(runs, tmp_path, capsys):
    """--convention study either runs (analysis.compare has conventions) or says it is not there: never a traceback."""
    import inspect

    from tokvis.analysis.compare import compare

    argv = ["compare", str(runs), "--by", "keep_rate", "--convention", "study", "--out", str(tmp_path / "s.csv")]
    if "convention" in inspect.signature(compare).parameters:
        assert main(argv) == 0 and (tmp_path / "s.csv").exists()
    else:
        assert "--convention standard" in _error(capsys, argv)


def test_subprocess_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "tokvis", "compare", str(tmp_path / "empty"), "--by", "keep_rate", "--out", "x.csv"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no run stores found" in proc.stderr
