"""Fidelity to the study's own methods: partitions and logits of the study's model files beside tokvis's.

Run::

    python benchmarks/fidelity_study.py --study-repo path/to/TokenReduction [--float64] [--methods evit ats]

``--study-repo`` is a checkout of github.com/JoakimHaurum/TokenReduction ("Which Tokens to Use?",
Haurum et al., ICCVW 2023; its licence applies to it, nothing of it is part of tokvis).  Its
``models/<method>.py`` files are imported unmodified; the only help they get is a timm 1.0 shim for
their constructor (:class:`_OldSignature`: the timm 0.x ``VisionTransformer`` positional signature and
the ``num_tokens`` / ``pre_logits`` attributes their forwards read), put in place while they import.

Both sides get the same weights: a DeiT-like ViT (embed 64, depth 12, 2 heads, 224 px, patch 16, 10
classes; timm's random init, seed ``--seed``) is built for tokvis and loaded into the study's model;
the study's own modules of a learned method (DynamicViT's score predictors, SiT's, PatchMerger's and
Sinkhorn's cluster layers, randomly initialised) are copied into tokvis's method with
``tokvis.fitting.load_study_checkpoint``.  Six random images; keep rates 0.9, 0.7, 0.5, 0.25 at blocks
3, 6, 9 (``--rates``); the study's options are its ``train.py`` defaults, with DPC-KNN in its
``--equal_weight`` mode, and tokvis's method in its default options (DPC-KNN ``merge="average"``).

The study's partitions are composed as its ``validate.py`` (kept tokens, ``:207-215``) and
``reduction_methods_analysis/analysis_utils.py`` (assignment maps, ``map_cluster_centers``) do:
:func:`study_partitions`.  Printed per method and keep rate: the patch tokens after each reducing
block on both sides (the study's: its sequence length, ATS's padding included), the images of 6 whose
partition is identical at each stage (pruning methods: the same kept patches; merging methods: the
same groups of patches), and the largest absolute logit difference.  ``--float64`` runs both models
in float64, to tell float ties (which then agree) from differences of rule.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import types
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

LOCATIONS = [3, 6, 9]
RATES = [0.9, 0.7, 0.5, 0.25]


@dataclass(frozen=True)
class StudyMethod:
    """One study method: its model file and class, its ``args``, tokvis's name and options."""

    module: str
    cls: str
    tokvis: str
    #: how the study records the partition: "kept" (``Kept_Tokens``) or "assign" (``Assignment_Maps``)
    record: str
    args: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    learned: bool = False


#: the 10 methods of the study (``models/*.py``), with the study's ``train.py`` defaults as ``args``
STUDY_METHODS: dict[str, StudyMethod] = {
    "topk": StudyMethod("topk", "TopKVisionTransformer", "topk", "kept"),
    "evit": StudyMethod("evit", "EfficientVisionTransformer", "evit", "kept"),
    "ats": StudyMethod("ats", "ATSVisionTransformer", "ats", "kept"),
    "dynamicvit": StudyMethod("dyvit", "DynamicVisionTransformer", "dynamicvit", "kept", learned=True),
    "tome": StudyMethod("tome", "ToMeVisionTransformer", "tome", "assign"),
    "kmedoids": StudyMethod(
        "kmedoids", "KMedoidsVisionTransformer", "kmedoids", "assign", {"cluster_iters": 3, "equal_weight": False}
    ),
    "dpcknn": StudyMethod(
        "dpcknn",
        "DPCKNNVisionTransformer",
        "dpcknn",
        "assign",
        {"k_neighbors": 5, "equal_weight": True},  # the study's --equal_weight mode
        {"merge": "average"},
    ),
    "sit": StudyMethod("sit", "SelfSlimmedVisionTransformer", "sit", "assign", learned=True),
    "patchmerger": StudyMethod("patchmerger", "PatchMergerVisionTransformer", "patchmerger", "assign", learned=True),
    "sinkhorn": StudyMethod(
        "sinkhorn",
        "SinkhornVisionTransformer",
        "sinkhorn",
        "assign",
        {"sinkhorn_eps": 1.0, "cluster_iters": 3},
        learned=True,
    ),
}


# -- the study's code, imported unmodified ------------------------------------------------------------------
#: timm 0.x ``VisionTransformer.__init__``'s positional parameters, which the study's constructors pass
OLD_POSITIONAL = (
    "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "representation_size", "distilled", "drop_rate", "attn_drop_rate", "drop_path_rate", "embed_layer", "norm_layer",
    "act_layer", "weight_init",
)  # fmt: skip


def _old_signature_class():
    """A timm 1.0 ``VisionTransformer`` taking the timm 0.x positional signature the study's models call."""
    from timm.models.vision_transformer import VisionTransformer

    class _OldSignature(VisionTransformer):
        def __init__(self, *args, **kwargs):
            kw = {**dict(zip(OLD_POSITIONAL[: len(args)], args, strict=True)), **kwargs}
            if kw.pop("representation_size", None) is not None or kw.pop("distilled", False):
                raise NotImplementedError("the shim builds the study's plain DeiT only")
            kw.pop("weight_init", None)
            if kw.get("embed_layer") is None:
                kw.pop("embed_layer", None)
            kw["norm_layer"] = kw.get("norm_layer") or partial(nn.LayerNorm, eps=1e-6)
            super().__init__(**kw)
            self.num_tokens = 1  # timm 0.x: prefix tokens (ATS's mask reads it)
            self.pre_logits = nn.Identity()  # timm 0.x, without a representation layer

    return _OldSignature


def load_study_module(repo: str, name: str) -> types.ModuleType:
    """Import ``models/<name>.py`` of the study's checkout, its ``VisionTransformer`` being the shim."""
    import timm.models.vision_transformer as tvt

    real = tvt.VisionTransformer
    tvt.VisionTransformer = _old_signature_class()
    try:
        spec = importlib.util.spec_from_file_location(f"_study_{name}", f"{repo}/models/{name}.py")
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"{repo}/models/{name}.py")
        module = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm.models.layers is deprecated in timm 1.0
            spec.loader.exec_module(module)
    finally:
        tvt.VisionTransformer = real
    return module


# -- the study's partitions ----------------------------------------------------------------------------------
def study_partitions(viz: dict, record: str, stages, *, fused_token: bool = False) -> list:
    """The study's partition of each image at each stage, composed as its analysis does.

    Parameters
    ----------
    viz : dict
        The study model's ``viz_data`` (``viz_mode`` on): ``"Kept_Tokens"`` or ``"Assignment_Maps"``
        ``{block: array [B, ...]}``.
    record : {"kept", "assign"}
        ``"kept"``: ``Kept_Tokens`` holds, per stage, indices into the previous stage's kept list
        (the first stage: into the patches); composed as ``validate.py:207-215``: the kept list of
        stage ``s`` is the previous list indexed by the stage's indices, negative ones (padding)
        dropped first except for EViT, whose ``-1`` marks the fused token and indexes the previous
        list's last entry (the previous fused token, ``-1``).  ``"assign"``: ``Assignment_Maps``
        holds the output token of each input token; composed as ``map_cluster_centers``
        (``analysis_utils.py:6-28``): a patch's label at stage ``s`` is the stage's entry at its
        label of stage ``s-1``.
    stages : sequence of int
        The reducing blocks, in order.
    fused_token : bool
        The method is EViT (``validate.py:213``).

    Returns
    -------
    list (one per stage) of list (one per image)
        ``"kept"``: the set of original patches kept as their own token (``-1`` entries removed).
        ``"assign"``: the partition as a frozenset of frozensets of original patches.
    """
    import numpy as np

    out = []
    if record == "kept":
        prev = None
        for s, block in enumerate(stages):
            cur = []
            for i, idx in enumerate(np.asarray(viz["Kept_Tokens"][block])):
                idx = np.asarray(idx)
                if s == 0:
                    cur.append(idx)
                else:
                    cur.append(prev[i][idx if fused_token else idx[idx >= 0]])
            prev = cur
            out.append([{int(v) for v in kept if v >= 0} for kept in cur])
        return out
    labels = None
    for block in stages:
        assign = np.asarray(viz["Assignment_Maps"][block]).astype(np.int64)  # ToMe's are floats
        labels = assign if labels is None else np.stack([a[lab] for a, lab in zip(assign, labels, strict=True)])
        out.append([_groups(row) for row in labels])
    return out


def _groups(labels_row) -> frozenset:
    groups: dict[int, set[int]] = {}
    for patch, lab in enumerate(labels_row.tolist()):
        if lab >= 0:
            groups.setdefault(lab, set()).add(patch)
    return frozenset(frozenset(g) for g in groups.values())


def tokvis_partitions(trace, record: str) -> list:
    """tokvis's partitions in the form of :func:`study_partitions` (kept sets, or groups of the labels)."""
    out = []
    for layer in trace.layers:
        if record == "kept":
            kept = trace.kept(layer)
            out.append([set(torch.nonzero(row).flatten().tolist()) for row in kept])
        else:
            out.append([_groups(row) for row in trace.labels(layer)])
    return out


# -- one comparison --------------------------------------------------------------------------------------------
def make_backbone(seed: int, dtype: torch.dtype):
    import timm

    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=12, num_heads=2, num_classes=10
    )
    return model.eval().to(dtype)


def _study_args(spec: StudyMethod, rate: float) -> types.SimpleNamespace:
    return types.SimpleNamespace(reduction_loc=list(LOCATIONS), keep_rate=[rate], viz_mode=True, **spec.args)


def compare(repo: str, name: str, rate: float, *, seed: int = 0, dtype=torch.float32, n_images: int = 6) -> dict:
    """Run the study's model and tokvis on the same weights and images; what the table prints."""
    import tokvis
    from tokvis.fitting import load_study_checkpoint

    spec = STUDY_METHODS[name]
    module = load_study_module(repo, spec.module)
    backbone = make_backbone(seed, torch.float32)
    torch.manual_seed(seed + 1)  # the study's own modules (learned methods): random
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints its schedule
        warnings.simplefilter("ignore")
        args = _study_args(spec, rate)
        study = getattr(module, spec.cls)(
            img_size=224, patch_size=16, num_classes=10, embed_dim=64, depth=12, num_heads=2, args=args
        )
    missing, unexpected = study.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"backbone tensors the study's {spec.cls} does not have: {unexpected}")
    study = study.eval().to(dtype)
    backbone = backbone.to(dtype)
    if dtype == torch.float64:  # ATS's levels are a plain tensor attribute, which .double() leaves float32
        for m in study.modules():
            if isinstance(getattr(m, "sample_steps", None), torch.Tensor):
                m.sample_steps = m.sample_steps.to(dtype)
    g = torch.Generator().manual_seed(seed + 2)
    images = torch.randn(n_images, 3, 224, 224, generator=g).to(dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study_logits, viz = study(images)
    method = tokvis.create_method(spec.tokvis, **spec.options)
    if spec.learned:
        load_study_checkpoint(method, study.state_dict(), locations=LOCATIONS)
        method.to(dtype)
    tokvis.patch(backbone, method, keep_rate=rate, locations=LOCATIONS)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits, trace = tokvis.run_with_trace(backbone, images)
    ours = tokvis_partitions(trace, spec.record)
    theirs = study_partitions(viz, spec.record, LOCATIONS, fused_token=name == "evit")
    return {
        "study_tokens": [int(viz["Features"][b].shape[1]) - 1 for b in LOCATIONS],
        "tokvis_tokens": [trace.decision(layer).n_out for layer in trace.layers],
        "identical": [sum(a == b for a, b in zip(s, t, strict=True)) for s, t in zip(theirs, ours, strict=True)],
        "n_images": n_images,
        "dlogit": float((study_logits.double() - logits.double()).abs().max()),
        "missing": [k for k in missing if not k.startswith(("score_predictor", "cluster_layers"))],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study-repo", required=True, help="a checkout of github.com/JoakimHaurum/TokenReduction")
    p.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), choices=list(STUDY_METHODS))
    p.add_argument("--rates", nargs="+", type=float, default=RATES)
    p.add_argument("--float64", action="store_true", help="both models in float64 (tells float ties apart)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dtype = torch.float64 if a.float64 else torch.float32
    print(f"study: {a.study_repo}; {dtype}; keep rates {a.rates} at blocks {LOCATIONS}; seed {a.seed}")
    print("| method | keep rate | tokens per stage (study; tokvis) | identical partitions per stage | max |Δlogit| |")
    print("|---|---|---|---|---|")
    failed = 0
    for name in a.methods:
        for rate in a.rates:
            try:
                r = compare(a.study_repo, name, rate, seed=a.seed, dtype=dtype)
            except Exception as e:  # a method of the other half of issue 17 may not run yet: say so, go on
                failed += 1
                why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
                print(f"| {name} | {rate} | failed: {why} | | |", flush=True)
                continue
            tokens = (
                f"equal {r['tokvis_tokens']}"
                if r["study_tokens"] == r["tokvis_tokens"]
                else f"**study {r['study_tokens']}; tokvis {r['tokvis_tokens']}**"
            )
            same = "/".join(map(str, r["identical"])) + f" of {r['n_images']}"
            print(f"| {name} | {rate} | {tokens} | {same} | {r['dlogit']:.1e} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
