"""Hopper (sm90) dk/dv backward kernel in Gluon, with dq by float32 atomics: TMA loads of the
q / dO tiles by a producer warp, wgmma from shared memory, the kv tile's K and V held in
shared memory throughout.

One program owns BLOCK_N kv rows of one (batch, kv head) and walks, for every query head of
its GQA group, the transposed BlockMask lists (q_* partial blocks, mask_mod applied, then
full_q_* blocks): per q tile of BLOCK_M rows
    S^T = K Q^T,  P^T = exp2(S^T * scale * log2 e - lse2)   (score_mod / mask_mod applied)
    dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta)  (score_mod's derivative)
    dK += dS^T Q,  dQ[tile] += (dS K) * scale  (dS through shared memory, float32 atomics)
so each tile's S and dP are computed once (the Triton backward's dq kernel computes them a
second time). lse2 and delta per row come from the Triton dq kernel run with WANT_DQ=False
(`backward.flex_backward`), launched first on the same stream.

Partitions (gl.warp_specialize):
  * producer, 1 warp: reads the q-block lists and issues the TMA loads of each q and dO tile
    into a STAGES-deep ring; slot s is refilled once `qdo_empty[s]` says the consumer is done.
  * consumer (the default partition), num_warps warps: two warpgroups of BLOCK_N / 2 kv rows
    for S^T, dP^T, dV, dK; for dQ (BLOCK_M q rows) they split the head dim.

The wgmmas here are issued and waited for one at a time. Measured on the H200 (bf16, B=4, H=16,
S=8K, causal, fwd+bwd with the Hopper forward, benchmarks/sweep_configs.py): 326-328 TFLOP/s at
D=128 and 295 at D=64, against 417-426 and 332-334 for the Triton backward, so it stays opt-in.
Asynchronous forms (S^T and dP^T issued together, P^T computed under dP^T, dS^T under dV) gained at
D=64 (321) and nothing at D=128: at 240 registers a consumer thread they spill (the transposed
tile's row statistics alone take 48 registers). benchmarks/RESULTS.md, "The Hopper dk/dv backward".

Holes filled by `flexattn.kernels.source.fill`, as in the Triton backward: {SCORE_MOD},
{MASK_MOD}, {SCORE_MOD_BWD} and the captured tensors' parameter lists.
"""
from __future__ import annotations

import torch

from . import config, launcher
from .blocks import bm_strides, q_lists
from .config import LOG2E
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
def _consume_list(dk, dv, k_smem, v_smem, q_ring, do_ring, ds_smem, q_ready, do_ready, qdo_empty,
                  idx_ptr, n_blocks, it, lse_base, delta_base, dq_base,
                  off_z, off_h, kv_idx, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                  {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}{GRAD_BUF_PARAMS_TRAIL}
                  IS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr, Q_DIVISIBLE: gl.constexpr,
                  KV_DIVISIBLE: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, QK_HEAD: gl.constexpr, DQ_PARTS: gl.constexpr, STAGES: gl.constexpr,
                  num_warps: gl.constexpr):
    MULT: gl.constexpr = SPARSE_Q_BLOCK // BLOCK_M
    LOG2E: gl.constexpr = 1.4426950408889634
    QK_PAD: gl.constexpr = q_ring.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    # dQ of a tile: BLOCK_M rows (one warpgroup's wgmma), the head dim split between the warpgroups
    WG: gl.constexpr = num_warps // 4
    DQ_COLS: gl.constexpr = QK_PAD // DQ_PARTS
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WG],
                                                        instr_shape=[16, DQ_COLS // WG, 16])
    dv_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dv.type.layout, k_width=2)
    dk_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)
    dtype: gl.constexpr = q_ring.dtype
    offs_m0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    offs_mq0 = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
    offs_d = gl.arange(0, DQ_COLS, layout=gl.SliceLayout(0, dq_layout))
    for t in range(n_blocks * MULT):
        start_m = _tile_start(idx_ptr, t, n_blocks, SPARSE_Q_BLOCK, BLOCK_M)
        s = it % STAGES
        phase = (it // STAGES) & 1
        offs_m = start_m + offs_m0
        q_idx = gl.expand_dims(offs_m, 0)
        if IS_FULL or Q_DIVISIBLE:
            lse2 = gl.load(lse_base + offs_m)
            delta = gl.load(delta_base + offs_m)
        else:
            lse2 = gl.load(lse_base + offs_m, mask=offs_m < Q_LEN, other=float("inf"))
            delta = gl.load(delta_base + offs_m, mask=offs_m < Q_LEN, other=0.0)
        q_s = q_ring.index(s)
        do_s = do_ring.index(s)
        mbarrier.wait(q_ready.index(s), phase)
        # (the zero accumulators are made where used: hoisted out of the loop they stay live)
        qkT = warpgroup_mma(k_smem, q_s.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout),
                            use_acc=False)
        if HAS_SCORE_MOD:
            sT = qkT * SCALE
            pT = gl.exp2(score_mod(sT, off_z, off_h, q_idx, kv_idx{SCORE_BUF_ARGS}) * LOG2E
                         - gl.expand_dims(lse2, 0))
        else:
            pT = gl.exp2(qkT * SCALE_LOG2 - gl.expand_dims(lse2, 0))
        if IS_FULL and KV_DIVISIBLE and not HAS_SCORE_MOD:
            valid = True
        else:
            valid = gl.full([BLOCK_N, BLOCK_M], 1, gl.int1, layout=s_layout)
            if not IS_FULL:
                valid = valid & mask_mod(off_z, off_h, q_idx, kv_idx{MASK_BUF_ARGS})
                if not Q_DIVISIBLE:
                    valid = valid & (q_idx < Q_LEN)
            if not KV_DIVISIBLE:
                valid = valid & (kv_idx < KV_LEN)
            pT = gl.where(valid, pT, 0.0)
        mbarrier.wait(do_ready.index(s), phase)
        dv = warpgroup_mma(gl.convert_layout(pT.to(dtype), dv_op), do_s, dv)
        dpT = warpgroup_mma(v_smem, do_s.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout),
                            use_acc=False)
        dsT = pT * (dpT - gl.expand_dims(delta, 0))
        if HAS_SCORE_MOD:
            dsT = score_mod_bwd(sT, dsT, valid, off_z, off_h, q_idx, kv_idx{SCORE_BUF_ARGS}{GRAD_BUF_ARGS},
                                Q_AXIS=1, ACCUM=True, FIXED_POINT=False)
        dsT = dsT.to(dtype)
        dk = warpgroup_mma(gl.convert_layout(dsT, dk_op), q_s, dk)
        # dS = (dS^T)^T as the A operand of dQ's wgmma, through shared memory: every consumer
        # warp has read the last tile's dS before any overwrites it, and has written before any reads
        _cta_barrier()
        ds_smem.store(dsT)
        fence_async_shared()
        _cta_barrier()
        # dQ in DQ_PARTS slices of the head dim (one [BLOCK_M, DQ_COLS] accumulator live at a time:
        # with dK and dV held, the whole [BLOCK_M, QK_PAD] one spilled)
        dq_tile = dq_base + start_m.to(gl.int64) * QK_HEAD
        for part in gl.static_range(DQ_PARTS):
            dq_part = warpgroup_mma(ds_smem.permute((1, 0)), k_smem.slice(part * DQ_COLS, DQ_COLS, dim=1),
                                    gl.zeros([BLOCK_M, DQ_COLS], gl.float32, layout=dq_layout), use_acc=False)
            cols = part * DQ_COLS + offs_d
            dq_offs = gl.expand_dims(offs_mq0, 1) * QK_HEAD + gl.expand_dims(cols, 0)
            dq_ok = (gl.expand_dims(start_m + offs_mq0, 1) < Q_LEN) & (gl.expand_dims(cols, 0) < QK_HEAD)
            gl.atomic_add(dq_tile + dq_offs, dq_part * SCALE, mask=dq_ok, sem="relaxed")
        mbarrier.arrive(qdo_empty.index(s), count=1)
        it += 1
    return dk, dv, it


@gluon.jit
def _consumer(k_smem, v_smem, q_ring, do_ring, ds_smem, kv_bar, q_ready, do_ready, qdo_empty,
              Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
              stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
              stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim,
              LSE2, DELTA, DQ_ACC, off_z, off_hkv, start_n, sparse_n, HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
              {SCORE_BUF_PARAMS_TRAIL}{MASK_BUF_PARAMS_TRAIL}{GRAD_BUF_PARAMS_TRAIL}
              GQA_GROUP: gl.constexpr, HAS_FULL: gl.constexpr, HAS_SCORE_MOD: gl.constexpr,
              Q_DIVISIBLE: gl.constexpr, KV_DIVISIBLE: gl.constexpr, SPARSE_Q_BLOCK: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, QK_HEAD: gl.constexpr, DQ_PARTS: gl.constexpr,
              STAGES: gl.constexpr, num_warps: gl.constexpr):
    QK_PAD: gl.constexpr = k_smem.shape[1]
    V_PAD: gl.constexpr = v_smem.shape[1]
    dk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, QK_PAD, 16])
    dv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, V_PAD, 16])
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    dk = gl.zeros([BLOCK_N, QK_PAD], gl.float32, layout=dk_layout)
    dv = gl.zeros([BLOCK_N, V_PAD], gl.float32, layout=dv_layout)
    kv_idx = gl.expand_dims(start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout)), 1)
    mbarrier.wait(kv_bar, 0)
    it = gl.to_tensor(0)
    for g in range(GQA_GROUP):
        off_h = off_hkv * GQA_GROUP + g
        row = (off_z * HQ + off_h).to(gl.int64) * Q_LEN
        n_part, idx_ptr = _block_list(Q_NUM, Q_IDX, off_z, off_h, sparse_n,
                                      stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im)
        dk, dv, it = _consume_list(
            dk, dv, k_smem, v_smem, q_ring, do_ring, ds_smem, q_ready, do_ready, qdo_empty,
            idx_ptr, n_part, it, LSE2 + row, DELTA + row, DQ_ACC + row * QK_HEAD,
            off_z, off_h, kv_idx, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
            {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}{GRAD_BUF_ARGS_TRAIL}
            IS_FULL=False, HAS_SCORE_MOD=HAS_SCORE_MOD, Q_DIVISIBLE=Q_DIVISIBLE, KV_DIVISIBLE=KV_DIVISIBLE,
            SPARSE_Q_BLOCK=SPARSE_Q_BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, QK_HEAD=QK_HEAD, DQ_PARTS=DQ_PARTS,
            STAGES=STAGES,
            num_warps=num_warps)
        if HAS_FULL:
            n_full, fidx_ptr = _block_list(FULL_Q_NUM, FULL_Q_IDX, off_z, off_h, sparse_n,
                                           stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim)
            dk, dv, it = _consume_list(
                dk, dv, k_smem, v_smem, q_ring, do_ring, ds_smem, q_ready, do_ready, qdo_empty,
                fidx_ptr, n_full, it, LSE2 + row, DELTA + row, DQ_ACC + row * QK_HEAD,
                off_z, off_h, kv_idx, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}{GRAD_BUF_ARGS_TRAIL}
                IS_FULL=True, HAS_SCORE_MOD=HAS_SCORE_MOD, Q_DIVISIBLE=Q_DIVISIBLE, KV_DIVISIBLE=KV_DIVISIBLE,
                SPARSE_Q_BLOCK=SPARSE_Q_BLOCK, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, QK_HEAD=QK_HEAD, DQ_PARTS=DQ_PARTS,
            STAGES=STAGES,
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
                         V_HEAD_PAD: gl.constexpr, FP16: gl.constexpr, DQ_PARTS: gl.constexpr,
                         num_warps: gl.constexpr):
    # descriptors: rank 4 over [B, H, S, D] with [1, 1, rows, D_PAD] boxes (hopper_forward.descriptor)
    gl.static_assert(q_desc.block_type.shape[3] == QK_HEAD_PAD and v_desc.block_type.shape[3] == V_HEAD_PAD)
    gl.static_assert((q_desc.dtype == gl.float16) == FP16)
    gl.static_assert(SPARSE_KV_BLOCK % BLOCK_N == 0)
    gl.static_assert(SPARSE_Q_BLOCK % BLOCK_M == 0)
    gl.static_assert(BLOCK_N == 16 * num_warps)
    pid_n = gl.program_id(0)
    pid_zh = gl.program_id(1)
    off_z = pid_zh // HKV
    off_hkv = pid_zh % HKV
    start_n = pid_n * BLOCK_N
    sparse_n = start_n // SPARSE_KV_BLOCK

    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, QK_HEAD_PAD],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, QK_HEAD_PAD], dtype))
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, V_HEAD_PAD],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, V_HEAD_PAD], dtype))
    q_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, QK_HEAD_PAD],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, QK_HEAD_PAD], dtype))
    do_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, V_HEAD_PAD],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_M, V_HEAD_PAD], dtype))
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
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
    _tma_load(k_desc, [off_z, off_hkv, start_n, 0], kv_bar, k_smem.reshape(k_desc.block_type.shape))
    _tma_load(v_desc, [off_z, off_hkv, start_n, 0], kv_bar, v_smem.reshape(v_desc.block_type.shape))

    dk, dv = gl.warp_specialize([
        (_consumer, (k_smem, v_smem, q_ring, do_ring, ds_smem, kv_bar, q_ready, do_ready, qdo_empty,
                     Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
                     stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im,
                     stride_fnz, stride_fnh, stride_fnm, stride_fiz, stride_fih, stride_fim,
                     LSE2, DELTA, DQ_ACC, off_z, off_hkv, start_n, sparse_n, HQ, Q_LEN, KV_LEN, SCALE, SCALE_LOG2,
                     {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}{GRAD_BUF_ARGS_TRAIL}
                     GQA_GROUP, HAS_FULL, HAS_SCORE_MOD, Q_DIVISIBLE, KV_DIVISIBLE, SPARSE_Q_BLOCK,
                     BLOCK_M, BLOCK_N, QK_HEAD, DQ_PARTS, STAGES, num_warps)),
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


def hopper_bwd_config(d: int, dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, STAGES, num_warps): 128 kv rows (two consumer warpgroups of 64),
    64-row q tiles, two q / dO stages."""
    return 64, 128, 2, 8


def hopper_backward_unsupported(plan, q, k, v, dout) -> str | None:
    """Why the Hopper dk/dv kernel cannot take this backward (None: it can)."""
    if config.device_key(q.device) != "sm90":
        return f"compute capability {config.device_key(q.device)} (sm90 only)"
    if plan.opts.get("DETERMINISTIC"):
        return "DETERMINISTIC (its dq is summed by float atomics)"
    if max(q.shape[-1], v.shape[-1]) > 128:  # dK and dV alone would take 256 registers a thread
        return f"head dims {q.shape[-1]} / {v.shape[-1]} (up to 128)"
    bm, bn, _, _ = hopper_bwd_config(q.shape[-1], v.shape[-1])
    qb, kvb = plan.blocks.block
    if qb % bm or kvb % bn:
        return f"BlockMask BLOCK_SIZE {(qb, kvb)} (multiples of ({bm}, {bn}))"
    return (gluon_missing() or hopper_unsupported(q, k, v, (qb, kvb), plan.dropout_p)
            or tma_unsupported("grad_out", dout))


def use_hopper_backward(plan, q, k, v, dout) -> bool:
    """Whether the backward's dk/dv runs the Hopper kernel: kernel_options "bwd_HOPPER" True
    asks for it (a ValueError naming why, if this backward cannot take it); off by default:
    slower than the Triton kernels on the H200 so far (see the module docstring)."""
    if not plan.opts.get("bwd_HOPPER", False):
        return False
    why = hopper_backward_unsupported(plan, q, k, v, dout)
    if why:
        raise ValueError(f"kernel_options['bwd_HOPPER'] = True: this backward cannot run the Hopper dk/dv kernel: "
                         f"{why}; drop bwd_HOPPER to run the Triton kernels")
    return True


def hopper_dkdv(plan, q, k, v, dout, dk, dv, lse2, delta, dq_acc, buf_args, gbufs):
    """Launch the Hopper dk/dv kernel (after the dq kernel wrote lse2 / delta): dk, dv written,
    dq_acc (float32 [B, Hq, L, E], zeroed) and the captured tensors' gradients (gbufs) added
    to; buf_args: the score_mod's then the mask_mod's captured-tensor arguments."""
    B, Hq, L, E = q.shape
    _, Hkv, S, Ev = v.shape
    bm, bn, stages, warps = hopper_bwd_config(E, Ev)
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
                  FP16=q.dtype == torch.float16, DQ_PARTS=2, num_warps=warps)
    launcher.launch_cached(plan.module("bwd_hopper").flex_bwd_dkdv_hopper, (cdiv(S, bn), B * Hkv), args, kwargs)
