"""Run stores: sharded, resumable, verifiable recordings of one configuration over a dataset.

A run directory holds ``manifest.json`` and ``shard-XXXXX.safetensors`` files (the format,
checksums and input fingerprints: :mod:`tokvis.store.format`).  :func:`load_run` opens one
lazily (:mod:`tokvis.store.reader`); :func:`verify_run` / :func:`verify_tree` check them
without changing anything (:mod:`tokvis.store.verify`); :func:`record_run` writes, resumes and
repairs them under a per-run lock (:mod:`tokvis.store.writer`).  :func:`build_model` and
:func:`patch_for` rebuild the model a run was recorded on (:mod:`tokvis.store.models`); devices
and torchrun are the command line's business (:mod:`tokvis.commands._run`).
"""

from __future__ import annotations

# private names kept for benchmarks/bench_record.py, which synthesises large stores
from tokvis.store.format import (  # noqa: F401
    MANIFEST,
    RUN_FORMAT,
    SHARD_FORMAT,
    STORE_VERSION,
    RunConfigError,
    RunSpec,
    StoreError,
    _shard_arrays,
    shard_file,
)
from tokvis.store.format import config_hash as _config_hash  # noqa: F401
from tokvis.store.format import entry_for as _entry  # noqa: F401
from tokvis.store.format import ids_hash as _ids_hash  # noqa: F401
from tokvis.store.format import versions as _versions  # noqa: F401
from tokvis.store.format import write_manifest as _write_manifest  # noqa: F401
from tokvis.store.format import write_shard as _write_shard  # noqa: F401
from tokvis.store.models import amp_context, build_model, patch_for, run_spec
from tokvis.store.reader import Run, ShardView, load_run, load_runs_in
from tokvis.store.verify import RunReport, find_runs, find_runs_in, verify_run, verify_tree
from tokvis.store.writer import DELAY_ENV, LOCK_FILE, RunLock, RunLockedError, RunResult, record_run

__all__ = [
    "RunSpec",
    "Run",
    "ShardView",
    "StoreError",
    "RunConfigError",
    "RunLockedError",
    "RunLock",
    "RunReport",
    "RunResult",
    "load_run",
    "load_runs_in",
    "record_run",
    "verify_run",
    "verify_tree",
    "find_runs",
    "find_runs_in",
    "amp_context",
    "build_model",
    "patch_for",
    "run_spec",
    "shard_file",
    "DELAY_ENV",
    "LOCK_FILE",
    "MANIFEST",
    "RUN_FORMAT",
    "SHARD_FORMAT",
    "STORE_VERSION",
]
