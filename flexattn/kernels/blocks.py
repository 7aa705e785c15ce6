"""The kernels' view of a BlockMask: its block lists as the kernels read them (int32, unit
stride along the last dim, broadcast to [B, Hq, ...] with stride 0).

No block_mask means the all-attending BlockMask (`flexattn.full_mask`), viewed the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..full_mask import full_block_mask


@dataclass
class KernelBlocks:
    """The BlockMask tensors the kernels read, broadcast to [B, Hq, ...] (stride 0)."""
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    full_kv_num: torch.Tensor | None
    full_kv_idx: torch.Tensor | None
    q_num: torch.Tensor
    q_idx: torch.Tensor
    full_q_num: torch.Tensor | None
    full_q_idx: torch.Tensor | None
    block: tuple[int, int]

    @property
    def has_full(self) -> bool:
        return self.full_kv_num is not None

    @classmethod
    def from_list(cls, blocks, block: tuple, has_full: bool) -> "KernelBlocks":
        """From the 8 tensors of flexattn.ops.blocks_list (the full ones ignored unless has_full)."""
        full = (lambda t: t) if has_full else (lambda t: None)  # noqa: E731
        return cls(blocks[0], blocks[1], full(blocks[2]), full(blocks[3]),
                   blocks[4], blocks[5], full(blocks[6]), full(blocks[7]), tuple(block))

    @classmethod
    def of_block_mask(cls, bm) -> "KernelBlocks":
        return cls(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                   bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, tuple(bm.BLOCK_SIZE))


def blocks_of(block_mask, B, Hq, L, S, device) -> KernelBlocks:
    """The kernels' view of `block_mask` (None: attend everywhere), cached on it per (B, Hq):
    a call with a BlockMask already seen makes no torch ops (dtype casts / expands cost
    ~10 us each per call)."""
    if block_mask is None:
        block_mask = full_block_mask(L, S, device)
    key = (B, Hq, L, S, block_mask.kv_num_blocks.data_ptr(), block_mask.kv_indices.data_ptr())
    cache = block_mask.__dict__.setdefault("_flexattn_blocks", {}) if hasattr(block_mask, "__dict__") else {}
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = expand_blocks(KernelBlocks.of_block_mask(block_mask), B, Hq)
    return hit


def expand_blocks(b: KernelBlocks, B: int, Hq: int) -> KernelBlocks:
    """`b` as the kernels read it: int32, unit stride along the last dim, broadcast to [B, Hq, ...]."""
    def ex(t):
        if t is None:
            return None
        if t.dtype != torch.int32:
            t = t.to(torch.int32)
        if t.stride(-1) != 1:
            t = t.contiguous()
        return t.expand(B, Hq, *t.shape[2:])

    return KernelBlocks(ex(b.kv_num), ex(b.kv_idx), ex(b.full_kv_num), ex(b.full_kv_idx),
                        ex(b.q_num), ex(b.q_idx), ex(b.full_q_num), ex(b.full_q_idx), b.block)


def bm_strides(num, idx) -> list:
    """The (B, H, q-block) strides of a block count tensor and of its index tensor."""
    return [*num.stride()[:3], *idx.stride()[:3]]


def kv_lists(blk: KernelBlocks) -> tuple:
    """(partial count, partial indices, full count, full indices) along kv; without full
    blocks the partial ones stand in for the full ones (HAS_FULL=False: never read)."""
    if blk.has_full:
        return blk.kv_num, blk.kv_idx, blk.full_kv_num, blk.full_kv_idx
    return blk.kv_num, blk.kv_idx, blk.kv_num, blk.kv_idx


def q_lists(blk: KernelBlocks) -> tuple:
    """kv_lists along q (the transposed lists the dk/dv kernel walks)."""
    if blk.has_full:
        return blk.q_num, blk.q_idx, blk.full_q_num, blk.full_q_idx
    return blk.q_num, blk.q_idx, blk.q_num, blk.q_idx
