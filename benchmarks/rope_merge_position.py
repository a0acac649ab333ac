"""Where should a merged token sit for rotary position embeddings?  Fidelity of the pooled feature, both choices.

For a timm RoPE model (``Eva``: DINOv3, EVA-02, the RoPE ViTs, PE) and each merging configuration, the pooled
feature of the reduced model (``forward_head(..., pre_logits=True)``) is compared with the unreduced model's
(cosine similarity, mean over images) under ``merge_position="destination"`` (tokvis's default) and ``"mean"``
(the size-weighted mean of the sources' coordinates).  Higher is closer to the unreduced model.

Run with hub access (weights are downloaded by timm):

    python benchmarks/rope_merge_position.py --model vit_small_patch16_dinov3 --pretrained
    python benchmarks/rope_merge_position.py --model eva02_small_patch14_224.mim_in22k --pretrained --r 8 16

Without ``--pretrained`` the model has random weights: a smoke test of the script, no evidence for either
choice.  Images: the bundled sample photos (``--source samples``) or a foolbox set (``--source
foolbox-imagenet``).  Prints one row per configuration; nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys

import torch

import tokvis
from tokvis.data import load_images


def pooled(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's pooled feature (before any classifier)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True).flatten(1).double()


def fidelity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of two batches of features."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def measure(model: torch.nn.Module, images: torch.Tensor, configs: list[tuple[str, dict]]) -> list[dict]:
    """One row per configuration: fidelity under each merge position and their difference."""
    tokvis.unpatch(model)
    reference = pooled(model, images)
    rows = []
    for method, kw in configs:
        row = {"config": f"{method} " + " ".join(f"{k}={v}" for k, v in kw.items())}
        for position in ("destination", "mean"):
            tokvis.patch(model, method, merge_position=position, **kw)
            row[position] = fidelity(pooled(model, images), reference)
        tokvis.unpatch(model)
        row["mean - destination"] = row["mean"] - row["destination"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, measure, print the table.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_dinov3", help="a timm RoPE (Eva) architecture")
    ap.add_argument("--pretrained", action="store_true", help="load the pretrained weights (needs the hub)")
    ap.add_argument("--source", default="samples", help="images: 'samples' or 'foolbox-<kind>'")
    ap.add_argument("--r", type=int, nargs="+", default=[8, 16], help="ToMe r values (tokens merged per block)")
    ap.add_argument("--keep-rate", type=float, nargs="+", default=[0.5], help="keep rates for the other mergers")
    ap.add_argument("--methods", nargs="+", default=["kmedoids", "dpcknn"], help="keep-rate merging methods")
    ap.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for timm.create_model")
    args = ap.parse_args(argv)
    import json

    import timm

    model = timm.create_model(args.model, pretrained=args.pretrained, **json.loads(args.model_kwargs)).eval()
    images, _ = load_images(model, source=args.source)
    configs = [("tome", {"r": r}) for r in args.r]
    configs += [(m, {"keep_rate": k}) for m in args.methods for k in args.keep_rate]
    rows = measure(model, images, configs)
    print(
        f"# {args.model} ({'pretrained' if args.pretrained else 'RANDOM weights: smoke test only'}), "
        f"{images.shape[0]} images from {args.source}; pooled-feature fidelity (cosine) to the unreduced model"
    )
    print(f"{'config':<26} {'destination':>12} {'mean':>12} {'mean - destination':>20}")
    for row in rows:
        diff = row["mean - destination"]
        print(f"{row['config']:<26} {row['destination']:>12.6f} {row['mean']:>12.6f} {diff:>20.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
