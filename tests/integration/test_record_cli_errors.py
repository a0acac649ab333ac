"""`tokvis record / sweep / verify` bad inputs: exit code 2, one line on stderr, no traceback, nothing left behind.

Driven through :func:`tokvis.cli.main` in this process (an exception other than the handled
:class:`~tokvis.errors.TokvisError` would fail the test), plus one real subprocess.  Every check
here happens before a model is loaded, except ``--model-kwargs``, which needs the model's
constructor to say what it accepts (a tiny random model, built in milliseconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import fails_cleanly as _fails_cleanly
from tokvis.cli import main
from tokvis.commands.record import load_sweep
from tokvis.store import RunConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", '{"img_size": 32, "patch_size": 8}']
BASE = ["record", *TINY, "--method", "topk", "--keep-rate", "0.5", "--data", "digits", "--limit", "4"]
BASE += ["--shard-size", "4", "--device", "cpu", "--no-progress"]


def _replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--workers", "-1"], "workers (--workers) must be an integer >= 0: got -1"),
        (["--threads", "-1"], "threads (--threads) must be an integer >= 0: got -1"),
        (["--batch-size", "0"], "batch size (--batch-size) must be an integer >= 1: got 0"),
        (["--shard-size", "0"], "shard_size must be an integer >= 1: got 0"),
        (["--limit", "0"], "limit must be an integer >= 1: got 0"),
        (["--device", "tpu"], "device must be cpu, cuda, cuda:<n> or auto"),
    ],
    ids=["workers", "threads", "batch-size", "shard-size", "limit", "device"],
)
def test_bad_numbers_leave_nothing_behind(tmp_path, capsys, extra, match):
    out = tmp_path / "runs"
    _fails_cleanly(capsys, [*BASE, "--out", str(out), *extra], match)
    assert not out.exists()


def test_unknown_model_kwarg(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = _replace(BASE, "--model-kwargs", '{"img_sizee": 64}') + ["--out", str(out)]
    line = _fails_cleanly(capsys, argv, "img_sizee")
    assert "--model-kwargs" in line
    assert not out.exists()


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    _fails_cleanly(capsys, [*BASE, "--out", str(target)], "is a file, not a folder")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--method", "nope", "unknown reduction method 'nope'"),
        ("--keep-rate", "1.5", "keep_rate must be a number in (0, 1]: got 1.5"),
        ("--model", "vit_tiny_patch16_22", "Unknown timm model 'vit_tiny_patch16_22'"),
        ("--data", "no/such/folder", "unknown dataset"),
    ],
    ids=["method", "keep-rate", "model", "data"],
)
def test_bad_run_arguments_before_any_model(tmp_path, capsys, flag, value, match):
    out = tmp_path / "runs"
    _fails_cleanly(capsys, _replace(BASE, flag, value) + ["--out", str(out)], match)
    assert not out.exists()


def test_bad_method_option(tmp_path, capsys):
    out = tmp_path / "runs"
    _fails_cleanly(capsys, [*BASE, "--out", str(out), "--method-options", '{"bogus": 1}'], "bogus")
    assert not out.exists()


def test_a_real_subprocess_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tokvis", *BASE, "--out", str(tmp_path / "runs"), "--workers", "-1"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tokvis record: error: workers (--workers) must be an integer >= 0: got -1"
    ]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# sweeps
# ----------------------------------------------------------------------------------------------

SWEEP = (
    'out = "runs"\nbackbones = ["vit_tiny_patch16_224"]\ndatasets = ["digits"]\npretrained = false\n'
    'limit = 4\nshard_size = 4\nbatch_size = 4\ndevice = "cpu"\n'
)
KWARGS = "[model_kwargs]\nimg_size = 32\npatch_size = 8\ndepth = 2\n"


def _sweep(tmp_path, body):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP + body + KWARGS)
    return path


@pytest.mark.parametrize(
    "body, match",
    [
        ('methods = ["topk"]\nkeep_rates = [0.5]\n[method_options]\nfoo = 1\n', "keyed by a method of the sweep"),
        ('methods = ["topk"]\nkeep_rates = ["abc"]\n', "keep_rates entry must be a number in (0, 1]: got 'abc'"),
        ('methods = ["topk"]\nkeep_rates = [0]\n', "keep_rates entry must be a number in (0, 1]: got 0"),
        ('methods = ["topk"]\nr = [-2]\n', "r entry must be an integer >= 0: got -2"),
        ('methods = ["topk"]\nkeep_rates = [0.5]\nworkers = -1\n', "workers must be an integer >= 0: got -1"),
        ('methods = ["topk"]\nkeep_rates = [0.5]\nthreads = -1\n', "threads must be an integer >= 0: got -1"),
    ],
    ids=["method_options-not-keyed", "keep_rates-abc", "keep_rates-0", "r-negative", "workers", "threads"],
)
def test_bad_sweep_files(tmp_path, capsys, body, match):
    path = _sweep(tmp_path, body)
    _fails_cleanly(capsys, ["sweep", str(path), "--no-progress"], match)
    assert not (tmp_path / "runs").exists()


def test_sweep_with_an_unknown_method_records_nothing(tmp_path, capsys):
    """The whole grid is checked first: the valid run before the unknown method is not recorded."""
    path = _sweep(tmp_path, 'methods = ["topk", "nope"]\nkeep_rates = [0.5]\n')
    _fails_cleanly(capsys, ["sweep", str(path), "--no-progress"], "unknown reduction method 'nope'")
    assert not (tmp_path / "runs").exists()


def test_sweep_with_an_unknown_second_backbone_records_nothing(tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text(
        SWEEP.replace('["vit_tiny_patch16_224"]', '["vit_tiny_patch16_224", "vit_tiny_patch16_22"]')
        + 'methods = ["topk"]\nkeep_rates = [0.5]\n'
        + KWARGS
    )
    _fails_cleanly(capsys, ["sweep", str(path), "--no-progress"], "vit_tiny_patch16_22'")
    assert not (tmp_path / "runs").exists()


def test_sweep_keep_rates_as_one_number_is_a_list_of_one(tmp_path):
    specs, _ = load_sweep(_sweep(tmp_path, 'methods = ["topk", "tome"]\nkeep_rates = 0.5\nr = 3\n'))
    assert [(s.method, s.keep_rate, s.r) for s in specs] == [
        ("topk", 0.5, None), ("topk", None, 3), ("tome", 0.5, None), ("tome", None, 3),
    ]  # fmt: skip


def test_sweep_method_options_keyed_by_method_are_used(tmp_path):
    specs, _ = load_sweep(
        _sweep(tmp_path, 'methods = ["topk", "tome"]\nkeep_rates = [0.5]\n[method_options.tome]\nprop_attn = false\n')
    )
    assert {s.method: s.method_options for s in specs} == {"topk": {}, "tome": {"prop_attn": False}}


def test_load_sweep_raises_typed_errors(tmp_path):
    with pytest.raises(RunConfigError, match="keyed by a method"):
        load_sweep(_sweep(tmp_path, 'methods = ["topk"]\nkeep_rates = [0.5]\n[method_options]\nfoo = 1\n'))


# ----------------------------------------------------------------------------------------------
# verify's exit status
# ----------------------------------------------------------------------------------------------


def test_verify_nothing_found_is_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails_cleanly(capsys, ["verify", str(tmp_path / "empty")], "no run directories found")
    _fails_cleanly(capsys, ["verify", str(tmp_path / "missing")], "no such directory")


def test_verify_exit_status_complete_incomplete_corrupt(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main([*BASE, "--limit", "8", "--out", str(out)]) == 0
    run = next(out.iterdir())
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    m = json.loads((run / "manifest.json").read_text())
    from tokvis.store.format import write_manifest

    m["shards"] = m["shards"][:1]
    write_manifest(run, m)
    (run / "shard-00001.safetensors").unlink()
    assert main(["verify", str(out)]) == 1  # incomplete
    assert "INCOMPLETE" in capsys.readouterr().out
    (run / "shard-00000.safetensors").write_bytes(b"garbage")
    assert main(["verify", str(out)]) == 1  # corrupt
    assert "CORRUPT" in capsys.readouterr().out
