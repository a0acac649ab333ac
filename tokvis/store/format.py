"""The run store's on-disk format: shard files, the manifest, checksums and input fingerprints.

Layout of a run directory (one per backbone x method x keep rate / r x dataset)::

    <run>/manifest.json          configuration, versions, dataset, shard list with checksums
    <run>/shard-00000.safetensors
    <run>/shard-00001.safetensors ...
    <run>/.tokvis.lock           only while a writer holds the run (:mod:`tokvis.store.writer`)

Shard ``k`` holds the images at dataset positions ``[k*S, (k+1)*S)`` (``S`` = shard size)
minus those skipped as unreadable.  Arrays in a shard (``n`` images, ``L`` recorded blocks,
``P`` patches):

================== ====================== =================================================================
``labels``         int16 [L, n, P]        composed token label of each patch after each block
``kept``           bool  [L, n, P]        the patch's own token is still there
``depth``          int16 [n, P]           first block after which the patch is no longer its own token
``dst.<l>``        int16 [n, n_in]        the decision's output slot per input token (rebuilds Traces)
``keep.<l>``       bool  [n, n_in]        the decision's keep flags
``score.<l>``      f32   [n, n_in]        optional: the method's ranking scores
``weight.<l>``     f32   [n, n_in]        optional: merge weights (when the method records them)
``soft.<l>``       f32   [n, n_out, n_in] optional: soft assignments (``store_soft``)
``query_soft.<l>`` f32   [n, n_out, n_in] optional, with ``soft``: query mixing (VoMix ``residual="drop"``)
``cls``            f32   [n, depth, D]    optional: class-token feature after every block
================== ====================== =================================================================

Integrity (version 2):

* a shard file's JSON header holds the image ids, skipped files, per-layer kind / ``n_in`` /
  ``n_out``, the trace metadata, the run's configuration hash, the input fingerprints and
  ``data_sha256`` (SHA-256 of the tensor bytes), so a shard can be checked on its own;
* the manifest lists each shard with the SHA-256 of the whole file (header included) and
  holds ``manifest_sha256``, the SHA-256 of its own canonical JSON: editing the configuration,
  the metadata, a shard entry or ``complete`` is caught;
* :func:`check_manifest` and :func:`check_shard` decide what is valid; :func:`tokvis.store.load_run`
  and :func:`tokvis.store.verify_run` both call them, so they cannot disagree.

Version 1 stores (no ``manifest_sha256``, no ``data_sha256``) are still read; ``verify``
notes that their metadata is not checksummed (re-record to get the full protection).

Input fingerprints: for datasets read from a folder each shard records, per image file,
``[size, mtime_ns]`` (and the file's SHA-256 with ``hash_inputs``); a resumed or rerun
recording re-records a shard whose inputs changed and says which file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tokvis.errors import TokvisError, TraceFileError
from tokvis.fileio import atomic_write, sha256_file
from tokvis.identity import code_identity
from tokvis.validate import check_float, check_int

RUN_FORMAT = "tokvis-run"
SHARD_FORMAT = "tokvis-shard"
STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LOCK_FILE = ".tokvis.lock"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_ST_DTYPES = {"I16": np.int16, "BOOL": np.bool_, "F32": np.float32, "I64": np.int64, "F16": np.float16, "U8": np.uint8}
_INT16_MAX = np.iinfo(np.int16).max


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
    amp : bool or {"fp16", "bf16"}
        Mixed precision: ``True`` / ``"fp16"`` float16 autocast (CUDA only; stored as ``True``, as before),
        ``"bf16"`` bfloat16 autocast (CUDA or CPU).
    fitted, fitted_sha256 : str, optional
        A fitted learned method's file (:func:`tokvis.fitting.save_method`, ``tokvis fit``) and the
        SHA-256 of its content (:func:`tokvis.identity.content_sha256`: the tensors and metadata, not
        the file's bytes); both or neither.  Both are part of the configuration (and its hash), so a
        run recorded with one fit is never resumed or mixed with another.
    fitted_other_backbone : bool
        Use the fitted file on a backbone other than the one it was fitted on (name, depth, width or
        patch grid differ); without it that is an error.  Part of the configuration when true.

    The configuration (:meth:`config`) also holds ``code``: the tokvis version and the method's
    ``decisions_version`` (:func:`tokvis.identity.code_identity`), so a store recorded by other code
    is never resumed or completed by this one.
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
    amp: bool | str = False
    fitted: str | None = None
    fitted_sha256: str | None = None
    fitted_other_backbone: bool = False

    def __post_init__(self) -> None:
        E = RunConfigError
        for name in ("pretrained", "scores", "cls", "soft", "fitted_other_backbone"):
            if not isinstance(getattr(self, name), bool):
                raise E(f"{name} must be true or false (a boolean): got {getattr(self, name)!r}")
        if (self.fitted is None) != (self.fitted_sha256 is None):
            raise E("give both fitted (a method file) and fitted_sha256 (its SHA-256), or neither")
        if self.fitted is not None:
            if not isinstance(self.fitted, str) or not self.fitted:
                raise E(f"fitted must be the path of a fitted-method file: got {self.fitted!r}")
            if not isinstance(self.fitted_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.fitted_sha256):
                raise E(f"fitted_sha256 must be a SHA-256 in hex (64 characters): got {self.fitted_sha256!r}")
        if self.amp not in (False, True, "fp16", "bf16"):
            raise E(f"amp must be fp16 or bf16 (or true for fp16): got {self.amp!r}")
        if self.amp == "fp16":  # the same run (and fingerprint) as the former --amp
            object.__setattr__(self, "amp", True)
        if (self.keep_rate is None) == (self.r is None):
            raise E("give exactly one of keep_rate and r for a run")
        if self.keep_rate is not None:
            check_float("keep_rate", self.keep_rate, low=0, high=1, low_open=True, error=E)
        if self.r is not None:
            rs = self.r if isinstance(self.r, list) else [self.r]
            for v in rs:
                check_int("r", v, minimum=0, error=E)
        if self.locations is not None:
            if not isinstance(self.locations, list):
                raise E(f"locations must be a list of block indices: got {self.locations!r}")
            for v in self.locations:
                check_int("locations", v, minimum=0, error=E)
        if not isinstance(self.method_options, dict):
            raise E(f"method_options must be a dict of option names to values: got {self.method_options!r}")
        if not isinstance(self.model_kwargs, dict):
            raise E(f"model_kwargs must be a dict of keyword arguments: got {self.model_kwargs!r}")
        check_int("seed", self.seed, error=E)
        check_int("shard_size", self.shard_size, minimum=1, error=E)
        if self.limit is not None:
            check_int("limit", self.limit, minimum=1, error=E)

    def config(self, dataset_name: str) -> dict[str, Any]:
        """The plain-JSON configuration stored in (and compared against) the manifest."""
        d = dataclasses.asdict(self)
        d["dataset_name"] = dataset_name
        d["keep_rate"] = None if self.keep_rate is None else float(self.keep_rate)
        if self.fitted is None:  # the configuration (and hash) of runs from before fitted files
            del d["fitted"], d["fitted_sha256"]
        if not self.fitted_other_backbone:
            del d["fitted_other_backbone"]
        d["code"] = code_identity(self.method)
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


def _tokvis_version() -> str:
    import tokvis

    return tokvis.__version__


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def json_sha256(obj: Any, *, without: str | None = None) -> str:
    """SHA-256 of ``obj``'s canonical JSON (``without``: a top-level key left out, its own checksum)."""
    if without is not None:
        obj = {k: v for k, v in obj.items() if k != without}
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def versions(model: Any = None) -> dict[str, str]:
    """The versions of the code a run is recorded with, for its manifest.

    Parameters
    ----------
    model : nn.Module, optional
        The recorded model: a ``transformers`` model (its class or one it derives from defined in
        ``transformers``) adds ``transformers``' version. Without it, or for a timm model, only
        ``tokvis``, ``torch`` and ``timm`` (transformers, an optional dependency, is not imported).

    Returns
    -------
    dict of str to str
        Package name -> version. Readers take the keys they know; manifests without ``transformers``
        (timm runs, stores from before this key) read as before.
    """
    import timm
    import torch

    import tokvis

    out = {"tokvis": tokvis.__version__, "torch": torch.__version__, "timm": timm.__version__}
    if model is not None and any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__):
        import transformers

        out["transformers"] = transformers.__version__
    return out


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def num_shards_for(num_images: int, shard_size: int) -> int:
    return -(-int(num_images) // int(shard_size))


def expected_ids(ids: Sequence[str], index: int, shard_size: int) -> list[str]:
    """The image ids shard ``index`` covers (recorded or skipped)."""
    return list(ids[index * shard_size : (index + 1) * shard_size])


# ----------------------------------------------------------------------------------------------
# input fingerprints
# ----------------------------------------------------------------------------------------------


def input_path(dataset, position: int) -> Path | None:
    """The file behind image ``position`` of a folder dataset (``None`` for built-in datasets)."""
    root = Path(dataset.spec)
    if not root.is_absolute() or not root.is_dir():
        return None
    return root / dataset.ids[position]


def fingerprint(path: Path, *, content: bool = False) -> list:
    """``[size, mtime_ns]`` of a file, plus its SHA-256 with ``content`` (``[]`` if it is gone)."""
    try:
        st = path.stat()
    except OSError:
        return []
    fp: list = [int(st.st_size), int(st.st_mtime_ns)]
    if content:
        fp.append(sha256_file(path))
    return fp


def changed_inputs(dataset, entry: dict[str, Any], ids: Sequence[str]) -> list[str]:
    """Messages naming each input of a shard entry that differs from its recorded fingerprint.

    With a recorded content hash the content decides (a touched but unchanged file is fine);
    otherwise size and modification time.
    """
    recorded = entry.get("inputs") or {}
    if not recorded:
        return []
    pos = {name: i for i, name in enumerate(ids)}
    out = []
    for name, old in sorted(recorded.items()):
        i = pos.get(name)
        path = input_path(dataset, i) if i is not None else None
        if path is None:
            continue
        new = fingerprint(path, content=len(old) > 2)
        if not new:
            out.append(f"input {path} is gone")
        elif len(old) > 2 and new[2] != old[2]:
            out.append(f"input {path} changed since it was recorded (content hash differs)")
        elif len(old) <= 2 and new[:2] != old[:2]:
            what = "size" if new[0] != old[0] else "modification time"
            out.append(f"input {path} changed since it was recorded ({what} differs)")
    return out


# ----------------------------------------------------------------------------------------------
# shard files
# ----------------------------------------------------------------------------------------------


def write_shard(path: Path, arrays: dict[str, np.ndarray], header: dict[str, Any]) -> tuple[str, int]:
    """Write a shard atomically; its header gets ``data_sha256``.  Returns (file SHA-256, bytes)."""
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    if header.get("version", STORE_VERSION) < 2:
        blob = save(arrays, metadata={"tokvis": json.dumps(header, sort_keys=True)})
    else:
        # serialise once; the data section does not depend on the header, so its digest goes into
        # the header afterwards (re-padded to 8 bytes, as safetensors does)
        probe = save(arrays)
        (n,) = struct.unpack("<Q", probe[:8])
        data = memoryview(probe)[8 + n :]
        st_header = json.loads(probe[8 : 8 + n])
        info = {**header, "data_sha256": hashlib.sha256(data).hexdigest()}
        st_header["__metadata__"] = {"tokvis": json.dumps(info, sort_keys=True)}
        text = json.dumps(st_header, separators=(",", ":"), sort_keys=True).encode()
        text += b" " * (-len(text) % 8)
        blob = b"".join([struct.pack("<Q", len(text)), text, data])
    atomic_write(path, blob)
    return hashlib.sha256(blob).hexdigest(), len(blob)


def read_shard_index(path: Path) -> tuple[dict[str, Any], dict[str, tuple[Any, tuple[int, ...], int]], int]:
    """Parse a shard's header: (tokvis header, {name: (dtype, shape, absolute offset)}, data start)."""
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
    if not isinstance(header, dict):
        raise StoreError(f"{path}: corrupt shard header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    try:
        info = json.loads(meta["tokvis"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise StoreError(f"{path}: not a tokvis shard (no 'tokvis' metadata)") from None
    if not isinstance(info, dict) or info.get("format") != SHARD_FORMAT or info.get("version") not in READABLE_VERSIONS:
        got = info.get("version") if isinstance(info, dict) else None
        raise StoreError(f"{path}: unknown shard format or version {got!r} (this tokvis reads {READABLE_VERSIONS})")
    base = 8 + n
    index = {}
    try:
        for name, t in header.items():
            start, stop = t["data_offsets"]
            dtype = _ST_DTYPES.get(t["dtype"])
            if dtype is None:
                raise StoreError(f"{path}: array {name!r} has unsupported dtype {t['dtype']}")
            shape = tuple(int(s) for s in t["shape"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if (stop - start) != nbytes or base + stop > size:
                raise StoreError(f"{path}: array {name!r} does not fit in the file (truncated or corrupt)")
            index[name] = (dtype, shape, base + start)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"{path}: corrupt shard header ({type(e).__name__}: {e})") from e
    return info, index, base


def shard_arrays_header(
    trace, cls: np.ndarray | None, *, soft: bool
) -> tuple[dict[str, np.ndarray], list[dict], dict | None]:
    """(arrays, per-layer info, trace metadata without image ids) of one shard's trace."""
    arrays, info = _shard_arrays(trace, cls, soft=soft)
    return arrays, info, {**trace.meta.to_json(), "image_ids": None}


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
        for name in ("score", "weight") + (("soft", "query_soft") if soft else ()):
            t = getattr(d, name)
            if t is not None:
                arrays[f"{name}.{d.layer}"] = t.float().numpy()
        info.append({"layer": d.layer, "kind": d.kind, "n_in": d.n_in, "n_out": int(d.n_out)})
    if cls is not None:
        arrays["cls"] = cls.astype(np.float32)
    return arrays, info


# ----------------------------------------------------------------------------------------------
# manifests
# ----------------------------------------------------------------------------------------------

_MANIFEST_KEYS = ("config", "config_hash", "num_images", "shard_size", "num_shards", "shards")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of ``run_dir``, checked by :func:`check_manifest` (StoreError otherwise)."""
    return check_manifest(load_manifest_json(run_dir), run_dir / MANIFEST)


def load_manifest_json(run_dir: Path) -> dict[str, Any]:
    """The manifest's JSON, parsed but not checked."""
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
    return m


def check_manifest(m: dict[str, Any], path: Path) -> dict[str, Any]:
    """Raise StoreError unless the manifest is intact and consistent; returns it.

    Checks the format version, its own checksum (``manifest_sha256``, version 2), the
    configuration hash, that shard entries are unique, numbered within the run and named after
    their index, and that ``complete`` says what the entries say.
    """
    version = m.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > max(READABLE_VERSIONS):
        raise StoreError(
            f"{path}: run store version {version} was written by a newer tokvis (this tokvis {_tokvis_version()} "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade tokvis to read it"
        )
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise StoreError(
            f"{path}: run store version {version!r} is not supported (this tokvis reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); record the run again with this tokvis"
        )
    for key in _MANIFEST_KEYS:
        if key not in m:
            raise StoreError(f"{path}: manifest lacks {key!r}; the run directory is corrupt")
    if version >= 2 and m.get("manifest_sha256") != json_sha256(m, without="manifest_sha256"):
        raise StoreError(
            f"{path}: manifest checksum mismatch: the manifest (configuration, metadata, shard list or "
            "'complete') was edited or is corrupt. Rerun the same record command to rebuild it from the shards"
        )
    try:
        if config_hash(m["config"]) != m["config_hash"]:
            raise StoreError(f"{path}: the configuration does not match its hash; the manifest was edited")
        n_shards = int(m["num_shards"])
        if n_shards != num_shards_for(m["num_images"], m["shard_size"]):
            raise StoreError(f"{path}: num_shards {n_shards} does not match {m['num_images']} images / shard size")
        seen = set()
        for e in m["shards"]:
            k = e["index"]
            if not isinstance(k, int) or not 0 <= k < n_shards or e["file"] != shard_file(k):
                raise StoreError(
                    f"{path}: invalid shard entry {e.get('file')!r} (index {k!r}); the manifest is corrupt"
                )
            if k in seen:
                raise StoreError(f"{path}: shard {k} is listed twice; the manifest is corrupt")
            seen.add(k)
        if bool(m.get("complete")) != (len(seen) == n_shards):
            raise StoreError(
                f"{path}: 'complete' is {m.get('complete')} but {len(seen)} of {n_shards} shards are listed; "
                "the manifest is corrupt"
            )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"{path}: malformed manifest ({type(e).__name__}: {e}); the run directory is corrupt") from e
    return m


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Sort the entries, set ``complete`` and the checksum, write atomically."""
    manifest["shards"] = sorted(manifest["shards"], key=lambda e: e["index"])
    manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]
    manifest["version"] = STORE_VERSION
    manifest["manifest_sha256"] = json_sha256(manifest, without="manifest_sha256")
    atomic_write(run_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def entry_for(path: Path, info: dict[str, Any], sha: str | None = None, size: int | None = None) -> dict[str, Any]:
    """The manifest entry of a written shard (``info``: its header)."""
    e = {
        "index": int(info["index"]),
        "file": path.name,
        "sha256": sha or sha256_file(path),
        "bytes": size if size is not None else path.stat().st_size,
        "image_ids": info["image_ids"],
        "skipped": info["skipped"],
        "layers": info["layers"],
    }
    if info.get("inputs"):
        e["inputs"] = info["inputs"]
    return e


def check_shard(path: Path, entry: dict[str, Any], manifest: dict[str, Any], *, checksum: bool = True) -> dict:
    """Raise StoreError unless the shard file matches its manifest entry; returns its header."""
    if not path.is_file():
        raise StoreError(f"shard file missing: {path} (listed in the manifest)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise StoreError(f"{path}: {size} bytes but the manifest says {entry['bytes']} (truncated or replaced)")
    if checksum and sha256_file(path) != entry["sha256"]:
        raise StoreError(f"{path}: checksum mismatch with the manifest; the shard is corrupt")
    info, index, _ = read_shard_index(path)
    check_header(path, info, index, manifest, entry)
    return info


def check_unlisted_shard(path: Path, manifest: dict[str, Any], ids: Sequence[str] | None = None) -> dict:
    """Raise StoreError unless a shard file not in the manifest is complete and belongs to the run.

    Checks its header against the run and, for version-2 shards, the tensor bytes against the
    header's ``data_sha256``; ``ids`` (the dataset's image list, when known) checks its images.
    """
    info, index, base = read_shard_index(path)
    check_header(path, info, index, manifest, None)
    match = SHARD_RE.match(path.name)
    k = info.get("index")
    if not match or k != int(match.group(1)):
        raise StoreError(f"{path}: the file name does not match the shard index {k!r} in its header")
    if "data_sha256" in info and sha256_file(path, base) != info["data_sha256"]:
        raise StoreError(f"{path}: checksum mismatch of its arrays; the shard is corrupt")
    if ids is not None:
        expect = expected_ids(ids, k, int(manifest["shard_size"]))
        got = list(info["image_ids"]) + [s["id"] for s in info["skipped"]]
        if sorted(got) != sorted(expect):
            raise StoreError(f"{path}: shard holds other images than shard {k} of this run should; move it away")
    return info


def check_header(path: Path, info: dict, index: dict, manifest: dict[str, Any], entry: dict | None) -> None:
    """The shard header agrees with the run (configuration, metadata) and with its manifest entry."""
    if info.get("run") != manifest["config_hash"]:
        raise StoreError(f"{path}: shard belongs to another configuration (hash {info.get('run')})")
    for key in ("index", "image_ids", "skipped", "layers", "inputs"):
        if entry is not None and (info.get(key) or None) != (entry.get(key) or None):
            raise StoreError(f"{path}: manifest/shard mismatch in {key!r}")
    try:
        n = len(info["image_ids"])
        if n and manifest.get("meta") is not None and info.get("meta") != manifest["meta"]:
            raise StoreError(f"{path}: manifest/shard mismatch in 'meta' (the run's metadata)")
        if n and "labels" in index:
            _, shape, _ = index["labels"]
            if shape[1] != n or shape[0] != len(info["layers"]):
                raise StoreError(
                    f"{path}: labels shape {shape} does not match {n} images x {len(info['layers'])} blocks"
                )
    except (KeyError, TypeError) as e:
        raise StoreError(f"{path}: corrupt shard header ({type(e).__name__}: {e})") from e
