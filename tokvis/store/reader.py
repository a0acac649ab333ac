"""Reading run stores lazily: :func:`load_run` -> :class:`Run` of :class:`ShardView`.

Arrays are memory-mapped per shard and read only when asked for; a shard's checksum is
checked when it is first read.  What a run may be opened with is decided by
:func:`tokvis.store.verify.inspect_run`, the function ``tokvis verify`` reports from.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tokvis.store.format import StoreError, check_shard, read_shard_index
from tokvis.store.verify import find_runs_in, inspect_run


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
            check_shard(self.path, self.entry, self.run.manifest, checksum=self._check)
            self._index = read_shard_index(self.path)[1]
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
                for name in ("score", "weight", "soft", "query_soft"):
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
        Whatever ``tokvis verify`` reports as a problem (missing, edited or corrupt manifest,
        missing or truncated shard, manifest/shard mismatch), or an incomplete run (unless
        ``allow_incomplete``).  A corrupt shard's checksum error is raised when that shard is read.
    """
    from tokvis.errors import ArgumentTypeError

    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a run directory (str or path): got {path!r}")
    for name, value in (("check", check), ("allow_incomplete", allow_incomplete)):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{name} must be True or False: got {value!r}")
    run_dir = Path(path)
    report, manifest = inspect_run(run_dir, checksums=False)
    if report.problems or manifest is None:
        more = f" (and {len(report.problems) - 1} more problem(s); run `tokvis verify {run_dir}`)"
        raise StoreError(report.problems[0] + (more if len(report.problems) > 1 else ""))
    if not manifest.get("complete") and not allow_incomplete:
        raise StoreError(
            f"{run_dir}: the run is incomplete ({len(manifest['shards'])} of {manifest['num_shards']} shards); "
            "rerun the same record command to finish it, or pass allow_incomplete=True"
        )
    return Run(run_dir, manifest, check=check)


def load_runs_in(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """:func:`load_run` for every run store under ``paths`` (:func:`find_runs_in`); an unreadable one is a
    :class:`StoreError` that says to check it with ``tokvis verify``."""
    runs = []
    for p in find_runs_in(paths):
        try:
            runs.append(load_run(p))
        except StoreError as e:
            raise StoreError(f"{e} (check it with `tokvis verify {p}`)") from e
    return runs
