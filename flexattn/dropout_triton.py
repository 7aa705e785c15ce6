"""The Triton half of flexattn.dropout: the counter-based hash as @triton.jit functions for
the kernels' tiles, bit-identical to `flexattn.dropout.dropout_hash` (see its docstring for
the hash). The kernels read these through flexattn.dropout, which loads this module on
first access: the CPU path never imports Triton.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mix_triton(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def dropout_hash_triton(seed_lo, seed_hi, b, hq, q_idx, kv_idx):
    """uint32 hash; arguments are int32 (seed halves as `signed32`) scalars or tensors that
    broadcast, e.g. q_idx [M, 1] and kv_idx [1, N]. Bit-identical to `dropout_hash`."""
    x = _mix_triton(seed_hi.to(tl.uint32, bitcast=True) ^ 0x9E3779B9)
    x = _mix_triton(x ^ seed_lo.to(tl.uint32, bitcast=True))
    x = _mix_triton(x ^ b.to(tl.uint32, bitcast=True))
    x = _mix_triton(x ^ hq.to(tl.uint32, bitcast=True))
    x = _mix_triton(x ^ q_idx.to(tl.uint32, bitcast=True))
    return _mix_triton(x ^ (kv_idx.to(tl.uint32, bitcast=True) * 0x9E3779B9))


@triton.jit
def dropout_keep_triton(seed_lo, seed_hi, threshold, b, hq, q_idx, kv_idx):
    """True where kept: hash >= threshold (threshold = dropout_threshold(p), passed as a
    signed32 int32 kernel argument and compared as uint32)."""
    h = dropout_hash_triton(seed_lo, seed_hi, b, hq, q_idx, kv_idx)
    return h >= threshold.to(tl.uint32, bitcast=True)
