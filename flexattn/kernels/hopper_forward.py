"""Hopper (sm90) forward kernel in Gluon: TMA loads by a producer warp, asynchronous wgmma,
the online softmax of one tile overlapping the P V wgmma of the one before.

The same block-sparse walk as the Triton forward (`forward.py`): one program owns BLOCK_M
query rows of one (batch, query head); it visits the row's partial kv blocks (mask_mod
applied) and then its full kv blocks (mask_mod skipped); empty blocks are never loaded.

Partitions (gl.warp_specialize):
  * producer, 1 warp: reads the BlockMask index lists and issues the TMA loads of each K
    and V tile into a STAGES-deep ring of shared-memory slots. K and V of a slot have
    their own `k_ready` / `v_ready` barriers, so QK^T starts before V has landed, and their
    own `k_empty` / `v_empty`: a slot's K is refilled once the S wgmmas that read it are
    done, a tile before its V (read by P V one step later) is.
  * consumer (the default partition), num_warps warps = num_warps // 4 warpgroups that
    split BLOCK_M rows: S = Q K^T by wgmma from shared memory, score_mod / mask_mod on S in
    registers, online softmax in the exp2 domain, O += P V by wgmma with P from registers.
    Each iteration issues S of tile t and then P V of tile t-1, waits for S alone, and runs
    the softmax of tile t while P V of tile t-1 is still on the tensor cores. A row's
    running max lags its true max by up to RESCALE_SLACK (log2 units), so O is rescaled only
    on tiles where some row's max grew by more (lse stays exact; a call that returns the row
    maxima keeps the exact max instead).
  * PINGPONG (kernel_options "fwd_PINGPONG", default True: PINGPONG_DEFAULT):
    the two warpgroups are two partitions of BLOCK_M / 2 rows each, with their own Q and O,
    and they take turns to issue their wgmmas (two mbarriers pass the turn), so that one's
    softmax runs while the tensor cores run the other's S and P V (FA3's ping-pong schedule).
    240 registers a consumer thread, no spills (sm_90a).
  * PERSISTENT (kernel_options "fwd_PERSISTENT", default: persistent_default), ping-pong only:
    one program an SM. The producer takes row blocks from a counter in global memory and hands
    each to the two consumer partitions through two slots (mbarriers `tile_ready` /
    `tile_empty`); the ring's tile count and the partitions' turns run on across row blocks,
    so a block's first K / V loads go on under the previous block's last P V and epilogue.

Glossary of constexpr names:
  BLOCK_M / BLOCK_N       query rows per program / kv columns per tile
  SPARSE_Q_BLOCK / SPARSE_KV_BLOCK   the BlockMask's block sizes (multiples of the tiles)
  QK_HEAD / V_HEAD        the descriptors' box widths: head dims of q,k and of v rounded up
                          to a power of two (QK_HEAD_PAD / V_HEAD_PAD / FP16 restate the
                          descriptors' static shape and dtype for the host's launch cache)
  STAGES                  K/V ring depth
  LAST_ROWS_FIRST         program 0 takes the last query rows
  GQA_GROUP               query heads per kv head
  HAS_FULL / HAS_SCORE_MOD   full-block lists present / a score_mod to apply
  KV_DIVISIBLE            KV_LEN is a multiple of SPARSE_KV_BLOCK (no tile holds padding)
  SCALE_POSITIVE          scale > 0: the row max may be taken before scaling
  PINGPONG / SIDE         two consumer partitions taking turns / which half of the rows (0, 1)
  PERSISTENT              one program an SM walking row blocks (TILES: its counter and hand-over
                          slots; N_TILES row blocks in all; SECTION heads side by side: _tile_rows)

The tile walk (`_tile_start`) and the online-softmax step (`_online_softmax`) are the Triton
kernels' own, from common_source (prepended to this template too): a @triton.jit function
called from a Gluon kernel compiles with the layouts of the tensors it is given.

K, V, Q and O are read and written through rank-4 TMA descriptors over [B, H, S, D]: a
tile past the end of a head is zero-filled on load and clipped on store, never read from
or written into the next head.

Holes filled by `flexattn.codegen`: {SCORE_MOD} / {MASK_MOD} and the captured tensors'
parameter lists {SCORE_BUF_PARAMS_TRAIL} / {MASK_BUF_PARAMS_TRAIL}, passed on by
{SCORE_BUF_ARGS_TRAIL} / {MASK_BUF_ARGS_TRAIL} and into the mods by {SCORE_BUF_ARGS} /
{MASK_BUF_ARGS}.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..codegen import buffer_args
from ..ir import ROW_OPS
from . import launcher
from .blocks import bm_strides, kv_lists
from .config import LOG2E
from .launcher import cdiv, next_pow2

# The Gluon templates' common head (this one's and hopper_backward's): imports, the names of
# Triton calls that moved between versions, and the producer warp's loads of a block list.
GLUON_PRELUDE = r'''
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

# the TMA copies are tma.async_load / async_store from Triton 3.9 on (the older names raise there)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
# a barrier of the partition's threads: gl.barrier in newer Triton (3.8), gl.thread_barrier in 3.6
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _load_list(a_desc, b_desc, a_ring, b_ring, a_ready, b_ready, a_empty, b_empty, idx_ptr, n_blocks, off_z, off_h,
               it, SPARSE_BLOCK: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr):
    # For every tile of BLOCK rows in the n_blocks blocks of one list, TMA-load the tile of
    # two tensors (K and V, or q and dO) into slot it % STAGES of their rings, each once its
    # ring's `empty` barrier says the slot is free (the two may be one barrier); each ring
    # has its own ready barrier. Returns `it` past the list.
    MULT: gl.constexpr = SPARSE_BLOCK // BLOCK
    for t in range(n_blocks * MULT):
        start = _tile_start(idx_ptr, t, n_blocks, SPARSE_BLOCK, BLOCK)
        s = it % STAGES
        # a fresh barrier counts as having completed the phase before 0: the first
        # STAGES waits pass at once
        mbarrier.wait(a_empty.index(s), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(a_ready.index(s), a_desc.block_type.nbytes)
        _tma_load(a_desc, [off_z, off_h, start, 0], a_ready.index(s), a_ring.index(s).reshape(a_desc.block_type.shape))
        mbarrier.wait(b_empty.index(s), ((it // STAGES) & 1) ^ 1)
        mbarrier.expect(b_ready.index(s), b_desc.block_type.nbytes)
        _tma_load(b_desc, [off_z, off_h, start, 0], b_ready.index(s), b_ring.index(s).reshape(b_desc.block_type.shape))
        it += 1
    return it
'''

HOPPER_FWD_TEMPLATE = GLUON_PRELUDE + r'''
{SCORE_MOD}

{MASK_MOD}


@gluon.jit
def _producer(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
              idx_ptr, n_part, fidx_ptr, n_full, off_z, off_hkv,
              HAS_FULL: gl.constexpr, SPARSE_KV_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, it=0):
    # the K / V tiles of one query-row block's lists into the ring from slot count `it`; returns it past them
    it = _load_list(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, idx_ptr, n_part, off_z, off_hkv,
                    gl.to_tensor(it), SPARSE_BLOCK=SPARSE_KV_BLOCK, BLOCK=BLOCK_N, STAGES=STAGES)
    if HAS_FULL:
        it = _load_list(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, fidx_ptr, n_full, off_z,
                        off_hkv, it, SPARSE_BLOCK=SPARSE_KV_BLOCK, BLOCK=BLOCK_N, STAGES=STAGES)
    return it


@gluon.jit
def _issue_qk(q_smem, k_ring, k_ready, s_zero, it, STAGES: gl.constexpr):
    # S = Q K^T of tile `it`, asynchronous (K waited for here)
    s = it % STAGES
    mbarrier.wait(k_ready.index(s), (it // STAGES) & 1)
    return warpgroup_mma(q_smem, k_ring.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)


@gluon.jit
def _issue_pv(p, v_ring, v_ready, acc, it, STAGES: gl.constexpr):
    # O += P V of tile `it`, asynchronous (V waited for here)
    s = it % STAGES
    mbarrier.wait(v_ready.index(s), (it // STAGES) & 1)
    return warpgroup_mma(p, v_ring.index(s), acc, is_async=True)


@gluon.jit
def _softmax_tile(qk, l_i, m_i, start_n, off_z, off_h, q_idx, KV_LEN, SCALE, SCALE_LOG2,
                  {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
                  p_layout: gl.constexpr, P_DTYPE: gl.constexpr, IS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr,
                  KV_DIVISIBLE: gl.constexpr, SCALE_POSITIVE: gl.constexpr, BLOCK_N: gl.constexpr,
                  LAZY: gl.constexpr, from_full=False):
    """The online-softmax step of one S tile: (P as the A operand of the P V wgmma, the
    factor that rescales O, l, m, moved: 0 where O needs no rescale). A tile compiled as
    partial (IS_FULL False) keeps every score in range where from_full (a run-time flag: the
    peeled first tile) is true. LAZY: the running max lags (_lazy_softmax)."""
    LOG2E: gl.constexpr = 1.4426950408889634
    s_layout: gl.constexpr = qk.type.layout
    kv_idx = gl.expand_dims(start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
    # t * TO_LOG2 is the score in the log2 domain (common_source._online_softmax)
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
        keep = mask_mod(off_z, off_h, q_idx, kv_idx{MASK_BUF_ARGS}) | from_full
        if not KV_DIVISIBLE:
            keep = keep & (kv_idx < KV_LEN)
        t = gl.where(keep, t, float("-inf"))
    if LAZY:
        m_new, alpha, p, l_i, moved = _lazy_softmax(m_i, l_i, t, TO_LOG2, FINITE=IS_FULL and not HAS_SCORE_MOD)
    else:
        m_new, alpha, p, l_i = _online_softmax(m_i, l_i, t, TO_LOG2, FINITE=IS_FULL and not HAS_SCORE_MOD)
        moved = 1
    return gl.convert_layout(_to_pairs(p, P_DTYPE), p_layout), alpha, l_i, m_new, moved


# log2 units a row's running max may lag its true max (LAZY): P is then at most 2^8, and O and l
# keep their scale until some row of the tile outgrows it
RESCALE_SLACK = gl.constexpr(8.0)


@gluon.jit
def _lazy_softmax(m_i, l_i, t, TO_LOG2, FINITE: gl.constexpr):
    # _online_softmax with a lagging max: a row's m moves only where the tile's max exceeds it by
    # more than RESCALE_SLACK. moved (a scalar over the partition's rows) is 0 where no row's m
    # moved: every alpha is then 1 (or 0 on rows that have seen nothing and hold nothing), and the
    # caller skips rescaling O. lse = m + log2(l) stays exact; the row max output does not (the
    # kernel takes the eager step where it stores the max). The last four lines are
    # _online_softmax's own: written out, as a helper called from both changed the sm_90a code
    # of the measured kernels (ptxas scheduled the partial-block loops differently)
    m_tile = gl.max(t, 1) * TO_LOG2
    m_new = gl.where(m_tile > m_i + RESCALE_SLACK, m_tile, m_i)
    if FINITE:
        m_shift = m_new
    else:
        m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
    moved = gl.max((m_new > m_i).to(gl.int32), 0)
    alpha = gl.exp2(m_i - m_shift)
    p = gl.exp2(t * TO_LOG2 - gl.expand_dims(m_shift, 1))
    l_new = l_i * alpha + gl.sum(p, 1)
    return m_new, alpha, p, l_new, moved


@gluon.jit
def _to_pairs(p, P_DTYPE: gl.constexpr):
    # P rounded to 16 bits two neighbours at a time, packed in the order the P V wgmma reads them:
    # p.to(P_DTYPE) rounds one value at a time, and ptxas then swaps the halves of every packed
    # pair (one PRMT a pair: 64 a tile in the ping-pong loop at head dim 128, 12% of its instructions)
    CVT: gl.constexpr = "cvt.rn.bf16x2.f32 $0, $2, $1;" if P_DTYPE == gl.bfloat16 else "cvt.rn.f16x2.f32 $0, $2, $1;"
    return gl.inline_asm_elementwise(CVT, "=r,r,r", [p], dtype=P_DTYPE.value, is_pure=True, pack=2)


@gluon.jit
def _consume_list(acc, l_i, m_i, p, q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, turn, s_zero,
                  idx_ptr, n_blocks, t0, it, tk,
                  off_z, off_h, q_idx, KV_LEN, SCALE, SCALE_LOG2,
                  {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
                  IS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr, KV_DIVISIBLE: gl.constexpr,
                  SCALE_POSITIVE: gl.constexpr, SPARSE_KV_BLOCK: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, SIDE: gl.constexpr,
                  LAZY: gl.constexpr):
    # Tiles t0.. of one list; `it` counts tiles over both lists (ring slot and phase), `tk` the
    # partition's turns (PINGPONG; every tile's but a row block's first, which takes none).
    # Invariant at the top of an iteration: P of tile it-1 is in registers, its P V not yet
    # issued; O holds the sum over tiles < it-1, scaled to m after tile it-1 (the running row
    # max, or with LAZY a value at most RESCALE_SLACK under it); rescaling O is skipped where
    # no row's m moved.
    # Each iteration issues S(it) and then P V(it-1), waits for S(it) only, and runs the
    # softmax of S(it) while P V(it-1) is on the tensor cores.
    MULT: gl.constexpr = SPARSE_KV_BLOCK // BLOCK_N
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    for t in range(t0, n_blocks * MULT):
        start_n = _tile_start(idx_ptr, t, n_blocks, SPARSE_KV_BLOCK, BLOCK_N)
        if PINGPONG:  # my turn to issue (see _pingpong_consumer): side 0 takes the even turns
            mbarrier.wait(turn.index(SIDE), (tk & 1) ^ (1 - SIDE))
        s_tok = _issue_qk(q_smem, k_ring, k_ready, s_zero, it, STAGES)
        o_tok = _issue_pv(p, v_ring, v_ready, acc, it - 1, STAGES)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - SIDE), count=1)
        qk = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(it % STAGES), count=1)  # K(it) read: the producer may refill its slot
        p, alpha, l_i, m_i, moved = _softmax_tile(
            qk, l_i, m_i, start_n, off_z, off_h, q_idx, KV_LEN, SCALE, SCALE_LOG2,
            {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
            p_layout=p_layout, P_DTYPE=v_ring.dtype, IS_FULL=IS_FULL, HAS_SCORE_MOD=HAS_SCORE_MOD, KV_DIVISIBLE=KV_DIVISIBLE,
            SCALE_POSITIVE=SCALE_POSITIVE, BLOCK_N=BLOCK_N, LAZY=LAZY)
        acc = warpgroup_mma_wait(0, deps=(o_tok, ))
        mbarrier.arrive(v_empty.index((it - 1) % STAGES), count=1)
        if moved > 0:
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        it += 1
        tk += 1
    return acc, l_i, m_i, p, it, tk


@gluon.jit
def _consumer(q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty, v_empty, turn,
              idx_ptr, n_part, fidx_ptr, n_full,
              off_z, off_h, start_m, KV_LEN, SCALE, SCALE_LOG2,
              {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
              HAS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, V_HEAD: gl.constexpr,
              SPARSE_KV_BLOCK: gl.constexpr, KV_DIVISIBLE: gl.constexpr, SCALE_POSITIVE: gl.constexpr,
              STAGES: gl.constexpr, num_warps: gl.constexpr, PINGPONG: gl.constexpr = False,
              SIDE: gl.constexpr = 0, LAZY: gl.constexpr = False, it=0, tk=0, q_phase=0):
    # the online softmax over the row's kv tiles -> (O unnormalised, l, m) of BLOCK_M rows
    # from start_m, Q in q_smem (waited for on q_bar in phase q_phase), and the ring's tile count
    # and the turn count past them: the row's first tile is ring tile `it`, its first turn `tk`
    # (a persistent program's rows continue both)
    MULT: gl.constexpr = SPARSE_KV_BLOCK // BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, V_HEAD, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, V_HEAD], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    q_idx = gl.expand_dims(start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout)), 1)
    n_part_tiles = n_part * MULT
    n_total = n_part_tiles
    if HAS_FULL:
        n_total += n_full * MULT
    mbarrier.wait(q_bar, q_phase)
    it = gl.to_tensor(it)
    tk = gl.to_tensor(tk)
    if n_total > 0:
        # tile 0, peeled: S waited for at once. One softmax step serves both lists: mask_mod is
        # evaluated but overridden where the tile is the first of a row's full blocks (a full
        # block skips mask_mod: a tile-table lookup reads "no slot" there, and a BlockMask
        # built by hand may list as full a block where mask_mod is false)
        if n_part_tiles > 0:
            start_n = _tile_start(idx_ptr, 0, n_part, SPARSE_KV_BLOCK, BLOCK_N)
        else:
            start_n = _tile_start(fidx_ptr, 0, n_full, SPARSE_KV_BLOCK, BLOCK_N)
        qk = warpgroup_mma_wait(0, deps=(_issue_qk(q_smem, k_ring, k_ready, s_zero, it, STAGES), ))
        mbarrier.arrive(k_empty.index(it % STAGES), count=1)
        p, alpha, l_i, m_i, moved = _softmax_tile(
            qk, l_i, m_i, start_n, off_z, off_h, q_idx, KV_LEN, SCALE, SCALE_LOG2,
            {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
            p_layout=p_layout, P_DTYPE=v_ring.dtype, IS_FULL=False, HAS_SCORE_MOD=HAS_SCORE_MOD, KV_DIVISIBLE=KV_DIVISIBLE,
            SCALE_POSITIVE=SCALE_POSITIVE, BLOCK_N=BLOCK_N, LAZY=LAZY, from_full=n_part_tiles == 0)
        acc, l_i, m_i, p, it, tk = _consume_list(
            acc, l_i, m_i, p, q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, turn, s_zero,
            idx_ptr, n_part, 1, it + 1, tk, off_z, off_h, q_idx, KV_LEN, SCALE, SCALE_LOG2,
            {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
            IS_FULL=False, HAS_SCORE_MOD=HAS_SCORE_MOD, KV_DIVISIBLE=KV_DIVISIBLE, SCALE_POSITIVE=SCALE_POSITIVE,
            SPARSE_KV_BLOCK=SPARSE_KV_BLOCK, BLOCK_N=BLOCK_N, STAGES=STAGES, PINGPONG=PINGPONG, SIDE=SIDE,
            LAZY=LAZY)
        if HAS_FULL:
            acc, l_i, m_i, p, it, tk = _consume_list(
                acc, l_i, m_i, p, q_smem, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty, turn, s_zero,
                fidx_ptr, n_full, gl.where(n_part_tiles > 0, 0, 1), it, tk, off_z, off_h, q_idx, KV_LEN,
                SCALE, SCALE_LOG2,
                {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                IS_FULL=True, HAS_SCORE_MOD=HAS_SCORE_MOD, KV_DIVISIBLE=KV_DIVISIBLE,
                SCALE_POSITIVE=SCALE_POSITIVE, SPARSE_KV_BLOCK=SPARSE_KV_BLOCK, BLOCK_N=BLOCK_N, STAGES=STAGES,
                PINGPONG=PINGPONG, SIDE=SIDE, LAZY=LAZY)
        # the last tile's P V
        acc = warpgroup_mma_wait(0, deps=(_issue_pv(p, v_ring, v_ready, acc, it - 1, STAGES), ))
        mbarrier.arrive(v_empty.index((it - 1) % STAGES), count=1)
    return acc, l_i, m_i, it, tk


@gluon.jit
def flex_fwd_hopper(q_desc, k_desc, v_desc, o_desc, LSE, MAX,
                    KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,
                    stride_nz, stride_nh, stride_nm,
                    stride_iz, stride_ih, stride_im,
                    stride_fnz, stride_fnh, stride_fnm,
                    stride_fiz, stride_fih, stride_fim,
                    HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2, TILES, N_TILES, SECTION,
                    {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
                    GQA_GROUP: gl.constexpr, HAS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    SPARSE_Q_BLOCK: gl.constexpr, SPARSE_KV_BLOCK: gl.constexpr,
                    KV_DIVISIBLE: gl.constexpr, SCALE_POSITIVE: gl.constexpr,
                    STAGES: gl.constexpr, LAST_ROWS_FIRST: gl.constexpr,
                    QK_HEAD_PAD: gl.constexpr, V_HEAD_PAD: gl.constexpr, FP16: gl.constexpr,
                    OUTPUT_MAX: gl.constexpr, PINGPONG: gl.constexpr, PERSISTENT: gl.constexpr,
                    num_warps: gl.constexpr):
    # q/k/v/o descriptors: rank 4 over [B, H, S, D] with [1, 1, rows, D_PAD] boxes, D_PAD the
    # head dim rounded up to a power of two. A box past the end of a head's rows or of the
    # head dim is zero-filled on load (zeros add nothing to Q K^T; their P V columns are
    # clipped on store), never read from another head.
    # PERSISTENT (ping-pong only): one program an SM walks row blocks ("tiles": N_TILES of them,
    # _tile_rows' order) taken from the counter TILES[0]; the producer takes each and hands it to
    # the consumers through TILES[1 + 2 * program + slot]. Otherwise one program a row block.
    QK_HEAD: gl.constexpr = q_desc.block_type.shape[3]
    V_HEAD: gl.constexpr = v_desc.block_type.shape[3]
    # the descriptors' static properties, also passed as constexprs (the host's launch cache
    # tells launches apart by their constexprs)
    gl.static_assert(QK_HEAD == QK_HEAD_PAD and V_HEAD == V_HEAD_PAD)
    gl.static_assert((q_desc.dtype == gl.float16) == FP16)
    gl.static_assert(SPARSE_KV_BLOCK % BLOCK_N == 0)
    gl.static_assert(SPARSE_Q_BLOCK % BLOCK_M == 0)
    # one wgmma row block of 16 per warp; PINGPONG: two partitions of num_warps warps
    gl.static_assert(BLOCK_M == (32 if PINGPONG else 16) * num_warps)
    gl.static_assert(PINGPONG or not PERSISTENT)

    dtype: gl.constexpr = q_desc.dtype
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, QK_HEAD],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, QK_HEAD], dtype))
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, V_HEAD],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, V_HEAD], dtype))
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        # a slot's K (V) is free once every consumer partition's S (P V) wgmma has read it
        mbarrier.init(k_empty.index(s), count=2 if PINGPONG else 1)
        mbarrier.init(v_empty.index(s), count=2 if PINGPONG else 1)

    if PERSISTENT:
        HALF_P: gl.constexpr = BLOCK_M // 2
        q_smem_p = gl.allocate_shared_memory(dtype, [2, HALF_P, QK_HEAD],
                                             gl.NVMMASharedLayout.get_default_for([HALF_P, QK_HEAD], dtype))
        if QK_HEAD == V_HEAD:  # O goes out through Q's buffer (stored before the next row block's Q comes in)
            o_smem_p = q_smem_p
        else:
            o_smem_p = gl.allocate_shared_memory(dtype, [2, HALF_P, V_HEAD],
                                                 gl.NVMMASharedLayout.get_default_for([HALF_P, V_HEAD], dtype))
        q_bar_p = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn_p = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        tile_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        tile_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bar_p.index(i), count=1)
            mbarrier.init(turn_p.index(i), count=1)
            mbarrier.init(tile_ready.index(i), count=1)
            mbarrier.init(tile_empty.index(i), count=2)  # both consumer partitions read each tile
        fence_async_shared()
        # (the consumers' argument tuples written out whole, as the ping-pong form's below: see there)
        gl.warp_specialize([
            (_persistent_consumer, (q_desc, o_desc, q_smem_p, o_smem_p, k_ring, v_ring, q_bar_p, k_ready, v_ready,
                                    k_empty, v_empty, turn_p, tile_ready, tile_empty, TILES, N_TILES, SECTION, LSE, MAX,
                                    KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh, stride_nm,
                                    stride_iz, stride_ih, stride_im, stride_fnz, stride_fnh, stride_fnm,
                                    stride_fiz, stride_fih, stride_fim, HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                                    {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                                    HAS_FULL, HAS_SCORE_MOD, HALF_P, BLOCK_N, V_HEAD, SPARSE_Q_BLOCK,
                                    SPARSE_KV_BLOCK, KV_DIVISIBLE, SCALE_POSITIVE, STAGES, LAST_ROWS_FIRST,
                                    OUTPUT_MAX, 0, num_warps)),
            (_persistent_consumer, (q_desc, o_desc, q_smem_p, o_smem_p, k_ring, v_ring, q_bar_p, k_ready, v_ready,
                                    k_empty, v_empty, turn_p, tile_ready, tile_empty, TILES, N_TILES, SECTION, LSE, MAX,
                                    KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh, stride_nm,
                                    stride_iz, stride_ih, stride_im, stride_fnz, stride_fnh, stride_fnm,
                                    stride_fiz, stride_fih, stride_fim, HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                                    {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                                    HAS_FULL, HAS_SCORE_MOD, HALF_P, BLOCK_N, V_HEAD, SPARSE_Q_BLOCK,
                                    SPARSE_KV_BLOCK, KV_DIVISIBLE, SCALE_POSITIVE, STAGES, LAST_ROWS_FIRST,
                                    OUTPUT_MAX, 1, num_warps)),
            (_persistent_producer, (k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                                    tile_ready, tile_empty, TILES, N_TILES, SECTION,
                                    KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh, stride_nm,
                                    stride_iz, stride_ih, stride_im, stride_fnz, stride_fnh, stride_fnm,
                                    stride_fiz, stride_fih, stride_fim, HQ, Q_LEN, GQA_GROUP, HAS_FULL,
                                    BLOCK_M, BLOCK_N, SPARSE_Q_BLOCK, SPARSE_KV_BLOCK, STAGES, LAST_ROWS_FIRST)),
        ], [num_warps, 1], [240, 24])
    else:
        # LAST_ROWS_FIRST: the last query rows start first; under a causal mask they have the
        # most kv blocks, and the short programs then fill the tail of the grid
        pid_m = gl.program_id(0)
        if LAST_ROWS_FIRST:
            pid_m = gl.num_programs(0) - 1 - pid_m
        pid_zh = gl.program_id(1)
        off_z = pid_zh // HQ
        off_h = pid_zh % HQ
        off_hkv = off_h // GQA_GROUP
        start_m = pid_m * BLOCK_M
        sparse_m = start_m // SPARSE_Q_BLOCK
        n_part, idx_ptr, n_full, fidx_ptr = _row_lists(
            KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
            stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim, off_z, off_h, sparse_m, HAS_FULL)
        if PINGPONG:
            # two consumer partitions of BLOCK_M / 2 rows each, taking turns to issue their wgmmas
            HALF: gl.constexpr = BLOCK_M // 2
            q_smem = gl.allocate_shared_memory(dtype, [2, HALF, QK_HEAD],
                                               gl.NVMMASharedLayout.get_default_for([HALF, QK_HEAD], dtype))
            if QK_HEAD == V_HEAD:  # O goes out through Q's buffer (the last S wgmma is done by then)
                o_smem = q_smem
            else:
                o_smem = gl.allocate_shared_memory(dtype, [2, HALF, V_HEAD],
                                                   gl.NVMMASharedLayout.get_default_for([HALF, V_HEAD], dtype))
            q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for side in gl.static_range(2):
                mbarrier.init(q_bar.index(side), count=1)
                mbarrier.init(turn.index(side), count=1)
            fence_async_shared()
            # the two consumers' argument tuples differ only in SIDE; they are written out whole
            # because Gluon's frontend miscompiled a tuple built by concatenation here
            gl.warp_specialize([
                (_pingpong_consumer, (q_desc, o_desc, q_smem, o_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty,
                                      v_empty, turn, LSE, MAX, idx_ptr, n_part, fidx_ptr, n_full, off_z, off_h, pid_zh,
                                      start_m, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                                      {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                                      HAS_FULL, HAS_SCORE_MOD, HALF, BLOCK_N, V_HEAD, SPARSE_KV_BLOCK, KV_DIVISIBLE,
                                      SCALE_POSITIVE, STAGES, OUTPUT_MAX, 0, num_warps)),
                (_pingpong_consumer, (q_desc, o_desc, q_smem, o_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty,
                                      v_empty, turn, LSE, MAX, idx_ptr, n_part, fidx_ptr, n_full, off_z, off_h, pid_zh,
                                      start_m, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                                      {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                                      HAS_FULL, HAS_SCORE_MOD, HALF, BLOCK_N, V_HEAD, SPARSE_KV_BLOCK, KV_DIVISIBLE,
                                      SCALE_POSITIVE, STAGES, OUTPUT_MAX, 1, num_warps)),
                (_producer, (k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                             idx_ptr, n_part, fidx_ptr, n_full, off_z, off_hkv,
                             HAS_FULL, SPARSE_KV_BLOCK, BLOCK_N, STAGES)),
            ], [num_warps, 1], [240, 24])
        else:
            q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, QK_HEAD],
                                               gl.NVMMASharedLayout.get_default_for([BLOCK_M, QK_HEAD], dtype))
            q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(q_bar, count=1)
            fence_async_shared()
            # load q: it stays in shared memory throughout, the A operand of every S wgmma
            mbarrier.expect(q_bar, q_desc.block_type.nbytes)
            _tma_load(q_desc, [off_z, off_h, start_m, 0], q_bar, q_smem.reshape(q_desc.block_type.shape))
            acc, l_i, m_i, _it, _tk = gl.warp_specialize([
                # (turn None: only the ping-pong form takes turns; then PINGPONG, SIDE, LAZY)
                (_consumer, (q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty, v_empty, None,
                             idx_ptr, n_part, fidx_ptr, n_full, off_z, off_h, start_m, KV_LEN, SCALE, SCALE_LOG2,
                             {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                             HAS_FULL, HAS_SCORE_MOD, BLOCK_M, BLOCK_N, V_HEAD, SPARSE_KV_BLOCK, KV_DIVISIBLE,
                             SCALE_POSITIVE, STAGES, num_warps, False, 0, not OUTPUT_MAX)),
                (_producer, (k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                             idx_ptr, n_part, fidx_ptr, n_full, off_z, off_hkv,
                             HAS_FULL, SPARSE_KV_BLOCK, BLOCK_N, STAGES)),
            ], [1], [24])
            # O through shared memory (q's buffer when the shapes agree: the last S wgmma is done)
            if QK_HEAD == V_HEAD:
                o_smem = q_smem
            else:
                o_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, V_HEAD],
                                                   gl.NVMMASharedLayout.get_default_for([BLOCK_M, V_HEAD], dtype))
            _epilogue(acc, l_i, m_i, o_desc, o_smem, LSE, MAX, pid_zh, off_z, off_h, start_m, Q_LEN,
                      OUTPUT_MAX=OUTPUT_MAX)


@gluon.jit
def _pingpong_consumer(q_desc, o_desc, q_smem, o_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty, v_empty,
                       turn, LSE, MAX, idx_ptr, n_part, fidx_ptr, n_full, off_z, off_h, pid_zh, start_m,
                       Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                       {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
                       HAS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, V_HEAD: gl.constexpr, SPARSE_KV_BLOCK: gl.constexpr,
                       KV_DIVISIBLE: gl.constexpr, SCALE_POSITIVE: gl.constexpr, STAGES: gl.constexpr,
                       OUTPUT_MAX: gl.constexpr, SIDE: gl.constexpr, num_warps: gl.constexpr, it=0, tk=0,
                       q_phase=0):
    # One warpgroup's BLOCK_M rows (the program's first or second half, SIDE 0 / 1): its own Q,
    # the shared K/V ring, its own O. The two partitions take turns to issue their S and P V
    # wgmmas (mbarriers `turn`: SIDE waits on turn[SIDE], then arrives on the other's), so one
    # runs its softmax while the tensor cores run the other's wgmmas. it / tk / q_phase and the
    # returned counts: _consumer's (a persistent program's row blocks continue them). Q goes into
    # the buffer the previous row block's O left through (its store waited for in _epilogue).
    row0 = start_m + SIDE * BLOCK_M
    q_half = q_smem.index(SIDE)
    mbarrier.expect(q_bar.index(SIDE), q_desc.block_type.nbytes)
    _tma_load(q_desc, [off_z, off_h, row0, 0], q_bar.index(SIDE), q_half.reshape(q_desc.block_type.shape))
    acc, l_i, m_i, it, tk = _consumer(q_half, k_ring, v_ring, q_bar.index(SIDE), k_ready, v_ready, k_empty, v_empty,
                                      turn, idx_ptr, n_part, fidx_ptr, n_full, off_z, off_h, row0, KV_LEN, SCALE,
                                      SCALE_LOG2,
                                      {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                                      HAS_FULL, HAS_SCORE_MOD, BLOCK_M, BLOCK_N, V_HEAD, SPARSE_KV_BLOCK,
                                      KV_DIVISIBLE, SCALE_POSITIVE, STAGES, num_warps, PINGPONG=True, SIDE=SIDE,
                                      LAZY=not OUTPUT_MAX, it=it, tk=tk, q_phase=q_phase)
    _epilogue(acc, l_i, m_i, o_desc, o_smem.index(SIDE), LSE, MAX, pid_zh, off_z, off_h, row0, Q_LEN,
              OUTPUT_MAX=OUTPUT_MAX)
    return it, tk


@gluon.jit
def _row_lists(KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh, stride_nm, stride_iz, stride_ih,
               stride_im, stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim, off_z, off_h,
               sparse_m, HAS_FULL: gl.constexpr):
    # (n_part, idx_ptr, n_full, fidx_ptr): BlockMask row sparse_m's partial and full kv block lists
    # (without full lists n_full is 0)
    n_part, idx_ptr = _block_list(KV_NUM, KV_IDX, off_z, off_h, sparse_m, stride_nz, stride_nh, stride_nm,
                                  stride_iz, stride_ih, stride_im)
    n_full = 0
    fidx_ptr = idx_ptr
    if HAS_FULL:
        n_full, fidx_ptr = _block_list(FULL_KV_NUM, FULL_KV_IDX, off_z, off_h, sparse_m, stride_fnz, stride_fnh,
                                       stride_fnm, stride_fiz, stride_fih, stride_fim)
    return n_part, idx_ptr, n_full, fidx_ptr


@gluon.jit
def _tile_rows(tile, N_TILES, SECTION, Q_LEN, ROWS: gl.constexpr, LAST_ROWS_FIRST: gl.constexpr):
    # (row block, batch * HQ + head) of a persistent walk's tile (row blocks of ROWS rows): sections
    # of SECTION (batch, head) pairs one after the other; within a section the row blocks in turn
    # (the last rows first: under a causal mask the longest) and for each the section's heads side
    # by side, so the programs running at once share the K / V of a few heads in L2. (Computed
    # from the kernel's arguments each time rather than kept: registers are scarce in the consumers.)
    N_M = (Q_LEN + ROWS - 1) // ROWS
    BH = N_TILES // N_M
    sec = tile // (SECTION * N_M)
    heads = gl.minimum(BH - sec * SECTION, SECTION)
    rest = tile - sec * SECTION * N_M
    pid_m = rest // heads
    if LAST_ROWS_FIRST:
        pid_m = N_M - 1 - pid_m
    return pid_m, sec * SECTION + rest % heads


@gluon.jit
def _tile_lists(tile, N_TILES, SECTION, Q_LEN, HQ, KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh,
                stride_nm, stride_iz, stride_ih, stride_im, stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih,
                stride_fim, ROWS: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr, HAS_FULL: gl.constexpr,
                LAST_ROWS_FIRST: gl.constexpr):
    # a persistent walk's tile (row blocks of ROWS rows) -> (pid_zh, off_z, off_h, start_m, and its
    # kv block lists: _row_lists')
    pid_m, pid_zh = _tile_rows(tile, N_TILES, SECTION, Q_LEN, ROWS, LAST_ROWS_FIRST)
    off_z = pid_zh // HQ
    off_h = pid_zh % HQ
    start_m = pid_m * ROWS
    n_part, idx_ptr, n_full, fidx_ptr = _row_lists(
        KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
        stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim, off_z, off_h,
        start_m // SPARSE_Q_BLOCK, HAS_FULL)
    return pid_zh, off_z, off_h, start_m, n_part, idx_ptr, n_full, fidx_ptr


@gluon.jit
def _publish_tile(TILES, tile_ready, tile_empty, tile, j):
    # the producer hands the program's j-th tile to the consumers (slot j % 2 of its two)
    s = j % 2
    mbarrier.wait(tile_empty.index(s), ((j // 2) & 1) ^ 1)
    gl.store(TILES + 1 + 2 * gl.program_id(0) + s, tile)
    _cta_barrier()
    mbarrier.arrive(tile_ready.index(s), count=1)


@gluon.jit
def _take_tile(TILES, tile_ready, tile_empty, j):
    # a consumer partition reads the program's j-th tile and frees its slot
    s = j % 2
    mbarrier.wait(tile_ready.index(s), (j // 2) & 1)
    tile = gl.load(TILES + 1 + 2 * gl.program_id(0) + s, volatile=True)
    _cta_barrier()
    mbarrier.arrive(tile_empty.index(s), count=1)
    return tile


@gluon.jit
def _persistent_producer(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                         tile_ready, tile_empty, TILES, N_TILES, SECTION,
                         KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh, stride_nm,
                         stride_iz, stride_ih, stride_im, stride_fnz, stride_fnh, stride_fnm,
                         stride_fiz, stride_fih, stride_fim, HQ, Q_LEN,
                         GQA_GROUP: gl.constexpr, HAS_FULL: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr, SPARSE_KV_BLOCK: gl.constexpr,
                         STAGES: gl.constexpr, LAST_ROWS_FIRST: gl.constexpr):
    # takes the program's tiles (its first by its number, the next ones from the counter, so a
    # program that finishes early takes more) and loads each one's K / V tiles into the ring,
    # which runs on from tile to tile
    tile = gl.program_id(0)
    j = 0
    it = 0
    _publish_tile(TILES, tile_ready, tile_empty, tile, j)
    while tile < N_TILES:
        _pid_zh, off_z, off_h, _start_m, n_part, idx_ptr, n_full, fidx_ptr = _tile_lists(
            tile, N_TILES, SECTION, Q_LEN, HQ, KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh,
            stride_nm, stride_iz, stride_ih, stride_im, stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih,
            stride_fim, BLOCK_M, SPARSE_Q_BLOCK, HAS_FULL, LAST_ROWS_FIRST)
        it = _producer(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_empty, v_empty,
                       idx_ptr, n_part, fidx_ptr, n_full, off_z, off_h // GQA_GROUP,
                       HAS_FULL, SPARSE_KV_BLOCK, BLOCK_N, STAGES, it)
        tile = gl.atomic_add(TILES, 1) + gl.num_programs(0)
        j += 1
        _publish_tile(TILES, tile_ready, tile_empty, tile, j)


@gluon.jit
def _persistent_consumer(q_desc, o_desc, q_smem, o_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty, v_empty,
                         turn, tile_ready, tile_empty, TILES, N_TILES, SECTION, LSE, MAX,
                         KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh, stride_nm,
                         stride_iz, stride_ih, stride_im, stride_fnz, stride_fnh, stride_fnm,
                         stride_fiz, stride_fih, stride_fim, HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                         {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}
                         HAS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, V_HEAD: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr,
                         SPARSE_KV_BLOCK: gl.constexpr, KV_DIVISIBLE: gl.constexpr, SCALE_POSITIVE: gl.constexpr,
                         STAGES: gl.constexpr, LAST_ROWS_FIRST: gl.constexpr, OUTPUT_MAX: gl.constexpr,
                         SIDE: gl.constexpr, num_warps: gl.constexpr):
    # _pingpong_consumer over the tiles the producer hands out: its BLOCK_M rows (half of each
    # row block) of every tile; the K / V ring's tile count and the turns run on from tile to tile
    j = 0
    it = 0
    tk = 0
    tile = _take_tile(TILES, tile_ready, tile_empty, j)
    while tile < N_TILES:
        pid_zh, off_z, off_h, start_m, n_part, idx_ptr, n_full, fidx_ptr = _tile_lists(
            tile, N_TILES, SECTION, Q_LEN, HQ, KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, stride_nz, stride_nh,
            stride_nm, stride_iz, stride_ih, stride_im, stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih,
            stride_fim, 2 * BLOCK_M, SPARSE_Q_BLOCK, HAS_FULL, LAST_ROWS_FIRST)
        it, tk = _pingpong_consumer(q_desc, o_desc, q_smem, o_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty,
                                    v_empty, turn, LSE, MAX, idx_ptr, n_part, fidx_ptr, n_full, off_z, off_h, pid_zh,
                                    start_m, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                                    {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                                    HAS_FULL, HAS_SCORE_MOD, BLOCK_M, BLOCK_N, V_HEAD, SPARSE_KV_BLOCK, KV_DIVISIBLE,
                                    SCALE_POSITIVE, STAGES, OUTPUT_MAX, SIDE, num_warps, it, tk, j & 1)
        j += 1
        tile = _take_tile(TILES, tile_ready, tile_empty, j)


@gluon.jit
def _epilogue(acc, l_i, m_i, o_desc, o_smem, LSE, MAX, pid_zh, off_z, off_h, row0, Q_LEN, OUTPUT_MAX: gl.constexpr):
    # O / l into o_smem and out by a TMA store (which clips the rows past Q_LEN), lse (and
    # the row max) by plain stores; fully masked rows (l == 0): output 0 and lse -inf, never NaN
    o_layout: gl.constexpr = acc.type.layout
    ROWS: gl.constexpr = acc.shape[0]
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    acc = acc * gl.expand_dims(gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout)), 1)
    o_smem.store(acc.to(o_smem.dtype))
    fence_async_shared()
    _tma_store(o_desc, [off_z, off_h, row0, 0], o_smem.reshape(o_desc.block_type.shape))
    LN2: gl.constexpr = 0.6931471805599453
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    offs_lm = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    lse = gl.convert_layout(lse, gl.SliceLayout(1, o_layout))
    gl.store(LSE + pid_zh.to(gl.int64) * Q_LEN + offs_lm, lse, mask=offs_lm < Q_LEN)
    if OUTPUT_MAX:  # each row's max score: m_i (log2 domain) in natural units, -inf on fully masked rows
        m_out = gl.convert_layout(m_i * LN2, gl.SliceLayout(1, o_layout))
        gl.store(MAX + pid_zh.to(gl.int64) * Q_LEN + offs_lm, m_out, mask=offs_lm < Q_LEN)
    tma.store_wait(pendings=0)
'''


# ---- host side -----------------------------------------------------------------------

@triton.jit
def _zero_counter(TILES):
    tl.store(TILES, 0)


def hopper_fwd_config(d: int, dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, STAGES, num_warps): two consumer warpgroups of 64 rows each (the
    launch is 12 warps with the producer's, 168 registers a thread; warp_specialize's
    setmaxnreg gives the consumer warps 240 and the producer 24, and S, P and O of a 64 x 128
    tile fit without spilling up to head dim 128) and two K/V stages (three measured no
    faster on the H200). Past 128, 64-column kv tiles: O of 64 x 256 rows is 128 float32
    registers a thread, S 32 more (ptxas, sm_90a: no spills in either form; 192 KiB of shared
    memory with Q and two K/V stages)."""
    return (128, 128, 2, 8) if max(d, dv) <= 128 else (128, 64, 2, 8)


def hopper_unsupported(q, k, v, block_size, dropout_p: float, graphs=()) -> str | None:
    """Why the Hopper forward cannot take this call (None: it can); graphs: the call's traced
    mods (None where absent)."""
    if any(g is not None and any(n.op in ROW_OPS for n in g.nodes) for g in graphs):
        # the printer's row dot (tl.dot over chunks of the row) has no Gluon form yet
        return "a mod that reduces rows of a captured tensor (torch.dot / .sum(-1) of a row)"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (bfloat16 / float16 only)"
    if dropout_p:
        return "dropout_p > 0"
    e, ev = q.shape[-1], v.shape[-1]
    if e % 8 or ev % 8 or max(e, ev) > 256:
        return f"head dims {e} / {ev} (multiples of 8 up to 256)"
    bm, bn, _, _ = hopper_fwd_config(e, ev)
    if block_size[0] % bm or block_size[1] % bn:
        return f"BlockMask BLOCK_SIZE {tuple(block_size)} (multiples of ({bm}, {bn}))"
    for name, t in (("query", q), ("key", k), ("value", v)):
        why = tma_unsupported(name, t)
        if why:
            return why
    return None


def tma_unsupported(name: str, t) -> str | None:
    """Why a TMA descriptor cannot read tensor t (None: it can)."""
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * t.element_size()) % 16 for st in t.stride()[:-1]):
        return f"{name} strides {tuple(t.stride())} (TMA needs a contiguous last dim, 16-byte aligned strides)"
    return None


# Where "auto" takes the Hopper forward: head dims 64-256. Measured on the H200 (B=4, H=16, S=8K,
# bf16): at D=128 the ping-pong form is 1.13-1.20x the Triton kernels on the seven cases of
# benchmarks/RESULTS.md (benchmarks/hopper_check.py); at D=256 the one-partition form is 1.00-1.15x;
# at D=64 the persistent ping-pong form 1.02-1.13x but sliding window 1024 0.99x
# (benchmarks/ab_persistent.py --dims 64 --triton). Below 64 (padded to 64) it is not measured.
AUTO_HEAD_DIMS = range(64, 257)


# Whether the Hopper forward takes its ping-pong form when kernel_options leave "fwd_PINGPONG" out.
# H200, B=4, H=16, S=8K, bf16: 1.06-1.24x the one-partition form at D=128; at D=256 0.97-1.00x before
# the lagging row max and 1.10-1.13x with it on every case (dense 634 -> 717, causal 606 -> 667 TFLOP/s):
# with the rescale of O mostly skipped, the softmax a partition hides behind the other's wgmmas is short
# enough at D=256 too.
PINGPONG_DEFAULT = True


def persistent_default(head_dim: int, score_bufs) -> bool:
    """Whether the ping-pong form runs persistent (one program an SM taking row blocks from a counter,
    the next block's loads under the last one's epilogue) when kernel_options leave "fwd_PERSISTENT"
    out. H200, B=4, H=16, bf16, forward, persistent / one program a row block, one process
    (benchmarks/ab_persistent.py, S=8K and 16K): at D=128 causal 1.01-1.04x, sliding window 1.02-1.04x,
    prefix-LM 1.03x, document 1.02x, softcap 1.01-1.04x, dense 1.00x, but ALiBi (a score_mod reading a
    captured tensor) 0.89-0.93x; at D=256 0.95-1.02x. So: up to head dim 128, where the score_mod reads
    no captured tensor."""
    return head_dim <= 128 and not score_bufs


# A persistent walk takes row blocks of as many heads side by side as have this many bytes of K and V:
# at D=128, S=8K 8 MiB (two heads) measured 1.00x on dense where 32 MiB (eight) gave 0.96-0.98x
L2_SECTION_BYTES = 8 << 20


def use_hopper(device: str, q, k, v, block_size, dropout_p: float, request: str, graphs=()) -> bool:
    """Whether the forward runs the Hopper kernel. device: config.device_key ("sm90", ...,
    "interp"); graphs: the traced mods; request: kernel_options["BACKEND"] as the kernels see it - "auto" (sm90, a
    supported call, head dims in AUTO_HEAD_DIMS), "hopper" (a ValueError naming why not, if
    it cannot) or "triton" (never)."""
    if request == "triton":
        return False
    why = None if device == "sm90" else f"compute capability {device} (sm90 only)"
    why = why or gluon_missing() or hopper_unsupported(q, k, v, block_size, dropout_p, graphs)
    if request == "hopper" and why:
        raise ValueError(f"kernel_options['BACKEND'] = 'hopper': this call cannot run the Hopper forward: {why}; "
                         f"use BACKEND='auto' to fall back to the Triton kernels")
    return why is None and (request == "hopper" or max(q.shape[-1], v.shape[-1]) in AUTO_HEAD_DIMS)


@functools.lru_cache(maxsize=None)
def gluon_missing() -> str | None:
    """Why Triton's Gluon Hopper API is not available (None: it is)."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return f"triton {triton.__version__} has no Gluon Hopper API (triton >= 3.5)"
    return None


def descriptor(t, rows: int):
    """A TMA descriptor over t [B, H, S, D] with [1, 1, rows, D rounded up to a power of
    two] boxes (the kernel's shared-memory tiles)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    d = next_pow2(t.shape[-1])
    swizzle = gl.NVMMASharedLayout.get_default_for([rows, d], gdt).swizzle_byte_width
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d],
                            gl.NVMMASharedLayout(swizzle, 16, rank=4))


def hopper_forward(plan, q, k, v):
    """Launch the Hopper forward of `plan` -> (out [B, Hq, L, Ev] in q.dtype, lse [B, Hq, L]
    float32, natural log), and max_scores [B, Hq, L] float32 when plan.output_max."""
    B, Hq, L, E = q.shape
    _, Hkv, S, Ev = v.shape
    bm, bn, stages, warps = hopper_fwd_config(E, Ev)
    # ping-pong: two partitions of one warpgroup each, each with its own half of the rows
    pingpong = bool(plan.opts.get("fwd_PINGPONG", PINGPONG_DEFAULT))
    rows, warps = (bm // 2, warps // 2) if pingpong else (bm, warps)
    blk = plan.blocks
    out = torch.empty(B, Hq, L, Ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    mx = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device) if plan.output_max else None
    kv_num, kv_idx, full_num, full_idx = kv_lists(blk)
    persistent = pingpong and bool(plan.opts.get("fwd_PERSISTENT", persistent_default(max(E, Ev), plan.score_bufs)))
    n_tiles = cdiv(L, bm) * B * Hq
    if persistent:
        grid = (min(n_tiles, launcher.sm_count(q.device)), )
        # the tile counter, then two hand-over slots a program; the counter zeroed by a launch of its
        # own (a replayed call - kernels.replay - allocates with torch.empty and repeats launches only)
        tiles = torch.empty(1 + 2 * grid[0], dtype=torch.int32, device=q.device)
        launcher.launch_cached(_zero_counter, (1, ), (tiles, ), {"num_warps": 1})
        section = max(1, min(B * Hq, L2_SECTION_BYTES * (Hq // Hkv) // (S * (E + Ev) * q.element_size())))
    else:
        grid, tiles, section = (cdiv(L, bm), B * Hq), kv_num, 1
    args = (descriptor(q, rows), descriptor(k, bn), descriptor(v, bn), descriptor(out, rows), lse,
            lse if mx is None else mx,
            kv_num, kv_idx, full_num, full_idx, *bm_strides(kv_num, kv_idx), *bm_strides(full_num, full_idx),
            Hq, L, S, plan.scale, plan.scale * LOG2E, tiles, n_tiles, section,
            *buffer_args(plan.score_graph, plan.score_bufs), *buffer_args(plan.mask_graph, plan.mask_bufs))
    # the descriptors' dtype and box widths are in the constexprs too: the launch cache keys
    # on constexprs and tensor features, and sees a descriptor by its type only
    kwargs = dict(GQA_GROUP=Hq // Hkv, HAS_FULL=blk.has_full, HAS_SCORE_MOD=plan.score_graph is not None,
                  BLOCK_M=bm, BLOCK_N=bn, SPARSE_Q_BLOCK=blk.block[0], SPARSE_KV_BLOCK=blk.block[1],
                  KV_DIVISIBLE=S % blk.block[1] == 0, SCALE_POSITIVE=plan.scale > 0, STAGES=stages,
                  LAST_ROWS_FIRST=True, QK_HEAD_PAD=next_pow2(E), V_HEAD_PAD=next_pow2(Ev),
                  FP16=q.dtype == torch.float16, OUTPUT_MAX=mx is not None, PINGPONG=pingpong,
                  PERSISTENT=persistent, num_warps=warps)
    launcher.launch_cached(plan.module("fwd_hopper").flex_fwd_hopper, grid, args, kwargs)
    return (out, lse) if mx is None else (out, lse, mx)
