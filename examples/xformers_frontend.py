"""xFormers-style API: pack three sequences, causal per sequence, compare with each sequence alone."""
import sys

import torch

from flexattn.frontends.xformers import BlockDiagonalMask, LowerTriangularMask, memory_efficient_attention

H, K = 4, 32
xs = [torch.randn(1, n, H, K) for n in (40, 100, 17)]          # [B, M, H, K] each
attn_bias, x = BlockDiagonalMask.from_tensor_list(xs)            # x: [1, 157, H, K]
out = memory_efficient_attention(x, x, x, attn_bias=attn_bias.make_causal())
ok = True
for o, xi in zip(attn_bias.split(out), xs):
    alone = memory_efficient_attention(xi, xi, xi, attn_bias=LowerTriangularMask())
    err = (o - alone).abs().max().item()
    print(f"sequence of {xi.shape[1]:3d} tokens: max err {err:.2e}")
    ok &= err < 1e-5
sys.exit(0 if ok else 1)
