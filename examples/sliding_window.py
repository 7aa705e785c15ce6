"""Mistral-style sliding window (causal, last 64 tokens), checked against the dense reference."""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks
from flexattn.reference import reference_attention

B, H, L, E, W = 1, 4, 512, 32, 64
q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
mod = masks.sliding_window(W - 1, 0)
bm = create_block_mask(mod, None, None, L, L)
out = flex_attention(q, k, v, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), mask_mod=mod)
err = (out.double() - ref).abs().max().item()
print(bm)
print(f"max err {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
