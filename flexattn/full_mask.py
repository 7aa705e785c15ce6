"""The all-attending BlockMask that `block_mask=None` means: one definition, for the eager
and compiled front ends and for the kernels' entry point.

Built from the block grid (O(blocks)): full blocks inside, partial ones (padding) on the
edges when a length is not a multiple of the block. Cached per (L, S, device): building
one costs several small device ops per call.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .block_mask import _DEFAULT_BLOCK, BlockMask
from .block_states import FULL, PARTIAL
from .masks import noop_mask

_FULL_MASKS: "OrderedDict[tuple, BlockMask]" = OrderedDict()  # (L, S, device) -> BlockMask
_FULL_MASKS_MAX = 16


def full_block_mask(L: int, S: int, device) -> BlockMask:
    """Every position attended, for query length L and key/value length S (cached)."""
    key = (L, S, device)
    bm = _FULL_MASKS.get(key)
    if bm is None:
        bm = _FULL_MASKS[key] = build_full_block_mask(L, S, device)
        while len(_FULL_MASKS) > _FULL_MASKS_MAX:
            _FULL_MASKS.popitem(last=False)
    return bm


def build_full_block_mask(L: int, S: int, device) -> BlockMask:
    """full_block_mask, built anew (not cached)."""
    nq, nkv = -(-L // _DEFAULT_BLOCK), -(-S // _DEFAULT_BLOCK)
    state = torch.full((1, 1, nq, nkv), FULL, dtype=torch.int8, device=device)
    if L % _DEFAULT_BLOCK:
        state[..., -1, :] = PARTIAL
    if S % _DEFAULT_BLOCK:
        state[..., :, -1] = PARTIAL
    return BlockMask._from_state(state, (_DEFAULT_BLOCK, _DEFAULT_BLOCK), noop_mask, (L, S), None)
