"""Logical masks for a batch of cached sequences: BlockMasks in logical (unpaged) kv
positions, which the page table maps onto the pool without moving any K/V.

The queries of a call are the last q_len positions of each sequence (their K/V appended
already; q_len may differ per sequence), so query row i of sequence b sits at global
position ``cache_seqlens[b] - q_len[b] + i``. The mods passed to `paged_attention` see global
positions (``flexattn.masks.causal()`` is causal over the whole sequence, a sliding window
slides over it, a document mask reads document ids by global position); the BlockMask
built here lists, per sequence, the kv blocks those mods can keep.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..block_mask import BlockMask
from ..build_mask import create_block_mask
from ..trace import trace_mask

DEFAULT_BLOCK = 128


def _lengths(cache_seqlens, device) -> torch.Tensor:
    lens = torch.as_tensor(cache_seqlens, device=device)
    if lens.dim() != 1 or lens.dtype.is_floating_point or lens.numel() == 0:
        raise ValueError(f"cache_seqlens must be B >= 1 integer lengths, got {cache_seqlens!r}")
    return lens.to(torch.int32)


def create_cache_block_mask(mask_mod: Callable, cache_seqlens, q_len, H: Optional[int] = None,
                            BLOCK_SIZE=DEFAULT_BLOCK, device=None) -> BlockMask:
    """The exact BlockMask of `mask_mod` (global positions) for queries at the last `q_len`
    positions of sequences of lengths `cache_seqlens` (B ints), over logical kv positions
    [0, max(cache_seqlens)): shape (B, H or 1, q_len, max(cache_seqlens)).

    q_len: an int, or B ints for queries of several lengths (packed: paged_attention's
    query_lens); then the mask is (B, H or 1, max(q_len), ...) and rows past a sequence's
    own query count are empty. Its own mask_mod sees local query rows (row i of the
    sequence's queries) and is False past each sequence's length; pass the global `mask_mod`
    itself to `paged_attention`. H=None: one mask for all heads (a mask that reads h needs H)."""
    if device is None:
        device = cache_seqlens.device if isinstance(cache_seqlens, torch.Tensor) else "cpu"
    lens = _lengths(cache_seqlens, device)
    per_sequence = not isinstance(q_len, int)
    q_lens = _lengths(q_len, device) if per_sequence else torch.full_like(lens, q_len)
    if q_lens.shape != lens.shape:
        raise ValueError(f"create_cache_block_mask: q_len gives {q_lens.numel()} query counts but cache_seqlens "
                         f"{lens.numel()} sequences; give one per sequence (or one int for all)")
    q_off = lens - q_lens
    if int(q_off.min()) < 0 or int(q_lens.min()) < 0:
        raise ValueError(f"create_cache_block_mask: every cache_seqlens must be >= its q_len >= 0, got "
                         f"cache_seqlens {lens.tolist()} and q_len {q_lens.tolist()}")
    if H is None and trace_mask(mask_mod).uses("h"):
        raise ValueError("create_cache_block_mask: mask_mod reads the head index h; pass H=<query heads>")

    def at_global_positions(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_off[b], kv_idx) & (kv_idx < lens[b])

    def packed_rows(b, h, q_idx, kv_idx):
        return at_global_positions(b, h, q_idx, kv_idx) & (q_idx < q_lens[b])

    fn = packed_rows if per_sequence else at_global_positions
    fn.__name__ = f"{getattr(mask_mod, '__name__', 'mask_mod')}_cached"
    return create_block_mask(fn, lens.numel(), H, max(int(q_lens.max()), 1), int(lens.max()), device=device,
                             BLOCK_SIZE=BLOCK_SIZE)


def tree_ancestors(parents) -> torch.Tensor:
    """anc [..., n, n] bool: anc[..., i, j] is True iff node j is node i or one of its
    ancestors, for a draft tree given by `parents` ([n] or [B, n] ints: parents[i] < i is
    node i's parent, -1 for a node whose parent is the last cached token)."""
    p = torch.as_tensor(parents)
    if p.dtype.is_floating_point or p.dtype == torch.bool or p.dim() not in (1, 2) or p.shape[-1] == 0:
        raise ValueError(f"parents must be n >= 1 integer parent indices ([n] or [B, n]), got {parents!r}")
    p = p.long().cpu()
    n = p.shape[-1]
    idx = torch.arange(n)
    bad = (p < -1) | (p >= idx)
    if bool(bad.any()):
        where = tuple(int(x) for x in bad.nonzero()[0])
        raise ValueError(f"parents{list(where)} = {int(p[where])}: a node's parent must be an earlier node "
                         f"(0 <= parent < its index) or -1 (the cached prefix); order the tree's nodes parents first")
    flat = p.reshape(-1, n)
    anc = torch.eye(n, dtype=torch.bool).repeat(flat.shape[0], 1, 1)
    for i in range(n):  # parents come first: a parent's row is complete when its children read it
        has = flat[:, i] >= 0
        if bool(has.any()):
            rows = anc[torch.arange(flat.shape[0]), flat[:, i].clamp(min=0)]
            anc[:, i] |= rows & has[:, None]
    return anc.reshape(*p.shape, n)


def tree_mask(parents, cache_seqlens, H: Optional[int] = None, BLOCK_SIZE=DEFAULT_BLOCK,
              device=None) -> tuple[Callable, BlockMask]:
    """Speculative tree verification: (mask_mod, BlockMask) for a draft tree of n nodes per
    sequence, appended as the last n positions of each sequence (cache_seqlens include them).
    Node i (query row i) sees the cached prefix and its ancestors (itself included).

    parents: [n] (one tree for every sequence) or [B, n] ints, parents[i] < i the parent of
    node i, -1 for a child of the last cached token. The mask_mod is in global positions (pass
    both to paged_attention); the BlockMask is exact (create_cache_block_mask)."""
    if device is None:
        device = cache_seqlens.device if isinstance(cache_seqlens, torch.Tensor) else "cpu"
    lens = _lengths(cache_seqlens, device)
    B = lens.numel()
    anc = tree_ancestors(parents)
    n = anc.shape[-1]
    if anc.dim() == 3 and anc.shape[0] != B:
        raise ValueError(f"parents has {anc.shape[0]} rows but cache_seqlens {B} sequences; give one tree per "
                         f"sequence ([B, n]) or one for all ([n])")
    anc = anc.expand(B, n, n).contiguous().to(device)
    start = lens - n  # global position of node 0 in each sequence

    def tree(b, h, q_idx, kv_idx):
        node = q_idx - start[b]
        other = kv_idx - start[b]
        in_tree = other >= 0
        node = torch.where(node < 0, 0, torch.where(node < n, node, n - 1))
        other = torch.where(in_tree, torch.where(other < n, other, n - 1), 0)
        return ~in_tree | anc[b, node, other]

    tree.__name__ = f"tree_{n}"
    return tree, create_cache_block_mask(tree, lens, n, H, BLOCK_SIZE, device)
