"""Packed variable-length sequences: a BlockMask straight from ``cu_seqlens``.

FlashAttention's varlen API and MindSpore's TND layout pack a batch of sequences of
different lengths into one long sequence and describe it by cumulative lengths
``cu_seqlens = [0, len_0, len_0 + len_1, ...]`` (for queries, and optionally a different
split for keys). The attention is block diagonal: query document ``d`` sees only key
document ``d``, optionally with a causal / sliding-window band inside the document.

`create_varlen_block_mask` builds the exact `BlockMask` of that mask from the segment
boundaries, without evaluating the mask element by element:

1. per block row / column, the first and last document it touches (``searchsorted`` on the
   boundaries) - O(nQ + nKV);
2. per block (i, j), interval arithmetic on those document ranges and on the band decides
   *empty* (no common document, or the band misses the box) and *full* (one document covers
   the whole box and the band contains it) - O(nQ * nKV), vectorised;
3. the blocks that straddle a document boundary (or a gap, or the end) are never full;
   each is partial iff the band meets the sub-box of one of the documents it shares -
   checked per (block, shared document) pair, O(#boundary blocks + #documents).

No element of the mask is ever evaluated.

So the cost is linear in the number of blocks (and documents), and the result is identical to
``create_block_mask(varlen_mask_mod(...), ...)`` (the test suite checks this).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import masks as _masks
from .block_mask import BlockMask, _block_size
from .block_states import EMPTY, FULL, PARTIAL
from .trace import trace_mask

__all__ = ["create_varlen_block_mask", "varlen_mask_mod", "cu_seqlens_from_lengths"]


def cu_seqlens_from_lengths(lengths: Union[Sequence[int], torch.Tensor], device=None) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` int32 from per-sequence lengths."""
    t = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    if (t < 0).any():
        raise ValueError(f"sequence lengths must be >= 0, got {t.tolist()}")
    return torch.cat([torch.zeros(1, dtype=torch.int64), t.cumsum(0)]).to(torch.int32).to(device or "cpu")


def _bounds(causal: bool, window: Optional[Tuple[Optional[int], Optional[int]]]):
    """(lo, hi) of kv_local - q_local allowed inside a document (None = unbounded)."""
    lo = hi = None
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2):
            raise ValueError(f"window must be a (left, right) pair of ints or None, got {window!r}")
        left, right = window
        lo = None if left is None else -int(left)
        hi = None if right is None else int(right)
    if causal:
        hi = 0 if hi is None else min(hi, 0)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"the band [{lo}, {hi}] (from causal={causal}, window={window}) keeps no key")
    return lo, hi


def _inner(lo, hi):
    if lo is None and hi is None:
        return None
    if lo is None and hi == 0:
        return _masks.causal()
    return _masks._band(None if lo is None else -lo, hi, 0,
                        f"band_{_masks._fmt(None if lo is None else -lo)}_{_masks._fmt(hi)}")


def _segments(cu, used, name):
    """(starts, ends) int64 CPU tensors of each sequence from cu_seqlens and optional used lengths."""
    starts, ends = cu[:-1], cu[1:]
    if used is not None:
        u = torch.as_tensor(used).detach().to("cpu", torch.int64).reshape(-1)
        if u.numel() != starts.numel():
            raise ValueError(f"{name} has {u.numel()} entries but there are {starts.numel()} sequences")
        if (u < 0).any() or (u > ends - starts).any():
            raise ValueError(f"{name} must satisfy 0 <= used <= cu_seqlens[i+1] - cu_seqlens[i], got {u.tolist()} "
                             f"for slots of {(ends - starts).tolist()}")
        ends = starts + u
    return starts, ends


def _ids(starts, ends, total, fill):
    ids = torch.full((total,), fill, dtype=torch.int32)
    for d, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        ids[a:b] = d
    return ids


def _ids_fast(starts, ends, total, fill):
    """Document id per position (fill in gaps / past the end), vectorised."""
    pos = torch.arange(total, dtype=torch.int64)
    d = torch.searchsorted(starts, pos, right=True) - 1
    ok = (d >= 0) & (pos < ends[d.clamp(min=0)]) if starts.numel() else torch.zeros_like(pos, dtype=torch.bool)
    return torch.where(ok, d, torch.full_like(d, fill)).to(torch.int32)


def varlen_mask_mod(cu_seqlens_q, cu_seqlens_kv=None, *, causal: bool = False,
                    window: Optional[Tuple[Optional[int], Optional[int]]] = None, align: str = "top_left",
                    Q_LEN: Optional[int] = None, KV_LEN: Optional[int] = None, seqused_kv=None, device=None):
    """The mask_mod of a packed batch: same document, and inside it
    ``-left <= kv_local - q_local <= right`` (``window=(left, right)``; ``causal`` caps right at 0),
    with local positions aligned per document as in `flexattn.masks.document`.

    ``seqused_kv`` (FlashAttention's ``seqused_k``): only the first ``seqused_kv[i]`` keys of
    slot ``i`` of ``cu_seqlens_kv`` are real (padded key slots, KV caches)."""
    lo, hi = _bounds(causal, window)
    cu_q = _masks._as_cu(cu_seqlens_q, "cu_seqlens_q")
    cu_k = cu_q if cu_seqlens_kv is None else _masks._as_cu(cu_seqlens_kv, "cu_seqlens_kv")
    qs, qe = _segments(cu_q, None, "cu_seqlens_q")
    ks, ke = _segments(cu_k, seqused_kv, "seqused_kv")
    q_ids = _ids_fast(qs, qe, int(cu_q[-1]) if Q_LEN is None else int(Q_LEN), -1)
    kv_ids = _ids_fast(ks, ke, int(cu_k[-1]) if KV_LEN is None else int(KV_LEN), -2)
    if device is not None:
        q_ids, kv_ids = q_ids.to(device), kv_ids.to(device)
    return _masks.document(doc_ids=q_ids, kv_doc_ids=kv_ids, inner=_inner(lo, hi), align=align)


def _move_closure(fn, device):
    for cell in fn.__closure__ or ():
        v = cell.cell_contents
        if isinstance(v, torch.Tensor) and v.device != device:
            cell.cell_contents = v.to(device)
        elif callable(v) and getattr(v, "__closure__", None):
            _move_closure(v, device)


def create_varlen_block_mask(cu_seqlens_q, cu_seqlens_kv=None, *, causal: bool = False,
                             window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                             align: str = "top_left", Q_LEN: Optional[int] = None, KV_LEN: Optional[int] = None,
                             BLOCK_SIZE=128, seqused_kv=None, device=None):
    """Exact BlockMask ``[1, 1, Q_LEN, KV_LEN]`` of packed sequences, built from the boundaries.

    Args:
        cu_seqlens_q: ``[0, end_0, end_1, ...]`` of the packed queries (list or int tensor).
        cu_seqlens_kv: the same for the keys (default: ``cu_seqlens_q``, self-attention).
        causal: causal inside each document (with ``align``).
        window: ``(left, right)`` sliding window inside each document (None: unbounded side).
        align: ``"top_left"`` or ``"bottom_right"``: where each document's diagonal lies when
            its query and key lengths differ (see `flexattn.masks`).
        Q_LEN, KV_LEN: padded lengths of the packed tensors (default: the totals); positions
            past the last document attend to nothing.
        BLOCK_SIZE: int or (Q_BLOCK, KV_BLOCK).
        seqused_kv: per-sequence number of real keys in each slot of ``cu_seqlens_kv``
            (FlashAttention's ``seqused_k``; xFormers' padded-keys masks); the rest of the
            slot is padding no query sees.

    The returned mask's ``mask_mod`` is `varlen_mask_mod` of the same arguments, so the
    kernels evaluate the boundary blocks with it.
    """
    cu_q = _masks._as_cu(cu_seqlens_q, "cu_seqlens_q")
    cu_k = cu_q if cu_seqlens_kv is None else _masks._as_cu(cu_seqlens_kv, "cu_seqlens_kv")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q describes {len(cu_q) - 1} sequences but cu_seqlens_kv {len(cu_k) - 1}; "
                         f"they must describe the same batch")
    if align not in ("top_left", "bottom_right"):
        raise ValueError(f"align must be 'top_left' or 'bottom_right', got {align!r}")
    Tq, Tk = int(cu_q[-1]), int(cu_k[-1])
    Q_LEN = Tq if Q_LEN is None else int(Q_LEN)
    KV_LEN = Tk if KV_LEN is None else int(KV_LEN)
    if Q_LEN < Tq or KV_LEN < Tk or Q_LEN < 1 or KV_LEN < 1:
        raise ValueError(f"Q_LEN={Q_LEN} / KV_LEN={KV_LEN} must be >= 1 and cover the packed totals "
                         f"cu_seqlens_q[-1]={Tq} / cu_seqlens_kv[-1]={Tk}")
    if device is None:
        device = cu_seqlens_q.device if isinstance(cu_seqlens_q, torch.Tensor) else "cpu"
    device = torch.device(device)
    lo_b, hi_b = _bounds(causal, window)
    qb, kvb = _block_size(BLOCK_SIZE)
    mask_mod = varlen_mask_mod(cu_q, cu_k, causal=causal, window=window, align=align,
                               Q_LEN=Q_LEN, KV_LEN=KV_LEN, seqused_kv=seqused_kv, device=device)
    q_start, q_end = _segments(cu_q, None, "cu_seqlens_q")
    k_start, k_end = _segments(cu_k, seqused_kv, "seqused_kv")
    graph = trace_mask(mask_mod)

    q_start, q_end, k_start, k_end = (t.to(device) for t in (q_start, q_end, k_start, k_end))
    ndocs = len(cu_q) - 1
    nq, nkv = -(-Q_LEN // qb), -(-KV_LEN // kvb)
    big = 1 << 40
    lo_v = -big if lo_b is None else lo_b
    hi_v = big if hi_b is None else hi_b

    def block_docs(n, blk, LEN, starts, ends):
        """Per block: first/last real position, the range of documents it touches, and
        the document covering it entirely (-1 if none)."""
        first = torch.arange(n, device=device, dtype=torch.int64) * blk
        last = torch.clamp(first + blk - 1, max=LEN - 1)
        # documents d with [start_d, end_d) meeting [first, last]: end_d > first and start_d <= last
        f = torch.searchsorted(ends, first, right=True)
        l_ = torch.searchsorted(starts, last, right=True) - 1
        # the document containing `first` (if any) contains the whole block
        d0 = torch.searchsorted(starts, first, right=True) - 1
        d0c = d0.clamp(0, max(ndocs - 1, 0))
        inside = (d0 >= 0) & (first >= starts[d0c]) & (first + blk <= ends[d0c]) & (first + blk <= LEN) \
            if ndocs else torch.zeros_like(first, dtype=torch.bool)
        single_doc = torch.where(inside, d0, torch.full_like(d0, -1))
        return first, last, f, l_, single_doc

    q_first, q_last, qf, ql, q_doc = block_docs(nq, qb, Q_LEN, q_start, q_end)
    k_first, k_last, kf, kl, k_doc = block_docs(nkv, kvb, KV_LEN, k_start, k_end)
    q_single, k_single = q_doc >= 0, k_doc >= 0

    qlen_d, klen_d = q_end - q_start, k_end - k_start
    valid = ((qlen_d > 0) & (klen_d > 0)).to(torch.int64)
    prefix = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), valid.cumsum(0)])
    # Inside document d: keep iff lo <= (kv - q) - c[d] <= hi.
    shift = (klen_d - qlen_d) if align == "bottom_right" else torch.zeros_like(qlen_d)
    c = k_start - q_start + shift

    lo = torch.maximum(qf[:, None], kf[None, :])
    hi = torch.minimum(ql[:, None], kl[None, :])
    has = hi >= lo
    cnt = prefix[torch.clamp(hi + 1, 0, ndocs)] - prefix[torch.clamp(lo, 0, ndocs)]
    any_common = has & (cnt > 0)

    single = q_single[:, None] & k_single[None, :] & (q_doc[:, None] == k_doc[None, :])
    cd = c[torch.clamp(q_doc, 0, max(ndocs - 1, 0))][:, None] if ndocs else torch.zeros(nq, 1, dtype=torch.int64,
                                                                                          device=device)
    dmin = k_first[None, :] - q_last[:, None] - cd  # min of (kv - q) - c over the box
    dmax = k_last[None, :] - q_first[:, None] - cd
    band_full = (dmin >= lo_v) & (dmax <= hi_v)
    band_empty = (dmax < lo_v) | (dmin > hi_v)

    state = torch.full((nq, nkv), PARTIAL, dtype=torch.int8, device=device)
    # One document over the whole box: every difference in [dmin, dmax] occurs, so the band
    # decides the block exactly.
    state[single & band_full] = FULL
    state[~any_common | (single & band_empty)] = EMPTY
    # The rest touch several documents (or padding), so they are never full: partial iff
    # the band meets the sub-box of some common document, else empty. Enumerate the
    # (block, common document) pairs: their number is linear in the number of blocks.
    undecided = any_common & ~single
    qi, kj = torch.nonzero(undecided, as_tuple=True)
    if qi.numel():
        d_lo, d_hi = lo[qi, kj], hi[qi, kj]
        counts = d_hi - d_lo + 1
        pair = torch.repeat_interleave(torch.arange(qi.numel(), device=device), counts)
        offs = torch.arange(pair.numel(), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        d = d_lo[pair] + offs
        bq, bk = qi[pair], kj[pair]
        qa = torch.maximum(q_first[bq], q_start[d])
        qz = torch.minimum(q_last[bq], q_end[d] - 1)
        ka = torch.maximum(k_first[bk], k_start[d])
        kz = torch.minimum(k_last[bk], k_end[d] - 1)
        meets = (qa <= qz) & (ka <= kz) & ((kz - qa - c[d]) >= lo_v) & ((ka - qz - c[d]) <= hi_v)
        hit = torch.zeros(qi.numel(), dtype=torch.bool, device=device)
        hit.index_put_((pair,), meets, accumulate=True)
        state[qi, kj] = torch.where(hit, PARTIAL, EMPTY).to(torch.int8)
    return BlockMask._from_state(state[None, None], (qb, kvb), mask_mod, (Q_LEN, KV_LEN), graph)
