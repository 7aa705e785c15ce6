"""flexattn.masks / flexattn.mods / flexattn.varlen against formulas written out independently."""
import math
import random

import pytest
import torch

from flexattn import masks, mods
from flexattn.build_mask import create_block_mask, create_mask
from flexattn.varlen import create_varlen_block_mask, cu_seqlens_from_lengths


def dense(mod, L, S, B=1, H=1):
    return create_mask(mod, B, H, L, S)


def grid(L, S):
    return torch.arange(L)[:, None], torch.arange(S)[None, :]


@pytest.mark.parametrize("L,S", [(7, 7), (5, 9), (9, 4)])
def test_causal_alignments(L, S):
    i, j = grid(L, S)
    assert torch.equal(dense(masks.causal(), L, S)[0, 0], j <= i)
    assert torch.equal(dense(masks.causal("bottom_right", q_len=L, kv_len=S), L, S)[0, 0], j <= i + S - L)


def test_bottom_right_needs_lengths_and_align_is_checked():
    with pytest.raises(ValueError, match="needs the sequence lengths.*q_len= and kv_len="):
        masks.causal("bottom_right")
    with pytest.raises(ValueError, match="align must be 'top_left' or 'bottom_right', got 'left'"):
        masks.sliding_window(2, 0, align="left")
    with pytest.raises(ValueError, match="band .* is empty"):
        masks.sliding_window(-3, 1)
    with pytest.raises(ValueError, match="pre_tokens \\+ next_tokens = -1 < 0"):
        masks.band(2, -3)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        masks.chunked(0)


@pytest.mark.parametrize("left,right", [(3, 0), (2, 2), (None, 1), (4, None), (5, -2)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_sliding_window_and_band(left, right, align):
    L, S = 11, 14
    off = 0 if align == "top_left" else S - L
    i, j = grid(L, S)
    d = j - i - off
    want = torch.ones(L, S, dtype=torch.bool)
    if left is not None:
        want &= d >= -left
    if right is not None:
        want &= d <= right
    got = dense(masks.sliding_window(left, right, align=align, q_len=L, kv_len=S), L, S)[0, 0]
    assert torch.equal(got, want)
    got = dense(masks.band(left, right, align=align, q_len=L, kv_len=S), L, S)[0, 0]
    assert torch.equal(got, want)


def test_dilated_chunked_prefix_padding_full():
    L = S = 13
    i, j = grid(L, S)
    d = j - i
    assert torch.equal(dense(masks.dilated_sliding_window(6, 0, 3), L, S)[0, 0], (d >= -6) & (d <= 0) & (d % 3 == 0))
    assert torch.equal(dense(masks.chunked(4), L, S)[0, 0], (i // 4) == (j // 4))
    assert torch.equal(dense(masks.prefix_lm(5), L, S)[0, 0], (j < 5) | (j <= i))
    pl = torch.tensor([2, 7])
    got = dense(masks.prefix_lm(pl), L, S, B=2)
    for b in range(2):
        assert torch.equal(got[b, 0], (j < int(pl[b])) | (j <= i))
    kl = torch.tensor([3, 9])
    got = dense(masks.padding(kl), L, S, B=2)
    for b in range(2):
        assert torch.equal(got[b, 0], (j < int(kl[b])).expand(L, S))
    assert dense(masks.full(), L, S).all()


def _doc_dense(q_lens, kv_lens, inner_causal, align, Q=None, K=None):
    Q = Q or sum(q_lens)
    K = K or sum(kv_lens)
    m = torch.zeros(Q, K, dtype=torch.bool)
    qs = ks = 0
    for ql, kl in zip(q_lens, kv_lens):
        for a in range(ql):
            for c in range(kl):
                qa = a + (kl - ql if align == "bottom_right" else 0)
                m[qs + a, ks + c] = (c <= qa) if inner_causal else True
        qs += ql
        ks += kl
    return m


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_document_cu_seqlens_and_doc_ids(align):
    ql, kl = [3, 0, 5, 4], [4, 2, 5, 6]
    cq, ck = cu_seqlens_from_lengths(ql), cu_seqlens_from_lengths(kl)
    got = dense(masks.document(cu_seqlens=cq, cu_seqlens_kv=ck, inner=masks.causal(), align=align), sum(ql), sum(kl))
    assert torch.equal(got[0, 0], _doc_dense(ql, kl, True, align))
    # batched doc ids [B, L], self attention
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    got = dense(masks.document(ids, inner=masks.causal()), 8, 8, B=2)
    for b in range(2):
        lens = torch.bincount(ids[b]).tolist()
        assert torch.equal(got[b, 0], _doc_dense(lens, lens, True, "top_left"))
    with pytest.raises(ValueError, match="exactly one of doc_ids= .* and cu_seqlens="):
        masks.document()
    with pytest.raises(ValueError, match="must start at 0"):
        masks.document(cu_seqlens=[1, 4])


def test_named_and_traceable():
    from flexattn.trace import trace_mask, trace_score
    assert masks.causal("bottom_right", q_len=2, kv_len=3).__name__ == "causal_bottom_right"
    assert masks.sliding_window(128, 0).__name__ == "sliding_window_128_0"
    assert "document_causal" in trace_mask(masks.document(cu_seqlens=[0, 3, 5], inner=masks.causal())).fn_name
    assert mods.softcap(30.0).__name__ == "softcap_30"
    assert "tanh" in str(trace_score(mods.softcap(30.0)))


def test_alibi_slopes_formula():
    assert torch.allclose(mods.alibi_slopes(8), torch.tensor([2.0 ** -(k + 1) for k in range(8)]))
    four = [2.0 ** (-2 * (k + 1)) for k in range(4)]          # n=4: start 2^-2
    extra = [2.0 ** -(k + 1) for k in range(8)][0::2][:2]     # from the n=8 sequence, every other
    assert torch.allclose(mods.alibi_slopes(6), torch.tensor(four + extra))
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        mods.alibi_slopes(0)


def _apply(mod, score, B, H, L, S):
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    i = torch.arange(L).view(1, 1, L, 1)
    j = torch.arange(S).view(1, 1, 1, S)
    return mod(score, b, h, i, j)


def test_score_mods_formulas():
    B, H, L, S = 2, 3, 5, 7
    score = torch.randn(B, H, L, S, dtype=torch.float64)
    sl = torch.rand(H, dtype=torch.float64)
    i = torch.arange(L).view(L, 1).double()
    j = torch.arange(S).view(1, S).double()
    want = score + sl.view(1, H, 1, 1) * (j - i)
    assert torch.allclose(_apply(mods.alibi(sl), score, B, H, L, S), want)
    want = score - sl.view(1, H, 1, 1) * (j - i - (S - L)).abs()
    assert torch.allclose(_apply(mods.alibi(sl, symmetric=True, align="bottom_right", q_len=L, kv_len=S),
                                 score, B, H, L, S), want)
    assert torch.allclose(_apply(mods.softcap(2.0), score, B, H, L, S), 2.0 * torch.tanh(score / 2.0))
    table = torch.randn(H, 7, dtype=torch.float64)
    idx = (j - i).clamp(-3, 3).long() + 3
    want = score + table[:, idx].unsqueeze(0)
    assert torch.allclose(_apply(mods.relative_bias(table), score, B, H, L, S), want)
    bias = torch.randn(1, H, L, S, dtype=torch.float64)
    assert torch.allclose(_apply(mods.dense_bias(bias), score, B, H, L, S), score + bias)
    comp = mods.compose(mods.dense_bias(bias), mods.softcap(2.0))
    assert torch.allclose(_apply(comp, score, B, H, L, S), 2.0 * torch.tanh((score + bias) / 2.0))
    with pytest.raises(ValueError, match="2 \\* max_distance \\+ 1"):
        mods.relative_bias(torch.randn(6), max_distance=3)


def test_library_mods_through_flex_attention():
    from flexattn import flex_attention
    B, H, L, S, E = 1, 2, 40, 56, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, E, generator=g, dtype=torch.float64) for n in (L, S, S))
    sl = mods.alibi_slopes(H, dtype=torch.float64)
    mm = masks.sliding_window(9, 0, align="bottom_right", q_len=L, kv_len=S)
    bm = create_block_mask(mm, None, None, L, S, BLOCK_SIZE=16)
    out = flex_attention(q, k, v, score_mod=mods.compose(mods.alibi(sl), mods.softcap(5.0)), block_mask=bm)
    i, j = grid(L, S)
    keep = (j - i - (S - L) >= -9) & (j - i - (S - L) <= 0)
    s = q @ k.transpose(-1, -2) / math.sqrt(E) + sl.view(1, H, 1, 1) * (j - i)
    s = (5.0 * torch.tanh(s / 5.0)).masked_fill(~keep, float("-inf"))
    assert torch.allclose(out, s.softmax(-1) @ v, atol=1e-10)


# ---------------------------------------------------------------------------------------
# varlen

def _dense_states(q_lens, kv_lens, used, causal, window, align, block, Q, K):
    """Per-block EMPTY/PARTIAL/FULL from an element-by-element loop (independent of flexattn)."""
    qb, kb = block
    nq, nk = -(-Q // qb), -(-K // kb)
    m = torch.zeros(nq * qb, nk * kb, dtype=torch.bool)
    qs, ks = 0, 0
    for d, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        ku = kl if used is None else used[d]
        for a in range(ql):
            qa = a + ((ku - ql) if align == "bottom_right" else 0)
            for c in range(ku):
                dd = c - qa
                ok = not (causal and dd > 0)
                if window is not None:
                    ok &= window[0] is None or dd >= -window[0]
                    ok &= window[1] is None or dd <= window[1]
                m[qs + a, ks + c] = ok
        qs, ks = qs + ql, ks + kl
    t = m.view(nq, qb, nk, kb).permute(0, 2, 1, 3).flatten(2)
    return torch.where(t.all(-1), 2, torch.where(t.any(-1), 1, 0)).to(torch.int8)


def test_varlen_block_mask_is_exact_random():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 5)
        ql = [rng.randint(0, 30) for _ in range(n)]
        kl = ql if rng.random() < 0.4 else [rng.randint(0, 30) for _ in range(n)]
        used = None
        if rng.random() < 0.3:
            used = [rng.randint(0, x) for x in kl]
        if sum(ql) == 0 or sum(kl) == 0:
            continue
        causal = rng.random() < 0.5
        window = rng.choice([None, (3, 2), (5, None), (None, 1), (0, 4)])
        align = rng.choice(["top_left", "bottom_right"])
        block = rng.choice([(4, 4), (8, 8), (8, 4), (16, 16)])
        Q, K = sum(ql) + rng.randint(0, 9), sum(kl) + rng.randint(0, 9)
        args = dict(causal=causal, window=window, align=align, Q_LEN=Q, KV_LEN=K, seqused_kv=used)
        bm = create_varlen_block_mask(cu_seqlens_from_lengths(ql), cu_seqlens_from_lengths(kl), BLOCK_SIZE=block,
                                      **args)
        want = _dense_states(ql, kl, used, causal, window, align, block, Q, K)
        assert torch.equal(bm.block_states()[0, 0], want), (ql, kl, used, args, block)


@pytest.mark.parametrize("causal,window,align", [(True, None, "top_left"), (False, None, "top_left"),
                                                 (True, (20, 0), "bottom_right"), (False, (7, 3), "top_left")])
def test_varlen_equals_create_block_mask_of_document_mask(causal, window, align):
    ql = [50, 3, 120, 77, 1, 64]
    kl = [60, 9, 120, 80, 5, 64]
    cq, ck = cu_seqlens_from_lengths(ql), cu_seqlens_from_lengths(kl)
    bm = create_varlen_block_mask(cq, ck, causal=causal, window=window, align=align, BLOCK_SIZE=32)
    inner = None
    if causal or window:
        left, right = window if window else (None, 0)
        right = 0 if causal and right is None else (min(right, 0) if causal else right)
        inner = masks.sliding_window(left, right)
    doc = masks.document(cu_seqlens=cq, cu_seqlens_kv=ck, inner=inner, align=align)
    ref = create_block_mask(doc, None, None, sum(ql), sum(kl), BLOCK_SIZE=32)
    for a in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(bm, a), getattr(ref, a)), a
    assert torch.equal(create_mask(bm.mask_mod, 1, 1, sum(ql), sum(kl)), create_mask(doc, 1, 1, sum(ql), sum(kl)))


def test_varlen_errors():
    with pytest.raises(ValueError, match="describes 2 sequences but cu_seqlens_kv 1"):
        create_varlen_block_mask([0, 3, 5], [0, 4])
    with pytest.raises(ValueError, match="cover the packed totals"):
        create_varlen_block_mask([0, 3, 5], Q_LEN=4)
    with pytest.raises(ValueError, match="non-decreasing"):
        create_varlen_block_mask([0, 3, 2])
    with pytest.raises(ValueError, match="seqused_kv must satisfy"):
        create_varlen_block_mask([0, 3, 5], [0, 4, 8], seqused_kv=[5, 1])


def test_varlen_is_fast_for_long_packed_batches():
    import time
    rng = random.Random(1)
    cu = cu_seqlens_from_lengths([rng.randint(100, 3000) for _ in range(60)])
    t = time.perf_counter()
    bm = create_varlen_block_mask(cu, causal=True)
    assert time.perf_counter() - t < 5.0
    assert bm.seq_lengths[0] == int(cu[-1])
