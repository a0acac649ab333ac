"""`tokvis record --fitted FILE` and a sweep's ``[fitted]`` table: runs of fitted learned methods.

A tiny random ViT and a SiT fitted for one epoch on a few images (seconds).  Two paths: the run
recorded through the CLI and the loaded method run directly in Python give the same decisions.
Bad inputs: one line on stderr, exit 2, nothing recorded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tokvis
from tests.integration.conftest import fails_cleanly as _fails_cleanly
from tokvis import fitting
from tokvis.cli import main
from tokvis.commands.record import _load_sweep, load_sweep
from tokvis.store import RunConfigError, RunSpec, build_model, load_run

KW = {"img_size": 32, "patch_size": 8}
TINY = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", json.dumps(KW)]
COMMON = ["--data", "digits", "--limit", "6", "--shard-size", "4", "--device", "cpu", "--no-progress"]
SPEC = dict(backbone="vit_tiny_patch16_224", method="sit", dataset="digits", pretrained=False, model_kwargs=KW)


def _model():
    return build_model(RunSpec(keep_rate=0.5, **SPEC))  # the backbone the CLI builds (seed 0)


def _fit(path: Path, *, keep_rate=0.5, seed=0, locations=(1, 2)):
    model = _model()
    images = fitting.augmented_images(model, 4, seed=seed, sources=("samples",))
    method = tokvis.fit(
        model, "sit", images, keep_rate=keep_rate, locations=list(locations), epochs=1, batch_size=4,
        progress=False, seed=seed,
    )  # fmt: skip
    return fitting.save_method(method, path)


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    d = tmp_path_factory.mktemp("fits")
    return {
        "a": _fit(d / "sit_keep0.5.safetensors"),
        "b": _fit(d / "other" / "sit_keep0.5.safetensors", seed=1),
        "k7": _fit(d / "sit_keep0.7.safetensors", keep_rate=0.7),
        "dir": d,
    }


def _python_labels(path: Path, run) -> list[np.ndarray]:
    """The second path: load the fitted method, patch the backbone, run the run's images."""
    from tokvis.data import transform_for
    from tokvis.datasets import open_dataset

    model = _model()
    method = fitting.load_method(path)
    tokvis.patch(model, method, keep_rate=0.5, locations=[1, 2])
    ds = open_dataset("digits").subset(6)
    t = transform_for(model)
    x = torch.stack([t(ds.load(i)) for i in range(len(ds))])
    _, trace = tokvis.run_with_trace(model, x)
    return [trace.labels(layer).numpy() for layer in range(len(model.blocks))]


def test_record_fitted_equals_the_loaded_method_in_python(tmp_path, fits, capsys):
    out = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fitted method: no "neither fitted nor loaded" warning
        assert main(["record", *TINY, "--fitted", str(fits["a"]), *COMMON, "--out", str(out)]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert "__sit__keep0.5__" in run_dir.name  # method and keep rate from the file
    run = load_run(run_dir)
    assert run.config["fitted_sha256"] == fitting.method_file_info(fits["a"])["sha256"]
    assert run.config["locations"] == [1, 2]  # the fit's locations
    assert run.config["method_options"] == fitting.method_file_info(fits["a"])["options"]
    expected = _python_labels(fits["a"], run)
    for layer in range(len(expected)):
        np.testing.assert_array_equal(run.labels(layer), expected[layer])


def test_another_fit_is_another_run_refused_in_the_same_folder(tmp_path, fits, capsys):
    out = tmp_path / "runs"
    assert main(["record", *TINY, "--fitted", str(fits["a"]), *COMMON, "--out", str(out)]) == 0
    capsys.readouterr()
    code = main(["record", *TINY, "--fitted", str(fits["b"]), *COMMON, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert (
        load_run(run_dir).config["fitted_sha256"] == fitting.method_file_info(fits["a"])["sha256"]
    )  # the first run is intact


def test_config_hash_includes_the_fit_and_unfitted_runs_keep_theirs(fits):
    from tokvis.store.format import config_hash
    from tokvis.store.models import fitted_fields

    base = RunSpec(keep_rate=0.5, **SPEC)
    assert "fitted" not in base.config("digits") and "fitted_sha256" not in base.config("digits")
    fa = fitted_fields(fits["a"], method="sit", keep_rate=0.5, r=None, locations=None, method_options={})
    fb = fitted_fields(fits["b"], method="sit", keep_rate=0.5, r=None, locations=None, method_options={})
    sa = RunSpec(keep_rate=0.5, **{**SPEC, **fa})
    sb = RunSpec(keep_rate=0.5, **{**SPEC, **fb, "fitted": fa["fitted"]})  # same path, other content
    assert config_hash(sa.config("digits")) != config_hash(sb.config("digits"))
    assert config_hash(sa.config("digits")) != config_hash(base.config("digits"))


def test_a_fit_file_changed_after_setup_is_refused(tmp_path, fits):
    from tokvis.store.models import fitted_fields, load_fitted

    p = tmp_path / "sit.safetensors"
    p.write_bytes(Path(fits["a"]).read_bytes())
    spec = RunSpec(keep_rate=0.5, **{**SPEC, **fitted_fields(p, method=None, keep_rate=0.5, r=None,
                                                               locations=None, method_options={})})  # fmt: skip
    assert load_fitted(spec).is_fitted
    p.write_bytes(Path(fits["b"]).read_bytes())
    with pytest.raises(RunConfigError, match="changed"):
        load_fitted(spec)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "no such file"),
        ("not_safetensors", "not a readable safetensors file"),
        ("not_method", "is not a tokvis method file"),
        ("other_method", "holds a fitted 'sit', not 'topk'"),
        ("two_methods", "--fitted gives one method"),
        ("keep_rate", "was fitted for keep_rate 0.5, but this run uses keep_rate 0.7"),
        ("r", "was fitted for keep_rate 0.5, but this run uses r 2"),
        ("locations", "was fitted for locations [1, 2], but this run uses [3]"),
        ("option", "differs from the fitted file's options"),
        ("no_method", "give --method"),
    ],
)
def test_bad_fitted_inputs_one_line_exit_2_nothing_recorded(tmp_path, fits, capsys, case, match):
    from safetensors.torch import save_file

    out = tmp_path / "runs"
    path = str(fits["a"])
    extra: list[str] = []
    if case == "missing":
        path = str(tmp_path / "nope.safetensors")
    elif case == "not_safetensors":
        path = str(tmp_path / "x.safetensors")
        Path(path).write_text("hello")
    elif case == "not_method":
        path = str(tmp_path / "w.safetensors")
        save_file({"w": torch.zeros(2)}, path)
    elif case == "other_method":
        extra = ["--method", "topk"]
    elif case == "two_methods":
        extra = ["--method", "sit", "topk"]
    elif case == "keep_rate":
        extra = ["--keep-rate", "0.7"]
    elif case == "r":
        extra = ["--r", "2"]
    elif case == "locations":
        extra = ["--locations", "3"]
    elif case == "option":
        extra = ["--method-options", '{"seed": 7}']
    argv = ["record", *TINY, *COMMON, "--out", str(out), *extra]
    if case == "no_method":
        argv += ["--keep-rate", "0.5"]
    else:
        argv += ["--fitted", path]
    _fails_cleanly(capsys, argv, match)
    assert not out.exists() or not any(out.iterdir())


def _sweep(tmp_path, body: str) -> Path:
    f = tmp_path / "sweep.toml"
    f.write_text(
        'out = "runs"\nbackbones = ["vit_tiny_patch16_224"]\npretrained = false\n'
        'model_kwargs = {img_size = 32, patch_size = 8}\nmethods = ["sit", "topk"]\ndatasets = ["digits"]\n'
        'limit = 4\nshard_size = 4\ndevice = "cpu"\n' + body
    )
    return f


def test_sweep_fitted_table_fills_keep_rate_and_records(tmp_path, fits, capsys):
    fits_dir = Path(fits["dir"])
    f = _sweep(tmp_path, f'keep_rates = [0.5, 0.7]\n[fitted]\nsit = "{fits_dir}/sit_keep{{keep_rate}}.safetensors"\n')
    specs, _ = load_sweep(f)
    sit = {s.keep_rate: s for s in specs if s.method == "sit"}
    assert sit[0.5].fitted_sha256 == fitting.method_file_info(fits["a"])["sha256"]
    assert sit[0.7].fitted_sha256 == fitting.method_file_info(fits["k7"])["sha256"]
    assert all(s.fitted is None for s in specs if s.method == "topk")
    assert main(["sweep", str(f), "--no-progress"]) == 0
    runs = {load_run(p).config.get("fitted_sha256") for p in (tmp_path / "runs").iterdir()}
    assert {fitting.method_file_info(fits["a"])["sha256"], fitting.method_file_info(fits["k7"])["sha256"], None} == runs


def test_sweep_fitted_relative_to_the_toml(tmp_path, fits):
    (tmp_path / "fits").mkdir()
    (tmp_path / "fits" / "sit_keep0.5.safetensors").write_bytes(Path(fits["a"]).read_bytes())
    f = _sweep(tmp_path, 'keep_rates = [0.5]\n[fitted]\nsit = "fits/sit_keep{keep_rate}.safetensors"\n')
    (spec,) = [s for s in load_sweep(f)[0] if s.method == "sit"]
    assert spec.fitted == str((tmp_path / "fits" / "sit_keep0.5.safetensors").resolve())


@pytest.mark.parametrize(
    "body, match",
    [
        ('keep_rates = [0.5]\n[fitted]\ntome = "x.safetensors"\n', "fitted must be keyed by a method of the sweep"),
        ('keep_rates = [0.5]\nfitted = "x"\n', "fitted must be a table"),
        ("keep_rates = [0.5]\n[fitted]\nsit = 3\n", "fitted.sit must be a path pattern"),
        (
            'keep_rates = [0.5]\n[fitted]\nsit = "f{rate}.safetensors"\n',
            "may only hold {keep_rate}, {r} and {backbone}",
        ),
        ('keep_rates = [0.5]\n[fitted]\nsit = "f{r}.safetensors"\n', "needs {r}"),
        ('keep_rates = [0.5]\n[fitted]\nsit = "nope{keep_rate}.safetensors"\n', "no such file"),
        ('keep_rates = [0.9]\n[fitted]\nsit = "FITS/sit_keep0.5.safetensors"\n', "fitted for keep_rate 0.5"),
    ],
)
def test_bad_sweep_fitted_tables(tmp_path, fits, capsys, body, match):
    f = _sweep(tmp_path, body.replace("FITS", str(fits["dir"])))
    with pytest.raises(RunConfigError, match=None) as e:
        load_sweep(f)
    assert match in str(e.value)
    _fails_cleanly(capsys, ["sweep", str(f), "--no-progress"], match)
    assert not (tmp_path / "runs").exists()


def test_evaluate_uses_the_runs_fitted_file(tmp_path, fits, capsys):
    p = tmp_path / "sit.safetensors"
    p.write_bytes(Path(fits["a"]).read_bytes())
    out = tmp_path / "runs"
    assert main(["record", *TINY, "--fitted", str(p), *COMMON, "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--out", str(tmp_path / "m.csv")]) == 0
    p.write_bytes(Path(fits["b"]).read_bytes())  # another fit under the run's path: evaluating it would be wrong
    capsys.readouterr()
    _fails_cleanly(capsys, ["evaluate", str(out), "--out", str(tmp_path / "m2.csv")], "changed")


# -- the sweep's [fit] table: missing fitted files are fitted first ------------------------------------------------
FIT_TABLE = "[fit]\nimages = 4\nheld_out = 0\nepochs = 1\nbatch_size = 4\n"


def test_sweep_fit_table_fits_missing_files_like_tokvis_fit_then_records(tmp_path, capsys):
    f = _sweep(
        tmp_path,
        'keep_rates = [0.5, 0.7]\nlocations = [1, 2]\n[fitted]\nsit = "fits/sit_keep{keep_rate}.safetensors"\n'
        + FIT_TABLE,
    )
    with pytest.raises(RunConfigError, match="no such file"):  # load_sweep alone does not fit
        load_sweep(f)
    assert main(["sweep", str(f), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert said.count("fitting sit") == 2 and "(2/2)" in said
    fitted = {k: tmp_path / "fits" / f"sit_keep{k}.safetensors" for k in ("0.5", "0.7")}
    runs = [load_run(p) for p in (tmp_path / "runs").iterdir()]
    assert len(runs) == 4
    assert {r.config.get("fitted_sha256") for r in runs} == {None} | {
        fitting.method_file_info(p)["sha256"] for p in fitted.values()
    }
    # the second path: tokvis fit with the same settings gives the same parameters and schedule
    cli = tmp_path / "cli.safetensors"
    args = [*TINY, "--method", "sit", "--keep-rate", "0.5", "--locations", "1", "2", "--images", "4"]
    assert (
        main(["fit", *args, "--held-out", "0", "--epochs", "1", "--batch-size", "4", "--quiet", "--out", str(cli)]) == 0
    )
    a, b = fitting.load_method(fitted["0.5"]), fitting.load_method(cli)
    assert a.fit_info == b.fit_info
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    # run again: nothing to fit, every run complete
    capsys.readouterr()
    assert main(["sweep", str(f), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "fitting sit" not in said and " recorded " not in said and "already complete" in said


@pytest.mark.parametrize(
    "body, match",
    [
        ('keep_rates = [0.5]\n[fit]\nepochs = 1\n', "[fit] fits the files of the [fitted] table"),
        ('keep_rates = [0.5]\nfit = 3\n[fitted]\nsit = "a{keep_rate}"\n', "fit must be a table"),
        ('keep_rates = [0.5]\n[fitted]\nsit = "a{keep_rate}"\n[fit]\nepoch = 1\n', "unknown keys ['epoch'] in [fit]"),
        ('keep_rates = [0.5]\n[fitted]\nsit = "a{keep_rate}"\n[fit]\nepochs = 0\n', "fit.epochs"),
        ('keep_rates = [0.5]\n[fitted]\nsit = "a{keep_rate}"\n[fit]\nheld_out = -1\n', "fit.held_out"),
        ('keep_rates = [0.5]\n[fitted]\nsit = "a{keep_rate}"\n[fit]\nlr = 0\n', "fit.lr"),
        ('keep_rates = [0.5]\n[fitted]\ntopk = "a{keep_rate}"\n[fit]\n', "topk has no learned parameters"),
        ('keep_rates = [0.5]\n[fitted]\nsit = "a{keep_rate}"\n[method_options.sit]\nbogus = 1\n[fit]\n',
         "method_options.sit"),
        ('keep_rates = [0.5]\nbatch_size = 0\n[fitted]\nsit = "a{keep_rate}"\n[fit]\n', "batch"),
    ],
)  # fmt: skip
def test_bad_sweep_fit_tables_one_line_nothing_fitted(tmp_path, capsys, body, match):
    f = _sweep(tmp_path, body)
    _fails_cleanly(capsys, ["sweep", str(f), "--no-progress"], match)
    assert not (tmp_path / "runs").exists()
    assert not list(tmp_path.glob("a*"))  # nothing fitted


def test_sweep_fit_of_dpcknn_needs_its_learned_merge(tmp_path, capsys):
    body = 'keep_rates = [0.5]\n[fitted]\ndpcknn = "a{keep_rate}"\n[fit]\n'
    f = _sweep(tmp_path, body)
    f.write_text(f.read_text().replace('methods = ["sit", "topk"]', 'methods = ["dpcknn"]'))
    _fails_cleanly(capsys, ["sweep", str(f), "--no-progress"], "dpcknn has no learned parameters with options {}")
    assert not list(tmp_path.glob("a*"))  # nothing fitted


def test_sweep_fit_one_file_for_two_backbones_needs_the_backbone_in_the_pattern(tmp_path, capsys):
    f = _sweep(tmp_path, 'keep_rates = [0.5]\n[fitted]\nsit = "fits/sit{keep_rate}"\n' + FIT_TABLE)
    text = f.read_text().replace(
        'backbones = ["vit_tiny_patch16_224"]', 'backbones = ["vit_tiny_patch16_224", "deit_tiny_patch16_224"]'
    )
    assert text != f.read_text()
    f.write_text(text)
    _fails_cleanly(capsys, ["sweep", str(f), "--no-progress"], "put {backbone} in the pattern")
    f.write_text(text.replace("fits/sit{keep_rate}", "fits/{backbone}_sit{keep_rate}"))
    specs, _, jobs = _load_sweep(f, plan_fits=True)
    assert sorted(Path(j["file"]).name for j in jobs) == ["deit_tiny_patch16_224_sit0.5", "vit_tiny_patch16_224_sit0.5"]
