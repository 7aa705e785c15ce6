"""Short-query decode: split-KV forward for q_len <= DECODE_MAX_Q (a KV cache, few queries).

With few query rows the forward's grid (q tiles x heads) leaves most of the GPU idle and
the work is a memory-bound read of K and V. Here each program takes one slice (split) of a
row's kv tiles, for all query rows of one (batch, head) - or, when the BlockMask is shared
by the heads of a GQA group (its H is 1), for all query heads reading the same kv head, so
K/V are read once per kv head. Each split writes an unnormalised partial (acc, m, l); the
partials are merged by their log-sum-exp in `merge.decode_merge`. Same semantics as the forward
(mask_mod applied on every visited tile: it is true on full blocks anyway).

The shared helpers (_head_base, _block_list, _load_tile, _online_softmax) come from
`common_source`.

Holes filled by `flexattn.kernels.source.fill`: {SCORE_MOD} / {MASK_MOD} (the mods'
@triton.jit functions), {SCORE_BUF_PARAMS_TRAIL} / {MASK_BUF_PARAMS_TRAIL} (the captured
tensors' parameters in the signature, each followed by ", ") and {SCORE_BUF_ARGS} /
{MASK_BUF_ARGS} (the same names at the end of the mods' calls, each preceded by ", ").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codegen import buffer_args
from . import config, launcher
from .blocks import bm_strides, kv_lists
from .config import LOG2E, dot_precision, fit_tile, pad_dim
from .launcher import cdiv, launch_cached
from .merge import decode_merge

DECODE_MAX_Q = 16

DECODE_TEMPLATE = r'''
# Sub notation for this kernel:
#   Q_LEN / KV_LEN        query / key-value sequence lengths (runtime; KV_LEN: without SEQLENS)
#   HQ, HKV, GQA_GROUP    query heads, kv heads, query heads per kv head (HQ = HKV * GQA_GROUP)
#   PACK_GQA              one program takes every query head of a kv head (rows = position, head)
#   QK_HEAD, V_HEAD       head dims of q/k and of v; *_PAD: the power of two >= them (tl.arange)
#   BLOCK_M               rows of the program's q tile (grid axis 2 walks the q tiles)
#   BLOCK_N               the kv tile of one loop step
#   SPARSE_Q_BLOCK        the BlockMask's q block size: a q tile's positions lie in one q block
#   SPARSE_KV_BLOCK       the BlockMask's kv block size: a whole number of kv tiles
#   SPLITS                programs per row of tiles (grid axis 0): each walks a slice of the tiles
#   HAS_FULL, HAS_SCORE_MOD  the BlockMask has full blocks / a score_mod is applied
#   DOT_PRECISION         tl.dot's input_precision ("ieee", "tf32")
#   SCALE_LOG2            SCALE * log2(e)
#   HAS_SEQLENS           per-sequence kv lengths SEQLENS[b]; the queries are the last Q_LEN
#                         positions of their sequence (the mods see those global positions)
#   DENSE_KV              no block lists: the kv tiles are those of positions [0, kv length)
#   PAGE_SIZE             0: K/V are [B, HKV, S, D]; else K/V are a pool of pages of PAGE_SIZE rows
#                         (batch stride 0) and kv position n of sequence b is pool row
#                         PAGE_TABLE[b, n // PAGE_SIZE] * PAGE_SIZE + n % PAGE_SIZE
#   VARLEN_Q              packed queries of several lengths: Q is [1, HQ, Q_LEN, D] and sequence
#                         b's Q_LENS[b] queries are its rows from Q_START[b] (its last Q_LENS[b]
#                         positions; HAS_SEQLENS); its partials are rows P_START[b] on of
#                         partials of P_ROWS rows (P_START = Q_START, P_ROWS = Q_LEN unless the
#                         launch takes some of the sequences: their partials then packed apart)
#   HAS_SEQ_IDS           with VARLEN_Q: the launch takes sequences SEQ_IDS[0..] only (grid axis 1
#                         holds one entry per id): sequence index = SEQ_IDS[program's entry]
{SCORE_MOD}

{MASK_MOD}


@triton.jit
def flex_decode(Q, K, V, ACC, M_OUT, L_OUT,
                KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, PAGE_TABLE, SEQLENS, Q_START, Q_LENS, P_START, SEQ_IDS,
                stride_qz, stride_qh, stride_qm, stride_qk,
                stride_kz, stride_kh, stride_kn, stride_kk,
                stride_vz, stride_vh, stride_vn, stride_vk,
                stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
                stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim,
                stride_ptz,
                HQ, HKV, Q_LEN, KV_LEN, SCALE, SCALE_LOG2, SPLITS, P_ROWS,
                {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
                GQA_GROUP: tl.constexpr, PACK_GQA: tl.constexpr, HAS_FULL: tl.constexpr,
                HAS_SCORE_MOD: tl.constexpr,
                QK_HEAD: tl.constexpr, QK_HEAD_PAD: tl.constexpr,
                V_HEAD: tl.constexpr, V_HEAD_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPARSE_Q_BLOCK: tl.constexpr, SPARSE_KV_BLOCK: tl.constexpr,
                DOT_PRECISION: tl.constexpr, HAS_SEQLENS: tl.constexpr = False,
                DENSE_KV: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 0, VARLEN_Q: tl.constexpr = False,
                HAS_SEQ_IDS: tl.constexpr = False):
    tl.static_assert(SPARSE_KV_BLOCK % BLOCK_N == 0, "a BlockMask kv block must hold whole kv tiles")
    tl.static_assert(QK_HEAD_PAD >= QK_HEAD and (QK_HEAD_PAD & (QK_HEAD_PAD - 1)) == 0)
    tl.static_assert(V_HEAD_PAD >= V_HEAD and (V_HEAD_PAD & (V_HEAD_PAD - 1)) == 0)
    tl.static_assert(BLOCK_M >= 16 and (BLOCK_M & (BLOCK_M - 1)) == 0, "tl.dot needs >= 16 rows")
    tl.static_assert(PAGE_SIZE % BLOCK_N == 0 or BLOCK_N % PAGE_SIZE == 0,
                     "a page holds whole kv tiles or a kv tile whole pages")
    tl.static_assert(not DENSE_KV or HAS_SEQLENS, "DENSE_KV walks the kv length of each sequence")
    tl.static_assert(not VARLEN_Q or HAS_SEQLENS, "packed queries are the last positions of their sequence")
    tl.static_assert(not HAS_SEQ_IDS or VARLEN_Q, "a launch over some sequences takes packed queries")
    MULT: tl.constexpr = SPARSE_KV_BLOCK // BLOCK_N
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_s = tl.program_id(0)
    pid_zh = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GQA:  # rows = (query position, query head in the group): a tile holds whole positions
        off_z = pid_zh // HKV
        off_hkv = pid_zh % HKV
        h0 = off_hkv * GQA_GROUP
        off_h = h0 + rows % GQA_GROUP
        q_pos = rows // GQA_GROUP
        first_pos = pid_m * (BLOCK_M // GQA_GROUP)
    else:
        off_z = pid_zh // HQ
        h0 = pid_zh % HQ
        off_hkv = h0 // GQA_GROUP
        off_h = h0 + rows * 0
        q_pos = rows
        first_pos = pid_m * BLOCK_M
    if HAS_SEQ_IDS:
        off_z = tl.load(SEQ_IDS + off_z)
    # this sequence's queries: seq_q_len of them, from row row0 of Q's batch q_z
    if VARLEN_Q:
        seq_q_len = tl.load(Q_LENS + off_z)
        row0 = tl.load(Q_START + off_z)
        prow0 = tl.load(P_START + off_z)
        q_z = 0
    else:
        seq_q_len = Q_LEN
        row0 = 0
        prow0 = 0
        q_z = off_z
    row_ok = q_pos < seq_q_len
    off_h = tl.where(row_ok, off_h, h0)
    q_pos = tl.where(row_ok, q_pos, 0)
    if HAS_SEQLENS:  # this sequence's kv length; its queries are its last seq_q_len positions
        kv_len = tl.load(SEQLENS + off_z)
        q_off = kv_len - seq_q_len
    else:
        kv_len = KV_LEN
        q_off = 0
    offs_d = tl.arange(0, QK_HEAD_PAD)
    offs_dv = tl.arange(0, V_HEAD_PAD)
    q_ptrs = _head_base(Q, q_z, off_h[:, None], stride_qz, stride_qh) \
        + (row0 + q_pos[:, None]).to(tl.int64) * stride_qm + offs_d[None, :] * stride_qk
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < QK_HEAD), other=0.0)
    k_base = _head_base(K, off_z, off_hkv, stride_kz, stride_kh)
    v_base = _head_base(V, off_z, off_hkv, stride_vz, stride_vh)
    pt_row = PAGE_TABLE + off_z.to(tl.int64) * stride_ptz

    # the tile's kv tiles: partial blocks then full blocks of its q block row
    sparse_m = first_pos // SPARSE_Q_BLOCK
    if DENSE_KV:
        n_part = 0
        idx_ptr = KV_IDX
        fidx_ptr = KV_IDX
        n_tiles = tl.cdiv(kv_len, BLOCK_N)
    else:
        n_part, idx_ptr = _block_list(KV_NUM, KV_IDX, off_z, h0, sparse_m,
                                      stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im)
        n_full = 0
        fidx_ptr = idx_ptr
        if HAS_FULL:
            n_full, fidx_ptr = _block_list(FULL_KV_NUM, FULL_KV_IDX, off_z, h0, sparse_m,
                                           stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim)
        n_tiles = (n_part + n_full) * MULT
    if VARLEN_Q:  # a q tile past this sequence's queries (a shorter one than the longest): no work
        n_tiles = tl.where(first_pos < seq_q_len, n_tiles, 0)
    per = tl.cdiv(n_tiles, SPLITS)
    lo = pid_s * per
    hi = tl.minimum(lo + per, n_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_HEAD_PAD], dtype=tl.float32)
    q_idx = q_off + q_pos[:, None]
    h_tile = off_h[:, None]
    offs_n0 = tl.arange(0, BLOCK_N)
    for it in range(lo, hi):
        if DENSE_KV:
            start_n = it * BLOCK_N
        else:
            # tile `it` of the partial blocks followed by the full ones (_tile_start's walk
            # over one list, here over two: the full list's load is masked below its start)
            j = it // MULT
            is_part = j < n_part
            blk_p = tl.load(idx_ptr + j, mask=is_part, other=0)
            blk_f = tl.load(fidx_ptr + (j - n_part), mask=j >= n_part, other=0)
            blk = tl.where(is_part, blk_p, blk_f)
            start_n = blk * SPARSE_KV_BLOCK + (it % MULT) * BLOCK_N
        offs_n = start_n + offs_n0
        n_ok = offs_n < kv_len
        # the tile's rows in K/V: its positions, or their pool rows through the page table
        # (one page per tile when pages hold whole tiles; past the kv length: page 0, unread)
        if PAGE_SIZE >= BLOCK_N:
            page = tl.load(pt_row + start_n // PAGE_SIZE, mask=start_n < kv_len, other=0)
            kv_rows = page.to(tl.int64) * PAGE_SIZE + (start_n % PAGE_SIZE) + offs_n0
        elif PAGE_SIZE > 0:
            PAGES: tl.constexpr = BLOCK_N // PAGE_SIZE
            first = start_n // PAGE_SIZE + tl.arange(0, PAGES)
            pages = tl.load(pt_row + first, mask=first * PAGE_SIZE < kv_len, other=0)
            kv_rows = tl.reshape(pages[:, None] * PAGE_SIZE + tl.arange(0, PAGE_SIZE)[None, :], (BLOCK_N,))
        else:
            kv_rows = offs_n
        k = _load_at(_tile_ptrs(k_base, kv_rows, offs_d, stride_kn, stride_kk, OFFS_64=True), offs_n, offs_d,
                     kv_len, CHECK_R=True, C=QK_HEAD, C_PAD=QK_HEAD_PAD)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        kv_idx = offs_n[None, :]
        if HAS_SCORE_MOD:
            s = score_mod(qk * SCALE, off_z, h_tile, q_idx, kv_idx{SCORE_BUF_ARGS}) * LOG2E
        else:
            s = qk * SCALE_LOG2
        keep = mask_mod(off_z, h_tile, q_idx, kv_idx{MASK_BUF_ARGS}) & n_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        # s is in the log2 domain already: TO_LOG2 = 1
        m_i, alpha, p, l_i = _online_softmax(m_i, l_i, s, 1.0, FINITE=False)
        v = _load_at(_tile_ptrs(v_base, kv_rows, offs_dv, stride_vn, stride_vk, OFFS_64=True), offs_n, offs_dv,
                     kv_len, CHECK_R=True, C=V_HEAD, C_PAD=V_HEAD_PAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

    # partials: [B (1 with VARLEN_Q), HQ, SPLITS, P_ROWS, ...] (contiguous), unnormalised
    part = ((q_z * HQ + off_h).to(tl.int64) * SPLITS + pid_s) * P_ROWS + prow0 + q_pos
    tl.store(M_OUT + part, m_i, mask=row_ok)
    tl.store(L_OUT + part, l_i, mask=row_ok)
    tl.store(ACC + part[:, None] * V_HEAD + offs_dv[None, :], acc,
             mask=row_ok[:, None] & (offs_dv[None, :] < V_HEAD))
'''


def use_decode(plan, q, v) -> bool:
    o = plan.opts
    force = o.get("FORCE_DECODE")
    if o.get("FORCE_USE_FLEX_ATTENTION") or force is False or plan.dropout_p > 0:
        return False
    L = q.shape[2]
    if force:
        return L <= 64
    return L <= DECODE_MAX_Q and v.shape[2] >= 256


def decode_forward(plan, q, k, v):
    """Launch the split-KV decode kernel and merge its partials -> (out, lse[, max_scores]) as
    flex_forward."""
    B, Hq, L, E = q.shape
    Hkv = v.shape[1]
    G = Hq // Hkv
    blk = plan.blocks
    o = plan.opts
    # pack the GQA group when its heads share the block lists (BlockMask H of 1)
    pack = G > 1 and blk.kv_num.stride(1) == 0 and G * L <= 128
    rows = G * L if pack else L
    block_n = fit_tile(o.get("decode_BLOCK_N", 64 if q.device.type == "cuda" else 32), blk.block[1], blk.block[1])
    base = B * (Hkv if pack else Hq)
    max_tiles = blk.kv_idx.shape[-1] * (blk.block[1] // block_n)
    splits = o.get("decode_SPLITS", max(1, min(cdiv(2 * launcher.sm_count(q.device), base), max_tiles, 64)))
    # one q tile holds every query row (all in q block 0)
    cfg = SplitConfig(pack, pad_dim(rows), block_n, 1, splits, o.get("decode_num_warps", 4),
                      o.get("decode_num_stages", 3 if config.device_key(q.device) != "interp" else 1))
    return split_kv_forward(plan, q, k, v, cfg)


@dataclass(frozen=True)
class SplitConfig:
    """How split_kv_forward cuts the work: GQA packing, tiles, q tiles, kv splits, warps, stages."""
    pack: bool
    block_m: int
    block_n: int
    q_tiles: int
    splits: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KVLayout:
    """Where the kernel finds a sequence's K/V rows (split_kv_forward's `layout`).

    seqlens: int32 [B], each sequence's kv length (None: every sequence has K/V's length);
    the queries are then the last Q_LEN positions of their sequence. page_size 0: K/V are
    [B, Hkv, S, D]; else K/V are a pool [1, Hkv, num_pages * page_size, D] read through
    page_table (int32 [B, pages per sequence]). dense: walk positions [0, seqlen) without
    block lists (there is no BlockMask). q_starts / q_lens: int32 [B], packed queries of
    several lengths: q is [1, Hq, T, E] and sequence b's q_lens[b] queries (its last
    positions) are its rows from q_starts[b] (needs seqlens). p_starts / p_rows: with
    q_lens, the results packed apart: sequence b's rows of out / lse are rows p_starts[b]
    on of p_rows. seq_ids: int32, with q_lens, the launch takes these sequences only."""
    seqlens: torch.Tensor | None = None
    page_table: torch.Tensor | None = None
    page_size: int = 0
    dense: bool = False
    q_starts: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None
    p_starts: torch.Tensor | None = None
    p_rows: int = 0
    seq_ids: torch.Tensor | None = None


def split_kv_forward(plan, q, k, v, cfg: SplitConfig, layout: KVLayout = KVLayout()):
    """Launch flex_decode on grid (splits, B * heads, q tiles) and merge its partials ->
    (out [B, Hq, L, Ev] in q.dtype, lse [B, Hq, L] float32, natural log), and max_scores
    [B, Hq, L] float32 when plan.output_max; with packed queries (layout.q_lens) B is the
    number of sequences and out / lse / max_scores are packed like q (or as layout.p_starts
    says: then L is layout.p_rows)."""
    Bq, Hq, L, E = q.shape
    Hkv, S, Ev = v.shape[1], v.shape[2], v.shape[3]
    varlen = layout.q_lens is not None
    B = layout.seq_ids.numel() if layout.seq_ids is not None else layout.q_lens.numel() if varlen else Bq
    blk = plan.blocks
    splits = cfg.splits
    rows = layout.p_rows if layout.p_starts is not None else L  # of the partials and the results
    acc = torch.empty(Bq, Hq, splits, rows, Ev, dtype=torch.float32, device=q.device)
    m = torch.empty(Bq, Hq, splits, rows, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    mod = plan.module("decode")
    kv_num, kv_idx, full_num, full_idx = kv_lists(blk)
    seqlens = layout.seqlens if layout.seqlens is not None else kv_num
    table = layout.page_table if layout.page_table is not None else kv_num
    stride_ptz = layout.page_table.stride(0) if layout.page_table is not None else 0
    base = B * (Hkv if cfg.pack else Hq)
    k_strides, v_strides = list(k.stride()), list(v.stride())
    if layout.page_size:  # one pool for every sequence
        k_strides[0] = v_strides[0] = 0
    launch_cached(mod.flex_decode, (splits, base, cfg.q_tiles), (
        q, k, v, acc, m, l, kv_num, kv_idx, full_num, full_idx, table, seqlens,
        layout.q_starts if varlen else seqlens, layout.q_lens if varlen else seqlens,
        layout.p_starts if layout.p_starts is not None else layout.q_starts if varlen else seqlens,
        layout.seq_ids if layout.seq_ids is not None else seqlens,
        *q.stride(), *k_strides, *v_strides,
        *bm_strides(kv_num, kv_idx), *bm_strides(full_num, full_idx), stride_ptz,
        Hq, Hkv, L, S, plan.scale, plan.scale * LOG2E, splits, rows,
        *buffer_args(plan.score_graph, plan.score_bufs), *buffer_args(plan.mask_graph, plan.mask_bufs)),
        dict(GQA_GROUP=Hq // Hkv, PACK_GQA=cfg.pack, HAS_FULL=blk.has_full and not layout.dense,
             HAS_SCORE_MOD=plan.score_graph is not None,
             QK_HEAD=E, QK_HEAD_PAD=pad_dim(E), V_HEAD=Ev, V_HEAD_PAD=pad_dim(Ev),
             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPARSE_Q_BLOCK=blk.block[0], SPARSE_KV_BLOCK=blk.block[1],
             DOT_PRECISION=dot_precision(q.dtype, plan.opts), HAS_SEQLENS=layout.seqlens is not None,
             DENSE_KV=layout.dense, PAGE_SIZE=layout.page_size, VARLEN_Q=varlen, HAS_SEQ_IDS=layout.seq_ids is not None,
             num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return decode_merge(acc, m, l, q.dtype, plan.output_max)
