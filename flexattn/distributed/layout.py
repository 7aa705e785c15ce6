"""Layout: which tokens of the global sequence each rank holds.

The padded sequence (length `padded_len` >= seq_len, a multiple of `chunk * world_size *
chunks_per_rank`) is cut into `num_chunks` equal chunks of `chunk` tokens; rank r holds the
chunks `chunks[r]`, ascending, one after another. Every rank holds the same number of
chunks, so every shard has the same length `local_len`. Positions at or past `seq_len` are
padding: `shard` fills them with zeros and `flex_attention` masks them out (their query rows
give out 0, lse -inf, and no gradient; no query attends to them).

A chunk is a whole number of BlockMask blocks (`chunk % align == 0`), so a rank's query rows
are whole q-blocks of the global BlockMask and the kv blocks it fetches are whole blocks.

Three layouts (the `balance` argument of shard / unshard / flex_attention):

* "contiguous": P chunks, rank r holds chunk r;
* "head_tail":  2P chunks, rank r holds chunks r and 2P-1-r (evens out causal work);
* a BlockMask:  `balanced_layout(block_mask, P)` - the layout (from a few candidates, see
  there) whose ranks hold about the same number of non-empty blocks and fetch the fewest kv
  blocks; derived from the mask alone, so every rank derives the same one.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..block_mask import _DEFAULT_BLOCK, BlockMask
from .mask_rows import row_work

BALANCES = ("contiguous", "head_tail")
# a balanced layout within this max/mean work ratio is chosen by its volume
_IMBALANCE_OK = 1.05
# chunks per rank tried by balanced_layout
_CANDIDATE_CHUNKS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Layout:
    """Which chunks of the (padded) global sequence each rank holds; see the module doc."""
    world_size: int
    seq_len: int                          # the true global length (positions past it are padding)
    chunk: int                            # tokens per chunk
    chunks: tuple                         # chunks[r]: the chunk ids rank r holds, ascending
    name: str = "custom"

    def __post_init__(self):
        counts = {len(c) for c in self.chunks}
        flat = sorted(c for cs in self.chunks for c in cs)
        if (len(self.chunks) != self.world_size or len(counts) != 1 or flat != list(range(len(flat)))
                or any(list(c) != sorted(c) for c in self.chunks)):
            raise ValueError(f"Layout: chunks must give each of the {self.world_size} ranks the same number of "
                             f"chunks, ascending, covering 0..n-1 once; got {self.chunks}")
        if self.chunk <= 0 or self.num_chunks * self.chunk < self.seq_len:
            raise ValueError(f"Layout: {self.num_chunks} chunks of {self.chunk} tokens do not cover "
                             f"seq_len={self.seq_len}")

    @property
    def num_chunks(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def chunks_per_rank(self) -> int:
        return len(self.chunks[0])

    @property
    def padded_len(self) -> int:
        return self.num_chunks * self.chunk

    @property
    def local_len(self) -> int:
        return self.chunks_per_rank * self.chunk

    def key(self) -> tuple:
        """What identifies the layout (compared across ranks)."""
        return (self.world_size, self.seq_len, self.chunk, self.chunks)

    def positions(self, rank: int) -> torch.Tensor:
        """int64 [local_len]: the global position of each local token of `rank` (>= seq_len: padding)."""
        starts = torch.tensor(self.chunks[rank], dtype=torch.int64) * self.chunk
        return (starts[:, None] + torch.arange(self.chunk, dtype=torch.int64)).reshape(-1)

    def owners(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank, slot) int64 [num_chunks]: who holds each chunk, and where in its shard."""
        rank = torch.empty(self.num_chunks, dtype=torch.int64)
        slot = torch.empty(self.num_chunks, dtype=torch.int64)
        for r, cs in enumerate(self.chunks):
            rank[list(cs)] = r
            slot[list(cs)] = torch.arange(len(cs))
        return rank, slot


def _chunk_size(seq_len: int, num_chunks: int, align: int) -> int:
    return max(1, math.ceil(math.ceil(seq_len / num_chunks) / align)) * align


def make_layout(balance: str, seq_len: int, world_size: int, block_size: int = _DEFAULT_BLOCK) -> Layout:
    """The "contiguous" or "head_tail" layout of `seq_len` tokens over `world_size` ranks, in
    chunks that are a whole number of `block_size` tokens (the BlockMask's block)."""
    P = world_size
    if balance == "contiguous":
        chunks = tuple((r,) for r in range(P))
    elif balance == "head_tail":
        chunks = tuple((r, 2 * P - 1 - r) for r in range(P))
    else:
        raise ValueError(f"balance must be 'contiguous', 'head_tail', a BlockMask (work-balanced layout) or a "
                         f"flexattn.distributed.Layout, got {balance!r}")
    return Layout(P, seq_len, _chunk_size(seq_len, len(chunks) * len(chunks[0]), block_size), chunks, balance)


def _deal(work: list, world_size: int) -> tuple:
    """Chunks to ranks, the same count each: costliest chunk first, to the least loaded rank
    that still has room (ties: the lower rank). Deterministic."""
    per = len(work) // world_size
    loads, out = [0] * world_size, [[] for _ in range(world_size)]
    for c in sorted(range(len(work)), key=lambda c: (-work[c], c)):
        r = min((r for r in range(world_size) if len(out[r]) < per), key=lambda r: (loads[r], r))
        out[r].append(c)
        loads[r] += work[c]
    return tuple(tuple(sorted(cs)) for cs in out)


def _stats(layout: Layout, block_mask: BlockMask) -> tuple[float, int]:
    """(imbalance = max / mean non-empty blocks per rank, most kv blocks a rank fetches)."""
    from .plan import world_plan  # (plan imports layout)
    plan = world_plan(layout, block_mask)
    return plan.imbalance(), max(len(r) for r in plan.remote)


_BALANCED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def balanced_layout(block_mask: BlockMask, world_size: int) -> Layout:
    """The work-balanced layout of `block_mask`'s sequence over `world_size` ranks.

    Candidates: the sequence in P*k chunks (k in 1, 2, 4, ..., 32 while no chunk is all
    padding), dealt to ranks by work (non-empty blocks of the chunk's q rows,
    costliest first to the least loaded rank), plus "head_tail". Among those whose imbalance
    (max / mean non-empty blocks per rank) is at most 1.05 the one whose busiest rank fetches
    the fewest kv blocks wins; if none is that even, the most even one. Memoised per mask."""
    memo = _BALANCED.setdefault(block_mask, {})
    if world_size in memo:
        return memo[world_size]
    Q, KV = block_mask.seq_lengths
    qb, kvb = block_mask.BLOCK_SIZE
    align = math.lcm(qb, kvb)
    work = row_work(block_mask)  # [nQ] non-empty blocks per q-block row
    candidates = [make_layout("head_tail", Q, world_size, align)]
    for k in _CANDIDATE_CHUNKS:
        C = world_size * k
        chunk = _chunk_size(Q, C, align)
        if k > 1 and chunk * (C - 1) >= Q:  # a chunk would be all padding: finer ones only pad more
            break
        rows_per_chunk = chunk // qb
        padded = torch.nn.functional.pad(work, (0, C * rows_per_chunk - work.numel()))
        chunk_work = padded[:C * rows_per_chunk].reshape(C, rows_per_chunk).sum(1).tolist()
        candidates.append(Layout(world_size, Q, chunk, _deal(chunk_work, world_size), f"{C} chunks by work"))
    scored = [(_stats(lay, block_mask), i, lay) for i, lay in enumerate(candidates)]
    even = [s for s in scored if s[0][0] <= _IMBALANCE_OK]
    best = min(even, key=lambda s: (s[0][1], s[0][0], s[1])) if even else min(scored, key=lambda s: (s[0][0], s[1]))
    memo[world_size] = best[2]
    return best[2]


Balance = Union[str, BlockMask, Layout]


def resolve(balance: Balance, seq_len: Optional[int], world_size: int, block_size: int) -> Layout:
    """The Layout a `balance` argument names (seq_len: the global length; None for a
    BlockMask or a Layout, which know theirs)."""
    if isinstance(balance, Layout):
        if balance.world_size != world_size:
            raise ValueError(f"balance is a Layout for {balance.world_size} ranks but the process group has "
                             f"{world_size}; build the layout for this group's size (or pass the matching group=)")
        return balance
    if isinstance(balance, BlockMask):
        return balanced_layout(balance, world_size)
    if seq_len is None:
        raise ValueError(f"balance={balance!r} needs the global length: pass seq_len=")
    return make_layout(balance, seq_len, world_size, block_size)
