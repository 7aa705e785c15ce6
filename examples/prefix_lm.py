"""Prefix-LM with a per-batch prefix length (bidirectional prefix, causal after it)."""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks
from flexattn.reference import reference_attention

B, H, L, E = 3, 2, 192, 32
prefix = torch.tensor([10, 64, 150])
q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
mod = masks.prefix_lm(prefix)
bm = create_block_mask(mod, B, None, L, L)
out = flex_attention(q, k, v, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), mask_mod=mod)
err = (out.double() - ref).abs().max().item()
print(f"max err {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
