"""Gemma-2-style tanh soft-capping of the scores, checked against the dense reference."""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks, mods
from flexattn.reference import reference_attention

B, H, L, E = 2, 4, 256, 64
q, k, v = (3 * torch.randn(B, H, L, E) for _ in range(3))
score_mod = mods.softcap(20.0)
bm = create_block_mask(masks.causal(), None, None, L, L)
out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), score_mod=score_mod, mask_mod=masks.causal())
err = (out.double() - ref).abs().max().item()
print(f"max err {err:.2e}")
sys.exit(0 if err < 1e-3 else 1)
