"""Fidelity to the official ToMe and MCTF code: partitions and logits, side by side.

Run::

    python benchmarks/fidelity_official.py --tome-repo path/to/ToMe --mctf-repo path/to/MCTF [--seeds 0 1]

``--tome-repo`` is a checkout of facebookresearch/ToMe, ``--mctf-repo`` one of
mlvlab/MCTF (their licences apply to them; nothing of them is part of tokvis).
Each part is skipped, with a line saying so, when its checkout is not given or
cannot be imported.  Both run on timm ``deit_small_patch16_224`` with random
weights (no download), a batch of 2 random images, CPU.

ToMe: ``tome.patch.timm(model, trace_source=True)`` against ``tokvis.patch(model,
"tome", r=...)`` for ``r`` an int and a per-block list, proportional attention on
and off, plus a distilled DeiT and an average-pooling ViT.  MCTF: the authors' DeiT
(``models/deit.py``), loaded with the timm model's weights and set up as their
evaluation scripts (``run/eval_deit_s_mctf.sh``: r=16 at blocks 1-11; ``..._fast.sh``:
r=0.35 at blocks 3, 6, 9), against ``tokvis.patch(model, "mctf", r=...)`` with the
default locations; the paper default, one-step-ahead off, bidirection off, MCTF-Fast.

Printed per configuration: the patches whose group differs from the official
partition at each reducing block (0 expected), the patches whose token slot differs
(0: the same token order), and the largest absolute logit difference.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch


def _labels_from_source(source: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Official source matrix [B, T_out, T_in] -> slot of each patch among the patch tokens [B, N]."""
    return source[:, :, num_prefix:].argmax(1) - num_prefix


def _record_sources(blocks, labels: list, get_source, num_prefix: int) -> None:
    """After each block, append the official source matrix as patch labels (``None`` before the first merge)."""

    def hook(*_):
        source = get_source()
        labels.append(None if source is None else _labels_from_source(source, num_prefix))

    for blk in blocks:
        blk.register_forward_hook(hook)


def _differences(official: torch.Tensor, ours: torch.Tensor) -> tuple[int, int]:
    """Patches in another group, and patches in another slot (summed over images)."""
    groups = slots = 0
    for a, b in zip(official.tolist(), ours.tolist(), strict=True):
        members_a: dict[int, set[int]] = {}
        members_b: dict[int, set[int]] = {}
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            members_a.setdefault(u, set()).add(i)
            members_b.setdefault(v, set()).add(i)
        groups += sum(members_a[u] != members_b[v] for u, v in zip(a, b, strict=True))
        slots += sum(u != v for u, v in zip(a, b, strict=True))
    return groups, slots


def _report(label: str, per_block: list[tuple[int, int, int]], dlogit: float) -> None:
    groups = [g for _, g, _ in per_block]
    slots = [s for _, _, s in per_block]
    print(
        f"{label:<48} blocks {[b for b, _, _ in per_block]}\n"
        f"{'':<48} patches in another group per block {groups}\n"
        f"{'':<48} patches in another slot per block  {slots}\n"
        f"{'':<48} max |logit difference| {dlogit:.2e}"
    )


def run_tome(repo: str, seeds: list[int]) -> None:
    sys.path.insert(0, repo)
    try:
        import tome  # noqa: F401  (the official package)
    except Exception as e:  # noqa: BLE001 - any import failure means: skip, saying why
        print(f"ToMe: skipped, cannot import the official code from {repo}: {e}")
        return
    import timm

    import tokvis

    cases = [
        ("deit_small_patch16_224", {}, 8, True),
        ("deit_small_patch16_224", {}, 8, False),
        ("deit_small_patch16_224", {}, 16, True),
        ("deit_small_patch16_224", {}, [0, 20, 4, 16, 8, 0, 30, 2, 10, 6, 1, 12], True),
        ("deit_small_patch16_224", {}, [0, 20, 4, 16, 8, 0, 30, 2, 10, 6, 1, 12], False),
        ("deit_small_distilled_patch16_224", {}, 8, True),
        ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}, 8, True),
    ]
    print("== ToMe (facebookresearch/ToMe, tome.patch.timm) ==")
    for seed in seeds:
        for name, kw, r, prop_attn in cases:
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **kw).eval()
            x = torch.randn(2, 3, 224, 224)
            p = model.num_prefix_tokens
            official = copy.deepcopy(model)
            tome.patch.timm(official, trace_source=True, prop_attn=prop_attn)
            official.r = list(r) if isinstance(r, list) else r
            labels: list[torch.Tensor | None] = []
            _record_sources(official.blocks, labels, lambda m=official: m._tome_info["source"], p)
            ours = tokvis.patch(copy.deepcopy(model), "tome", r=r, prop_attn=prop_attn)
            with torch.no_grad():
                ref = official(x)
                out, trace = tokvis.run_with_trace(ours, x)
            rows = [(b, *_differences(lab, trace.labels(b))) for b, lab in enumerate(labels) if lab is not None]
            what = f"r={r}" if isinstance(r, int) else "r=per-block list"
            _report(f"{name} {what} prop_attn={prop_attn} seed={seed}", rows, (ref - out).abs().max().item())


def run_mctf(repo: str, seeds: list[int]) -> None:
    import timm

    import tokvis
    from tokvis.bench import official_mctf

    blocks_1_11 = list(range(1, 12))
    # label, r, one_step_ahead, bidirection, activate_layer (official), tokvis options
    cases = [
        ("paper default (r=16, blocks 1-11)", 16, True, True, blocks_1_11, {}),
        ("one-step-ahead off", 16, False, True, blocks_1_11, {"one_step_ahead": False}),
        ("bidirection off", 16, True, False, blocks_1_11, {"bidirectional": False}),
        ("MCTF-Fast (r=0.35, blocks 3, 6, 9)", 0.35, True, True, [3, 6, 9], {}),
    ]
    if official_mctf(repo, 16) is None:
        return
    print("== MCTF (mlvlab/MCTF, models/deit.py + utils/mctf.py) ==")
    for seed in seeds:
        for label, r, osa, bidir, layers, options in cases:
            torch.manual_seed(seed)
            model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
            x = torch.randn(2, 3, 224, 224)
            # the authors' DeiT set up as run/eval_deit_s_mctf*.sh, with trace_source on
            prepare = official_mctf(repo, r, one_step_ahead=osa, bidirectional=bidir, layers=layers, trace_source=True)
            official = prepare(model)
            labels: list[torch.Tensor | None] = []
            _record_sources(official.blocks, labels, lambda m=official: m.info["student_source"], 1)
            ours = tokvis.patch(copy.deepcopy(model), "mctf", r=r, **options)
            with torch.no_grad():
                ref = official(x, r_eval=r)
                out, trace = tokvis.run_with_trace(ours, x)
            if [b for b in range(12) if b in layers] != list(trace.layers):
                print(f"  reducing blocks differ: official {layers}, tokvis {list(trace.layers)}")
            rows = [(b, *_differences(labels[b], trace.labels(b))) for b in trace.layers if labels[b] is not None]
            _report(f"{label} seed={seed}", rows, (ref - out).abs().max().item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tome-repo", help="checkout of facebookresearch/ToMe (skipped when not given)")
    p.add_argument("--mctf-repo", help="checkout of mlvlab/MCTF (skipped when not given)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # the official code imports timm's old paths
    if args.tome_repo:
        run_tome(args.tome_repo, args.seeds)
    else:
        print("ToMe: skipped (give --tome-repo path/to/facebookresearch/ToMe)")
    if args.mctf_repo:
        run_mctf(args.mctf_repo, args.seeds)
    else:
        print("MCTF: skipped (give --mctf-repo path/to/mlvlab/MCTF)")


if __name__ == "__main__":
    main()
