"""Orchestration of recordings for ``tokvis record`` / ``tokvis sweep``: arguments, models, devices, torchrun.

The run store itself (:mod:`tokvis.store`) only writes what it is given; this module checks a
whole grid of runs before anything is recorded (:func:`check_grid`, :func:`check_options`),
builds and patches models (:func:`build_model`, :func:`execute`), resolves devices and sets up
torchrun (:func:`run_all`).  Private to :mod:`tokvis.commands` (not a command: ``tokvis.cli``
skips modules whose name starts with ``_``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from tokvis.store import RunConfigError, RunResult, RunSpec, record_run
from tokvis.validate import check_int


def resolve_device(device: str, ctx=None) -> str:
    """``cpu``, ``cuda``, ``cuda:<n>`` or ``auto`` as a torch device string for this process."""
    import torch

    if not isinstance(device, str) or (device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:")):
        raise RunConfigError(f"device must be cpu, cuda, cuda:<n> or auto: got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunConfigError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
        if device == "cuda" and ctx is not None and ctx.distributed:
            device = f"cuda:{ctx.local_rank}"
    return device


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

    from tokvis import zoo

    if not isinstance(name, str) or not name:
        raise RunConfigError(f"model must be a non-empty name: got {name!r}")
    if name in zoo.list_offline() or name.startswith(("hf-hub:", "hf_hub:")):
        return
    if zoo._looks_like_checkpoint(name):
        if not Path(name).is_file():
            raise RunConfigError(f"checkpoint file not found: {name}")
        return
    if not timm.is_model(name):
        raise zoo._unknown_model(name)


def _same_schedule(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return [int(v) for v in (a if isinstance(a, (list, tuple)) else [a])] == [
            int(v) for v in (b if isinstance(b, (list, tuple)) else [b])
        ]
    return abs(float(a) - float(b)) < 1e-9


def fitted_fields(
    path: str | os.PathLike,
    *,
    method: str | None,
    keep_rate: float | None,
    r: int | list[int] | None,
    locations: list[int] | None,
    method_options: dict[str, Any],
    where: str = "--fitted",
) -> dict[str, Any]:
    """The :class:`RunSpec` fields of a run that uses the fitted-method file ``path``, checked up front.

    The method name and options come from the file (``method`` / ``method_options``, when given,
    must agree with it); the run's schedule must be the one the file was fitted for (``fit_info``:
    keep rate or r, and locations; the fit's locations are used when the run gives none).  Returns
    ``method``, ``method_options``, ``locations``, ``fitted`` (absolute path) and ``fitted_sha256``.

    Raises
    ------
    RunConfigError
        Missing file, not a tokvis method file, another method, other options or another schedule.
    """
    from tokvis.errors import WeightsError
    from tokvis.fitting import method_file_info

    path = Path(path)
    fix = "fit one with `tokvis fit --method <name> --keep-rate <k> --out <file>`"
    if not path.is_file():
        raise RunConfigError(f"{where} {path}: no such file; {fix}")
    try:
        info = method_file_info(path)
    except WeightsError as e:
        raise RunConfigError(f"{where} {path}: {e}; {fix}") from e
    name = info["method"]
    if method is not None and method != name:
        raise RunConfigError(
            f"{where} {path} holds a fitted {name!r}, not {method!r}; give --method {name} (or leave --method out)"
        )
    for key, value in method_options.items():
        if key not in info["options"] or info["options"][key] != value:
            raise RunConfigError(
                f"{where} {path}: method option {key}={json.dumps(value)} differs from the fitted file's options "
                f"{json.dumps(info['options'], sort_keys=True)}; a fitted method's options come from its file: drop it"
            )
    fit = info["fit_info"] or {}
    if fit:
        ran = f"keep_rate {keep_rate:g}" if keep_rate is not None else f"r {r}"
        done = f"keep_rate {fit.get('keep_rate'):g}" if fit.get("keep_rate") is not None else f"r {fit.get('r')}"
        if not (_same_schedule(keep_rate, fit.get("keep_rate")) and _same_schedule(r, fit.get("r"))):
            raise RunConfigError(
                f"{where} {path} was fitted for {done}, but this run uses {ran}; record it with the {done.split()[0]} "
                f"it was fitted for, or fit one for {ran}"
            )
        fit_loc = fit.get("locations")
        if locations is not None and fit_loc is not None and [int(v) for v in locations] != list(fit_loc):
            raise RunConfigError(
                f"{where} {path} was fitted for locations {list(fit_loc)}, but this run uses {list(locations)}; "
                "drop --locations (the fit's are used) or fit for these locations"
            )
        if locations is None and fit_loc is not None:
            locations = [int(v) for v in fit_loc]
    return dict(
        method=name, method_options=dict(info["options"]), locations=locations,
        fitted=str(path.resolve()), fitted_sha256=info["sha256"],
    )  # fmt: skip


def load_fitted(spec: RunSpec):
    """The fitted method of ``spec``, loaded after checking the file is still the one hashed into the run."""
    from tokvis.errors import WeightsError
    from tokvis.fitting import file_sha256, load_method

    path = Path(str(spec.fitted))
    again = "rerun with the file it was recorded with, or record into another --out"
    if not path.is_file():
        raise RunConfigError(f"the fitted-method file {path} of this run is gone; {again}")
    try:
        before = file_sha256(path)
        method = load_method(path)
        after = file_sha256(path)
    except WeightsError as e:
        raise RunConfigError(f"the fitted-method file {path} of this run cannot be loaded: {e}") from e
    if before != spec.fitted_sha256 or after != spec.fitted_sha256:
        raise RunConfigError(
            f"the fitted-method file {path} changed (SHA-256 {after[:12]}..., the run was set up with "
            f"{str(spec.fitted_sha256)[:12]}...); {again}"
        )
    return method


def patch_for(model, spec: RunSpec) -> None:
    """Patch ``model`` with ``spec``'s method and schedule (its fitted file, when it names one)."""
    import tokvis

    kw: dict[str, Any] = {} if spec.fitted is not None else dict(spec.method_options)
    if spec.locations is not None:
        kw["locations"] = list(spec.locations)
    method = load_fitted(spec) if spec.fitted is not None else spec.method
    tokvis.patch(model, method, keep_rate=spec.keep_rate, r=spec.r, **kw)


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


def build_model(spec: RunSpec):
    """The unpatched backbone of ``spec`` (seeded, so random weights are the same in every process)."""
    return create_backbone(spec.backbone, pretrained=spec.pretrained, model_kwargs=spec.model_kwargs, seed=spec.seed)


def create_backbone(name: str, *, pretrained: bool = True, model_kwargs: dict | None = None, seed: int = 0):
    """``zoo.create`` seeded with ``seed`` first: the same random weights for ``record``, ``fit`` and ``evaluate``."""
    import torch

    from tokvis import zoo

    torch.manual_seed(int(seed))
    try:
        return zoo.create(name, pretrained=bool(pretrained), **dict(model_kwargs or {}))
    except TypeError as e:
        raise RunConfigError(
            f"model {name!r} does not accept the model keyword arguments {json.dumps(model_kwargs)} "
            f"({e}); check their names (--model-kwargs / model_kwargs), e.g. img_size"
        ) from e


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
