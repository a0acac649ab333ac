"""Run stores: round trip of every stored field, lazy == eager, resume, corruption, datasets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import tokvis
from tests.models import make_model
from tokvis.data import transform_for
from tokvis.datasets import Dataset, open_dataset
from tokvis.errors import DataError
from tokvis.store import (
    RunConfigError,
    RunSpec,
    StoreError,
    load_run,
    record_run,
    verify_run,
    verify_tree,
)
from tokvis.store.format import write_manifest

N_IMAGES, SHARD, BATCH = 10, 4, 2


def _pil_images(n, seed=0, size=64):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _dataset(n=N_IMAGES):
    imgs = _pil_images(n)
    return Dataset(name="synthetic", spec="synthetic", ids=[f"img{i:02d}" for i in range(n)], loader=lambda i: imgs[i])


def _spec(**kw):
    base = dict(backbone="tiny", method="topk", dataset="synthetic", keep_rate=0.7, shard_size=SHARD, cls=True)
    return RunSpec(**{**base, **kw})


def _record(tmp_path, method="topk", *, dataset=None, log=lambda *a: None, hash_inputs=False, **kw):
    model = make_model("cls")
    kr = kw.pop("keep_rate", 0.7)
    tokvis.patch(model, method, keep_rate=kr)
    try:
        return record_run(
            model,
            dataset or _dataset(),
            _spec(method=method, keep_rate=kr, **kw),
            tmp_path,
            batch_size=BATCH,
            progress=False,
            log=log,
            hash_inputs=hash_inputs,
        ), model
    finally:
        tokvis.unpatch(model)


def _eager(model, method, keep_rate=0.7, n=N_IMAGES):
    """Traces and class tokens from run_with_trace with the same batches as the store."""
    imgs = _pil_images(n)
    tf = transform_for(model)
    x = torch.stack([tf(im) for im in imgs])
    tokvis.patch(model, method, keep_rate=keep_rate)
    traces, feats = [], []
    hooks = [b.register_forward_hook(lambda m, a, o: feats.append(o[:, 0])) for b in model.blocks]
    try:
        for s in range(0, n, SHARD):
            for b in range(s, min(s + SHARD, n), BATCH):
                ids = [f"img{i:02d}" for i in range(b, min(b + BATCH, s + SHARD, n))]
                _, tr = tokvis.run_with_trace(model, x[b : b + len(ids)], image_ids=ids, dataset="synthetic")
                traces.append(tr)
    finally:
        for h in hooks:
            h.remove()
        tokvis.unpatch(model)
    depth = len(model.blocks)
    cls = torch.stack([torch.stack(feats[i : i + depth], 1) for i in range(0, len(feats), depth)])
    return tokvis.Trace.concat(traces), torch.cat(list(cls)).numpy()


@pytest.mark.parametrize("method", ["topk", "tome", "evit"])
def test_round_trip_and_lazy_equals_eager(tmp_path, method):
    res, model = _record(tmp_path, method)
    assert res.status == "recorded" and res.num_images == N_IMAGES and res.num_shards == 3
    run = load_run(res.path)
    eager, cls = _eager(model, method)
    assert run.image_ids == eager.image_ids and run.num_images == N_IMAGES
    assert run.layers == eager.layers and run.grid_size == eager.grid_size
    for layer in (-1, *range(len(model.blocks))):
        lab = run.labels(layer)
        assert lab.dtype == np.int16  # at most 2 bytes per patch per recorded layer
        np.testing.assert_array_equal(lab, eager.labels(layer).numpy())
        np.testing.assert_array_equal(run.kept(layer), eager.kept(layer).numpy())
    np.testing.assert_array_equal(run.depth(), eager.depth().numpy())
    np.testing.assert_array_equal(run.cls_features(), cls)
    # shard by shard, memory-mapped
    parts = list(run.iter_shards())
    assert isinstance(parts[0].array("labels"), np.memmap)
    np.testing.assert_array_equal(np.concatenate([s.depth() for s in parts]), eager.depth().numpy())
    # decisions rebuilt from the store equal the recorded ones, every stored field
    rebuilt = run.trace()
    for a, b in zip(rebuilt.decisions, eager.decisions, strict=True):
        assert (a.layer, a.kind, a.n_out) == (b.layer, b.kind, b.n_out)
        assert torch.equal(a.dst, b.dst) and torch.equal(a.keep, b.keep)
        for name in ("score", "weight"):
            ta, tb = getattr(a, name), getattr(b, name)
            assert (ta is None) == (tb is None)
            if ta is not None:
                assert torch.equal(ta, tb.float())
    assert rebuilt.meta.method == eager.meta.method and rebuilt.meta.keep_rate == 0.7
    assert rebuilt.meta.dataset == "synthetic" and rebuilt.image_ids == eager.image_ids
    m = json.loads((res.path / "manifest.json").read_text())
    assert {"tokvis", "torch", "timm"} <= set(m["versions"]) and m["complete"]
    assert [e["index"] for e in m["shards"]] == [0, 1, 2]


@pytest.mark.parametrize("soft", [True, False])
def test_vomix_query_mixing_is_stored_with_soft_only(tmp_path, soft):
    """VoMix (residual="drop") records its query mixing as query_soft: a run store keeps it with soft=True (as it
    keeps soft assignments) and holds none without; the decisions (labels) are the same either way."""
    res, model = _record(tmp_path, "vomix", soft=soft)
    eager, _ = _eager(model, "vomix")
    rebuilt = load_run(res.path).trace()
    assert rebuilt.layers == eager.layers and eager.decisions
    for a, b in zip(rebuilt.decisions, eager.decisions, strict=True):
        assert a.kind == b.kind == "prune" and torch.equal(a.dst, b.dst) and b.query_soft is not None
        if soft:
            assert torch.equal(a.query_soft, b.query_soft.float())
        else:
            assert a.query_soft is None
    for layer in rebuilt.layers:
        assert torch.equal(rebuilt.labels(layer), eager.labels(layer))


def test_rerun_complete_does_nothing_and_config_change_is_an_error(tmp_path):
    res, _ = _record(tmp_path)
    before = {p.name: p.read_bytes() for p in res.path.iterdir()}
    again, _ = _record(tmp_path)
    assert again.status == "already complete" and again.shards_recorded == 0
    with pytest.raises(RunConfigError, match="different configuration.*scores"):
        _record(tmp_path, scores=False)  # same directory name, other content
    with pytest.raises(RunConfigError, match="image list differs"):
        _record(tmp_path, dataset=_dataset(N_IMAGES - 1))
    assert {p.name: p.read_bytes() for p in res.path.iterdir()} == before


def test_resume_adopts_uncommitted_shard_and_completes_identically(tmp_path):
    ref, _ = _record(tmp_path / "ref")
    res, _ = _record(tmp_path / "cut")
    # simulate a kill: shard 1 renamed into place but the manifest not yet updated; shard 2 never written
    m = json.loads((res.path / "manifest.json").read_text())
    m["shards"] = m["shards"][:1]
    write_manifest(res.path, m)  # as the writer would have (checksummed), before committing shard 1
    (res.path / "shard-00002.safetensors").unlink()
    (res.path / "shard-00003.safetensors.abc.tmp").write_bytes(b"half")  # leftover of an interrupted write
    rep = verify_run(res.path)
    assert rep.status == "incomplete" and any("not yet in the manifest" in n for n in rep.notes)
    with pytest.raises(StoreError, match="incomplete"):
        load_run(res.path)
    partial = load_run(res.path, allow_incomplete=True)
    assert partial.num_images == SHARD
    again, _ = _record(tmp_path / "cut")
    assert again.status == "resumed" and again.shards_recorded == 1  # only shard 2 recomputed
    for name in ("manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (res.path / name).read_bytes() == (ref.path / name).read_bytes(), name
    assert (res.path / "shard-00003.safetensors.abc.tmp").exists()  # nothing deleted
    ids = load_run(res.path).image_ids
    assert len(ids) == len(set(ids)) == N_IMAGES


def _files(path):
    return sorted(p.name for p in path.iterdir())


def test_corrupt_truncated_missing_and_mismatch(tmp_path):
    res, _ = _record(tmp_path / "runs")
    root = tmp_path / "runs"
    good = res.path
    assert verify_run(good).status == "complete"

    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    shard = corrupt / "shard-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0xFF
    shard.write_bytes(bytes(blob))
    rep = verify_run(corrupt)
    assert rep.status == "corrupt" and any("checksum" in p for p in rep.problems)
    run = load_run(corrupt)
    with pytest.raises(StoreError, match="checksum"):
        run.labels(run.layers[-1])

    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    shard = truncated / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert verify_run(truncated).status == "corrupt"
    with pytest.raises(StoreError, match="truncated"):
        load_run(truncated)

    missing = root / "missing"
    shutil.copytree(good, missing)
    (missing / "manifest.json").unlink()
    rep = verify_run(missing)
    assert rep.status == "corrupt" and "no manifest.json" in rep.problems[0]
    with pytest.raises(StoreError, match="no manifest.json"):
        load_run(missing)

    mismatch = root / "mismatch"
    shutil.copytree(good, mismatch)
    m = json.loads((mismatch / "manifest.json").read_text())
    m["shards"][1]["image_ids"] = list(reversed(m["shards"][1]["image_ids"]))
    (mismatch / "manifest.json").write_text(json.dumps(m))
    rep = verify_run(mismatch)
    assert rep.status == "corrupt" and any("mismatch" in p for p in rep.problems)
    with pytest.raises(StoreError, match="mismatch"):
        load_run(mismatch).depth()

    before = {d.name: _files(d) for d in root.iterdir()}
    reports = {r.path.name: r.status for r in verify_tree(root)}
    assert reports == {
        good.name: "complete",
        "corrupt": "corrupt",
        "truncated": "corrupt",
        "missing": "corrupt",
        "mismatch": "corrupt",
    }
    assert {d.name: _files(d) for d in root.iterdir()} == before  # nothing deleted


def test_missing_manifest_is_rebuilt_from_the_shards_of_this_configuration(tmp_path):
    res, _ = _record(tmp_path)
    before = (res.path / "manifest.json").read_bytes()
    (res.path / "manifest.json").unlink()
    logs = []
    again, _ = _record(tmp_path, log=logs.append)
    assert again.status == "repaired" and again.shards_recorded == 0
    assert any("rebuilt" in line for line in logs)
    assert (res.path / "manifest.json").read_bytes() == before
    assert verify_run(res.path).status == "complete"


def test_shards_of_another_configuration_without_manifest_are_refused(tmp_path):
    res, _ = _record(tmp_path)
    (res.path / "manifest.json").rename(tmp_path / "saved.json")
    files = {p.name: p.read_bytes() for p in res.path.iterdir()}
    with pytest.raises(StoreError, match="another configuration; refusing to overwrite"):
        _record(tmp_path, scores=False)
    assert {p.name: p.read_bytes() for p in res.path.iterdir()} == files  # nothing changed


def test_amp_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(RunConfigError, match="CUDA"):
        _record(tmp_path, amp=True)


def test_spec_validation():
    with pytest.raises(RunConfigError, match="exactly one"):
        RunSpec(backbone="b", method="m", dataset="d")
    with pytest.raises(RunConfigError, match="keep_rate"):
        RunSpec(backbone="b", method="m", dataset="d", keep_rate=1.5)
    assert (
        RunSpec(backbone="x/y.pth", method="tome", dataset="d", r=8).dir_name("my data") == "y.pth__tome__r8__my-data"
    )


# ---------------------------------------------------------------------------------------------- datasets


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_imagefolder_flat_and_builtin_datasets(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    _write(tmp_path / "folder" / "dog" / "b.png", rgb)
    _write(tmp_path / "folder" / "cat" / "a.png", rgb)
    _write(tmp_path / "folder" / "cat" / "c.jpg", rgb)
    ds = open_dataset(tmp_path / "folder")
    assert ds.name == "folder" and ds.ids == ["cat/a.png", "cat/c.jpg", "dog/b.png"]
    assert ds.labels == [0, 0, 1] and ds.classes == ["cat", "dog"]
    tiny = r"is 8x8 pixels: its short side is only 8 px, so the model's transform will upscale it extremely"
    with pytest.warns(UserWarning, match=tiny):  # 8x8 files keep the test fast; reading one warns
        assert ds.load(2).mode == "RGB"
    _write(tmp_path / "flat" / "x.png", rgb[..., 0])  # grey converts to RGB
    flat = open_dataset(tmp_path / "flat", name="flatty")
    assert flat.name == "flatty" and flat.ids == ["x.png"] and flat.labels is None
    with pytest.warns(UserWarning, match=tiny):
        assert flat.load(0).mode == "RGB"
    digits = open_dataset("digits")
    assert len(digits) == 1797 and digits.labels[:3] == [0, 1, 2] and digits.load(5).size == (8, 8)
    assert open_dataset("samples").ids == tokvis.data.sample_names()
    with pytest.raises(DataError, match="unknown dataset"):
        open_dataset("nope")
    _write(tmp_path / "mixed" / "a" / "x.png", rgb)
    _write(tmp_path / "mixed" / "y.png", rgb)
    with pytest.raises(DataError, match="loose images"):
        open_dataset(tmp_path / "mixed")


def test_bad_files_error_or_skip(tmp_path):
    folder = tmp_path / "imgs"
    _pil = _pil_images(5)
    for i, im in enumerate(_pil):
        _write(folder / f"{i}.png", np.asarray(im))
    (folder / "2.png").write_bytes(b"not an image")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(folder / "4.png")  # 16-bit grey
    ds = open_dataset(folder)
    with pytest.raises(DataError, match="2.png"):
        ds.load(2)
    with pytest.raises(DataError, match="4.png.*mode"):
        ds.load(4)
    assert ds.load(2, skip_bad=True) is None
    spec = _spec(dataset=str(folder), cls=False)
    model = make_model("cls")
    tokvis.patch(model, "topk", keep_rate=0.7)
    try:
        with pytest.raises(DataError, match="2.png"):
            record_run(model, ds, spec, tmp_path / "a", batch_size=2, progress=False, log=lambda *a: None)
        res = record_run(
            model, ds, spec, tmp_path / "a", batch_size=2, skip_bad=True, progress=False, log=lambda *a: None
        )
    finally:
        tokvis.unpatch(model)
    assert [s["id"] for s in res.skipped] == ["2.png", "4.png"] and "2.png" in res.skipped[0]["error"]
    run = load_run(res.path)
    assert run.image_ids == ["0.png", "1.png", "3.png"] and run.labels(5).shape == (3, 64)


@pytest.mark.parametrize("method", ["topk", "tome"])
def test_compare_accepts_lazy_runs(tmp_path, method):
    """analysis.compare reads run stores lazily and gives the same table as on eager traces."""
    from tokvis.analysis import compare

    (res_a, _), (res_b, _) = (_record(tmp_path / f"k{k}", method, keep_rate=k) for k in (0.7, 0.5))
    runs = [tokvis.load_run(res_a.path), tokvis.load_run(res_b.path)]
    lazy = compare(runs, by="keep_rate")
    eager = compare([r.trace() for r in runs], by="keep_rate")
    assert len(lazy) > 0
    if method == "topk":
        assert set(lazy.metric) == {"iou", "ioa"}
    else:
        assert "v_measure" in set(lazy.metric) and "iou" not in set(lazy.metric)
    np.testing.assert_allclose(lazy.value.to_numpy(), eager.value.to_numpy())
    assert list(lazy.image_id) == list(eager.image_id)


# ----------------------------------------------------------------------------------------------
# issue 9: repair, metadata checksums, input fingerprints, umask, the lock
# ----------------------------------------------------------------------------------------------


def _flip_byte(path, offset=-3):
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_rerun_repairs_exactly_the_damaged_and_missing_shards(tmp_path):
    ref, _ = _record(tmp_path / "ref")
    res, _ = _record(tmp_path / "bad")
    _flip_byte(res.path / "shard-00001.safetensors")
    (res.path / "shard-00002.safetensors").unlink()
    untouched = (res.path / "shard-00000.safetensors").stat().st_mtime_ns
    assert verify_run(res.path).status == "corrupt"
    logs = []
    again, _ = _record(tmp_path / "bad", log=logs.append)
    assert again.status == "repaired" and again.shards_recorded == 2
    text = "\n".join(logs)
    assert "shard 1: " in text and "checksum" in text and "shard 2: " in text and "missing" in text
    assert "nothing to do" not in text
    assert (res.path / "shard-00001.safetensors.damaged").exists()  # set aside, not deleted
    assert (res.path / "shard-00000.safetensors").stat().st_mtime_ns == untouched  # not rewritten
    for name in ("manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (res.path / name).read_bytes() == (ref.path / name).read_bytes(), name
    rep = verify_run(res.path)
    assert rep.status == "complete" and any("set aside" in n for n in rep.notes)
    third, _ = _record(tmp_path / "bad")
    assert third.status == "already complete"


def _edit_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


_MANIFEST_EDITS = {
    "config.keep_rate": lambda m: m["config"].update(keep_rate=0.5),
    "meta.method": lambda m: m["meta"].update(method="tome"),
    "meta.grid_size": lambda m: m["meta"].update(grid_size=[m["meta"]["grid_size"][0] + 1, 1]),
    "duplicate entry": lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])),
    "deleted entry, complete kept": lambda m: m["shards"].pop(1),
    "image ids": lambda m: m["shards"][0]["image_ids"].reverse(),
}


@pytest.mark.parametrize("edit", list(_MANIFEST_EDITS))
def test_manifest_edits_are_corrupt_for_verify_and_load_run(tmp_path, edit):
    res, _ = _record(tmp_path)
    _edit_manifest(res.path, _MANIFEST_EDITS[edit])
    rep = verify_run(res.path)
    assert rep.status == "corrupt" and rep.problems
    with pytest.raises(StoreError, match="manifest"):
        load_run(res.path)


@pytest.mark.parametrize("edit", ["config.keep_rate", "duplicate entry"])
def test_manifest_edits_are_corrupt_even_with_a_recomputed_checksum(tmp_path, edit):
    """Consistency checks beyond the checksum: the config hash, unique entries."""
    res, _ = _record(tmp_path)
    m = json.loads((res.path / "manifest.json").read_text())
    _MANIFEST_EDITS[edit](m)
    write_manifest(res.path, m)
    assert verify_run(res.path).status == "corrupt"
    with pytest.raises(StoreError):
        load_run(res.path)


def test_rerun_rebuilds_an_edited_manifest(tmp_path):
    res, _ = _record(tmp_path)
    before = (res.path / "manifest.json").read_bytes()
    _edit_manifest(res.path, _MANIFEST_EDITS["meta.method"])
    again, _ = _record(tmp_path)
    assert again.status == "repaired" and again.shards_recorded == 0
    assert (res.path / "manifest.json").read_bytes() == before
    assert (res.path / "manifest.json.damaged").exists()
    assert load_run(res.path).meta.method == "topk"


def test_edited_shard_header_is_corrupt(tmp_path):
    """A shard's header (metadata, layer kinds) is checked against the manifest at open, not only by checksum."""
    from safetensors.numpy import load_file, save_file

    res, _ = _record(tmp_path)
    path = res.path / "shard-00001.safetensors"
    from tokvis.store.format import read_shard_index

    info = read_shard_index(path)[0]
    info["meta"]["grid_size"] = [1, info["meta"]["grid_size"][0] * info["meta"]["grid_size"][1]]
    save_file(load_file(str(path)), str(path), metadata={"tokvis": json.dumps(info, sort_keys=True)})
    assert verify_run(res.path).status == "corrupt"
    with pytest.raises(StoreError):
        load_run(res.path, check=False)  # even without checksums


def test_old_version_1_store_is_still_read(tmp_path):
    res, _ = _record(tmp_path)
    m = json.loads((res.path / "manifest.json").read_text())
    m["version"] = 1
    del m["manifest_sha256"]
    (res.path / "manifest.json").write_text(json.dumps(m))
    rep = verify_run(res.path)
    assert rep.status == "complete" and any("older tokvis" in n for n in rep.notes)
    assert load_run(res.path).num_images == N_IMAGES


def _png_folder(root, n=N_IMAGES, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(_pil_images(n, seed=seed)):
        im.save(root / f"img{i:02d}.png")
    return root


def test_changed_input_is_recorded_again_and_named(tmp_path):
    folder = _png_folder(tmp_path / "images")
    res, _ = _record(tmp_path / "runs", dataset=open_dataset(folder))
    old = load_run(res.path).labels(5)
    target = folder / "img05.png"  # shard 1 (shard size 4)
    _pil_images(1, seed=42, size=72)[0].save(target)
    logs = []
    again, _ = _record(tmp_path / "runs", dataset=open_dataset(folder), log=logs.append)
    assert again.status == "repaired" and again.shards_recorded == 1
    assert any("img05.png" in line and "changed" in line for line in logs)
    assert (res.path / "shard-00001.safetensors.stale").exists()
    # the new pixels are recorded: equal to a fresh recording of the changed folder
    fresh, _ = _record(tmp_path / "fresh", dataset=open_dataset(folder))
    new = load_run(res.path)
    np.testing.assert_array_equal(new.labels(5), load_run(fresh.path).labels(5))
    assert not np.array_equal(new.labels(5)[5], old[5]) or not np.array_equal(new.depth()[5], old[5])


def test_changed_input_after_an_interruption_is_recorded_again(tmp_path):
    """kill after shard 1, overwrite an image of shard 0, resume: shard 0 is recorded again too."""
    folder = _png_folder(tmp_path / "images")
    res, _ = _record(tmp_path / "runs", dataset=open_dataset(folder))
    m = json.loads((res.path / "manifest.json").read_text())
    m["shards"] = m["shards"][:2]
    write_manifest(res.path, m)
    (res.path / "shard-00002.safetensors").unlink()
    _pil_images(1, seed=7)[0].save(folder / "img01.png")
    logs = []
    again, _ = _record(tmp_path / "runs", dataset=open_dataset(folder), log=logs.append)
    assert again.shards_recorded == 2 and any("img01.png" in line for line in logs)
    fresh, _ = _record(tmp_path / "fresh", dataset=open_dataset(folder))
    np.testing.assert_array_equal(load_run(res.path).depth(), load_run(fresh.path).depth())


def test_content_hash_ignores_a_touch_but_not_a_change(tmp_path):
    folder = _png_folder(tmp_path / "images")
    res, _ = _record(tmp_path / "runs", dataset=open_dataset(folder), hash_inputs=True)
    target = folder / "img02.png"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    again, _ = _record(tmp_path / "runs", dataset=open_dataset(folder))
    assert again.status == "already complete"
    blob = target.read_bytes()
    _pil_images(1, seed=9)[0].save(target)
    assert target.read_bytes() != blob
    logs = []
    third, _ = _record(tmp_path / "runs", dataset=open_dataset(folder), log=logs.append)
    assert third.shards_recorded == 1 and any("img02.png" in line and "content" in line for line in logs)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_store_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        res, _ = _record(tmp_path)
    finally:
        os.umask(old)
    files = list(res.path.iterdir())
    assert files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


def _hold_lock(run_dir, ready):
    import time

    from tokvis.store import RunLock

    with RunLock(run_dir, log=lambda *a: None):
        ready.set()
        time.sleep(120)  # killed by the test (never wait on a shared Condition here: a killed waiter deadlocks it)


def test_second_writer_gets_a_clear_lock_error_and_a_dead_holder_is_taken_over(tmp_path):
    import multiprocessing as mp

    from tokvis.store import RunLock, RunLockedError

    run_dir = tmp_path / "run"
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(run_dir, ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid} on host .*since"):
            RunLock(run_dir).acquire()
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: its lock file stays behind
        holder.join(30)
        assert (run_dir / ".tokvis.lock").exists()
        logs = []
        with RunLock(run_dir, log=logs.append):
            assert any(f"pid {holder.pid}" in line and "took over" in line for line in logs)
        assert not (run_dir / ".tokvis.lock").exists()
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join(30)


def test_record_into_a_locked_run_changes_nothing(tmp_path):
    from tokvis.store import RunLock, RunLockedError

    res, _ = _record(tmp_path)
    _flip_byte(res.path / "shard-00001.safetensors")  # would be repaired by a writer holding the lock
    files = {p.name: p.read_bytes() for p in res.path.iterdir()}
    with RunLock(res.path, log=lambda *a: None):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            _record(tmp_path)
        assert any(f'"pid": {os.getpid()}' in n for n in verify_run(res.path).notes)  # verify names the holder
        assert {p.name: p.read_bytes() for p in res.path.iterdir() if p.name != ".tokvis.lock"} == files
