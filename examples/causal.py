"""Causal attention (top-left and bottom-right alignment), checked against the dense reference.

Prints the comparison it makes, the largest difference and the bound for each alignment;
exits 1 with a message if a bound is exceeded.
"""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks
from flexattn.reference import reference_attention

BOUND = 1e-4  # float32 result against a float64 reference
B, H, L, S, E = 2, 4, 256, 384, 32
q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
failed = []
for mod in [masks.causal(), masks.causal("bottom_right", q_len=L, kv_len=S)]:
    bm = create_block_mask(mod, None, None, L, S)
    out = flex_attention(q, k, v, block_mask=bm)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask_mod=mod)
    err = (out.double() - ref).abs().max().item()
    print(f"{mod.__name__} (L={L}, S={S}, {bm.sparsity():.1f}% of blocks skipped): flex_attention vs dense "
          f"reference, max |difference| {err:.2e}, bound {BOUND:.0e}")
    if not err < BOUND:
        failed.append(f"{mod.__name__} differs from the dense reference by {err:.2e} (bound {BOUND:.0e})")
if failed:
    sys.exit("causal.py FAILED: " + "; ".join(failed))
print("ok")
