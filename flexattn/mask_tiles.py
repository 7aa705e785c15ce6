"""The tile-table form of a BlockMask: its mask_mod evaluated once, exactly, on every
partial block, and read back by a lookup whose structure does not depend on the mask.

    slots [Bs, Hs, nQ, nKV] int32           slots[b, h, i, j] = s for partial block (i, j)
    tiles [T, Q_BLOCK, KV_BLOCK] int8       tiles[s] = the mask on partial block s (tile 0 and
                                            the padding up to T = P + 1 rounded up to a
                                            multiple of 16: all false)

    tile_lookup(b, h, q_idx, kv_idx) =
        tiles[slots[b, h, q_idx // Q_BLOCK, kv_idx // KV_BLOCK], q_idx % Q_BLOCK, kv_idx % KV_BLOCK] != 0

Where every row of every partial block keeps one run of consecutive columns (or none) -
causal, sliding-window, prefix-LM and document masks - the form keeps the runs instead of
the tiles (the interval form):

    lows, highs [T, Q_BLOCK] int32          row r of tile s keeps columns [lows, highs) (both 0:
                                            none)

    interval_lookup(b, h, q_idx, kv_idx) =
        lows[s, q_idx % Q_BLOCK] <= kv_idx % KV_BLOCK < highs[s, q_idx % Q_BLOCK],
        s = slots[b, h, q_idx // Q_BLOCK, kv_idx // KV_BLOCK]

which a kernel reads as two numbers per row and two compares per score, against a tile's
bytes per score (16 KiB a partial kv tile at 128 x 128).

(b, h read as literal 0 where the mask does not depend on them.) On every partial block the
lookup equals mask_mod, and kernels evaluate a mask only on partial blocks, so attention
with `tile_table_form(bm)` masks exactly what `bm` masks (bit for bit the same result on
the CPU path and in the interpreter; compiled GPU kernels may round differently). The lookup's IR - and so
its kernels - depends only on the form, the block sizes and which of b, h it reads: one
compiled kernel per form serves every mask. `flexattn.kernels.tiered` runs a new mask
structure's first calls through it while the mask's own kernels compile.

Memory: Q_BLOCK * KV_BLOCK bytes per partial block (16 KiB at 128 x 128; the interval form
keeps 8 * Q_BLOCK bytes) plus 4 bytes per block; `tile_table_form` returns None past
`max_bytes` (counted for the tiles, which are built first).
"""
from __future__ import annotations

from typing import Optional

import torch

from .block_mask import BlockMask
from .block_states import evaluate_block_tiles
from .trace import trace_mask

DEFAULT_MAX_BYTES = 256 * 2 ** 20
_MAX_LISTED = 1 << 28  # blocks over all rows enumerated to find the partial ones
_TILE_BATCH_ELEMS = 1 << 24  # positions evaluated per batch of partial blocks


def _tile_lookup_mod(slots: torch.Tensor, tiles: torch.Tensor, qb: int, kvb: int, uses_b: bool, uses_h: bool):
    def tile_lookup(b, h, q_idx, kv_idx):
        # b, h as literal 0 where the mask does not read them (a Python branch on a closure
        # bool, not on a traced value)
        slot = slots[b if uses_b else 0, h if uses_h else 0, q_idx // qb, kv_idx // kvb]
        return tiles[slot, q_idx % qb, kv_idx % kvb] != 0
    return tile_lookup


def _interval_lookup_mod(slots: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor, qb: int, kvb: int,
                         uses_b: bool, uses_h: bool):
    def interval_lookup(b, h, q_idx, kv_idx):
        slot = slots[b if uses_b else 0, h if uses_h else 0, q_idx // qb, kv_idx // kvb]
        row, col = q_idx % qb, kv_idx % kvb
        return (col >= lows[slot, row]) & (col < highs[slot, row])
    return interval_lookup


def _intervals(tiles: torch.Tensor) -> Optional[tuple]:
    """(lows, highs) int32 [T, Q_BLOCK] of tiles [T, Q_BLOCK, KV_BLOCK] whose every row keeps
    one run of consecutive columns or none, else None."""
    kept = tiles.bool()
    count = kept.sum(-1, dtype=torch.int32)
    first = kept.to(torch.int8).argmax(-1).to(torch.int32)   # the first kept column (0: none)
    last = tiles.shape[-1] - 1 - kept.flip(-1).to(torch.int8).argmax(-1).to(torch.int32)
    if not bool(((count == 0) | (last - first + 1 == count)).all()):
        return None
    lows = torch.where(count > 0, first, 0)
    return lows, lows + count


def tile_table_form(block_mask: BlockMask, max_bytes: int = DEFAULT_MAX_BYTES,
                    intervals: bool = True) -> Optional[BlockMask]:
    """`block_mask` with its mask_mod replaced by the tile lookup (same block lists, same
    results) - the interval form where every partial block's rows allow it and `intervals`
    is set; None when it has no traced mask or its tiles would pass `max_bytes`. Cached on
    the BlockMask."""
    key = (max_bytes, intervals)
    cached = block_mask.__dict__.get("_flexattn_tile_form")
    if cached is not None and cached[0] == key:
        return cached[1]
    form = _build(block_mask, max_bytes, intervals)
    block_mask.__dict__["_flexattn_tile_form"] = (key, form)
    return form


def _build(bm: BlockMask, max_bytes: int, intervals: bool) -> Optional[BlockMask]:
    graph = bm.mask_graph
    if graph is None:
        return None
    qb, kvb = bm.BLOCK_SIZE
    Q_LEN, KV_LEN = bm.seq_lengths
    Bb, Hb, nq = bm.kv_num_blocks.shape
    nkv = bm.kv_indices.shape[-1]
    if Bb * Hb * nq * nkv > _MAX_LISTED:
        return None
    uses_b, uses_h = graph.uses("b"), graph.uses("h")
    Bs, Hs = (Bb if uses_b else 1), (Hb if uses_h else 1)
    dev = bm.kv_num_blocks.device
    # every listed partial block of every row; where the mask does not read b (or h), rows
    # that differ only in b share one tile per block (the union over b of their partial
    # blocks), so any row's partial block finds its tile
    listed = torch.arange(nkv, device=dev).view(1, 1, 1, nkv) < bm.kv_num_blocks.to(torch.int64)[..., None]
    b_i, h_i, q_i, j_i = torch.nonzero(listed, as_tuple=True)
    kv_i = bm.kv_indices[b_i, h_i, q_i, j_i].to(torch.int64)
    flat = ((b_i * uses_b * Hs + h_i * uses_h) * nq + q_i) * nkv + kv_i
    flat = torch.unique(flat)  # sorted: tile s + 1 is the s-th partial block in (b, h, i, j) order
    n_partial = flat.numel()
    if (n_partial + 16) * qb * kvb + Bs * Hs * nq * nkv * 4 > max_bytes:
        return None
    slots = torch.zeros(Bs * Hs * nq * nkv, dtype=torch.int32, device=dev)
    slots[flat] = torch.arange(1, n_partial + 1, dtype=torch.int32, device=dev)
    slots = slots.view(Bs, Hs, nq, nkv)
    kv_i = flat % nkv
    q_i = flat // nkv % nq
    h_i = flat // (nkv * nq) % Hs
    b_i = flat // (nkv * nq * Hs)
    tiles = torch.zeros(-(-(n_partial + 1) // 16) * 16, qb, kvb, dtype=torch.int8, device=dev)
    per = max(1, _TILE_BATCH_ELEMS // (qb * kvb))
    for s in range(0, n_partial, per):
        e = min(n_partial, s + per)
        tiles[s + 1:e + 1] = evaluate_block_tiles(graph, b_i[s:e].to(torch.int32)[:, None, None],
                                                  h_i[s:e].to(torch.int32)[:, None, None], q_i[s:e], kv_i[s:e],
                                                  (qb, kvb), Q_LEN, KV_LEN).to(torch.int8)
    runs = _intervals(tiles) if intervals else None
    if runs is not None:
        lookup = _interval_lookup_mod(slots, *runs, qb, kvb, uses_b, uses_h)
    else:
        lookup = _tile_lookup_mod(slots, tiles, qb, kvb, uses_b, uses_h)
    return BlockMask(*(getattr(bm, a) for a in BlockMask._TENSOR_ATTRS), BLOCK_SIZE=bm.BLOCK_SIZE,
                     mask_mod=lookup, seq_lengths=bm.seq_lengths, mask_graph=trace_mask(lookup))
