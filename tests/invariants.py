"""The method test matrix and the invariants every reduction method must meet.

:data:`METHOD_MATRIX` has one entry per registered method (``tokvis.list_methods()``; a guard
test in ``tests/unit/test_invariants.py`` fails when a method is registered without one), with the
few facts the invariants need to know about it.  ``tests/unit/test_invariants.py`` runs every
invariant over the whole matrix, so a new method gets all of them by adding its entry here.

Kept out of the test modules so that importing them never makes pytest collect (and run) a
parametrised test a second time under another module.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.errors import TokvisError
from tokvis.schedule import default_locations


@dataclass(frozen=True)
class MethodCase:
    """What the invariants need to know about one registered method."""

    #: reducing schedules (``tokvis.patch`` keywords, options included) every invariant runs on
    schedules: tuple[dict, ...]
    #: schedule conventions the method accepts; ``tokvis.patch`` with another must raise
    conventions: tuple[str, ...] = ("keep_rate", "r")
    #: ranks tokens by the class token: a model without one (average pooling) is refused
    needs_class_token: bool = False
    #: learned parameters (randomly initialised): marked fitted in the tests so that they do not warn
    learned: bool = False
    #: ``r`` removes at most half the tokens of a block (ToMe, MCTF)
    r_capped_at_half: bool = False
    #: one extra token holds the dropped ones when something is dropped (EViT)
    fused_token: bool = False
    #: keeps *up to* the budget per image (ATS samples with repetition); the sequence keeps the budget's length,
    #: an image with fewer tokens gets padding slots (size 0, masked), so real-token counts are upper-bounded
    adaptive: bool = False
    #: the same input gives the same decisions and output (no sampling without a seed)
    deterministic: bool = True
    #: ``keep_rate=1.0`` gives the unpatched output bit for bit (not only up to rounding): false for methods
    #: whose reducing block recomputes attention through its own path (MCTF, VoMix)
    exact_at_keep_rate_one: bool = True
    #: flavours of ``tests.models`` the composition invariants run on
    flavours: tuple[str, ...] = ("cls", "registers", "distilled")


#: One entry per registered method; the guard test asserts the keys are exactly ``list_methods()``.
METHOD_MATRIX: dict[str, MethodCase] = {
    "ats": MethodCase(
        schedules=(
            {"keep_rate": 0.7},
            {"keep_rate": 0.5, "locations": [0, 2, 5]},
            {"keep_rate": 0.5, "sampling": "sorted"},
        ),
        conventions=("keep_rate",),
        needs_class_token=True,
        adaptive=True,
    ),
    "dpcknn": MethodCase(schedules=({"keep_rate": 0.5}, {"keep_rate": 0.5, "locations": [0, 2, 5]}, {"r": 6})),
    "dynamicvit": MethodCase(schedules=({"keep_rate": 0.7}, {"r": 6}), learned=True),
    "evit": MethodCase(
        schedules=(
            {"keep_rate": 0.7},
            {"keep_rate": 0.25},
            {"r": 4, "locations": [1, 4]},
            {"keep_rate": 0.5, "fused": "mean"},
        ),
        needs_class_token=True,
        fused_token=True,
    ),
    # the study's start (attention received in the block before) needs no class token; r: every block but the first
    "kmedoids": MethodCase(schedules=({"keep_rate": 0.5}, {"r": 6})),
    "mctf": MethodCase(
        schedules=({"r": 5}, {"keep_rate": 0.5}, {"r": 0.3, "one_step_ahead": False}),
        r_capped_at_half=True,
        exact_at_keep_rate_one=False,
    ),
    "patchmerger": MethodCase(schedules=({"keep_rate": 0.5, "locations": [0, 2, 5]}, {"r": 6}), learned=True),
    "radial": MethodCase(schedules=({"keep_rate": 0.5}, {"r": 6})),
    "sinkhorn": MethodCase(schedules=({"keep_rate": 0.7}, {"r": 6}), learned=True),
    "sit": MethodCase(schedules=({"keep_rate": 0.5}, {"r": 6}), learned=True),
    "tome": MethodCase(
        schedules=(
            {"r": 5},
            {"r": 20},  # capped at half the tokens per block
            {"r": [0, 8, 0, 30, 2, 1]},
            {"keep_rate": 0.7},
            {"keep_rate": 0.3},  # the study's removals: the cap binds at the first stage
            {"keep_rate": 0.3, "budget": "exact"},  # needs several matching rounds per block
        ),
        r_capped_at_half=True,
    ),
    "topk": MethodCase(
        schedules=({"keep_rate": 0.7}, {"keep_rate": 0.5, "locations": [0, 2, 5]}, {"r": 6}),
        needs_class_token=True,
    ),
    "vomix": MethodCase(
        schedules=({"r": 6}, {"keep_rate": 0.4}, {"r": 0.3, "residual": "drop"}),
        exact_at_keep_rate_one=False,
    ),
}


def case_for(name: str) -> MethodCase:
    """The matrix entry of method ``name``; a clear failure (not a KeyError) when it has none."""
    try:
        return METHOD_MATRIX[name]
    except KeyError:
        pytest.fail(
            f"method {name!r} is registered but has no entry in tests/invariants.py METHOD_MATRIX: add one "
            "(its schedules and facts) so that it gets every invariant"
        )


def matrix_gaps() -> tuple[list[str], list[str]]:
    """``(registered methods without an entry, entries of no registered method)``, each sorted."""
    registered = set(tokvis.list_methods())
    return sorted(registered - set(METHOD_MATRIX)), sorted(set(METHOD_MATRIX) - registered)


#: ``(method, schedule)`` pairs of the whole matrix, for ``pytest.mark.parametrize``.
MATRIX_SCHEDULES = [(name, kw) for name, case in sorted(METHOD_MATRIX.items()) for kw in case.schedules]


def schedule_id(kw: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kw.items()).replace(" ", "")


def method_for(name: str, kw: dict | None = None):
    """``(method object, schedule keywords)``: options in ``kw`` go to the method, learned ones are marked fitted."""
    kw = dict(kw or {})
    sched = {k: kw.pop(k) for k in ("keep_rate", "r", "locations") if k in kw}
    method = tokvis.create_method(name, **kw)
    if case_for(name).learned:
        method.mark_fitted(True)
    return method, sched


def check_no_reduction(name: str, flavour: str = "cls"):
    """``r=0`` / ``keep_rate=1.0`` leave the output equal to the unpatched model's, every recorded decision
    keeps all tokens, and nothing warns.

    Same batch and shapes, so bit for bit where the computation is the same (``r=0``; ``keep_rate=1.0``
    unless the entry says otherwise), else up to float rounding.
    """
    case = case_for(name)
    model, x = make_model(flavour), make_images(flavour)
    with torch.no_grad():
        ref = model(x)
    for kw in ({"keep_rate": 1.0}, {"r": 0}):
        conv = next(iter(kw))
        method, _ = method_for(name)
        if conv not in case.conventions:
            with pytest.raises(TokvisError, match="keep_rate"):
                tokvis.patch(model, method, **kw)
            continue
        tokvis.patch(model, method, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is reduced: no warning either
            with torch.no_grad():
                out, trace = tokvis.run_with_trace(model, x)
        if conv == "r" or case.exact_at_keep_rate_one:
            assert torch.equal(out, ref), f"{name} {kw}: output differs from the unpatched model"
        else:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        for d in trace.decisions:
            assert d.n_out == trace.num_patches, f"{name} {kw}: block {d.layer} reduced"
        tokvis.unpatch(model)
    # and the same model does reduce at a lower keep rate / positive r (the check can fail)
    method, _ = method_for(name)
    tokvis.patch(model, method, keep_rate=0.6)  # every method takes keep_rate; every grid here has room for it
    with torch.no_grad():
        assert not torch.allclose(model(x), ref, atol=1e-5)
    tokvis.unpatch(model)


def block_token_counts(model, x) -> list[int]:
    """Patch tokens leaving each block in one forward of ``model`` on ``x``."""
    from tokvis.backbones import backbone_for

    p = tokvis.model.model_info(model).num_prefix_tokens
    counts = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1] - p))
        for b in backbone_for(model).blocks(model)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def expected_counts(method, kw, n, depth):
    """Patch tokens leaving each block under schedule ``kw``, from the schedule's definition alone
    (adaptive methods: the sequence length, padding included; each image's real tokens are at most this)."""
    case = case_for(method)
    counts, cur = [], n
    if "keep_rate" in kw:
        locs = kw.get("locations", default_locations(depth))
        prev = n
        for layer in range(depth):
            if layer in locs:
                s = locs.index(layer) + 1
                budget = math.floor(n * kw["keep_rate"] ** s + 1e-9)
                if case.r_capped_at_half and method == "tome" and kw.get("budget", "study") == "study":
                    cur = cur - min(prev - budget, cur // 2)  # the study's removals, capped (tome.py:155,253)
                elif case.adaptive and kw.get("sampling", "study") == "study":
                    K = budget + 1  # the study's levels: the length of its float arange (ats.py:48,205)
                    cur = min(cur, math.ceil(((2 * K - 1) / (2 * K) - 1 / (2 * K)) / (2 / (2 * K))))
                else:
                    cur = budget + (1 if case.fused_token and budget < cur else 0)
                prev = budget
            counts.append(cur)
        return counts
    r = kw["r"]
    # without locations: every block, unless the method's reference code says otherwise (MCTF skips block 0)
    locs = kw.get("locations") or tokvis.create_method(method).default_locations(depth, r=r) or range(depth)
    per = r if isinstance(r, list) else [r if layer in locs else 0 for layer in range(depth)]
    for layer in range(depth):
        rr = per[layer]
        if isinstance(rr, float) and 0 < rr < 1:  # a fraction of the tokens entering the block
            rr = math.floor(rr * cur)
        if case.r_capped_at_half:
            rr = min(rr, cur // 2)
        if rr:
            cur = cur - rr + (1 if case.fused_token else 0)
        counts.append(cur)
    return counts


def dense_labels(trace, layer):
    """Labels from the dense product of per-layer assignment matrices (independent of the gather path)."""
    B, N = trace.num_images, trace.num_patches
    M = torch.eye(N, dtype=torch.float64).expand(B, N, N)
    for d in trace.decisions:
        if d.layer > layer:
            break
        M = d.assignment_matrix() @ M  # [B, n_out, N]
    col = M.sum(1)  # 1 if the patch is in some token, 0 if dropped
    return torch.where(col > 0, M.argmax(1), -1), col


def check_composition_kept_depth(flavour, method, kw):
    """Composition equals the dense product; each patch in one token or dropped; kept/depth consistent."""
    model, x = make_model(flavour), make_images(flavour, n=4)
    obj, sched = method_for(method, kw)
    tokvis.patch(model, obj, **sched)
    _, trace = tokvis.run_with_trace(model, x)
    assert trace.layers, "a reducing schedule records decisions"
    depth = trace.depth()
    prev_kept = torch.ones(4, 64, dtype=torch.bool)
    for layer in range(-1, 6):
        labels, kept = trace.labels(layer), trace.kept(layer)
        dense, col = dense_labels(trace, layer)
        # each original patch belongs to exactly one token or is dropped
        assert set(col.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(labels, dense)
        if layer in trace.layers:
            assert int(labels.max()) < trace.decision(layer).n_out
        assert bool((labels >= -1).all())
        assert not bool((kept & (labels < 0)).any()), "kept implies labels >= 0"
        assert not bool((kept & ~prev_kept).any()), "a patch never becomes its own token again"
        # depth is the first block after which the patch is not its own token
        assert torch.equal(kept, depth > layer)
        # kept patches hold distinct tokens
        for b in range(4):
            own = labels[b][kept[b]]
            assert own.unique().numel() == own.numel()
        prev_kept = kept


def check_batch_items_independent(method, kw, flavour="registers"):
    """Each image of a batch gets the partition it gets alone, and the same output up to float rounding
    (float64 model; never bit for bit across batch sizes: BLAS kernels depend on the batch size)."""
    model, x = make_model(flavour, dtype=torch.float64), make_images(flavour, n=3, dtype=torch.float64)
    obj, sched = method_for(method, kw)
    tokvis.patch(model, obj, **sched)
    with torch.no_grad():
        out, batch = tokvis.run_with_trace(model, x)
    for i in range(3):
        with torch.no_grad():
            single_out, single = tokvis.run_with_trace(model, x[i : i + 1])
        torch.testing.assert_close(single_out[0], out[i], atol=1e-9, rtol=1e-7)
        assert single.layers == batch.layers
        for layer in batch.layers:
            one, many = single.decision(layer), batch.decision(layer)
            if many.soft is not None:
                # soft assignments: the weights agree; their arg-max (dst) only where it is not a tie
                # (late blocks of a random tiny model have exact ties, decided by float rounding)
                torch.testing.assert_close(one.soft[0], many.soft[i], atol=1e-9, rtol=1e-7)
                top2 = many.soft[i].topk(2, dim=0).values
                clear = (top2[0] - top2[1]) > 1e-9
                assert torch.equal(one.dst[0][clear], many.dst[i][clear])
                continue
            # identical partitions (integer labels: exact comparison is right here)
            assert torch.equal(single.labels(layer)[0], batch.labels(layer)[i])
            assert torch.equal(single.kept(layer)[0], batch.kept(layer)[i])
            assert torch.equal(one.dst[0], many.dst[i])  # adaptive methods too: padded to a fixed budget
