"""Forward kernel: block-sparse online softmax (exp2 domain) over the BlockMask.

One program computes BLOCK_M query rows of one (batch, query head). It walks the row's
partial kv blocks (mask_mod applied) and then its full kv blocks (mask_mod skipped);
empty blocks are never visited. A BlockMask block may hold several kernel tiles
(SPARSE_KV_BLOCK = MULT * BLOCK_N): the loop runs over tiles and reads each tile's block
index two tiles ahead (so the pipelined K/V prefetch never waits on it). Masks are
constexpr-conditional: none on the head dim when it is a power of two, none on the kv axis
in full blocks or when the lengths divide the block; in-head offsets are int32 unless a
head's K/V span passes 2^31 elements (OFFS_64). The shared helpers (_head_base,
_block_list, _tile_start, _load_tile, _online_softmax) come from `common_source`.

Holes filled by `flexattn.kernels.source.fill`: {SCORE_MOD} / {MASK_MOD} (the `score_mod`
and `mask_mod` @triton.jit functions printed by `flexattn.codegen`), and the captured
tensors' pointer / stride / size parameters of each: {SCORE_BUF_PARAMS_TRAIL} /
{MASK_BUF_PARAMS_TRAIL} in a signature, {SCORE_BUF_ARGS_TRAIL} / {MASK_BUF_ARGS_TRAIL} in a
call (each name followed by ", "), {SCORE_BUF_ARGS} / {MASK_BUF_ARGS} at the end of the
mods' calls (each name preceded by ", ").
"""
from __future__ import annotations

import torch

from ..codegen import buffer_args
from . import config, launcher
from .blocks import bm_strides, kv_lists
from .config import LOG2E, dot_precision, dropout_args, fit_tile, needs_i64, pad_dim
from .launcher import cdiv

FWD_TEMPLATE = r'''
# Sub notation for this kernel:
#   Q_LEN / KV_LEN        query / key-value sequence lengths (runtime)
#   HQ, GQA_GROUP         query heads; query heads per kv head (kv head = query head // GQA_GROUP)
#   QK_HEAD, V_HEAD       head dims of q/k and of v; *_PAD: the power of two >= them (tl.arange)
#   BLOCK_M, BLOCK_N      the kernel's q tile (one program) and kv tile (one loop step)
#   SPARSE_Q_BLOCK, SPARSE_KV_BLOCK  the BlockMask's block sizes: whole numbers of tiles
#   HAS_FULL              the BlockMask has full blocks (walked second, mask_mod skipped)
#   IS_FULL               (_fwd_tiles) the walked blocks are the full ones
#   HAS_SCORE_MOD, HAS_DROPOUT, OUTPUT_LSE  what the kernel computes besides softmax(qk)v
#   OUTPUT_MAX            also store each row's max score (natural units) to MAX
#   Q_DIVISIBLE / KV_DIVISIBLE  Q_LEN / KV_LEN divide the tiles: no bounds masks on that axis
#   DOT_PRECISION         tl.dot's input_precision ("ieee", "tf32")
#   OFFS_64               in-head K/V offsets in int64 (a head's span passes 2^31 elements)
#   SCALE_POSITIVE        SCALE > 0: the scale may wait for the exp2 (see _online_softmax)
#   SCALE_LOG2            SCALE * log2(e); DROP_SCALE: 1 / (1 - dropout p)
from flexattn.dropout import dropout_keep_triton

{SCORE_MOD}

{MASK_MOD}


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, idx_ptr, n_blocks,
               off_z, off_h, offs_m, KV_LEN, SCALE, SCALE_LOG2,
               stride_kn, stride_kk, stride_vn, stride_vk,
               seed_lo, seed_hi, drop_threshold,
               {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
               IS_FULL: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               QK_HEAD: tl.constexpr, QK_HEAD_PAD: tl.constexpr,
               V_HEAD: tl.constexpr, V_HEAD_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_KV_BLOCK: tl.constexpr,
               KV_DIVISIBLE: tl.constexpr, DOT_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
               SCALE_POSITIVE: tl.constexpr):
    MULT: tl.constexpr = SPARSE_KV_BLOCK // BLOCK_N
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, QK_HEAD_PAD)
    offs_dv = tl.arange(0, V_HEAD_PAD)
    q_idx = offs_m[:, None]
    # full blocks never hold padding (an edge block is never full): no bounds check there;
    # head-dim masks only when the head dim is padded to a power of two
    CHECK_N: tl.constexpr = not IS_FULL and not KV_DIVISIBLE
    # the block index is read two tiles ahead, so the address of the tile the pipeline
    # prefetches never waits on a load of the index list
    nxt = _tile_start(idx_ptr, 0, n_blocks, SPARSE_BLOCK=SPARSE_KV_BLOCK, BLOCK=BLOCK_N)
    for it in range(0, n_blocks * MULT):
        start_n = nxt
        nxt = _tile_start(idx_ptr, it + 1, n_blocks, SPARSE_BLOCK=SPARSE_KV_BLOCK, BLOCK=BLOCK_N)
        offs_n = start_n + offs_n0
        # both tiles' addresses first, v's load after the softmax: the order the loop was
        # scheduled in (addresses computed at v's load cost 2 instructions in the causal loop)
        k_ptrs = _tile_ptrs(k_base, offs_n, offs_d, stride_kn, stride_kk, OFFS_64=OFFS_64)
        v_ptrs = _tile_ptrs(v_base, offs_n, offs_dv, stride_vn, stride_vk, OFFS_64=OFFS_64)
        k = _load_at(k_ptrs, offs_n, offs_d, KV_LEN, CHECK_R=CHECK_N, C=QK_HEAD, C_PAD=QK_HEAD_PAD)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        kv_idx = offs_n[None, :]
        # t * TO_LOG2 is the score in the log2 domain (_online_softmax applies TO_LOG2)
        if HAS_SCORE_MOD:
            t = score_mod(qk * SCALE, off_z, off_h, q_idx, kv_idx{SCORE_BUF_ARGS})
            TO_LOG2 = LOG2E
        elif SCALE_POSITIVE:
            t = qk
            TO_LOG2 = SCALE_LOG2
        else:  # a scale <= 0 reverses the max (and 0 * -inf is NaN): scale first
            t = qk * SCALE_LOG2
            TO_LOG2 = 1.0
        if not IS_FULL:
            keep = mask_mod(off_z, off_h, q_idx, kv_idx{MASK_BUF_ARGS})
            if not KV_DIVISIBLE:
                keep = keep & (kv_idx < KV_LEN)
            t = tl.where(keep, t, float("-inf"))
        # on a full block without a score_mod every score is finite
        m_i, alpha, p, l_i = _online_softmax(m_i, l_i, t, TO_LOG2, FINITE=IS_FULL and not HAS_SCORE_MOD)
        if HAS_DROPOUT:
            p = tl.where(dropout_keep_triton(seed_lo, seed_hi, drop_threshold, off_z, off_h, q_idx, kv_idx), p, 0.0)
        v = _load_at(v_ptrs, offs_n, offs_dv, KV_LEN, CHECK_R=CHECK_N, C=V_HEAD, C_PAD=V_HEAD_PAD)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def flex_fwd(Q, K, V, OUT, LSE, MAX,
             KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
             stride_qz, stride_qh, stride_qm, stride_qk,
             stride_kz, stride_kh, stride_kn, stride_kk,
             stride_vz, stride_vh, stride_vn, stride_vk,
             stride_oz, stride_oh, stride_om, stride_ok,
             stride_nz, stride_nh, stride_nm,
             stride_iz, stride_ih, stride_im,
             stride_fnz, stride_fnh, stride_fnm,
             stride_fiz, stride_fih, stride_fim,
             HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2, DROP_SCALE,
             seed_lo, seed_hi, drop_threshold,
             {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
             GQA_GROUP: tl.constexpr, HAS_FULL: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, OUTPUT_LSE: tl.constexpr,
             QK_HEAD: tl.constexpr, QK_HEAD_PAD: tl.constexpr,
             V_HEAD: tl.constexpr, V_HEAD_PAD: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             SPARSE_Q_BLOCK: tl.constexpr, SPARSE_KV_BLOCK: tl.constexpr,
             Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
             OFFS_64: tl.constexpr = True, SCALE_POSITIVE: tl.constexpr = False,
             OUTPUT_MAX: tl.constexpr = False):
    tl.static_assert(SPARSE_Q_BLOCK % BLOCK_M == 0, "a q tile must lie in one BlockMask q block")
    tl.static_assert(SPARSE_KV_BLOCK % BLOCK_N == 0, "a BlockMask kv block must hold whole kv tiles")
    tl.static_assert(QK_HEAD_PAD >= QK_HEAD and (QK_HEAD_PAD & (QK_HEAD_PAD - 1)) == 0)
    tl.static_assert(V_HEAD_PAD >= V_HEAD and (V_HEAD_PAD & (V_HEAD_PAD - 1)) == 0)
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    off_z = pid_zh // HQ
    off_h = pid_zh % HQ
    off_hkv = off_h // GQA_GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, QK_HEAD_PAD)
    offs_dv = tl.arange(0, V_HEAD_PAD)

    q_base = _head_base(Q, off_z, off_h, stride_qz, stride_qh)
    k_base = _head_base(K, off_z, off_hkv, stride_kz, stride_kh)
    v_base = _head_base(V, off_z, off_hkv, stride_vz, stride_vh)

    # q stays in registers throughout
    q = _load_tile(q_base, offs_m, offs_d, stride_qm, stride_qk, Q_LEN,
                   CHECK_R=not Q_DIVISIBLE, C=QK_HEAD, C_PAD=QK_HEAD_PAD, OFFS_64=True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_HEAD_PAD], dtype=tl.float32)

    sparse_m = start_m // SPARSE_Q_BLOCK
    n_part, idx_ptr = _block_list(KV_NUM, KV_IDX, off_z, off_h, sparse_m,
                                  stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, idx_ptr, n_part,
                               off_z, off_h, offs_m, KV_LEN, SCALE, SCALE_LOG2,
                               stride_kn, stride_kk, stride_vn, stride_vk,
                               seed_lo, seed_hi, drop_threshold,
                               {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                               IS_FULL=False, HAS_SCORE_MOD=HAS_SCORE_MOD, HAS_DROPOUT=HAS_DROPOUT,
                               QK_HEAD=QK_HEAD, QK_HEAD_PAD=QK_HEAD_PAD, V_HEAD=V_HEAD, V_HEAD_PAD=V_HEAD_PAD,
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPARSE_KV_BLOCK=SPARSE_KV_BLOCK,
                               KV_DIVISIBLE=KV_DIVISIBLE, DOT_PRECISION=DOT_PRECISION, OFFS_64=OFFS_64,
                               SCALE_POSITIVE=SCALE_POSITIVE)
    if HAS_FULL:
        n_full, fidx_ptr = _block_list(FULL_KV_NUM, FULL_KV_IDX, off_z, off_h, sparse_m,
                                       stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, fidx_ptr, n_full,
                                   off_z, off_h, offs_m, KV_LEN, SCALE, SCALE_LOG2,
                                   stride_kn, stride_kk, stride_vn, stride_vk,
                                   seed_lo, seed_hi, drop_threshold,
                                   {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                                   IS_FULL=True, HAS_SCORE_MOD=HAS_SCORE_MOD, HAS_DROPOUT=HAS_DROPOUT,
                                   QK_HEAD=QK_HEAD, QK_HEAD_PAD=QK_HEAD_PAD, V_HEAD=V_HEAD, V_HEAD_PAD=V_HEAD_PAD,
                                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPARSE_KV_BLOCK=SPARSE_KV_BLOCK,
                                   KV_DIVISIBLE=KV_DIVISIBLE, DOT_PRECISION=DOT_PRECISION, OFFS_64=OFFS_64,
                                   SCALE_POSITIVE=SCALE_POSITIVE)

    # fully masked rows (l == 0): output 0 and lse -inf, never NaN
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc * (DROP_SCALE / l_safe)[:, None]
    _store_tile(_head_base(OUT, off_z, off_h, stride_oz, stride_oh), offs_m, offs_dv, stride_om, stride_ok, Q_LEN,
                acc.to(OUT.dtype.element_ty), CHECK_R=not Q_DIVISIBLE, C=V_HEAD, C_PAD=V_HEAD_PAD, OFFS_64=True)
    LN2: tl.constexpr = 0.6931471805599453
    if OUTPUT_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
        lse_ptr = LSE + pid_zh.to(tl.int64) * Q_LEN + offs_m
        if Q_DIVISIBLE:
            tl.store(lse_ptr, lse)
        else:
            tl.store(lse_ptr, lse, mask=offs_m < Q_LEN)
    if OUTPUT_MAX:  # m_i is in the log2 domain; -inf on fully masked rows
        max_ptr = MAX + pid_zh.to(tl.int64) * Q_LEN + offs_m
        if Q_DIVISIBLE:
            tl.store(max_ptr, m_i * LN2)
        else:
            tl.store(max_ptr, m_i * LN2, mask=offs_m < Q_LEN)
'''


def fwd_config(plan, q, k, v, base=None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): `base` (default: config.default_fwd_config)
    with the keys given in kernel_options applied and the tiles fitted to the BlockMask."""
    o = plan.opts
    dm, dn, dw, ds = base or config.default_fwd_config(q.device, q.dtype, q.shape[-1], v.shape[-1])
    bm = fit_tile(o.get("BLOCK_M", dm), plan.blocks.block[0], q.shape[2])
    bn = fit_tile(o.get("BLOCK_N", dn), plan.blocks.block[1], v.shape[2])
    return bm, bn, o.get("num_warps", dw), o.get("num_stages", ds)


def fwd_launch_key(mod, q, v, cfg) -> tuple:
    """The key under which launcher.launch remembers a shared-memory fallback of this launch."""
    return ("fwd", id(mod), q.dtype, q.shape[-1], v.shape[-1], *cfg)


def flex_forward(plan, q, k, v, cfg=None):
    """Launch the forward -> (out [B, Hq, L, Ev] in q.dtype, lse [B, Hq, L] float32, natural
    log), and max_scores [B, Hq, L] float32 when plan.output_max. cfg: (BLOCK_M, BLOCK_N,
    num_warps, num_stages), default fwd_config."""
    B, Hq, L, E = q.shape
    _, Hkv, S, Ev = v.shape
    cfg = cfg or fwd_config(plan, q, k, v)
    bm_, bn_, warps, stages = cfg
    blk = plan.blocks
    out = torch.empty(B, Hq, L, Ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    mx = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device) if plan.output_max else None
    mod = plan.module("fwd")
    kv_num, kv_idx, full_num, full_idx = kv_lists(blk)
    drop_scale, lo, hi, thr = dropout_args(plan)
    grid = (cdiv(L, bm_), B * Hq)
    args = (
        q, k, v, out, lse, lse if mx is None else mx, kv_num, kv_idx, full_num, full_idx,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *bm_strides(kv_num, kv_idx), *bm_strides(full_num, full_idx),
        Hq, L, S, plan.scale, plan.scale * LOG2E, drop_scale, lo, hi, thr,
        *buffer_args(plan.score_graph, plan.score_bufs), *buffer_args(plan.mask_graph, plan.mask_bufs))
    kwargs = dict(
        GQA_GROUP=Hq // Hkv, HAS_FULL=blk.has_full, HAS_SCORE_MOD=plan.score_graph is not None,
        HAS_DROPOUT=plan.dropout_p > 0, OUTPUT_LSE=True,
        QK_HEAD=E, QK_HEAD_PAD=pad_dim(E), V_HEAD=Ev, V_HEAD_PAD=pad_dim(Ev),
        BLOCK_M=bm_, BLOCK_N=bn_, SPARSE_Q_BLOCK=blk.block[0], SPARSE_KV_BLOCK=blk.block[1],
        Q_DIVISIBLE=L % blk.block[0] == 0, KV_DIVISIBLE=S % blk.block[1] == 0,
        DOT_PRECISION=dot_precision(q.dtype, plan.opts), OFFS_64=needs_i64(k, v),
        SCALE_POSITIVE=plan.scale > 0, OUTPUT_MAX=mx is not None, num_warps=warps, num_stages=stages)
    launcher.launch(mod.flex_fwd, grid, args, kwargs, fwd_launch_key(mod, q, v, cfg))
    return (out, lse) if mx is None else (out, lse, mx)
