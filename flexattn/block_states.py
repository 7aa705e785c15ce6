"""The exact block states of a mask: analysis first, sampling and tile evaluation after.

`exact_block_states(graph, ...)` is the int8 [B, H, nQ, nKV] matrix of EMPTY / PARTIAL /
FULL that a BlockMask encodes: `flexattn.analyse` decides most blocks by interval
arithmetic, a few sample points prove many of the rest partial, and only the blocks still
undecided are evaluated exactly (`flexattn.evaluate`, a batch of tiles at a time). The
result is identical to evaluating the mask everywhere and reducing per block, and memory
stays O(#blocks + one batch of tiles), never O(Q_LEN * KV_LEN).
"""
from __future__ import annotations

import itertools

import torch

from .analyse import EMPTY, FULL, UNDECIDED, BoxAnalyser
from .evaluate import evaluate
from .ir import Graph

# Block states in the int8 state matrix every builder goes through (EMPTY and FULL are the
# analysis' own codes; it never answers PARTIAL, only UNDECIDED).
PARTIAL = 1
# Elements per batch of exactly evaluated tiles (bounds the memory of the exact pass).
_TILE_BATCH_ELEMS = 1 << 22
# Boxes analysed per call (a chunk of q-block rows against every kv block).
_ANALYSE_CHUNK_ELEMS = 1 << 21


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def evaluate_block_tiles(graph: Graph, b, h, qi: torch.Tensor, kj: torch.Tensor,
                         block: tuple[int, int], Q_LEN: int, KV_LEN: int) -> torch.Tensor:
    """bool [n, Q_BLOCK, KV_BLOCK]: the mask on blocks (qi[n], kj[n]); b, h int32 tensors
    that broadcast against [n, 1, 1] (0-d for one row). Padding positions (>= Q_LEN /
    KV_LEN) are evaluated at a clamped index (so captured tensors sized to the lengths are
    never read out of bounds) and then counted False."""
    qb, kvb = block
    dev = qi.device
    q = (qi.to(torch.int32) * qb)[:, None, None] + torch.arange(qb, dtype=torch.int32, device=dev)[None, :, None]
    kv = (kj.to(torch.int32) * kvb)[:, None, None] + torch.arange(kvb, dtype=torch.int32, device=dev)[None, None, :]
    m = evaluate(graph, b=b, h=h, q_idx=q.clamp(max=Q_LEN - 1), kv_idx=kv.clamp(max=KV_LEN - 1))
    return m & (q < Q_LEN) & (kv < KV_LEN)


def evaluate_blocks(graph: Graph, b: int, h: int, qi: torch.Tensor, kj: torch.Tensor,
                     block: tuple[int, int], Q_LEN: int, KV_LEN: int, device) -> torch.Tensor:
    """Exact state (int8 EMPTY/PARTIAL/FULL) of the blocks (qi[n], kj[n]), batched tiles."""
    qb, kvb = block
    out = torch.empty(qi.numel(), dtype=torch.int8, device=device)
    per = max(1, _TILE_BATCH_ELEMS // (qb * kvb))
    bt = torch.tensor(b, dtype=torch.int32, device=device)
    ht = torch.tensor(h, dtype=torch.int32, device=device)
    for s in range(0, qi.numel(), per):
        m = evaluate_block_tiles(graph, bt, ht, qi[s:s + per], kj[s:s + per], block, Q_LEN, KV_LEN)
        anyv = m.flatten(1).any(1)
        allv = m.flatten(1).all(1)
        out[s:s + per] = torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.int8)
    return out


def _sample_blocks(graph: Graph, b: int, h: int, qi: torch.Tensor, kj: torch.Tensor,
                   block: tuple[int, int], Q_LEN: int, KV_LEN: int, device) -> torch.Tensor:
    """PARTIAL where a few sample points of the block (its corners and centre, real
    positions only) already show both a true and a false value - or a true value in a
    block with padding -, else UNDECIDED. Exact: such a block is neither full nor empty.
    Cheap: 5 evaluations per block instead of Q_BLOCK * KV_BLOCK."""
    qb, kvb = block
    q0 = qi.to(torch.int64) * qb
    k0 = kj.to(torch.int64) * kvb
    q1 = torch.clamp(q0 + qb - 1, max=Q_LEN - 1)
    k1 = torch.clamp(k0 + kvb - 1, max=KV_LEN - 1)
    qs = torch.stack([q0, q0, q1, q1, (q0 + q1) // 2], 1).to(torch.int32)
    ks = torch.stack([k0, k1, k0, k1, (k0 + k1) // 2], 1).to(torch.int32)
    v = evaluate(graph, b=torch.tensor(b, dtype=torch.int32, device=device),
                 h=torch.tensor(h, dtype=torch.int32, device=device), q_idx=qs, kv_idx=ks)
    anyv, allv = v.any(1), v.all(1)
    padded = ((q0 + qb) > Q_LEN) | ((k0 + kvb) > KV_LEN)
    partial = anyv & (~allv | padded)
    return torch.where(partial, torch.tensor(PARTIAL, dtype=torch.int8, device=device),
                       torch.tensor(UNDECIDED, dtype=torch.int8, device=device))


def exact_block_states(graph: Graph, Bm: int, Hm: int, Q_LEN: int, KV_LEN: int, block, device) -> torch.Tensor:
    """int8 [Bm, Hm, nQ, nKV] of EMPTY / PARTIAL / FULL: analysis first, exact evaluation
    of the undecided blocks after, one chunk of q-block rows at a time."""
    qb, kvb = block
    nq, nkv = cdiv(Q_LEN, qb), cdiv(KV_LEN, kvb)
    state = torch.empty(Bm, Hm, nq, nkv, dtype=torch.int8, device=device)
    analyser = BoxAnalyser(graph, Q_LEN, KV_LEN, device=device)
    # Index ranges of the real (unpadded) positions of each block, inclusive.
    kv_lo = torch.arange(nkv, dtype=torch.int64, device=device) * kvb
    kv_hi = torch.clamp(kv_lo + kvb - 1, max=KV_LEN - 1)
    chunk = max(1, _ANALYSE_CHUNK_ELEMS // max(nkv, 1))
    for b, h in itertools.product(range(Bm), range(Hm)):
        for r0 in range(0, nq, chunk):
            r1 = min(nq, r0 + chunk)
            q_lo = torch.arange(r0, r1, dtype=torch.int64, device=device) * qb
            q_hi = torch.clamp(q_lo + qb - 1, max=Q_LEN - 1)
            st = analyser.decide(b, h, q_lo[:, None], q_hi[:, None], kv_lo[None, :], kv_hi[None, :])
            st = st.expand(r1 - r0, nkv).contiguous()
            # A block with padding is never full; the analysis saw only its real positions.
            # Padding lives only in the last block row / column.
            if r1 == nq and Q_LEN % qb:
                st[-1][st[-1] == FULL] = PARTIAL
            if KV_LEN % kvb:
                col = st[:, -1]
                st[:, -1] = torch.where(col == FULL, torch.tensor(PARTIAL, dtype=torch.int8, device=device), col)
            und = st == UNDECIDED
            if bool(und.any()):
                qi, kj = torch.nonzero(und, as_tuple=True)
                res = _sample_blocks(graph, b, h, qi + r0, kj, block, Q_LEN, KV_LEN, device)
                rest = res == UNDECIDED
                if bool(rest.any()):
                    res[rest] = evaluate_blocks(graph, b, h, qi[rest] + r0, kj[rest], block, Q_LEN, KV_LEN, device)
                st[qi, kj] = res
            state[b, h, r0:r1] = st
    return state
