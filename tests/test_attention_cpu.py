"""flex_attention on the CPU path against the dense reference, under the numerics rule.

Every check compares out, lse and every gradient (dq, dk, dv, captured-buffer grads) with
the float64 golden: max|flexattn - golden| <= 2 * max|ref_in_dtype - golden| + eps
(conftest.assert_close_to_golden).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import assert_close_to_golden, make_qkv
from mods_zoo import ZOO_NAMES, make_mod
from flexattn import create_block_mask, flex_attention
from flexattn.reference import reference_attention


def check_case(name="causal", *, B=2, Hq=4, Hkv=None, L=129, S=113, E=32, Ev=None, dtype=torch.float32,
               block=(32, 16), kernel_options=None, mask_BH=(None, None), make_noncontiguous=False,
               use_block_mask=True, seed=0, lse_in_loss=True):
    """Run one zoo mod through flex_attention and the reference; assert the numerics rule
    for out, lse and all grads (of a loss through out and, if lse_in_loss, lse). Returns
    (out, lse, grads) of flexattn for extra checks."""
    Hkv = Hkv or Hq
    m = make_mod(name, B=B, H=Hq, L=L, S=S, requires_grad=True)
    m64 = make_mod(name, B=B, H=Hq, L=L, S=S, requires_grad=True, buffer_dtype=torch.float64)
    q, k, v = make_qkv(B, Hq, Hkv, L, S, E, Ev, dtype=dtype, seed=seed)
    if make_noncontiguous:  # the same values, laid out (B, S, H, D) and viewed as (B, H, S, D)
        q, k, v = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
        assert not q.is_contiguous()
    bm = None
    if m.mask_mod is not None and use_block_mask:
        bm = create_block_mask(m.mask_mod, mask_BH[0], mask_BH[1], L, S, BLOCK_SIZE=block)
    gqa = Hq != Hkv
    out, lse = flex_attention(q, k, v, m.score_mod, bm, enable_gqa=gqa, return_lse=True,
                              kernel_options=kernel_options)
    ref_out, ref_lse = reference_attention(q, k, v, m.score_mod, m.mask_mod, enable_gqa=gqa)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    gold_out, gold_lse = reference_attention(q64, k64, v64, m64.score_mod, m64.mask_mod, enable_gqa=gqa)

    assert out.dtype == dtype and out.shape == (B, Hq, L, Ev or E)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_golden(f"{name} out", out, ref_out, gold_out)
    assert_close_to_golden(f"{name} lse", lse, ref_lse, gold_lse)

    # one backward through out and lse together (lse's gradient is part of the contract)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).masked_fill(gold_lse.isinf(), 0.0)
    if not lse_in_loss:
        dlse.zero_()
    bufs, bufs64 = list(m.captured.values()), list(m64.captured.values())

    def grads(o, l, inputs):
        loss = (o * dout.to(o.dtype)).sum() + (l.masked_fill(l.isinf(), 0) * dlse.to(l.dtype)).sum()
        return torch.autograd.grad(loss, inputs)

    got = grads(out, lse, [q, k, v] + bufs)
    ref = grads(ref_out, ref_lse, [q, k, v] + bufs)
    gold = grads(gold_out, gold_lse, [q64, k64, v64] + bufs64)
    for gname, a, r, gg in zip(["dq", "dk", "dv"] + [f"grad {n}" for n in m.captured], got, ref, gold):
        assert_close_to_golden(f"{name} {gname}", a, r, gg)
    return out, lse, got


# ---- every mod of the zoo ------------------------------------------------------------

@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_fp32(name):
    check_case(name, Hkv=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["causal", "alibi_causal", "rel_bias", "multi_read", "empty_rows", "document"])
def test_zoo_dtypes(name, dtype):
    check_case(name, dtype=dtype, B=1, Hq=2, L=97, S=130)


# without a score_mod, dropout or a gradient through lse the CPU path runs torch's fused
# kernel per chunk; the same cases on the plain path (_USE_FLASH off)
MASK_ONLY = [n for n in ZOO_NAMES if make_mod(n, B=1, H=2, L=8, S=8).score_mod is None]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", MASK_ONLY)
def test_mask_only_without_lse_grad(name, fused, monkeypatch):
    import flexattn.cpu as cpu
    monkeypatch.setattr(cpu, "_USE_FLASH", fused and cpu._USE_FLASH)
    check_case(name, Hkv=2, lse_in_loss=False)


@pytest.mark.parametrize("lse_used", [False, True])
def test_lse_gradient_reaches_the_backend_only_when_used(lse_used, monkeypatch):
    # an unused lse gets no tensor of zeros as its gradient (filling it cost a busy machine
    # time); where the loss uses the lse, its gradient arrives as it is
    import flexattn.cpu as cpu
    seen = []
    backward = cpu._backward

    def spy(run, q, k, v, out, lse, dout, dlse, buffers):
        seen.append(dlse)
        return backward(run, q, k, v, out, lse, dout, dlse, buffers)

    monkeypatch.setattr(cpu, "_backward", spy)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    out, lse = flex_attention(q, k, v, return_lse=True)
    (out.sum() + (lse.sum() if lse_used else 0)).backward()
    assert len(seen) == 1
    assert (seen[0] is not None) == lse_used
    if lse_used:
        torch.testing.assert_close(seen[0], torch.ones_like(lse))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["causal", "document", "empty_rows"])
def test_mask_only_dtypes_without_lse_grad(name, dtype):
    check_case(name, dtype=dtype, B=1, Hq=2, L=97, S=130, lse_in_loss=False)


@pytest.mark.parametrize("S", [1, 17, 129])
def test_mask_only_lengths_and_tall_tiles(S):
    # block lists equal from row to row (dense, a wide window): q-blocks merged into taller tiles
    check_case("none", B=1, Hq=2, L=S, S=S, block=(16, 32), lse_in_loss=False)
    check_case("causal", B=1, Hq=3, Hkv=1, L=S, S=S + 40, block=(16, 32), lse_in_loss=False)
    check_case("sliding_window", B=2, Hq=2, L=300, S=S + 40, block=16, lse_in_loss=False, mask_BH=(2, 2))
    check_case("causal", B=1, Hq=2, L=S, S=S, E=48, Ev=24, lse_in_loss=False)   # Ev != E: the plain path


def test_merged_tiles(monkeypatch):
    # partial and full blocks that are consecutive run as one merged tile (the mask evaluated on
    # the partial blocks' columns only): a ragged last block, masks read per head, GQA, the
    # plain dtypes, and a window wider than _MERGED_BLOCKS (split chunks again) all match
    import flexattn.cpu as cpu
    monkeypatch.setattr(cpu, "_whole_rows", lambda *args: None)   # causal: not as whole rows here
    merged = []
    real = cpu._allowed

    def counting(plan, idx, q_idx, tile):
        merged.append(tile.part_cols is not None)
        return real(plan, idx, q_idx, tile)

    monkeypatch.setattr(cpu, "_allowed", counting)
    check_case("sliding_window", B=1, Hq=2, L=300, S=270, block=16, lse_in_loss=False)
    check_case("document", B=2, Hq=4, Hkv=2, L=129, S=200, block=16, lse_in_loss=False)
    check_case("causal", B=1, Hq=2, L=97, S=130, block=16, dtype=torch.float64, lse_in_loss=False)
    check_case("sliding_window", B=2, Hq=2, L=300, S=290, block=16, lse_in_loss=False, mask_BH=(2, 2))
    assert any(merged) and not all(merged)
    merged.clear()
    monkeypatch.setattr(cpu, "_MERGED_BLOCKS", 2)
    check_case("causal", B=1, Hq=2, L=130, S=130, block=16, lse_in_loss=False)
    assert any(merged) and not all(merged)


# ---- shapes that break kernels ----------------------------------------------------------

@pytest.mark.parametrize("S", [1, 17, 113, 127, 129])
def test_lengths(S):
    check_case("causal", B=1, Hq=2, L=S, S=S, block=(64, 32))
    check_case("rel_bias", B=1, Hq=2, L=S, S=S, block=128)


def test_length_1000():
    check_case("sliding_window", B=1, Hq=1, L=1000, S=1000, E=16, block=128)


@pytest.mark.parametrize("L,S", [(17, 129), (129, 17), (1, 200), (200, 1)])
def test_q_len_differs_from_kv_len(L, S):
    check_case("prefix_lm", B=1, Hq=2, L=L, S=S, block=(16, 32))


@pytest.mark.parametrize("E", [16, 32, 64, 80, 128])
def test_head_dims(E):
    check_case("alibi_causal", B=1, Hq=2, L=65, S=65, E=E, block=64)


def test_value_dim_differs():
    check_case("softcap_document", B=2, Hq=2, L=70, S=90, E=48, Ev=24)


@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (6, 2), (8, 4)])
def test_gqa(Hq, Hkv):
    check_case("per_head_scale", B=1, Hq=Hq, Hkv=Hkv, L=40, S=50)


def test_noncontiguous_inputs():
    check_case("rel_bias", make_noncontiguous=True, L=50, S=60)


def test_block_mask_per_batch_and_head():
    # a mask that reads b and h: the BlockMask has B and H > 1 (no broadcasting)
    def bh_mask(b, h, q_idx, kv_idx):
        return (q_idx + b + h) % 3 != 0

    B, H, L, S = 2, 3, 50, 70
    bm = create_block_mask(bh_mask, B, H, L, S, BLOCK_SIZE=16)
    q, k, v = make_qkv(B, H, H, L, S, 16)
    out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, mask_mod=bh_mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_tile_smaller_than_block():
    # the path may tile each block more finely; results must not change beyond rounding
    base = check_case("document", block=(64, 32), L=100, S=120)
    tiled = check_case("document", block=(64, 32), L=100, S=120, kernel_options={"BLOCK_M": 16, "BLOCK_N": 8})
    torch.testing.assert_close(base[0], tiled[0], atol=1e-5, rtol=1e-5)


def test_no_block_mask_lengths_not_multiple_of_block():
    check_case("softcap", B=1, Hq=2, L=130, S=260, E=16)
    check_case("none", B=1, Hq=2, L=5, S=3, E=16)


# ---- fully masked rows -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows(dtype):
    out, lse, (dq, dk, dv) = check_case("empty_rows", B=1, Hq=2, L=64, S=64, dtype=dtype)
    rows = torch.arange(64) % 5 == 2
    assert (out[:, :, rows] == 0).all()
    assert (lse[:, :, rows] == float("-inf")).all() and torch.isfinite(lse[:, :, ~rows]).all()
    assert (dq[:, :, rows] == 0).all()
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()


def test_everything_masked():
    def nothing(b, h, q_idx, kv_idx):
        return q_idx < 0

    q, k, v = make_qkv(1, 2, 2, 20, 30, 16)
    bm = create_block_mask(nothing, None, None, 20, 30, BLOCK_SIZE=16)
    out, lse = flex_attention(q, k, v, lambda s, b, h, qi, ki: s * 2, bm, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()
    dq, dk, dv = torch.autograd.grad(out.sum() + lse.masked_fill(lse.isinf(), 0).sum(), (q, k, v))
    assert all((g == 0).all() for g in (dq, dk, dv))


# ---- API behaviour ------------------------------------------------------------------------

def test_default_scale_and_return_values():
    q, k, v = make_qkv(1, 2, 2, 10, 12, 16, requires_grad=False)
    out = flex_attention(q, k, v)
    assert isinstance(out, torch.Tensor)
    ref, _ = reference_attention(q, k, v, scale=16 ** -0.5)
    torch.testing.assert_close(out, ref)
    out2 = flex_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out2, reference_attention(q, k, v, scale=0.3)[0])


def test_buffer_without_requires_grad():
    m = make_mod("rel_bias", B=1, H=2, L=20, S=20, requires_grad=False)
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16)
    out = flex_attention(q, k, v, m.score_mod)
    out.sum().backward()
    assert q.grad is not None and m.captured["bias_table"].grad is None


def test_matches_torch_flex_attention_eager():
    from torch.nn.attention.flex_attention import create_block_mask as torch_cbm
    from torch.nn.attention.flex_attention import flex_attention as torch_flex
    for name, (L, S) in [("alibi_causal", (100, 80)), ("document", (64, 64))]:
        m = make_mod(name, B=2, H=2, L=L, S=S)
        q, k, v = make_qkv(2, 2, 2, L, S, 16, requires_grad=False)
        ours = flex_attention(q, k, v, m.score_mod, create_block_mask(m.mask_mod, None, None, L, S),
                              return_lse=True)
        with warnings.catch_warnings():  # torch warns that eager flex_attention is slow
            warnings.simplefilter("ignore")
            theirs = torch_flex(q, k, v, m.score_mod, torch_cbm(m.mask_mod, None, None, L, S, device="cpu"),
                                return_lse=True)
        torch.testing.assert_close(ours[0], theirs[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], theirs[1], atol=2e-5, rtol=1e-5)



def test_visits_only_listed_blocks(monkeypatch):
    # causal, 4x4 blocks: 6 full (below the diagonal) + 4 partial (on it); 6 empty never visited
    # (a merged tile holds both kinds: the mask is evaluated on its part_cols only)
    import flexattn.cpu as cpu
    monkeypatch.setattr(cpu, "_whole_rows", lambda *args: None)   # causal: not as whole rows here
    visited = []
    real = cpu._allowed

    def counting(plan, idx, q_idx, tile):
        pos = tile.pos.flatten() if tile.valid is None else tile.pos.expand(tile.valid[..., 0, :].shape)[tile.valid[..., 0, :]]
        part = None if tile.part_cols is None else set((tile.pos.flatten()[tile.part_cols] // 16).tolist())
        for j in sorted(set((pos // 16).tolist())):
            visited.append((int(q_idx.min()) // 16, j, tile.partial and (part is None or j in part)))
        return real(plan, idx, q_idx, tile)

    monkeypatch.setattr(cpu, "_allowed", counting)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, requires_grad=False)
    flex_attention(q, k, v, block_mask=create_block_mask(make_mod("causal", B=1, H=2, L=64, S=64).mask_mod,
                                                         None, None, 64, 64, BLOCK_SIZE=16))
    assert sorted(visited) == sorted([(i, j, i == j) for i in range(4) for j in range(i + 1)])


@pytest.mark.parametrize("per_head", [False, True])
def test_chunks_per_call_do_not_grow_with_blocks(monkeypatch, per_head):
    # a q-tile meets its partial blocks in one chunk and its full blocks in another (while
    # they fit _CHUNK_ELEMS): the torch operations per call grow with q-tiles, not blocks
    import flexattn.cpu as cpu
    calls = []
    real = cpu._allowed

    def counting(plan, idx, q_idx, tile):
        calls.append(tile.pos.shape[-1])
        return real(plan, idx, q_idx, tile)

    monkeypatch.setattr(cpu, "_allowed", counting)
    H = 2
    for L in (256, 1024):
        calls.clear()
        q, k, v = make_qkv(1, H, H, L, L, 16)
        mask = (lambda b, h, qi, ki: qi >= ki + h) if per_head else (lambda b, h, qi, ki: qi >= ki)
        bm = create_block_mask(mask, None, H if per_head else None, L, L, BLOCK_SIZE=16)
        out = flex_attention(q, k, v, block_mask=bm)
        assert len(calls) <= 2 * (L // 16), (L, len(calls))
        n_fwd = len(calls)
        out.sum().backward()
        assert len(calls) - n_fwd <= 2 * (L // 16), (L, len(calls))


def test_block_mask_from_kv_blocks_without_full_blocks():
    # every non-empty block listed as partial (no full_kv_*): the mask is applied everywhere
    from flexattn.block_mask import BlockMask
    mask = make_mod("causal", B=1, H=1, L=40, S=40).mask_mod
    nb = 3  # ceil(40 / 16)
    kv_num = torch.arange(1, nb + 1, dtype=torch.int32).view(1, 1, nb)
    kv_idx = torch.arange(nb, dtype=torch.int32).expand(1, 1, nb, nb).contiguous()
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=16, mask_mod=mask, seq_lengths=(40, 40))
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, requires_grad=False)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm),
                               reference_attention(q, k, v, mask_mod=mask)[0])


def test_full_blocks_skip_the_mask_mod():
    # a block listed as full skips mask_mod even where mask_mod is false in it (torch's
    # semantics), also in a row whose blocks are all full
    from flexattn.block_mask import BlockMask
    mask = make_mod("causal", B=1, H=1, L=48, S=48).mask_mod
    i32 = dict(dtype=torch.int32)
    kv_num, kv_idx = torch.tensor([[[1, 0, 1]]], **i32), torch.tensor([[[[0, 0, 0], [0, 0, 0], [2, 0, 0]]]], **i32)
    f_num, f_idx = torch.tensor([[[1, 3, 1]]], **i32), torch.tensor([[[[1, 0, 0], [0, 1, 2], [0, 0, 0]]]], **i32)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, f_num, f_idx, BLOCK_SIZE=16, mask_mod=mask)
    keep = torch.zeros(48, 48, dtype=torch.bool)
    keep[:16, 16:32] = keep[16:32] = keep[32:, :16] = True
    keep[:16, :16] = keep[32:, 32:] = torch.ones(16, 16).tril().bool()
    q, k, v = make_qkv(1, 2, 2, 48, 48, 16, requires_grad=False)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm),
                               reference_attention(q, k, v, mask_mod=lambda b, h, qi, ki: keep[qi, ki])[0])


def test_gradients_reproducible_with_threads():
    # the backward deals q-tiles to threads in a fixed order: bitwise-identical gradients
    m = make_mod("alibi_causal", B=1, H=2, L=300, S=300, requires_grad=True)
    bm = create_block_mask(m.mask_mod, None, None, 300, 300, BLOCK_SIZE=32)
    q, k, v = make_qkv(1, 2, 2, 300, 300, 16)
    runs = []
    for _ in range(3):
        out = flex_attention(q, k, v, m.score_mod, bm)
        runs.append(torch.autograd.grad(out.square().sum(), [q, k, v] + list(m.captured.values())))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_thread_count_unchanged_by_calls(monkeypatch):
    # the q-tiles run on worker threads made single-threaded with thread-local settings: the
    # caller's torch.get_num_threads(), and the count a newly started thread gets, stay the
    # user's - during a call, after it, and after a call that raises
    import threading
    import flexattn.cpu as cpu

    def new_thread_count():
        got = []
        t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
        t.start()
        t.join()
        return got[0]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        real = cpu._allowed

        def watching(*args):
            seen.append(new_thread_count())
            return real(*args)

        monkeypatch.setattr(cpu, "_allowed", watching)
        m = make_mod("alibi_causal", B=1, H=2, L=200, S=200, requires_grad=True)
        bm = create_block_mask(m.mask_mod, None, None, 200, 200, BLOCK_SIZE=32)
        q, k, v = make_qkv(1, 2, 2, 200, 200, 16)
        for score_mod in (None, m.score_mod):
            flex_attention(q, k, v, score_mod, bm).sum().backward()
            assert torch.get_num_threads() == 2 and new_thread_count() == 2
        assert seen and set(seen) == {2}

        table = torch.zeros(10)   # read at q_idx - kv_idx: out of range at kept positions

        def bad(score, b, h, q_idx, kv_idx):
            return score + table[q_idx - kv_idx]
        with pytest.raises(IndexError):
            flex_attention(q, k, v, bad, bm)
        assert torch.get_num_threads() == 2 and new_thread_count() == 2
    finally:
        torch.set_num_threads(before)


def _forked_child(q, bms, wants, result):
    result.put(all(bool(torch.equal(flex_attention(q, q, q, block_mask=bm), want)) for bm, want in zip(bms, wants)))


def test_worker_threads_kept_and_fork_safe():
    # the worker threads outlive a call; a forked child (which has none of them) makes its
    # own; a causal call ran on the caller's OpenMP team (as whole rows), which a forked child
    # has only as a broken copy: there it runs on the workers
    import multiprocessing as mp
    import sys
    if sys.platform != "linux":
        pytest.skip("fork")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = make_qkv(1, 2, 2, 256, 256, 16, requires_grad=False)[0]
        bms = [create_block_mask(make_mod(name, B=1, H=2, L=256, S=256).mask_mod, None, None, 256, 256,
                                 BLOCK_SIZE=32) for name in ("sliding_window", "causal")]
        wants = [flex_attention(q, q, q, block_mask=bm) for bm in bms]
        import threading
        import flexattn.cpu as cpu
        if cpu._ONE_THREAD_HERE is not None:
            assert any(t.name.startswith("flexattn-cpu") for t in threading.enumerate())
        ctx = mp.get_context("fork")
        result = ctx.Queue()
        child = ctx.Process(target=_forked_child, args=(q, bms, wants, result))
        child.start()
        assert result.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_that_require_grad_on_threads(dtype):
    # the worker threads convert fp16 / bf16 inputs in the caller's grad mode (off in the
    # forward of the autograd Function); in their own (on) two threads' in-place copies from
    # inputs that require grad raced in autograd and sometimes raised
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = make_mod("sliding_window", B=1, H=8, L=1024, S=1024)
        bm = create_block_mask(m.mask_mod, None, None, 1024, 1024)
        q, k, v = make_qkv(1, 8, 8, 1024, 1024, 64, dtype=dtype)
        for _ in range(10):
            out = flex_attention(q, k, v, block_mask=bm)
        assert out.requires_grad and out.grad_fn is not None
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads = torch.autograd.grad(out, [q, k, v], go)
        qr, kr, vr = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ref, _ = reference_attention(qr, kr, vr, mask_mod=m.mask_mod)
        ref_grads = torch.autograd.grad(ref, [qr, kr, vr], go)
        q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
        gold, _ = reference_attention(q64, k64, v64, mask_mod=m.mask_mod)
        gold_grads = torch.autograd.grad(gold, [q64, k64, v64], go.double())
        assert_close_to_golden("out", out, ref, gold)
        for name, g, r, g64 in zip(("dq", "dk", "dv"), grads, ref_grads, gold_grads):
            assert_close_to_golden(name, g, r, g64)
    finally:
        torch.set_num_threads(before)
