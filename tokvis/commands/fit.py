"""``tokvis fit``: fit a learned reduction method by distillation and save its parameters."""

from __future__ import annotations

import argparse

from tokvis.cli import _arg, _keep_rate, _method, int_at_least
from tokvis.commands.record import _json_dict


def _option(text: str) -> tuple[str, object]:
    from tokvis.errors import MethodOptionError
    from tokvis.methods.registry import parse_option

    try:
        return parse_option(text)
    except MethodOptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _learning_rate(text: str) -> float:
    from tokvis.cli import _number
    from tokvis.validate import check_float

    return check_float("a learning rate", _number(text, float), low=0.0, low_open=True, high_open=True)


def cmd_fit(args: argparse.Namespace) -> int:
    import time

    import torch

    from tokvis import fitting
    from tokvis.errors import MethodOptionError
    from tokvis.methods import create_method, get_method_class, list_methods
    from tokvis.store.models import create_backbone
    from tokvis.validate import check_out_file

    # every argument is checked before the model is loaded (argparse types check each value)
    if (args.keep_rate is None) == (args.r is None):
        raise MethodOptionError("pass one of --keep-rate (fraction kept per stage) or --r (tokens removed per block)")
    learned_class = hasattr(get_method_class(args.method), "mark_fitted")
    if not learned_class or not create_method(args.method, **dict(args.option or [])).learned:
        raise MethodOptionError(
            f"--method {args.method} has no learned parameters to fit with these options; learned methods: "
            + ", ".join(m for m in list_methods() if hasattr(get_method_class(m), "mark_fitted"))
            + " (dpcknn with --option merge=learned)"
        )
    create_method(args.method, **dict(args.option or []))  # its options, checked before the model is loaded
    check_out_file("--out", args.out, error=MethodOptionError)  # before training, not at the rename after it
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    # seeded as `tokvis record` builds it: a random backbone (--no-pretrained) is the one the runs will use
    model = create_backbone(
        args.model, pretrained=not args.no_pretrained, model_kwargs=args.model_kwargs, seed=args.seed
    )
    res = fitting.fit_to_file(
        model, args.method, args.out, keep_rate=args.keep_rate, r=args.r, locations=args.locations,
        options=dict(args.option or []), images=args.images, held_out=args.held_out, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    print(f"training loss per epoch: {', '.join(f'{v:.4f}' for v in res['epoch_losses'])}")
    if res["held_out_before"] is not None:
        print(
            f"held-out distillation loss ({args.held_out} images): {res['held_out_before']:.4f} unfitted -> "
            f"{res['held_out_after']:.4f} fitted"
        )
    print(f"saved {res['path']} ({time.perf_counter() - t0:.0f} s)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit", help="fit a learned method (dynamicvit, sit, patchmerger, sinkhorn) by distillation on a frozen model"
    )
    p.add_argument(
        "--model",
        default="dinov2_small_offline",
        help="timm name, checkpoint, hf:<repo id or folder>, or dinov2_small_offline",
    )
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (timm names: no download)")
    p.add_argument("--model-kwargs", type=_json_dict, default={}, help="JSON for zoo.create, e.g. '{\"img_size\": 32}'")
    p.add_argument("--method", required=True, type=_arg(_method), help="learned method name")
    p.add_argument("--keep-rate", type=_arg(_keep_rate), default=None, help="per-stage keep rate, in (0, 1]")
    p.add_argument("--r", type=int_at_least(0), default=None, help="tokens removed per block (instead of --keep-rate)")
    p.add_argument(
        "--locations", type=int_at_least(0), nargs="+", default=None, help="reducing blocks (default: 1/4, 1/2, 3/4)"
    )
    p.add_argument("--images", type=int_at_least(1), default=256, help="training images: crops/flips of the photos")
    p.add_argument("--held-out", type=int_at_least(0), default=32, help="held-out images for the loss (0: none)")
    p.add_argument("--epochs", type=int_at_least(1), default=3)
    p.add_argument("--lr", type=_arg(_learning_rate), default=None, help="Adam learning rate (default: the method's)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (default 0: torch's choice)")
    p.add_argument("--option", type=_option, action="append", help="method option KEY=VALUE (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_fit)
