"""lucidrains-style FlashAttention nn.Module: causal + key padding mask, flash vs dense paths."""
import sys

import torch

from flexattn.nn import FlashAttention

b, h, n, d = 2, 4, 100, 32
q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
mask = torch.ones(b, n, dtype=torch.bool)
mask[1, 60:] = False                                             # padding in batch 1
fast = FlashAttention(causal=True, flash=True).eval()
dense = FlashAttention(causal=True, flash=False).eval()
err = (fast(q, k, v, mask=mask) - dense(q, k, v, mask=mask)).abs().max().item()
print(f"flash vs dense max err {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
