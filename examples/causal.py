"""Causal attention (top-left and bottom-right alignment), checked against the dense reference."""
import sys

import torch

from flexattn import create_block_mask, flex_attention, masks
from flexattn.reference import reference_attention

B, H, L, S, E = 2, 4, 256, 384, 32
q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
ok = True
for mod in [masks.causal(), masks.causal("bottom_right", q_len=L, kv_len=S)]:
    bm = create_block_mask(mod, None, None, L, S)
    out = flex_attention(q, k, v, block_mask=bm)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask_mod=mod)
    err = (out.double() - ref).abs().max().item()
    print(f"{mod.__name__:24s} sparsity {bm.sparsity():5.1f}%  max err {err:.2e}")
    ok &= err < 1e-4
sys.exit(0 if ok else 1)
