"""Per-run performance figures: what a token reduction costs, computed by running the run's model again.

A run store holds decisions, not predictions.  :func:`evaluate` reads each run's configuration
from its manifest, rebuilds the same backbone (same name, weights, keyword arguments and seed)
and dataset, and runs the same images through the model twice: unreduced and patched with the
run's method and schedule.  From the two it computes, per run:

==================== =========================================================================
``fidelity``         mean cosine similarity of the pooled (pre-logits) features of the reduced
                     model to the unreduced model's, over the images.  Always available,
                     label-free: the measure for backbones without a classifier head (DINOv2).
``agreement``        fraction of images whose top-1 class equals the unreduced model's (needs a
                     classifier head, no labels).
``top1``             top-1 accuracy against the dataset's labels, and ``top1_unreduced``, when
                     the head's classes are the dataset's (a head with as many classes as the
                     dataset, or an ImageNet-1k head on foolbox's ImageNet photos).
``knn_top1``         leave-one-out k-NN accuracy of the labels on the pooled features (cosine,
                     ``k`` neighbours, majority vote, ties to the nearest), ``knn_top1_unreduced``
                     and ``knn_agreement`` (same k-NN prediction as the unreduced features), on
                     labelled datasets where some label occurs more than once.
``accuracy``         an external accuracy merged from a CSV (:func:`read_accuracy_csv`).
``decisions_match``  fraction of images whose recomputed decisions (token labels at every
                     recorded block) equal the stored ones: 1.0 says the model was rebuilt as
                     recorded; less warns that weights, data or code changed since.
==================== =========================================================================

The ``measure`` column says which measures were available for the run and why others were not.
The unreduced model's outputs are computed once per (backbone, dataset, images) within a call.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tokvis.errors import ArgumentValueError, DataError
from tokvis.store import RunConfigError, RunSpec, amp_context, build_model, load_runs_in, patch_for, run_spec
from tokvis.validate import check_int

__all__ = ["COLUMNS", "MEASURES", "evaluate", "knn_predict", "merge_accuracy", "read_accuracy_csv"]

#: Measure columns of :func:`evaluate`, in order.
MEASURES = (
    "top1", "top1_unreduced", "agreement", "fidelity", "knn_top1", "knn_top1_unreduced", "knn_agreement",
    "accuracy", "decisions_match",
)  # fmt: skip
#: Columns of :func:`evaluate`'s table.
COLUMNS = ("run", "backbone", "method", "keep_rate", "r", "dataset", "n_images", *MEASURES, "measure")
#: Number of classes of foolbox's labelled sample sets (their labels index these classes).
_FOOLBOX_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashionmnist": 10}
_ID_COLUMNS = ("backbone", "method", "dataset")
#: The range of each measure (fidelity is a cosine; the others are fractions); a table outside them is wrong.
MEASURE_RANGES = {m: (0.0, 1.0) for m in MEASURES} | {"fidelity": (-1.0, 1.0)}


# ----------------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------------


def knn_predict(features: np.ndarray, labels: Sequence[int], *, k: int = 5, chunk: int = 1024) -> np.ndarray:
    """Leave-one-out k-NN label of every row of ``features`` (cosine similarity, majority vote).

    Each image is classified by its ``k`` nearest *other* images; a tie between labels goes to
    the label of the nearer neighbour.

    Parameters
    ----------
    features : array [n, D]
    labels : sequence of int, length n
    k : int
        Neighbours (at most ``n - 1`` are used).
    chunk : int
        Rows of the similarity matrix computed at a time (memory ``chunk * n``).

    Returns
    -------
    numpy.ndarray of int64 [n]
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n = len(f)
    if f.ndim != 2 or len(y) != n:
        raise ArgumentValueError(f"features must be [n, D] with one label per row: got {f.shape} and {len(y)} labels")
    k = check_int("k", k, minimum=1)
    if n < 2:
        raise ArgumentValueError("k-NN needs at least 2 images")
    k = min(k, n - 1)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        sim = f[start : start + chunk] @ f.T
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf  # leave the image itself out
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        for i, idx in enumerate(nearest):
            votes = y[idx]
            values, counts = np.unique(votes, return_counts=True)
            best = set(values[counts == counts.max()].tolist())
            out[start + i] = next(v for v in votes if v in best)  # nearest among the tied labels
    return out


# ----------------------------------------------------------------------------------------------
# model outputs
# ----------------------------------------------------------------------------------------------


def _model_key(spec: RunSpec) -> str:
    return json.dumps([spec.backbone, spec.pretrained, spec.model_kwargs, spec.seed], sort_keys=True)


def _build(spec: RunSpec, run_path: Path):
    from tokvis.errors import TokvisError

    try:
        model = build_model(spec)
    except (TokvisError, OSError) as e:
        msg = getattr(e, "cli_message", None) or str(e)
        raise RunConfigError(
            f"{run_path.name}: cannot rebuild its model {spec.backbone!r} "
            f"(pretrained={spec.pretrained}) to evaluate it: {msg}"
        ) from e
    return model.eval()


def _num_classes(model) -> int:
    from tokvis.backbones import backbone_for

    return backbone_for(model).num_classes(model)


def _has_head(model) -> bool:
    return _num_classes(model) > 0


def _forward(model, x):
    """Pooled pre-logits features and logits (``None`` without a classifier head), through the backbone adapter."""
    from tokvis.backbones import backbone_for

    return backbone_for(model).pooled_and_logits(model, x)


def _images(dataset, ids: Sequence[str], model, run_path: Path):
    from tokvis.data import transform_for

    pos = {i: j for j, i in enumerate(dataset.ids)}
    missing = [i for i in ids if i not in pos]
    if missing:
        raise DataError(
            f"{run_path.name}: {len(missing)} of its images are not in dataset {dataset.spec!r} now "
            f"(first: {missing[:3]}); the data changed since recording: record the run again"
        )
    transform = transform_for(model)
    return [pos[i] for i in ids], transform


def _outputs(model, dataset, positions, transform, *, batch_size, device, spec, record_layers=None):
    """Pooled features, logits and (when ``record_layers``) the recorded labels per block, batch by batch,
    in the run's precision (``spec.amp``: the autocast it was recorded under)."""
    import torch

    import tokvis

    pooled, logits, labels = [], [], {lay: [] for lay in record_layers or ()}
    with torch.inference_mode(), amp_context(spec, device):
        for s in range(0, len(positions), batch_size):
            idx = positions[s : s + batch_size]
            x = torch.stack([transform(dataset.load(i)) for i in idx]).to(device)
            if record_layers:
                with tokvis.record(model) as rec:
                    p, lg = _forward(model, x)
                for lay in record_layers:
                    labels[lay].append(rec.trace.labels(lay).cpu().numpy())
            else:
                p, lg = _forward(model, x)
            pooled.append(p.float().cpu().numpy())
            if lg is not None:
                logits.append(lg.float().cpu().numpy())
    out = {"pooled": np.concatenate(pooled), "logits": np.concatenate(logits) if logits else None}
    out["labels"] = {lay: np.concatenate(v) for lay, v in labels.items()}
    return out


def _head_matches(model, dataset) -> tuple[bool, str]:
    """Whether the head's class indices are the dataset's labels; the reason when not."""
    n_head = _num_classes(model)
    spec = str(dataset.spec).lower()
    if spec.startswith("foolbox-"):
        n_data = _FOOLBOX_CLASSES.get(spec[len("foolbox-") :])
    else:
        n_data = len(dataset.classes) if dataset.classes else None
    if n_data is not None and n_data == n_head:
        return True, ""
    return False, (
        f"no top1: the head has {n_head} classes but dataset {dataset.name!r} has "
        f"{n_data if n_data is not None else 'unknown'} classes, so its labels do not index the head's classes"
    )


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def evaluate(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    accuracy_csv: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    k: int = 5,
    progress: bool = False,
    log=None,
):
    """Performance figures of every run store under ``paths`` (see the module docstring).

    Parameters
    ----------
    paths : path or list of paths
        Run directories or folders holding them.
    accuracy_csv : path, optional
        External accuracies merged into the ``accuracy`` column (:func:`read_accuracy_csv`).
    batch_size : int
        Images per forward pass.
    device : str
        ``cpu``, ``cuda`` or ``auto``.
    k : int
        Neighbours of the k-NN measures.
    progress : bool
        A progress bar over runs.
    log : callable, optional
        Called with one line per evaluated run.

    Returns
    -------
    pandas.DataFrame
        One row per run, columns :data:`COLUMNS`.

    Raises
    ------
    StoreError
        Nothing found, or an incomplete or corrupt run (run ``tokvis verify``).
    RunConfigError
        A run whose model cannot be rebuilt (e.g. hub weights offline).
    DataError
        The run's images are no longer in its dataset; a bad accuracy CSV.
    """
    import pandas as pd
    from tqdm import tqdm

    import tokvis
    from tokvis.datasets import open_dataset
    from tokvis.distributed import resolve_device

    batch_size = check_int("batch_size", batch_size, minimum=1, error=RunConfigError)
    k = check_int("k", k, minimum=1, error=RunConfigError)
    external = read_accuracy_csv(accuracy_csv) if accuracy_csv is not None else None
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = load_runs_in(paths)
    device = resolve_device(device)
    specs = [run_spec(r) for r in runs]
    order = sorted(range(len(runs)), key=lambda i: (_model_key(specs[i]), str(runs[i].path)))  # one model at a time
    rows: dict[int, dict[str, Any]] = {}
    model, model_key = None, None
    unreduced: dict[tuple, dict] = {}
    datasets: dict[tuple, Any] = {}
    for i in tqdm(order, desc="runs", unit="run", disable=not progress or len(order) < 2, leave=False):
        run, spec = runs[i], specs[i]
        if _model_key(spec) != model_key:
            model, model_key = None, None
            unreduced.clear()
            model = _build(spec, run.path).to(device)
            model_key = _model_key(spec)
        dkey = (spec.dataset, spec.dataset_name)
        if dkey not in datasets:
            datasets[dkey] = open_dataset(spec.dataset, name=spec.dataset_name)
        dataset = datasets[dkey]
        ids = run.image_ids
        positions, transform = _images(dataset, ids, model, run.path)
        ukey = (dkey, tuple(ids), spec.amp)
        if ukey not in unreduced:  # the unreduced model in the run's precision too
            unreduced[ukey] = _outputs(
                model, dataset, positions, transform, batch_size=batch_size, device=device, spec=spec
            )
        base = unreduced[ukey]
        patch_for(model, spec)  # a run's fitted method file (checked against its SHA-256), when it names one
        try:
            red = _outputs(
                model, dataset, positions, transform, batch_size=batch_size, device=device, spec=spec,
                record_layers=list(run.layers),
            )  # fmt: skip
        finally:
            tokvis.unpatch(model)
        labels = None
        if dataset.labels is not None:
            lab = dict(zip(dataset.ids, dataset.labels, strict=True))
            labels = np.array([lab[i] for i in ids], dtype=np.int64)
        row = _measures(run, model, dataset, base, red, labels, k=k)
        rows[i] = row
        if log is not None:
            shown = ", ".join(f"{m} {row[m]:.4f}" for m in MEASURES if row.get(m) is not None and m != "accuracy")
            log(f"{run.path.name}: {len(ids)} images, {shown}")
    df = pd.DataFrame([rows[i] for i in range(len(runs))], columns=list(COLUMNS))
    if external is not None:
        df = merge_accuracy(df, external)
    return df


def _measures(run, model, dataset, base, red, labels, *, k: int) -> dict[str, Any]:
    c = run.config
    row: dict[str, Any] = {
        "run": run.path.name, "backbone": c["backbone"], "method": c["method"], "keep_rate": c.get("keep_rate"),
        "r": json.dumps(c["r"]) if isinstance(c.get("r"), list) else c.get("r"), "dataset": c.get("dataset_name"),
        "n_images": int(run.num_images),
    }  # fmt: skip
    for m in MEASURES:
        row[m] = None
    have, why = [], []
    a, b = base["pooled"], red["pooled"]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    row["fidelity"] = float(cos.mean())
    have.append("fidelity")
    if base["logits"] is not None:
        pa, pb = base["logits"].argmax(1), red["logits"].argmax(1)
        row["agreement"] = float((pa == pb).mean())
        have.append("agreement")
        if labels is None:
            why.append(f"no top1: dataset {dataset.name!r} has no labels")
        else:
            ok, reason = _head_matches(model, dataset)
            if ok:
                row["top1"], row["top1_unreduced"] = float((pb == labels).mean()), float((pa == labels).mean())
                have.append("top1")
            else:
                why.append(reason)
    else:
        why.append("no top1/agreement: the model has no classifier head")
    if labels is None:
        why.append("no knn: the dataset has no labels")
    elif len(labels) < 2 or np.unique(labels).size == len(labels):
        why.append("no knn: no label occurs twice among the images")
    else:
        ka, kb = knn_predict(a, labels, k=k), knn_predict(b, labels, k=k)
        row["knn_top1"], row["knn_top1_unreduced"] = float((kb == labels).mean()), float((ka == labels).mean())
        row["knn_agreement"] = float((ka == kb).mean())
        used = min(k, len(labels) - 1)  # leave-one-out: at most the other images are neighbours
        if used < k:
            have.append(f"knn(k={used}: --k {k} is more than the {len(labels) - 1} other images)")
            warnings.warn(
                f"{run.path.name}: k={k} neighbours asked for, but the run has {len(labels)} images; the k-NN "
                f"measures used k={used} (the 'measure' column says so)",
                UserWarning,
                stacklevel=3,
            )
        else:
            have.append(f"knn(k={k})")
    if red["labels"]:
        same = np.ones(len(b), dtype=bool)
        for lay, got in red["labels"].items():
            same &= (np.asarray(run.labels(lay)) == got).all(1)
        row["decisions_match"] = float(same.mean())
        if not same.all():
            warnings.warn(
                f"{run.path.name}: the rebuilt model reproduces the stored decisions on only {same.mean():.0%} of "
                "the images; its weights, data or tokvis changed since recording (record the run again)",
                UserWarning,
                stacklevel=3,
            )
    row["measure"] = "; ".join([", ".join(have), *why])
    return row


# ----------------------------------------------------------------------------------------------
# external accuracies
# ----------------------------------------------------------------------------------------------


def read_accuracy_csv(path: str | os.PathLike):
    """Read a CSV of external accuracies.

    Columns: ``accuracy`` and either ``run`` (the run directory's name) or ``backbone``,
    ``method``, ``dataset`` and ``keep_rate`` and/or ``r`` (empty where not used).

    Raises
    ------
    DataError
        The file cannot be parsed, misses columns, or holds non-numeric accuracies.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"accuracy CSV not found: {path}")
    try:
        df = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable CSV ({' '.join(str(e).split())})") from e
    cols = set(df.columns)
    by_run = "run" in cols
    by_fields = set(_ID_COLUMNS) <= cols and bool({"keep_rate", "r"} & cols)
    if "accuracy" not in cols or not (by_run or by_fields):
        need = [c for c in ("accuracy",) if c not in cols]
        if not by_run:
            need += [c for c in _ID_COLUMNS if c not in cols] + ([] if {"keep_rate", "r"} & cols else ["keep_rate/r"])
        raise DataError(
            f"{path} misses the column(s) {', '.join(need)} (it has {', '.join(map(str, df.columns)) or 'none'}); "
            "give accuracy and either run (the run directory's name) or backbone, method, dataset and keep_rate or r"
        )
    acc = pd.to_numeric(df["accuracy"], errors="coerce")
    bad = df["accuracy"][acc.isna() & df["accuracy"].notna()]
    if len(bad):
        raise DataError(f"{path}: accuracy must be a number: got {bad.iloc[0]!r} (row {bad.index[0] + 2})")
    if acc.isna().any():
        row = int(np.flatnonzero(acc.isna().to_numpy())[0])
        raise DataError(f"{path}: accuracy is empty or NaN in row {row + 2}; give a number for every row (or drop it)")
    out = acc[(acc < 0) | (acc > 100)]
    if len(out):
        raise DataError(
            f"{path}: accuracy {float(out.iloc[0]):g} (row {out.index[0] + 2}) is out of range: give fractions in "
            "[0, 1] or percentages in [0, 100] (kept as given)"
        )
    df = df.assign(accuracy=acc)
    seen: set[tuple] = set()
    for _, row in df.iterrows():
        kk = _csv_key(row, by_run)
        if kk in seen:
            raise DataError(f"{path} has two rows for {' / '.join(kk)}: keep one")
        seen.add(kk)
    return df


def _csv_key(row, by_run: bool) -> tuple:
    if by_run:
        return (str(row["run"]),)
    return (
        str(row["backbone"]), str(row["method"]), str(row["dataset"]),
        _key_num(row.get("keep_rate")), _key_num(row.get("r")),
    )  # fmt: skip


def _key_num(v) -> str:
    try:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v)


def merge_accuracy(table, external):
    """``table`` (from :func:`evaluate`) with ``external``'s accuracies in its ``accuracy`` column.

    Rows of ``external`` (from :func:`read_accuracy_csv`, which refuses two rows for one run) matching
    no run are reported with a ``UserWarning``.
    """
    table = table.copy()
    use_run = "run" in external.columns
    found = {_csv_key(row, use_run): row["accuracy"] for _, row in external.iterrows()}
    used = set()
    for i, row in table.iterrows():
        kk = _csv_key(row, use_run)
        if kk in found:
            table.at[i, "accuracy"] = found[kk]
            used.add(kk)
            note = table.at[i, "measure"]
            head, _, rest = note.partition("; ")
            table.at[i, "measure"] = f"{head}, accuracy (external CSV)" + (f"; {rest}" if rest else "")
    unused = [k for k in found if k not in used]
    if unused:
        warnings.warn(
            f"{len(unused)} row(s) of the accuracy CSV match no evaluated run (first: {' / '.join(unused[0])})",
            UserWarning,
            stacklevel=2,
        )
    return table
