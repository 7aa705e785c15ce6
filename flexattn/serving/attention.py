"""paged_attention: attention of a batch of cached sequences - the entry point of the
serving path. Every check happens here, before anything launches; then the CPU path
(`serving.cpu`) or the Triton kernels (`kernels.paged`) run, both reading K/V through the
same page table.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..checks import check_options_arg, check_scale
from ..options import check_kernel_options, choose_backend
from ..trace import check_buffers_device, trace_mask, trace_score
from .checks import (check_block_mask_shape, check_lengths, check_page_size, check_page_table,
                     check_page_table_shape, check_query_lens, check_tensors)
from .cpu import serving_attention_cpu
from .masks import create_cache_block_mask


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens,
                    page_table: Optional[torch.Tensor] = None, *, page_size: Optional[int] = None,
                    score_mod: Optional[Callable] = None, mask_mod: Optional[Callable] = None,
                    block_mask=None, scale: Optional[float] = None, return_lse: bool = False,
                    kernel_options: Optional[dict] = None, query_lens=None):
    """Attention of new queries over a KV cache, for a batch of sequences of different lengths
    (forward only).

    q [B, Hq, L, E]: the queries of sequence b are its last L positions, whose K/V are in the
    cache already (append first), so query row i sits at global position
    ``cache_seqlens[b] - L + i``. L = 1 is decode, a few rows verify a speculative draft, a
    chunk of a prompt is chunked prefill. cache_seqlens: B ints, the kv length of each
    sequence: a list (copied to the device without waiting for it) or an integer tensor (read
    back to the host, which waits for the device; PagedKVCache.attention keeps both copies).

    query_lens (continuous batching: decodes, drafts and prefill chunks in one call): B ints,
    the number of new queries of each sequence (0 allowed). q is then [1, Hq, sum(query_lens),
    E] with the sequences' queries packed along its rows in order (sequence b's are rows
    ``sum(query_lens[:b])`` on), each sequence's at its last query_lens[b] positions; out and
    lse are packed the same way. A block_mask for such a call comes from
    ``create_cache_block_mask(mask_mod, cache_seqlens, query_lens)``.

    Paged cache (page_table given): k_cache / v_cache are the pool [1, Hkv, num_pages *
    page_size, E / Ev] (PagedKVCache.k / .v) and page_table [B, pages per sequence] lists
    each sequence's pages in order: position n of sequence b is pool row
    ``page_table[b, n // page_size] * page_size + n % page_size``. page_size: a multiple of 16.
    Contiguous cache (no page_table): k_cache / v_cache are [B, Hkv, S, E / Ev], the same
    kernel with positions as rows.

    score_mod(score, b, h, q_idx, kv_idx) and mask_mod(b, h, q_idx, kv_idx) see global
    positions. block_mask: a BlockMask over (q rows, logical kv positions) from
    create_cache_block_mask / tree_mask; built from mask_mod when not given (with neither,
    every position below the sequence's length is attended, and no BlockMask is needed).
    Hq a multiple of Hkv (GQA). Returns out [B, Hq, L, Ev] in q.dtype, and with return_lse
    also lse [B, Hq, L] (natural log). kernel_options: BACKEND ("auto", "cpu", "triton") and
    the decode_* keys (decode_BLOCK_N, decode_SPLITS, decode_num_warps, decode_num_stages).
    """
    out, lse = _paged_attention(q, k_cache, v_cache, cache_seqlens, page_table, page_size, score_mod, mask_mod,
                                block_mask, scale, kernel_options, trusted_table=False, query_lens=query_lens)
    return (out, lse) if return_lse else out


def _paged_attention(q, k_cache, v_cache, cache_seqlens, page_table, page_size, score_mod, mask_mod, block_mask,
                     scale, kernel_options, trusted_table: bool, query_lens=None):
    """paged_attention; trusted_table: the page table comes from a PagedKVCache (whose
    reserve / append keep it valid), so its entries are not read back to be checked."""
    paged = page_table is not None
    check_tensors(q, k_cache, v_cache, paged, packed=query_lens is not None)
    queries = None if query_lens is None else check_query_lens(query_lens, q, k_cache, paged)
    B = q.shape[0] if queries is None else len(queries.host_lens)
    _, Hq, L, E = q.shape
    q_lens = queries.host_lens if queries is not None else [L] * B
    L = queries.longest if queries is not None else L  # the most queries of a sequence
    if paged:
        if page_size is None:
            raise ValueError("paged_attention: a page_table needs page_size= (the pool rows per page)")
        page_size = check_page_size(page_size)
        if k_cache.shape[2] % page_size:
            raise ValueError(f"k_cache's {k_cache.shape[2]} pool rows are not a whole number of pages of "
                             f"page_size={page_size}")
        check_page_table_shape(page_table, B, k_cache.device)
        capacity = page_table.shape[1] * page_size
    elif page_size is not None:
        raise ValueError("paged_attention: page_size= is given without a page_table; pass the page_table too "
                         "(or neither, for a contiguous cache)")
    else:
        capacity = k_cache.shape[2]
    lengths = check_lengths(cache_seqlens, B, q_lens, capacity, q.device)
    if paged:
        num_pages = k_cache.shape[2] // page_size
        if trusted_table:
            page_table = page_table if page_table.dtype == torch.int32 else page_table.to(torch.int32)
        else:
            page_table = check_page_table(page_table, B, page_size, num_pages, lengths)
    scale = check_scale(scale, E)
    options = dict(check_options_arg(kernel_options))
    backend = choose_backend(options.pop("BACKEND", "auto"), q.device, q.dtype)
    score_graph = trace_score(score_mod, "score_mod") if score_mod is not None else None
    mask_graph = trace_mask(mask_mod, "mask_mod") if mask_mod is not None else None
    for graph, name in ((score_graph, "score_mod"), (mask_graph, "mask_mod")):
        if graph is not None:
            check_buffers_device(graph, q.device, name)
    max_len = max(lengths.host)
    if block_mask is None and mask_graph is not None:
        block_mask = create_cache_block_mask(mask_mod, lengths.device, L if queries is None else queries.lens,
                                             Hq if mask_graph.uses("h") else None, device=q.device)
    if block_mask is not None:
        check_block_mask_shape(block_mask, B, Hq, max(L, 1), max_len)
    if backend == "cpu":
        return serving_attention_cpu(q, k_cache, v_cache, lengths, page_table, page_size or 0, score_graph,
                                     mask_graph, block_mask, scale, queries)
    return _kernel_forward(q, k_cache, v_cache, lengths, page_table, page_size or 0, score_graph, mask_graph,
                           block_mask, scale, check_kernel_options(options), max_len, queries, L)


def _kernel_forward(q, k, v, lengths, page_table, page_size, score_graph, mask_graph, block_mask, scale, opts,
                    max_len, queries, q_len: int):
    from .. import codegen
    from ..kernels.blocks import blocks_of
    from ..kernels.decode import KVLayout
    from ..kernels.paged import serving_forward
    from ..kernels.plan import build_plan
    if q.dtype == torch.float64:
        raise TypeError("the Triton kernels take float16, bfloat16 or float32; float64 runs on the CPU path "
                        "(kernel_options={'BACKEND': 'cpu'} with CPU tensors)")
    B, Hq, L = len(lengths.host), q.shape[1], max(q_len, 1)
    score_graph, mask_graph = codegen.kernel_graph(score_graph), codegen.kernel_graph(mask_graph)
    # without a BlockMask the kernel reads no block lists: a small all-attending one stands in
    blocks = blocks_of(block_mask, B, Hq, L, max_len if block_mask is not None else 1, q.device)
    plan = build_plan(q, v, score_graph, mask_graph, blocks, scale, opts, 0.0, None, ())
    # the mods' index width follows the positions they see, not the pool's rows (nor q's)
    plan.small_indices = max(B, Hq, q.shape[2], max_len) < codegen.SMALL_INDEX_LIMIT
    layout = KVLayout(lengths.device, page_table, page_size, dense=block_mask is None,
                      q_starts=None if queries is None else queries.starts,
                      q_lens=None if queries is None else queries.lens)
    return serving_forward(plan, q, k, v, layout, lengths.host, L, None if queries is None else queries.host_lens)
