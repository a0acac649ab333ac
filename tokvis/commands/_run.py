"""Orchestration of recordings for ``tokvis record`` / ``tokvis sweep``: arguments, models, devices, torchrun.

The run store itself (:mod:`tokvis.store`) only writes what it is given; this module checks a
whole grid of runs before anything is recorded (:func:`check_grid`, :func:`check_options`),
records runs (:func:`execute`) on models rebuilt by :mod:`tokvis.store.models`, and sets up torchrun
(:func:`run_all`).  Private to :mod:`tokvis.commands` (not a command: ``tokvis.cli``
skips modules whose name starts with ``_``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from tokvis.distributed import resolve_device
from tokvis.store import RunConfigError, RunResult, RunSpec, record_run
from tokvis.store.models import build_model, fitted_fields, patch_for
from tokvis.validate import check_int


def check_options(*, out, batch_size, workers, threads, device) -> None:
    """Execution options of record / sweep, checked before any model is loaded."""
    check_int("batch size (--batch-size)", batch_size, minimum=1, error=RunConfigError)
    check_int("workers (--workers)", workers, minimum=0, error=RunConfigError)
    check_int("threads (--threads)", threads, minimum=0, error=RunConfigError)
    resolve_device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunConfigError(f"--out {out} is a file, not a folder; give a folder to hold the run directories")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunConfigError(f"--out {out}: {parent} is a file, not a folder")
            break


def check_backbone(name: str) -> None:
    """Raise unless ``name`` can name a model (without building it): cheap, no download."""
    import timm

    from tokvis import hf_zoo, zoo

    if not isinstance(name, str) or not name:
        raise RunConfigError(f"model must be a non-empty name: got {name!r}")
    if hf_zoo.is_hf_name(name):  # transformers installed, the folder there (the Hub is asked when it is built)
        hf_zoo.check_hf_name(name)
        return
    if name in zoo.list_offline() or name in zoo.HF_OFFLINE_MODELS or name.startswith(("hf-hub:", "hf_hub:")):
        return
    if zoo._looks_like_checkpoint(name):
        if not Path(name).is_file():
            raise RunConfigError(f"checkpoint file not found: {name}")
        return
    if not timm.is_model(name):
        raise zoo._unknown_model(name)


def check_grid(specs: Sequence[RunSpec]) -> None:
    """Every run of a grid is valid before the first is recorded: methods, their options, models, data.

    The schedule (keep rate in (0, 1], r, locations) is checked by :class:`RunSpec` itself.
    """
    from tokvis.datasets import open_dataset
    from tokvis.methods import create_method

    if not specs:
        raise RunConfigError("no runs to record")
    seen_methods, seen_models, seen_data = set(), set(), set()
    for spec in specs:
        key = (spec.method, json.dumps(spec.method_options, sort_keys=True))
        if key not in seen_methods:
            create_method(spec.method, **spec.method_options)  # UnknownMethodError / MethodOptionError
            seen_methods.add(key)
        if spec.backbone not in seen_models:
            check_backbone(spec.backbone)
            seen_models.add(spec.backbone)
        if spec.fitted is not None:  # the file is still there and still the one hashed into the run
            now = fitted_fields(
                spec.fitted, method=spec.method, keep_rate=spec.keep_rate, r=spec.r, locations=spec.locations,
                method_options=spec.method_options, where="fitted file",
            )  # fmt: skip
            if now["fitted_sha256"] != spec.fitted_sha256:
                raise RunConfigError(
                    f"fitted file {spec.fitted} changed since the run was set up (SHA-256 {now['fitted_sha256'][:12]}"
                    f"..., expected {spec.fitted_sha256[:12]}...); set the run up again"
                )
        if spec.dataset not in seen_data:
            open_dataset(spec.dataset, name=spec.dataset_name)  # lists files only; reads no image
            seen_data.add(spec.dataset)


def execute(
    spec: RunSpec,
    out: str | os.PathLike,
    *,
    model=None,
    batch_size: int = 32,
    device: str = "cpu",
    skip_bad: bool = False,
    workers: int = 0,
    hash_inputs: bool = False,
    progress: bool = True,
    ctx=None,
    log=print,
) -> RunResult:
    """Create (or reuse) the model, patch it with ``spec``'s method, open the dataset, :func:`record_run`.

    ``model``, when given, must be the unpatched backbone ``spec`` names; it is patched for the
    run and unpatched afterwards (sweeps reuse one model across methods).
    """
    import tokvis
    from tokvis.datasets import open_dataset

    dataset = open_dataset(spec.dataset, name=spec.dataset_name)
    if spec.limit is not None:
        dataset = dataset.subset(int(spec.limit))
    if model is None:
        model = build_model(spec)
    patch_for(model, spec)
    try:
        return record_run(
            model, dataset, spec, out, batch_size=batch_size, device=resolve_device(device, ctx), skip_bad=skip_bad,
            workers=workers, hash_inputs=hash_inputs, progress=progress, ctx=ctx, log=log,
        )  # fmt: skip
    finally:
        tokvis.unpatch(model)


def run_all(specs, *, out, batch_size, device, skip_bad, workers, threads, progress, hash_inputs=False) -> list:
    """Check everything, then record every spec (one backbone in memory at a time); the results."""
    import torch
    from tqdm import tqdm

    from tokvis import distributed as D

    check_options(out=out, batch_size=batch_size, workers=workers, threads=threads, device=device)
    check_grid(specs)
    if threads:
        torch.set_num_threads(threads)
    ctx = D.setup(device=resolve_device(device, None))
    log = print if ctx.is_main else (lambda *a, **k: None)
    rows = []
    try:
        models: dict[str, Any] = {}
        bar = tqdm(specs, desc="runs", unit="run", disable=not progress or not ctx.is_main or len(specs) < 2)
        for spec in bar:
            key = json.dumps([spec.backbone, spec.pretrained, spec.model_kwargs, spec.seed], sort_keys=True)
            if key not in models:
                models.clear()  # one backbone in memory at a time
                models[key] = build_model(spec)
            t0 = time.perf_counter()
            res = execute(
                spec, out, model=models[key], batch_size=batch_size, device=device, skip_bad=skip_bad,
                workers=workers, hash_inputs=hash_inputs, progress=progress, ctx=ctx, log=log,
            )  # fmt: skip
            if res.status != "already complete":
                log(f"{res.path}: {res.status}, {res.num_images} images in {res.num_shards} shards "
                    f"({res.shards_recorded} written by this process, {time.perf_counter() - t0:.1f} s)")  # fmt: skip
            rows.append(res)
    finally:
        D.teardown(ctx)
    return rows if ctx.is_main else []
