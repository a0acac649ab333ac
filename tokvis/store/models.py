"""Rebuilding a run's model: the backbone it was recorded on, patched with its method and schedule.

A run's manifest says how its model was made (:class:`~tokvis.store.RunSpec`: backbone name,
``pretrained``, model keyword arguments, seed, method, options, schedule and, for a fitted learned
method, the file and its SHA-256).  :func:`build_model` makes the unpatched backbone (seeded, so a
random-weight backbone is the same in every process and command), :func:`patch_for` patches it as
the run was recorded, :func:`run_spec` reads a loaded run's spec back.  ``tokvis record``, ``fit``
and ``evaluate`` build models through these functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokvis.store.format import RunConfigError, RunSpec, StoreError

__all__ = [
    "build_model",
    "create_backbone",
    "patch_for",
    "run_spec",
    "fitted_fields",
    "load_fitted",
    "seen_pixels",
    "check_fitted_backbone",
]


def run_spec(run) -> RunSpec:
    """The :class:`RunSpec` of a loaded run (:func:`tokvis.load_run`), read from its configuration."""
    fields = set(RunSpec.__dataclass_fields__)
    try:
        return RunSpec(**{k: v for k, v in run.config.items() if k in fields})
    except (TypeError, RunConfigError) as e:
        raise StoreError(f"{run.path}: its configuration cannot be read as a run ({e}); run `tokvis verify`") from e


def _as_spec(spec_or_run) -> RunSpec:
    return spec_or_run if isinstance(spec_or_run, RunSpec) else run_spec(spec_or_run)


def amp_context(spec, device) -> Any:
    """The autocast context a run records under (``spec.amp``: fp16 or bf16 autocast), for ``device``;
    a no-op without mixed precision.  Recording and evaluating a run both use it, so that an evaluation
    recomputes the decisions in the run's precision.

    Raises
    ------
    RunConfigError
        fp16 autocast (``amp=True`` / ``"fp16"``) on a device that is not CUDA.
    """
    import contextlib

    import torch

    if not spec.amp:
        return contextlib.nullcontext()
    dev = torch.device(device)
    if spec.amp is True and dev.type != "cuda":
        raise RunConfigError(
            f"--amp fp16 (mixed precision) needs a CUDA device, not {dev.type}: use --device cuda, or --amp bf16 "
            "(or no --amp) for the CPU"
        )
    return torch.autocast(dev.type, dtype=torch.bfloat16 if spec.amp == "bf16" else torch.float16)


def build_model(spec) -> Any:
    """The unpatched backbone of a :class:`RunSpec` or loaded run (seeded: random weights are the same in every
    process)."""
    spec = _as_spec(spec)
    return create_backbone(spec.backbone, pretrained=spec.pretrained, model_kwargs=spec.model_kwargs, seed=spec.seed)


def create_backbone(name: str, *, pretrained: bool = True, model_kwargs: dict | None = None, seed: int = 0):
    """``zoo.create`` seeded with ``seed`` first: the same random weights for ``record``, ``fit`` and ``evaluate``."""
    import torch

    from tokvis import zoo

    _check_model_kwargs(dict(model_kwargs or {}))
    torch.manual_seed(int(seed))
    try:
        return zoo.create(name, pretrained=bool(pretrained), **dict(model_kwargs or {}))
    except TypeError as e:
        raise RunConfigError(
            f"model {name!r} does not accept the model keyword arguments {json.dumps(model_kwargs)} "
            f"({e}); check their names and types (--model-kwargs / model_kwargs), e.g. img_size is a number: 64"
        ) from e


#: model keyword arguments that are counts (an int >= 1); img_size may also be [h, w]
_COUNT_KWARGS = ("depth", "img_size", "patch_size", "embed_dim", "num_heads", "num_classes", "in_chans")


def _check_model_kwargs(kwargs: dict) -> None:
    """The usual ViT keyword arguments have their type and range before timm sees them."""
    from tokvis.validate import check_int

    for key in _COUNT_KWARGS:
        if key not in kwargs:
            continue
        value = kwargs[key]
        values = value if key == "img_size" and isinstance(value, list) and len(value) == 2 else [value]
        minimum = 0 if key == "num_classes" else 1
        for v in values:
            check_int(f"model keyword argument {key} (--model-kwargs)", v, minimum=minimum, error=RunConfigError)


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
    """The fitted method of ``spec``, loaded after checking the file's content is still the one in the run.

    The identity is the content checksum (:func:`tokvis.identity.content_sha256`); runs recorded before
    content checksums named the SHA-256 of the file's bytes, which is accepted too.
    """
    from tokvis.errors import WeightsError
    from tokvis.fitting import file_sha256, load_method, method_file_info

    path = Path(str(spec.fitted))
    again = "rerun with the file it was recorded with, or record into another --out"
    if not path.is_file():
        raise RunConfigError(f"the fitted-method file {path} of this run is gone; {again}")
    try:
        info = method_file_info(path)
        method = load_method(path)
        after = method_file_info(path)["sha256"]
    except WeightsError as e:
        raise RunConfigError(f"the fitted-method file {path} of this run cannot be loaded: {e}") from e
    known = {info["sha256"], info["file_sha256"], file_sha256(path)}
    if after != info["sha256"] or spec.fitted_sha256 not in known:
        raise RunConfigError(
            f"the fitted-method file {path} changed (content SHA-256 {after[:12]}..., the run was set up with "
            f"{str(spec.fitted_sha256)[:12]}...); {again}"
        )
    return method


def check_fitted_backbone(method, model, *, path: Any = None, override: bool = False) -> None:
    """Raise unless ``model`` is the backbone the fitted ``method`` was fitted on (name, depth, width, grid).

    A method fitted before files recorded their backbone is not checked.  ``override`` (``--fitted-other-backbone``)
    allows another backbone.
    """
    from tokvis.identity import backbone_identity, describe_backbone

    fitted = (getattr(method, "fit_info", None) or {}).get("backbone")
    if override or not fitted:
        return
    here = backbone_identity(model)
    if {k: fitted.get(k) for k in here} != here:
        where = f"the fitted file {path}" if path is not None else "the fitted method"
        raise RunConfigError(
            f"{where} was fitted on {describe_backbone(fitted)}, but this run's backbone is {describe_backbone(here)}; "
            "its parameters fit only that backbone. Fit it on this backbone (tokvis fit), or pass "
            "--fitted-other-backbone (sweep: fitted_other_backbone = true) if you mean to use it here"
        )


def patch_for(model, spec) -> None:
    """Patch ``model`` with the method and schedule of a :class:`RunSpec` or loaded run (its fitted file, checked
    against its SHA-256, when it names one)."""
    spec = _as_spec(spec)
    import tokvis

    kw: dict[str, Any] = {} if spec.fitted is not None else dict(spec.method_options)
    if spec.locations is not None:
        kw["locations"] = list(spec.locations)
    method = load_fitted(spec) if spec.fitted is not None else spec.method
    if spec.fitted is not None:
        check_fitted_backbone(method, model, path=spec.fitted, override=spec.fitted_other_backbone)
    tokvis.patch(model, method, keep_rate=spec.keep_rate, r=spec.r, **kw)


_TRANSFORMS: dict[str, Any] = {}
_DATASETS: dict[str, Any] = {}


def _recording_transform(spec: RunSpec):
    """timm's evaluation transform of a run's model and its ``mean`` / ``std`` (one model build per configuration)."""
    key = json.dumps([spec.backbone, spec.pretrained, spec.model_kwargs, spec.seed], sort_keys=True, default=str)
    if key not in _TRANSFORMS:
        import timm.data
        import torch

        from tokvis.data import data_config

        # the transform depends on the architecture's data configuration, not on the weights: build without them,
        # on the meta device (no initialisation), and fall back to a plain build where that is not possible
        try:
            with torch.device("meta"):
                model = create_backbone(spec.backbone, pretrained=False, model_kwargs=spec.model_kwargs)
        except Exception:  # noqa: BLE001 - some architectures cannot be built on the meta device
            model = build_model(spec)
        cfg = data_config(model)
        _TRANSFORMS[key] = (timm.data.create_transform(**cfg, is_training=False), cfg["mean"], cfg["std"])
    return _TRANSFORMS[key]


def seen_pixels(run, positions) -> Any:
    """The pixels a run's model saw: its images reloaded from the run's dataset through the recording transform.

    The run's manifest names the dataset and the model (backbone, weights, keyword arguments), from which the
    recording's timm evaluation transform (resize, centre crop, normalisation; :func:`tokvis.data.transform_for`)
    is rebuilt; the normalised tensor the model received is mapped back to pixels.

    Parameters
    ----------
    run : tokvis.store.Run
        A loaded run (:func:`tokvis.load_run`).
    positions : sequence of int
        Image positions in the run (``run.image_ids[i]``).

    Returns
    -------
    numpy.ndarray
        uint8 ``[len(positions), H, W, 3]`` at the model's input size.

    Raises
    ------
    tokvis.errors.DataError
        The run's dataset cannot be opened here, or it no longer holds one of the images.
    """
    import numpy as np
    import torch

    from tokvis.datasets import open_dataset
    from tokvis.errors import DataError

    desc = run.manifest.get("dataset") or {}
    ds_spec = desc.get("spec")
    if not ds_spec:
        raise DataError(f"{run.path}: the manifest names no dataset to reload the images from")
    if ds_spec not in _DATASETS:
        ds = open_dataset(ds_spec)
        _DATASETS[ds_spec] = (ds, {i: k for k, i in enumerate(ds.ids)})
    ds, where = _DATASETS[ds_spec]
    transform, mean, std = _recording_transform(run_spec(run))
    ids = run.image_ids
    out = []
    for i in positions:
        image_id = ids[int(i)]
        if image_id not in where:
            raise DataError(f"dataset {ds_spec!r} no longer holds image {image_id!r} of run {run.path.name}")
        x = transform(ds.load(where[image_id]).convert("RGB"))
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        out.append((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
