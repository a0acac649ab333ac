"""``hf:`` models on the command line, offline: tiny random transformers models saved to folders (and to a fake
Hugging Face cache) are recorded, swept, evaluated and fitted on as a user does; a repo that is not cached is one
line naming the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from tests.hf_models import fake_hub_cache, save_hf
from tokvis.cli import main


def _tokvis(*args, env=None, check=True):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    res = subprocess.run([sys.executable, "-m", "tokvis", *args], capture_output=True, text=True, timeout=600, env=full)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def _manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_record_sweep_evaluate_on_a_saved_folder(tmp_path, monkeypatch):
    """`record --model hf:<folder>` (a subprocess), a sweep over the same name and `evaluate` of the runs: the
    manifest names the model, evaluate rebuilds it (decisions_match 1.0) and measures the classifier's agreement."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny-vit"
    save_hf("vit_cls", folder)
    _tokvis("record", "--model", f"hf:{folder}", "--method", "tome", "--r", "4", "--data", "samples",
            "--out", str(tmp_path / "runs"), "--no-progress")  # fmt: skip
    run_dir = tmp_path / "runs" / "tiny-vit__tome__r4__samples"
    m = _manifest(run_dir)
    assert m["complete"] and m["config"]["backbone"] == f"hf:{folder}" and m["meta"]["backbone"] == f"hf:{folder}"
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        f'out = "runs"\nbackbones = ["hf:{folder}"]\nmethods = ["topk"]\nkeep_rates = [0.5]\ndatasets = ["samples"]\n'
        'batch_size = 4\ndevice = "cpu"\n'
    )
    assert main(["sweep", str(sweep), "--no-progress"]) == 0
    assert _manifest(tmp_path / "runs" / "tiny-vit__topk__keep0.5__samples")["complete"]
    table = tmp_path / "metrics.csv"
    assert main(["evaluate", str(tmp_path / "runs"), "--out", str(table), "--no-progress"]) == 0
    rows = pd.read_csv(table).set_index("run")
    assert set(rows.index) == {"tiny-vit__tome__r4__samples", "tiny-vit__topk__keep0.5__samples"}
    assert (rows["decisions_match"] == 1.0).all() and rows["agreement"].between(0, 1).all()
    assert rows["fidelity"].between(-1, 1).all() and (rows["fidelity"] < 1.0).all()  # reduced: not the same feature


def test_fit_on_a_saved_folder_records_with_the_fit(tmp_path, monkeypatch, capsys):
    """`tokvis fit --model hf:<folder>` writes a method file whose backbone is the folder's model; a run records
    with it, and the same file on another backbone is refused."""
    from tokvis.fitting import load_method

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny-clip"
    save_hf("clip", folder)
    fitted = tmp_path / "dvit.safetensors"
    fit = ["fit", "--model", f"hf:{folder}", "--method", "dynamicvit", "--keep-rate", "0.7", "--images", "4",
           "--held-out", "2", "--epochs", "1", "--batch-size", "4", "--quiet", "--out", str(fitted)]  # fmt: skip
    assert main(fit) == 0
    backbone = load_method(fitted).fit_info["backbone"]
    assert backbone == {"name": f"hf:{folder}", "depth": 6, "width": 64, "grid": [8, 8], "revision": None}
    out = tmp_path / "runs"
    assert main(["record", "--model", f"hf:{folder}", "--fitted", str(fitted), "--keep-rate", "0.7", "--data",
                 "samples", "--limit", "2", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    other = tmp_path / "other"
    save_hf("vit", other)
    assert main(["record", "--model", f"hf:{other}", "--fitted", str(fitted), "--keep-rate", "0.7", "--data",
                 "samples", "--limit", "2", "--out", str(out), "--no-progress"]) == 2  # fmt: skip
    assert f"was fitted on hf:{folder} (depth 6" in capsys.readouterr().err


def test_a_repo_id_offline_from_the_cache_and_one_line_when_not_cached(tmp_path):
    """Under HF_HUB_OFFLINE a repo id is read from the cache and the run records `hf:<repo>@<commit>`; a repo that
    is not there is one line naming the cache folder, exit code 2."""
    folder = tmp_path / "saved"
    save_hf("siglip", folder)
    cache = tmp_path / "hub"
    commit = fake_hub_cache(cache, "tokvis-test/tiny-siglip", folder)
    env = {"HF_HUB_CACHE": str(cache)}
    _tokvis("record", "--model", "hf:tokvis-test/tiny-siglip", "--method", "tome", "--r", "4", "--data", "samples",
            "--limit", "2", "--out", str(tmp_path / "runs"), "--no-progress", env=env)  # fmt: skip
    m = _manifest(tmp_path / "runs" / "tiny-siglip__tome__r4__samples")
    assert m["meta"]["backbone"] == f"hf:tokvis-test/tiny-siglip@{commit}"
    bad = _tokvis("record", "--model", "hf:tokvis-made-up/no-such-model", "--method", "tome", "--r", "2", "--data",
                  "samples", "--out", str(tmp_path / "runs2"), env=env, check=False)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cache) in lines[0] and "HF_HUB_OFFLINE" in lines[0], bad.stderr
    assert not (tmp_path / "runs2").exists() or not any((tmp_path / "runs2").iterdir())


def test_without_transformers_the_command_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['transformers'] = None; from tokvis.cli import main; "
        f"sys.exit(main(['record', '--model', 'hf:org/name', '--method', 'tome', '--r', '2', '--data', 'samples', "
        f"'--out', {str(tmp_path)!r}]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert 'pip install "tokvis[hf]"' in res.stderr


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
