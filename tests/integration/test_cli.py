"""The `tokvis` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.conftest import needs_offline_weights


def run(*args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "tokvis", *args], capture_output=True, text=True, check=check, timeout=600
    )


def test_methods_lists_registry():
    import tokvis

    out = run("methods").stdout
    for name in tokvis.list_methods():
        assert name in out


@pytest.mark.slow
@needs_offline_weights
def test_demo_writes_figures(tmp_path):
    res = run(
        "demo",
        "--out",
        str(tmp_path),
        "--images",
        "chelsea",
        "coffee",
        "--methods",
        "topk",
        "tome",
        "--keep-rates",
        "0.5",
        "--r",
        "8",
        "--save-traces",
    )
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["demo_tome_keep0.5.png", "demo_tome_r8.png", "demo_topk_keep0.5.png"]
    for name in pngs:
        assert str(tmp_path / name) in res.stdout  # the demo says where it wrote each figure
    import tokvis

    trace = tokvis.load_trace(tmp_path / "demo_topk_keep0.5.trace")
    assert trace.meta.image_ids == ["chelsea", "coffee"]
    assert trace.layers == (3, 6, 9)
    assert trace.token_counts(9).tolist() == [32, 32]


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--model", "resnet18"], "resnet18"),  # offline: the weights cannot be fetched
        (["demo", "--images", "no_such_image"], "no_such_image"),
    ],
)
def test_bad_arguments_fail_cleanly(tmp_path, args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying the hub
    res = run(*args, "--out", str(tmp_path), check=False)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert message in res.stderr
    assert not list(tmp_path.glob("*.png"))


# -- bad inputs: one line on stderr, exit code 2, checked before the model is loaded ---------------
def cli(*args, capsys):
    """``tokvis.cli.main`` in-process: ``(exit code, stderr)``; argparse errors exit through SystemExit."""
    from tokvis.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model: argument checks must come first."""
    from tokvis import zoo

    def create(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(zoo, "create", create)


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--max-columns", "0"], "--max-columns: the value must be an integer >= 1: got 0"),
        (["demo", "--max-columns", "-2"], "--max-columns: the value must be an integer >= 1: got -2"),
        (["demo", "--keep-rates", "0"], "--keep-rates: a keep rate must be a number in (0, 1]: got 0.0"),
        (["demo", "--keep-rates", "0.5", "1.5"], "--keep-rates: a keep rate must be a number in (0, 1]: got 1.5"),
        (["demo", "--keep-rates", "nan"], "--keep-rates: a keep rate must be a number in (0, 1]: got nan"),
        (["demo", "--keep-rates", "abc"], "--keep-rates: a number is needed: got 'abc'"),
        (["demo", "--r", "-1"], "--r: the value must be an integer >= 0: got -1"),
        (["demo", "--methods", "tome", "tomee"], "unknown reduction method 'tomee'; did you mean 'tome'?"),
        (["bench", "--batch-size", "0"], "--batch-size: the value must be an integer >= 1: got 0"),
        (["bench", "--batch-size", "-4"], "--batch-size: the value must be an integer >= 1: got -4"),
        (["bench", "--repeats", "0"], "--repeats: the value must be an integer >= 1: got 0"),
        (["bench", "--repeats", "-1"], "--repeats: the value must be an integer >= 1: got -1"),
        (["bench", "--threads", "-1"], "--threads: the value must be an integer >= 0: got -1"),
        (["bench", "--threads", "two"], "--threads: an integer is needed: got 'two'"),
        (["fit", "--method", "sit", "--keep-rate", "0.5", "--epochs", "0", "--out", "x"], "--epochs"),
        (["fit", "--method", "sit", "--keep-rate", "0", "--out", "x"], "--keep-rate: a keep rate"),
        (["fit", "--method", "sit", "--r", "4", "--lr", "-1", "--out", "x"], "--lr: a learning rate"),
        (["fit", "--method", "sit", "--r", "4", "--held-out", "-1", "--out", "x"], "--held-out"),
        (["fit", "--method", "sit", "--r", "4", "--threads", "-1", "--out", "x"], "--threads"),
        (["fit", "--method", "tome", "--r", "4", "--out", "x"], "--method tome has no learned parameters"),
        (["fit", "--method", "dpcknn", "--r", "4", "--out", "x"], "--method dpcknn has no learned parameters"),
        (["record", "--keep_rate", "0.7"], "unrecognized arguments: --keep_rate 0.7 (did you mean --keep-rate?)"),
        (["demo", "--keep_rates", "0.7"], "unrecognized arguments: --keep_rates 0.7 (did you mean --keep-rates?)"),
        (["fit", "--method", "sit", "--r", "4", "--out", "x", "--epohcs", "2"], "(did you mean --epochs?)"),
        (["demo", "--zzz"], "unrecognized arguments: --zzz (see tokvis demo --help)"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, message, capsys, no_model):
    code, err = cli(*args, capsys=capsys)
    assert code == 2
    assert message in err
    assert err.startswith(f"tokvis {args[0]}: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_demo_checks_out_and_images_before_loading(tmp_path, capsys, no_model):
    file = tmp_path / "figures"
    file.write_text("not a folder")
    code, err = cli("demo", "--out", str(file), capsys=capsys)
    assert code == 2 and "is an existing file, not a folder" in err and err.count("\n") == 1
    assert file.read_text() == "not a folder"
    code, err = cli("demo", "--out", str(tmp_path / "new"), "--images", "chelsea", "no_such_image", capsys=capsys)
    assert code == 2 and "unknown sample image 'no_such_image'" in err and "chelsea" in err
    assert not (tmp_path / "new").exists()


def test_os_errors_are_one_line_naming_the_path_but_bugs_keep_their_traceback(monkeypatch, capsys):
    import errno

    from tokvis import zoo

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/figures/demo_tome.png")

    monkeypatch.setattr(zoo, "create", full_disk)
    code, err = cli("bench", capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert "/data/figures/demo_tome.png: No space left on device" in err

    def bug(*a, **k):
        raise RuntimeError("a programming error")

    monkeypatch.setattr(zoo, "create", bug)
    with pytest.raises(RuntimeError, match="a programming error"):
        cli("bench", capsys=capsys)


@pytest.mark.filterwarnings("default::UserWarning")  # the test asserts the warning the CLI prints
def test_warnings_are_one_line_each(monkeypatch, capsys):
    import warnings

    from tokvis import zoo

    def warn_then_fail(*a, **k):
        warnings.warn("image x.png is 1x1 pixels:\nit will be upscaled", UserWarning, stacklevel=1)
        raise OSError(2, "No such file or directory", "x.png")

    monkeypatch.setattr(zoo, "create", warn_then_fail)
    code, err = cli("bench", capsys=capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0] == "tokvis bench: warning: image x.png is 1x1 pixels: it will be upscaled"
    assert "UserWarning" not in err and ".py:" not in err  # no Python source line


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_offline_hub_fails_fast_with_the_cli_flag(command, unreachable_hub, capsys, tmp_path):
    import time

    t0 = time.perf_counter()
    code, err = cli(command, "--model", "vit_small_patch16_224", *(["--out", str(tmp_path)] * (command == "demo")),
                    capsys=capsys)  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "vit_small_patch16_224" in err and "cannot be reached" in err
    assert "--no-pretrained" in err and "pretrained=False" not in err
    assert elapsed < 10, f"{elapsed:.1f} s before the error"


def test_no_pretrained_builds_a_random_model_offline(unreachable_hub, monkeypatch, capsys):
    """--no-pretrained (the flag the offline error names) works offline: the demo gets to the images."""
    from tokvis import data

    def stop(model, names=None):
        assert model.pos_embed.shape[1] == 1 + 4  # the random vit_tiny it built: 2x2 patches + class token
        raise SystemExit(0)

    monkeypatch.setattr(data, "load_images", stop)
    from tokvis import zoo

    real = zoo.create
    monkeypatch.setattr(zoo, "create", lambda name, **kw: real(name, img_size=32, **kw))
    code, err = cli("demo", "--model", "vit_tiny_patch16_224", "--no-pretrained", capsys=capsys)
    assert code == 0, err


def test_bad_count_through_the_installed_entry_point():
    """The same check as a user runs it (``python -m tokvis``): one line, exit code 2, no usage dump."""
    res = run("bench", "--batch-size", "0", check=False)
    assert res.returncode == 2
    assert res.stderr == "tokvis bench: error: argument --batch-size: the value must be an integer >= 1: got 0 " \
        "(see tokvis bench --help)\n"  # fmt: skip


def test_commands_leave_autograd_as_they_found_it(monkeypatch, capsys):
    """main() may run inside a user's process (a notebook, a test): no global torch switch leaks out."""
    import torch

    from tokvis import zoo

    def stop(*a, **k):
        assert not torch.is_grad_enabled()  # the demo itself runs without autograd
        raise OSError(2, "No such file or directory", "model.pth")

    monkeypatch.setattr(zoo, "create", stop)
    assert torch.is_grad_enabled()
    code, _ = cli("demo", "--out", "/tmp/tokvis-demo-grad-test", capsys=capsys)
    assert code == 2 and torch.is_grad_enabled()
