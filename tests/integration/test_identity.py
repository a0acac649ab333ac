"""Identities (issue 20 §1): fitted files checked by their content, stores that know which code recorded them,
a manifest copied over another run's shards, and ``tokvis verify --hash-inputs``.

Tiny random ViTs and SiT fits of one epoch on a few images (seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tokvis
from tests.integration.conftest import fails_cleanly
from tests.integration.test_record_fitted import COMMON, FIT_TABLE, TINY, _fit, _sweep
from tokvis import fitting
from tokvis.cli import main
from tokvis.errors import WeightsError
from tokvis.store import load_run, verify_run

ROOT = Path(__file__).resolve().parents[2]


def _header(path: Path) -> tuple[int, dict]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8 : 8 + n])


def _flip_top_bits(path: Path, count: int = 64) -> str:
    """Flip bit 0x40 in the top byte of ``count`` float32 values of the first float32 tensor (as the campaign did)."""
    n, header = _header(path)
    name = next(k for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] == "F32")
    start, stop = header[name]["data_offsets"]
    blob = bytearray(path.read_bytes())
    for i in range(min(count, (stop - start) // 4)):
        blob[8 + n + start + 4 * i + 3] ^= 0x40
    path.write_bytes(bytes(blob))
    return name


def test_a_damaged_fitted_file_is_refused_on_load_and_by_record(tmp_path, capsys):
    path = _fit(tmp_path / "sit.safetensors")
    fitting.load_method(path)  # intact: loads
    _flip_top_bits(path)
    with pytest.raises(WeightsError, match="damaged"):
        fitting.load_method(path)
    with pytest.raises(WeightsError, match="damaged"):
        fitting.method_file_info(path)
    fails_cleanly(capsys, ["record", *TINY, "--fitted", str(path), *COMMON, "--out", str(tmp_path / "r")], "damaged")
    assert not (tmp_path / "r").exists()


def test_a_fitted_files_identity_is_its_content_not_its_header_order(tmp_path):
    a = _fit(tmp_path / "a.safetensors")
    b = _fit(tmp_path / "b.safetensors")  # a second fit with the same seed: the same tensors
    assert a.read_bytes() == b.read_bytes()  # a fit writes its keys in a fixed order
    # the same content with the header's keys in another order: another file SHA-256, the same identity
    n, header = _header(a)
    text = json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    blob = a.read_bytes()
    c = tmp_path / "c.safetensors"
    c.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])
    assert fitting.file_sha256(c) != fitting.file_sha256(a)
    assert fitting.method_file_info(c)["sha256"] == fitting.method_file_info(a)["sha256"]
    fitting.load_method(c)  # checksum holds
    # and the identity does depend on the content: another seed is another identity
    d = _fit(tmp_path / "d.safetensors", seed=1)
    assert fitting.method_file_info(d)["sha256"] != fitting.method_file_info(a)["sha256"]


def test_a_sweep_refits_a_deleted_file_and_accepts_its_own_runs(tmp_path, capsys):
    f = _sweep(tmp_path, 'keep_rates = [0.5]\nlocations = [1, 2]\n[fitted]\nsit = "fits/sit{keep_rate}"\n' + FIT_TABLE)
    assert main(["sweep", str(f), "--no-progress"]) == 0
    (tmp_path / "fits" / "sit0.5").unlink()
    capsys.readouterr()
    assert main(["sweep", str(f), "--no-progress"]) == 0  # refits, then finds its own runs complete
    said = capsys.readouterr()
    assert "fitting sit" in said.out and "already complete" in said.out, said
    assert main(["evaluate", str(tmp_path / "runs"), "--out", str(tmp_path / "m.csv")]) == 0
    assert "changed" not in capsys.readouterr().err


def test_version_is_not_0_1_0_and_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert tokvis.__version__ == project["version"] != "0.1.0"
    from tokvis.methods.base import Method

    assert isinstance(Method.decisions_version, int)


def _record(out, keep="0.5", extra=()):
    return main(["record", *TINY, "--method", "topk", "--keep-rate", keep, *COMMON, "--out", str(out), *extra])


@pytest.mark.parametrize("what", ["version", "decisions"])
def test_a_store_of_other_code_is_reported_stays_readable_and_a_rerun_is_refused(tmp_path, capsys, monkeypatch, what):
    from tokvis.methods import get_method_class

    out = tmp_path / "runs"
    with monkeypatch.context() as m:  # "older code": another version, or topk's decisions before a change
        if what == "version":
            m.setattr(tokvis, "__version__", "0.1.0")
        else:
            m.setattr(get_method_class("topk"), "decisions_version", 0, raising=False)
        assert _record(out) == 0
    (run_dir,) = out.iterdir()
    labels = load_run(run_dir).labels(3)  # readable
    rep = verify_run(run_dir)
    assert rep.status == "complete" and any("recorded by other code" in n for n in rep.notes), rep
    capsys.readouterr()
    line = fails_cleanly(capsys, ["record", *TINY, "--method", "topk", "--keep-rate", "0.5", *COMMON, "--out",
                                  str(out)], "recorded by other code")  # fmt: skip
    assert "Nothing was changed" in line
    np.testing.assert_array_equal(load_run(run_dir).labels(3), labels)  # untouched


def test_a_store_of_this_code_is_not_reported(tmp_path):
    out = tmp_path / "runs"
    assert _record(out) == 0
    (run_dir,) = out.iterdir()
    assert not any("other code" in n for n in verify_run(run_dir).notes)
    assert _record(out) == 0  # resumable: already complete


def test_a_manifest_copied_over_intact_shards_is_named_and_rebuilt(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _record(a, "0.5") == 0 and _record(b, "0.7") == 0
    (run_a,), (run_b,) = a.iterdir(), b.iterdir()
    labels = load_run(run_a).labels(3)
    shutil.copy(run_b / "manifest.json", run_a / "manifest.json")
    rep = verify_run(run_a)
    assert rep.status == "corrupt" and "does not match its shards" in rep.problems[0], rep
    assert "rebuilds it from them" in rep.problems[0]
    capsys.readouterr()
    assert _record(a, "0.5") == 0
    said = capsys.readouterr().out
    assert "does not match its shards" in said and "rebuilt" in said, said
    assert verify_run(run_a).status == "complete"
    np.testing.assert_array_equal(load_run(run_a).labels(3), labels)
    assert (run_a / "manifest.json.damaged").exists()


def test_verify_hash_inputs_checks_a_finished_runs_inputs_by_content(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{i}.png", compress_level=0)
    out = tmp_path / "runs"
    args = ["record", *TINY, "--method", "topk", "--keep-rate", "0.5", "--data", str(data), "--device", "cpu"]
    assert main([*args, "--no-progress", "--out", str(out), "--hash-inputs"]) == 0
    target = data / "1.png"
    st = target.stat()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(target, compress_level=0)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: size and mtime kept
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0  # size and mtime alone cannot see it (the documented limitation)
    assert main(["verify", "--hash-inputs", str(out)]) == 1
    said = capsys.readouterr().out
    assert "STALE" in said and "1.png" in said and "content hash differs" in said, said
