"""Fitting learned reduction methods by distillation, and saving / loading their parameters.

:func:`fit` trains only a learned method's parameters (DynamicViT's predictors,
SiT's MLPs, PatchMerger's queries, Sinkhorn's centres) on a frozen backbone:
the reduced model's pooled final features (:func:`pooled_features`: timm's
``forward_head(..., pre_logits=True)``, a transformers model's pooled output or its
head's input) are made to match the unreduced model's on the same images.  No labels are needed.

Fitted parameters are saved as one safetensors file whose header metadata holds
the method name, its options and the schedule it was fitted for, as JSON
(:func:`save_method`, :func:`load_method`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from tokvis.errors import MethodOptionError, TokvisError, WeightsError
from tokvis.fileio import sha256_file
from tokvis.identity import backbone_identity, canonical_safetensors, content_sha256

__all__ = [
    "fit", "fit_to_file", "distillation_loss", "augmented_images", "save_method", "load_method",
    "load_study_checkpoint",
]  # fmt: skip

METHOD_FORMAT = "tokvis-method"
METHOD_VERSION = 2  # 2: content_sha256 (checked on load) and the backbone in fit_info
READABLE_METHOD_VERSIONS = ("1", "2")
LOSSES = ("cosine", "mse")


def _learned(method):
    from tokvis.methods._learned import LearnedMethod

    if not isinstance(method, LearnedMethod) or not method.learned:
        name = getattr(method, "name", type(method).__name__)
        raise MethodOptionError(
            f"method {name!r} has no learned parameters to fit with these options; learned methods: dynamicvit, "
            "sit, patchmerger, sinkhorn, dpcknn with merge='learned'"
        )
    return method


def load_study_checkpoint(method, state_dict, *, locations=(3, 6, 9)):
    """See :func:`tokvis.methods._learned.load_study_checkpoint`."""
    from tokvis.methods._learned import load_study_checkpoint as _load

    return _load(method, state_dict, locations=locations)


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled final features ``[B, C]`` (pre-logits) of a supported backbone (its adapter's
    :meth:`~tokvis.backbones.base.Backbone.pooled_and_logits`).

    Parameters
    ----------
    model : nn.Module
        A timm ViT / Eva or a supported ``transformers`` model, patched or not.
    images : Tensor [B, 3, H, W]
    """
    from tokvis.backbones import backbone_for

    return backbone_for(model).pooled_and_logits(model, images)[0]


def _loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()
    return ((student - teacher) ** 2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


def _check_common(images, batch_size, loss):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise MethodOptionError(
            f"images must be a float tensor [N, 3, H, W] transformed for the model (tokvis.data.transform_for): "
            f"got {shape}"
        )
    if len(images) == 0:
        raise MethodOptionError("images is empty: give at least one image")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MethodOptionError(f"batch_size must be an int >= 1: got {batch_size!r}")
    if loss not in LOSSES:
        raise MethodOptionError(f"loss must be one of {list(LOSSES)}: got {loss!r}")


@torch.no_grad()
def _teacher(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    from tokvis.patching import is_patched

    assert not is_patched(model)
    return torch.cat([pooled_features(model, images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def distillation_loss(
    model: nn.Module,
    method,
    images: torch.Tensor,
    *,
    keep_rate: float | None = None,
    r: int | Sequence[int] | None = None,
    locations: Sequence[int] | None = None,
    batch_size: int = 16,
    loss: str = "cosine",
) -> float:
    """Mean distillation loss of ``method`` on ``images`` (no gradient).

    The loss compares the pooled final features of the model reduced by
    ``method`` (with the given schedule) with those of the unreduced model:
    ``"cosine"``: mean of ``1 - cos``; ``"mse"``: mean squared error divided by
    the mean squared teacher feature.  ``model`` must be unpatched and is left
    unpatched.

    Returns
    -------
    float
    """
    import warnings

    import tokvis

    _check_common(images, batch_size, loss)
    if tokvis.is_patched(model):
        raise MethodOptionError("the model is patched; tokvis.unpatch(model) first (the teacher is the plain model)")
    teacher = _teacher(model, images, batch_size)
    tokvis.patch(model, method, keep_rate=keep_rate, r=r, locations=locations)
    try:
        total = 0.0
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an unfitted method's warning is expected here
            for i in range(0, len(images), batch_size):
                s = pooled_features(model, images[i : i + batch_size])
                total += float(_loss(s, teacher[i : i + batch_size], loss)) * len(s)
    finally:
        tokvis.unpatch(model)
    return total / len(images)


def fit(
    model: nn.Module,
    method,
    images: torch.Tensor,
    *,
    keep_rate: float | None = None,
    r: int | Sequence[int] | None = None,
    locations: Sequence[int] | None = None,
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int = 16,
    loss: str = "cosine",
    progress: bool = True,
    seed: int = 0,
    **options,
):
    """Fit a learned method's parameters on a frozen backbone by feature distillation.

    Each step minimises the distillation loss plus the method's
    :meth:`~tokvis.methods.base.Method.auxiliary_loss` of that forward, when
    it has one (DynamicViT's keep-ratio loss).

    Parameters
    ----------
    model : timm VisionTransformer
        The backbone; unpatched on entry and on return.  Its parameters are not
        changed (they are frozen during fitting and their ``requires_grad`` flags restored).
    method : str or LearnedMethod
        A learned method name ("dynamicvit", "sit", "patchmerger", "sinkhorn")
        or object (fitted in place, e.g. to continue fitting).
    images : Tensor [N, 3, H, W]
        Training images, transformed for the model (see :func:`augmented_images`).
    keep_rate, r, locations
        The schedule the method is fitted for (as in :func:`tokvis.patch`); soft
        methods have one output slot per kept token, so their parameters only
        fit this schedule.
    epochs : int >= 1
        Passes over ``images``.
    lr : float > 0, optional
        Adam learning rate; default: the method's ``fit_lr`` (3e-3; PatchMerger 3e-2).
    batch_size : int >= 1
    loss : {"cosine", "mse"}
        Distance between the reduced and unreduced pooled features (see
        :func:`distillation_loss`).
    progress : bool
        Show a tqdm progress bar with the running loss.
    seed : int
        Seeds the order of the images and, for a method given by name, its
        initial parameters (the method's ``seed`` option).
    **options
        Method options when ``method`` is a name.

    Returns
    -------
    LearnedMethod
        The fitted method (``method.is_fitted``), in eval mode, with
        ``method.fit_info`` (schedule, epochs, lr, per-epoch mean losses).

    Raises
    ------
    MethodOptionError
        Not a learned method, or a bad option.
    ScheduleError, UnsupportedModelError, ImageSizeError
        As :func:`tokvis.patch` and the model's forward.
    """
    import tokvis
    from tokvis.methods import create_method

    _check_common(images, batch_size, loss)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise MethodOptionError(f"epochs must be an int >= 1: got {epochs!r}")
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr))
    ):
        raise MethodOptionError(f"lr must be a positive number: got {lr!r}")
    if isinstance(method, str):
        from tokvis.methods import get_method_class
        from tokvis.methods._learned import LearnedMethod

        if not issubclass(get_method_class(method), LearnedMethod):
            _learned(get_method_class(method))  # raises the "no learned parameters" error
        method = create_method(method, **{"seed": seed, **options})
    elif options:
        raise MethodOptionError(f"options {sorted(options)} are given with a method object; set them on the object")
    method = _learned(method)
    if lr is None:
        lr = getattr(method, "fit_lr", 3e-3)
    if tokvis.is_patched(model):
        raise MethodOptionError("the model is patched; tokvis.unpatch(model) first (the teacher is the plain model)")

    was_training = model.training
    model.eval()
    teacher = _teacher(model, images, batch_size)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    tokvis.patch(model, method, keep_rate=keep_rate, r=r, locations=locations)
    method._fitting = True
    history: list[float] = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad():  # create the per-block parameters before the optimiser sees them
            model(images[:1])
        params = [p for p in method.parameters() if p.is_floating_point()]
        if not params:
            raise MethodOptionError(
                f"method {method.name!r} created no parameters: the schedule reduces nothing "
                "(keep_rate=1.0 or r=0); fit for a schedule that reduces tokens"
            )
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=float(lr))
        g = torch.Generator().manual_seed(int(seed))
        n = len(images)
        steps = epochs * math.ceil(n / batch_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"fit {method.name}", unit="batch")
        method.train()
        with torch.enable_grad():  # fitting needs autograd, also when called under no_grad
            for _ in range(epochs):
                order = torch.randperm(n, generator=g)
                total = 0.0
                for i in range(0, n, batch_size):
                    idx = order[i : i + batch_size]
                    out = pooled_features(model, images[idx])
                    value = _loss(out, teacher[idx], loss)
                    aux = method.auxiliary_loss()  # e.g. DynamicViT's keep-ratio loss; None for most methods
                    opt.zero_grad(set_to_none=True)
                    (value if aux is None else value + aux).backward()
                    opt.step()
                    total += float(value.detach()) * len(idx)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(value.detach()):.4f}")
                history.append(total / n)
        if bar is not None:
            bar.close()
    finally:
        method._fitting = False
        method.eval()
        for p, flag in flags:
            p.requires_grad_(flag)
        tokvis.unpatch(model)
        model.train(was_training)
    method.mark_fitted(True)
    method.fit_info = {
        "keep_rate": keep_rate,
        "r": list(r) if isinstance(r, (list, tuple)) else r,
        "locations": None if locations is None else [int(v) for v in locations],
        "epochs": epochs,
        "lr": float(lr),
        "loss": loss,
        "num_images": int(len(images)),
        "epoch_losses": history,
        "backbone": backbone_identity(model),
    }
    return method


def fit_to_file(
    model: nn.Module,
    method: str,
    out: str | os.PathLike,
    *,
    keep_rate: float | None = None,
    r: int | Sequence[int] | None = None,
    locations: Sequence[int] | None = None,
    options: dict[str, Any] | None = None,
    images: int = 256,
    held_out: int = 32,
    epochs: int = 3,
    lr: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Create ``method``, fit it on ``model`` and save it to ``out``: what ``tokvis fit`` does.

    ``images`` training images and ``held_out`` other ones (for the loss before and after fitting;
    0: none) are drawn by :func:`augmented_images` with seeds ``seed`` and ``seed + 1``; the method
    is created with ``seed`` and ``options`` (:func:`tokvis.create_method`), fitted with
    :func:`fit` and written by :func:`save_method`.  The ``tokvis sweep`` ``[fit]`` table calls it
    for a missing fitted file.

    Returns
    -------
    dict
        ``path``, ``epoch_losses``, ``held_out_before`` / ``held_out_after`` (``None`` without held-out
        images) and ``seconds``.
    """
    import time

    from tokvis.methods import create_method

    t0 = time.perf_counter()
    train = augmented_images(model, images, seed=seed)
    test = augmented_images(model, held_out, seed=seed + 1) if held_out else None
    schedule = dict(keep_rate=keep_rate, r=r, locations=locations)
    obj = create_method(method, **{"seed": seed, **(options or {})})
    before = after = None
    if test is not None:
        before = distillation_loss(model, obj, test, batch_size=batch_size, **schedule)
    fit(model, obj, train, epochs=epochs, lr=lr, batch_size=batch_size, progress=progress, seed=seed, **schedule)
    path = save_method(obj, out)
    if test is not None:
        after = distillation_loss(model, obj, test, batch_size=batch_size, **schedule)
    return {
        "path": path, "epoch_losses": list(obj.fit_info["epoch_losses"]), "held_out_before": before,
        "held_out_after": after, "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def augmented_images(
    model: nn.Module,
    n: int,
    *,
    seed: int = 0,
    sources: Sequence[str] = ("samples", "imagenet"),
    scale: tuple[float, float] = (0.35, 1.0),
) -> torch.Tensor:
    """``n`` training images from the bundled photos by random resized crops and flips.

    Parameters
    ----------
    model : timm VisionTransformer
        Gives the input size and normalisation (:func:`tokvis.data.data_config`).
    n : int >= 1
    seed : int
        Seeds the crops; different seeds give different (held-out) images.
    sources : sequence of {"samples", "imagenet"}
        The 6 bundled sample photos and / or the 20 ImageNet photos of
        :func:`tokvis.data.foolbox_samples`.
    scale : (float, float)
        Range of the crop area as a fraction of the photo.

    Returns
    -------
    Tensor [n, 3, H, W]
    """
    import numpy as np
    from PIL import Image

    from tokvis import data

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MethodOptionError(f"n must be an int >= 1: got {n!r}")
    photos: list[Image.Image] = []
    for s in sources:
        if s == "samples":
            photos += [im for _, im in data.load_samples()]
        elif s == "imagenet":
            photos += [im for _, im, _ in data.foolbox_samples("imagenet")]
        else:
            raise MethodOptionError(f"sources must name 'samples' and / or 'imagenet': got {s!r}")
    cfg = data.data_config(model)
    _, H, W = cfg["input_size"]
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, H, W)
    for k in range(n):
        im = photos[int(rng.integers(len(photos)))]
        w, h = im.size
        area = w * h * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = int(min(w, round(math.sqrt(area * ratio))))
        ch = int(min(h, round(math.sqrt(area / ratio))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((W, H), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out[k] = (t - mean) / std
    return out


def save_method(method, path: str | os.PathLike) -> Path:
    """Save a learned method's parameters and options to one safetensors file.

    The header metadata holds JSON: format, version, method name, options (to
    rebuild it with :func:`tokvis.create_method`), ``fit_info`` (the schedule and
    backbone it was fitted for, when fitted with :func:`fit`) and ``content_sha256``
    (:func:`tokvis.identity.content_sha256` of the tensors and the rest of the
    metadata: checked on load, and the file's identity in a run).  The header's keys
    are sorted, so the same content is the same bytes.  Written to a temporary
    file and renamed (:func:`tokvis.fileio.atomic_write`: the user's umask).

    Parameters
    ----------
    method : LearnedMethod
    path : str or PathLike

    Returns
    -------
    Path
    """
    from safetensors.torch import save

    from tokvis.fileio import atomic_write

    method = _learned(method)
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(method.state_dict().items())}
    meta = {
        "format": METHOD_FORMAT,
        "version": str(METHOD_VERSION),
        "method": method.name,
        "options": json.dumps(method.options(), sort_keys=True),
        "fit_info": json.dumps(getattr(method, "fit_info", None), sort_keys=True),
    }
    meta["content_sha256"] = content_sha256(tensors, meta)
    return atomic_write(path, canonical_safetensors(save(tensors, metadata=meta)))


def _read_method_file(path: Path) -> tuple[str, dict[str, Any], dict[str, Any] | None, dict, str]:
    """``(name, options, fit_info, tensors, content SHA-256)`` of a method file, its checksum checked."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    name, options, info = _read_method_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise WeightsError(f"{path} is not a readable safetensors file: {e}") from e
    stored = meta.pop("content_sha256", None)
    digest = content_sha256(tensors, meta)
    if meta.get("version") != "1" and stored != digest:
        raise WeightsError(
            f"{path} is damaged: its content checksum does not match (stored {str(stored)[:12]}..., the tensors and "
            f"metadata give {digest[:12]}...); fit it again (`tokvis fit`) or restore the file"
        )
    return name, options, info, tensors, digest


def _read_method_header(path: Path) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """``(method name, options, fit_info)`` from a method file's header, every check done; WeightsError else."""
    from safetensors import safe_open

    if not path.is_file():
        raise WeightsError(f"no method file at {path}; save one with tokvis.fitting.save_method or `tokvis fit`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != METHOD_FORMAT:
        raise WeightsError(f"{path} is not a tokvis method file (format {meta.get('format')!r})")
    if meta.get("version") not in READABLE_METHOD_VERSIONS:
        raise WeightsError(
            f"{path} has method-file version {meta.get('version')}; this tokvis reads versions "
            f"{', '.join(READABLE_METHOD_VERSIONS)} (a newer tokvis wrote it? upgrade tokvis)"
        )
    try:
        options = json.loads(meta["options"])
        info = json.loads(meta.get("fit_info", "null"))
        name = meta["method"]
    except (KeyError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path} has a damaged method header ({e}); fit and save it again") from e
    if not isinstance(options, dict) or not isinstance(name, str) or not isinstance(info, (dict, type(None))):
        raise WeightsError(f"{path} has a damaged method header; fit and save it again")
    return name, options, info


def load_method(path: str | os.PathLike):
    """Load a method saved by :func:`save_method` (a new method object, in eval mode).

    A file saved before one of the method's options existed gets the option's former value
    (``LearnedMethod.former_options``: e.g. SiT's ``placement="after_attn"``), so that it
    decides as it was fitted to.

    Parameters
    ----------
    path : str or PathLike

    Raises
    ------
    WeightsError
        Missing file, not a tokvis method file, unknown version, a content checksum that
        does not match (a damaged file), or tensors that do not fit the method.
    """
    from tokvis.methods import create_method

    path = Path(path)
    name, options, info, tensors, _ = _read_method_file(path)
    from tokvis.methods import get_method_class

    try:  # a file saved before an option existed was fitted with the former behaviour: load it as that
        former = getattr(get_method_class(name), "former_options", {})
    except TokvisError:
        former = {}  # an unknown name: create_method says so
    method = _learned(create_method(name, **{**{k: v for k, v in former.items() if k not in options}, **options}))
    try:
        method.load_state_dict(tensors)
    except RuntimeError as e:
        raise WeightsError(f"the tensors in {path} do not fit method {name!r}: {e}") from e
    if info is not None:
        method.fit_info = info
    method.eval()
    return method


#: SHA-256 (hex) of a file's bytes (a fitted file's identity in runs recorded before content checksums)
file_sha256 = sha256_file


def method_file_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a method file saved by :func:`save_method` holds, without building the method.

    Returns
    -------
    dict
        ``method`` (name), ``options`` (dict), ``fit_info`` (dict or ``None``: the schedule
        ``keep_rate`` / ``r`` / ``locations`` and the ``backbone`` it was fitted for), ``sha256`` (of the
        file's content, :func:`tokvis.identity.content_sha256`: its identity in a run) and ``file_sha256``
        (of its bytes).

    Raises
    ------
    WeightsError
        Missing file, not a readable safetensors file, not a tokvis method file, unknown version, a
        damaged file (content checksum).
    """
    path = Path(path)
    name, options, info, _, digest = _read_method_file(path)
    return {"method": name, "options": options, "fit_info": info, "sha256": digest, "file_sha256": sha256_file(path)}


def fit_summary(method) -> dict[str, Any]:
    """The schedule and losses a method was fitted with (empty if not fitted by :func:`fit`)."""
    return dict(getattr(method, "fit_info", None) or {})
