"""MindSpore-style flash_attention_score: BSH layout, GQA, bottom-right causal (sparse_mode=3).

Checks the result against a dense computation written from MindSpore's documented formula.
Prints the comparison, the largest difference and the bound; exits 1 with a message if the
bound is exceeded.
"""
import sys

import torch

from flexattn.frontends.mindspore import flash_attention_score

BOUND = 1e-4  # float32 result against a float64 dense computation
B, S1, S2, N1, N2, D = 2, 96, 128, 8, 2, 32
q = torch.randn(B, S1, N1 * D)
k, v = torch.randn(B, S2, N2 * D), torch.randn(B, S2, N2 * D)
out = flash_attention_score(q, k, v, head_num=N1, input_layout="BSH", sparse_mode=3, scalar_value=D ** -0.5)

# dense check, written from the documented formula (attn_mask 1 = discard)
qh = q.view(B, S1, N1, D).transpose(1, 2).double()
kh = k.view(B, S2, N2, D).transpose(1, 2).repeat_interleave(N1 // N2, 1).double()
vh = v.view(B, S2, N2, D).transpose(1, 2).repeat_interleave(N1 // N2, 1).double()
i, j = torch.arange(S1)[:, None], torch.arange(S2)[None]
discard = j > i + (S2 - S1)
s = (qh @ kh.transpose(-1, -2) * D ** -0.5).masked_fill(discard, float("-inf"))
ref = (s.softmax(-1) @ vh).transpose(1, 2).reshape(B, S1, N1 * D)
err = (out.double() - ref).abs().max().item()
print(f"flash_attention_score (BSH, {N1} query heads over {N2} kv heads, sparse_mode=3), out {tuple(out.shape)}")
print(f"vs the documented formula computed densely in float64: max |difference| {err:.2e}, bound {BOUND:.0e}")
if not err < BOUND:
    sys.exit(f"mindspore_frontend.py FAILED: flash_attention_score differs from the documented formula by "
             f"{err:.2e} (bound {BOUND:.0e})")
print("ok")
