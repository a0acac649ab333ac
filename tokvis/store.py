"""Run stores: sharded, resumable, verifiable recordings of one configuration over a dataset.

Layout of a run directory (one per backbone x method x keep rate / r x dataset)::

    <run>/manifest.json          configuration, versions, dataset, shard list with checksums
    <run>/shard-00000.safetensors
    <run>/shard-00001.safetensors ...

Shard ``k`` holds the images at dataset positions ``[k*S, (k+1)*S)`` (``S`` = shard size)
minus those skipped as unreadable.  Arrays in a shard (``n`` images, ``L`` recorded blocks,
``P`` patches):

============== ================= =====================================================
``labels``     int16 [L, n, P]   composed token label of each patch after each block
``kept``       bool  [L, n, P]   the patch's own token is still there
``depth``      int16 [n, P]      first block after which the patch is no longer its own token
``dst.<l>``    int16 [n, n_in]   the decision's output slot per input token (rebuilds Traces)
``keep.<l>``   bool  [n, n_in]   the decision's keep flags
``score.<l>``  f32   [n, n_in]   optional: the method's ranking scores
``weight.<l>`` f32   [n, n_in]   optional: merge weights (when the method records them)
``soft.<l>``   f32   [n, n_out, n_in]  optional: soft assignments (``store_soft``)
``cls``        f32   [n, depth, D] optional: class-token feature after every block
============== ================= =====================================================

Shard files are safetensors with a JSON header (image ids, skipped files, per-layer kind /
``n_in`` / ``n_out``, the run's configuration hash).  Every write goes to a temporary file
that is renamed into place, so a shard file that exists is complete; the manifest is
rewritten (atomically too) only after a shard is complete.  A shard file not yet listed in
the manifest (the process died between the two renames) is adopted on resume.

:func:`load_run` opens a run lazily: arrays are memory-mapped per shard and read only when
asked for.  :func:`verify_run` / :func:`verify_tree` check manifests and checksums without
changing anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tokvis.errors import TokvisError, TraceFileError

__all__ = [
    "RunSpec",
    "Run",
    "ShardView",
    "StoreError",
    "RunConfigError",
    "RunReport",
    "load_run",
    "record_run",
    "verify_run",
    "verify_tree",
    "find_runs",
]

RUN_FORMAT = "tokvis-run"
SHARD_FORMAT = "tokvis-shard"
STORE_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_ST_DTYPES = {"I16": np.int16, "BOOL": np.bool_, "F32": np.float32, "I64": np.int64, "F16": np.float16, "U8": np.uint8}
_INT16_MAX = np.iinfo(np.int16).max

#: Environment variable read by :func:`record_run`: seconds to sleep after each committed
#: shard.  Only for tests that interrupt a recording at a known point; never set it otherwise.
DELAY_ENV = "TOKVIS_RECORD_SHARD_DELAY"


class StoreError(TraceFileError):
    """A run directory is missing, incomplete, corrupt, truncated or inconsistent with its manifest."""


class RunConfigError(TokvisError, ValueError):
    """A recording configuration is invalid, or differs from the one already in the run directory."""


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines the content of a run store.

    Batch size, device, worker count and ``skip_bad`` are deliberately not part of it: they
    change how a run is computed, not what it holds, so a run may be resumed with others.

    Parameters
    ----------
    backbone : str
        Name given to :func:`tokvis.zoo.create`.
    method : str
        Registered reduction method.
    dataset : str
        Dataset specification (:func:`tokvis.datasets.open_dataset`).
    keep_rate, r, locations, method_options
        Passed to :func:`tokvis.patch`; exactly one of ``keep_rate`` and ``r``.
    pretrained : bool
        Load pretrained weights (``False``: random weights from ``seed``).
    model_kwargs : dict
        Extra keywords for :func:`tokvis.zoo.create` (``img_size``, ``depth`` ...).
    seed : int
        ``torch.manual_seed`` before the model is created.
    dataset_name : str, optional
        Overrides the dataset's own name.
    limit : int, optional
        Record only the first ``limit`` images.
    shard_size : int
        Images per shard.
    scores, cls, soft : bool
        Store ranking scores, class-token features per block, soft assignments.
    amp : bool
        Mixed precision (CUDA only).
    """

    backbone: str
    method: str
    dataset: str
    keep_rate: float | None = None
    r: int | list[int] | None = None
    locations: list[int] | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dataset_name: str | None = None
    limit: int | None = None
    shard_size: int = 256
    scores: bool = True
    cls: bool = False
    soft: bool = False
    amp: bool = False

    def __post_init__(self) -> None:
        if (self.keep_rate is None) == (self.r is None):
            raise RunConfigError("give exactly one of keep_rate and r for a run")
        if self.keep_rate is not None and not 0 < float(self.keep_rate) <= 1:
            raise RunConfigError(f"keep_rate must be in (0, 1]: got {self.keep_rate}")
        if int(self.shard_size) < 1:
            raise RunConfigError(f"shard_size must be at least 1: got {self.shard_size}")
        if self.limit is not None and int(self.limit) < 1:
            raise RunConfigError(f"limit must be at least 1: got {self.limit}")

    def config(self, dataset_name: str) -> dict[str, Any]:
        """The plain-JSON configuration stored in (and compared against) the manifest."""
        d = dataclasses.asdict(self)
        d["dataset_name"] = dataset_name
        d["keep_rate"] = None if self.keep_rate is None else float(self.keep_rate)
        return json.loads(json.dumps(d, sort_keys=True))

    def schedule_label(self) -> str:
        if self.keep_rate is not None:
            return f"keep{float(self.keep_rate):g}"
        r = self.r if isinstance(self.r, int) else "-".join(str(v) for v in self.r)  # type: ignore[union-attr]
        return f"r{r}"

    def dir_name(self, dataset_name: str) -> str:
        """``<backbone>__<method>__<keepX | rY>__<dataset>`` with unsafe characters replaced."""
        parts = [Path(self.backbone).name, self.method, self.schedule_label(), dataset_name]
        return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in parts)


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import timm
    import torch

    import tokvis

    return {"tokvis": tokvis.__version__, "torch": torch.__version__, "timm": timm.__version__}


# ----------------------------------------------------------------------------------------------
# atomic files
# ----------------------------------------------------------------------------------------------


def _atomic_write(path: Path, blob: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)  # our own temporary file, never anything already committed
        raise


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ----------------------------------------------------------------------------------------------
# shard files
# ----------------------------------------------------------------------------------------------


def _write_shard(path: Path, arrays: dict[str, np.ndarray], header: dict[str, Any]) -> tuple[str, int]:
    from safetensors.numpy import save

    blob = save(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        metadata={"tokvis": json.dumps(header, sort_keys=True)},
    )
    _atomic_write(path, blob)
    return hashlib.sha256(blob).hexdigest(), len(blob)


def _read_shard_index(path: Path) -> tuple[dict[str, Any], dict[str, tuple[Any, tuple[int, ...], int]]]:
    """Parse a shard's header: (tokvis header, {name: (dtype, shape, absolute byte offset)})."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise StoreError(f"{path}: truncated shard file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8:
                raise StoreError(f"{path}: truncated shard file (header says {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StoreError(f"shard file missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: corrupt shard header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    try:
        info = json.loads(meta["tokvis"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise StoreError(f"{path}: not a tokvis shard (no 'tokvis' metadata)") from None
    if info.get("format") != SHARD_FORMAT or info.get("version") != STORE_VERSION:
        raise StoreError(f"{path}: unknown shard format {info.get('format')!r} version {info.get('version')!r}")
    base = 8 + n
    index = {}
    for name, t in header.items():
        start, stop = t["data_offsets"]
        dtype = _ST_DTYPES.get(t["dtype"])
        if dtype is None:
            raise StoreError(f"{path}: array {name!r} has unsupported dtype {t['dtype']}")
        shape = tuple(int(s) for s in t["shape"])
        if (stop - start) != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize or base + stop > size:
            raise StoreError(f"{path}: array {name!r} does not fit in the file (truncated or corrupt)")
        index[name] = (dtype, shape, base + start)
    return info, index


class ShardView:
    """One shard of a run, read lazily (memory-mapped).

    Offers the trace-like API (``labels``, ``kept``, ``depth``, ``image_ids`` ...) for the
    images of this shard; arrays are numpy memory maps, valid while the file exists.
    """

    def __init__(self, run: "Run", entry: dict[str, Any], *, check: bool = True):
        self.run = run
        self.entry = entry
        self.path = run.path / entry["file"]
        self._check = check
        self._index: dict[str, tuple[Any, tuple[int, ...], int]] | None = None
        self._maps: dict[str, np.ndarray] = {}

    # metadata without opening the file
    @property
    def index(self) -> int:
        return int(self.entry["index"])

    @property
    def image_ids(self) -> list[str]:
        return list(self.entry["image_ids"])

    @property
    def num_images(self) -> int:
        return len(self.entry["image_ids"])

    @property
    def skipped(self) -> list[dict[str, str]]:
        return list(self.entry.get("skipped", []))

    @property
    def layers(self) -> tuple[int, ...]:
        return self.run.layers

    def _open(self) -> dict[str, tuple[Any, tuple[int, ...], int]]:
        if self._index is None:
            _check_shard(self.path, self.entry, self.run.manifest, checksum=self._check)
            self._index = _read_shard_index(self.path)[1]
        return self._index

    def array(self, name: str) -> np.ndarray:
        """The named array of this shard, memory-mapped read-only."""
        if name not in self._maps:
            index = self._open()
            if name not in index:
                raise KeyError(f"{self.path.name} has no array {name!r}; stored: {sorted(index)}")
            dtype, shape, offset = index[name]
            if int(np.prod(shape)) == 0:
                self._maps[name] = np.zeros(shape, dtype)
            else:
                self._maps[name] = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return self._maps[name]

    def has(self, name: str) -> bool:
        return name in self._open()

    def _slot(self, layer: int) -> int:
        return self.run._slot(layer)

    def labels(self, layer: int) -> np.ndarray:
        """int16 [n, P]: token holding each patch after block ``layer`` (-1 = dropped)."""
        s = self._slot(layer)
        if s < 0 or self.num_images == 0:
            return np.broadcast_to(
                np.arange(self.run.num_patches, dtype=np.int16), (self.num_images, self.run.num_patches)
            )
        return self.array("labels")[s]

    def kept(self, layer: int) -> np.ndarray:
        """bool [n, P]: the patch's own token is still there after block ``layer``."""
        s = self._slot(layer)
        if s < 0 or self.num_images == 0:
            return np.ones((self.num_images, self.run.num_patches), dtype=bool)
        return self.array("kept")[s]

    def depth(self) -> np.ndarray:
        """int16 [n, P]: first block after which each patch is no longer its own token."""
        if self.num_images == 0:
            return np.zeros((0, self.run.num_patches), np.int16)
        return self.array("depth")

    def trace(self):
        """This shard as a :class:`tokvis.trace.Trace` (decisions rebuilt from ``dst`` / ``keep``)."""
        import torch

        from tokvis.trace import LayerDecision, Trace

        decisions = []
        if self.num_images:
            for info in self.entry["layers"]:
                lay = int(info["layer"])
                opt = {}
                for name in ("score", "weight", "soft"):
                    if self.has(f"{name}.{lay}"):
                        opt[name] = torch.from_numpy(np.array(self.array(f"{name}.{lay}")))
                if info["kind"] == "soft" and "soft" not in opt:
                    raise StoreError(
                        f"{self.path}: block {lay} is a soft assignment but the run did not store it "
                        "(record with soft=True / --soft to rebuild Traces); labels/kept/depth are available"
                    )
                decisions.append(
                    LayerDecision(
                        layer=lay,
                        kind=info["kind"],
                        n_out=int(info["n_out"]),
                        dst=torch.from_numpy(self.array(f"dst.{lay}").astype(np.int64)),
                        keep=torch.from_numpy(np.array(self.array(f"keep.{lay}"))),
                        **opt,
                    )
                )
        meta = dataclasses.replace(self.run._meta_base, image_ids=self.image_ids)
        return Trace(decisions, meta)

    def __repr__(self) -> str:
        return f"ShardView({self.path.name}, images={self.num_images})"


# ----------------------------------------------------------------------------------------------
# manifests and checks
# ----------------------------------------------------------------------------------------------


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST
    if not path.is_file():
        shards = sorted(p.name for p in run_dir.glob("shard-*.safetensors")) if run_dir.is_dir() else []
        extra = f" but {len(shards)} shard file(s) are there" if shards else ""
        raise StoreError(f"{run_dir}: no {MANIFEST}{extra}; not a complete tokvis run directory")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: manifest is not valid JSON ({e}); the run directory is corrupt") from e
    if not isinstance(m, dict) or m.get("format") != RUN_FORMAT:
        raise StoreError(f"{path}: not a tokvis run manifest")
    if m.get("version") != STORE_VERSION:
        raise StoreError(
            f"{path}: run store version {m.get('version')} is not supported (this tokvis reads {STORE_VERSION})"
        )
    for key in ("config", "config_hash", "num_images", "shard_size", "num_shards", "shards"):
        if key not in m:
            raise StoreError(f"{path}: manifest lacks {key!r}; the run directory is corrupt")
    return m


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["shards"] = sorted(manifest["shards"], key=lambda e: e["index"])
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    _atomic_write(run_dir / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _check_shard(path: Path, entry: dict[str, Any], manifest: dict[str, Any], *, checksum: bool = True) -> dict:
    """Raise StoreError unless the shard file matches its manifest entry; returns its header."""
    if not path.is_file():
        raise StoreError(f"shard file missing: {path} (listed in the manifest)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise StoreError(f"{path}: {size} bytes but the manifest says {entry['bytes']} (truncated or replaced)")
    if checksum and _sha256_file(path) != entry["sha256"]:
        raise StoreError(f"{path}: checksum mismatch with the manifest; the shard is corrupt")
    info, index = _read_shard_index(path)
    _check_header(path, info, index, manifest, entry)
    return info


def _check_header(path: Path, info: dict, index: dict, manifest: dict[str, Any], entry: dict | None) -> None:
    if info.get("run") != manifest["config_hash"]:
        raise StoreError(f"{path}: shard belongs to another configuration (hash {info.get('run')})")
    for key in ("index", "image_ids", "skipped", "layers"):
        if entry is not None and info.get(key) != entry.get(key):
            raise StoreError(f"{path}: manifest/shard mismatch in {key!r}")
    n = len(info["image_ids"])
    if n and "labels" in index:
        _, shape, _ = index["labels"]
        if shape[1] != n or shape[0] != len(info["layers"]):
            raise StoreError(f"{path}: labels shape {shape} does not match {n} images x {len(info['layers'])} blocks")


def _expected_ids(manifest_or_ids: Sequence[str], index: int, shard_size: int) -> list[str]:
    return list(manifest_or_ids[index * shard_size : (index + 1) * shard_size])


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


class Run:
    """A run store opened lazily; see :func:`load_run`.

    Trace-like: ``layers``, ``grid_size``, ``num_patches``, ``num_images``, ``image_ids``,
    ``meta``, ``labels(layer)``, ``kept(layer)``, ``depth()`` as numpy arrays over all images
    (assembled shard by shard from memory maps), ``iter_shards()`` for shard-at-a-time
    analysis, and ``trace()`` to rebuild an eager :class:`tokvis.trace.Trace`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, check: bool = True):
        from tokvis.trace import TraceMeta

        self.path = path
        self.manifest = manifest
        self.config = manifest["config"]
        if manifest.get("meta") is None:
            raise StoreError(f"{path}: the run has no recorded shard yet")
        self._meta_base = TraceMeta.from_json({**manifest["meta"], "image_ids": None})
        self._shards = [ShardView(self, e, check=check) for e in manifest["shards"]]
        layer_sets = {tuple(int(i["layer"]) for i in e["layers"]) for e in manifest["shards"] if e["image_ids"]}
        if len(layer_sets) > 1:
            raise StoreError(f"{path}: shards disagree on the recorded blocks {sorted(layer_sets)}")
        self.layers: tuple[int, ...] = layer_sets.pop() if layer_sets else ()
        first = next((e for e in manifest["shards"] if e["image_ids"]), None)
        #: kind of the decision at each recorded block (as :attr:`tokvis.trace.Trace.kinds`)
        self.kinds: dict[int, str] = {int(i["layer"]): i["kind"] for i in first["layers"]} if first else {}

    @property
    def meta(self):
        return dataclasses.replace(self._meta_base, image_ids=self.image_ids)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self._meta_base.grid_size)  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_images(self) -> int:
        return sum(s.num_images for s in self._shards)

    @property
    def image_ids(self) -> list[str]:
        return [i for s in self._shards for i in s.image_ids]

    @property
    def skipped(self) -> list[dict[str, str]]:
        return [k for s in self._shards for k in s.skipped]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Run({self.path.name}: method={c['method']!r}, backbone={c['backbone']!r}, images={self.num_images}, "
            f"shards={len(self._shards)}, layers={self.layers})"
        )

    def _slot(self, layer: int) -> int:
        from tokvis.trace import check_block_index

        layer = check_block_index(layer, self._meta_base.depth)
        slot = -1
        for i, lay in enumerate(self.layers):
            if lay <= layer:
                slot = i
        return slot

    def iter_shards(self) -> Iterator[ShardView]:
        """The shards in image order; each reads its arrays lazily."""
        return iter(self._shards)

    @property
    def shards(self) -> list[ShardView]:
        return list(self._shards)

    def _cat(self, fn) -> np.ndarray:
        parts = [np.asarray(fn(s)) for s in self._shards]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_patches))

    def labels(self, layer: int) -> np.ndarray:
        """int16 [num_images, num_patches]: token holding each patch after block ``layer``; -1 = dropped."""
        self._slot(layer)
        return self._cat(lambda s: s.labels(layer))

    def kept(self, layer: int) -> np.ndarray:
        """bool [num_images, num_patches]: the patch's own token is still there after block ``layer``."""
        self._slot(layer)
        return self._cat(lambda s: s.kept(layer))

    def depth(self) -> np.ndarray:
        """int16 [num_images, num_patches]: first block after which the patch is not its own token."""
        return self._cat(lambda s: s.depth())

    def cls_features(self) -> np.ndarray:
        """float32 [num_images, depth, D]: class-token feature after every block (``cls=True`` runs)."""
        if not self.config.get("cls"):
            raise StoreError(f"{self.path}: the run did not store class-token features (record with --cls)")
        return self._cat(lambda s: s.array("cls"))

    def scores(self, layer: int) -> np.ndarray:
        """float32 [num_images, n_in]: the method's scores at recorded block ``layer`` (``scores=True``)."""
        if int(layer) not in self.layers:
            raise KeyError(f"no decision recorded at block {layer}; recorded blocks: {self.layers}")
        parts = [np.asarray(s.array(f"score.{layer}")) for s in self._shards if s.num_images]
        width = max(p.shape[1] for p in parts)
        return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts])

    def trace(self):
        """All images as one eager :class:`tokvis.trace.Trace` (loads everything; small runs only)."""
        from tokvis.trace import Trace

        traces = [s.trace() for s in self._shards if s.num_images]
        if not traces:
            raise StoreError(f"{self.path}: the run holds no images")
        return traces[0] if len(traces) == 1 else Trace.concat(traces)


def load_run(path: str | os.PathLike, *, check: bool = True, allow_incomplete: bool = False) -> Run:
    """Open a run directory lazily.

    Parameters
    ----------
    path : str or path
        The run directory (holding ``manifest.json``).
    check : bool, default True
        Verify each shard's SHA-256 against the manifest when it is first read.
    allow_incomplete : bool, default False
        Open a run whose recording has not finished (only its committed shards).

    Returns
    -------
    Run

    Raises
    ------
    StoreError
        Missing or corrupt manifest, missing or truncated shard, manifest/shard mismatch,
        or an incomplete run (unless ``allow_incomplete``).  A corrupt shard's checksum
        error is raised when that shard is read.
    """
    run_dir = Path(path)
    manifest = _read_manifest(run_dir)
    if not manifest.get("complete") and not allow_incomplete:
        raise StoreError(
            f"{run_dir}: the run is incomplete ({len(manifest['shards'])} of {manifest['num_shards']} shards); "
            "rerun the same record command to finish it, or pass allow_incomplete=True"
        )
    for e in manifest["shards"]:  # cheap checks now; checksums when read
        p = run_dir / e["file"]
        if not p.is_file():
            raise StoreError(f"shard file missing: {p} (listed in the manifest)")
        if p.stat().st_size != e["bytes"]:
            raise StoreError(f"{p}: {p.stat().st_size} bytes but the manifest says {e['bytes']} (truncated?)")
    return Run(run_dir, manifest, check=check)


# ----------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------


@dataclass
class RunReport:
    """What :func:`verify_run` found: ``status`` is "complete", "incomplete" or "corrupt"."""

    path: Path
    status: str
    shards_done: int = 0
    num_shards: int = 0
    num_images: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_run(path: str | os.PathLike) -> RunReport:
    """Check a run directory (manifest, every shard's size, checksum and header); changes nothing."""
    run_dir = Path(path)
    rep = RunReport(run_dir, "corrupt")
    try:
        manifest = _read_manifest(run_dir)
    except StoreError as e:
        rep.problems.append(str(e))
        return rep
    rep.num_shards = int(manifest["num_shards"])
    listed = set()
    for e in manifest["shards"]:
        listed.add(e["file"])
        try:
            _check_shard(run_dir / e["file"], e, manifest)
            rep.shards_done += 1
            rep.num_images += len(e["image_ids"])
        except StoreError as err:
            rep.problems.append(str(err))
    for p in sorted(run_dir.iterdir()):
        if _SHARD_RE.match(p.name) and p.name not in listed:
            try:
                info, index = _read_shard_index(p)
                _check_header(p, info, index, manifest, None)
                rep.notes.append(f"{p.name}: complete but not yet in the manifest (adopted when the run is resumed)")
            except StoreError as err:
                rep.problems.append(f"uncommitted shard: {err}")
        elif p.name.endswith(".tmp"):
            rep.notes.append(f"{p.name}: leftover temporary file of an interrupted write (safe to remove)")
    if rep.problems:
        rep.status = "corrupt"
    elif rep.shards_done == rep.num_shards and manifest.get("complete"):
        rep.status = "complete"
    else:
        rep.status = "incomplete"
    return rep


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories at or below ``root``: those with a manifest or shard files."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"no such directory: {root}")
    found = set()
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and ((p / MANIFEST).exists() or any(_SHARD_RE.match(c.name) for c in p.iterdir())):
            found.add(p)
    return sorted(found)


def verify_tree(root: str | os.PathLike) -> list[RunReport]:
    """:func:`verify_run` for every run directory at or below ``root``."""
    return [verify_run(p) for p in find_runs(root)]


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _prepare(run_dir: Path, config: dict[str, Any], ids: list[str], dataset: dict, shard_size: int) -> dict:
    """Create or validate the manifest, adopt complete uncommitted shards; returns the manifest."""
    chash = _config_hash(config)
    num_shards = -(-len(ids) // shard_size)
    if (run_dir / MANIFEST).exists():
        m = _read_manifest(run_dir)
        if m["config_hash"] != chash or m["config"] != config:
            diff = sorted(k for k in set(config) | set(m["config"]) if config.get(k) != m["config"].get(k))
            raise RunConfigError(
                f"{run_dir} holds a run with a different configuration (differs in {', '.join(diff) or 'hash'}); "
                "nothing was changed. Record into another --out directory, or move the old run away"
            )
        if m.get("ids_sha256") != _ids_hash(ids):
            raise RunConfigError(
                f"{run_dir}: the dataset's image list differs from the one this run was started on "
                f"({len(ids)} images now, {m['num_images']} then); nothing was changed"
            )
    else:
        existing = sorted(p.name for p in run_dir.glob("shard-*.safetensors")) if run_dir.is_dir() else []
        if existing:
            raise StoreError(
                f"{run_dir} has shard files ({', '.join(existing[:3])}) but no {MANIFEST}; refusing to overwrite. "
                "Run `tokvis verify` and move the directory away"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        m = {
            "format": RUN_FORMAT,
            "version": STORE_VERSION,
            "config": config,
            "config_hash": chash,
            "versions": _versions(),
            "dataset": dataset,
            "num_images": len(ids),
            "ids_sha256": _ids_hash(ids),
            "shard_size": shard_size,
            "num_shards": num_shards,
            "meta": None,
            "shards": [],
            "complete": False,
        }
        _write_manifest(run_dir, m)
    _adopt(run_dir, m, ids)
    return m


def _adopt(run_dir: Path, m: dict[str, Any], ids: list[str]) -> bool:
    """Add complete shard files missing from the manifest (written before an interruption)."""
    done = {e["index"] for e in m["shards"]}
    changed = False
    for p in sorted(run_dir.iterdir()):
        match = _SHARD_RE.match(p.name)
        if not match or int(match.group(1)) in done:
            continue
        info, index = _read_shard_index(p)
        _check_header(p, info, index, m, None)
        k = int(info["index"])
        expect = _expected_ids(ids, k, m["shard_size"])
        got = info["image_ids"] + [s["id"] for s in info["skipped"]]
        if k != int(match.group(1)) or sorted(got) != sorted(expect):
            raise StoreError(f"{p}: shard holds other images than shard {k} of this run should; move it away")
        m["shards"].append(_entry(p, info))
        if m.get("meta") is None and info.get("meta") is not None:
            m["meta"] = info["meta"]
        done.add(k)
        changed = True
    if changed:
        _write_manifest(run_dir, m)
    return changed


def _entry(path: Path, info: dict[str, Any], sha: str | None = None, size: int | None = None) -> dict[str, Any]:
    return {
        "index": int(info["index"]),
        "file": path.name,
        "sha256": sha or _sha256_file(path),
        "bytes": size if size is not None else path.stat().st_size,
        "image_ids": info["image_ids"],
        "skipped": info["skipped"],
        "layers": info["layers"],
    }


def _shard_arrays(trace, cls: np.ndarray | None, *, soft: bool) -> tuple[dict[str, np.ndarray], list[dict]]:
    P = trace.num_patches
    if P > _INT16_MAX:
        raise RunConfigError(f"{P} patches per image do not fit the store's int16 labels (at most {_INT16_MAX})")
    arrays: dict[str, np.ndarray] = {}
    layers = list(trace.layers)
    arrays["labels"] = (
        np.stack([trace.labels(lay).numpy().astype(np.int16) for lay in layers])
        if layers
        else (np.zeros((0, trace.num_images, P), np.int16))
    )
    arrays["kept"] = (
        np.stack([trace.kept(lay).numpy() for lay in layers]) if layers else np.zeros((0, trace.num_images, P), bool)
    )
    arrays["depth"] = trace.depth().numpy().astype(np.int16)
    info = []
    for d in trace.decisions:
        arrays[f"dst.{d.layer}"] = d.dst.numpy().astype(np.int16)
        arrays[f"keep.{d.layer}"] = d.keep.numpy()
        for name in ("score", "weight") + (("soft",) if soft else ()):
            t = getattr(d, name)
            if t is not None:
                arrays[f"{name}.{d.layer}"] = t.float().numpy()
        info.append({"layer": d.layer, "kind": d.kind, "n_in": d.n_in, "n_out": int(d.n_out)})
    if cls is not None:
        arrays["cls"] = cls.astype(np.float32)
    return arrays, info


class _ClsHooks:
    """Forward hooks collecting the class token after every block (our own hooks, removed on exit)."""

    def __init__(self, model):
        self.model, self.handles, self.out = model, [], {}

    def __enter__(self):
        for i, blk in enumerate(self.model.blocks):
            self.handles.append(
                blk.register_forward_hook(lambda m, a, o, i=i: self.out.__setitem__(i, o[:, 0].detach()))
            )
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def take(self) -> np.ndarray:
        import torch

        feats = torch.stack([self.out[i] for i in range(len(self.model.blocks))], 1).float().cpu().numpy()
        self.out = {}
        return feats


def _resolve_device(device: str, ctx) -> str:
    import torch

    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise RunConfigError(f"device must be cpu, cuda, cuda:<n> or auto: got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunConfigError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
        if device == "cuda" and ctx is not None and ctx.distributed:
            device = f"cuda:{ctx.local_rank}"
    return device


@dataclass
class RunResult:
    """What :func:`record_run` did (``status``: "recorded", "resumed" or "already complete")."""

    path: Path
    status: str
    num_images: int
    shards_recorded: int
    num_shards: int
    seconds: float
    skipped: list[dict[str, str]]


def record_run(
    model,
    dataset,
    spec: RunSpec,
    out: str | os.PathLike,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    skip_bad: bool = False,
    workers: int = 0,
    progress: bool = True,
    ctx=None,
    log=print,
) -> RunResult:
    """Record ``spec`` on ``dataset`` into ``out/<spec.dir_name>``, resuming what is there.

    Parameters
    ----------
    model : timm VisionTransformer
        Already patched with ``spec``'s method (see :func:`execute` for the whole pipeline).
    dataset : tokvis.datasets.Dataset
        Images to record (``spec.limit`` applied by the caller).
    spec : RunSpec
        The configuration; must match an existing run directory's.
    out : path
        Parent folder of the run directory.
    batch_size : int
        Images per forward pass (shards are split into batches; results do not depend on it).
    device : {"cpu", "cuda", "auto"}
    skip_bad : bool
        Leave unreadable images out (listed in the manifest) instead of stopping.
    workers : int
        DataLoader worker processes for image decoding (0: in this process).
    ctx : tokvis.distributed.Context, optional
        Rank / world size (default: :func:`tokvis.distributed.setup` was not called: one process).

    Returns
    -------
    RunResult
    """
    import torch

    from tokvis import distributed as D
    from tokvis.data import transform_for
    from tokvis.recording import record

    ctx = ctx or D.Context()
    if batch_size < 1:
        raise RunConfigError(f"batch_size must be at least 1: got {batch_size}")
    device = _resolve_device(device, ctx)
    if spec.amp and not device.startswith("cuda"):
        raise RunConfigError("--amp (mixed precision) needs a CUDA device; drop --amp to record on the CPU")
    config = spec.config(dataset.name)
    run_dir = Path(out) / spec.dir_name(dataset.name)
    ids = list(dataset.ids)
    t0 = time.perf_counter()

    state: Any = None
    if ctx.is_main:
        try:
            m = _prepare(run_dir, config, ids, dataset.describe(), int(spec.shard_size))
            done = {e["index"] for e in m["shards"]}
            state = ("ok", [k for k in range(m["num_shards"]) if k not in done], len(done) > 0)
        except TokvisError as e:
            state = ("error", f"{type(e).__name__}", str(e))
    state = D.broadcast_object(ctx, state)
    if state[0] == "error":
        cls = RunConfigError if state[1] == "RunConfigError" else StoreError
        raise cls(state[2])
    pending, had_some = state[1], state[2]
    num_shards = -(-len(ids) // int(spec.shard_size))
    if not pending:
        if ctx.is_main:
            log(f"{run_dir}: already complete ({len(ids)} images, {num_shards} shards); nothing to do")
        return RunResult(run_dir, "already complete", len(ids), 0, num_shards, 0.0, [])
    mine = D.assign(pending, ctx)

    model = model.to(device).eval()
    transform = transform_for(model)
    S = int(spec.shard_size)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)

    class _Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            img = dataset.load(i, skip_bad=False) if not skip_bad else dataset.load(i, skip_bad=True)
            return i, (None if img is None else transform(img))

    def _error_of(i: int) -> str:
        try:
            dataset.load(i)
        except TokvisError as e:
            return str(e)
        return "unreadable"

    batches, owner = [], []
    for k in mine:
        positions = list(range(k * S, min((k + 1) * S, len(ids))))
        for j in range(0, len(positions), batch_size):
            batches.append(positions[j : j + batch_size])
            owner.append(k)
    loader = torch.utils.data.DataLoader(
        _Images(), batch_sampler=batches, num_workers=workers, collate_fn=lambda items: items
    )
    has_cls = bool(getattr(model, "cls_token", None) is not None)
    if spec.cls and not has_cls:
        raise RunConfigError("cls=True needs a model with a class token; this model has none")
    from tqdm import tqdm

    n_mine = sum(len(b) for b in batches)
    bar = tqdm(total=n_mine, desc=f"{run_dir.name} [rank {ctx.rank}]" if ctx.distributed else run_dir.name,
               unit="img", disable=not progress, leave=False)  # fmt: skip
    m = _read_manifest(run_dir) if ctx.is_main else None
    cur: dict[str, Any] = {"k": None, "traces": [], "cls": [], "ids": [], "skipped": []}
    recorded = 0
    autocast = torch.autocast("cuda", dtype=torch.float16) if spec.amp else _null()

    def _finish() -> None:
        nonlocal recorded
        k = cur["k"]
        arrays, layer_info, meta_json = {}, [], None
        if cur["traces"]:
            from tokvis.trace import Trace

            tr = cur["traces"][0] if len(cur["traces"]) == 1 else Trace.concat(cur["traces"])
            cls_arr = np.concatenate(cur["cls"]) if cur["cls"] else None
            arrays, layer_info = _shard_arrays(tr, cls_arr, soft=spec.soft)
            meta_json = {**tr.meta.to_json(), "image_ids": None}
        header = {
            "format": SHARD_FORMAT,
            "version": STORE_VERSION,
            "run": _config_hash(config),
            "index": k,
            "image_ids": cur["ids"],
            "skipped": cur["skipped"],
            "layers": layer_info,
            "meta": meta_json,
        }
        path = run_dir / shard_file(k)
        sha, size = _write_shard(path, arrays, header)
        if ctx.is_main:  # only rank 0 touches the manifest; other ranks' shards are adopted at the end
            m["shards"].append(_entry(path, header, sha, size))
            if m.get("meta") is None and meta_json is not None:
                m["meta"] = meta_json
            _write_manifest(run_dir, m)
        recorded += 1
        cur.update(k=None, traces=[], cls=[], ids=[], skipped=[])
        if delay:
            time.sleep(delay)

    try:
        with torch.inference_mode(), _ClsHooks(model) if spec.cls else _null() as hooks:
            for b, items in enumerate(loader):
                k = owner[b]
                if cur["k"] is not None and cur["k"] != k:
                    _finish()
                cur["k"] = k
                good = [(i, x) for i, x in items if x is not None]
                for i, x in items:
                    if x is None:
                        cur["skipped"].append({"id": ids[i], "error": _error_of(i)})
                if good:
                    bids = [ids[i] for i, _ in good]
                    x = torch.stack([t for _, t in good]).to(device, non_blocking=True)
                    with record(model, image_ids=bids, dataset=dataset.name, store_scores=spec.scores) as rec:
                        with autocast:
                            model(x)
                    cur["traces"].append(rec.trace)
                    if spec.cls:
                        cur["cls"].append(hooks.take())
                    cur["ids"].extend(bids)
                bar.update(len(items))
            if cur["k"] is not None:
                _finish()
    finally:
        bar.close()
    D.barrier(ctx)
    if ctx.is_main:
        m = _read_manifest(run_dir)
        _adopt(run_dir, m, ids)
        if not m["complete"]:
            raise StoreError(
                f"{run_dir}: {len(m['shards'])} of {m['num_shards']} shards after recording; rerun to finish"
            )
    D.barrier(ctx)
    m = _read_manifest(run_dir)
    skipped = [s for e in m["shards"] for s in e["skipped"]]
    if ctx.is_main and skipped:
        log(f"{run_dir.name}: skipped {len(skipped)} unreadable image(s):")
        for s in skipped:
            log(f"  {s['id']}: {s['error']}")
    status = "resumed" if had_some else "recorded"
    n_images = sum(len(e["image_ids"]) for e in m["shards"])
    return RunResult(run_dir, status, n_images, recorded, m["num_shards"], time.perf_counter() - t0, skipped)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def execute(
    spec: RunSpec,
    out: str | os.PathLike,
    *,
    model=None,
    batch_size: int = 32,
    device: str = "cpu",
    skip_bad: bool = False,
    workers: int = 0,
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
    kw: dict[str, Any] = dict(spec.method_options)
    if spec.locations is not None:
        kw["locations"] = list(spec.locations)
    tokvis.patch(model, spec.method, keep_rate=spec.keep_rate, r=spec.r, **kw)
    try:
        return record_run(
            model, dataset, spec, out, batch_size=batch_size, device=device, skip_bad=skip_bad,
            workers=workers, progress=progress, ctx=ctx, log=log,
        )  # fmt: skip
    finally:
        tokvis.unpatch(model)


def build_model(spec: RunSpec):
    """The unpatched backbone of ``spec`` (seeded, so random weights are the same in every process)."""
    import torch

    from tokvis import zoo

    torch.manual_seed(int(spec.seed))
    return zoo.create(spec.backbone, pretrained=bool(spec.pretrained), **dict(spec.model_kwargs))
