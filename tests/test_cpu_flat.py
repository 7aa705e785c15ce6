"""The CPU path's flat calls (flexattn.cpu: a batched plan whose q-tiles each meet one span of
K/V run their forward as one call of the fused kernel, every span widened to the widest and
the widening masked out; the backward by the plan's groups), against the float64 golden, and
where they are not taken."""
from __future__ import annotations

import pytest
import torch

import flexattn.cpu as cpu
from conftest import make_qkv
from flexattn import create_block_mask, flex_attention
from test_attention_cpu import check_case
from test_cpu_batched import torch_threads


@pytest.fixture
def flat_calls(monkeypatch):
    calls = []
    for name in ("_flat_forward", "_batched_forward", "_batched_backward"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *args, _n=name, _r=real: calls.append(_n) or _r(*args))
    return calls


@pytest.mark.parametrize("case", [
    dict(name="sliding_window", B=1, Hq=2, L=256, S=256, block=32),
    dict(name="document", B=1, Hq=4, Hkv=2, L=256, S=256, block=16),         # GQA, uneven spans
    dict(name="empty_rows", B=1, Hq=2, L=160, S=160, block=32),              # fully masked rows in a tile
    dict(name="document", B=1, Hq=2, L=192, S=192, block=32, dtype=torch.float64),
    dict(name="sliding_window", B=1, Hq=2, L=256, S=256, block=128, dtype=torch.bfloat16),
    # 128-row tiles halved, K/V a view of a padded copy (window) or of the first rows (documents)
    dict(name="sliding_window", B=1, Hq=2, L=512, S=512, block=128),
    dict(name="sliding_window", B=1, Hq=4, Hkv=2, L=512, S=512, block=128, dtype=torch.bfloat16),
    dict(name="document", B=1, Hq=2, L=512, S=512, block=128),
])
def test_flat_calls_match_golden(case, flat_calls):
    with torch_threads(2):
        check_case(**case, lse_in_loss=False)
    assert flat_calls == ["_flat_forward", "_batched_backward"]   # the backward by the plan's groups


def test_flat_calls_not_in_a_forked_child(monkeypatch, flat_calls):
    # (they run on the caller's OpenMP team, a broken copy in a forked child)
    monkeypatch.setattr(cpu, "_FORKED", True)
    check_case("sliding_window", B=1, Hq=2, L=256, S=256, block=32, lse_in_loss=False)
    assert flat_calls == ["_batched_forward", "_batched_backward"]


def test_flat_calls_only_where_small_and_widening_pays(monkeypatch):
    # one long document among short ones: widening every span to the longest would cost more
    # than twice the columns; a window's spans are alike; a large call keeps the workers
    L = 512
    doc = torch.where(torch.arange(L) < 256, 0, 1 + (torch.arange(L) - 256) // 32)
    q, k, v = make_qkv(1, 2, 2, L, L, 16, requires_grad=False)

    def flat(mask):
        bm = create_block_mask(mask, None, None, L, L, BLOCK_SIZE=32)
        flex_attention(q, k, v, block_mask=bm)
        return list(bm._flexattn_cpu_plans.values())[0][2].flat is not None

    def window(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < 64)
    assert not flat(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki))
    assert flat(window)
    monkeypatch.setattr(cpu, "_FLAT_SMALL", 2 * L * 64)
    assert not flat(window)


def test_one_mask_kept_for_tiles_alike():
    # a window's tiles all have the same mask: the plan keeps it once (16K sliding window
    # fits the plan's cap)
    L = 1024
    bm = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < 64), None, None, L, L, BLOCK_SIZE=32)
    q, k, v = make_qkv(1, 2, 2, L, L, 16, requires_grad=False)
    flex_attention(q, k, v, block_mask=bm)
    plan = list(bm._flexattn_cpu_plans.values())[0][2]
    big = max(plan.groups, key=lambda g: g.G)
    assert big.G > 20 and big.bias.stride(1) == 0


@pytest.mark.parametrize("mask, layout", [
    # 128-row tiles halved twice: every 32-row tile reads the window before it, 287 columns
    # at the same offset from its rows, so K/V are a view of themselves padded with 255 rows
    # before the first
    (lambda b, h, qi, ki: (qi >= ki) & (qi - ki < 256), (32, 287, 32, (255, 0))),
    # six documents, causal: every tile's span ends at its last row
    (lambda b, h, qi, ki: (qi // 171 == ki // 171) & (qi >= ki), (32, 202, 32, (170, 0))),
    # a window ahead of the rows: padding after the last row
    (lambda b, h, qi, ki: (ki >= qi) & (ki - qi < 256), (32, 287, 32, (0, 255))),
])
def test_flat_tiles_halved_and_kv_a_view(mask, layout):
    L = 1024
    bm = create_block_mask(mask, None, None, L, L, BLOCK_SIZE=128)
    q, k, v = make_qkv(1, 2, 2, L, L, 16, requires_grad=False)
    out = flex_attention(q, k, v, block_mask=bm)
    flat = list(bm._flexattn_cpu_plans.values())[0][2].flat
    assert (flat.M, flat.N, flat.step, flat.pad) == layout
    allowed = mask(0, 0, torch.arange(L)[:, None], torch.arange(L)[None])
    ref = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
