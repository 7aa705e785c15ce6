"""The mods of a rank's local call, seeing global positions.

A rank runs one local attention over its queries and its compact kv buffer. Local index
q_idx / kv_idx maps to the global position q_pos[q_idx] / kv_pos[kv_idx] (captured int32
tensors, so new positions never recompile), and the user's mods run on those. Positions at
or past the global length are padding: masked out, and clamped before a mod reads them (a
mod may index its own captured tensors by position).
"""
from __future__ import annotations

from ..block_mask import BlockMask
from ..masks import noop_mask


def global_mask_mod(bm: BlockMask, q_pos, kv_pos, seq_len: int):
    """mask_mod(b, h, q, kv) = not padding and bm.mask_mod(b, h, q_pos[q], kv_pos[kv])."""
    mask_mod = bm.mask_mod
    plain = bm.mask_graph is None and mask_mod is noop_mask  # blocks only: attend inside them
    last = seq_len - 1

    def cp_mask(b, h, q_idx, kv_idx):
        q, kv = q_pos[q_idx], kv_pos[kv_idx]
        real = (q < seq_len) & (kv < seq_len)
        if plain:
            return real
        return real & mask_mod(b, h, q.clamp(max=last), kv.clamp(max=last))

    return cp_mask


def global_score_mod(score_mod, q_pos, kv_pos, seq_len: int):
    """score_mod(score, b, h, q, kv) = score_mod(score, b, h, q_pos[q], kv_pos[kv]) (clamped)."""
    last = seq_len - 1

    def cp_score(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_pos[q_idx].clamp(max=last), kv_pos[kv_idx].clamp(max=last))

    return cp_score
