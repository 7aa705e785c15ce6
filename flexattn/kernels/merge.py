"""The decode path's merge of its split-KV partials by log-sum-exp: a small fixed (not
generated) kernel, one launch instead of a dozen torch ops."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import launch_cached, next_pow2


@triton.jit
def _decode_merge(ACC, M, L_, OUT, LSE, MAX, SPLITS, stride_oz, stride_oh, stride_om, stride_ok, H, QL,
                  V_HEAD: tl.constexpr, V_HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                  OUTPUT_MAX: tl.constexpr = False):
    # one program per (b, h, q row): partials [B, H, SPLITS, QL, (Dv)], m / l in the log2 domain;
    # OUTPUT_MAX: also store the row's max score (natural units, -inf on a fully masked row)
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
    if OUTPUT_MAX:
        tl.store(MAX + row, m_max * 0.6931471805599453)
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


def decode_merge(acc, m, l, dtype, output_max: bool = False):
    """Combine split partials: acc [B,H,P,L,Dv] fp32 (unnormalised), m, l [B,H,P,L] (log2 domain)
    -> (out, lse), and the rows' max scores (float32, natural units) too when output_max."""
    B, H, P, QL, Dv = acc.shape
    out = torch.empty(B, H, QL, Dv, dtype=dtype, device=acc.device)
    lse = torch.empty(B, H, QL, dtype=torch.float32, device=acc.device)
    mx = torch.empty(B, H, QL, dtype=torch.float32, device=acc.device) if output_max else None
    launch_cached(_decode_merge, (B * H * QL,),
                  (acc, m, l, out, lse, lse if mx is None else mx, P, *out.stride(), H, QL),
                  dict(V_HEAD=Dv, V_HEAD_PAD=max(16, next_pow2(Dv)),
                       SPLITS_PAD=max(2, next_pow2(P)), OUTPUT_MAX=output_max, num_warps=4))
    return (out, lse) if mx is None else (out, lse, mx)
