"""Forward kernel: block-sparse online softmax (exp2 domain) over the BlockMask.

One program computes BLOCK_M query rows of one (batch, query head). It walks the row's
partial kv blocks (mask_mod applied) and then its full kv blocks (mask_mod skipped);
empty blocks are never visited. A BlockMask block may hold several kernel tiles
(SPARSE_KV_BLOCK = MULT * BLOCK_N): the loop runs over tiles and finds each tile's block
with one scalar load.

Holes filled by `flexattn.codegen`: {SCORE_MOD} / {MASK_MOD} (the `score_mod` and
`mask_mod` @triton.jit functions) and {SCORE_BUF_PARAMS} / {MASK_BUF_PARAMS} (their
captured tensors' pointer / stride / size parameters, threaded through every call).
"""
from __future__ import annotations

FWD_TEMPLATE = r'''
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
               KV_DIVISIBLE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    MULT: tl.constexpr = SPARSE_KV_BLOCK // BLOCK_N
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, QK_HEAD_PAD)
    offs_dv = tl.arange(0, V_HEAD_PAD)
    q_idx = offs_m[:, None]
    for it in range(0, n_blocks * MULT):
        blk = tl.load(idx_ptr + it // MULT)
        start_n = blk * SPARSE_KV_BLOCK + (it % MULT) * BLOCK_N
        offs_n = start_n + offs_n0
        # full blocks never hold padding (an edge block is never full), so no bounds check
        k_mask = offs_d[None, :] < QK_HEAD
        v_mask = offs_dv[None, :] < V_HEAD
        if not IS_FULL and not KV_DIVISIBLE:
            k_mask = k_mask & (offs_n[:, None] < KV_LEN)
            v_mask = v_mask & (offs_n[:, None] < KV_LEN)
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kk,
                    mask=k_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        kv_idx = offs_n[None, :]
        if HAS_SCORE_MOD:
            s = score_mod(qk * SCALE, off_z, off_h, q_idx, kv_idx{SCORE_BUF_ARGS}) * LOG2E
        else:
            s = qk * SCALE_LOG2  # scale and log2(e) folded into one multiply
        if not IS_FULL:
            keep = mask_mod(off_z, off_h, q_idx, kv_idx{MASK_BUF_ARGS})
            if not KV_DIVISIBLE:
                keep = keep & (kv_idx < KV_LEN)
            s = tl.where(keep, s, float("-inf"))
        # online softmax; m_i is -inf while a row has seen nothing (then use 0 as the shift)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(dropout_keep_triton(seed_lo, seed_hi, drop_threshold, off_z, off_h, q_idx, kv_idx), p, 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vk,
                    mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flex_fwd(Q, K, V, OUT, LSE,
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
             Q_DIVISIBLE: tl.constexpr, KV_DIVISIBLE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    off_z = pid_zh // HQ
    off_h = pid_zh % HQ
    off_hkv = off_h // GQA_GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, QK_HEAD_PAD)
    offs_dv = tl.arange(0, V_HEAD_PAD)

    # batch/head offsets in int64: B*H*S*D can pass 2^31
    q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh

    # load q: it stays in registers throughout
    q_mask = offs_d[None, :] < QK_HEAD
    if not Q_DIVISIBLE:
        q_mask = q_mask & (offs_m[:, None] < Q_LEN)
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qk,
                mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_HEAD_PAD], dtype=tl.float32)

    sparse_m = start_m // SPARSE_Q_BLOCK
    n_part = tl.load(KV_NUM + off_z * stride_nz + off_h * stride_nh + sparse_m * stride_nm)
    idx_ptr = KV_IDX + off_z.to(tl.int64) * stride_iz + off_h * stride_ih + sparse_m * stride_im
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, idx_ptr, n_part,
                               off_z, off_h, offs_m, KV_LEN, SCALE, SCALE_LOG2,
                               stride_kn, stride_kk, stride_vn, stride_vk,
                               seed_lo, seed_hi, drop_threshold,
                               {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                               False, HAS_SCORE_MOD, HAS_DROPOUT, QK_HEAD, QK_HEAD_PAD, V_HEAD, V_HEAD_PAD,
                               BLOCK_M, BLOCK_N, SPARSE_KV_BLOCK, KV_DIVISIBLE, DOT_PRECISION)
    if HAS_FULL:
        n_full = tl.load(FULL_KV_NUM + off_z * stride_fnz + off_h * stride_fnh + sparse_m * stride_fnm)
        fidx_ptr = FULL_KV_IDX + off_z.to(tl.int64) * stride_fiz + off_h * stride_fih + sparse_m * stride_fim
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, fidx_ptr, n_full,
                                   off_z, off_h, offs_m, KV_LEN, SCALE, SCALE_LOG2,
                                   stride_kn, stride_kk, stride_vn, stride_vk,
                                   seed_lo, seed_hi, drop_threshold,
                                   {SCORE_BUF_ARGS_TRAIL}{MASK_BUF_ARGS_TRAIL}
                                   True, HAS_SCORE_MOD, HAS_DROPOUT, QK_HEAD, QK_HEAD_PAD, V_HEAD, V_HEAD_PAD,
                                   BLOCK_M, BLOCK_N, SPARSE_KV_BLOCK, KV_DIVISIBLE, DOT_PRECISION)

    # fully masked rows (l == 0): output 0 and lse -inf, never NaN
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc * (DROP_SCALE / l_safe)[:, None]
    o_mask = offs_dv[None, :] < V_HEAD
    if not Q_DIVISIBLE:
        o_mask = o_mask & (offs_m[:, None] < Q_LEN)
    o_base = OUT + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_ok,
             acc.to(OUT.dtype.element_ty), mask=o_mask)
    if OUTPUT_LSE:
        LN2: tl.constexpr = 0.6931471805599453
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
        lse_ptr = LSE + pid_zh.to(tl.int64) * Q_LEN + offs_m
        if Q_DIVISIBLE:
            tl.store(lse_ptr, lse)
        else:
            tl.store(lse_ptr, lse, mask=offs_m < Q_LEN)
'''
