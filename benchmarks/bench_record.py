"""Recording at scale: throughput against plain inference, store size, lazy reading of a large store.

Run::

    python benchmarks/bench_record.py [--batch-size 32] [--batches 3] [--images 5000] [--model dinov2_small_offline]

Prints (i) images/s of the patched model with and without the run-store recording path
(record context, composition to int16 maps, shard write), (ii) store bytes per image and
(iii) seconds to open a synthetic ``--images`` store lazily and compute a keep-frequency map
from it shard by shard.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="dinov2_small_offline")
    p.add_argument("--method", default="tome")
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    import tokvis
    from tokvis import data, zoo
    from tokvis.bench import SPREAD_WARNING
    from tokvis.store import _shard_arrays, _write_shard, load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = zoo.create(args.model)
    imgs, _ = data.load_images(model)
    x = imgs.repeat(-(-args.batch_size // len(imgs)), 1, 1, 1)[: args.batch_size]
    tokvis.patch(model, args.method, keep_rate=args.keep_rate)
    tmp = Path(tempfile.mkdtemp(prefix="bench_record_"))
    try:

        def plain_pass(b):
            model(x)

        def record_pass(b):
            with tokvis.record(model, image_ids=[f"i{b}_{j}" for j in range(len(x))]) as rec:
                model(x)
            arrays, layers = _shard_arrays(rec.trace, None, soft=False)
            _write_shard(tmp / f"shard-{b:05d}.safetensors", arrays, {"layers": layers})
            return rec

        with torch.inference_mode():
            times = {"plain": [], "record": []}
            for b in range(-1, args.batches):  # round -1 warms up both paths; then interleaved rounds
                for name, fn in (("plain", plain_pass), ("record", record_pass)):
                    t0 = time.perf_counter()
                    res = fn(max(b, 0))
                    if b >= 0:
                        times[name].append(time.perf_counter() - t0)
                    if name == "record":
                        rec = res
        plain, rec_t = times["plain"], times["record"]
        ips_plain = len(x) / float(np.median(plain))
        ips_rec = len(x) / float(np.median(rec_t))
        size = (tmp / "shard-00000.safetensors").stat().st_size / len(x)
        print(
            f"model {args.model} {args.method} keep_rate={args.keep_rate}, batch {len(x)}, "
            f"{torch.get_num_threads()} threads, {args.batches} interleaved rounds after one warm-up round"
        )
        for label, t in (("plain inference ", plain), ("record + store  ", rec_t)):
            print(
                f"{label} {len(x) / float(np.median(t)):8.2f} img/s (min {len(x) / max(t):.2f}, "
                f"max {len(x) / min(t):.2f})"
            )
        print(f"ratio record/plain {ips_rec / ips_plain:.3f} (target >= 0.95)")
        for label, t in (("plain", plain), ("record", rec_t)):
            if max(t) / min(t) > SPREAD_WARNING:
                print(
                    f"warning: {label}: rounds differ by {max(t) / min(t):.2f}x (> {SPREAD_WARNING:g}): the machine "
                    "was busy, the figures are not trustworthy; rerun on an idle machine or with more --batches"
                )
        print(f"store size       {size:8.0f} bytes/image (labels, kept, depth, dst, keep, scores; no CLS features)")

        # a synthetic 5,000-image store: the recorded batch repeated, written through the real writer
        from tokvis.store import RunSpec

        trace = rec.trace
        n = args.images
        ids = [f"img{i:05d}" for i in range(n)]
        spec = RunSpec(backbone=args.model, method=args.method, dataset="synthetic", keep_rate=args.keep_rate,
                       shard_size=1000)  # fmt: skip
        run_dir = _synthesize(tmp / "big", trace, ids, spec)
        t0 = time.perf_counter()
        run = load_run(run_dir)
        freq = np.zeros(run.num_patches)
        for shard in run.iter_shards():
            freq += shard.kept(run.layers[-1]).sum(0)
        freq /= run.num_images
        dt = time.perf_counter() - t0
        total = sum(p.stat().st_size for p in run_dir.iterdir()) / 1e6
        print(f"lazy read of {run.num_images} images ({total:.1f} MB, checksums verified) + keep frequency: {dt:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _synthesize(run_dir: Path, trace, ids, spec) -> Path:
    """Write a complete run store of len(ids) images by repeating one recorded batch."""
    from tokvis.store import (
        _config_hash,
        _entry,
        _ids_hash,
        _shard_arrays,
        _versions,
        _write_manifest,
        _write_shard,
        shard_file,
    )
    from tokvis.trace import Trace

    run_dir.mkdir(parents=True)
    config = spec.config("synthetic")
    S = spec.shard_size
    reps = -(-S // trace.num_images)
    block = Trace.concat([trace] * reps).select(range(S))
    arrays, layers = _shard_arrays(block, None, soft=False)
    meta = {**trace.meta.to_json(), "image_ids": None}
    m = {
        "format": "tokvis-run", "version": 1, "config": config, "config_hash": _config_hash(config),
        "versions": _versions(), "dataset": {"name": "synthetic"}, "num_images": len(ids),
        "ids_sha256": _ids_hash(ids), "shard_size": S, "num_shards": -(-len(ids) // S), "meta": meta, "shards": [],
    }  # fmt: skip
    for k in range(m["num_shards"]):
        sid = ids[k * S : (k + 1) * S]
        arr = {name: (a[:, : len(sid)] if a.ndim == 3 and name in ("labels", "kept") else a[: len(sid)])
               for name, a in arrays.items()}  # fmt: skip
        header = {"format": "tokvis-shard", "version": 1, "run": m["config_hash"], "index": k, "image_ids": sid,
                  "skipped": [], "layers": layers, "meta": meta}  # fmt: skip
        path = run_dir / shard_file(k)
        sha, size = _write_shard(path, arr, header)
        m["shards"].append(_entry(path, header, sha, size))
    _write_manifest(run_dir, m)
    return run_dir


if __name__ == "__main__":
    main()
