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
