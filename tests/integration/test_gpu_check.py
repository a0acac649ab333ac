"""benchmarks/gpu_check.sh, the one script a session lent a GPU runs, works end to end: its CPU smoke mode
(``GPU_CHECK_DEVICE=cpu``: tiny settings) runs every part, with the weights file made as its comment says."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import tokvis
from tests.integration.conftest import needs_offline_weights

pytestmark = [pytest.mark.slow, needs_offline_weights]  # about a minute

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_run_on_the_cpu(tmp_path):
    import safetensors.torch as st

    import tokvis.zoo as z

    weights = tmp_path / "dinov2_s14.safetensors"  # as the script's comment makes it
    m = z.create("dinov2_small_offline")
    st.save_file({k: v.half().contiguous() for k, v in m.state_dict().items()}, str(weights))
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(out), "TOKVIS_WEIGHTS": str(weights)}
    env.pop("TOME_REPO", None)
    res = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
    )
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout
    assert "Traceback" not in log and "error:" not in log, log[-5000:]
    tests = (out / "tests_cpu.txt").read_text()
    summary = tests.strip().splitlines()[-1]  # pytest's last line, e.g. "86 passed in 8.3s"
    assert re.fullmatch(r"\d+ passed(, \d+ (skipped|xfailed|deselected))* in .*", summary), tests[-2000:]
    tables = {}
    for name in ("vit_b16_fp16_eager", "vit_l16_fp16_eager", "vit_b16_fp16_compiled"):
        text = (out / f"{name}.txt").read_text()
        lines = text.splitlines()
        head = next(i for i, line in enumerate(lines) if line.startswith("config"))  # torch may log before it
        rows = [line.split()[0] for line in lines[head + 1 :] if line.strip()]
        assert rows[0] == "unpatched", text
        tables[name] = (text, rows)
    assert set(tokvis.list_methods()) <= set(tables["vit_b16_fp16_eager"][1])
    assert "tome" in tables["vit_l16_fp16_eager"][1]
    assert ", compiled," in tables["vit_b16_fp16_compiled"][0] and "topk" in tables["vit_b16_fp16_compiled"][1]
    precision = (out / "precision_cpu.txt").read_text()
    assert any(line.startswith("tome r=16") and "bf16-autocast" in line for line in precision.splitlines())
