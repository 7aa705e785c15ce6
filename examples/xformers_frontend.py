"""xFormers-style API: pack three sequences, causal per sequence, compare with each sequence alone.

Prints each comparison, the largest difference and the bound; exits 1 with a message if a
bound is exceeded.
"""
import sys

import torch

from flexattn.frontends.xformers import BlockDiagonalMask, LowerTriangularMask, memory_efficient_attention

BOUND = 1e-5  # the same float32 attention computed packed and alone
H, K = 4, 32
xs = [torch.randn(1, n, H, K) for n in (40, 100, 17)]          # [B, M, H, K] each
attn_bias, x = BlockDiagonalMask.from_tensor_list(xs)            # x: [1, 157, H, K]
out = memory_efficient_attention(x, x, x, attn_bias=attn_bias.make_causal())
failed = []
for o, xi in zip(attn_bias.split(out), xs):
    alone = memory_efficient_attention(xi, xi, xi, attn_bias=LowerTriangularMask())
    err = (o - alone).abs().max().item()
    print(f"sequence of {xi.shape[1]:3d} tokens: packed (BlockDiagonalCausalMask) vs alone (LowerTriangularMask), "
          f"max |difference| {err:.2e}, bound {BOUND:.0e}")
    if not err < BOUND:
        failed.append(f"sequence of {xi.shape[1]} tokens differs by {err:.2e}")
if failed:
    sys.exit(f"xformers_frontend.py FAILED (bound {BOUND:.0e}): " + "; ".join(failed))
print("ok")
