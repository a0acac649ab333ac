"""Issue 20 §4 (and issue 22 §4's first bullet): messages that say what was wrong and what to do."""

from __future__ import annotations

import json

import pytest

import tokvis
from tests.integration.conftest import fails_cleanly
from tests.integration.test_record_fitted import COMMON, TINY
from tokvis.cli import main
from tokvis.errors import MethodOptionError

FIT = ["fit", *TINY, "--method", "sit", "--keep-rate", "0.5", "--images", "4", "--held-out", "0", "--epochs", "1"]


def test_a_misspelled_option_names_the_method_its_options_with_defaults_and_the_nearest():
    with pytest.raises(MethodOptionError) as e:
        tokvis.create_method("evit", scroe="cls")
    text = str(e.value)
    assert "method 'evit' has no option 'scroe'" in text and "did you mean 'score'" in text
    assert "score='cls'" in text and "__init__" not in text and "_AttentionRanked" not in text


def test_method_options_on_the_command_line_name_the_method(tmp_path, capsys):
    out = str(tmp_path / "r")
    opts = json.dumps({"order": "original"})
    argv = ["record", *TINY, "--method", "topk", "--keep-rate", "0.5", "--method-options", opts, *COMMON, "--out", out]
    line = fails_cleanly(capsys, argv, "method 'topk'")
    assert "no option 'order'" in line and "score='cls'" in line and "_AttentionRanked" not in line
    # one option given to two methods: the method that lacks it is named
    line = fails_cleanly(capsys, ["record", *TINY, "--method", "tome", "topk", "--keep-rate", "0.5",
                                  "--method-options", json.dumps({"prop_attn": False}), *COMMON, "--out", out],
                         "method 'topk' has no option 'prop_attn'")  # fmt: skip
    f = tmp_path / "sweep.toml"
    f.write_text('out = "runs"\nbackbones = ["vit_tiny_patch16_224"]\npretrained = false\nmethods = ["tome"]\n'
                 'datasets = ["digits"]\nkeep_rates = [0.5]\n[method_options.tome]\nprop_atn = false\n')  # fmt: skip
    line = fails_cleanly(capsys, ["sweep", str(f), "--no-progress"], "method 'tome' has no option 'prop_atn'")
    assert "did you mean 'prop_attn'" in line and "order='official'" in line


def test_fit_checks_its_options_and_out_before_loading_or_training(tmp_path, capsys):
    line = fails_cleanly(capsys, [*FIT, "--option", "scroe=1", "--out", str(tmp_path / "f")], "method 'sit'")
    assert "hidden_ratio=0.5" in line
    (tmp_path / "fits").mkdir()
    fails_cleanly(capsys, [*FIT, "--out", str(tmp_path / "fits")], "is an existing folder")


def test_methods_lists_every_methods_options_with_defaults_one_line_each(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(tokvis.list_methods())
    by_name = {line.split()[0]: line for line in lines}
    assert (
        "score='cls'" in by_name["topk"]
        and "prop_attn=True" in by_name["tome"]
        and "order='official'" in by_name["tome"]
    )
    assert "k=5" in by_name["dpcknn"] and "sampling='study'" in by_name["ats"]
    assert "`" not in "".join(lines) and "study's models/dpcknn.py" in by_name["dpcknn"]  # plain text, no RST


def test_plain_text_removes_inline_rst_markup():
    from tokvis.cli import plain_text

    assert plain_text("keep the ``target`` patches") == "keep the target patches"
    assert plain_text("a :class:`~tokvis.trace.Trace` and :func:`tokvis.patch`") == "a Trace and tokvis.patch"
    assert plain_text(":doc:`the guide <guide/start>`, `ToMe`_ and `x`") == "the guide, ToMe and x"


def test_compare_of_a_keep_rate_run_and_an_r_run_says_so(tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["record", *TINY, "--method", "topk", *COMMON, "--out", str(out)]
    assert main([*base, "--keep-rate", "0.5"]) == 0 and main([*base, "--r", "1"]) == 0
    capsys.readouterr()
    line = fails_cleanly(capsys, ["compare", str(out), "--by", "method", "--out", str(tmp_path / "s.csv")],
                         "scheduled by keep rate")  # fmt: skip
    assert "--r" in line and "locations" not in line


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_an_unwritable_out_is_refused_first(tmp_path, capsys, command):
    extra = ["--by", "method"] if command == "compare" else []
    (tmp_path / "runs").mkdir()
    fails_cleanly(capsys, [command, str(tmp_path / "runs"), *extra, "--out", "/proc/x.csv"], "cannot write")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"img_size": 32, "patch_size": 8, "depth": 0}, "depth (--model-kwargs) must be an integer >= 1"),
     ({"img_size": "32", "patch_size": 8}, "img_size (--model-kwargs) must be an integer >= 1: got '32'")],
)  # fmt: skip
def test_model_arguments_say_which_value_is_wrong(tmp_path, capsys, kwargs, match):
    argv = ["record", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", json.dumps(kwargs),
            "--method", "topk", "--keep-rate", "0.5", *COMMON, "--out", str(tmp_path / "r")]  # fmt: skip
    fails_cleanly(capsys, argv, match)


def test_a_text_file_as_model_is_not_a_checkpoint(tmp_path, capsys):
    p = tmp_path / "model.pth"
    p.write_text("hello\n")
    line = fails_cleanly(capsys, ["record", "--model", str(p), "--model-kwargs", '{"arch": "vit_tiny_patch16_224"}',
                                  "--method", "topk", "--keep-rate", "0.5", *COMMON, "--out", str(tmp_path / "r")],
                         "is not a PyTorch checkpoint")  # fmt: skip
    assert "weights_only" not in line


def test_a_store_of_a_newer_version_says_upgrade(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["record", *TINY, "--method", "topk", "--keep-rate", "0.5", *COMMON, "--out", str(out)]) == 0
    (run_dir,) = out.iterdir()
    m = json.loads((run_dir / "manifest.json").read_text())
    m["version"] = 99
    (run_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(tokvis.errors.TokvisError, match="written by a newer tokvis") as e:
        tokvis.load_run(run_dir)
    assert "upgrade tokvis" in str(e.value) and "record the run again" not in str(e.value)
