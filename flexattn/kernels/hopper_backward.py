"""Hopper (sm90) backward kernel in Gluon: dK and dV of one kv tile, and every tile's dQ added
into a float32 buffer, in one warp-specialised program, with TMA loads of the q / dO tiles by a
producer warp, asynchronous wgmma from shared memory, the kv tile's K and V held in shared
memory throughout.

One program owns BLOCK_N kv rows of one (batch, kv head) and walks, for every query head of
its GQA group, the transposed BlockMask lists (q_* partial blocks, mask_mod applied, then
full_q_* blocks): per q tile of BLOCK_M rows
    S = Q K^T,  P = exp2(S * scale * log2 e - lse2)    (score_mod / mask_mod applied)
    dP = dO V^T,  dS = P (dP - delta)                   (score_mod's derivative)
    dQ = dS K (float32 atomics),  dV += P^T dO,  dK += dS^T Q
five tile products, each tile's S and dP computed once (the Triton backward's dq kernel computes
them a second time). lse2 and delta per row come from the Triton dq kernel run with
WANT_DQ=False (`backward.flex_backward`), launched first on the same stream, which also zeroes dq_acc.

Partitions (gl.warp_specialize):
  * consumer (the default partition), 8 warps, in one of two forms (KV_ROWS_ON_M, by head dim):
    - up to 64 and over 128 (`_tiles_q_rows`): S and dP with the q rows on the wgmma M axis and the
      kv columns split between the two warpgroups (a thread holds 2 rows' lse2 / delta); P and dS
      through shared memory, where they are the A operands of dV, dK (transposed) and dQ. Over 128
      a program has 64 kv rows, and the warpgroups split dK's and dV's head dim instead of their
      rows (at 256: 64 registers a thread each, the tiles 208 KB of shared memory);
    - over 64 (`_tiles_kv_rows`): S^T and dP^T with the kv rows on M, each warpgroup 64 of them;
      P^T and dS^T stay in registers as dV's and dK's A operands, dS^T goes through shared memory
      for dQ only (fewer shared-memory bytes a tile); a thread needs 16 rows' lse2 / delta, which
      it reads from shared memory, where the next tile's are stored (2 loads a thread, not 32).
    dV and dK (up to 128): each warpgroup BLOCK_N / 2 kv rows; dQ: each warpgroup half the head
    dim, added by 8-byte atomics straight from its registers while the last wgmmas of the tile run.
  * producer, 1 warp: the TMA loads of each q and dO tile into a STAGES-deep ring; slot s is
    refilled once `qdo_empty[s]` says the consumers are done with it.

Registers decide this kernel's speed: where ptxas cannot keep the in-flight wgmmas' accumulators
in registers it serializes every wgmma (its C7512 note; benchmarks/aot_inspect.py reports it).
That happened to the asynchronous forms tried before this one (a dQ writer warp given more
registers than the producer, which a warpgroup's shared count took from the consumers), and the
K / V wgmma descriptors, hoisted out of the loop, were spilled and reloaded every tile until the
loop remade them (`_tile_slot`). A dQ writer warp that took each tile's dQ through shared memory
measured slower than the consumers' own atomics (one warp's atomics held the consumers back; D=64
0.71-0.83x the Triton kernels against 1.03-1.12x).

Measured on an H200 (B=4, H=16, S=8K, bf16, fwd+bwd, against the Triton dq + dk/dv kernels in one
process, benchmarks/ab_options.py; benchmarks/RESULTS.md, "The Hopper backward: five products"):
D=64 1.02-1.12x but ALiBi 0.99x (config.HOPPER_BWD_DEFAULT); D=128 in the kv-rows form 0.99-1.10x
on the seven cases of PEERS.md (ALiBi 0.99x; with lse2 / delta loaded from global memory each tile:
0.89-1.06x, ALiBi 0.89x), in the q-rows form 0.87-0.98x; D=256 1.16-1.41x on the seven cases.

Holes filled by `flexattn.kernels.source.fill`, as in the Triton backward: {SCORE_MOD},
{MASK_MOD}, {SCORE_MOD_BWD} and the captured tensors' parameter lists.
"""
from __future__ import annotations

import torch

from . import config, launcher
from .blocks import bm_strides, q_lists
from .config import LOG2E, pad_dim
from .hopper_forward import GLUON_PRELUDE, descriptor, gluon_missing, hopper_unsupported, tma_unsupported
from .launcher import cdiv, next_pow2

HOPPER_BWD_TEMPLATE = GLUON_PRELUDE + r'''
{SCORE_MOD}

{MASK_MOD}

{SCORE_MOD_BWD}


@gluon.jit
def _grad_atomic_add(ptr, value, mask):
    """score_mod_bwd's atomic into a captured tensor's gradient (mask None: every address).
    A tile summed over one axis (keep_dims) keeps the wgmma layout, whose registers hold each
    of its addresses many times over (16 at a 64-wide tile) and each copy would be added:
    such a column or row goes to a layout that holds each address once per thread first."""
    if len(value.shape) == 2:
        if value.shape[1] == 1:
            one: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [gl.num_warps(), 1], [0, 1])
        else:
            one: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, gl.num_warps()], [1, 0])
        ptr = gl.convert_layout(ptr, one)
        value = gl.convert_layout(value, one)
        if mask is not None:
            mask = gl.convert_layout(mask, one)
    gl.atomic_add(ptr, value, mask=mask, sem="relaxed")


@gluon.jit
def _producer(q_desc, do_desc, q_ring, do_ring, q_ready, do_ready, qdo_empty,
              Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
              stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
              stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim,
              off_z, off_hkv, sparse_n,
              GQA_GROUP: gl.constexpr, HAS_FULL: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr,
              BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    it = gl.to_tensor(0)
    for g in range(GQA_GROUP):
        off_h = off_hkv * GQA_GROUP + g
        n_part, idx_ptr = _block_list(Q_NUM, Q_IDX, off_z, off_h, sparse_n,
                                      stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im)
        it = _load_list(q_desc, do_desc, q_ring, do_ring, q_ready, do_ready, qdo_empty, qdo_empty, idx_ptr, n_part,
                        off_z, off_h, it, SPARSE_BLOCK=SPARSE_Q_BLOCK, BLOCK=BLOCK_M, STAGES=STAGES)
        if HAS_FULL:
            n_full, fidx_ptr = _block_list(FULL_Q_NUM, FULL_Q_IDX, off_z, off_h, sparse_n,
                                           stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim)
            it = _load_list(q_desc, do_desc, q_ring, do_ring, q_ready, do_ready, qdo_empty, qdo_empty, fidx_ptr, n_full,
                            off_z, off_h, it, SPARSE_BLOCK=SPARSE_Q_BLOCK, BLOCK=BLOCK_M, STAGES=STAGES)


@gluon.jit
def _row_stats(lse_base, delta_base, offs_m, Q_LEN):
    # lse2 and delta of a q tile's rows (rows past Q_LEN: lse2 = inf, so their P is 0)
    ok = offs_m < Q_LEN
    return gl.load(lse_base + offs_m, mask=ok, other=float("inf")), gl.load(delta_base + offs_m, mask=ok, other=0.0)


@gluon.jit
def _tile_slot(q_ring, do_ring, k_smem, v_smem, it, STAGES: gl.constexpr):
    # the it-th q tile's ring slot and phase, and the tiles its products read. K and V by a slot index
    # the compiler cannot prove 0 (`it` stays far below 2**30): their wgmma descriptors are then remade
    # each tile (a few integer adds) instead of hoisted out of the loop, where they took 48 registers
    # and were spilled and reloaded every tile
    s = it % STAGES
    return s, (it // STAGES) & 1, q_ring.index(s), do_ring.index(s), k_smem.index(it >> 30), v_smem.index(it >> 30)


@gluon.jit
def _probabilities(qk, lse2, off_z, off_h, q_idx, kv_idx, SCALE, SCALE_LOG2, {SCORE_BUF_PARAMS_TRAIL}
                   HAS_SCORE_MOD: gl.constexpr, Q_AXIS: gl.constexpr):
    # P = exp2(score * log2 e - lse2) of a tile of products whose q rows lie on axis Q_AXIS, and the
    # scaled scores the score_mod's derivative takes (without a score_mod: the products, unused)
    LOG2E: gl.constexpr = 1.4426950408889634
    if HAS_SCORE_MOD:
        sc = qk * SCALE
        p = gl.exp2(score_mod(sc, off_z, off_h, q_idx, kv_idx{SCORE_BUF_ARGS}) * LOG2E
                    - gl.expand_dims(lse2, 1 - Q_AXIS))
    else:
        sc = qk
        p = gl.exp2(qk * SCALE_LOG2 - gl.expand_dims(lse2, 1 - Q_AXIS))
    return p, sc


@gluon.jit
def _apply_masks(p, off_z, off_h, q_idx, kv_idx, Q_LEN, KV_LEN, {MASK_BUF_PARAMS_TRAIL}
                 IS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr, Q_DIVISIBLE: gl.constexpr,
                 KV_DIVISIBLE: gl.constexpr):
    # P of a tile with the mask_mod (partial blocks only) and the lengths applied, and where it holds
    # (True: everywhere; a score_mod's derivative takes it as a tensor)
    if IS_FULL and KV_DIVISIBLE and not HAS_SCORE_MOD:
        valid = True
    else:
        valid = gl.full(p.shape, 1, gl.int1, layout=p.type.layout)
        if not IS_FULL:
            valid = valid & mask_mod(off_z, off_h, q_idx, kv_idx{MASK_BUF_ARGS})
            if not Q_DIVISIBLE:
                valid = valid & (q_idx < Q_LEN)
        if not KV_DIVISIBLE:
            valid = valid & (kv_idx < KV_LEN)
        p = gl.where(valid, p, 0.0)
    return p, valid


@gluon.jit
def _add_dq(dq_base, dq, tile_m, Q_LEN, SCALE, IS_FULL: gl.constexpr, Q_DIVISIBLE: gl.constexpr,
            QK_HEAD: gl.constexpr):
    # a tile's dQ added to the float32 dq buffer from the registers that hold it (8-byte atomics,
    # fire and forget; masked only where a row or column can lie past the end: a masked atomic is a branch)
    QK_PAD: gl.constexpr = dq.shape[1]
    rows = tile_m + gl.expand_dims(gl.arange(0, dq.shape[0], layout=gl.SliceLayout(1, dq.type.layout)), 1)
    cols = gl.expand_dims(gl.arange(0, QK_PAD, layout=gl.SliceLayout(0, dq.type.layout)), 0)
    ptrs = dq_base + rows.to(gl.int64) * QK_HEAD + cols
    if not IS_FULL and not Q_DIVISIBLE:
        gl.atomic_add(ptrs, dq * SCALE, mask=(rows < Q_LEN) & (cols < QK_HEAD), sem="relaxed")
    elif QK_HEAD == QK_PAD:
        gl.atomic_add(ptrs, dq * SCALE, sem="relaxed")
    else:
        gl.atomic_add(ptrs, dq * SCALE, mask=cols < QK_HEAD, sem="relaxed")


@gluon.jit
def _tiles_q_rows(dk, dv, k_smem, v_smem, q_ring, do_ring, p_smem, ds_smem, q_ready, do_ready, qdo_empty,
                  idx_ptr, n_blocks, it, lse_base, delta_base, dq_base,
                  off_z, off_h, start_n, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                  {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}{GRAD_BUF_PARAMS_TRAIL}
                  IS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr, Q_DIVISIBLE: gl.constexpr,
                  KV_DIVISIBLE: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, QK_HEAD: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    # One q tile after another, the wgmmas asynchronous: S and dP issued together (P made while
    # dP runs), then dQ, dV and dK together, dQ added to the dq buffer while dV and dK run.
    # Q rows lie on the wgmma M axis, the warpgroups split the kv axis: a thread holds 2 rows'
    # lse / delta, not 16 as with S^T (registers decide whether ptxas keeps the wgmmas in flight).
    MULT: gl.constexpr = SPARSE_Q_BLOCK // BLOCK_M
    QK_PAD: gl.constexpr = q_ring.shape[2]
    WG: gl.constexpr = num_warps // 4
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                       instr_shape=[16, BLOCK_N // WG, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                        instr_shape=[16, QK_PAD // WG, 16])
    dtype: gl.constexpr = q_ring.dtype
    offs_m0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    # each tile's row start and lse2 / delta are loaded a tile ahead (two dependent global loads,
    # whose latency would otherwise stand between S and P)
    start_m = _tile_start(idx_ptr, 0, n_blocks, SPARSE_Q_BLOCK, BLOCK_M)
    lse2, delta = _row_stats(lse_base, delta_base, start_m + offs_m0, Q_LEN)
    for t in range(n_blocks * MULT):
        s, phase, q_s, do_s, k_s, v_s = _tile_slot(q_ring, do_ring, k_smem, v_smem, it, STAGES)
        tile_m = start_m
        q_idx = gl.expand_dims(tile_m + offs_m0, 1)
        # (made here, not once for the program: kept, its 16 values a thread were live through every tile)
        kv_idx = gl.expand_dims(start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
        mbarrier.wait(q_ready.index(s), phase)
        # (the zero accumulators are made where used: hoisted out of the loop they stay live)
        qk = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout),
                           use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(s), phase)
        dp = warpgroup_mma(do_s, v_s.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout),
                           use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(1, deps=[qk])
        p, sc = _probabilities(qk, lse2, off_z, off_h, q_idx, kv_idx, SCALE, SCALE_LOG2, {SCORE_BUF_ARGS_TRAIL}
                               HAS_SCORE_MOD=HAS_SCORE_MOD, Q_AXIS=0)
        p, valid = _apply_masks(p, off_z, off_h, q_idx, kv_idx, Q_LEN, KV_LEN, {MASK_BUF_ARGS_TRAIL}
                                IS_FULL=IS_FULL, HAS_SCORE_MOD=HAS_SCORE_MOD, Q_DIVISIBLE=Q_DIVISIBLE,
                                KV_DIVISIBLE=KV_DIVISIBLE)
        # P and dS go through shared memory: P^T and dS^T are dV's and dK's A operands, dS dQ's.
        # The tile's closing barrier (below) keeps the next tile's stores behind every read of these.
        p_smem.store(p.to(dtype))
        dp = warpgroup_mma_wait(0, deps=[dp])
        ds = p * (dp - gl.expand_dims(delta, 1))
        if HAS_SCORE_MOD:
            ds = score_mod_bwd(sc, ds, valid, off_z, off_h, q_idx, kv_idx{SCORE_BUF_ARGS}{GRAD_BUF_ARGS},
                               Q_AXIS=0, ACCUM=True, FIXED_POINT=False)
        ds_smem.store(ds.to(dtype))
        fence_async_shared()
        _cta_barrier()
        dq = warpgroup_mma(ds_smem, k_s, gl.zeros([BLOCK_M, QK_PAD], gl.float32, layout=dq_layout),
                           use_acc=False, is_async=True)
        dv = warpgroup_mma(p_smem.permute((1, 0)), do_s, dv, is_async=True)
        dk = warpgroup_mma(ds_smem.permute((1, 0)), q_s, dk, is_async=True)
        start_m = _tile_start(idx_ptr, t + 1, n_blocks, SPARSE_Q_BLOCK, BLOCK_M)  # (past the list: 0)
        lse2, delta = _row_stats(lse_base, delta_base, start_m + offs_m0, Q_LEN)
        dq = warpgroup_mma_wait(2, deps=[dq])
        _add_dq(dq_base, dq, tile_m, Q_LEN, SCALE, IS_FULL=IS_FULL, Q_DIVISIBLE=Q_DIVISIBLE, QK_HEAD=QK_HEAD)
        dv, dk = warpgroup_mma_wait(0, deps=[dv, dk])
        # every consumer warp has finished the tile's wgmmas: the q / dO slot is free
        _cta_barrier()
        mbarrier.arrive(qdo_empty.index(s), count=1)
        it += 1
    return dk, dv, it


@gluon.jit
def _tiles_kv_rows(dk, dv, k_smem, v_smem, q_ring, do_ring, p_smem, ds_smem, q_ready, do_ready, qdo_empty,
                   idx_ptr, n_blocks, it, lse_base, delta_base, dq_base,
                   off_z, off_h, start_n, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                   {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}{GRAD_BUF_PARAMS_TRAIL}
                   IS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr, Q_DIVISIBLE: gl.constexpr,
                   KV_DIVISIBLE: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, QK_HEAD: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    # The same tile products with the kv rows on the wgmma M axis (S^T = K Q^T, dP^T = V dO^T;
    # each warpgroup 64 kv rows): P^T and dS^T stay in registers as the A operands of dV and dK,
    # only dS^T goes through shared memory (dQ's A operand, both warpgroups' halves). Fewer
    # shared-memory bytes a tile than with q rows on M (no P store, no P / dS reads for dV / dK),
    # at the price of 16 rows' lse2 / delta a thread: p_smem holds them ([2, BLOCK_M] float32),
    # each tile's loaded from global memory a tile ahead, one value a thread, and stored there.
    MULT: gl.constexpr = SPARSE_Q_BLOCK // BLOCK_M
    QK_PAD: gl.constexpr = q_ring.shape[2]
    WG: gl.constexpr = num_warps // 4
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                        instr_shape=[16, QK_PAD // WG, 16])
    dv_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dv.type.layout, k_width=2)
    dk_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)
    dtype: gl.constexpr = q_ring.dtype
    offs_m0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    stat_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    offs_stat = gl.arange(0, BLOCK_M, layout=stat_layout)
    lse_smem = p_smem.index(0)
    delta_smem = p_smem.index(1)
    start_m = _tile_start(idx_ptr, 0, n_blocks, SPARSE_Q_BLOCK, BLOCK_M)
    lse_next, delta_next = _row_stats(lse_base, delta_base, start_m + offs_stat, Q_LEN)
    lse_smem.store(lse_next)
    delta_smem.store(delta_next)
    _cta_barrier()
    for t in range(n_blocks * MULT):
        s, phase, q_s, do_s, k_s, v_s = _tile_slot(q_ring, do_ring, k_smem, v_smem, it, STAGES)
        tile_m = start_m
        offs_m = tile_m + offs_m0
        q_idx = gl.expand_dims(offs_m, 0)
        kv_idx = gl.expand_dims(start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout)), 1)
        mbarrier.wait(q_ready.index(s), phase)
        qkT = warpgroup_mma(k_s, q_s.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout),
                            use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(s), phase)
        dpT = warpgroup_mma(v_s, do_s.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout),
                            use_acc=False, is_async=True)
        lse2 = lse_smem.load(gl.SliceLayout(0, s_layout))
        qkT = warpgroup_mma_wait(1, deps=[qkT])
        pT, sT = _probabilities(qkT, lse2, off_z, off_h, q_idx, kv_idx, SCALE, SCALE_LOG2, {SCORE_BUF_ARGS_TRAIL}
                                HAS_SCORE_MOD=HAS_SCORE_MOD, Q_AXIS=1)
        pT, valid = _apply_masks(pT, off_z, off_h, q_idx, kv_idx, Q_LEN, KV_LEN, {MASK_BUF_ARGS_TRAIL}
                                 IS_FULL=IS_FULL, HAS_SCORE_MOD=HAS_SCORE_MOD, Q_DIVISIBLE=Q_DIVISIBLE,
                                 KV_DIVISIBLE=KV_DIVISIBLE)
        delta = delta_smem.load(gl.SliceLayout(0, s_layout))
        dpT = warpgroup_mma_wait(0, deps=[dpT])
        dsT = pT * (dpT - gl.expand_dims(delta, 0))
        if HAS_SCORE_MOD:
            dsT = score_mod_bwd(sT, dsT, valid, off_z, off_h, q_idx, kv_idx{SCORE_BUF_ARGS}{GRAD_BUF_ARGS},
                                Q_AXIS=1, ACCUM=True, FIXED_POINT=False)
        dsT = dsT.to(dtype)
        ds_smem.store(dsT)
        dv = warpgroup_mma(gl.convert_layout(pT.to(dtype), dv_op), do_s, dv, is_async=True)
        # both warpgroups' dS^T rows stored before either reads them as dQ's A operand
        fence_async_shared()
        _cta_barrier()
        dq = warpgroup_mma(ds_smem.permute((1, 0)), k_s, gl.zeros([BLOCK_M, QK_PAD], gl.float32, layout=dq_layout),
                           use_acc=False, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(dsT, dk_op), q_s, dk, is_async=True)
        start_m = _tile_start(idx_ptr, t + 1, n_blocks, SPARSE_Q_BLOCK, BLOCK_M)  # (past the list: 0)
        lse_next, delta_next = _row_stats(lse_base, delta_base, start_m + offs_stat, Q_LEN)
        dv, dq = warpgroup_mma_wait(1, deps=[dv, dq])
        _add_dq(dq_base, dq, tile_m, Q_LEN, SCALE, IS_FULL=IS_FULL, Q_DIVISIBLE=Q_DIVISIBLE, QK_HEAD=QK_HEAD)
        dk = warpgroup_mma_wait(0, deps=[dk])
        # (every warp read this tile's statistics before the barrier above)
        lse_smem.store(lse_next)
        delta_smem.store(delta_next)
        # every consumer warp has finished the tile's wgmmas: the q / dO slot and ds_smem are free
        _cta_barrier()
        mbarrier.arrive(qdo_empty.index(s), count=1)
        it += 1
    return dk, dv, it


@gluon.jit
def _consumer(k_smem, v_smem, q_ring, do_ring, p_smem, ds_smem, kv_bar, q_ready, do_ready, qdo_empty,
              Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
              stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
              stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim,
              LSE2, DELTA, DQ_ACC, off_z, off_hkv, start_n, sparse_n, HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
              {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}{GRAD_BUF_PARAMS_TRAIL}
              GQA_GROUP: gl.constexpr, HAS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr,
              Q_DIVISIBLE: gl.constexpr, KV_DIVISIBLE: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, QK_HEAD: gl.constexpr, STAGES: gl.constexpr,
              KV_ROWS_ON_M: gl.constexpr, num_warps: gl.constexpr):
    QK_PAD: gl.constexpr = k_smem.shape[2]
    V_PAD: gl.constexpr = v_smem.shape[2]
    # dK and dV: a warp 16 kv rows; where the warps outnumber the row slices (64 kv rows, head dims
    # over 128) the warpgroups split the head dim instead
    ROW_WARPS: gl.constexpr = BLOCK_N // 16
    COL_WARPS: gl.constexpr = num_warps // ROW_WARPS
    dk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[ROW_WARPS, COL_WARPS],
                                                        instr_shape=[16, QK_PAD // COL_WARPS, 16])
    dv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[ROW_WARPS, COL_WARPS],
                                                        instr_shape=[16, V_PAD // COL_WARPS, 16])
    dk = gl.zeros([BLOCK_N, QK_PAD], gl.float32, layout=dk_layout)
    dv = gl.zeros([BLOCK_N, V_PAD], gl.float32, layout=dv_layout)
    tiles: gl.constexpr = _tiles_kv_rows if KV_ROWS_ON_M else _tiles_q_rows
    mbarrier.wait(kv_bar, 0)
    it = gl.to_tensor(0)
    for g in range(GQA_GROUP):
        off_h = off_hkv * GQA_GROUP + g
        row = (off_z * HQ + off_h).to(gl.int64) * Q_LEN
        n_part, idx_ptr = _block_list(Q_NUM, Q_IDX, off_z, off_h, sparse_n,
                                      stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im)
        dk, dv, it = tiles(
            dk, dv, k_smem, v_smem, q_ring, do_ring, p_smem, ds_smem, q_ready, do_ready, qdo_empty,
            idx_ptr, n_part, it, LSE2 + row, DELTA + row, DQ_ACC + row * QK_HEAD,
            off_z, off_h, start_n, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
            {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}{GRAD_BUF_ARGS_TRAIL}
            IS_FULL=False, HAS_SCORE_MOD=HAS_SCORE_MOD, Q_DIVISIBLE=Q_DIVISIBLE, KV_DIVISIBLE=KV_DIVISIBLE,
            SPARSE_Q_BLOCK=SPARSE_Q_BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, QK_HEAD=QK_HEAD, STAGES=STAGES,
            num_warps=num_warps)
        if HAS_FULL:
            n_full, fidx_ptr = _block_list(FULL_Q_NUM, FULL_Q_IDX, off_z, off_h, sparse_n,
                                           stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim)
            dk, dv, it = tiles(
                dk, dv, k_smem, v_smem, q_ring, do_ring, p_smem, ds_smem, q_ready, do_ready, qdo_empty,
                fidx_ptr, n_full, it, LSE2 + row, DELTA + row, DQ_ACC + row * QK_HEAD,
                off_z, off_h, start_n, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}{GRAD_BUF_ARGS_TRAIL}
                IS_FULL=True, HAS_SCORE_MOD=HAS_SCORE_MOD, Q_DIVISIBLE=Q_DIVISIBLE, KV_DIVISIBLE=KV_DIVISIBLE,
                SPARSE_Q_BLOCK=SPARSE_Q_BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, QK_HEAD=QK_HEAD, STAGES=STAGES,
                num_warps=num_warps)
    return dk, dv


@gluon.jit
def flex_bwd_dkdv_hopper(q_desc, k_desc, v_desc, do_desc, DK, DV, LSE2, DELTA, DQ_ACC,
                         Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
                         stride_dkz, stride_dkh, stride_dkn, stride_dvz, stride_dvh, stride_dvn,
                         stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
                         stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim,
                         HQ, HKV, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                         {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}{GRAD_BUF_PARAMS_TRAIL}
                         GQA_GROUP: gl.constexpr, HAS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         SPARSE_Q_BLOCK: gl.constexpr, SPARSE_KV_BLOCK: gl.constexpr,
                         Q_DIVISIBLE: gl.constexpr, KV_DIVISIBLE: gl.constexpr, STAGES: gl.constexpr,
                         QK_HEAD: gl.constexpr, V_HEAD: gl.constexpr, QK_HEAD_PAD: gl.constexpr,
                         V_HEAD_PAD: gl.constexpr, FP16: gl.constexpr, KV_ROWS_ON_M: gl.constexpr,
                         num_warps: gl.constexpr):
    # descriptors: rank 4 over [B, H, S, D] with [1, 1, rows, D_PAD] boxes (hopper_forward.descriptor)
    gl.static_assert(q_desc.block_type.shape[3] == QK_HEAD_PAD and v_desc.block_type.shape[3] == V_HEAD_PAD)
    gl.static_assert((q_desc.dtype == gl.float16) == FP16)
    gl.static_assert(SPARSE_KV_BLOCK % BLOCK_N == 0)
    gl.static_assert(SPARSE_Q_BLOCK % BLOCK_M == 0)
    gl.static_assert(BLOCK_N == 16 * num_warps or (BLOCK_N == 8 * num_warps and not KV_ROWS_ON_M))
    pid_n = gl.program_id(0)
    pid_zh = gl.program_id(1)
    off_z = pid_zh // HKV
    off_hkv = pid_zh % HKV
    start_n = pid_n * BLOCK_N
    sparse_n = start_n // SPARSE_KV_BLOCK

    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, QK_HEAD_PAD],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, QK_HEAD_PAD], dtype))
    v_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, V_HEAD_PAD],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, V_HEAD_PAD], dtype))
    q_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, QK_HEAD_PAD],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, QK_HEAD_PAD], dtype))
    do_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, V_HEAD_PAD],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_M, V_HEAD_PAD], dtype))
    DS_SHAPE: gl.constexpr = [BLOCK_N, BLOCK_M] if KV_ROWS_ON_M else [BLOCK_M, BLOCK_N]  # dS^T / dS
    ds_smem = gl.allocate_shared_memory(dtype, DS_SHAPE, gl.NVMMASharedLayout.get_default_for(DS_SHAPE, dtype))
    if KV_ROWS_ON_M:  # P^T stays in registers; the q tile's lse2 and delta in its place
        p_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M],
                                           gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
    else:
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype))
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(s), count=1)
        mbarrier.init(do_ready.index(s), count=1)
        mbarrier.init(qdo_empty.index(s), count=1)
    fence_async_shared()
    # K and V of this kv tile: in shared memory for the whole walk
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    _tma_load(k_desc, [off_z, off_hkv, start_n, 0], kv_bar, k_smem.index(0).reshape(k_desc.block_type.shape))
    _tma_load(v_desc, [off_z, off_hkv, start_n, 0], kv_bar, v_smem.index(0).reshape(v_desc.block_type.shape))

    dk, dv = gl.warp_specialize([
        (_consumer, (k_smem, v_smem, q_ring, do_ring, p_smem, ds_smem, kv_bar, q_ready, do_ready, qdo_empty,
                     Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
                     stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
                     stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim,
                     LSE2, DELTA, DQ_ACC, off_z, off_hkv, start_n, sparse_n, HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                     {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}{GRAD_BUF_ARGS_TRAIL}
                     GQA_GROUP, HAS_FULL, HAS_SCORE_MOD, Q_DIVISIBLE, KV_DIVISIBLE, SPARSE_Q_BLOCK,
                     BLOCK_M, BLOCK_N, QK_HEAD, STAGES, KV_ROWS_ON_M, num_warps)),
        (_producer, (q_desc, do_desc, q_ring, do_ring, q_ready, do_ready, qdo_empty,
                     Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
                     stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
                     stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim,
                     off_z, off_hkv, sparse_n, GQA_GROUP, HAS_FULL, SPARSE_Q_BLOCK, BLOCK_M, STAGES)),
    ], [1], [24])

    # dk (scaled) and dv, rows past KV_LEN and columns past the head dims not stored
    dk_layout: gl.constexpr = dk.type.layout
    dv_layout: gl.constexpr = dv.type.layout
    offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, dk_layout))
    offs_d = gl.arange(0, QK_HEAD_PAD, layout=gl.SliceLayout(0, dk_layout))
    dk_ptrs = DK + off_z.to(gl.int64) * stride_dkz + off_hkv.to(gl.int64) * stride_dkh \
        + gl.expand_dims(offs_n, 1).to(gl.int64) * stride_dkn + gl.expand_dims(offs_d, 0)
    gl.store(dk_ptrs, (dk * SCALE).to(DK.dtype.element_ty),
             mask=(gl.expand_dims(offs_n, 1) < KV_LEN) & (gl.expand_dims(offs_d, 0) < QK_HEAD))
    offs_nv = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, dv_layout))
    offs_dv = gl.arange(0, V_HEAD_PAD, layout=gl.SliceLayout(0, dv_layout))
    dv_ptrs = DV + off_z.to(gl.int64) * stride_dvz + off_hkv.to(gl.int64) * stride_dvh \
        + gl.expand_dims(offs_nv, 1).to(gl.int64) * stride_dvn + gl.expand_dims(offs_dv, 0)
    gl.store(dv_ptrs, dv.to(DV.dtype.element_ty),
             mask=(gl.expand_dims(offs_nv, 1) < KV_LEN) & (gl.expand_dims(offs_dv, 0) < V_HEAD))
'''


def hopper_bwd_config(d: int, dv: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, STAGES, num_warps, KV_ROWS_ON_M): two consumer warpgroups, 64-row q
    tiles, two q / dO stages. Up to 128: 128 kv rows (64 a warpgroup), the kv rows on the wgmma M
    axis over 64 (measured on an H200 against the q-rows form, each against the Triton kernels in
    one process: D=128 1.00-1.06x against 0.92-0.98x, D=64 0.97-1.12x against 1.04-1.14x). Over
    128: 64 kv rows in the q-rows form, the warpgroups splitting dK's and dV's head dim (64
    registers a thread each at 256; K, V and two q / dO stages take 192 KB of shared memory)."""
    pad = max(pad_dim(d), pad_dim(dv))
    if pad > 128:
        return 64, 64, 2, 8, False
    return 64, 128, 2, 8, pad > 64


def hopper_backward_unsupported(plan, q, k, v, dout) -> str | None:
    """Why the Hopper backward kernel cannot take this backward (None: it can). dout None: not
    known yet (a forward planning its backward), taken to be contiguous as autograd gives it."""
    if config.device_key(q.device) != "sm90":
        return f"compute capability {config.device_key(q.device)} (sm90 only)"
    if plan.opts.get("DETERMINISTIC"):
        return ("DETERMINISTIC, given or set by torch.use_deterministic_algorithms(True) "
                "(its dq is summed by float atomics)")
    if max(q.shape[-1], v.shape[-1]) > 256:
        return f"head dims {q.shape[-1]} / {v.shape[-1]} (up to 256)"
    bm, bn, *_ = hopper_bwd_config(q.shape[-1], v.shape[-1])
    qb, kvb = plan.blocks.block
    if qb % bm or kvb % bn:
        return f"BlockMask BLOCK_SIZE {(qb, kvb)} (multiples of ({bm}, {bn}))"
    return (gluon_missing()
            or hopper_unsupported(q, k, v, (qb, kvb), plan.dropout_p, (plan.score_graph, plan.mask_graph))
            or (tma_unsupported("grad_out", dout) if dout is not None else None))


def use_hopper_backward(plan, q, k, v, dout, strict: bool = True) -> bool:
    """Whether the backward runs the Hopper kernel (dk, dv and dq) in place of the Triton dk/dv
    kernel: kernel_options "bwd_HOPPER" (default config.hopper_backward); True where a call cannot
    take it is a ValueError naming why (strict=False: False), the default falls back to the Triton
    kernels silently."""
    return config.take_option(plan.opts, "bwd_HOPPER", config.hopper_backward(q.shape[-1], v.shape[-1]),
                              lambda: hopper_backward_unsupported(plan, q, k, v, dout),
                              "run the Hopper backward kernel (the Triton kernels run without bwd_HOPPER)",
                              strict=strict)


def hopper_dkdv(plan, q, k, v, dout, dk, dv, lse2, delta, dq_acc, buf_args, gbufs):
    """Launch the Hopper backward kernel (after the dq kernel wrote lse2 / delta): dk, dv written,
    dq_acc (float32 [B, Hq, L, E], zeroed by the dq kernel) and the captured tensors' gradients (gbufs) added
    to; buf_args: the score_mod's then the mask_mod's captured-tensor arguments."""
    B, Hq, L, E = q.shape
    _, Hkv, S, Ev = v.shape
    bm, bn, stages, warps, kv_rows_on_m = hopper_bwd_config(E, Ev)
    blk = plan.blocks
    q_num, q_idx, fq_num, fq_idx = q_lists(blk)
    args = (descriptor(q, bm), descriptor(k, bn), descriptor(v, bn), descriptor(dout, bm), dk, dv, lse2, delta, dq_acc,
            q_num, q_idx, fq_num, fq_idx, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1),
            dv.stride(2), *bm_strides(q_num, q_idx), *bm_strides(fq_num, fq_idx),
            Hq, Hkv, L, S, plan.scale, plan.scale * LOG2E, *buf_args, *gbufs)
    kwargs = dict(GQA_GROUP=Hq // Hkv, HAS_FULL=blk.has_full, HAS_SCORE_MOD=plan.score_graph is not None,
                  BLOCK_M=bm, BLOCK_N=bn, SPARSE_Q_BLOCK=blk.block[0], SPARSE_KV_BLOCK=blk.block[1],
                  Q_DIVISIBLE=L % blk.block[0] == 0, KV_DIVISIBLE=S % blk.block[1] == 0, STAGES=stages,
                  QK_HEAD=E, V_HEAD=Ev, QK_HEAD_PAD=next_pow2(E), V_HEAD_PAD=next_pow2(Ev),
                  FP16=q.dtype == torch.float16, KV_ROWS_ON_M=kv_rows_on_m, num_warps=warps)
    module = plan.module("bwd_hopper")
    # a score_mod's captured-tensor gradients add layout-conversion scratch: at head dim 256 (208 KB of
    # tiles) that can pass the shared memory, and one q / dO stage is taken instead of two
    launcher.launch(module.flex_bwd_dkdv_hopper, (cdiv(S, bn), B * Hkv), args, kwargs,
                    ("bwd_hopper", id(module), q.dtype, E, Ev), shrink=None)
