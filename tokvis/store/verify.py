"""Checking run stores without changing them: :func:`verify_run`, :func:`verify_tree`.

:func:`inspect_run` is the one place that decides whether a run directory is complete,
incomplete or corrupt; :func:`tokvis.store.load_run` refuses exactly what it reports as a
problem (it skips only the shard checksums, which it checks when a shard is first read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tokvis.store.format import (
    LOCK_FILE,
    MANIFEST,
    SHARD_RE,
    STORE_VERSION,
    StoreError,
    check_manifest,
    check_shard,
    check_unlisted_shard,
    load_manifest_json,
)

#: suffixes of shard files a writer set aside (damaged or recorded from changed inputs)
SET_ASIDE = (".damaged", ".stale")


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


def inspect_run(path: str | os.PathLike, *, checksums: bool = True) -> tuple[RunReport, dict[str, Any] | None]:
    """Check a run directory; returns the report and the manifest (``None`` if it is unusable).

    ``checksums=False`` skips hashing the shard files (sizes, headers and the manifest's own
    checksum are still checked): what :func:`tokvis.store.load_run` does when it opens a run.
    """
    run_dir = Path(path)
    rep = RunReport(run_dir, "corrupt")
    try:
        manifest = check_manifest(load_manifest_json(run_dir), run_dir / MANIFEST)
    except StoreError as e:
        rep.problems.append(str(e))
        return rep, None
    rep.num_shards = int(manifest["num_shards"])
    if manifest["version"] < STORE_VERSION:
        rep.notes.append(
            f"written by an older tokvis (store version {manifest['version']}): its metadata is not checksummed; "
            "record it again to get that protection"
        )
    listed = set()
    for e in manifest["shards"]:
        listed.add(e["file"])
        try:
            check_shard(run_dir / e["file"], e, manifest, checksum=checksums)
            rep.shards_done += 1
            rep.num_images += len(e["image_ids"])
        except StoreError as err:
            rep.problems.append(str(err))
    for p in sorted(run_dir.iterdir()):
        if SHARD_RE.match(p.name) and p.name not in listed:
            try:
                check_unlisted_shard(p, manifest)
                rep.notes.append(f"{p.name}: complete but not yet in the manifest (adopted when the run is resumed)")
            except StoreError as err:
                rep.problems.append(f"uncommitted shard: {err}")
        elif p.name.endswith(".tmp"):
            rep.notes.append(f"{p.name}: leftover temporary file of an interrupted write (safe to remove)")
        elif p.name == LOCK_FILE:
            holder = p.read_text(errors="replace").strip() or "holder unknown"
            rep.notes.append(f"{LOCK_FILE}: being recorded now, or a writer was killed ({holder}); rerun to finish")
        elif p.name.endswith(SET_ASIDE) or p.name == MANIFEST + ".damaged":
            rep.notes.append(f"{p.name}: set aside by a repair, kept for inspection (safe to remove)")
    if rep.problems:
        rep.status = "corrupt"
    elif rep.shards_done == rep.num_shards and manifest.get("complete"):
        rep.status = "complete"
    else:
        rep.status = "incomplete"
    return rep, manifest


def verify_run(path: str | os.PathLike) -> RunReport:
    """Check a run directory (manifest and its checksum, every shard's size, checksum and header).

    Changes nothing.
    """
    return inspect_run(path)[0]


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories at or below ``root``: those with a manifest or shard files."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"no such directory: {root}")
    found = set()
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and ((p / MANIFEST).exists() or any(SHARD_RE.match(c.name) for c in p.iterdir())):
            found.add(p)
    return sorted(found)


def find_runs_in(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """:func:`find_runs` over several folders, in order, without duplicates; a folder with no run store
    is a :class:`StoreError` saying how to make some (the commands that read many runs use this)."""
    found: list[Path] = []
    for p in paths:
        runs = find_runs(p)  # StoreError: no such directory
        if not runs:
            raise StoreError(
                f"{p}: no run stores found (folders with a manifest.json); record some with `tokvis record` "
                "or `tokvis sweep`"
            )
        found += [r for r in runs if r not in found]
    return found


def verify_tree(root: str | os.PathLike) -> list[RunReport]:
    """:func:`verify_run` for every run directory at or below ``root``."""
    return [verify_run(p) for p in find_runs(root)]
