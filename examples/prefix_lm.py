"""Prefix-LM with a per-batch prefix length (bidirectional prefix, causal after it).

Checks the result against the dense reference. Prints the comparison, the largest
difference and the bound; exits 1 with a message if the bound is exceeded.
"""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks
from flexattn.reference import reference_attention

BOUND = 1e-4  # float32 result against a float64 reference
B, H, L, E = 3, 2, 192, 32
prefix = torch.tensor([10, 64, 150])
q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
mod = masks.prefix_lm(prefix)
bm = create_block_mask(mod, B, None, L, L)
out = flex_attention(q, k, v, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), mask_mod=mod)
err = (out.double() - ref).abs().max().item()
print(f"prefix-LM, prefix lengths {prefix.tolist()}: flex_attention vs dense reference, "
      f"max |difference| {err:.2e}, bound {BOUND:.0e}")
if not err < BOUND:
    sys.exit(f"prefix_lm.py FAILED: flex_attention differs from the dense reference by {err:.2e} "
             f"(bound {BOUND:.0e})")
print("ok")
