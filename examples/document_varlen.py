"""Packed variable-length sequences: a BlockMask straight from cu_seqlens (causal per document)."""
import sys

import torch

from flexattn import flex_attention
from flexattn.reference import reference_attention
from flexattn.varlen import create_varlen_block_mask, cu_seqlens_from_lengths

lengths = [37, 120, 5, 90, 60]
cu = cu_seqlens_from_lengths(lengths)
T, H, E = int(cu[-1]), 4, 32
q, k, v = (torch.randn(1, H, T, E) for _ in range(3))
bm = create_varlen_block_mask(cu, causal=True, BLOCK_SIZE=32)
out = flex_attention(q, k, v, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), mask_mod=bm.mask_mod)
err = (out.double() - ref).abs().max().item()
# and each document alone gives the same rows
ok = err < 1e-4
for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
    one, _ = reference_attention(q[:, :, a:b].double(), k[:, :, a:b].double(), v[:, :, a:b].double(),
                                 mask_mod=lambda b_, h, i, j: i >= j)
    ok &= (out[:, :, a:b].double() - one).abs().max().item() < 1e-4
print(f"{len(lengths)} documents, {T} tokens, sparsity {bm.sparsity():.1f}%, max err {err:.2e}")
sys.exit(0 if ok else 1)
