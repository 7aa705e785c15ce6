"""What the global BlockMask says about a set of its q-block rows: the block states of those
rows, the kv blocks they visit, and the work (non-empty blocks) per row. Rows past the mask's
last q-block (padding) are empty."""
from __future__ import annotations

import torch

from ..block_mask import BlockMask, _state_from_ordered
from ..block_states import EMPTY, FULL, PARTIAL

# rows handled at once when only a reduction over them is kept (bounded memory at 1M tokens)
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


def visited_columns(bm: BlockMask, rows: torch.Tensor) -> torch.Tensor:
    """bool [nKV]: the kv blocks any (batch, head) of the given q-block rows visits."""
    seen = torch.zeros(bm.kv_indices.shape[-1], dtype=torch.bool, device=bm.kv_indices.device)
    for i in range(0, rows.numel(), _ROWS_AT_ONCE):
        seen |= (row_states(bm, rows[i:i + _ROWS_AT_ONCE]) != EMPTY).flatten(0, 2).any(0)
    return seen.cpu()


def row_work(bm: BlockMask) -> torch.Tensor:
    """int64 [nQ]: non-empty blocks of each q-block row, summed over batch and heads
    (a broadcast mask counts once per row)."""
    work = bm.kv_num_blocks.to(torch.int64).sum((0, 1))
    if bm.full_kv_num_blocks is not None:
        work = work + bm.full_kv_num_blocks.to(torch.int64).sum((0, 1))
    return work.cpu()
