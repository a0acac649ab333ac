"""Every registered method on the real backbone: images/s, GMACs, speed-up per FLOPs reduction, fidelity.

Run: python benchmarks/bench_methods.py [--batch-size 16] [--repeats 3] [--keep-rates 0.7 0.5] [--methods ...]
Prints one table; fidelity is the mean cosine similarity of the final features to the unreduced
model's. A method is a name or `name:key=value,...` (options, e.g. `vomix:residual=drop`). Learned
methods run with their (unfitted, seeded) parameters unless --fitted DIR holds
`<method>_keep<rate>.safetensors` for that keep rate (written by `benchmarks/fit_patterns.py --save DIR`,
or `tokvis fit --out DIR/<method>_keep<rate>.safetensors`); those rows are labelled "fitted".
"""

from __future__ import annotations

import argparse
import warnings

import torch

import tokvis
from tokvis import data, fitting, zoo
from tokvis.bench import benchmark, fitted_method_path, method_configs
from tokvis.methods import create_method, parse_method_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dinov2_small_offline")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep-rates", nargs="+", type=float, default=[0.7, 0.5])
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--fitted", default=None, help="fitted methods: <method>_keep<rate>.safetensors")
    args = p.parse_args()
    torch.manual_seed(0)
    model = zoo.create(args.model)
    imgs, _ = data.load_images(model)
    images = imgs.repeat(-(-args.batch_size // imgs.shape[0]), 1, 1, 1)[: args.batch_size]
    methods = args.methods or tokvis.list_methods()
    print(f"model {args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, cpu, methods {methods}")
    configs = []
    for label, method, kw in method_configs(methods, args.keep_rates):
        if method is not None:
            path = fitted_method_path(args.fitted, method, kw["keep_rate"]) if args.fitted else None
            try:  # a method that cannot run on this model (or schedule) is listed, not fatal
                if path is not None and path.is_file():
                    method, label = fitting.load_method(path), f"{label} fitted"
                else:
                    name, options = parse_method_spec(method)
                    method = create_method(name, **options)
                tokvis.patch(model, method, **kw)
            except tokvis.errors.TokvisError as e:
                print(f"skipped {label}: {e}")
                continue
            finally:
                tokvis.unpatch(model)
        configs.append((label, method, kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfitted learned methods warn once each
        benchmark(model, images, configs, repeats=args.repeats, warmup=1)


if __name__ == "__main__":
    main()
