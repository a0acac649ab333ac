"""MCTF costs no more than the authors' block: torch's flop counter on tokvis <= the official block's operations.

The reference count is written from what the authors' block (mlvlab/MCTF ``models/modules/blocks.py`` with
``models/SA/MHSA.py``) multiplies, in multiply-adds, from the token counts of their schedule (``utils/mctf.py``:
``r`` capped at half of the patch tokens, a fraction taken of the patch tokens), not from tokvis:

- a plain block on ``T`` tokens: ``qkv`` ``3 T C^2``, ``q k^T`` and ``A v`` ``T^2 C`` each, ``proj`` ``T C^2``,
  the MLP ``2 T C h``;
- a reducing block with one-step-ahead attention, ``T`` tokens in and ``T'`` out: ``q`` and ``k`` only on the
  ``T`` input tokens ``2 T C^2``, ``q k^T`` ``T^2 C``, the similarity of the bipartite halves of the whole
  sequence ``ceil(T/2) floor(T/2) C``, then ``v`` only on the fused tokens ``T' C^2``, the fused map times it
  ``T'^2 C``, ``proj`` ``T' C^2`` and the MLP ``2 T' C h``;
- without one-step-ahead: a plain block on ``T`` tokens, then the similarity on its output.

Plus the patch embedding and the head.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokvis
from tests.models import make_images, make_model
from tokvis.bench import count_gmacs


def _official_macs(model, n_patches: int, r, locations, one_step_ahead: bool) -> float:
    C = model.embed_dim
    h = model.blocks[0].mlp.fc1.out_features
    p = model.num_prefix_tokens
    k = model.patch_embed.proj.kernel_size
    total = n_patches * C * model.patch_embed.proj.in_channels * k[0] * k[1]  # patch embedding
    T = p + n_patches

    def plain(t):
        return 3 * t * C * C + 2 * t * t * C + t * C * C + 2 * t * C * h

    for layer in range(len(model.blocks)):
        if layer not in locations:
            total += plain(T)
            continue
        n = T - p
        rr = min(math.floor(r * n) if r < 1 else r, n // 2)
        sim = math.ceil(T / 2) * (T // 2) * C
        out = T - rr
        if one_step_ahead:
            total += 2 * T * C * C + T * T * C + sim + out * C * C + out * out * C + out * C * C + 2 * out * C * h
        else:
            total += plain(T) + sim
        T = out
    return total + C * model.head.out_features


@pytest.mark.parametrize(
    "r, options",
    [(4, {}), (4, {"one_step_ahead": False}), (4, {"bidirectional": False}), (0.35, {})],
    ids=["paper default", "one-step-ahead off", "bidirection off", "MCTF-Fast"],
)
def test_mctf_flops_at_most_the_official_blocks(r, options):
    model = make_model("cls")
    images = make_images("cls", n=2)
    tokvis.patch(model, "mctf", r=r, **options)
    locations = model._tokvis.schedule.locations
    official = _official_macs(model, 64, r, locations, options.get("one_step_ahead", True)) / 1e9
    ours = count_gmacs(model, images)
    assert ours <= official * (1 + 1e-9)
    assert ours >= 0.97 * official  # the same computation, not a cheaper one that skips a part


def test_one_step_ahead_projects_no_value_of_the_input_tokens(monkeypatch):
    """A reducing block runs the q and k rows of ``qkv`` on its input and the v rows on the fused tokens only
    (no full ``qkv`` on either); the other blocks run the full ``qkv`` once."""
    model = make_model("cls")
    tokvis.patch(model, "mctf", r=4, locations=[1])
    C = model.embed_dim
    owner = {blk.attn.qkv.weight.untyped_storage().data_ptr(): i for i, blk in enumerate(model.blocks)}
    calls: dict[int, list[tuple[int, int]]] = {}
    linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        block = owner.get(w.untyped_storage().data_ptr())
        if block is not None:
            calls.setdefault(block, []).append((x.shape[1], w.shape[0]))
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        model(make_images("cls", n=1))
    T = model.patch_embed.num_patches + 1
    assert calls[0] == [(T, 3 * C)]
    assert calls[1] == [(T, 2 * C), (T - 4, C)]  # q, k of the input; v of the fused tokens
    assert calls[2] == [(T - 4, 3 * C)]
