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
    changed_inputs,
    check_manifest,
    check_shard,
    check_unlisted_shard,
    load_manifest_json,
    read_shard_index,
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


def other_code(manifest: dict[str, Any]) -> str | None:
    """A note when the run was recorded by other code than this tokvis (version or the method's
    ``decisions_version``, :func:`tokvis.identity.code_identity`); ``None`` when it is this code's."""
    from tokvis.errors import TokvisError
    from tokvis.identity import code_identity, describe_code

    config = manifest.get("config") or {}
    try:
        here = code_identity(config.get("method", ""))
    except TokvisError:  # a method this tokvis does not know
        here = None
    if here is not None and config.get("code") == here:
        return None
    now = describe_code(here) if here is not None else f"a tokvis without method {config.get('method')!r}"
    return (
        f"recorded by other code ({describe_code(config.get('code'), manifest.get('versions'))}; this is {now}): "
        "its decisions may differ from this code's. It stays readable; a rerun into it is refused (record it "
        "again into another folder to compare)"
    )


def _foreign_manifest(run_dir: Path, manifest: dict[str, Any]) -> str | None:
    """A problem when no shard file is of the manifest's configuration but all are of one other: a manifest
    copied from another run over intact shards."""
    runs = set()
    for p in run_dir.iterdir():
        if SHARD_RE.match(p.name):
            try:
                runs.add(read_shard_index(p)[0].get("run"))
            except StoreError:
                return None
    if len(runs) != 1 or manifest["config_hash"] in runs:
        return None
    return (
        f"{run_dir / MANIFEST} does not match its shards: they were recorded with configuration {runs.pop()}, the "
        f"manifest describes {manifest['config_hash']} (copied from another run?). Rerun the record command that "
        "made the shards: it sets this manifest aside and rebuilds it from them"
    )


def check_inputs(run_dir: Path, manifest: dict[str, Any], *, content: bool) -> tuple[list[str], list[str]]:
    """(problems, notes): each input file of a folder run that changed since it was recorded.

    With ``content``, files recorded with a content hash (``--hash-inputs``) are hashed again (catches a
    change that kept size and modification time); others are checked by size and modification time.
    """
    from types import SimpleNamespace

    ids = [i for e in manifest["shards"] for i in (e.get("inputs") or {})]
    data = SimpleNamespace(spec=str(manifest.get("config", {}).get("dataset", "")), ids=ids)
    problems, hashed = [], 0
    for e in manifest["shards"]:
        recorded = e.get("inputs") or {}
        hashed += sum(len(v) > 2 for v in recorded.values())
        if not content:
            recorded = {k: v[:2] for k, v in recorded.items()}
        problems += changed_inputs(data, {"inputs": recorded}, ids)
    notes = []
    if not ids:
        notes.append("no input fingerprints (not recorded from a folder): inputs not checked")
    elif content and hashed < len(ids):
        notes.append(
            f"{len(ids) - hashed} of {len(ids)} inputs were recorded without --hash-inputs: checked by size and "
            "modification time only (record with --hash-inputs to check content)"
        )
    return problems, notes


def inspect_run(
    path: str | os.PathLike, *, checksums: bool = True, hash_inputs: bool = False
) -> tuple[RunReport, dict[str, Any] | None]:
    """Check a run directory; returns the report and the manifest (``None`` if it is unusable).

    ``checksums=False`` skips hashing the shard files (sizes, headers and the manifest's own
    checksum are still checked): what :func:`tokvis.store.load_run` does when it opens a run.
    ``hash_inputs`` also checks the run's input files (:func:`check_inputs`); a changed input makes
    the run "stale".
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
    note = other_code(manifest)
    if note:
        rep.notes.append(note)
    foreign = _foreign_manifest(run_dir, manifest) if manifest["shards"] else None
    if foreign:
        rep.problems.append(foreign)
        return rep, manifest
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
    if manifest.get("complete") and rep.shards_done == rep.num_shards and rep.num_images == 0 and not rep.problems:
        rep.problems.append(
            "the run holds no image: every image was skipped as unreadable. Check the input images; move the run "
            "away and record it again"
        )
    stale = []
    if hash_inputs and not rep.problems:
        stale, notes = check_inputs(run_dir, manifest, content=True)
        rep.notes += notes
    if rep.problems:
        rep.status = "corrupt"
    elif stale:
        rep.problems += stale + ["rerun the record command to record the shards of changed inputs again"]
        rep.status = "stale"
    elif rep.shards_done == rep.num_shards and manifest.get("complete"):
        rep.status = "complete"
    else:
        rep.status = "incomplete"
    return rep, manifest


def verify_run(path: str | os.PathLike, *, hash_inputs: bool = False) -> RunReport:
    """Check a run directory (manifest and its checksum, every shard's size, checksum and header).

    Changes nothing.

    Parameters
    ----------
    path : str or PathLike
    hash_inputs : bool
        Also check the input files by content where they were recorded with ``--hash-inputs``
        (status "stale" when one changed).
    """
    return inspect_run(path, hash_inputs=hash_inputs)[0]


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


def verify_tree(root: str | os.PathLike, *, hash_inputs: bool = False) -> list[RunReport]:
    """:func:`verify_run` for every run directory at or below ``root``.

    Parameters
    ----------
    root : str or PathLike
    hash_inputs : bool
        As :func:`verify_run`.
    """
    return [verify_run(p, hash_inputs=hash_inputs) for p in find_runs(root)]
