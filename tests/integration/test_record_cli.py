"""`tokvis record / sweep / verify` in subprocesses: kill -9 and resume, 2-process torchrun, sweeps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokvis.commands.record import load_sweep
from tokvis.store import DELAY_ENV, RunConfigError, load_run, shard_file, verify_run, verify_tree

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECORD = [
    "record", "--model", "vit_tiny_patch16_224", "--no-pretrained",
    "--model-kwargs", '{"img_size": 32, "patch_size": 8, "depth": 4}', "--method", "topk", "--keep-rate", "0.5",
    "--data", "digits", "--limit", "48", "--shard-size", "8", "--batch-size", "4", "--device", "cpu",
    "--cls", "--no-progress",
]  # fmt: skip
RUN_NAME = "vit_tiny_patch16_224__topk__keep0.5__digits"


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    env.pop(DELAY_ENV, None)
    env.update(extra)
    return env


def _tokvis(*args, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "tokvis", *args], capture_output=True, text=True, env=env or _env(), timeout=240
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _store_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if not p.name.endswith(".tmp")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    _tokvis(*RECORD, "--out", str(out))
    return out / RUN_NAME


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, reference):
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokvis", *RECORD, "--out", str(out)],
        env=_env(**{DELAY_ENV: "1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = out / RUN_NAME / "manifest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if manifest.exists() and json.loads(manifest.read_text())["shards"]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no shard was committed in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    m = json.loads(manifest.read_text())
    assert 1 <= len(m["shards"]) < m["num_shards"] and not m["complete"]  # killed mid-run
    done_before = {e["file"]: (out / RUN_NAME / e["file"]).read_bytes() for e in m["shards"]}
    assert verify_run(out / RUN_NAME).status == "incomplete"
    res = _tokvis(*RECORD, "--out", str(out))
    assert "resumed" in res.stdout
    for name, blob in done_before.items():  # finished shards were not recomputed / rewritten
        assert (out / RUN_NAME / name).read_bytes() == blob
    assert _store_bytes(out / RUN_NAME) == _store_bytes(reference)
    ids = load_run(out / RUN_NAME).image_ids
    assert len(ids) == len(set(ids)) == 48


def test_torchrun_two_processes_equals_single(tmp_path, reference):
    out = tmp_path / "dist"
    with socket.socket() as sock:  # a free port for the rendezvous (--master_port=0 is not supported)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += ["--master_addr=127.0.0.1", "-m", "tokvis"]
    proc = subprocess.run([*cmd, *RECORD, "--out", str(out)], capture_output=True, text=True, env=_env(), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _store_bytes(out / RUN_NAME) == _store_bytes(reference)
    run, ref = load_run(out / RUN_NAME), load_run(reference)
    assert run.image_ids == ref.image_ids
    assert (run.depth() == ref.depth()).all()


def test_sweep_and_verify(tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        'out = "runs"\nbackbones = ["vit_tiny_patch16_224"]\nmethods = ["topk", "tome"]\nkeep_rates = [0.5]\n'
        'datasets = ["samples"]\npretrained = false\nbatch_size = 4\nshard_size = 4\ndevice = "cpu"\n'
        "[model_kwargs]\nimg_size = 32\npatch_size = 8\ndepth = 4\n"
    )
    first = _tokvis("sweep", str(sweep), "--no-progress")
    assert first.stdout.count("recorded") >= 2 and "status" in first.stdout  # summary table
    second = _tokvis("sweep", str(sweep), "--no-progress")
    assert second.stdout.count("already complete") >= 2
    runs = tmp_path / "runs"
    assert [r.status for r in verify_tree(runs)] == ["complete", "complete"]
    shard = runs / "vit_tiny_patch16_224__tome__keep0.5__samples" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    bad = _tokvis("verify", str(runs), check=False)
    assert bad.returncode == 1 and "CORRUPT" in bad.stdout and "shard-00001" in bad.stdout
    assert shard.exists()
    (tmp_path / "bad.toml").write_text('methods = ["tome"]\nbogus = 1\n')
    with pytest.raises(RunConfigError, match=r"unknown keys \['bogus'\]"):
        load_sweep(tmp_path / "bad.toml")


def test_example_sweep_file_is_valid():
    """examples/sweep.toml (referenced by README) parses into runs the store accepts."""
    from pathlib import Path

    from tokvis.commands.record import load_sweep

    path = Path(__file__).parents[2] / "examples" / "sweep.toml"
    specs, opts = load_sweep(path)
    assert len(specs) == 3 * 3 * 2
    assert {s.method for s in specs} == {"topk", "evit", "tome"}
    assert opts["out"] == path.parent / "runs"


def test_two_writers_one_clear_lock_error_and_a_complete_store(tmp_path):
    """Two `tokvis record` processes on one run directory (the second with other options)."""
    out = tmp_path / "runs"
    first = subprocess.Popen(
        [sys.executable, "-m", "tokvis", *RECORD, "--out", str(out)],
        env=_env(**{DELAY_ENV: "3"}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lock = out / RUN_NAME / ".tokvis.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the first writer never took the lock"
    second = _tokvis(*RECORD, "--no-scores", "--out", str(out), check=False)
    stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stdout + stderr
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr
    assert f"is being recorded by another process (pid {first.pid} on host {socket.gethostname()}" in lines[0]
    assert verify_run(out / RUN_NAME).status == "complete"
    assert not lock.exists()
    assert load_run(out / RUN_NAME).config["scores"] is True  # the first writer's run, whole


def test_kill_9_holder_lock_is_taken_over(tmp_path, reference):
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokvis", *RECORD, "--out", str(out)],
        env=_env(**{DELAY_ENV: "1"}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    lock = out / RUN_NAME / ".tokvis.lock"
    deadline = time.time() + 120
    try:
        while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads(lock.read_text())["pid"] == proc.pid  # left behind by the dead writer
    res = _tokvis(*RECORD, "--out", str(out))
    assert f"took over the lock left by pid {proc.pid}" in res.stdout
    assert verify_run(out / RUN_NAME).status == "complete" and not lock.exists()
    assert _store_bytes(out / RUN_NAME) == _store_bytes(reference)


def test_damaged_complete_run_is_repaired_by_rerunning(tmp_path, reference):
    out = tmp_path / "runs"
    _tokvis(*RECORD, "--out", str(out))
    run = out / RUN_NAME
    blob = bytearray((run / "shard-00002.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (run / "shard-00002.safetensors").write_bytes(bytes(blob))
    (run / "shard-00004.safetensors").unlink()
    assert _tokvis("verify", str(run), check=False).returncode == 1
    res = _tokvis(*RECORD, "--out", str(out))
    assert "nothing to do" not in res.stdout and "repaired" in res.stdout
    assert "shard 2:" in res.stdout and "shard 4:" in res.stdout
    assert _tokvis("verify", str(run)).returncode == 0
    for name in [shard_file(k) for k in range(6)] + ["manifest.json"]:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
