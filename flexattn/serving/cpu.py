"""The serving path on CPU tensors: attention of each sequence's queries over its cache,
read through the same page table the kernels read.

For each sequence and each q block, the kv blocks the BlockMask lists (for any head; a
head's own lists mask the rest) - or, without a BlockMask, the positions [0, seqlen) - are
walked in chunks of whole blocks; a chunk's positions go through the page table to pool
rows (``page * page_size + offset``) and K/V are read at those rows only (one
index_select each): the cache is never gathered into a contiguous copy. Online softmax over
the chunks, in float32 (float64 for float64 inputs); mods in global positions.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..block_states import FULL, PARTIAL
from ..evaluate import evaluate

_CHUNK_ELEMS = 1 << 21  # score elements per chunk (8 MiB of float32)


def _block_states(num, idx, full_num, full_idx, n_kv_blocks: int) -> torch.Tensor:
    """[Bm, Hm, nQ, n_kv_blocks] int8: PARTIAL / FULL where the lists name a block, else 0."""
    Bm, Hm, nQ = num.shape
    state = torch.zeros(Bm, Hm, nQ, n_kv_blocks + 1, dtype=torch.int8)
    for n, i, code in ((num, idx, PARTIAL), (full_num, full_idx, FULL)):
        if n is None:
            continue
        slots = torch.arange(i.shape[-1])
        used = slots < n.long()[..., None]
        cols = torch.where(used, i.long().clamp(0, n_kv_blocks - 1), n_kv_blocks)  # unused slots: spare column
        state.scatter_(-1, cols, torch.full(cols.shape, code, dtype=torch.int8))
    return state[..., :n_kv_blocks]


def serving_attention_cpu(q, k, v, lengths, page_table: Optional[torch.Tensor], page_size: int, score_graph,
                          mask_graph, block_mask, scale: float, queries=None):
    """(out [B, Hq, L, Ev] in q.dtype, lse [B, Hq, L] float32 / float64) of every sequence's
    last L positions; block_mask None: every position below the sequence's length.
    queries (checks.PackedQueries): q is [1, Hq, T, E] with each sequence's queries packed
    along its rows (out and lse likewise)."""
    _, Hq, L, E = q.shape
    B = len(lengths.host)
    Hkv, Ev = k.shape[1], v.shape[3]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape[0], Hq, L, Ev, dtype=cdt)
    lse = torch.full((q.shape[0], Hq, L), float("-inf"), dtype=cdt)
    if block_mask is not None:
        qb, kvb = block_mask.BLOCK_SIZE
        n_kv_blocks = block_mask.kv_indices.shape[-1]
        states = _block_states(block_mask.kv_num_blocks.cpu(), block_mask.kv_indices.cpu(),
                               None if block_mask.full_kv_num_blocks is None else block_mask.full_kv_num_blocks.cpu(),
                               None if block_mask.full_kv_indices is None else block_mask.full_kv_indices.cpu(),
                               n_kv_blocks)
    else:
        qb, kvb = L, 128
    heads = torch.arange(Hq).view(Hq, 1, 1)
    for b in range(B):
        n = lengths.host[b]
        kb, vb = (k[0], v[0]) if page_table is not None else (k[b], v[b])
        pages = page_table[b].long().cpu() if page_table is not None else None
        # this sequence's ql queries: rows row0.. of q / out / lse [qz]
        qz, row0, ql = (b, 0, L) if queries is None else (0, queries.host_starts[b], queries.host_lens[b])
        for r0 in range(0, ql, qb):
            r1 = min(ql, r0 + qb)
            if block_mask is not None:
                st = states[b if states.shape[0] > 1 else 0, :, r0 // qb]  # [Hm, nKV]
                blocks = st.amax(0).nonzero().flatten()
            else:
                st = None
                blocks = torch.arange(-(-n // kvb))
            q_rows = q[qz, :, row0 + r0:row0 + r1].to(cdt).view(Hkv, G, r1 - r0, E)
            q_idx = torch.arange(n - ql + r0, n - ql + r1).view(1, -1, 1)
            m_i = torch.full((Hq, r1 - r0), float("-inf"), dtype=cdt)
            l_i = torch.zeros(Hq, r1 - r0, dtype=cdt)
            acc = torch.zeros(Hq, r1 - r0, Ev, dtype=cdt)
            per = max(1, _CHUNK_ELEMS // (Hq * (r1 - r0) * kvb))
            for c0 in range(0, blocks.numel(), per):
                blk = blocks[c0:c0 + per]
                pos = (blk[:, None] * kvb + torch.arange(kvb)).flatten()
                pos = pos[pos < n]
                rows = pages[pos // page_size] * page_size + pos % page_size if pages is not None else pos
                rows = rows.to(kb.device)
                kc = kb.index_select(1, rows).to(cdt)  # [Hkv, c, E]: only the chunk's rows are read
                vc = vb.index_select(1, rows).to(cdt)
                s = torch.matmul(q_rows, kc.unsqueeze(1).transpose(-1, -2)).reshape(Hq, r1 - r0, -1) * scale
                kv_idx = pos.view(1, 1, -1)
                keep = torch.ones(1, 1, pos.numel(), dtype=torch.bool)
                if st is not None:
                    code = st[:, pos // kvb].unsqueeze(1)  # [Hm, 1, c]
                    keep = code == FULL
                    if mask_graph is not None:
                        keep = keep | ((code == PARTIAL) & evaluate(mask_graph, b=torch.tensor(b), h=heads,
                                                                    q_idx=q_idx, kv_idx=kv_idx))
                    else:
                        keep = keep | (code == PARTIAL)
                elif mask_graph is not None:
                    keep = evaluate(mask_graph, b=torch.tensor(b), h=heads, q_idx=q_idx, kv_idx=kv_idx)
                if score_graph is not None:
                    s = evaluate(score_graph, score=s, b=torch.tensor(b), h=heads, q_idx=q_idx, kv_idx=kv_idx,
                                 where=keep)
                s = torch.where(keep, s, float("-inf"))
                m_new = torch.maximum(m_i, s.amax(-1))
                shift = torch.where(m_new == float("-inf"), 0.0, m_new)
                alpha = torch.exp(m_i - shift)
                p = torch.exp(s - shift[..., None])
                l_i = l_i * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + torch.matmul(p.view(Hkv, G, r1 - r0, -1), vc.unsqueeze(1)).view(
                    Hq, r1 - r0, Ev)
                m_i = m_new
            empty = l_i == 0
            l_safe = torch.where(empty, 1.0, l_i)
            out[qz, :, row0 + r0:row0 + r1] = acc / l_safe[..., None]
            lse[qz, :, row0 + r0:row0 + r1] = torch.where(empty, float("-inf"), m_i + torch.log(l_safe))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dtype)
