"""``tokvis record``, ``tokvis sweep`` and ``tokvis verify``: run stores at scale.

::

    tokvis record --model dinov2_small_offline --method tome --keep-rate 0.9 0.7 --data imagefolder/ --out runs/
    torchrun --nproc_per_node=2 -m tokvis record ...     # same store, work split by shards
    tokvis sweep sweep.toml                               # methods x keep rates / r x backbones x datasets
    tokvis verify runs/                                   # complete / incomplete / corrupt per run

Rerunning a record command resumes an interrupted run and repairs a damaged one (shards that
fail their checksum, are missing, or whose input files changed are recorded again; what was
repaired is printed).  One writer per run directory: a second one gets a clear error naming
the first (pid, host, since when).  ``tokvis verify`` exits 0 when every run found is complete
and valid, 1 when one is incomplete or corrupt, 2 when nothing was found or an argument is bad.

Tests and quick trials use a tiny random timm model::

    tokvis record --model vit_tiny_patch16_224 --no-pretrained --model-kwargs '{"img_size": 32}' ...

A sweep file (TOML)::

    out = "runs"
    backbones = ["dinov2_small_offline"]
    methods = ["tome", "topk"]
    keep_rates = [0.7, 0.5]        # and / or (a single number is read as a list of one)
    r = [8]
    datasets = ["samples", "digits", "/data/imagenet/val"]
    batch_size = 32                # optional: shard_size, device, amp, skip_bad, scores, cls, soft,
                                   # pretrained, model_kwargs, method_options, locations, limit, seed, workers,
                                   # threads, hash_inputs
    [method_options.tome]          # options per method: a table named after one of `methods`
    prop_attn = false
    [fitted]                       # fitted learned methods (`tokvis fit`), per method; {keep_rate} / {r} /
    sit = "fits/sit_keep{keep_rate}.safetensors"   # {backbone} are filled in per run (relative: the TOML's folder)
    [fit]                          # optional: fit a missing [fitted] file first, with tokvis fit's settings
    epochs = 3                     # images (256), held_out (32), epochs (3), lr (the method's), batch_size (16)

A fitted-method file (``tokvis record --fitted FILE`` or the sweep's ``[fitted]`` table) gives the
method its name, options and parameters; the run's keep rate / r (and locations) must be those it
was fitted for, and the file's SHA-256 is part of the run's configuration (another fit is another
run: refused in the same run directory).

Every run of a sweep is checked (methods and their options, keep rates in (0, 1], r, model
names, datasets) before the first one is recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_SWEEP_KEYS = {
    "out", "backbones", "methods", "keep_rates", "r", "datasets", "batch_size", "shard_size", "device", "amp",
    "skip_bad", "scores", "cls", "soft", "pretrained", "model_kwargs", "method_options", "locations", "limit",
    "seed", "workers", "threads", "hash_inputs", "fitted", "fit", "fitted_other_backbone",
}  # fmt: skip
#: the sweep's boolean keys and their defaults (TOML has booleans: "false" is not false)
_SWEEP_BOOLS = {
    "skip_bad": False, "scores": True, "cls": False, "soft": False, "pretrained": True, "hash_inputs": False,
    "fitted_other_backbone": False,
}  # fmt: skip
#: the sweep's [fit] table: settings of ``tokvis fit`` for a missing fitted file, and their defaults
_FIT_KEYS = {"images": 256, "held_out": 32, "epochs": 3, "lr": None, "batch_size": 16}


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"img_size\": 32}}': got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's choice)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--hash-inputs", action="store_true",
        help="fingerprint input files by content (SHA-256) too, not only size and modification time",
    )  # fmt: skip


def register(subparsers) -> None:
    r = subparsers.add_parser("record", help="record runs into resumable run stores (torchrun-aware)")
    r.add_argument(
        "--model",
        default="dinov2_small_offline",
        help="timm name, checkpoint, hf:<repo id or folder>, or dinov2_small_offline",
    )
    r.add_argument("--no-pretrained", action="store_true", help="random weights (seeded by --seed)")
    r.add_argument("--model-kwargs", type=_json_dict, default={}, help="JSON for zoo.create, e.g. '{\"img_size\": 32}'")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--method", nargs="+", default=None, help="one or more registered methods (or give --fitted)")
    r.add_argument(
        "--fitted", default=None, metavar="FILE",
        help="a fitted learned method (tokvis fit --out FILE): its method, options and parameters; the default "
        "schedule is the one it was fitted for",
    )  # fmt: skip
    r.add_argument(
        "--fitted-other-backbone", action="store_true",
        help="use the --fitted file on a backbone other than the one it was fitted on (otherwise an error)",
    )  # fmt: skip
    r.add_argument(
        "--keep-rate", nargs="*", type=float, default=[],
        help="keep rates, one run each; with --r too, runs of both kinds are recorded (one schedule per run)",
    )  # fmt: skip
    r.add_argument("--r", nargs="*", type=int, default=[], help="tokens removed per block, one run each")
    r.add_argument("--locations", nargs="*", type=int, default=None, help="reducing blocks (default: the method's)")
    r.add_argument("--method-options", type=_json_dict, default={}, help="JSON of method options")
    r.add_argument("--data", default="samples", help="folder, samples, digits or foolbox-<kind> (default samples)")
    r.add_argument("--dataset-name", default=None, help="name stored in metadata (default: from --data)")
    r.add_argument("--limit", type=int, default=None, help="record only the first N images")
    r.add_argument("--out", default="runs", help="parent folder of the run directories (default runs/)")
    r.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    r.add_argument("--no-scores", action="store_true", help="do not store the methods' ranking scores")
    r.add_argument("--cls", action="store_true", help="store the class-token feature after every block")
    r.add_argument("--soft", action="store_true", help="store soft assignment matrices (large)")
    r.add_argument(
        "--amp",
        nargs="?",
        const="fp16",
        default=None,
        choices=("fp16", "bf16"),
        help="mixed precision: fp16 autocast (the default of a bare --amp; CUDA only) or bf16 (CUDA or CPU)",
    )
    _add_common(r)
    r.set_defaults(func=cmd_record)

    s = subparsers.add_parser("sweep", help="record a grid of runs from a TOML file, skipping finished ones")
    s.add_argument("file", help="sweep description (TOML)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_sweep)

    v = subparsers.add_parser(
        "verify",
        help="check run stores: complete, incomplete or corrupt (changes nothing)",
        description="Exit status: 0 every run found is complete and valid; 1 a run is incomplete or corrupt; "
        "2 nothing found or a bad argument.",
    )
    v.add_argument("paths", nargs="+", help="run directories or folders holding them")
    v.add_argument(
        "--hash-inputs", action="store_true",
        help="also check the input files: by content where recorded with --hash-inputs (a change that kept size "
        "and modification time), else by size and modification time",
    )  # fmt: skip
    v.set_defaults(func=cmd_verify)


def _specs(args) -> list:
    from tokvis.store import RunConfigError, RunSpec

    if args.fitted is not None:
        return _fitted_specs(args)
    if args.fitted_other_backbone:
        raise RunConfigError("--fitted-other-backbone goes with --fitted FILE; give the fitted file, or drop it")
    if not args.method:
        raise RunConfigError("give --method (one or more registered methods) or --fitted FILE (a fitted method)")
    if not args.keep_rate and not args.r:
        raise RunConfigError("give --keep-rate and/or --r (one run per value)")
    common = dict(_common(args), locations=args.locations, method_options=args.method_options)
    specs = []
    for method in args.method:
        specs += [RunSpec(method=method, keep_rate=k, **common) for k in args.keep_rate]
        specs += [RunSpec(method=method, r=v, **common) for v in args.r]
    return specs


def _common(args) -> dict[str, Any]:
    return dict(
        backbone=args.model, dataset=args.data, pretrained=not args.no_pretrained, model_kwargs=args.model_kwargs,
        seed=args.seed, dataset_name=args.dataset_name, limit=args.limit, shard_size=args.shard_size,
        scores=not args.no_scores, cls=args.cls, soft=args.soft,
        amp={None: False, "fp16": True}.get(args.amp, args.amp),
    )  # fmt: skip


def _fitted_specs(args) -> list:
    """``--fitted FILE``: one method from the file; its fitted schedule unless --keep-rate / --r say otherwise."""
    from tokvis.errors import WeightsError
    from tokvis.fitting import method_file_info
    from tokvis.store import RunConfigError, RunSpec
    from tokvis.store.models import fitted_fields

    if args.method is not None and len(args.method) != 1:
        raise RunConfigError(
            f"--fitted gives one method; --method names {len(args.method)} ({' '.join(args.method)}): "
            "record the others in another command"
        )
    method = args.method[0] if args.method else None
    schedules = [dict(keep_rate=k) for k in args.keep_rate] + [dict(r=v) for v in args.r]
    if not schedules:  # the schedule the file was fitted for (a missing or bad file is reported here)
        if not Path(args.fitted).is_file():
            raise RunConfigError(
                f"--fitted {args.fitted}: no such file; fit one with `tokvis fit --method <name> --keep-rate <k> "
                f"--out {args.fitted}`"
            )
        try:
            fit = method_file_info(args.fitted)["fit_info"] or {}
        except WeightsError as e:
            raise RunConfigError(f"--fitted {args.fitted}: {e}") from e
        if fit.get("keep_rate") is not None:
            schedules = [dict(keep_rate=fit["keep_rate"])]
        elif fit.get("r") is not None:
            schedules = [dict(r=fit["r"])]
        else:
            raise RunConfigError(
                f"--fitted {args.fitted} does not say which schedule it was fitted for; give --keep-rate or --r"
            )
    specs = []
    for sched in schedules:
        fields = fitted_fields(
            args.fitted, method=method, keep_rate=sched.get("keep_rate"), r=sched.get("r"),
            locations=args.locations, method_options=args.method_options,
        )  # fmt: skip
        specs.append(RunSpec(**sched, **fields, fitted_other_backbone=args.fitted_other_backbone, **_common(args)))
    return specs


def _run_all(specs, **opts) -> int:
    from tokvis.commands._run import run_all

    rows = run_all(specs, **opts)
    if len(rows) > 1:
        print(_summary(rows))
    return 0


def _summary(rows) -> str:
    lines = [f"{'run':<60} {'status':<17} {'images':>7} {'shards':>7} {'seconds':>8} {'img/s':>8} {'MB':>8}"]
    for r in rows:
        size = sum(p.stat().st_size for p in Path(r.path).glob("*") if p.is_file()) / 1e6
        rate = f"{r.num_images / r.seconds:.1f}" if r.seconds > 0 and r.shards_recorded else "-"
        secs = f"{r.seconds:.1f}" if r.shards_recorded else "-"
        lines.append(
            f"{r.path.name:<60} {r.status:<17} {r.num_images:>7} {r.num_shards:>7} {secs:>8} {rate:>8} {size:>8.2f}"
        )
    return "\n".join(lines)


def cmd_record(args: argparse.Namespace) -> int:
    return _run_all(
        _specs(args), out=args.out, batch_size=args.batch_size, device=args.device, skip_bad=args.skip_bad,
        workers=args.workers, threads=args.threads, progress=not args.no_progress, hash_inputs=args.hash_inputs,
    )  # fmt: skip


def load_sweep(path: str | Path) -> tuple[list, dict[str, Any]]:
    """Parse a sweep TOML file into run specs and the execution options."""
    specs, opts, _ = _load_sweep(path)
    return specs, opts


def _load_sweep(path: str | Path, *, plan_fits: bool = False) -> tuple[list, dict[str, Any], list[dict]]:
    """:func:`load_sweep`, and with ``plan_fits`` the fits its ``[fit]`` table asks for.

    With ``plan_fits``, a ``[fitted]`` file that does not exist yet is not an error when the sweep has a
    ``[fit]`` table: it is returned as a fit job (``tokvis.fitting.fit_to_file`` keyword arguments plus
    ``backbone`` and ``file``), one per file, and the run specs of those runs are ``None``.
    """
    import tomllib

    from tokvis.store import RunConfigError, RunSpec
    from tokvis.validate import check_float, check_int

    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RunConfigError(f"sweep file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise RunConfigError(f"{path} is not valid TOML: {e}") from e
    unknown = sorted(set(cfg) - _SWEEP_KEYS)
    if unknown:
        raise RunConfigError(f"{path}: unknown keys {unknown}{_did_you_mean(unknown[0], _SWEEP_KEYS)}; known: "
                             f"{sorted(_SWEEP_KEYS)}")  # fmt: skip
    _check_sweep_types(path, cfg)
    keep_rates, rs = _as_list(cfg.get("keep_rates", [])), _as_list(cfg.get("r", []))
    if not keep_rates and not rs:
        raise RunConfigError(f"{path}: give keep_rates and/or r")
    for k in keep_rates:
        check_float(f"{path}: keep_rates entry", k, low=0, high=1, low_open=True, error=RunConfigError)
    for v in rs:
        if not isinstance(v, list):
            check_int(f"{path}: r entry", v, minimum=0, error=RunConfigError)
    method_options = cfg.get("method_options", {})
    if not isinstance(method_options, dict):
        raise RunConfigError(f"{path}: method_options must be a table of tables, one per method: [method_options.tome]")
    for name, opts in method_options.items():
        if name not in cfg["methods"]:
            raise RunConfigError(
                f"{path}: method_options must be keyed by a method of the sweep ({', '.join(cfg['methods'])}): "
                f"got {name!r}. Write the options under [method_options.<method>], e.g. [method_options.tome]"
            )
        if not isinstance(opts, dict):
            raise RunConfigError(f"{path}: method_options.{name} must be a table of options: got {opts!r}")
    fitted = cfg.get("fitted", {})
    if not isinstance(fitted, dict):
        raise RunConfigError(f'{path}: fitted must be a table of path patterns, one per method: [fitted] sit = "..."')
    for name, pattern in fitted.items():
        if name not in cfg["methods"]:
            raise RunConfigError(
                f"{path}: fitted must be keyed by a method of the sweep ({', '.join(cfg['methods'])}): got {name!r}"
            )
        if not isinstance(pattern, str) or not pattern:
            raise RunConfigError(
                f'{path}: fitted.{name} must be a path pattern such as "fits/{name}_keep{{keep_rate}}.safetensors": '
                f"got {pattern!r}"
            )
    for key in ("batch_size", "workers", "threads", "shard_size", "seed"):
        if key in cfg:
            check_int(f"{path}: {key}", cfg[key], minimum=None if key == "seed" else 0, error=RunConfigError)
    fit_cfg = _fit_settings(path, cfg)
    jobs: dict[str, dict] = {}
    specs = []
    for backbone in cfg["backbones"]:
        for dataset in cfg["datasets"]:
            for method in cfg["methods"]:
                common = dict(
                    backbone=backbone, dataset=str(dataset), method=method,
                    pretrained=cfg.get("pretrained", True), model_kwargs=cfg.get("model_kwargs", {}),
                    seed=cfg.get("seed", 0), locations=cfg.get("locations"),
                    method_options=dict(method_options.get(method, {})), limit=cfg.get("limit"),
                    shard_size=cfg.get("shard_size", 256), scores=cfg.get("scores", True),
                    cls=cfg.get("cls", False), soft=cfg.get("soft", False), amp=cfg.get("amp", False),
                    fitted_other_backbone=cfg.get("fitted_other_backbone", False),
                )  # fmt: skip
                scheds = [dict(keep_rate=k) for k in keep_rates] + [dict(r=v) for v in rs]
                for sched in scheds:
                    run = dict(common)
                    if method in fitted:
                        file = _fitted_file(path, method, fitted[method], sched, backbone)
                        if plan_fits and fit_cfg is not None and not file.exists():
                            _plan_fit(path, jobs, file, fitted[method], cfg, sched, common, fit_cfg)
                            continue
                        run.update(_sweep_fitted(path, method, file, sched, common))
                    specs.append(RunSpec(**sched, **run))
    out = Path(cfg.get("out", "runs"))
    if not out.is_absolute():
        out = path.parent / out
    opts = dict(
        out=out, batch_size=cfg.get("batch_size", 32), device=str(cfg.get("device", "auto")),
        skip_bad=cfg.get("skip_bad", False), workers=cfg.get("workers", 0), threads=cfg.get("threads", 0),
        hash_inputs=cfg.get("hash_inputs", False),
    )  # fmt: skip
    return specs, opts, list(jobs.values())


def _did_you_mean(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), sorted(map(str, known)), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_sweep_types(path: Path, cfg: dict) -> None:
    """Every typed key of a sweep file has its type (TOML has booleans, numbers, strings, tables)."""
    from tokvis.store import RunConfigError

    def bad(key, want):
        value = cfg[key]
        quoted = value in ("true", "false", "True", "False")
        hint = f" (write {key} = {value.lower()}, without quotes)" if quoted else ""
        raise RunConfigError(f"{path}: {key} must be {want}: got {value!r} ({type(value).__name__}){hint}")

    for key in _SWEEP_BOOLS:
        if key in cfg and not isinstance(cfg[key], bool):
            bad(key, "true or false (a TOML boolean)")
    for key in ("backbones", "methods", "datasets"):
        value = cfg.get(key)
        if not isinstance(value, list) or not value:
            raise RunConfigError(f"{path}: {key!r} must be a non-empty list")
        if not all(isinstance(v, str) and v for v in value):
            raise RunConfigError(f"{path}: {key} must be a list of names (strings): got {value!r}")
    for key in ("out", "device"):
        if key in cfg and (not isinstance(cfg[key], str) or not cfg[key]):
            bad(key, "a string (a folder)" if key == "out" else "a string: cpu, cuda or auto")
    if "amp" in cfg and cfg["amp"] not in (False, True, "fp16", "bf16"):
        bad("amp", 'false, "fp16" or "bf16"')
    if "model_kwargs" in cfg and not isinstance(cfg["model_kwargs"], dict):
        bad("model_kwargs", "a table of keyword arguments: model_kwargs = {img_size = 64}")
    locs = cfg.get("locations", [])
    if not (isinstance(locs, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in locs)):
        bad("locations", "a list of block indices (integers)")
    if "limit" in cfg and (isinstance(cfg["limit"], bool) or not isinstance(cfg["limit"], int) or cfg["limit"] < 1):
        bad("limit", "an integer >= 1")


def _fit_settings(path: Path, cfg: dict) -> dict | None:
    """The sweep's ``[fit]`` table, checked, with defaults filled in (``None`` without one)."""
    from tokvis.store import RunConfigError
    from tokvis.validate import check_float, check_int

    if "fit" not in cfg:
        return None
    table = cfg["fit"]
    if not isinstance(table, dict):
        raise RunConfigError(f"{path}: fit must be a table of tokvis fit settings: [fit] epochs = 3")
    if not cfg.get("fitted"):
        raise RunConfigError(f"{path}: [fit] fits the files of the [fitted] table, but the sweep has none; add one")
    unknown = sorted(set(table) - set(_FIT_KEYS))
    if unknown:
        raise RunConfigError(f"{path}: unknown keys {unknown} in [fit]; known: {sorted(_FIT_KEYS)}")
    out = {**_FIT_KEYS, **table}
    for key in ("images", "epochs", "batch_size"):
        check_int(f"{path}: fit.{key}", out[key], minimum=1, error=RunConfigError)
    check_int(f"{path}: fit.held_out", out["held_out"], minimum=0, error=RunConfigError)
    if out["lr"] is not None:
        check_float(f"{path}: fit.lr", out["lr"], low=0.0, low_open=True, high_open=True, error=RunConfigError)
    return out


def _plan_fit(path: Path, jobs: dict, file: Path, pattern: str, cfg: dict, sched: dict, common: dict, fit: dict):
    """Add the fit of the missing fitted file ``file`` to ``jobs`` (once per file)."""
    from tokvis.errors import TokvisError
    from tokvis.methods import create_method, get_method_class
    from tokvis.store import RunConfigError

    method, backbone = common["method"], common["backbone"]
    key = str(file.resolve())
    job = dict(
        backbone=backbone, file=file, method=method, keep_rate=sched.get("keep_rate"), r=sched.get("r"),
        locations=common["locations"], options=dict(common["method_options"]), seed=int(common["seed"]),
        pretrained=common["pretrained"], model_kwargs=dict(common["model_kwargs"]), **fit,
    )  # fmt: skip
    if key in jobs:
        if jobs[key] != job:
            raise RunConfigError(
                f"{path}: fitted.{method} = {pattern!r} names the one file {file} for runs that need different fits "
                f"({jobs[key]['backbone']} and {backbone}); put {{backbone}} in the pattern"
            )
        return
    if not hasattr(get_method_class(method), "mark_fitted"):
        raise RunConfigError(
            f"{path}: fitted.{method}: {method} has no learned parameters to fit; drop it from [fitted]"
        )
    try:
        learned = create_method(method, **job["options"]).learned
    except TokvisError as e:
        raise RunConfigError(f"{path}: method_options.{method}: {e}") from e
    if not learned:  # e.g. dpcknn's parameter-free merge
        raise RunConfigError(
            f"{path}: fitted.{method}: {method} has no learned parameters with options {job['options']}; "
            'set its learned option in [method_options] (dpcknn: merge = "learned") or drop it from [fitted]'
        )
    jobs[key] = job


def run_fits(jobs: list[dict], *, progress: bool = True) -> None:
    """Fit the sweep's missing fitted files (on the CPU), one backbone loaded once, each file written atomically."""
    from tokvis import fitting
    from tokvis.store.models import create_backbone

    model, loaded = None, None
    for i, job in enumerate(jobs, 1):
        sched = f"keep_rate {job['keep_rate']:g}" if job["keep_rate"] is not None else f"r {job['r']}"
        print(f"fitting {job['method']} ({sched}) on {job['backbone']} -> {job['file']} ({i}/{len(jobs)})", flush=True)
        ident = (job["backbone"], job["pretrained"], json.dumps(job["model_kwargs"], sort_keys=True), job["seed"])
        if ident != loaded:
            model = create_backbone(
                job["backbone"], pretrained=job["pretrained"], model_kwargs=job["model_kwargs"], seed=job["seed"]
            )
            loaded = ident
        Path(job["file"]).parent.mkdir(parents=True, exist_ok=True)
        res = fitting.fit_to_file(
            model, job["method"], job["file"], keep_rate=job["keep_rate"], r=job["r"], locations=job["locations"],
            options=job["options"], images=job["images"], held_out=job["held_out"], epochs=job["epochs"],
            lr=job["lr"], batch_size=job["batch_size"], seed=job["seed"], progress=progress,
        )  # fmt: skip
        loss = (
            f"held-out loss {res['held_out_before']:.4f} -> {res['held_out_after']:.4f}"
            if res["held_out_before"] is not None
            else f"training loss {res['epoch_losses'][-1]:.4f}"
        )
        print(f"  fitted in {res['seconds']:.0f} s, {loss}", flush=True)


def _fitted_file(path: Path, method: str, pattern: str, sched: dict, backbone: str) -> Path:
    """``pattern`` with ``{keep_rate}`` / ``{r}`` / ``{backbone}`` filled in, relative to the sweep file's folder."""
    from string import Formatter

    from tokvis.store import RunConfigError

    values = {}
    if sched.get("keep_rate") is not None:
        values["keep_rate"] = f"{float(sched['keep_rate']):g}"
    else:
        r = sched["r"]
        values["r"] = "-".join(str(v) for v in r) if isinstance(r, list) else str(r)
    try:
        names = {f for _, f, _, _ in Formatter().parse(pattern) if f is not None}
        unknown = names - {"keep_rate", "r", "backbone"}
        if unknown:
            raise RunConfigError(
                f"{path}: fitted.{method} = {pattern!r} names {sorted(unknown)}; a pattern may only hold "
                "{keep_rate}, {r} and {backbone}"
            )
        missing = names - set(values) - {"backbone"}
        if missing:
            raise RunConfigError(
                f"{path}: fitted.{method} = {pattern!r} needs {{{sorted(missing)[0]}}}, but a run of this sweep has "
                f"{', '.join(f'{k} {v}' for k, v in values.items())}; use {{{next(iter(values))}}} in the pattern"
            )
        name = pattern.format(**values, backbone=backbone.replace("/", "_"))
    except ValueError as e:
        raise RunConfigError(f"{path}: fitted.{method} = {pattern!r} is not a valid pattern ({e})") from e
    file = Path(name)
    return file if file.is_absolute() else path.parent / file


def _sweep_fitted(path: Path, method: str, file: Path, sched: dict, common: dict) -> dict:
    """The fitted-file fields of one sweep run, checked (:func:`tokvis.store.models.fitted_fields`)."""
    from tokvis.store import RunConfigError
    from tokvis.store.models import fitted_fields

    if not file.exists():
        raise RunConfigError(
            f"{path}: fitted.{method}: {file}: no such file; fit it with `tokvis fit --method {method} ... --out "
            f"{file}`, or add a [fit] table to the sweep to fit missing files first"
        )
    return fitted_fields(
        file, method=method, keep_rate=sched.get("keep_rate"), r=sched.get("r"), locations=common["locations"],
        method_options=common["method_options"], where=f"{path}: fitted.{method}:",
    )  # fmt: skip


def _as_list(value) -> list:
    """A sweep value given as one item (``keep_rates = 0.5``) is a list of one."""
    return value if isinstance(value, list) else [value]


def cmd_sweep(args: argparse.Namespace) -> int:
    specs, opts, jobs = _load_sweep(args.file, plan_fits=True)
    if jobs:  # every run and fit is checked before the first fit
        import torch

        from tokvis.commands._run import check_backbone, check_grid, check_options

        check_options(**{k: opts[k] for k in ("out", "batch_size", "workers", "threads", "device")})
        if specs:
            check_grid(specs)
        for backbone in dict.fromkeys(job["backbone"] for job in jobs):
            check_backbone(backbone)
        if opts["threads"]:
            torch.set_num_threads(opts["threads"])
        run_fits(jobs, progress=not args.no_progress)
        specs, opts = load_sweep(args.file)  # the fitted runs, now that their files exist
    return _run_all(specs, progress=not args.no_progress, **opts)


def cmd_verify(args: argparse.Namespace) -> int:
    from tokvis.store import StoreError, verify_tree

    reports = []
    for p in args.paths:
        try:
            found = verify_tree(p, hash_inputs=args.hash_inputs)
        except StoreError as e:
            print(f"tokvis verify: error: {e}", file=sys.stderr)
            return 2
        if not found:
            print(f"tokvis verify: error: {p}: no run directories found", file=sys.stderr)
            return 2
        reports += found
    for rep in reports:
        print(
            f"{rep.status.upper():<10} {rep.path}  ({rep.shards_done}/{rep.num_shards} shards, {rep.num_images} images)"
        )
        for msg in rep.problems:
            print(f"    problem: {msg}")
        for msg in rep.notes:
            print(f"    note: {msg}")
    counts = {s: sum(r.status == s for r in reports) for s in ("complete", "incomplete", "corrupt", "stale")}
    print(
        f"{counts['complete']} complete, {counts['incomplete']} incomplete, {counts['corrupt']} corrupt"
        + (f", {counts['stale']} stale (inputs changed)" if args.hash_inputs else "")
    )
    return 0 if counts["complete"] == len(reports) else 1
