"""`tokvis figures` on tiny random-model runs recorded here; bad inputs end in one line and exit 2."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

import tokvis
from tokvis.cli import main
from tokvis.store.verify import find_runs

KW = '{"img_size": 32, "patch_size": 8, "depth": 4}'
COMMON = ["--no-pretrained", "--model-kwargs", KW, "--data", "digits", "--limit", "6", "--batch-size", "6",
          "--device", "cpu", "--no-progress"]  # fmt: skip


def _record(out, model, *args, extra=()):
    assert main(["record", "--model", model, *args, *COMMON, *extra, "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _record(root, "vit_tiny_patch16_224", "--method", "topk", "tome", "--keep-rate", "0.7", "0.5", "--cls")
    _record(root, "vit_small_patch16_224", "--method", "topk", "--keep-rate", "0.7", "0.5", "--cls")
    _record(root, "vit_tiny_patch16_224", "--method", "vomix", "--r", "2", "--soft")
    # an MCTF criteria ablation: the same schedule with different options, in sub-folders
    _record(root / "mctf_similarity", "vit_tiny_patch16_224", "--method", "mctf", "--r", "2",
            "--method-options", '{"criteria": ["similarity"]}')  # fmt: skip
    _record(root / "mctf_all", "vit_tiny_patch16_224", "--method", "mctf", "--r", "2")
    rows = []
    for i, p in enumerate(find_runs(root)):
        m = tokvis.load_run(p).meta
        rows.append({"run": p.name, "backbone": m.backbone, "method": m.method, "keep_rate": m.keep_rate,
                     "dataset": m.dataset, "fidelity": 0.3 + 0.07 * i})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "metrics.csv", index=False)
    return root


def _run(capsys, *argv):
    code = main(["figures", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_figures_from_runs_every_path_printed_and_written(runs, tmp_path, capsys):
    out_dir = tmp_path / "figs"
    code, out, err = _run(capsys, runs, "--out", out_dir, "--format", "png", "svg", "--n-boot", "50")
    assert code == 0, err
    paths = [line for line in out.splitlines() if line.startswith(str(out_dir))]
    assert paths and all((out_dir / p.split("/")[-1]).is_file() for p in paths)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.split("/")[-1] for p in paths)
    stems = {p.split("/")[-1].rsplit(".", 1)[0] for p in paths}
    for name in ("similarity_backbone", "performance_correlation", "feature_sources_vomix", "fused_tokens_mctf"):
        assert name in stems
    for prefix in ("similarity_keep_rate", "global_maps", "map_correlation", "overlays", "overlays_pixels"):
        assert any(s.startswith(prefix) for s in stems), prefix
    assert {p.rsplit(".", 1)[1] for p in paths} == {"png", "svg"}
    assert (out_dir / "similarity_backbone.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out_dir.glob("*.tmp*")) and "Traceback" not in err


def test_a_figure_without_its_inputs_is_skipped_with_a_reason(runs, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    vomix = next(p for p in find_runs(runs) if "__vomix__" in p.name)
    (one / vomix.name).symlink_to(vomix)  # the vomix run alone
    code, out, err = _run(capsys, one, "--out", tmp_path / "o", "--only", "backbone", "keep_rate", "performance",
                          "sources")  # fmt: skip
    assert code == 0, err
    assert "skipped backbone: needs >= 2 backbones of one method and keep rate; found 1" in out
    assert "skipped keep_rate: needs a method recorded at >= 2 keep rates" in out
    assert "skipped performance: no performance table" in out
    assert "skipped sources (MCTF): needs >= 2 mctf runs with different options" in out
    assert "wrote 1 files" in out  # the VoMix view only
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["feature_sources_vomix.png"]
    # nothing at all to draw: the reasons, then one error line and exit 2
    code, out, err = _run(capsys, one, "--out", tmp_path / "o3", "--only", "backbone")
    assert code == 2 and "skipped backbone" in out
    assert err.strip().splitlines() == [
        f"tokvis figures: error: no figure could be made from the 1 runs in {one} (each figure's reason is printed "
        "above)"
    ]


def test_incomparable_and_unreadable_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    _record(root, "vit_tiny_patch16_224", "--method", "topk", "--keep-rate", "0.7")
    _record(root / "other", "vit_tiny_patch16_224", "--method", "topk", "--keep-rate", "0.5", extra=["--limit", "4"])
    broken = root / "broken_run"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    # keep rates 0.7 and 0.5 on different images cannot be compared per image: skipped with the reason
    code, out, err = _run(capsys, root, "--out", tmp_path / "o", "--only", "keep_rate", "global_maps")
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith(f"skipped run {broken}: ") for line in lines)
    assert any(line.startswith("skipped keep_rate: ") and "different images" in line for line in lines)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["global_maps.png"]
    code, out, err = _run(capsys, root, "--out", tmp_path / "o2", "--only", "keep_rate")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no figure could be made" in err
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    # a folder whose only run store is unreadable
    code, out, err = _run(capsys, broken, "--out", tmp_path / "o3")
    assert code == 2 and "none of the 1 run stores" in err and len(err.strip().splitlines()) == 1


def test_performance_table_long_form_and_measure_choice(runs, tmp_path, capsys):
    wide = pd.read_csv(runs / "metrics.csv")
    wide["top1"] = 1.0 - wide["fidelity"] / 2
    long = wide.melt(id_vars=["run", "backbone", "method", "keep_rate", "dataset"], var_name="measure")
    long.to_csv(tmp_path / "long.csv", index=False)
    code, out, err = _run(capsys, runs, "--out", tmp_path / "o", "--only", "performance", "--metrics",
                          tmp_path / "long.csv", "--n-boot", "20")  # fmt: skip
    assert code == 0, err
    assert "performance measure: top1 (also in the table: ['fidelity']; choose with --measure)" in out
    assert (tmp_path / "o" / "performance_correlation.png").is_file()
    code, out, err = _run(capsys, runs, "--out", tmp_path / "o2", "--only", "performance", "--metrics",
                          tmp_path / "long.csv", "--measure", "fidelity", "--n-boot", "20")  # fmt: skip
    assert code == 0 and "performance measure" not in out and (tmp_path / "o2" / "performance_correlation.png").exists()


def test_default_measure_is_the_one_with_values_for_the_most_runs(runs, tmp_path, capsys):
    """k-NN agreement on one labelled set (a few runs) loses to fidelity on every run, though preferred on a tie."""
    wide = pd.read_csv(runs / "metrics.csv")
    wide["knn_agreement"] = [0.5 if i % 3 == 0 else float("nan") for i in range(len(wide))]
    wide.to_csv(tmp_path / "partial.csv", index=False)
    code, out, err = _run(capsys, runs, "--out", tmp_path / "o", "--only", "performance", "--metrics",
                          tmp_path / "partial.csv", "--n-boot", "20")  # fmt: skip
    assert code == 0, err
    assert "performance measure: fidelity (also in the table: ['knn_agreement']" in out
    wide["knn_agreement"] = 0.5 + 0.01 * wide.index  # values for every run: the preference order decides
    wide.to_csv(tmp_path / "full.csv", index=False)
    code, out, err = _run(capsys, runs, "--out", tmp_path / "o2", "--only", "performance", "--metrics",
                          tmp_path / "full.csv", "--n-boot", "20")  # fmt: skip
    assert code == 0, err
    assert "performance measure: knn_agreement (also in the table: ['fidelity']" in out


def test_figures_follow_the_umask(runs, tmp_path, capsys):
    import os

    old = os.umask(0o077)
    try:
        code, out, err = _run(capsys, runs, "--out", tmp_path / "f", "--only", "global_maps")
    finally:
        os.umask(old)
    assert code == 0, err
    files = list((tmp_path / "f").iterdir())
    assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files)


@pytest.mark.parametrize(
    "case",
    ["empty", "unknown_only", "out_is_file", "missing_runs", "bad_format", "metrics_missing", "keep_rate_absent",
     "bad_measure"],
)  # fmt: skip
def test_bad_inputs_one_line_exit_2(case, runs, tmp_path, capsys):
    out_dir = tmp_path / "figs"
    argv = [runs, "--out", out_dir]
    expect = {
        "empty": "no run stores in",
        "unknown_only": "--only: unknown figure 'maps'",
        "out_is_file": "is an existing file, not a folder",
        "missing_runs": "is not found: pass the folder holding the run stores",
        "bad_format": "--format: unknown format 'jpg'",
        "metrics_missing": "--metrics",
        "keep_rate_absent": "--keep-rate 0.3: no run at that keep rate; recorded: [0.5, 0.7]",
        "bad_measure": "--measure 'top5': not a numeric column",
    }[case]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        argv[0] = tmp_path / "empty"
    elif case == "unknown_only":
        argv += ["--only", "keep_rate", "maps"]
    elif case == "out_is_file":
        out_dir.write_text("keep me")
        argv[2] = out_dir
    elif case == "missing_runs":
        argv[0] = tmp_path / "nope"
    elif case == "bad_format":
        argv += ["--format", "png", "jpg"]
    elif case == "metrics_missing":
        argv += ["--metrics", tmp_path / "none.csv"]
    elif case == "keep_rate_absent":
        argv += ["--keep-rate", "0.3"]
    elif case == "bad_measure":
        argv += ["--only", "performance", "--measure", "top5"]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokvis figures: error: ") and expect in lines[0], err
    assert "Traceback" not in err
    if case == "out_is_file":
        assert out_dir.read_text() == "keep me"  # nothing already written is lost
    else:
        assert not out_dir.exists() or not any(out_dir.iterdir())


def test_global_maps_of_crops_report_reliability_over_halves_of_the_photos(tmp_path):
    """Crops of one photo share content: the figure's split-half r splits whole photos (and says so)."""
    from tokvis.commands.figures import _fig_global_maps
    from tokvis.datasets import crop_photo
    from tokvis.plotting.maps import split_half_reliability

    root = tmp_path / "runs"
    argv = ["record", "--model", "vit_tiny_patch16_224", "--method", "topk", "evit", "--keep-rate", "0.5",
            "--no-pretrained", "--model-kwargs", KW, "--data", "crops", "--limit", "40", "--batch-size", "20",
            "--device", "cpu", "--no-progress", "--out", str(root)]  # fmt: skip
    assert main(argv) == 0
    runs = [tokvis.load_run(p) for p in find_runs(root)]
    photos = [crop_photo(i) for i in runs[0].image_ids]
    assert 2 <= len(set(photos)) < len(photos)  # 40 crops of 3 photos
    figs = {}
    _fig_global_maps(runs, 0.5, lambda fig, name: figs.setdefault(name, fig))
    fig = figs["global_maps"]
    assert "halves of the photos" in fig._suptitle.get_text()
    want = {str(r.meta.method): split_half_reliability(r, groups=photos)["r"] for r in runs}
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    for method, r in want.items():
        assert any(t.startswith(method) and f"split-half r = {r:.2f}" in t for t in titles), (method, titles)
