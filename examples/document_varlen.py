"""Packed variable-length sequences: a BlockMask straight from cu_seqlens (causal per document).

Checks the packed result against the dense reference with the same mask, and each document's
rows against causal attention over that document alone. Prints each comparison, the largest
difference and the bound; exits 1 with a message if a bound is exceeded.
"""
import sys

import torch

from flexattn import flex_attention
from flexattn.reference import reference_attention
from flexattn.varlen import create_varlen_block_mask, cu_seqlens_from_lengths

BOUND = 1e-4  # float32 result against a float64 reference
lengths = [37, 120, 5, 90, 60]
cu = cu_seqlens_from_lengths(lengths)
T, H, E = int(cu[-1]), 4, 32
q, k, v = (torch.randn(1, H, T, E) for _ in range(3))
bm = create_varlen_block_mask(cu, causal=True, BLOCK_SIZE=32)
out = flex_attention(q, k, v, block_mask=bm)
ref, _ = reference_attention(q.double(), k.double(), v.double(), mask_mod=bm.mask_mod)
err = (out.double() - ref).abs().max().item()
print(f"{len(lengths)} documents, {T} tokens, {bm.sparsity():.1f}% of blocks skipped")
print(f"packed flex_attention vs dense reference: max |difference| {err:.2e}, bound {BOUND:.0e}")
failed = [] if err < BOUND else [f"packed result differs from the dense reference by {err:.2e}"]
for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
    one, _ = reference_attention(q[:, :, a:b].double(), k[:, :, a:b].double(), v[:, :, a:b].double(),
                                 mask_mod=lambda b_, h, i, j: i >= j)
    doc_err = (out[:, :, a:b].double() - one).abs().max().item()
    print(f"  document at tokens {a}-{b - 1}: packed rows vs causal attention over the document alone, "
          f"max |difference| {doc_err:.2e}, bound {BOUND:.0e}")
    if not doc_err < BOUND:
        failed.append(f"document at tokens {a}-{b - 1} differs from attention over it alone by {doc_err:.2e}")
if failed:
    sys.exit(f"document_varlen.py FAILED (bound {BOUND:.0e}): " + "; ".join(failed))
print("ok")
