"""Gemma-2-style tanh soft-capping of the scores, checked against the dense reference.

Prints the comparison it makes, the largest difference and the bound; exits 1 with a
message if the bound is exceeded.
"""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks, mods
from flexattn.reference import reference_attention

BOUND = 1e-3  # float32 against float64; the inputs are scaled by 3, so scores are large before the cap
CAP = 20.0
B, H, L, E = 2, 4, 256, 64
q, k, v = (3 * torch.randn(B, H, L, E) for _ in range(3))
score_mod = mods.softcap(CAP)
bm = create_block_mask(masks.causal(), None, None, L, L)
out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), score_mod=score_mod, mask_mod=masks.causal())
err = (out.double() - ref).abs().max().item()
print(f"causal + softcap({CAP}): flex_attention vs dense reference, max |difference| {err:.2e}, bound {BOUND:.0e}")
if not err < BOUND:
    sys.exit(f"softcap.py FAILED: flex_attention differs from the dense reference by {err:.2e} "
             f"(bound {BOUND:.0e})")
print("ok")
