"""Quickstart: a document-causal mask, its BlockMask, and flex_attention on CPU checked
against the dense reference. Prints the comparison, the largest differences and the
bound; exits 1 with a message if they disagree.

    python examples/quickstart.py
"""
import sys

import torch

from flexattn import create_block_mask, flex_attention
from flexattn.reference import reference_attention

torch.manual_seed(0)
B, H, SEQ, D = 2, 4, 1000, 64

# Three packed documents in one sequence: tokens attend causally within their own document.
doc_id = torch.repeat_interleave(torch.arange(3), torch.tensor([300, 450, 250])).to(torch.int32)


def document_causal(b, h, q_idx, kv_idx):
    return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)


def alibi(score, b, h, q_idx, kv_idx):  # a head-dependent linear distance penalty
    slope = torch.exp2(-(h + 1) * 8.0 / H)
    return score - slope * (q_idx - kv_idx)


block_mask = create_block_mask(document_causal, B=None, H=None, Q_LEN=SEQ, KV_LEN=SEQ)
print(block_mask.to_string(grid_size=(16, 16)))
print(f"sparsity: {block_mask.sparsity():.1f}% of blocks skipped")

q, k, v = (torch.randn(B, H, SEQ, D, requires_grad=True) for _ in range(3))
out = flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask)
out.sum().backward()

ref, _ = reference_attention(q, k, v, score_mod=alibi, mask_mod=document_causal)
ref_grad = torch.autograd.grad(ref.sum(), q)[0]
err_out = (out - ref).abs().max().item()
err_grad = (q.grad - ref_grad).abs().max().item()
BOUND = 1e-4  # flex_attention and the dense reference, both in float32
print(f"flex_attention vs dense reference: max |difference| in out {err_out:.2e}, in dq {err_grad:.2e}, "
      f"bound {BOUND:.0e}")
if not (err_out < BOUND and err_grad < BOUND):
    sys.exit(f"quickstart.py FAILED: flex_attention disagrees with the dense reference "
             f"(out {err_out:.2e}, dq {err_grad:.2e}; bound {BOUND:.0e})")
print("ok")
