"""Image datasets for recording at scale: folders, bundled samples, foolbox samples, sklearn digits.

A :class:`Dataset` is an ordered list of image ids with a loader per id; images are read
only when asked for, so a dataset of 50,000 files costs a directory listing until it is
recorded.  :func:`open_dataset` understands these specifications:

``"samples"``
    the photos bundled with tokvis (:func:`tokvis.data.sample_names`);
``"foolbox-<kind>"``
    foolbox's labelled samples, e.g. ``"foolbox-imagenet"`` (foolbox is never imported);
``"digits"``
    scikit-learn's 1797 labelled 8x8 digits, scaled to 0..255 and converted to RGB;
``"crops"``
    551 deterministic square crops of the 29 photos packages ship (the 6 bundled samples,
    foolbox's 20 ImageNet photos, scikit-learn's 2 and matplotlib's 1): per photo the centre
    square, and 3 x 3 positions at 75 % and at 50 % of the short side (no labels: crops of one
    photo share content, so a k-NN label would leak).  Ids name the photo first
    (``"samples:astronaut@s0.50_r0c2"``), so analyses can split by photo (:func:`crop_photo`);
    needs foolbox installed (its files are read, it is never imported);
a directory path
    an ImageFolder (``root/<class>/<image>``; labels from the sorted folder names) when it
    has sub-folders holding images, otherwise a flat folder of images (no labels).

Image ids are strings: the sample name, ``"imagenet_07"``, ``"digits_0042"``, or the
file's path relative to the root (``"cat/0001.jpg"``).  A dataset's :attr:`Dataset.name`
and the ids travel into trace metadata and run manifests.

Unreadable files raise :class:`~tokvis.errors.DataError` naming the file; with
``skip_bad=True`` :meth:`Dataset.load` returns ``None`` for them instead and the recorder
lists what it skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tokvis.errors import DataError

__all__ = ["Dataset", "open_dataset", "crop_photo", "IMAGE_SUFFIXES", "SUPPORTED_MODES", "CROP_SCALES"]

#: ``"crops"``: (fraction of the photo's short side, positions per axis) of the square crops.
CROP_SCALES = ((1.0, 1), (0.75, 3), (0.5, 3))

#: File suffixes treated as images in folders (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: Pillow modes that convert faithfully to RGB.  Others (16-bit / float grey, ...) would be
#: clipped silently by ``convert("RGB")``, so they are refused with a clear message.
SUPPORTED_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "La")


@dataclass
class Dataset:
    """An ordered, lazily loaded image dataset.

    Parameters
    ----------
    name : str
        Short name stored in metadata and used in run directory names.
    spec : str
        The specification it was opened from (a path is made absolute).
    ids : list of str
        One id per image, unique, in recording order.
    loader : callable
        ``loader(i) -> PIL.Image.Image`` (RGB) for position ``i``; raises DataError naming
        the file when it cannot be read.
    labels : list of int, optional
        Class index per image, when the dataset has labels.
    classes : list of str, optional
        Class names (ImageFolder: the folder names, sorted).
    """

    name: str
    spec: str
    ids: list[str]
    loader: Callable[[int], Any] = field(repr=False)
    labels: list[int] | None = None
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise DataError(f"dataset {self.name!r} has duplicate image ids")
        if self.labels is not None and len(self.labels) != len(self.ids):
            raise DataError(f"dataset {self.name!r}: {len(self.labels)} labels for {len(self.ids)} images")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int, *, skip_bad: bool = False):
        """The RGB PIL image at position ``index``.

        Parameters
        ----------
        index : int
            Position in :attr:`ids`.
        skip_bad : bool, default False
            Return ``None`` instead of raising for an unreadable or unsupported file.

        Raises
        ------
        DataError
            The image cannot be read or has an unsupported mode (message names the file).
        """
        try:
            return self.loader(index)
        except DataError:
            if skip_bad:
                return None
            raise

    def subset(self, stop: int) -> "Dataset":
        """The first ``stop`` images (``limit`` of the CLI)."""
        if stop < 1:
            raise DataError(f"limit must be at least 1: got {stop}")
        if stop >= len(self):
            return self
        return Dataset(
            name=self.name,
            spec=self.spec,
            ids=self.ids[:stop],
            loader=self.loader,
            labels=None if self.labels is None else self.labels[:stop],
            classes=self.classes,
        )

    def describe(self) -> dict[str, Any]:
        """Plain JSON description (stored in run manifests)."""
        return {"name": self.name, "spec": self.spec, "num_images": len(self), "classes": self.classes}


def _read_file(path: Path):
    from PIL import Image, UnidentifiedImageError

    from tokvis.data import read_image

    try:
        with Image.open(path) as im:  # header only: refuse modes that would convert wrongly
            mode = im.mode
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image file {path}: {exc}") from exc
    if mode not in SUPPORTED_MODES:
        raise DataError(
            f"image file {path} has Pillow mode {mode!r}, which does not convert faithfully to RGB; "
            "convert it to 8-bit RGB or grey first, or pass skip_bad / --skip-bad to leave it out"
        )
    return read_image(path)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _folder_dataset(root: Path, name: str | None) -> Dataset:
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in subdirs if any(_is_image(p) for p in d.rglob("*"))]
    name = name or root.name
    if class_dirs:
        loose = [p.name for p in root.iterdir() if _is_image(p)]
        if loose:
            raise DataError(
                f"{root} mixes class folders ({', '.join(d.name for d in class_dirs[:3])}, ...) with loose images "
                f"({', '.join(loose[:3])}, ...); move the loose images into a class folder or point at one folder"
            )
        files: list[Path] = []
        labels: list[int] = []
        for label, d in enumerate(class_dirs):
            found = sorted(p for p in d.rglob("*") if _is_image(p))
            files += found
            labels += [label] * len(found)
        classes: list[str] | None = [d.name for d in class_dirs]
    else:
        files = sorted(p for p in root.iterdir() if _is_image(p))
        labels, classes = None, None  # type: ignore[assignment]
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    ids = [p.relative_to(root).as_posix() for p in files]
    return Dataset(
        name=name,
        spec=str(root.resolve()),
        ids=ids,
        loader=lambda i: _read_file(files[i]),
        labels=labels,
        classes=classes,
    )


def _samples_dataset() -> Dataset:
    from tokvis import data

    names = data.sample_names()
    return Dataset(name="samples", spec="samples", ids=names, loader=lambda i: data.load_sample(names[i]))


def _foolbox_dataset(kind: str) -> Dataset:
    from tokvis import data

    items = data.foolbox_samples(kind)  # 20 small images: read eagerly
    kind = data._canonical_kind(kind)
    return Dataset(
        name=f"foolbox-{kind}",
        spec=f"foolbox-{kind}",
        ids=[i for i, _, _ in items],
        loader=lambda i: items[i][1],
        labels=[int(lab) for _, _, lab in items],
    )


def _digits_dataset() -> Dataset:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Dataset(
        name="digits",
        spec="digits",
        ids=[f"digits_{i:04d}" for i in range(len(pixels))],
        loader=lambda i: Image.fromarray(pixels[i], mode="L").convert("RGB"),
        labels=[int(t) for t in bunch.target],
        classes=[str(c) for c in bunch.target_names],
    )


def _crop_photos() -> list[tuple[str, Any]]:
    """The photos of ``"crops"``, in a fixed order: (name, RGB PIL image)."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    from tokvis import data

    photos = [(f"samples:{n}", data.load_sample(n)) for n in data.sample_names()]
    photos += [(f"foolbox:{i}", im) for i, im, _ in data.foolbox_samples("imagenet")]
    sk = load_sample_images()
    for fname in sk.filenames:
        photos.append((f"sklearn:{Path(fname).stem}", data.read_image(fname)))
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos.append(("matplotlib:grace_hopper", data.read_image(hopper)))
    return photos


def _crops_dataset() -> Dataset:
    photos = _crop_photos()
    boxes: list[tuple[int, tuple[int, int, int, int]]] = []
    ids: list[str] = []
    for p, (pname, im) in enumerate(photos):
        w, h = im.size
        for scale, steps in CROP_SCALES:
            side = max(1, round(scale * min(w, h)))
            for row in range(steps):
                for col in range(steps):
                    x = (w - side) // 2 if steps == 1 else round(col * (w - side) / (steps - 1))
                    y = (h - side) // 2 if steps == 1 else round(row * (h - side) / (steps - 1))
                    boxes.append((p, (x, y, x + side, y + side)))
                    ids.append(f"{pname}@s{scale:.2f}_r{row}c{col}")
    return Dataset(name="crops", spec="crops", ids=ids, loader=lambda i: photos[boxes[i][0]][1].crop(boxes[i][1]))


def crop_photo(image_id: str) -> str:
    """The photo a ``"crops"`` image id was cut from (``"samples:astronaut@s0.50_r0c2"`` -> ``"samples:astronaut"``);
    other ids are returned unchanged (each image its own photo)."""
    return str(image_id).split("@", 1)[0]


def open_dataset(spec: str | os.PathLike, *, name: str | None = None) -> Dataset:
    """Open a dataset by specification (see the module docstring).

    Parameters
    ----------
    spec : str or path
        ``"samples"``, ``"foolbox-<kind>"``, ``"digits"``, ``"crops"`` or a directory.
    name : str, optional
        Override the dataset name (folders default to the folder's name).

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        Unknown specification, missing folder, empty folder, or foolbox not installed.
    """
    text = os.fspath(spec)
    if not isinstance(text, str) or not text:
        raise DataError(f"dataset must be a non-empty string or path: got {spec!r}")
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_dataset(path, name)
    if text == "samples":
        ds = _samples_dataset()
    elif text.lower().startswith("foolbox-"):
        ds = _foolbox_dataset(text[len("foolbox-") :])
    elif text == "digits":
        ds = _digits_dataset()
    elif text == "crops":
        ds = _crops_dataset()
    else:
        raise DataError(
            f"unknown dataset {text!r}: not a directory, and not one of 'samples', 'digits', "
            "'crops', 'foolbox-<kind>' (imagenet, cifar10, cifar100, mnist, fashionMNIST)"
        )
    if name:
        ds.name = name
    return ds


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split ``indices`` into consecutive batches of at most ``batch_size``."""
    idx = list(indices)
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
