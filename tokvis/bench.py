"""Throughput, FLOPs and recording overhead of patched models.

Figures, not assertions: these functions measure and print; targets are
checked by reading their output (``tokvis bench``, ``benchmarks/``), never by
timed unit tests.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tokvis.errors import ArgumentValueError, TokvisError


@contextlib.contextmanager
def _explicit_attention(model: nn.Module) -> Iterator[None]:
    """Switch timm attention to its explicit (matmul + softmax) path.

    ``torch.utils.flop_counter`` does not count the CPU kernel behind
    ``scaled_dot_product_attention``; the explicit path computes the same
    attention with countable matmuls.
    """
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, v in saved:
            m.fused_attn = v


def count_flops(model: nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward pass over ``images`` (multiply-add = 2 FLOPs), with torch's flop counter."""
    with _explicit_attention(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return float(counter.get_total_flops())


def count_gmacs(model: nn.Module, images: torch.Tensor) -> float:
    """GMACs (10^9 multiply-adds) per image of one forward pass over ``images``: :func:`count_flops` / 2 / batch.

    The unit of the papers' "GFLOPs" (fvcore and the like count a multiply-add as one operation).
    """
    return count_flops(model, images) / 2 / images.shape[0] / 1e9


# --------------------------------------------------------------------------------------------------
# published FLOPs, reproduced (tokvis flops; tokvis bench --flops)

#: relative difference to a published figure within which a row agrees
FLOPS_TOLERANCE = 0.02


@dataclass
class FlopsRow:
    label: str
    model: str
    setting: str  # the tokvis.patch call, e.g. "tome r=13"; "unreduced"
    gmacs: float  # tokvis, per image
    published: float | None  # GMACs per image, as published; None: the source gives no figure
    source: str
    rel_diff: float | None  # (gmacs - published) / published
    agrees: bool | None  # within FLOPS_TOLERANCE, or within the rounding of the published figure
    note: str = ""
    official: float | None = None  # the official code's GMACs per image on the same model (ToMe rows, --tome-repo)


def published_flops() -> dict:
    """The bundled published figures (``tokvis/assets/published_flops.json``): ``sources``, ``rows``, notes."""
    import importlib.resources
    import json

    return json.loads((importlib.resources.files("tokvis") / "assets" / "published_flops.json").read_text("utf-8"))


def flops_table(
    labels: Sequence[str] | None = None,
    *,
    progress: Callable[[FlopsRow], None] | None = None,
    tome_repo: str | os.PathLike | None = None,
) -> list[FlopsRow]:
    """tokvis's GMACs per 224x224 image beside every published figure of :func:`published_flops`.

    Models are timm architectures with random weights (no download); each published setting is applied with
    :func:`tokvis.patch` and counted by :func:`count_gmacs` on one random image.  A row agrees when it is within
    :data:`FLOPS_TOLERANCE` of the figure, or within the rounding of a figure published to one decimal (the
    row's note says which).

    Parameters
    ----------
    labels : sequence of str, optional
        Only the rows with these labels (default: all).
    progress : callable, optional
        Called with each row as it is computed.
    tome_repo : path, optional
        A checkout of facebookresearch/ToMe.  Every ToMe row is then also counted on the official code
        (``tome.patch.timm``, same model, same weights, same image): the row's ``official`` figure.  A row
        with no published figure (ToMe's off-the-shelf ViT-S/B/L) is then checked against it, with the
        same tolerance.
    """
    import warnings

    import timm

    from tokvis import patch

    data = published_flops()
    rows = data["rows"]
    if labels is not None:
        unknown = sorted(set(labels) - {r["label"] for r in rows})
        if unknown:
            raise TokvisError(f"no published FLOPs row {unknown}; known: {[r['label'] for r in rows]}")
        rows = [r for r in rows if r["label"] in set(labels)]
    if tome_repo is not None:
        _require_official(tome_repo, "tome", "ToMe")
    out, models = [], {}
    for r in rows:
        if r["model"] not in models:
            torch.manual_seed(0)
            models[r["model"]] = timm.create_model(r["model"], pretrained=False).eval()
        model = models[r["model"]]
        size = model.patch_embed.img_size
        images = torch.randn(1, 3, *size)
        decision = 0.0
        if r["method"] is None:
            gmacs, setting = count_gmacs(model, images), "unreduced"
        else:
            m = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # learned methods: unfitted weights (their FLOPs do not depend on them)
                patch(m, r["method"], **r["setting"])
                with _decision_gmacs(m) as spent:
                    gmacs = count_gmacs(m, images)
                decision = spent[0] / images.shape[0]
            setting = " ".join([r["method"], *(f"{k}={v}" for k, v in r["setting"].items())])
        official = None
        if tome_repo is not None and r["method"] == "tome":
            official = count_gmacs(official_tome(tome_repo, r["setting"]["r"])(copy.deepcopy(model)), images)
        pub = r["gmacs"]
        rel = agrees = None
        note = ""
        compared = gmacs
        if r.get("published_excludes"):  # the source counts the backbone only
            compared = gmacs - decision
            note = f"the figure leaves out {r['published_excludes']} ({decision:.3f} GMACs): compared without them, "
            note += f"{compared:.3f}"
        if pub is None:
            note = "no published figure: " + data["sources"][r["source"]].split(": ")[-1]
            if official is not None:  # the official code's count is the reference
                rel = (compared - official) / official
                agrees = abs(rel) <= FLOPS_TOLERANCE
                note += f"; the official code counts {official:.3f} ({100 * rel:+.2f} %)"
                if not agrees:
                    note += ": DIFFERS from the official code"
        else:
            rel = (compared - pub) / pub
            rounding = 0.5 * 10 ** -r["digits"]
            agrees = abs(rel) <= FLOPS_TOLERANCE or abs(compared - pub) <= rounding + 1e-9
            if agrees and abs(rel) > FLOPS_TOLERANCE:
                note += "; " if note else ""
                note += f"published to {r['digits']} decimal(s): {compared:.3f} rounds to {pub:.{r['digits']}f}"
            elif not agrees:
                note += "; " if note else ""
                note += "DIFFERS from the published figure"
        if official is not None and pub is not None:
            note += ("; " if note else "") + f"the official code counts {official:.3f}"
        row = FlopsRow(r["label"], r["model"], setting, gmacs, pub, r["source"], rel, agrees, note, official)
        out.append(row)
        if progress:
            progress(row)
    return out


@contextlib.contextmanager
def _decision_gmacs(model: nn.Module) -> Iterator[list[float]]:
    """GMACs spent in the patched method's decisions (score predictors, similarities) while the context is open,
    summed over the batch: ``[total]``, filled in place (a second flop counter inside the outer one)."""
    method = model._tokvis.method
    spent = [0.0]
    decide = method.decide

    def counted(ctx):
        with FlopCounterMode(display=False) as counter:
            out = decide(ctx)
        spent[0] += counter.get_total_flops() / 2 / 1e9
        return out

    method.decide = counted
    try:
        yield spent
    finally:
        del method.decide  # the instance attribute: back to the class's method


def format_flops_row(row: FlopsRow, *, header: bool = False) -> str:
    """One fixed-width line of the FLOPs table (with the header line above it when ``header``)."""
    line = (
        f"{row.label:<40} {row.gmacs:>12.3f} "
        + (
            f"{row.published:>15.2f} {100 * row.rel_diff:>+8.1f}%"
            if row.published is not None
            else f"{'-':>15} {'-':>9}"
        )
        + f"  {row.source:<17} {row.note}"
    )
    if not header:
        return line
    head = f"{'setting':<40} {'tokvis GMACs':>12} {'published GMACs':>15} {'rel diff':>9}  {'source':<17} note"
    return head + "\n" + line


def format_flops_sources(rows: Sequence[FlopsRow]) -> str:
    """The citations of the sources the rows use, and the notes that hold for the whole table."""
    data = published_flops()
    used = list(dict.fromkeys(r.source for r in rows))
    lines = [f"  {key}: {data['sources'][key]}" for key in used]
    return "\n".join(["sources:", *lines, data["study_note"]])


def time_forward(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (CUDA: synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: a configuration's slowest round over its fastest (plain forwards) above this: the machine was busy
SPREAD_WARNING = 1.3


@dataclass
class BenchRow:
    config: str
    images_per_s: float  # median over the timed rounds
    gmacs_per_image: float  # 10^9 multiply-adds per image (the papers' "GFLOPs"; torch's FLOPs / 2)
    flops_ratio: float  # FLOPs of the unpatched model / FLOPs of this one
    speedup: float  # throughput / unpatched throughput (medians)
    speedup_per_flops: float  # speedup / flops_ratio
    recorded_images_per_s: float
    record_overhead: float  # recorded wall time / unrecorded wall time (medians)
    fidelity: float  # mean cosine similarity of the outputs to the unpatched model's
    images_per_s_min: float = math.nan  # slowest round
    images_per_s_max: float = math.nan  # fastest round
    peak_memory_mb: float = math.nan  # CUDA: peak allocated memory of a plain forward
    spread: float = math.nan  # slowest / fastest round (plain forwards)


def benchmark(
    model: nn.Module,
    images: torch.Tensor,
    configs: Sequence[tuple[str, object, dict]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] | None = print,
    compile: bool = False,
    record: bool = True,
    calls: int = 1,
) -> list[BenchRow]:
    """Measure throughput, FLOPs and recording overhead of several configurations in interleaved rounds.

    Every round runs every configuration once (plain, then recorded): ``A B C A B C ...``, so that a
    change in machine load hits all of them alike and no configuration absorbs the warm-up.  The
    ``warmup`` first rounds are not timed (with ``compile``, they compile).  Rows report the median,
    slowest and fastest round; a configuration whose rounds differ by more than :data:`SPREAD_WARNING`
    is reported with a warning line (the machine was busy: the figures are not trustworthy).

    Parameters
    ----------
    model : timm VisionTransformer
        Patched and unpatched in turn (left unpatched at the end); on the device of ``images``.
    images : Tensor [B, 3, H, W]
    configs : list of (label, method, patch kwargs)
        ``method``: ``None`` = the unpatched model (the reference; put it first), a registered name or a
        :class:`~tokvis.methods.base.Method`, or a callable ``f(model_copy) -> model`` for a model prepared
        elsewhere (e.g. the official ToMe; not recorded).
    repeats, warmup : int
        Timed and untimed rounds.
    compile : bool
        ``torch.compile`` each configuration's model (one copy of the model per configuration).
    record : bool
        Also time recorded forwards (``tokvis.record``).
    calls : int
        Forwards per configuration and round, timed together (a round's time is their mean): forwards of
        a millisecond or less vary by tens of percent one by one.
    """
    from tokvis import patch, unpatch
    from tokvis import record as record_ctx

    unpatch(model)
    with torch.no_grad():
        reference = model(images).flatten(1).float()
    B = images.shape[0]
    cuda = images.is_cuda
    # one model per configuration: a copy when compiling or prepared elsewhere, else the shared model re-patched
    runners = []
    for label, method, kw in configs:
        if callable(method) and not isinstance(method, (str, nn.Module)):
            m = method(copy.deepcopy(model))
            runners.append((label, m, None, False))
        elif compile:
            m = copy.deepcopy(model)
            if method is not None:
                patch(m, copy.deepcopy(method) if isinstance(method, nn.Module) else method, **kw)
            runners.append((label, m, None, method is not None and record))
        else:
            runners.append((label, model, (method, kw), method is not None and record))
    flops = []
    for _label, m, how, _ in runners:
        _activate(model, how)
        flops.append(count_flops(m, images))
    # static shapes (a fixed schedule has them; automatic dynamic shapes would time other kernels, and torch
    # 2.14's guard builder fails on them); see _compile_limits for the recompiles of the shared code objects
    fns = [torch.compile(m, dynamic=False) if compile else m for _, m, _, _ in runners]

    plain_t: list[list[float]] = [[] for _ in runners]
    rec_t: list[list[float]] = [[] for _ in runners]
    peak = [math.nan] * len(runners)
    rounds = warmup + repeats
    with torch.no_grad(), _compile_limits(len(runners) if compile else 0):
        for rnd in range(rounds):
            for i, (_label, m, how, rec) in enumerate(runners):
                _activate(model, how)
                last = rnd == rounds - 1
                if cuda and last:
                    torch.cuda.reset_peak_memory_stats(images.device)
                t = _timed(lambda i=i: [fns[i](images) for _ in range(calls)]) / calls
                if cuda and last:
                    peak[i] = torch.cuda.max_memory_allocated(images.device) / 2**20
                tr = math.nan
                if rec:

                    def recorded(i=i, m=m):
                        for _ in range(calls):
                            with record_ctx(m) as r:
                                fns[i](images)
                            r.trace  # noqa: B018 -- the host copy is part of recording

                    tr = _timed(recorded) / calls
                if rnd >= warmup:
                    plain_t[i].append(t)
                    rec_t[i].append(tr)
        outs = []
        for i, (_label, _m, how, _) in enumerate(runners):
            _activate(model, how)
            outs.append(fns[i](images).flatten(1).float())
    unpatch(model)

    rows = []
    base_ips = B / statistics.median(plain_t[0])
    base_flops = flops[0]
    for i, (label, *_rest) in enumerate(runners):
        tp = statistics.median(plain_t[i])
        tr = statistics.median(rec_t[i]) if not any(math.isnan(v) for v in rec_t[i]) else math.nan
        ips = B / tp
        fr = base_flops / flops[i]
        rows.append(
            BenchRow(
                config=label,
                images_per_s=ips,
                gmacs_per_image=flops[i] / 2 / B / 1e9,
                flops_ratio=fr,
                speedup=ips / base_ips,
                speedup_per_flops=(ips / base_ips) / fr,
                recorded_images_per_s=B / tr,
                record_overhead=tr / tp,
                fidelity=float(torch.nn.functional.cosine_similarity(outs[i], reference, dim=-1).mean()),
                images_per_s_min=B / max(plain_t[i]),
                images_per_s_max=B / min(plain_t[i]),
                peak_memory_mb=peak[i],
                spread=max(plain_t[i]) / min(plain_t[i]),
            )
        )
    if progress:
        progress(format_rows(rows))
        for line in spread_warnings(rows):
            progress(line)
    return rows


@contextlib.contextmanager
def _compile_limits(n_models: int) -> Iterator[None]:
    """Room in dynamo's caches for ``n_models`` compiled copies of one model, and an error instead of eager.

    The copies share their code objects (``VisionTransformer.forward``, ``Block.forward``, the patched
    forwards), and every copy, plain and recorded, adds cache entries to them.  Past dynamo's
    ``recompile_limit`` (8) a frame silently runs eagerly, so a benchmark of many configurations would
    time later ones uncompiled; here the limit grows with the copies and hitting it raises.
    """
    if not n_models:
        yield
        return
    import torch._dynamo

    limit = max(torch._dynamo.config.recompile_limit, 4 * n_models + 8)  # plain + recorded, and a margin
    with torch._dynamo.config.patch(
        recompile_limit=limit,
        accumulated_recompile_limit=max(torch._dynamo.config.accumulated_recompile_limit, 8 * limit),
        fail_on_recompile_limit_hit=True,
    ):
        yield


def _activate(model: nn.Module, how) -> None:
    """Patch the shared model for one configuration (``how = (method, kwargs)``); ``None``: nothing to do."""
    if how is None:
        return
    from tokvis import patch, unpatch

    method, kw = how
    unpatch(model)
    if method is not None:
        patch(model, method, **kw)


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def spread_warnings(rows: Sequence[BenchRow], limit: float = SPREAD_WARNING) -> list[str]:
    """One warning line per configuration whose slowest round took more than ``limit`` x its fastest."""
    return [
        f"warning: {r.config}: rounds differ by {r.spread:.2f}x (> {limit:g}): the machine was busy, the figures "
        "are not trustworthy; rerun on an idle machine or with more --repeats"
        for r in rows
        if r.spread > limit
    ]


_COLUMNS = [  # (field, header, width, format)
    ("config", "config", 26, "s"),
    ("images_per_s", "images_per_s", 12, ".2f"),
    ("images_per_s_min", "min", 9, ".2f"),
    ("images_per_s_max", "max", 9, ".2f"),
    ("gmacs_per_image", "gmacs_per_image", 15, ".3f"),
    ("flops_ratio", "flops_ratio", 11, ".2f"),
    ("speedup", "speedup", 8, ".2f"),
    ("speedup_per_flops", "speedup_per_flops", 17, ".2f"),
    ("recorded_images_per_s", "recorded_images_per_s", 21, ".2f"),
    ("record_overhead", "record_overhead", 15, ".3f"),
    ("peak_memory_mb", "peak_MB", 8, ".0f"),
    ("fidelity", "fidelity", 8, ".3f"),
]


def format_rows(rows: Sequence[BenchRow], *, header: bool = True, label_width: int = 0) -> str:
    """Fixed-width text table of benchmark rows; the config column is at least ``label_width`` wide.

    Images/s are the median round with the slowest (``min``) and fastest (``max``) rounds.
    """
    width = max([label_width, _COLUMNS[0][2], *(len(r.config) for r in rows)])
    columns = [("config", "config", width, "s"), *_COLUMNS[1:]]
    lines = []
    if header:
        lines.append(" ".join(f"{h:<{w}}" if fmt == "s" else f"{h:>{w}}" for _, h, w, fmt in columns))
    for r in rows:
        d = asdict(r)
        lines.append(
            " ".join(f"{d[name]:<{w}{fmt}}" if fmt == "s" else f"{d[name]:>{w}{fmt}}" for name, _, w, fmt in columns)
        )
    return "\n".join(lines)


FOUNDATION_CONFIGS: list[tuple[str, str | None, dict]] = [
    ("unpatched", None, {}),
    ("tome r=16", "tome", {"r": 16}),
    ("tome keep_rate=0.5", "tome", {"keep_rate": 0.5}),
    ("topk keep_rate=0.5", "topk", {"keep_rate": 0.5}),
    ("evit keep_rate=0.5", "evit", {"keep_rate": 0.5}),
]


def summarize_targets(rows: Sequence[BenchRow]) -> str:
    """The foundation targets, read off one run: recording overhead <= 1.03 and
    ToMe r=16 speed-up >= 0.9 x its FLOPs reduction."""
    by = {r.config: r for r in rows}
    lines = []
    worst = max(rows, key=lambda r: r.record_overhead)
    lines.append(
        f"recording overhead (recorded / plain wall time): worst {worst.record_overhead:.3f} ({worst.config}), "
        f"target <= 1.03: {'met' if worst.record_overhead <= 1.03 else 'NOT met'}"
    )
    tome = by.get("tome r=16")
    if tome is not None:
        verdict = "met" if tome.speedup_per_flops >= 0.9 else "NOT met"
        lines.append(
            f"tome r=16: speed-up {tome.speedup:.2f}x for a FLOPs reduction of {tome.flops_ratio:.2f}x -> "
            f"ratio {tome.speedup_per_flops:.2f}, target >= 0.9: {verdict}"
        )
    return "\n".join(lines)


def fitted_method_path(directory: str | os.PathLike, spec: str, keep_rate: float) -> Path:
    """Where the benchmark scripts keep a method spec fitted for ``keep_rate``: ``<dir>/<spec>_keep<rate>.safetensors``.

    ``spec`` is a name or ``name:key=value,...``; its ``:`` becomes ``_``.
    """
    return Path(directory) / f"{spec.replace(':', '_')}_keep{keep_rate:g}.safetensors"


def method_configs(
    methods: Sequence[str], keep_rates: Sequence[float] = (0.7, 0.5)
) -> list[tuple[str, str | None, dict]]:
    """The unpatched reference followed by every method at every keep rate."""
    configs: list[tuple[str, str | None, dict]] = [("unpatched", None, {})]
    configs += [(f"{m} keep_rate={k:g}", m, {"keep_rate": k}) for m in methods for k in keep_rates]
    return configs


# --------------------------------------------------------------------------------------------------
# the GPU table (benchmarks/bench_gpu.py, tokvis bench --device cuda --dtype fp16)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def gpu_configs(
    methods: Sequence[str],
    *,
    keep_rate: float = 0.5,
    tome_r: int = 16,
    mctf_keep_rate: float = 0.7,
    tome_repo: str | os.PathLike | None = None,
) -> list[tuple[str, object, dict]]:
    """The issue-12 table: unpatched, the official ToMe at ``r`` (when ``tome_repo`` imports, see
    :func:`official_tome`), ToMe at ``r``, every method at ``keep_rate`` (MCTF at its own)."""
    configs: list[tuple[str, object, dict]] = [("unpatched", None, {})]
    off = official_tome(tome_repo, tome_r) if tome_r else None
    if off is not None:
        configs.append((f"official tome r={tome_r}", off, {}))
    if "tome" in methods and tome_r:
        configs.append((f"tome r={tome_r}", "tome", {"r": tome_r}))
    for m in methods:
        k = mctf_keep_rate if m == "mctf" else keep_rate
        configs.append((f"{m} keep_rate={k:g}", m, {"keep_rate": k}))
    return configs


def _import_official(repo: str | os.PathLike | None, module: str, name: str):
    """``module`` imported from the checkout ``repo`` (put first on ``sys.path``), or ``None`` when no checkout
    is given or the import fails (the reason printed: the official row is skipped)."""
    if not repo:
        return None
    import importlib
    import sys

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  (any import failure: the row is skipped, with the reason)
        print(f"official {name} skipped: cannot import {module} from {repo}: {type(e).__name__}: {e}")
        return None


def _require_official(repo: str | os.PathLike, module: str, name: str) -> None:
    """Raise a typed error when the checkout ``repo`` asked for explicitly does not give ``module``."""
    if not Path(repo).is_dir():
        raise ArgumentValueError(
            f"no {name} checkout at {str(repo)!r}: pass the folder of a git clone of the official code"
        )
    if _import_official(repo, module, name) is None:
        raise ArgumentValueError(f"cannot import the official {name} ({module}) from {str(repo)!r}: see the line above")


def official_tome(repo: str | os.PathLike | None, r: int) -> Callable[[nn.Module], nn.Module] | None:
    """A configuration preparer for the official ToMe (``tome.patch.timm``) from a checkout, or ``None``
    (with the reason printed) when it is not given or not importable."""
    tome = _import_official(repo, "tome", "ToMe")  # facebookresearch/ToMe
    if tome is None:
        return None

    def prepare(model: nn.Module) -> nn.Module:
        tome.patch.timm(model)
        model.r = r
        return model

    return prepare


def official_mctf(
    repo: str | os.PathLike | None,
    r: float,
    *,
    one_step_ahead: bool = True,
    bidirectional: bool = True,
    layers: Sequence[int] | None = None,
    trace_source: bool = False,
) -> Callable[[nn.Module], nn.Module] | None:
    """A configuration preparer for the official MCTF from a checkout of mlvlab/MCTF, or ``None`` (with the
    reason printed) when it is not given or not importable.

    The preparer builds the authors' DeiT (``models/deit.py``) with the timm DeiT's shape and weights, set up
    as their evaluation scripts (``run/eval_deit_*_mctf*.sh``: ``mctf_type [r, 0, trace_source, 1,
    one_step_ahead, 1, 20, 40, bidirection, 1, 0]``).

    Parameters
    ----------
    repo : path or None
        Checkout of mlvlab/MCTF.
    r : int or float
        Tokens fused per reducing block, or a fraction ``0 < r < 1`` of them.
    one_step_ahead, bidirectional : bool
        The scripts' one-step-ahead and bidirection switches.
    layers : sequence of int, optional
        ``activate_layer``: reducing blocks (default: 1..depth-1 for a count, the quarter points for a fraction).
    trace_source : bool
        Keep the official source matrix (``model.info["student_source"]``; off in the evaluation scripts).
    """
    deit = _import_official(repo, "models.deit", "MCTF")  # mlvlab/MCTF: the authors' DeiT
    if deit is None:
        return None
    OfficialDeiT = deit.VisionTransformer  # noqa: N806

    def prepare(model: nn.Module) -> nn.Module:
        from tokvis.model import model_info
        from tokvis.schedule import default_locations

        info = model_info(model)
        where = layers
        if where is None:
            where = default_locations(info.depth) if isinstance(r, float) and r < 1 else range(1, info.depth)
        official = OfficialDeiT(
            patch_size=model.patch_embed.patch_size[0],
            embed_dim=model.embed_dim,
            depth=info.depth,
            num_heads=model.blocks[0].attn.num_heads,
            qkv_bias=model.blocks[0].attn.qkv.bias is not None,
            norm_layer=lambda d: nn.LayerNorm(d, eps=model.norm.eps),
            use_mctf=True,
            mctf_type=[r, 0, int(trace_source), 1, int(one_step_ahead), 1, 20, 40, int(bidirectional), 1, 0],
            task_type=[1, 0, 0, 0],
            activate_layer=list(where),
        )
        missing, _ = official.load_state_dict(model.state_dict(), strict=False)
        if missing:
            raise TokvisError(f"the official MCTF DeiT does not take this model's weights (missing {missing})")
        return official.to(next(model.parameters()).device).eval()

    return prepare


def create_bench_model(name: str, *, img_size: int | None = None, pretrained: bool = False) -> nn.Module:
    """A timm model for the GPU table: random weights by default (no internet needed)."""
    import timm

    kw = {"img_size": img_size} if img_size else {}
    return timm.create_model(name, pretrained=pretrained, **kw).eval()


def run_gpu_table(
    *,
    model_name: str = "vit_base_patch16_224",
    device: str = "cuda",
    dtype: str = "fp16",
    batch_size: int = 256,
    repeats: int = 5,
    warmup: int = 2,
    methods: Sequence[str] | None = None,
    keep_rate: float = 0.5,
    tome_r: int = 16,
    compile: bool = False,
    tome_repo: str | None = None,
    img_size: int | None = None,
    record: bool = True,
    progress: Callable[[str], None] = print,
) -> list[BenchRow]:
    """Every method on a random-init timm ViT: unpatched / plain / recorded images/s, speed-up, speed-up per
    FLOPs ratio, peak memory; the official ToMe as a row when ``tome_repo`` is importable."""
    import warnings

    import tokvis

    torch.manual_seed(0)
    model = create_bench_model(model_name, img_size=img_size).to(device=device, dtype=DTYPES[dtype])
    size = model.patch_embed.img_size
    images = torch.randn(batch_size, 3, *size, device=device, dtype=DTYPES[dtype])
    methods = list(methods or tokvis.list_methods())
    configs = gpu_configs(methods, keep_rate=keep_rate, tome_r=tome_r, tome_repo=tome_repo)
    ok = []
    for label, method, kw in configs:  # a method that cannot run on this model is listed, not fatal
        if isinstance(method, str):
            try:
                tokvis.patch(model, method, **kw)
            except tokvis.errors.TokvisError as e:
                progress(f"skipped {label}: {e}")
                continue
            finally:
                tokvis.unpatch(model)
        ok.append((label, method, kw))
    progress(
        f"model {model_name} (random init), batch {batch_size}, input {tuple(size)}, {dtype}, device {device}"
        f"{' ' + torch.cuda.get_device_name(device) if torch.device(device).type == 'cuda' else ''}, "
        f"{'compiled' if compile else 'eager'}, torch {torch.__version__}, {repeats} rounds after {warmup} warm-up"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfitted learned methods warn once each
        return benchmark(
            model, images, ok, repeats=repeats, warmup=warmup, progress=progress, compile=compile, record=record
        )
