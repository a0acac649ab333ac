"""tokvis.bench: the printed table stays aligned whatever the config labels; configurations run in interleaved
rounds with min / median / max and a warning when the machine was busy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.models import make_images, make_model
from tokvis.bench import BenchRow, benchmark, format_rows, spread_warnings


def _row(label: str) -> BenchRow:
    return BenchRow(label, 12.5, 6.02, 2.03, 2.06, 1.01, 12.4, 1.012, 0.868)


def test_columns_align_with_long_labels():
    rows = [_row("unpatched"), _row("sinkhorn:eps=0.1 keep_rate=0.5 fitted"), _row("tome r=16")]
    lines = format_rows(rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    start = lines[0].index("images_per_s")
    assert [float(line[start : start + len("images_per_s")]) for line in lines[1:]] == [12.5] * 3
    # rows printed one at a time (as benchmark() does) line up when given the run's widest label
    width = max(len(r.config) for r in rows)
    single = [format_rows([r], header=False, label_width=width) for r in rows]
    assert [len(s) for s in single] == [len(lines[1])] * 3
    assert single[1] == lines[2]


# -- interleaved rounds, min / median / max, busy-machine warning (issue 12 §4) ---------------------


class _Clock:
    """A fake ``time`` for tokvis.bench: it stands still except when a wrapped model 'takes' some time, so that
    the timings benchmark() sees are exactly the ones a test chose, whatever the load of the machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    import tokvis.bench

    fake = _Clock()
    monkeypatch.setattr(tokvis.bench, "time", fake)
    return fake


class _Logged(nn.Module):
    """Wraps the model: logs each call under ``label`` and, on ``clock``, takes ``delays[call]`` seconds
    (default 0)."""

    def __init__(self, model, label, log, delays=(), clock=None):
        super().__init__()
        self.model, self.label, self.log, self.delays, self.clock = model, label, log, list(delays), clock

    def forward(self, x):
        self.log.append(self.label)
        if self.delays:
            self.clock.now += self.delays.pop(0)
        return self.model(x)


def test_configurations_run_in_interleaved_rounds(clock):
    """A B C A B C ...: the first configuration no longer absorbs the warm-up (bench_record reported
    recording 1.8x faster than plain inference)."""
    model, x = make_model("cls"), make_images("cls", n=2)
    log: list[str] = []
    # calls: flop count, 2 warm-up rounds, 3 timed rounds (0.3, 0.1, 0.2 s), output
    delays = {"A": [0, 9, 9, 0.3, 0.1, 0.2, 0], "B": [0, 9, 9, 0.2, 0.2, 0.2, 0], "C": [0, 9, 9, 0.1, 0.4, 0.4, 0]}
    configs = [(c, (lambda m, c=c: _Logged(m, c, log, delays[c], clock)), {}) for c in "ABC"]
    rows = benchmark(model, x, configs, repeats=3, warmup=2, progress=None)
    timed = [c for c in log if c in "ABC"]
    assert timed[:3] == ["A", "B", "C"]  # the flop count, one call each
    assert timed[3 : 3 + 15] == list("ABC") * 5  # 2 warm-up + 3 timed rounds, interleaved
    # the warm-up (9 s) is not timed; median, fastest and slowest of the timed rounds; B = 2 images
    got = [v for r in rows for v in (r.images_per_s, r.images_per_s_min, r.images_per_s_max, r.spread)]
    assert got == pytest.approx([2 / 0.2, 2 / 0.3, 2 / 0.1, 3.0, 10.0, 10.0, 10.0, 1.0, 5.0, 5.0, 20.0, 4.0])
    assert [r.speedup for r in rows] == pytest.approx([1.0, 1.0, 0.5])


def test_several_calls_per_round_are_timed_together(clock):
    """``calls=3``: each round runs each configuration three times in a row (A A A B B B ...), and a round's
    time is their mean (calls of 0.03, 0.05 and 0.07 s give 20 calls/s, not 20 / 3)."""
    model, x = make_model("cls"), make_images("cls", n=2)
    log: list[str] = []
    a_delays = [0.0] + [0.05] * 3 + [0.03, 0.05, 0.07] * 2 + [0.0]  # flop count, warm-up, 2 timed rounds, output
    configs = [("A", lambda m: _Logged(m, "A", log, a_delays, clock), {}),
               ("B", lambda m: _Logged(m, "B", log, [0.1] * 20, clock), {})]  # fmt: skip
    rows = benchmark(model, x, configs, repeats=2, warmup=1, progress=None, calls=3)
    assert log[2 : 2 + 18] == list("AAABBB") * 3  # after the FLOP counts: 1 warm-up + 2 timed rounds
    a, b = rows
    assert a.images_per_s == pytest.approx(x.shape[0] / 0.05) and a.spread == pytest.approx(1.0)
    assert b.images_per_s == pytest.approx(x.shape[0] / 0.1) and b.speedup == pytest.approx(0.5)


def test_busy_machine_is_reported(clock):
    """A configuration whose rounds differ by more than SPREAD_WARNING gets a warning line, the other none."""
    model, x = make_model("cls"), make_images("cls", n=2)
    log: list[str] = []
    # calls: flop count, warm-up, three timed rounds, output
    calm, busy = [0.1] * 6, [0.1, 0.1, 0.1, 0.4, 0.1, 0.1]
    configs = [("calm", lambda m: _Logged(m, "calm", log, calm, clock)),
               ("busy", lambda m: _Logged(m, "busy", log, busy, clock))]  # fmt: skip
    printed: list[str] = []
    rows = benchmark(model, x, [(label, f, {}) for label, f in configs], repeats=3, warmup=1, progress=printed.append)
    by = {r.config: r for r in rows}
    assert by["busy"].spread == pytest.approx(4.0) and by["calm"].spread == pytest.approx(1.0)
    warnings_ = [line for line in printed if line.startswith("warning:")]
    assert len(warnings_) == 1 and warnings_[0].startswith("warning: busy: rounds differ by 4.00x")
    assert "machine was busy" in warnings_[0]
    assert by["busy"].images_per_s_min == pytest.approx(2 / 0.4) and by["busy"].images_per_s == pytest.approx(20)


def test_spread_warnings_threshold():
    calm, busy = _row("calm"), _row("busy")
    calm.spread, busy.spread = 1.29, 1.31
    assert spread_warnings([calm]) == []
    assert [w.split(":")[1].strip() for w in spread_warnings([calm, busy])] == ["busy"]


def test_benchmark_patched_tiny_model_rows():
    model, x = make_model("cls"), make_images("cls", n=2)
    configs = [("unpatched", None, {}), ("tome r=4", "tome", {"r": 4}), ("topk keep 0.5", "topk", {"keep_rate": 0.5})]
    rows = benchmark(model, x, configs, repeats=2, warmup=1, progress=None)
    assert [r.config for r in rows] == ["unpatched", "tome r=4", "topk keep 0.5"]
    assert rows[0].speedup == 1.0 and rows[0].fidelity > 0.999
    assert rows[1].flops_ratio > 1.0 and rows[2].flops_ratio > 1.0
    assert all(r.recorded_images_per_s > 0 for r in rows[1:])
    assert not hasattr(model, "_tokvis")  # left unpatched
    # gmacs_per_image counts multiply-adds (the papers' "GFLOPs"), not torch's 2 FLOPs per multiply-add:
    # patch embedding, per block qkv + proj + MLP (4 C^2 + 2 C h per token) and the two T^2 C attention products
    C, h, T, n = model.embed_dim, model.blocks[0].mlp.fc1.out_features, 65, 64
    patch = n * C * 3 * 8 * 8
    blocks = len(model.blocks) * (T * (4 * C * C + 2 * C * h) + 2 * T * T * C)
    assert rows[0].gmacs_per_image == pytest.approx((patch + blocks + C * 10) / 1e9, rel=1e-9)


@pytest.mark.slow  # compiling takes about a minute on the CPU
def test_benchmark_compiled_equals_eager_outputs():
    """compile=True: one compiled copy per configuration; fidelity (same outputs) as in eager."""
    pytest_ = pytest
    if not hasattr(torch, "compile"):
        pytest_.skip("no torch.compile")
    model, x = make_model("cls"), make_images("cls", n=2)
    configs = [("unpatched", None, {}), ("topk keep 0.5", "topk", {"keep_rate": 0.5})]
    torch._dynamo.reset()  # a clean dynamo state, as in tests/unit/test_compile.py (and for the tests after this)
    eager = benchmark(model, x, configs, repeats=1, warmup=1, progress=None, record=False)
    try:
        compiled = benchmark(model, x, configs, repeats=1, warmup=1, progress=None, compile=True, record=False)
    except Exception as e:  # no C compiler for inductor on this machine (any other failure fails the test)
        if "compiler" not in str(e).lower() and "cc" not in type(e).__name__.lower():
            raise
        pytest_.skip(f"torch.compile unavailable: {type(e).__name__}")
    finally:
        torch._dynamo.reset()
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a.fidelity - b.fidelity) < 1e-4 and a.flops_ratio == b.flops_ratio


def test_compiled_benchmark_compiles_static_shapes_with_room_for_every_configuration(monkeypatch):
    """The compiled copies share code objects, so each configuration adds dynamo cache entries: past the
    default recompile limit (8) dynamo would silently run later configurations eagerly.  benchmark() raises
    the limit with the number of configurations, makes hitting it an error, compiles with static shapes
    (no automatic dynamic shapes), and restores dynamo's settings afterwards."""
    import torch._dynamo

    seen = []

    def spy_compile(m, **kwargs):
        def run(x):
            cfg = torch._dynamo.config
            seen.append((kwargs, cfg.recompile_limit, cfg.fail_on_recompile_limit_hit))
            return m(x)

        return run

    monkeypatch.setattr(torch, "compile", spy_compile)
    model, x = make_model("cls"), make_images("cls", n=2)
    methods = ["topk", "evit", "tome", "radial", "ats", "dpcknn", "kmedoids", "mctf", "vomix"]
    configs = [("unpatched", None, {})] + [(m, m, {"keep_rate": 0.7}) for m in methods]
    before = (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit)
    benchmark(model, x, configs, repeats=1, warmup=1, progress=None, compile=True, record=True)
    assert len(seen) >= 2 * len(configs)  # every configuration ran, plain and recorded
    assert all(kw == {"dynamic": False} for kw, _, _ in seen)
    assert all(limit >= 4 * len(configs) and fail for _, limit, fail in seen)
    assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit) == before


# -- tokvis bench --device / --dtype / --methods (the GPU table) and benchmarks/bench_gpu.py ------------


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--device", "tpu"], "device must be cpu, cuda or cuda:<n>: got 'tpu'"),
        (["--device", "cuda:x"], "device must be cpu, cuda or cuda:<n>"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
        (["--methods", "tomee"], "tomee"),
    ],
)
def test_cli_bench_bad_gpu_arguments_are_one_line(argv, needle, capsys):
    from tokvis.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_bench_cuda_without_cuda_says_use_cpu(capsys):
    from tokvis.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cuda", "--dtype", "fp16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "CUDA is not available" in err and "--device cpu" in err


def test_bench_gpu_script_runs_on_cpu_with_tiny_settings(capsys):
    """benchmarks/bench_gpu.py on a random-init tiny timm ViT (no internet, no weights)."""
    from tests.scripts import load_benchmark

    mod = load_benchmark("bench_gpu")
    mod.main(["--device", "cpu", "--dtype", "bf16", "--model", "vit_tiny_patch16_224", "--img-size", "64",
              "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--methods", "tome", "topk", "mctf",
              "--tome-r", "2", "--tome-repo", "/nonexistent/ToMe"])  # fmt: skip
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "official ToMe skipped" in out
    assert "bf16" in lines[1] and "eager" in lines[1]
    rows = [line for line in lines if line.split(" ")[0] in ("unpatched", "tome", "topk", "mctf")]
    assert [" ".join(r.split()[:2]) for r in rows][1:] == [
        "tome r=2", "tome keep_rate=0.5", "topk keep_rate=0.5", "mctf keep_rate=0.7"
    ]  # fmt: skip
    header = next(line for line in lines if line.startswith("config"))
    for col in ("images_per_s", "min", "max", "speedup_per_flops", "recorded_images_per_s", "peak_MB"):
        assert col in header
