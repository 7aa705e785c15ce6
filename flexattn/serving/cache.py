"""PagedKVCache: a pool of fixed-size K/V pages shared by many sequences, each with its own
page table (vLLM's PagedAttention layout, read by `paged_attention`).

The pool is one tensor per K and V, [1, Hkv, num_pages * page_size, head_dim]: the
(B, H, S, D) layout of a single long sequence whose rows are cut into pages. Sequence
`seq` (a slot in [0, max_seqs)) owns the pages listed in page_table[seq, :]; its position
n lives in pool row ``page_table[seq, n // page_size] * page_size + n % page_size``.
reserve() takes pages from the free list, append() writes new K/V (a batch of sequences,
variable lengths) into them, free() returns them. Nothing ever moves K/V between pages.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .attention import _paged_attention
from .checks import CacheLengths, check_page_size


class PagedKVCache:
    """A paged KV cache: `num_pages` pages of `page_size` positions, for up to `max_seqs`
    sequences of up to `max_pages_per_seq` pages each (default: the whole pool).

    Attributes: k, v (the pools, [1, Hkv, num_pages * page_size, head_dim(_v)]), page_table
    (int32 [max_seqs, max_pages_per_seq] on the device, -1 where unassigned), seqlens (int32
    [max_seqs] on the device)."""

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device=None, *, max_seqs: int = 64,
                 max_pages_per_seq: Optional[int] = None, head_dim_v: Optional[int] = None):
        for name, val in (("num_pages", num_pages), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("max_seqs", max_seqs)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {val!r}")
        self.page_size = check_page_size(page_size)
        self.num_pages = num_pages
        self.max_seqs = max_seqs
        self.max_pages_per_seq = num_pages if max_pages_per_seq is None else int(max_pages_per_seq)
        device = torch.device("cpu" if device is None else device)
        rows = num_pages * page_size
        self.k = torch.zeros(1, num_kv_heads, rows, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(1, num_kv_heads, rows, head_dim_v or head_dim, dtype=dtype, device=device)
        self.page_table = torch.full((max_seqs, self.max_pages_per_seq), -1, dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._pages: list[list[int]] = [[] for _ in range(max_seqs)]  # host copies of the above
        self._lens = [0] * max_seqs
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest page first

    # ---- bookkeeping ---------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def seqlen(self, seq: int) -> int:
        """Positions written for sequence `seq`."""
        return self._lens[self._slot(seq)]

    def capacity(self, seq: int) -> int:
        """Positions sequence `seq` may hold without reserving more pages."""
        return len(self._pages[self._slot(seq)]) * self.page_size

    def _slot(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < self.max_seqs:
            raise ValueError(f"PagedKVCache: a sequence is a slot index in [0, {self.max_seqs}), got {seq!r}")
        return seq

    def _slots(self, seqs) -> list:
        seqs = list(seqs)
        if not all(type(s) is int and 0 <= s < self.max_seqs for s in seqs):  # (one pass when all is well)
            seqs = [self._slot(int(s)) if not isinstance(s, bool) else self._slot(s) for s in seqs]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"PagedKVCache: sequences repeat in {seqs}; name each sequence once per call")
        return seqs

    def reserve(self, seq: int, num_tokens: int) -> None:
        """Make room for `num_tokens` more positions of sequence `seq` (pages from the free list)."""
        seq = self._slot(seq)
        need = -(-(self._lens[seq] + num_tokens) // self.page_size) - len(self._pages[seq])
        if need <= 0:
            return
        if len(self._pages[seq]) + need > self.max_pages_per_seq:
            raise ValueError(f"PagedKVCache.reserve: sequence {seq} would need {len(self._pages[seq]) + need} pages, "
                             f"more than max_pages_per_seq={self.max_pages_per_seq}")
        if need > len(self._free):
            raise ValueError(f"PagedKVCache.reserve: sequence {seq} needs {need} more pages but {len(self._free)} "
                             f"of {self.num_pages} are free; free() finished sequences or make a larger pool")
        new = [self._free.pop() for _ in range(need)]
        old = len(self._pages[seq])
        self._pages[seq].extend(new)
        self.page_table[seq, old:old + need] = torch.tensor(new, dtype=torch.int32).to(self.page_table.device)

    def free(self, seq: int) -> None:
        """Return sequence `seq`'s pages to the pool; its length becomes 0."""
        seq = self._slot(seq)
        self._free.extend(reversed(self._pages[seq]))
        self._pages[seq] = []
        self._lens[seq] = 0
        self.page_table[seq] = -1
        self.seqlens[seq] = 0

    # ---- writes --------------------------------------------------------------------------
    def append(self, seqs: Sequence[int], k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        """Write new K/V at the end of sequences `seqs`: k [B, Hkv, T, head_dim], v [B, Hkv, T,
        head_dim_v]; sequence seqs[i] gets the first lengths[i] positions of row i (default T).
        The pages must be reserved (reserve); everything is checked before anything is written."""
        seqs = self._slots(seqs)
        B = len(seqs)
        for name, t, pool in (("k", k, self.k), ("v", v, self.v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != B or t.shape[1] != pool.shape[1] \
                    or t.shape[3] != pool.shape[3]:
                raise ValueError(f"PagedKVCache.append: {name} must be [{B}, {pool.shape[1]}, T, {pool.shape[3]}] "
                                 f"(one row per sequence), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"PagedKVCache.append: k and v must have one length T, got {k.shape[2]} and {v.shape[2]}")
        T = k.shape[2]
        lens = [T] * B if lengths is None else [int(n) for n in
                                                (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if len(lens) != B or any(n < 0 or n > T for n in lens):
            raise ValueError(f"PagedKVCache.append: lengths must be {B} ints in [0, {T}], got {lens}")
        for s, n in zip(seqs, lens):
            if self._lens[s] + n > len(self._pages[s]) * self.page_size:
                raise ValueError(f"PagedKVCache.append: sequence {s} holds {self._lens[s]} positions and "
                                 f"{len(self._pages[s]) * self.page_size} reserved; {n} more do not fit: call "
                                 f"reserve({s}, {n}) first")
        ps = self.page_size
        rows, src = [], []
        for i, (s, n) in enumerate(zip(seqs, lens)):
            pos = torch.arange(self._lens[s], self._lens[s] + n)
            pages = torch.tensor(self._pages[s], dtype=torch.long)
            rows.append(pages[pos // ps] * ps + pos % ps)
            src.append(torch.arange(i * T, i * T + n))
        rows = torch.cat(rows).to(self.k.device)
        for pool, t in ((self.k, k), (self.v, v)):
            flat = t.to(pool.dtype).transpose(0, 1).reshape(pool.shape[1], B * T, pool.shape[3])
            if lengths is not None:
                flat = flat.index_select(1, torch.cat(src).to(flat.device))
            pool[0].index_copy_(1, rows, flat)
        for s, n in zip(seqs, lens):
            self._lens[s] += n
        idx = torch.tensor(seqs, device=self.seqlens.device)
        self.seqlens[idx] = torch.tensor([self._lens[s] for s in seqs], dtype=torch.int32).to(self.seqlens.device)

    # ---- reads ---------------------------------------------------------------------------
    def rows(self, seqs: Sequence[int]):
        """(page_table rows, seqlens on the device, seqlens on the host) of `seqs`, in order."""
        seqs = self._slots(seqs)
        s0 = seqs[0]
        if seqs == list(range(s0, s0 + len(seqs))):  # a run of slots: views, no copy
            return self.page_table[s0:s0 + len(seqs)], self.seqlens[s0:s0 + len(seqs)], \
                [self._lens[s] for s in seqs]
        idx = torch.tensor(seqs, device=self.page_table.device)
        return self.page_table[idx], self.seqlens[idx], [self._lens[s] for s in seqs]

    def attention(self, q: torch.Tensor, seqs: Sequence[int], *, score_mod=None, mask_mod=None, block_mask=None,
                  scale: Optional[float] = None, return_lse: bool = False, kernel_options: Optional[dict] = None,
                  query_lens=None):
        """paged_attention of q [len(seqs), Hq, L, E] over sequences `seqs` (their queries are
        their last L positions: append them first); with query_lens (one count per sequence), q
        is [1, Hq, sum(query_lens), E], the sequences' queries packed along its rows."""
        table, lens_dev, lens_host = self.rows(seqs)
        out, lse = _paged_attention(q, self.k, self.v, CacheLengths(lens_dev, lens_host), table, self.page_size,
                                    score_mod, mask_mod, block_mask, scale, kernel_options, trusted_table=True,
                                    query_lens=query_lens)
        return (out, lse) if return_lse else out
