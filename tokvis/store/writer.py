"""Writing run stores: the per-run lock, resuming, repairing, and recording shards.

One writer per run directory at a time: :class:`RunLock` holds an OS advisory lock
(``fcntl.flock``) on ``<run>/.tokvis.lock`` for as long as the recording runs, and writes the
holder's pid, host, start time and command into that file for the message a second writer
gets (:class:`RunLockedError`).  The kernel releases the lock when its process dies, so a lock
left by ``kill -9`` is taken over by the next writer (which says whose it was).  Under
``torchrun`` rank 0 holds the lock for all ranks of the run.  ``flock`` works on local file
systems and on NFS v4; on file systems without it, run one writer per run directory.

Before recording, rank 0 checks what is there (:func:`prepare`): a listed shard that fails its
checksum, is missing, or whose input files changed (size / modification time, or content with
``hash_inputs``) is set aside (``shard-XXXXX.safetensors.damaged`` / ``.stale``) and
recorded again; an edited or corrupt manifest is set aside (``manifest.json.damaged``) and
rebuilt from the shards that belong to this configuration; complete shard files not yet in
the manifest (the process died between the two renames) are adopted.  Every repair is logged.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tokvis.errors import TokvisError
from tokvis.identity import describe_code
from tokvis.store.format import (
    LOCK_FILE,
    MANIFEST,
    RUN_FORMAT,
    SHARD_FORMAT,
    SHARD_RE,
    STORE_VERSION,
    RunConfigError,
    RunSpec,
    StoreError,
    changed_inputs,
    check_manifest,
    check_shard,
    check_unlisted_shard,
    config_hash,
    entry_for,
    fingerprint,
    ids_hash,
    input_path,
    load_manifest_json,
    num_shards_for,
    read_shard_index,
    shard_arrays_header,
    shard_file,
    versions,
    write_manifest,
    write_shard,
)
from tokvis.store.models import amp_context
from tokvis.validate import check_int

#: Environment variable read by :func:`record_run`: seconds to sleep after each committed
#: shard.  Only for tests that interrupt a recording at a known point; never set it otherwise.
DELAY_ENV = "TOKVIS_RECORD_SHARD_DELAY"


class RunLockedError(TokvisError, RuntimeError):
    """Another process is recording into the same run directory."""


# ----------------------------------------------------------------------------------------------
# the lock
# ----------------------------------------------------------------------------------------------


class RunLock:
    """Exclusive lock of one run directory (see the module docstring); a context manager."""

    def __init__(self, run_dir: Path, *, log: Callable[..., None] = print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.log = log
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> "RunLock":
        import fcntl

        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunConfigError(f"{self.run_dir} exists and is not a directory; give another --out")
        self._created_dir = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise RunConfigError(f"cannot create the run directory {self.run_dir}: {e}; give another --out") from e
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.run_dir} is being recorded by another process ({_describe(holder)}); nothing was "
                    "changed. Wait for it to finish or stop it, then rerun (a lock left by a process that died "
                    "is taken over automatically)"
                ) from None
            try:  # the holder before us may have removed the file between our open and flock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - only under a storm of writers
            raise RunLockedError(f"{self.run_dir}: could not take the run lock; try again")
        previous = _read_holder(fd)
        if previous:
            self.log(f"{self.run_dir}: took over the lock left by {_describe(previous)}; that process is gone")
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv[:1] + sys.argv[1:8]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and unlock; an empty run directory this lock created is removed too."""
        if self._fd is None:
            return
        import fcntl

        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only if nothing was written (e.g. a failed start)
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def recording_now(run_dir: Path) -> str | None:
    """Who is recording into ``run_dir`` now (the lock holder, described), or None when nobody holds its lock.

    Parameters
    ----------
    run_dir : path
        A run directory.
    """
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_read_holder(fd))
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    text = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
    return text + (f": {holder['command']}" if holder.get("command") else "")


# ----------------------------------------------------------------------------------------------
# preparing a run directory: create, check, repair, adopt
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What :func:`prepare` found: shards still to record, whether some existed, what it repaired."""

    pending: list[int]
    had_some: bool
    repaired: list[str] = field(default_factory=list)


def _set_aside(path: Path, suffix: str) -> str:
    target = path.with_name(path.name + suffix)
    os.replace(path, target)
    return target.name


def _new_manifest(
    config: dict, ids: list[str], dataset: dict, shard_size: int, code_versions: dict[str, str]
) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "version": STORE_VERSION,
        "config": config,
        "config_hash": config_hash(config),
        "versions": code_versions,
        "dataset": dataset,
        "num_images": len(ids),
        "ids_sha256": ids_hash(ids),
        "shard_size": shard_size,
        "num_shards": num_shards_for(len(ids), shard_size),
        "meta": None,
        "shards": [],
        "complete": False,
    }


def prepare(run_dir: Path, config: dict[str, Any], dataset, shard_size: int, *, log=print, model: Any = None) -> Plan:
    """Create, check and repair the manifest of ``run_dir`` (the caller holds the lock; ``model``: the recorded
    model, whose family's library versions a new manifest records, see :func:`~tokvis.store.format.versions`)."""
    ids = list(dataset.ids)
    chash = config_hash(config)
    shard_files = sorted(p for p in run_dir.iterdir() if SHARD_RE.match(p.name))
    repaired: list[str] = []
    m: dict[str, Any] | None = None
    rebuild_reason = None
    if (run_dir / MANIFEST).exists():
        try:
            m = load_manifest_json(run_dir)
            if m.get("config_hash") == chash:  # another configuration's manifest is refused below, unchanged
                m = check_manifest(m, run_dir / MANIFEST)
            elif _shards_are_of(shard_files, chash):
                other = m.get("config") if isinstance(m.get("config"), dict) else {}
                diff = sorted(k for k in set(config) | set(other) if config.get(k) != other.get(k))
                rebuild_reason, m = (
                    (
                        f"{run_dir / MANIFEST} does not match its shards: they were recorded with this configuration, "
                        f"the manifest describes another run (differs in {', '.join(diff) or 'hash'}; copied from "
                        "another run?)"
                    ),
                    None,
                )
        except StoreError as e:
            rebuild_reason, m = str(e), None
    elif shard_files:
        rebuild_reason = f"{run_dir}: no {MANIFEST} but {len(shard_files)} shard file(s)"
    if m is not None:
        old = m.get("config") if isinstance(m.get("config"), dict) else {}
        if m.get("config_hash") != chash or old != config:
            diff = sorted(k for k in set(config) | set(old) if config.get(k) != old.get(k))
            if old.get("code") != config.get("code") and {k for k in diff if k != "code"} <= {"fitted_sha256"}:
                raise RunConfigError(
                    f"{run_dir} was recorded by other code ({describe_code(old.get('code'), m.get('versions'))}); "
                    f"this is {describe_code(config.get('code'))}, whose decisions may differ. Nothing was changed; "
                    "the old run stays readable. Record into another --out directory, or move the old run away "
                    "to record it again with this tokvis"
                )
            raise RunConfigError(
                f"{run_dir} holds a run with a different configuration (differs in {', '.join(diff) or 'hash'}); "
                "nothing was changed. Record into another --out directory, or move the old run away"
            )
        if m.get("ids_sha256") != ids_hash(ids):
            raise RunConfigError(
                f"{run_dir}: the dataset's image list differs from the one this run was started on "
                f"({len(ids)} images now, {m['num_images']} then); nothing was changed"
            )
    else:
        for p in shard_files:  # refuse before changing anything if a shard is another run's
            try:
                info = read_shard_index(p)[0]
            except StoreError:
                continue  # unreadable: set aside below
            if info.get("run") != chash:
                raise StoreError(
                    f"{run_dir} has no valid {MANIFEST} and its shard {p.name} belongs to another configuration; "
                    "refusing to overwrite. Run `tokvis verify` and move the directory away"
                )
        if rebuild_reason:
            if (run_dir / MANIFEST).exists():
                _set_aside(run_dir / MANIFEST, ".damaged")
            msg = f"{rebuild_reason}; the manifest was rebuilt from the shard files of this configuration"
            repaired.append(msg)
            log(msg)
        m = _new_manifest(config, ids, dataset.describe(), shard_size, versions(model))
    had_some = bool(m["shards"]) or bool(shard_files)
    keep = []
    for e in m["shards"]:
        path = run_dir / e["file"]
        try:
            check_shard(path, e, m)
            problems = changed_inputs(dataset, e, ids)
            suffix = ".stale"
        except StoreError as err:
            problems, suffix = [str(err)], ".damaged"
        if not problems:
            keep.append(e)
            continue
        where = f"; set aside as {_set_aside(path, suffix)}" if path.exists() else ""
        msg = f"shard {e['index']}: {'; '.join(problems)}{where}; recording it again"
        repaired.append(msg)
        log(f"{run_dir.name}: {msg}")
    changed = len(keep) != len(m["shards"]) or rebuild_reason is not None
    m["shards"] = keep
    changed |= adopt(run_dir, m, dataset, log=log, repaired=repaired)
    if changed or not (run_dir / MANIFEST).exists():
        write_manifest(run_dir, m)
    done = {e["index"] for e in m["shards"]}
    return Plan([k for k in range(m["num_shards"]) if k not in done], had_some, repaired)


def _shards_are_of(shard_files: list[Path], chash: str) -> bool:
    """Every readable shard file was recorded with configuration ``chash`` (and there is at least one)."""
    runs = set()
    for p in shard_files:
        try:
            runs.add(read_shard_index(p)[0].get("run"))
        except StoreError:
            continue
    return runs == {chash}


def adopt(run_dir: Path, m: dict[str, Any], dataset, *, log=print, repaired: list[str] | None = None) -> bool:
    """Add valid shard files missing from the manifest (written before an interruption).

    A shard file that is unreadable, corrupt or recorded from inputs that changed since is set
    aside (and recorded again); one of another configuration or image list is refused.
    """
    ids = list(dataset.ids)
    done = {e["index"] for e in m["shards"]}
    changed = False
    for p in sorted(run_dir.iterdir()):
        match = SHARD_RE.match(p.name)
        if not match or int(match.group(1)) in done:
            continue
        try:
            info = check_unlisted_shard(p, m, ids)
        except StoreError as err:
            if "another configuration" in str(err) or "other images" in str(err):
                raise
            problems, suffix = [str(err)], ".damaged"
        else:
            e = entry_for(p, info)
            problems, suffix = changed_inputs(dataset, e, ids), ".stale"
        if problems:
            msg = f"{p.name}: {'; '.join(problems)}; set aside as {_set_aside(p, suffix)}; recording it again"
            log(f"{run_dir.name}: {msg}")
            if repaired is not None:
                repaired.append(msg)
            continue
        m["shards"].append(e)
        if m.get("meta") is None and info.get("meta") is not None and info["image_ids"]:
            m["meta"] = info["meta"]
        done.add(e["index"])
        changed = True
    return changed


# ----------------------------------------------------------------------------------------------
# recording
# ----------------------------------------------------------------------------------------------


class _ClsHooks:
    """Forward hooks collecting the class token after every block (our own hooks, removed on exit).

    The blocks are the model's family adapter's (:meth:`~tokvis.backbones.base.Backbone.blocks`): timm's
    ``model.blocks`` or a ``transformers`` model's encoder layers alike.
    """

    def __init__(self, model):
        from tokvis.backbones import backbone_for

        self.blocks = list(backbone_for(model).blocks(model))
        self.handles, self.out = [], {}

    def __enter__(self):
        for i, blk in enumerate(self.blocks):
            self.handles.append(blk.register_forward_hook(lambda m, a, o, i=i: self._keep(i, o)))
        return self

    def _keep(self, i: int, out) -> None:
        hidden = out[0] if isinstance(out, tuple) else out  # a layer returning (hidden states, ...)
        self.out[i] = hidden[:, 0].detach()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def take(self) -> np.ndarray:
        import torch

        feats = torch.stack([self.out[i] for i in range(len(self.blocks))], 1).float().cpu().numpy()
        self.out = {}
        return feats


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@dataclass
class RunResult:
    """What :func:`record_run` did.

    ``status``: "recorded", "resumed", "repaired" (damaged, missing or stale shards recorded
    again; ``repaired`` says which and why) or "already complete".
    """

    path: Path
    status: str
    num_images: int
    shards_recorded: int
    num_shards: int
    seconds: float
    skipped: list[dict[str, str]]
    repaired: list[str] = field(default_factory=list)


class _ShardRecorder:
    """Records this process's shards: forward passes batch by batch, one shard file at a time."""

    def __init__(self, model, dataset, spec: RunSpec, run_dir: Path, *, device, ctx, hash_inputs, skip_bad):
        self.model, self.dataset, self.spec, self.run_dir = model, dataset, spec, run_dir
        self.device, self.ctx, self.hash_inputs, self.skip_bad = device, ctx, hash_inputs, skip_bad
        self.ids = list(dataset.ids)
        self.chash = config_hash(spec.config(dataset.name))
        self.manifest = load_manifest_json(run_dir) if ctx.is_main else None
        self.recorded = 0
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        self._reset(None)

    def _reset(self, k: int | None) -> None:
        self.k, self.traces, self.cls, self.rec_ids, self.skipped = k, [], [], [], []

    def _inputs(self, k: int) -> dict[str, list] | None:
        S = int(self.spec.shard_size)
        out = {}
        for i in range(k * S, min((k + 1) * S, len(self.ids))):
            path = input_path(self.dataset, i)
            if path is None:
                return None
            out[self.ids[i]] = fingerprint(path, content=self.hash_inputs)
        return out

    def run(self, shards: list[int], *, batch_size: int, workers: int, bar) -> None:
        import torch

        from tokvis.data import transform_for
        from tokvis.recording import record

        dataset, ids, skip_bad = self.dataset, self.ids, self.skip_bad
        transform = transform_for(self.model)

        class _Images(torch.utils.data.Dataset):
            def __len__(self):
                return len(ids)

            def __getitem__(self, i):
                img = dataset.load(i, skip_bad=skip_bad)
                return i, (None if img is None else transform(img))

        S = int(self.spec.shard_size)
        # fingerprints before any image is read: a file changed meanwhile is caught on the next run
        self.inputs = {k: self._inputs(k) for k in shards}
        batches, owner = [], []
        for k in shards:
            positions = list(range(k * S, min((k + 1) * S, len(ids))))
            for j in range(0, len(positions), batch_size):
                batches.append(positions[j : j + batch_size])
                owner.append(k)
        loader = torch.utils.data.DataLoader(
            _Images(), batch_sampler=batches, num_workers=workers, collate_fn=lambda items: items
        )
        spec = self.spec
        autocast = amp_context(spec, self.device)
        with torch.inference_mode(), _ClsHooks(self.model) if spec.cls else _null() as hooks:
            for b, items in enumerate(loader):
                if self.k is not None and self.k != owner[b]:
                    self._flush()
                self.k = owner[b]
                for i, x in items:
                    if x is None:
                        self.skipped.append({"id": ids[i], "error": self._error_of(i)})
                good = [(i, x) for i, x in items if x is not None]
                if good:
                    bids = [ids[i] for i, _ in good]
                    x = torch.stack([t for _, t in good]).to(self.device, non_blocking=True)
                    with record(self.model, image_ids=bids, dataset=dataset.name, store_scores=spec.scores) as rec:
                        with autocast:
                            self.model(x)
                    # without soft=True the shard stores no [n, n_out, n_in] matrices: hold none of VoMix's
                    # query mixing (kind "prune") until the shard is written (soft decisions need theirs)
                    self.traces.append(rec.trace if spec.soft else _without_query_soft(rec.trace))
                    if spec.cls:
                        self.cls.append(hooks.take())
                    self.rec_ids.extend(bids)
                bar.update(len(items))
            if self.k is not None:
                self._flush()

    def _error_of(self, i: int) -> str:
        try:
            self.dataset.load(i)
        except TokvisError as e:
            return str(e)
        return "unreadable"

    def _flush(self) -> None:
        """Write the current shard; rank 0 also commits it to the manifest."""
        k = self.k
        arrays, layer_info, meta_json = {}, [], None
        if self.traces:
            from tokvis.trace import Trace

            tr = self.traces[0] if len(self.traces) == 1 else Trace.concat(self.traces)
            cls_arr = np.concatenate(self.cls) if self.cls else None
            arrays, layer_info, meta_json = shard_arrays_header(tr, cls_arr, soft=self.spec.soft)
        header = {
            "format": SHARD_FORMAT,
            "version": STORE_VERSION,
            "run": self.chash,
            "index": k,
            "image_ids": self.rec_ids,
            "skipped": self.skipped,
            "layers": layer_info,
            "meta": meta_json,
        }
        if self.inputs.get(k):
            header["inputs"] = self.inputs[k]
        path = self.run_dir / shard_file(k)
        sha, size = write_shard(path, arrays, header)
        m = self.manifest
        if m is not None:  # only rank 0 touches the manifest; other ranks' shards are adopted at the end
            m["shards"].append(entry_for(path, header, sha, size))
            if m.get("meta") is None and meta_json is not None:
                m["meta"] = meta_json
            write_manifest(self.run_dir, m)
        self.recorded += 1
        self._reset(None)
        if self.delay:
            time.sleep(self.delay)


def _refuse_empty(run_dir: Path, m: dict[str, Any]) -> None:
    """Every image was skipped as unreadable: remove the (empty) shards, leave the run incomplete, raise."""
    from tokvis.errors import DataError

    skipped = [s for e in m["shards"] for s in e["skipped"]]
    for e in m["shards"]:
        (run_dir / e["file"]).unlink(missing_ok=True)
    m["shards"] = []
    write_manifest(run_dir, m)
    first = f" (first: {skipped[0]['id']}: {skipped[0]['error']})" if skipped else ""
    raise DataError(
        f"{run_dir}: no readable image: all {len(skipped)} images were unreadable and skipped{first}; nothing was "
        "recorded. Check the input images"
    )


_ERRORS = {cls.__name__: cls for cls in (RunConfigError, StoreError, RunLockedError)}


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
    hash_inputs: bool = False,
    progress: bool = True,
    ctx=None,
    log=print,
) -> RunResult:
    """Record ``spec`` on ``dataset`` into ``out/<spec.dir_name>``, resuming or repairing what is there.

    Parameters
    ----------
    model : timm VisionTransformer
        Already patched with ``spec``'s method (``tokvis.commands._run.execute`` does the whole
        pipeline: model, patching, devices, torchrun).
    dataset : tokvis.datasets.Dataset
        Images to record (``spec.limit`` applied by the caller).
    spec : RunSpec
        The configuration; must match an existing run directory's.
    out : path
        Parent folder of the run directory.
    batch_size : int
        Images per forward pass (shards are split into batches; results do not depend on it).
    device : str
        A torch device ("cpu", "cuda", "cuda:1" ...), already resolved.
    skip_bad : bool
        Leave unreadable images out (listed in the manifest) instead of stopping.
    workers : int
        DataLoader worker processes for image decoding (0: in this process).
    hash_inputs : bool
        Fingerprint input files by content (SHA-256) as well as size and modification time.
    ctx : tokvis.distributed.Context, optional
        Rank / world size (default: one process).

    Returns
    -------
    RunResult

    Raises
    ------
    RunLockedError
        Another process is recording into the same run directory.
    RunConfigError
        Bad arguments, or the run directory holds another configuration or image list.
    StoreError
        The run directory cannot be repaired (e.g. shards of another configuration, no manifest).
    """
    import torch
    from tqdm import tqdm

    from tokvis import distributed as D

    ctx = ctx or D.Context()
    check_int("batch_size", batch_size, minimum=1, error=RunConfigError)
    check_int("workers", workers, minimum=0, error=RunConfigError)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RunConfigError(f"device must be cpu, cuda or cuda:<n>: got {device!r}") from e
    amp_context(spec, dev)  # fp16 autocast needs CUDA: refused before any work
    from tokvis.model import model_info

    if spec.cls and not model_info(model).has_class_token:
        raise RunConfigError(
            f"cls=True needs a model with a class token; this model ({type(model).__name__}) has none: "
            "leave out --cls (cls=False), or use a model with a class token"
        )
    if Path(out).exists() and not Path(out).is_dir():
        raise RunConfigError(f"--out {out} is a file, not a folder; give a folder for the run directories")
    config = spec.config(dataset.name)
    run_dir = Path(out) / spec.dir_name(dataset.name)
    t0 = time.perf_counter()

    lock = RunLock(run_dir, log=log) if ctx.is_main else None
    state: Any = None
    if lock is not None:
        try:
            lock.acquire()
            plan = prepare(run_dir, config, dataset, int(spec.shard_size), log=log, model=model)
            state = ("ok", plan)
        except TokvisError as e:
            lock.release()
            state = ("error", type(e).__name__, str(e))
    state = D.broadcast_object(ctx, state)
    if state[0] == "error":
        raise _ERRORS.get(state[1], StoreError)(state[2])
    plan: Plan = state[1]
    try:
        num_shards = num_shards_for(len(dataset.ids), spec.shard_size)
        if not plan.pending:
            if plan.repaired:
                log(f"{run_dir}: repaired ({len(plan.repaired)} problem(s)); no shard needed recording again")
                return RunResult(run_dir, "repaired", len(dataset.ids), 0, num_shards, 0.0, [], list(plan.repaired))
            log(f"{run_dir}: already complete ({len(dataset.ids)} images, {num_shards} shards); nothing to do")
            return RunResult(run_dir, "already complete", len(dataset.ids), 0, num_shards, 0.0, [])
        mine = D.assign(plan.pending, ctx)
        model = model.to(device).eval()
        recorder = _ShardRecorder(
            model, dataset, spec, run_dir, device=device, ctx=ctx, hash_inputs=hash_inputs, skip_bad=skip_bad
        )
        n_mine = sum(min(spec.shard_size, len(dataset.ids) - k * spec.shard_size) for k in mine)
        desc = f"{run_dir.name} [rank {ctx.rank}]" if ctx.distributed else run_dir.name
        bar = tqdm(total=n_mine, desc=desc, unit="img", disable=not progress, leave=False)
        try:
            recorder.run(mine, batch_size=batch_size, workers=workers, bar=bar)
        finally:
            bar.close()
        D.barrier(ctx)
        if ctx.is_main:
            m = load_manifest_json(run_dir)
            if adopt(run_dir, m, dataset, log=log):
                write_manifest(run_dir, m)
            if m["complete"] and not any(e["image_ids"] for e in m["shards"]):
                _refuse_empty(run_dir, m)
            if not m["complete"]:
                raise StoreError(
                    f"{run_dir}: {len(m['shards'])} of {m['num_shards']} shards after recording; rerun to finish"
                )
        D.barrier(ctx)
    finally:
        if lock is not None:
            lock.release()
    m = load_manifest_json(run_dir)
    skipped = [s for e in m["shards"] for s in e["skipped"]]
    if ctx.is_main and skipped:
        log(f"{run_dir.name}: skipped {len(skipped)} unreadable image(s):")
        for s in skipped:
            log(f"  {s['id']}: {s['error']}")
    if ctx.is_main and plan.repaired:
        log(f"{run_dir.name}: repaired {len(plan.repaired)} problem(s); {len(plan.pending)} shard(s) recorded again")
    status = "repaired" if plan.repaired else "resumed" if plan.had_some else "recorded"
    n_images = sum(len(e["image_ids"]) for e in m["shards"])
    return RunResult(
        run_dir, status, n_images, recorder.recorded, m["num_shards"], time.perf_counter() - t0, skipped,
        list(plan.repaired),
    )  # fmt: skip


def _without_query_soft(trace):
    """``trace`` with every decision's ``query_soft`` left out (the trace itself when none has one)."""
    import dataclasses

    from tokvis.trace import Trace

    if all(d.query_soft is None for d in trace.decisions):
        return trace
    return Trace([dataclasses.replace(d, query_soft=None) for d in trace.decisions], trace.meta)
