"""Dropout: the counter-based hash (torch == Triton, bit for bit), its statistics, and
flex_attention with dropout against the reference given the same keep pattern."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_close_to_golden, make_qkv
from mods_zoo import make_mod
from flexattn import create_block_mask, dropout_mask, flex_attention
from flexattn.dropout import draw_seed, dropout_hash, dropout_threshold
from flexattn.reference import reference_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_hash_is_bit_identical_to_torch():
    # TRITON_INTERPRET must be set before triton builds the kernel: run in a fresh process.
    script = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from flexattn.dropout import (dropout_hash, dropout_hash_triton, dropout_keep_triton,
                                      dropout_threshold, signed32, split_seed)

        @triton.jit
        def hash_kernel(out, keep, seed_lo, seed_hi, thr, M: tl.constexpr, N: tl.constexpr):
            b = tl.program_id(0)
            hq = tl.program_id(1)
            q = tl.arange(0, M)[:, None] + 1000
            kv = tl.arange(0, N)[None, :]
            offs = (b * tl.num_programs(1) + hq) * M * N + (q - 1000) * N + kv
            tl.store(out + offs, dropout_hash_triton(seed_lo, seed_hi, b, hq, q, kv).to(tl.int64))
            tl.store(keep + offs, dropout_keep_triton(seed_lo, seed_hi, thr, b, hq, q, kv).to(tl.int8))

        B, H, M, N = 2, 3, 16, 64
        for seed in (0, 1, 2**31 + 5, 2**40 + 12345, 2**64 - 1):
            for p in (0.0, 0.1, 0.5, 0.999):
                lo, hi = split_seed(seed)
                out = torch.zeros(B, H, M, N, dtype=torch.int64)
                keep = torch.zeros(B, H, M, N, dtype=torch.int8)
                hash_kernel[(B, H)](out, keep, signed32(lo), signed32(hi), signed32(dropout_threshold(p)), M=M, N=N)
                ar = lambda n: torch.arange(n, dtype=torch.int32)
                ref = dropout_hash(seed, ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1),
                                   ar(M).view(1, 1, M, 1) + 1000, ar(N).view(1, 1, 1, N))
                assert torch.equal(out, ref), (seed, p)
                assert torch.equal(keep.bool(), ref >= dropout_threshold(p)), (seed, p)
        print("bit-identical")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "bit-identical" in res.stdout, res.stdout + res.stderr


def test_hash_range_and_threshold_rule():
    h = dropout_hash(7, 0, 0, torch.arange(1000).view(-1, 1), torch.arange(1000).view(1, -1))
    assert h.min() >= 0 and h.max() < 2**32 and h.dtype == torch.int64
    assert dropout_threshold(0.0) == 0 and dropout_threshold(0.5) == 2**31
    assert len(h.unique()) > 0.99 * h.numel()  # no structure collapsing values


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_fraction(p):
    keep = dropout_mask(1234, 2, 4, 256, 256, p)
    assert keep.shape == (2, 4, 256, 256) and keep.dtype == torch.bool
    assert abs((1 - keep.float().mean().item()) - p) < 0.01
    # no visible structure: every row and column drops about p as well
    assert abs((1 - keep.float().mean(-1)) - p).max() < 0.15
    assert abs((1 - keep.float().mean(-2)) - p).max() < 0.15


def test_seed_changes_pattern():
    a, b = dropout_mask(1, 1, 2, 64, 64, 0.5), dropout_mask(2, 1, 2, 64, 64, 0.5)
    assert torch.equal(a, dropout_mask(1, 1, 2, 64, 64, 0.5))
    assert 0.4 < (a != b).float().mean() < 0.6
    assert 0.4 < (a[:, 0] != a[:, 1]).float().mean() < 0.6  # heads differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["causal", "rel_bias", "empty_rows"])
def test_matches_reference_with_same_pattern(name, dtype):
    B, Hq, Hkv, L, S, p, seed = 2, 4, 2, 70, 90, 0.3, 99
    m = make_mod(name, B=B, H=Hq, L=L, S=S, requires_grad=True)
    m64 = make_mod(name, B=B, H=Hq, L=L, S=S, requires_grad=True, buffer_dtype=torch.float64)
    q, k, v = make_qkv(B, Hq, Hkv, L, S, 16, dtype=dtype)
    bm = create_block_mask(m.mask_mod, None, None, L, S, BLOCK_SIZE=(32, 16)) if m.mask_mod else None
    out, lse = flex_attention(q, k, v, m.score_mod, bm, enable_gqa=True, return_lse=True,
                              dropout_p=p, dropout_seed=seed)
    keep = dropout_mask(seed, B, Hq, L, S, p)
    ref_out, ref_lse = reference_attention(q, k, v, m.score_mod, m.mask_mod, enable_gqa=True,
                                           dropout_keep=keep, dropout_p=p)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    gold_out, gold_lse = reference_attention(q64, k64, v64, m64.score_mod, m64.mask_mod, enable_gqa=True,
                                             dropout_keep=keep, dropout_p=p)
    assert_close_to_golden("out", out, ref_out, gold_out)
    assert_close_to_golden("lse", lse, ref_lse, gold_lse)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bufs, bufs64 = list(m.captured.values()), list(m64.captured.values())
    got = torch.autograd.grad((out * dout.to(dtype)).sum(), [q, k, v] + bufs)
    ref = torch.autograd.grad((ref_out * dout.to(dtype)).sum(), [q, k, v] + bufs)
    gold = torch.autograd.grad((gold_out * dout).sum(), [q64, k64, v64] + bufs64)
    for n, a, r, g in zip(["dq", "dk", "dv"] + list(m.captured), got, ref, gold):
        assert_close_to_golden(n, a, r, g)


def test_same_seed_same_result_and_manual_seed():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, requires_grad=False)
    a = flex_attention(q, k, v, dropout_p=0.5, dropout_seed=5)
    assert torch.equal(a, flex_attention(q, k, v, dropout_p=0.5, dropout_seed=5))
    assert not torch.equal(a, flex_attention(q, k, v, dropout_p=0.5, dropout_seed=6))
    torch.manual_seed(0)
    b = flex_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(b, flex_attention(q, k, v, dropout_p=0.5))
    torch.manual_seed(0)
    seed = draw_seed()  # the seed that run drew
    assert torch.equal(b, flex_attention(q, k, v, dropout_p=0.5, dropout_seed=seed))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(flex_attention(q, k, v, dropout_p=0.5, generator=g1),
                       flex_attention(q, k, v, dropout_p=0.5, generator=g2))


def test_dropout_zero_is_no_dropout():
    q, k, v = make_qkv(1, 2, 2, 30, 30, 16, requires_grad=False)
    assert torch.equal(flex_attention(q, k, v, dropout_p=0.0, dropout_seed=1), flex_attention(q, k, v))


def test_kernels_never_specialise_the_seed():
    # a seed whose low or high 32 bits are 1 (seed 1, 2**32 + 1) would otherwise become a
    # compile-time constant: a recompile per such seed, and the dropout hash failed to
    # compile with it (seen on the H200)
    pytest.importorskip("triton")
    from flexattn.kernels.source import DROPOUT_VALUES, load
    for kind, names in (("fwd", ("flex_fwd",)), ("bwd", ("flex_bwd_dq", "flex_bwd_dkdv"))):
        mod = load(kind, None, None, [] if kind == "bwd" else None)
        for name in names:
            assert set(DROPOUT_VALUES) <= set(getattr(mod, name).do_not_specialize), (kind, name)
