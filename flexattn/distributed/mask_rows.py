"""What the global BlockMask says about a set of its q-block rows: the block states of those
rows, the kv blocks they visit, and the work (non-empty blocks) per row. Rows past the mask's
last q-block (padding) are empty."""
from __future__ import annotations

import weakref

import torch

from ..block_mask import BlockMask, _state_from_ordered
from ..block_states import EMPTY, FULL, PARTIAL

# rows read at once when listing visited blocks (bounded memory at 1M tokens)
_ROWS_AT_ONCE = 1024


def row_states(bm: BlockMask, rows: torch.Tensor) -> torch.Tensor:
    """int8 [Bm, Hm, len(rows), nKV]: EMPTY / PARTIAL / FULL of the given global q-block rows
    (int64, may reach past the mask's rows: those are EMPTY)."""
    nq, nkv = bm.kv_num_blocks.shape[2], bm.kv_indices.shape[-1]
    rows = rows.to(bm.kv_num_blocks.device)
    inside = rows < nq
    r = rows.clamp(max=nq - 1)

    def state(num, idx):
        return _state_from_ordered(num[:, :, r] * inside, idx[:, :, r], nkv)

    out = state(bm.kv_num_blocks, bm.kv_indices).to(torch.int8) * PARTIAL
    if bm.full_kv_num_blocks is not None:
        full = state(bm.full_kv_num_blocks, bm.full_kv_indices)
        out = torch.where(full, torch.tensor(FULL, dtype=torch.int8, device=out.device), out)
    return out


def _visited(bm: BlockMask) -> torch.Tensor:
    """bool [nQ, nKV] on the CPU: whether any (batch, head) of q-block row i visits kv block j.
    Memoised: every layout the balancing tries reads it (a byte per block pair: 64 MiB at 1M
    tokens in blocks of 128, a quarter of the mask's own kv_indices)."""
    hit = _VISITED.get(bm)
    if hit is None:
        nq = bm.kv_num_blocks.shape[2]
        hit = torch.zeros(nq, bm.kv_indices.shape[-1], dtype=torch.bool)
        for r0 in range(0, nq, _ROWS_AT_ONCE):
            rows = torch.arange(r0, min(nq, r0 + _ROWS_AT_ONCE))
            hit[r0:r0 + rows.numel()] = (row_states(bm, rows) != EMPTY).any(1).any(0).cpu()
        _VISITED[bm] = hit
    return hit


_VISITED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def visited_columns(bm: BlockMask, row_ranges) -> torch.Tensor:
    """bool [nKV]: the kv blocks any (batch, head) of the q-block rows in `row_ranges`
    ([(first, end)], ends exclusive; rows past the mask's are empty) visits."""
    visited = _visited(bm)
    seen = torch.zeros(visited.shape[1], dtype=torch.uint8)
    for a, b in row_ranges:
        if a < visited.shape[0]:
            seen |= visited[a:b].view(torch.uint8).amax(0)  # (amax over bytes: faster than any(0))
    return seen.bool()


def row_work(bm: BlockMask) -> torch.Tensor:
    """int64 [nQ]: non-empty blocks of each q-block row, summed over batch and heads
    (a broadcast mask counts once per row)."""
    work = bm.kv_num_blocks.to(torch.int64).sum((0, 1))
    if bm.full_kv_num_blocks is not None:
        work = work + bm.full_kv_num_blocks.to(torch.int64).sum((0, 1))
    return work.cpu()
