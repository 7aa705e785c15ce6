"""Triton source shared by the kernel templates (forward, backward, decode).

`COMMON_SOURCE` is prepended to every filled template, after `codegen.PRELUDE` (which
imports triton / tl), the way torch inductor concatenates its flex "common" template: each
piece below is written once and called from every kernel. All are @triton.jit helpers, so
Triton inlines them: the kernels compile to the same code as when the expressions were
written out in place.

    _head_base       a (batch, head) slice's base pointer, offsets in int64
    _block_list      one row of a BlockMask's block lists: (count, pointer to its indices)
    _tile_start      first position of tile t of a walk over a block list
    _tile_ptrs       the pointers of a [rows, cols] tile of a (batch, head) slice
    _load_at         their load, masked only where it can matter
    _load_tile       both; _store_tile: the store with the same masks
    _online_softmax  one step of the exp2-domain online softmax
"""
from __future__ import annotations

COMMON_SOURCE = r'''

@triton.jit
def _head_base(ptr, off_z, off_h, stride_z, stride_h):
    # the (batch, head) slice of a [B, H, ...] tensor; int64: B*H*S*D can pass 2^31
    return ptr + off_z.to(tl.int64) * stride_z + off_h.to(tl.int64) * stride_h


@triton.jit
def _block_list(NUM, IDX, off_z, off_h, row, stride_nz, stride_nh, stride_nm, stride_iz, stride_ih, stride_im):
    # (number of blocks, pointer to their indices) of BlockMask row `row` of (off_z, off_h);
    # NUM is [B, H, rows], IDX [B, H, rows, blocks] (either may be broadcast: stride 0)
    n = tl.load(NUM + off_z * stride_nz + off_h * stride_nh + row * stride_nm)
    idx_ptr = IDX + off_z.to(tl.int64) * stride_iz + off_h * stride_ih + row * stride_im
    return n, idx_ptr


@triton.jit
def _tile_start(idx_ptr, t, n_blocks, SPARSE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    # first position of tile t of the walked axis, whose BlockMask blocks of SPARSE_BLOCK
    # hold SPARSE_BLOCK // BLOCK tiles each (0 past the end: the value is never used)
    MULT: tl.constexpr = SPARSE_BLOCK // BLOCK
    j = t // MULT
    blk = tl.load(idx_ptr + j, mask=j < n_blocks, other=0)
    return blk * SPARSE_BLOCK + (t % MULT) * BLOCK


@triton.jit
def _tile_ptrs(base, offs_r, offs_c, stride_r, stride_c, OFFS_64: tl.constexpr):
    # pointers of tile [rows offs_r, cols offs_c] of a (batch, head) slice; in-slice
    # offsets in int64 when OFFS_64
    if OFFS_64:
        return base + offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :].to(tl.int64) * stride_c
    return base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c


@triton.jit
def _load_at(ptrs, offs_r, offs_c, R_LEN, CHECK_R: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr):
    # load tile `ptrs` (of _tile_ptrs(.., offs_r, offs_c, ..)), masked only where it can
    # matter: rows against R_LEN when CHECK_R, cols when C is padded to the power of two C_PAD
    if CHECK_R:
        if C == C_PAD:
            return tl.load(ptrs, mask=offs_r[:, None] < R_LEN, other=0.0)
        return tl.load(ptrs, mask=(offs_r[:, None] < R_LEN) & (offs_c[None, :] < C), other=0.0)
    if C == C_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_c[None, :] < C, other=0.0)


@triton.jit
def _load_tile(base, offs_r, offs_c, stride_r, stride_c, R_LEN,
               CHECK_R: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, OFFS_64: tl.constexpr):
    # tile [rows, cols] of a (batch, head) slice: _tile_ptrs then _load_at
    return _load_at(_tile_ptrs(base, offs_r, offs_c, stride_r, stride_c, OFFS_64=OFFS_64), offs_r, offs_c, R_LEN,
                    CHECK_R=CHECK_R, C=C, C_PAD=C_PAD)


@triton.jit
def _store_tile(base, offs_r, offs_c, stride_r, stride_c, R_LEN, value,
                CHECK_R: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, OFFS_64: tl.constexpr):
    # store `value` to the tile _load_tile reads (same arguments, same masks)
    ptrs = _tile_ptrs(base, offs_r, offs_c, stride_r, stride_c, OFFS_64=OFFS_64)
    if CHECK_R:
        if C == C_PAD:
            tl.store(ptrs, value, mask=offs_r[:, None] < R_LEN)
        else:
            tl.store(ptrs, value, mask=(offs_r[:, None] < R_LEN) & (offs_c[None, :] < C))
    elif C == C_PAD:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=offs_c[None, :] < C)


@triton.jit
def _online_softmax(m_i, l_i, t, TO_LOG2, FINITE: tl.constexpr):
    # One step of the online softmax in the exp2 domain over scores t ([rows, cols], -inf
    # where masked; t * TO_LOG2 is the score in the log2 domain, TO_LOG2 > 0). Returns
    # (m_new, alpha, p, l_new): the new running max, the factor that rescales what was
    # accumulated so far, the tile's unnormalised probabilities and the new running sum.
    # The multiply by TO_LOG2 waits for the exp2's argument, where it fuses with the shift
    # (one FMA per score): max(t) * TO_LOG2 == max(t * TO_LOG2) exactly, rounding being
    # monotone. m_i is -inf while a row has seen nothing (then 0 is the shift); FINITE:
    # every score of the tile is finite, so m_new is too and needs no such check.
    m_new = tl.maximum(m_i, tl.max(t, 1) * TO_LOG2)
    if FINITE:
        m_shift = m_new
    else:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(t * TO_LOG2 - m_shift[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, alpha, p, l_new

'''
