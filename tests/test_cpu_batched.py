"""The CPU path's batched forward (flexattn.cpu: the q-tiles of one chunk shape in one call of
the fused kernel per thread, by a plan kept on the BlockMask) against the float64 golden and
the tile-by-tile path, and the plan's upkeep."""
from __future__ import annotations

import contextlib

import pytest
import torch

import flexattn.cpu as cpu
from conftest import make_qkv
from flexattn import create_block_mask, flex_attention
from test_attention_cpu import check_case


@pytest.fixture
def batched_calls(monkeypatch):
    # dense and causal calls run as whole rows per head (test_cpu_whole.py); here they take
    # the batched forward like any other mask
    monkeypatch.setattr(cpu, "_whole_rows", lambda *args: None)
    calls = []
    real = cpu._batched_forward

    def counting(run, plan, *args):
        calls.append(plan)
        return real(run, plan, *args)
    monkeypatch.setattr(cpu, "_batched_forward", counting)
    return calls


@pytest.mark.parametrize("case", [
    dict(name="sliding_window", B=1, Hq=2, L=300, S=270, block=16),                  # strided K/V views
    dict(name="document", B=2, Hq=4, Hkv=2, L=129, S=200, block=16),                 # gathers, GQA, B > 1
    dict(name="causal", B=1, Hq=2, L=97, S=130, block=16, dtype=torch.float64),
    dict(name="causal", B=1, Hq=2, L=100, S=100, block=(16, 32), dtype=torch.bfloat16),
    dict(name="empty_rows", B=1, Hq=2, L=97, S=130, block=16),                       # q-tiles with no block
    dict(name="none", B=2, Hq=2, L=129, S=129, block=16),
])
def test_batched_forward_matches_golden(case, batched_calls):
    check_case(**case, lse_in_loss=False)
    assert batched_calls


def test_batched_forward_equals_tile_by_tile(monkeypatch, batched_calls):
    q, k, v = make_qkv(1, 4, 4, 1000, 1000, 32, requires_grad=False)
    bm = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < 256), None, None, 1000, 1000)
    got = flex_attention(q, k, v, block_mask=bm, return_lse=True)
    assert batched_calls
    monkeypatch.setattr(cpu, "_batched_plan", lambda *args: None)
    want = flex_attention(q, k, v, block_mask=bm, return_lse=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_many_shapes_keep_the_tile_by_tile_path(batched_calls):
    # causal over 40 q-blocks: each q-tile's full blocks are a span of its own width
    q, k, v = make_qkv(1, 2, 2, 640, 640, 16, requires_grad=False)
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 640, 640, BLOCK_SIZE=16)
    flex_attention(q, k, v, block_mask=bm)
    assert not batched_calls and list(bm._flexattn_cpu_plans.values())[0][2] is None


def test_plan_kept_and_made_anew_when_the_mask_changes(monkeypatch):
    made = []
    real = cpu._make_plan
    monkeypatch.setattr(cpu, "_make_plan", lambda *a: made.append(1) or real(*a))
    L = 200
    doc = torch.arange(L) // 50

    def mask(b, h, qi, ki):
        return doc[qi] == doc[ki]
    bm = create_block_mask(mask, None, None, L, L, BLOCK_SIZE=32)
    q, k, v = make_qkv(1, 2, 2, L, L, 16, requires_grad=False)
    first = flex_attention(q, k, v, block_mask=bm)
    flex_attention(q, k, v, block_mask=bm)
    assert len(made) == 1
    # the captured tensor changed in place: the partial blocks' masks are evaluated anew
    doc.copy_(torch.arange(L) // 40)
    second = flex_attention(q, k, v, block_mask=bm)
    assert len(made) == 2
    # other shapes on the same mask: a plan of their own
    flex_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), block_mask=bm)
    assert len(made) == 3
    monkeypatch.setattr(cpu, "_batched_plan", lambda *args: None)
    torch.testing.assert_close(second, flex_attention(q, k, v, block_mask=bm), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,mask_BH,path", [
    ("none", (None, None), "_whole_backward"), ("causal", (None, None), "_whole_backward"),
    ("document", (None, None), "_batched_backward"), ("empty_rows", (None, None), "_batched_backward"),
    ("sliding_window", (None, 2), "_fused_backward"),   # block lists per head: tile by tile
])
def test_fused_backward_on_half_inputs_as_they_are(name, mask_BH, path, dtype, monkeypatch):
    # the fused backward's kernel on fp16 / bf16 inputs as they are (on every q-tile height
    # here, as on a CPU that multiplies them natively), in each of its three forms
    monkeypatch.setattr(cpu, "_NATIVE_ROWS", 1)
    monkeypatch.setattr(cpu, "_native_16bit", lambda dtype: True)
    kdts, paths = [], []
    real_kernel, real_path = cpu._FLASH_BWD, getattr(cpu, path)

    def kernel(*args, **kw):
        kdts.append(args[1].dtype)   # q
        return real_kernel(*args, **kw)

    def spying(*args):
        paths.append(path)
        return real_path(*args)
    monkeypatch.setattr(cpu, "_FLASH_BWD", kernel)
    monkeypatch.setattr(cpu, path, spying)
    with torch_threads(2):
        check_case(name, dtype=dtype, B=1, Hq=2, L=97, S=130, lse_in_loss=False, mask_BH=mask_BH)
    assert paths == [path] and kdts and set(kdts) == {dtype}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_converts_half_inputs_where_the_cpu_lacks_16_bit_products(dtype, monkeypatch):
    # tall tiles (whole rows, 256+), but no native 16-bit products: the kernel runs on float32
    # copies (its emulated bf16 / fp16 form took 5-8x the time of float32 on an AVX2 CPU)
    monkeypatch.setattr(cpu, "_native_16bit", lambda d: False)
    kdts = []
    real_kernel = cpu._FLASH_BWD

    def kernel(*args, **kw):
        kdts.append(args[1].dtype)   # q
        return real_kernel(*args, **kw)
    monkeypatch.setattr(cpu, "_FLASH_BWD", kernel)
    with torch_threads(2):
        check_case("causal", dtype=dtype, B=1, Hq=2, L=300, S=300, lse_in_loss=False, mask_BH=(None, None))
    assert kdts and set(kdts) == {torch.float32}


def test_native_16bit_reads_the_cpu_capabilities(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    cpu._native_16bit.cache_clear()
    try:
        assert not cpu._native_16bit(torch.bfloat16) and not cpu._native_16bit(torch.float16)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        cpu._native_16bit.cache_clear()
        assert cpu._native_16bit(torch.bfloat16) and not cpu._native_16bit(torch.float16)
        monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: True)
        cpu._native_16bit.cache_clear()
        assert cpu._native_16bit(torch.float16)
        monkeypatch.delattr(torch.cpu, "_is_amx_fp16_supported")   # a torch without the check: no
        cpu._native_16bit.cache_clear()
        assert not cpu._native_16bit(torch.float16)
    finally:
        cpu._native_16bit.cache_clear()


@contextlib.contextmanager
def torch_threads(n):
    """torch.set_num_threads(n) within (the path deals its work to that many threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("case", [
    dict(name="sliding_window", B=1, Hq=2, L=300, S=270, block=16),                  # strided K/V views
    dict(name="document", B=2, Hq=4, Hkv=2, L=129, S=200, block=16),                 # gathers, GQA, B > 1
    dict(name="document", B=1, Hq=2, L=200, S=200, block=32, dtype=torch.float64),
    dict(name="empty_rows", B=1, Hq=2, L=97, S=130, block=16),                       # rows with no block
])
def test_batched_backward_matches_golden(case, monkeypatch):
    # the backward by the forward's plan: dk / dv of overlapping windows summed, GQA heads summed
    calls = []
    real = cpu._batched_backward
    monkeypatch.setattr(cpu, "_batched_backward", lambda *args: calls.append(1) or real(*args))
    check_case(**case, lse_in_loss=False)
    assert calls


def test_summed_adds_each_element_in_thread_order(monkeypatch):
    # the per-thread accumulators' sum, cut into pieces the workers take: the same bits as
    # adding the threads' tensors one after another, every element covered once
    monkeypatch.setattr(cpu, "_SUM_PIECE", 7)
    g = torch.Generator().manual_seed(0)
    accs = [(torch.randn(2, 50, 3, generator=g), torch.randn(33, generator=g) * 1e4,
             [torch.randn(5, generator=g)]) for _ in range(4)]
    want = [accs[0][0].clone(), accs[0][1].clone(), [accs[0][2][0].clone()]]
    for more in accs[1:]:
        want[0] += more[0]
        want[1] += more[1]
        want[2][0] += more[2][0]
    with torch_threads(3):
        got = cpu._summed(None, accs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2][0], want[2][0])
    assert got[0] is accs[0][0]   # into the first thread's


def test_shares_cover_each_group_once_in_a_few_shares_per_thread():
    # _shares: every tile of every group in exactly one share, at most _SHARES_PER_THREAD per
    # thread and group (one a tile at the most), the costliest first, the bare rows last
    from types import SimpleNamespace
    groups = [SimpleNamespace(G=g, M=m, N=n) for g, m, n in ((3, 64, 128), (40, 64, 320), (9, 128, 256))]
    plan = SimpleNamespace(groups=groups, bare=torch.tensor([0]))
    shares = cpu._shares(plan)
    assert shares[-1] == (-1, 0, 0)
    per_thread = torch.get_num_threads() * cpu._SHARES_PER_THREAD
    for n_g, g in enumerate(groups):
        mine = sorted((a, b) for k, a, b in shares[:-1] if k == n_g)
        assert len(mine) == min(per_thread, g.G)
        assert [a for a, _ in mine] == [0] + [b for _, b in mine[:-1]] and mine[-1][1] == g.G
    cost = [(b - a) * groups[k].M * groups[k].N for k, a, b in shares[:-1]]
    assert cost == sorted(cost, reverse=True)
