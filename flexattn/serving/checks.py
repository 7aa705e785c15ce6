"""The serving path's input checks, written once and run before anything launches: the
query and cache tensors, the per-sequence kv lengths, the page size, the page table.

Each error is a ValueError / TypeError that names the argument, what was expected, what
came and the fix (flexattn's convention, DESIGN.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..checks import SUPPORTED_DTYPES, check_gqa

MIN_KV_TILE = 16  # the smallest kv tile of the kernels: a page size must be a multiple of it


class CacheLengths(NamedTuple):
    """cache_seqlens on the device (int32 [B]) and on the host (list of ints)."""
    device: torch.Tensor
    host: list


class PackedQueries(NamedTuple):
    """Queries of several lengths packed along q's rows: sequence b's are rows
    [starts[b], starts[b] + lens[b]) of q [1, Hq, sum(lens), E]. starts / lens: int32 [B] on
    the device; host_starts / host_lens: the same as lists."""
    starts: torch.Tensor
    lens: torch.Tensor
    host_starts: list
    host_lens: list

    @property
    def longest(self) -> int:
        return max(self.host_lens)


def _host_ints(name: str, x) -> tuple[list, tuple]:
    """(the values as a list, the shape) of argument `name`: integers as a list or an integer
    tensor; a TypeError naming it otherwise."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"{name} must be B integers (a list or an integer tensor), got a tensor of dtype {x.dtype}")
        return x.reshape(-1).tolist(), tuple(x.shape)
    try:
        host = [int(n) for n in x]
    except TypeError:
        raise TypeError(f"{name} must be B integers (a list or an integer tensor), got {type(x).__name__}") from None
    return host, (len(host),)


def check_query_lens(query_lens, q, k_cache, paged: bool) -> PackedQueries:
    """query_lens: B >= 1 ints >= 0 (a list or an integer tensor) whose sum is q's number of
    rows, q being [1, Hq, sum(query_lens), E]; B sequences in a contiguous k_cache."""
    host, shape = _host_ints("query_lens", query_lens)
    if len(shape) != 1:
        raise TypeError(f"query_lens must be B integers (a list or a 1-D integer tensor), got shape {shape}")
    if not host or min(host) < 0:
        raise ValueError(f"query_lens must be B >= 1 non-negative query counts, one per sequence, got {host}")
    if q.shape[0] != 1 or q.shape[2] != sum(host):
        raise ValueError(f"with query_lens, q holds every sequence's queries packed along its rows: shape "
                         f"[1, Hq, sum(query_lens)={sum(host)}, E], got {tuple(q.shape)}; concatenate the "
                         f"sequences' queries along dim 2 (torch.cat(..., dim=2))")
    if not paged and k_cache.shape[0] != len(host):
        raise ValueError(f"without a page_table, k_cache / v_cache are contiguous caches [B, Hkv, S, head_dim] with "
                         f"one batch entry per sequence of query_lens (B={len(host)}), got shape "
                         f"{tuple(k_cache.shape)}")
    starts = [0]
    for n in host[:-1]:
        starts.append(starts[-1] + n)
    both = torch.tensor([starts, host], dtype=torch.int32).to(q.device, non_blocking=True)
    return PackedQueries(both[0], both[1], starts, host)


def check_page_size(page_size) -> int:
    """A page size the kernels can tile: an int, a multiple of 16 (then the kv tile divides
    it, or it divides the kv tile)."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be an int (a multiple of {MIN_KV_TILE}, e.g. 16, 64, 128 or 256), "
                        f"got {type(page_size).__name__}")
    if page_size < MIN_KV_TILE or page_size % MIN_KV_TILE:
        raise ValueError(f"page_size must be a positive multiple of {MIN_KV_TILE} (so that the kernels' kv tile "
                         f"divides a page or a page divides the tile), got {page_size}; use 16, 32, 64, 128 or 256")
    return page_size


def check_tensors(q, k_cache, v_cache, paged: bool, packed: bool) -> None:
    """q [B, Hq, L, E] (packed: q's shape and the cache's batch checked by check_query_lens); k_cache /
    v_cache [1, Hkv, num_pages * page_size, E / Ev] when paged, else [B, Hkv, S, E / Ev]; one
    dtype, one device; Hq a multiple of Hkv."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, positions, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension (shape {tuple(t.shape)})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache and v_cache must have one dtype, got {q.dtype}, {k_cache.dtype} and "
                        f"{v_cache.dtype}; convert q with .to(k_cache.dtype)")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"q, k_cache and v_cache must be on one device, got {q.device}, {k_cache.device} and "
                         f"{v_cache.device}; move q with .to(k_cache.device)")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must agree in all but the head dim, got shapes "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.shape[3] != k_cache.shape[3]:
        raise ValueError(f"q and k_cache must have one head dim, got {q.shape[3]} and {k_cache.shape[3]}")
    if paged and k_cache.shape[0] != 1:
        raise ValueError(f"with a page_table, k_cache / v_cache are the page pool [1, Hkv, num_pages * page_size, "
                         f"head_dim], got shape {tuple(k_cache.shape)}; PagedKVCache.k / .v have that shape")
    if not paged and not packed and k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"without a page_table, k_cache / v_cache are contiguous caches [B, Hkv, S, head_dim] with "
                         f"q's batch size {q.shape[0]}, got shape {tuple(k_cache.shape)}")
    check_gqa(q.shape[1], k_cache.shape[1])


def check_lengths(cache_seqlens, B: int, q_lens: list, capacity: int, device) -> CacheLengths:
    """cache_seqlens: B ints (a list or an integer tensor), cache_seqlens[b] in [q_lens[b],
    capacity]: the queries are the last q_lens[b] positions of their sequence (already
    appended)."""
    if isinstance(cache_seqlens, CacheLengths):  # (PagedKVCache: both copies at hand)
        host, shape = cache_seqlens.host, tuple(cache_seqlens.device.shape)
    else:
        host, shape = _host_ints("cache_seqlens", cache_seqlens)
    if shape != (B,):
        raise ValueError(f"cache_seqlens must have one length per sequence of q (shape ({B},)), got shape {shape}")
    for b, n in enumerate(host):
        if n < q_lens[b]:
            raise ValueError(f"cache_seqlens[{b}] = {n} is shorter than its {q_lens[b]} queries: the queries are the "
                             f"last positions of their sequence, so append their K/V to the cache first")
        if n > capacity:
            raise ValueError(f"cache_seqlens[{b}] = {n} is longer than the cache holds for a sequence ({capacity} "
                             f"positions: the page_table's width times page_size, or k_cache's length); reserve "
                             f"more pages (PagedKVCache.reserve) or pass a wider page_table")
    if isinstance(cache_seqlens, CacheLengths):
        return cache_seqlens
    # a host list goes up without waiting for the device (pageable memory is staged at once)
    dev = cache_seqlens.to(device=device, dtype=torch.int32) if isinstance(cache_seqlens, torch.Tensor) \
        else torch.tensor(host, dtype=torch.int32).to(device, non_blocking=True)
    return CacheLengths(dev, host)


def check_page_table_shape(page_table, B: int, device) -> None:
    """page_table: an integer tensor [B, pages per sequence] on the cache's device."""
    if not isinstance(page_table, torch.Tensor):
        raise TypeError(f"page_table must be an integer tensor [B, pages per sequence], got "
                        f"{type(page_table).__name__}")
    if page_table.dtype not in (torch.int32, torch.int64, torch.int16):
        raise TypeError(f"page_table must hold integers (int32), got dtype {page_table.dtype}")
    if page_table.dim() != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table must be [B, pages per sequence] with one row per sequence (B={B}), got shape "
                         f"{tuple(page_table.shape)}")
    if page_table.device != device:
        raise ValueError(f"page_table is on {page_table.device} but the cache on {device}; move it with "
                         f".to({str(device)!r})")


def check_page_table(page_table, B: int, page_size: int, num_pages: int, lengths: CacheLengths) -> torch.Tensor:
    """The entries of page_table (checked by check_page_table_shape) for the pages holding a
    sequence's cache_seqlens positions are pool pages (0 <= page < num_pages), on the cache's
    device. Returns it as int32 with unit stride along its rows."""
    used = torch.tensor([-(-n // page_size) for n in lengths.host], device=page_table.device)
    cols = torch.arange(page_table.shape[1], device=page_table.device)
    bad = (cols[None, :] < used[:, None]) & ((page_table < 0) | (page_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"page_table[{b}, {j}] = {int(page_table[b, j])} points outside the pool of {num_pages} "
                         f"pages, but sequence {b} ({lengths.host[b]} positions, page_size {page_size}) uses its "
                         f"first {int(used[b])} pages; every used entry must be a page in [0, {num_pages})")
    if page_table.dtype != torch.int32 or page_table.stride(-1) != 1:
        page_table = page_table.to(torch.int32).contiguous()
    return page_table


def check_block_mask_shape(block_mask, B: int, Hq: int, q_len: int, max_len: int) -> None:
    """A BlockMask given to paged_attention covers [B (or 1), Hq (or 1), q_len, >= the longest
    sequence] in logical positions (create_cache_block_mask / tree_mask build one)."""
    from ..block_mask import BlockMask
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a flexattn BlockMask (create_cache_block_mask builds one), got "
                        f"{type(block_mask).__name__}")
    Bm, Hm = block_mask.kv_num_blocks.shape[:2]
    L, S = block_mask.seq_lengths
    qb, kvb = block_mask.BLOCK_SIZE
    if Bm not in (1, B) or Hm not in (1, Hq) or L != q_len or S < max_len:
        raise ValueError(f"block_mask covers (B={Bm}, H={Hm}, Q_LEN={L}, KV_LEN={S}); paged_attention needs "
                         f"B in (1, {B}), H in (1, {Hq}), Q_LEN={q_len}, KV_LEN >= {max_len} (the longest "
                         f"sequence): build it with create_cache_block_mask(mask_mod, cache_seqlens, q_len)")
    if qb % MIN_KV_TILE or kvb % MIN_KV_TILE:
        raise ValueError(f"block_mask.BLOCK_SIZE must be multiples of {MIN_KV_TILE} (the kernels' smallest tile), "
                         f"got {(qb, kvb)}")


