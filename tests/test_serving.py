"""flexattn.serving on the CPU path: paged == contiguous (bit for bit: the same chunks in
the same order, only the rows' addresses differ), the numerics rule against the float64
reference for every zoo mod, variable cache_seqlens and GQA, the cache's bookkeeping
(reserve / append / free, appends interleaved with reads), tree masks against a dense
reference, and every error raised before anything runs."""
from __future__ import annotations

import pytest
import torch

from serving_cases import check_numerics, make_case, paged_copy, zoo_mods
from test_serving_kernels import ZOO, check_cache_interleaved, check_packed_queries

import flexattn
from flexattn.masks import causal, sliding_window
from flexattn.serving import PagedKVCache, create_cache_block_mask, paged_attention, tree_ancestors, tree_mask

CPU = {"BACKEND": "cpu"}


@pytest.mark.parametrize("page_size", [16, 64, 128, 256])
def test_paged_equals_contiguous_bitwise(page_size):
    q, k, v, lens = make_case(3, 8, 2, 32, [300, 5, 129], 4, torch.float32, "cpu")
    mm = sliding_window(64)
    out_c, lse_c = paged_attention(q, k, v, lens, mask_mod=mm, return_lse=True, kernel_options=CPU)
    pk, pv, table = paged_copy(k, v, lens, page_size, seed=page_size)
    out_p, lse_p = paged_attention(q, pk, pv, lens, table, page_size=page_size, mask_mod=mm, return_lse=True,
                                   kernel_options=CPU)
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
    assert not check_numerics("sliding", out_p, lse_p, q, k, v, lens, None, mm)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_cpu(name):
    q, k, v, lens = make_case(2, 4, 2, 16, [150, 77], 3, torch.float32, "cpu")
    pk, pv, table = paged_copy(k, v, lens, 16, seed=1)
    m, m64 = zoo_mods(name, B=2, H=4, S=max(lens), device="cpu")
    out, lse = paged_attention(q, pk, pv, lens, table, page_size=16, score_mod=m.score_mod, mask_mod=m.mask_mod,
                               return_lse=True, kernel_options=CPU)
    assert not check_numerics(name, out, lse, q, k, v, lens, m64.score_mod, m64.mask_mod,
                              ref_mods=(m.score_mod, m.mask_mod))


def test_chunked_prefill_cpu_float64():
    """A 100-row chunk (q blocks of 32) against caches of 300 and 140: float64 in, float64 out."""
    q, k, v, lens = make_case(2, 4, 1, 16, [300, 140], 100, torch.float64, "cpu")
    bm = create_cache_block_mask(causal(), lens, 100, BLOCK_SIZE=32)
    out, lse = paged_attention(q, k, v, lens, mask_mod=causal(), block_mask=bm, return_lse=True, kernel_options=CPU)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert not check_numerics("prefill", out, lse, q, k, v, lens, None, causal())


def test_packed_queries_cpu():
    assert not check_packed_queries("cpu", torch.float32, ("cpu",))
    assert not check_packed_queries("cpu", torch.float64, ("cpu",), lens=(300, 140), query_lens=(100, 3))


def test_cache_interleaved_cpu():
    assert not check_cache_interleaved("cpu", torch.float32, ("cpu",))


def test_cache_bookkeeping():
    c = PagedKVCache(6, 16, 1, 16, torch.float32, max_seqs=3)
    c.reserve(0, 20)
    c.reserve(1, 16)
    assert c.capacity(0) == 32 and c.capacity(1) == 16 and c.num_free_pages == 3
    assert c.page_table[0, :2].tolist() == [0, 1] and c.page_table[1, 0].item() == 2
    c.append([1, 0], torch.ones(2, 1, 16, 16), torch.ones(2, 1, 16, 16), lengths=[16, 3])
    assert (c.seqlen(0), c.seqlen(1)) == (3, 16) and c.seqlens[:2].tolist() == [3, 16]
    c.free(0)
    assert c.num_free_pages == 5 and c.page_table[0].tolist() == [-1] * 6 and c.seqlen(0) == 0
    c.reserve(2, 16)  # reuses a freed page
    assert c.page_table[2, 0].item() in (0, 1)


def test_tree_ancestors_and_block_mask():
    parents = [-1, 0, 0, 1, -1, 4]
    anc = tree_ancestors(parents)
    expect = torch.zeros(6, 6, dtype=torch.bool)
    for i, p in enumerate(parents):
        j = i
        while j >= 0:
            expect[i, j] = True
            j = parents[j]
    assert torch.equal(anc, expect)
    lens = [200, 70]
    mm, bm = tree_mask(parents, lens, BLOCK_SIZE=16)
    dense = flexattn.create_mask(bm.mask_mod, 2, 1, 6, 200, device="cpu")
    for b, n in enumerate(lens):  # prefix + ancestors, nothing past the sequence
        want = torch.zeros(6, 200, dtype=torch.bool)
        want[:, :n - 6] = True
        want[:, n - 6:n] = expect
        assert torch.equal(dense[b, 0], want)
    # the BlockMask is exact: its blocks are the dense mask reduced per 16 x 16 block
    blocks = bm.to_dense()[..., :1, :]
    red = torch.nn.functional.pad(dense, (0, 8)).view(2, 1, 6, 13, 16).any(-1).any(-2)
    assert torch.equal(blocks.bool().reshape(2, 13), red.reshape(2, 13))


def test_tree_verification_cpu():
    parents = torch.tensor([-1, 0, 0, 2, -1])
    q, k, v, lens = make_case(2, 4, 2, 16, [90, 40], 5, torch.float32, "cpu")
    mm, bm = tree_mask(parents, lens)
    anc = tree_ancestors(parents)
    start = torch.tensor(lens) - 5

    def dense(b, h, q_idx, kv_idx):
        other = kv_idx - start[b]
        return (other < 0) | anc[(q_idx - start[b]).clamp(0, 4), other.clamp(0, 4)]
    out, lse = paged_attention(q, k, v, lens, mask_mod=mm, block_mask=bm, return_lse=True, kernel_options=CPU)
    assert not check_numerics("tree", out, lse, q, k, v, lens, None, dense)


# ---- errors: raised before anything runs ---------------------------------------------------
def _case():
    q, k, v, lens = make_case(2, 4, 2, 16, [40, 20], 1, torch.float32, "cpu")
    pk, pv, table = paged_copy(k, v, lens, 16)
    return q, k, v, lens, pk, pv, table


def test_error_page_table_past_pool():
    q, k, v, lens, pk, pv, table = _case()
    table[1, 1] = 999
    with pytest.raises(ValueError, match=r"page_table\[1, 1\] = 999 points outside the pool of 9 pages.*uses its "
                                         r"first 2 pages"):
        paged_attention(q, pk, pv, lens, table, page_size=16)
    table[1, 1] = -1
    with pytest.raises(ValueError, match=r"page_table\[1, 1\] = -1"):
        paged_attention(q, pk, pv, lens, table, page_size=16)


def test_error_sequence_too_long():
    q, k, v, lens, pk, pv, table = _case()
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 49 is longer than the cache holds for a sequence "
                                         r"\(48 positions.*reserve"):
        paged_attention(q, pk, pv, [49, 20], table, page_size=16)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 0 is shorter than its 1 queries.*append"):
        paged_attention(q, pk, pv, [40, 0], table, page_size=16)
    with pytest.raises(ValueError, match=r"cache_seqlens must have one length per sequence of q \(shape \(2,\)\)"):
        paged_attention(q, pk, pv, [40], table, page_size=16)
    with pytest.raises(ValueError, match=r"longer than the cache holds.*k_cache's length"):
        paged_attention(q, k, v, [41, 20])


def test_error_page_size():
    q, k, v, lens, pk, pv, table = _case()
    for bad in (24, 8, 0):
        with pytest.raises(ValueError, match=rf"page_size must be a positive multiple of 16.*got {bad}"):
            paged_attention(q, pk, pv, lens, table, page_size=bad)
    with pytest.raises(TypeError, match="page_size must be an int"):
        paged_attention(q, pk, pv, lens, table, page_size=16.0)
    with pytest.raises(ValueError, match="a page_table needs page_size="):
        paged_attention(q, pk, pv, lens, table)
    with pytest.raises(ValueError, match="page_size= is given without a page_table"):
        paged_attention(q, k, v, lens, page_size=16)
    with pytest.raises(ValueError, match=r"page_size must be a positive multiple of 16.*got 24"):
        PagedKVCache(4, 24, 1, 16)


def test_error_tensors_and_table_shape():
    q, k, v, lens, pk, pv, table = _case()
    with pytest.raises(ValueError, match=r"with a page_table, k_cache / v_cache are the page pool \[1, Hkv"):
        paged_attention(q, k, v, lens, table, page_size=16)
    with pytest.raises(ValueError, match=r"without a page_table, k_cache / v_cache are contiguous caches"):
        paged_attention(q, pk, pv, lens)
    with pytest.raises(ValueError, match=r"page_table must be \[B, pages per sequence\] with one row per sequence \(B=2\)"):
        paged_attention(q, pk, pv, lens, table[:1], page_size=16)
    with pytest.raises(TypeError, match="page_table must hold integers"):
        paged_attention(q, pk, pv, lens, table.float(), page_size=16)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        paged_attention(q[:, :3], pk, pv, lens, table, page_size=16)
    with pytest.raises(TypeError, match="q, k_cache and v_cache must have one dtype"):
        paged_attention(q.half(), pk, pv, lens, table, page_size=16)
    with pytest.raises(ValueError, match="q and k_cache must have one head dim"):
        paged_attention(q[..., :8], pk, pv, lens, table, page_size=16)
    with pytest.raises(ValueError, match=r"pool rows are not a whole number of pages of page_size=32"):
        paged_attention(q, pk, pv, lens, table, page_size=32)


def test_error_block_mask():
    q, k, v, lens, pk, pv, table = _case()
    bm = create_cache_block_mask(causal(), [40, 20], 2)
    with pytest.raises(ValueError, match=r"block_mask covers \(B=2, H=1, Q_LEN=2, KV_LEN=40\).*Q_LEN=1"):
        paged_attention(q, pk, pv, lens, table, page_size=16, block_mask=bm)
    with pytest.raises(TypeError, match="block_mask must be a flexattn BlockMask"):
        paged_attention(q, pk, pv, lens, table, page_size=16, block_mask="causal")
    with pytest.raises(ValueError, match="mask_mod reads the head index h; pass H="):
        create_cache_block_mask(lambda b, h, qi, kv: h > 0, [40], 1)
    with pytest.raises(ValueError, match=r"every cache_seqlens must be >= its q_len.*\[40, 20\].*\[30, 30\]"):
        create_cache_block_mask(causal(), [40, 20], 30)
    with pytest.raises(ValueError, match=r"q_len gives 3 query counts but cache_seqlens 2 sequences"):
        create_cache_block_mask(causal(), [40, 20], [1, 2, 3])


def test_error_packed_queries():
    """query_lens: q [1, Hq, sum, E]; one count per sequence, none negative, none past its
    sequence's length; a contiguous cache with one entry per sequence; a BlockMask over the
    most queries of a sequence."""
    q, k, v, lens, pk, pv, table = _case()
    qp = torch.randn(1, 4, 7, 16)
    with pytest.raises(ValueError, match=r"with query_lens, q holds every sequence's queries packed.*got \(2, 4, 1, 16\)"):
        paged_attention(q, pk, pv, lens, table, page_size=16, query_lens=[1, 1])
    with pytest.raises(ValueError, match=r"sum\(query_lens\)=6, E\], got \(1, 4, 7, 16\).*torch.cat"):
        paged_attention(qp, pk, pv, lens, table, page_size=16, query_lens=[3, 3])
    with pytest.raises(ValueError, match=r"query_lens must be B >= 1 non-negative query counts.*\[8, -1\]"):
        paged_attention(qp, pk, pv, lens, table, page_size=16, query_lens=[8, -1])
    with pytest.raises(TypeError, match="query_lens must be B integers"):
        paged_attention(qp, pk, pv, lens, table, page_size=16, query_lens=torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 5 is shorter than its 6 queries"):
        paged_attention(qp, pk, pv, [40, 5], table, page_size=16, query_lens=[1, 6])
    with pytest.raises(ValueError, match=r"page_table must be \[B, pages per sequence\].*\(B=3\)"):
        paged_attention(qp, pk, pv, lens, table, page_size=16, query_lens=[1, 2, 4])
    with pytest.raises(ValueError, match=r"cache_seqlens must have one length per sequence.*\(2,\)"):
        paged_attention(qp, k, v, [40], query_lens=[1, 6])
    with pytest.raises(ValueError, match=r"contiguous caches.*one batch entry per sequence of query_lens \(B=3\)"):
        paged_attention(qp, k, v, [40, 20, 10], query_lens=[1, 2, 4])
    bm = create_cache_block_mask(causal(), lens, 2)
    with pytest.raises(ValueError, match=r"block_mask covers \(B=2, H=1, Q_LEN=2, KV_LEN=40\).*Q_LEN=6"):
        paged_attention(qp, pk, pv, lens, table, page_size=16, block_mask=bm, query_lens=[1, 6])


def test_error_tree_parents():
    with pytest.raises(ValueError, match=r"parents\[2\] = 3: a node's parent must be an earlier node"):
        tree_ancestors([-1, 0, 3, 1])
    with pytest.raises(ValueError, match=r"parents\[1\] = -2"):
        tree_ancestors([-1, -2])
    with pytest.raises(ValueError, match="parents has 3 rows but cache_seqlens 2 sequences"):
        tree_mask(torch.full((3, 4), -1), [10, 10])


def test_error_cache_ops():
    c = PagedKVCache(4, 16, 1, 16, torch.float32, max_seqs=2, max_pages_per_seq=8)
    with pytest.raises(ValueError, match=r"sequence 0 holds 0 positions and 0 reserved; 5 more do not fit: call "
                                         r"reserve\(0, 5\) first"):
        c.append([0], torch.zeros(1, 1, 5, 16), torch.zeros(1, 1, 5, 16))
    with pytest.raises(ValueError, match=r"needs 5 more pages but 4 of 4 are free"):
        c.reserve(0, 80)
    with pytest.raises(ValueError, match=r"sequence 0 would need 9 pages, more than max_pages_per_seq=8"):
        c.reserve(0, 129)
    with pytest.raises(ValueError, match=r"a sequence is a slot index in \[0, 2\), got 2"):
        c.reserve(2, 1)
    with pytest.raises(ValueError, match=r"sequences repeat in \[1, 1\]"):
        c.append([1, 1], torch.zeros(2, 1, 1, 16), torch.zeros(2, 1, 1, 16))
    with pytest.raises(ValueError, match=r"k must be \[1, 1, T, 16\]"):
        c.append([0], torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    c.reserve(0, 4)
    with pytest.raises(ValueError, match=r"lengths must be 1 ints in \[0, 4\], got \[5\]"):
        c.append([0], torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), lengths=[5])
    assert c.seqlen(0) == 0  # nothing was written
