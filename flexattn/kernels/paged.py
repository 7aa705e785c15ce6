"""The serving launches: attention of a batch of cached sequences (per-sequence kv lengths,
K/V contiguous or in pages) through the split-KV kernel of `decode.py` - decode (q_len 1),
speculative verification (a few queries) and chunked prefill (q tiles on grid axis 2).

`serving_config` picks the cut: GQA rows packed into the q tile when the heads share the
block lists, a q tile whose positions lie in one BlockMask q block, a kv tile that divides
the BlockMask kv block and is divided by the page (or divides it), and enough kv splits
that the longest sequence's tiles spread over the GPU.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from . import launcher
from .config import device_key, fit_tile, pad_dim
from .decode import KVLayout, SplitConfig, split_kv_forward
from .launcher import cdiv

MAX_SPLITS = 64
DECODE_SLICE = 2048  # kv positions, the most one decode program walks (see serving_config)
DECODE_ROWS = 64  # q rows (GQA group included) up to which loads, not dots, bound a sequence's time


def _kv_tile(want: int, kv_block: int, page_size: int) -> int:
    """The kv tile: <= want, divides the BlockMask kv block, and divides a page or is a whole
    number of pages (page sizes are multiples of 16: 16 always fits)."""
    tile = fit_tile(want, kv_block, kv_block)
    while tile > 16 and page_size and page_size % tile and tile % page_size:
        tile //= 2
    return tile


def _q_tile(rows: int, L: int, G: int, pack: bool, q_block: int, dense: bool, most: int) -> int:
    """BLOCK_M: a power of two >= 16, at most `most` unless one tile holds every row; its
    query positions must lie in one BlockMask q block (no constraint without block lists).
    0: no tile fits (the caller then stops packing)."""
    bm = min(pad_dim(rows), max(16, most))
    while bm >= 16:
        one_tile = bm >= rows
        per = bm // G if pack else bm
        if one_tile and (dense or L <= q_block):
            return bm
        if per >= 1 and (not pack or bm % G == 0) and (dense or q_block % per == 0):
            return bm
        bm //= 2
    return 0


def serving_config(plan, q, v, layout: KVLayout, lengths: list, q_len: int) -> SplitConfig:
    """How serving_forward cuts the work (kernel_options decode_BLOCK_N / decode_SPLITS /
    decode_num_warps / decode_num_stages override the choices); q_len: the most queries of
    a sequence."""
    Hq, L = q.shape[1], q_len
    Hkv = v.shape[1]
    G = Hq // Hkv
    o = plan.opts
    blk = plan.blocks
    cuda = q.device.type == "cuda"
    q_block, kv_block = blk.block
    most = 128 if cuda else 64
    prefill = G * L > DECODE_ROWS  # q tiles of many rows: the dots, not the loads, bound the time
    # H200, bf16, D=128 (a sweep of tile, warps, stages): decode 128-wide kv tiles (GB/s of pages
    # of 16 / 128 vs 64-wide: +3-5%); prefill 64-wide tiles with 4 warps, 2 stages (371 TFLOP/s
    # at a 2K chunk on a 32K cache vs 248-361 for the other seven)
    block_n = _kv_tile(o.get("decode_BLOCK_N", (64 if prefill else 128) if cuda else 32), kv_block,
                       layout.page_size)
    pack = G > 1 and (layout.dense or blk.kv_num.stride(1) == 0)
    block_m = _q_tile(G * L if pack else L, L, G, pack, q_block, layout.dense, most) if pack else 0
    if not block_m:
        pack = False
        block_m = _q_tile(L, L, 1, False, q_block, layout.dense, most)
    rows = G * L if pack else L
    q_tiles = cdiv(rows, block_m)
    # kv splits: the work of all sequences spread over ~2 programs per SM, the longest
    # sequence's tiles cut into slices of that size; a decode's slices hold at most
    # DECODE_SLICE positions, so that the longest sequences of a batch do not make a tail
    # (H200, B=8 / 64 with lengths 1K-32K: 2 / 8 splits of 32K -> 16 gave +4-11% GB/s,
    # pages of 16 +8-11%)
    heads = Hkv if pack else Hq
    tiles = [cdiv(n, block_n) for n in lengths]
    work = sum(tiles) * heads * q_tiles
    per_program = max(4, cdiv(work, 2 * launcher.sm_count(q.device)))
    if not prefill:
        per_program = min(per_program, max(4, DECODE_SLICE // block_n))
    splits = o.get("decode_SPLITS", max(1, min(MAX_SPLITS, cdiv(max(tiles), per_program))))
    interp = device_key(q.device) == "interp"
    return SplitConfig(pack, block_m, block_n, q_tiles, splits, o.get("decode_num_warps", 4),
                       o.get("decode_num_stages", 1 if interp else 2 if prefill else 3))


def serving_forward(plan, q, k, v, layout: KVLayout, lengths: list, q_len: int, query_lens: list | None = None):
    """(out, lse) of q's rows at the last positions of each sequence (see KVLayout); q_len:
    the most queries of a sequence (q's rows unless they are packed); query_lens: each
    sequence's number of queries (host ints) when they are packed (layout.q_lens)."""
    if query_lens is not None:
        G = q.shape[1] // v.shape[1]
        dec_ids = [b for b, n in enumerate(query_lens) if 0 < n * G <= DECODE_ROWS]
        chunk_ids = [b for b, n in enumerate(query_lens) if n * G > DECODE_ROWS]
        if dec_ids and chunk_ids:
            return _decodes_and_chunks(plan, q, k, v, layout, lengths, query_lens, dec_ids, chunk_ids)
    return split_kv_forward(plan, q, k, v, serving_config(plan, q, v, layout, lengths, q_len), layout)


def _decodes_and_chunks(plan, q, k, v, layout: KVLayout, lengths: list, query_lens: list, dec_ids: list,
                        chunk_ids: list):
    """Packed queries where decodes (at most DECODE_ROWS rows, the GQA group's included) share
    the call with longer chunks: one launch for each kind over its own sequences (seq_ids),
    with its own tiles and kv splits (in one launch the decodes ran in the chunks' 128-row
    q tiles without splits, and a continuous-batching step of 62 decodes and two 1K chunks
    took 1.5x two calls, one per kind, on an H200; launched so, 1.17x). The chunks' launch
    writes every row of the packed out / lse (the decodes' rows without partials: overwritten
    next); the decodes' launch packs its rows apart (p_starts) and they are copied to their
    places.
    dec_ids / chunk_ids: the sequences of each kind, in order."""
    dev = q.device
    decodes = set(dec_ids)
    dec_lens = [n if b in decodes else 0 for b, n in enumerate(query_lens)]
    q_starts = list(itertools.accumulate(query_lens, initial=0))
    p_starts = list(itertools.accumulate(dec_lens, initial=0))[:-1]
    dec_rows = [r for b in dec_ids for r in range(q_starts[b], q_starts[b + 1])]
    ints = torch.tensor(chunk_ids + dec_ids + p_starts, dtype=torch.int32).to(dev, non_blocking=True)
    nc, nd = len(chunk_ids), len(dec_ids)
    chunks = replace(layout, seq_ids=ints[:nc])
    cfg = serving_config(plan, q, v, chunks, [lengths[b] for b in chunk_ids], max(query_lens[b] for b in chunk_ids))
    res = split_kv_forward(plan, q, k, v, cfg, chunks)
    dec = replace(layout, seq_ids=ints[nc:nc + nd], p_starts=ints[nc + nd:], p_rows=len(dec_rows))
    cfg = serving_config(plan, q, v, dec, [lengths[b] for b in dec_ids], max(dec_lens))
    res_dec = split_kv_forward(plan, q, k, v, cfg, dec)
    rows = torch.tensor(dec_rows, dtype=torch.int64).to(dev, non_blocking=True)
    for whole, part in zip(res, res_dec):  # out, lse (and max_scores): rows along dim 2
        whole.index_copy_(2, rows, part)
    return res
