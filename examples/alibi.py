"""ALiBi (standard slopes) with a causal mask, checked against the dense reference."""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks, mods
from flexattn.reference import reference_attention

B, H, L, E = 1, 8, 256, 32
q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
slopes = mods.alibi_slopes(H)
score_mod = mods.alibi(slopes)
bm = create_block_mask(masks.causal(), None, None, L, L)
out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), score_mod=mods.alibi(slopes.double()),
                             mask_mod=masks.causal())
err = (out.double() - ref).abs().max().item()
print(f"slopes {[round(s, 4) for s in slopes.tolist()]}  max err {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
