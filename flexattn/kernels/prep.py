"""Small fixed (not generated) kernels around the attention kernels: the backward's
pre-pass (delta = rowsum(dO * O) - dlse and lse in the log2 domain, one launch instead of
five torch ops and two fp32 [B, H, L, Dv] temporaries) and the decode path's merge of
split-KV partials by log-sum-exp (one launch instead of a dozen torch ops)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import launch_cached, next_pow2, cdiv

LOG2E = 1.4426950408889634


@triton.jit
def _bwd_prep(OUT, DO, LSE, DLSE, DELTA, LSE2,
              stride_oz, stride_oh, stride_om, stride_ok,
              stride_dz, stride_dh, stride_dm, stride_dk,
              H, L,
              V_HEAD: tl.constexpr, V_HEAD_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr):
    pid = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, V_HEAD_PAD)
    ok = (rows[:, None] < L) & (cols[None, :] < V_HEAD)
    o = tl.load(OUT + z.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh
                + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_ok, mask=ok, other=0.0)
    do = tl.load(DO + z.to(tl.int64) * stride_dz + h.to(tl.int64) * stride_dh
                 + rows[:, None].to(tl.int64) * stride_dm + cols[None, :] * stride_dk, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    r_ok = rows < L
    flat = zh.to(tl.int64) * L + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + flat, mask=r_ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + flat, mask=r_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + flat, delta, mask=r_ok)
    tl.store(LSE2 + flat, lse2, mask=r_ok)


def bwd_prep(out, dout, lse, dlse):
    """(delta [B,H,L] fp32 = rowsum(dO*O) - dlse, lse2 [B,H,L] fp32 = lse*log2e, +inf for empty rows)"""
    B, H, L, Dv = out.shape
    delta = torch.empty(B, H, L, dtype=torch.float32, device=out.device)
    lse2 = torch.empty_like(delta)
    lse = lse if lse.is_contiguous() else lse.contiguous()
    if dlse is not None and not dlse.is_contiguous():
        dlse = dlse.contiguous()
    dpad = max(16, next_pow2(Dv))
    block = max(16, min(128, 8192 // dpad))
    launch_cached(_bwd_prep, (cdiv(L, block), B * H), (
        out, dout, lse, dlse if dlse is not None else lse, delta, lse2, *out.stride(), *dout.stride(), H, L),
        dict(V_HEAD=Dv, V_HEAD_PAD=dpad, BLOCK=block, HAS_DLSE=dlse is not None, num_warps=4))
    return delta, lse2


@triton.jit
def _decode_merge(ACC, M, L_, OUT, LSE, SPLITS, stride_oz, stride_oh, stride_om, stride_ok, H, QL,
                  V_HEAD: tl.constexpr, V_HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    # one program per (b, h, q row): partials [B, H, SPLITS, QL, (Dv)], m / l in the log2 domain
    row = tl.program_id(0)  # (b*H + h)*QL + q
    zh = row // QL
    qpos = row % QL
    sp = tl.arange(0, SPLITS_PAD)
    cols = tl.arange(0, V_HEAD_PAD)
    s_ok = sp < SPLITS
    part = (zh.to(tl.int64) * SPLITS + sp) * QL + qpos
    m = tl.load(M + part, mask=s_ok, other=float("-inf"))
    l = tl.load(L_ + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_tot = tl.sum(l * w, 0)
    acc = tl.load(ACC + part[:, None] * V_HEAD + cols[None, :], mask=s_ok[:, None] & (cols[None, :] < V_HEAD),
                  other=0.0)
    o = tl.sum(acc * w[:, None], 0)
    empty = l_tot == 0.0
    l_safe = tl.where(empty, 1.0, l_tot)
    o = o / l_safe
    z = zh // H
    h = zh % H
    tl.store(OUT + z.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh + qpos.to(tl.int64) * stride_om
             + cols * stride_ok, o.to(OUT.dtype.element_ty), mask=cols < V_HEAD)
    lse = tl.where(empty, float("-inf"), (m_max + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + row, lse)


def decode_merge(acc, m, l, dtype):
    """Combine split partials: acc [B,H,P,L,Dv] fp32 (unnormalised), m, l [B,H,P,L] (log2 domain)."""
    B, H, P, QL, Dv = acc.shape
    out = torch.empty(B, H, QL, Dv, dtype=dtype, device=acc.device)
    lse = torch.empty(B, H, QL, dtype=torch.float32, device=acc.device)
    launch_cached(_decode_merge, (B * H * QL,), (acc, m, l, out, lse, P, *out.stride(), H, QL),
                  dict(V_HEAD=Dv, V_HEAD_PAD=max(16, next_pow2(Dv)),
                       SPLITS_PAD=max(2, next_pow2(P)), num_warps=4))
    return out, lse
