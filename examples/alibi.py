"""ALiBi (standard slopes) with a causal mask, checked against the dense reference.

Prints the comparison it makes, the largest difference and the bound; exits 1 with a
message if the bound is exceeded.
"""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks, mods
from flexattn.reference import reference_attention

BOUND = 1e-4  # float32 result against a float64 reference
B, H, L, E = 1, 8, 256, 32
q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
slopes = mods.alibi_slopes(H)
score_mod = mods.alibi(slopes)
bm = create_block_mask(masks.causal(), None, None, L, L)
out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), score_mod=mods.alibi(slopes.double()),
                             mask_mod=masks.causal())
err = (out.double() - ref).abs().max().item()
print(f"ALiBi slopes for {H} heads: {[round(s, 4) for s in slopes.tolist()]}")
print(f"causal + ALiBi, flex_attention (float32) vs dense reference (float64): "
      f"max |difference| {err:.2e}, bound {BOUND:.0e}")
if not err < BOUND:
    sys.exit(f"alibi.py FAILED: flex_attention with ALiBi differs from the dense reference by {err:.2e} "
             f"(bound {BOUND:.0e})")
print("ok")
