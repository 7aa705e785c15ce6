"""lucidrains-style FlashAttention nn.Module: causal + key padding mask, flash vs dense paths.

Checks the module's flash path (flexattn) against its dense path on the same inputs.
Prints the comparison, the largest difference and the bound; exits 1 with a message if the
bound is exceeded.
"""
import sys

import torch

from flexattn.nn import FlashAttention

BOUND = 1e-4  # two float32 computations of the same attention
b, h, n, d = 2, 4, 100, 32
q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
mask = torch.ones(b, n, dtype=torch.bool)
mask[1, 60:] = False                                             # padding in batch 1
fast = FlashAttention(causal=True, flash=True).eval()
dense = FlashAttention(causal=True, flash=False).eval()
err = (fast(q, k, v, mask=mask) - dense(q, k, v, mask=mask)).abs().max().item()
print(f"FlashAttention(causal=True) with key padding: flash=True vs flash=False, "
      f"max |difference| {err:.2e}, bound {BOUND:.0e}")
if not err < BOUND:
    sys.exit(f"nn_module.py FAILED: the flash path differs from the dense path by {err:.2e} (bound {BOUND:.0e})")
print("ok")
