"""Every method on a random-init timm ViT, on the GPU (or the CPU with tiny settings).

Run::

    python benchmarks/bench_gpu.py --device cuda --dtype fp16 --batch-size 256 [--compile] [--tome-repo PATH]
    python benchmarks/bench_gpu.py --model vit_large_patch16_224 --batch-size 128 --methods tome --tome-r 8
    python benchmarks/bench_gpu.py --device cpu --dtype fp32 --model vit_tiny_patch16_224 --img-size 64 \\
        --batch-size 2 --repeats 2 --methods tome topk          # a CPU smoke run

(the same as ``tokvis bench --device cuda --dtype fp16``.)  No internet and no pretrained weights needed:
the timm model is built with ``pretrained=False``.  Prints, per configuration, plain images/s (median, slowest
and fastest of the interleaved rounds), FLOPs, speed-up against the unpatched model, speed-up per FLOPs
ratio, recorded images/s and recording overhead, peak memory (CUDA) and the cosine similarity of the outputs
to the unpatched model's; a warning line per configuration whose rounds differ by more than 1.3x.
"""

from __future__ import annotations

import argparse

from tokvis.bench import DTYPES, run_gpu_table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (compilation happens here)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--keep-rate", type=float, default=0.5)
    p.add_argument("--tome-r", type=int, default=16, help="the ToMe r row (0: none)")
    p.add_argument("--compile", action="store_true", help="torch.compile every configuration")
    p.add_argument("--no-record", action="store_true", help="skip the recorded forwards")
    p.add_argument("--tome-repo", default=None, help="checkout of facebookresearch/ToMe: adds the official row")
    p.add_argument("--img-size", type=int, default=None, help="model input size (tiny CPU runs)")
    return p


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    run_gpu_table(
        model_name=a.model, device=a.device, dtype=a.dtype, batch_size=a.batch_size, repeats=a.repeats,
        warmup=a.warmup, methods=a.methods, keep_rate=a.keep_rate, tome_r=a.tome_r, compile=a.compile,
        tome_repo=a.tome_repo, img_size=a.img_size, record=not a.no_record,
    )  # fmt: skip


if __name__ == "__main__":
    main()
