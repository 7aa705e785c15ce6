"""The communication plan: which kv blocks each rank's queries visit, who owns them, what
goes where - a function of the Layout and the global BlockMask only, so every rank derives
the same plan without talking, and the benchmark computes it without any process group.

    world_plan(layout, block_mask)        -> WorldPlan (all ranks: needs, volumes, work)
    rank_plan(layout, block_mask, rank)   -> RankPlan  (one rank: its P2P lists, its local
                                             BlockMask over the compact kv buffer, and the
                                             parts of an overlapped fetch: RankPlan.parts)

A rank's compact kv buffer holds the kv blocks its queries visit, in ascending global
order: its own blocks are copied, the others are received from their owners. Its local
BlockMask is the global one's rows for its q-blocks, with columns renumbered onto the
compact buffer; its mods see global positions (flexattn.distributed.global_mods).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
import torch

from ..block_mask import BlockMask
from ..block_states import FULL, PARTIAL
from ..trace import trace_mask
from .global_mods import global_mask_mod
from .layout import Layout
from .mask_rows import row_states, row_work, visited_columns


def q_block_rows(layout: Layout, rank: int, q_block: int) -> torch.Tensor:
    """int64: the global q-block of each local q-block of `rank`, in local order."""
    per = layout.chunk // q_block
    starts = torch.tensor(layout.chunks[rank], dtype=torch.int64) * per
    return (starts[:, None] + torch.arange(per)).reshape(-1)


@dataclass
class WorldPlan:
    """Every rank's kv needs under one layout (see the module doc). Block ids are global kv
    blocks (of the BlockMask's KV_BLOCK); `remote[r]` are the blocks rank r receives."""
    layout: Layout
    block_size: tuple
    n_kv_blocks: int
    kv_owner: torch.Tensor            # [n_kv_blocks] rank that holds each kv block
    kv_local: torch.Tensor            # [n_kv_blocks] its block offset inside that rank's shard
    needed: list                      # per rank: int64 ascending kv blocks its queries visit
    remote: list                      # per rank: the needed blocks held elsewhere
    work: list                        # per rank: non-empty blocks of its q rows (over batch, heads)

    def imbalance(self) -> float:
        mean = sum(self.work) / len(self.work)
        return max(self.work) / mean if mean else 1.0

    def recv_from(self, rank: int, peer: int) -> torch.Tensor:
        """The kv blocks `rank` receives from `peer`, ascending."""
        r = self.remote[rank]
        return r[self.kv_owner[r] == peer]

    def volume(self, bytes_per_block: int) -> tuple[list, list]:
        """(sent, received) bytes per rank for one exchange of kv blocks of `bytes_per_block`
        (the forward's K/V fetch; the backward sends the same blocks' dK/dV back)."""
        P = self.layout.world_size
        received = [len(r) * bytes_per_block for r in self.remote]
        sent = [0] * P
        for r in range(P):
            counts = torch.bincount(self.kv_owner[self.remote[r]], minlength=P)
            for s in range(P):
                sent[s] += int(counts[s]) * bytes_per_block
        return sent, received


def world_plan(layout: Layout, bm: BlockMask) -> WorldPlan:
    """Every rank's kv needs for the global BlockMask `bm` under `layout`: the kv blocks each
    rank's q-block rows visit (any batch / head), which of them are held elsewhere, the
    non-empty blocks per rank. No process group needed (the benchmark calls it directly)."""
    Q, KV = bm.seq_lengths
    qb, kvb = bm.BLOCK_SIZE
    n_kv = -(-KV // kvb)
    owner_chunk, slot_chunk = layout.owners()
    blocks = torch.arange(n_kv, dtype=torch.int64)
    start = blocks * kvb
    kv_owner = owner_chunk[start // layout.chunk]
    kv_local = (slot_chunk[start // layout.chunk] * layout.chunk + start % layout.chunk) // kvb
    work_rows = row_work(bm)
    needed, remote, work = [], [], []
    for r in range(layout.world_size):
        rows = q_block_rows(layout, r, qb)
        per = layout.chunk // qb
        need = torch.nonzero(visited_columns(bm, [(c * per, (c + 1) * per) for c in layout.chunks[r]])[:n_kv]).flatten()
        needed.append(need)
        remote.append(need[kv_owner[need] != r])
        work.append(int(work_rows[rows[rows < work_rows.numel()]].sum()))
    return WorldPlan(layout, (qb, kvb), n_kv, kv_owner, kv_local, needed, remote, work)


@dataclass
class RankPlan:
    """One rank's part of a WorldPlan, ready to run (see exchange.fetch_kv)."""
    rank: int
    kv_block: int
    n_compact: int                    # kv blocks in the compact buffer
    local_from: torch.Tensor          # own blocks: offsets in the local shard (blocks) ...
    local_to: torch.Tensor            # ... and their slots in the compact buffer
    recv: list                        # [(peer, compact slots)] blocks received, per peer
    send: list                        # [(peer, local block offsets)] blocks sent, per peer
    q_pos: torch.Tensor               # int32 [local_len]: global position of each local query
    kv_pos: torch.Tensor              # int32 [n_compact * kv_block]: of each compact kv slot
    local_state: torch.Tensor = field(repr=False)   # int8 [Bm, Hm, nq_local, n_compact]
    seq_len: int = 0
    world_size: int = 1
    _masks: dict = field(default_factory=dict, repr=False)

    def on(self, bm: BlockMask, device) -> tuple:
        """(q_pos, kv_pos, local BlockMask) on `device`: the local mask has the compact kv
        columns and a mask_mod on global positions. Built once per device."""
        key = str(torch.device(device))
        if key not in self._masks:
            q_pos, kv_pos = self.q_pos.to(device), self.kv_pos.to(device)
            mod = global_mask_mod(bm, q_pos, kv_pos, self.seq_len)
            local = BlockMask._from_state(self.local_state.to(device), bm.BLOCK_SIZE, mod,
                                          (q_pos.numel(), kv_pos.numel()), trace_mask(mod, "block_mask.mask_mod"))
            self._masks[key] = (q_pos, kv_pos, local)
        return self._masks[key]

    def parts(self, overlap: str) -> list:
        """The local calls of an overlapped fetch (see Part): first the own blocks, then
        "ring": one part per source rank, in ring order (step s receives from rank - s and
        sends to rank + s, so every rank's step s pairs with its peers' step s); "own_first":
        one part for all received blocks. Steps with nothing to send or receive are left out."""
        key = ("parts", overlap)
        if key not in self._masks:
            own = Part(self.local_to, [], [])
            recv, send = dict(self.recv), dict(self.send)
            if overlap == "ring":
                P = self.world_size
                steps = [((self.rank - s) % P, (self.rank + s) % P) for s in range(1, P)]
                remote = [Part(recv.get(src, _NONE), [(src, recv[src])] if src in recv else [],
                               [(dst, send[dst])] if dst in send else []) for src, dst in steps]
            else:
                slots = torch.cat([sl for _, sl in self.recv]) if self.recv else _NONE
                remote = [Part(slots, list(self.recv), list(self.send))]
            self._masks[key] = [own] + [p for p in remote if p.recv or p.send]
        return self._masks[key]

    def part_on(self, bm: BlockMask, device, overlap: str, i: int) -> tuple:
        """(kv_pos, local BlockMask) of part i of `parts(overlap)` on `device` (mask None for a
        part that reads no blocks): the rows of the compact BlockMask at the part's columns."""
        key = (str(torch.device(device)), overlap, i)
        if key not in self._masks:
            slots = self.parts(overlap)[i].slots
            q_pos = self.on(bm, device)[0]
            kv_pos = self.kv_pos.view(-1, self.kv_block)[slots].reshape(-1).to(device)
            local = None
            if slots.numel():
                mod = global_mask_mod(bm, q_pos, kv_pos, self.seq_len)
                local = BlockMask._from_state(self.local_state[..., slots].to(device), bm.BLOCK_SIZE, mod,
                                              (q_pos.numel(), kv_pos.numel()),
                                              trace_mask(mod, "block_mask.mask_mod"))
            self._masks[key] = (kv_pos, local)
        return self._masks[key]


_NONE = torch.zeros(0, dtype=torch.int64)


@dataclass
class Part:
    """One local call of an overlapped fetch: it reads the compact slots `slots` (in the
    order of its kv buffer: the own blocks in ascending order, or the blocks received from
    each peer of `recv` one after another), which arrive in one batch of P2P ops with `send`
    (the blocks this rank gives in the same step). Its backward sends the received blocks'
    dK/dV back and receives those of the blocks in `send`."""
    slots: torch.Tensor               # compact slots of its kv blocks, in buffer order
    recv: list                        # [(peer, compact slots)] received for it
    send: list                        # [(peer, local block offsets)] sent in its step


def _rank_plan(layout: Layout, bm: BlockMask, rank: int) -> RankPlan:
    wp = world_plan(layout, bm)
    qb, kvb = bm.BLOCK_SIZE
    Q, KV = bm.seq_lengths
    need = wp.needed[rank]
    slot_of = torch.full((wp.n_kv_blocks,), -1, dtype=torch.int64)
    slot_of[need] = torch.arange(need.numel())
    own = need[wp.kv_owner[need] == rank]
    recv, send = [], []
    for peer in range(layout.world_size):
        if peer == rank:
            continue
        got = wp.recv_from(rank, peer)
        if got.numel():
            recv.append((peer, slot_of[got]))
        gives = wp.recv_from(peer, rank)
        if gives.numel():
            send.append((peer, wp.kv_local[gives]))
    rows = q_block_rows(layout, rank, qb)
    state = row_states(bm, rows)[..., need.to(bm.kv_indices.device)].cpu()
    # an edge block holds padding, so it is never full (the local mask rules the padding out)
    edge = torch.zeros(state.shape[-2:], dtype=torch.bool)
    if Q % qb:
        edge[rows == Q // qb] = True
    if KV % kvb:
        edge[:, need == KV // kvb] = True
    state = torch.where(edge & (state == FULL), torch.tensor(PARTIAL, dtype=torch.int8), state)
    kv_pos = (need[:, None] * kvb + torch.arange(kvb)).reshape(-1)
    return RankPlan(rank, kvb, need.numel(), wp.kv_local[own], slot_of[own], recv, send,
                    layout.positions(rank).to(torch.int32), kv_pos.to(torch.int32), state, Q, layout.world_size)


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def rank_plan(layout: Layout, bm: BlockMask, rank: int) -> RankPlan:
    """`rank`'s plan for `bm` under `layout`, memoised on the mask (one per layout and rank)."""
    memo = _PLANS.setdefault(bm, {})
    key = (layout.key(), rank)
    if key not in memo:
        memo[key] = _rank_plan(layout, bm, rank)
    return memo[key]
