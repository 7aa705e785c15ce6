"""MindSpore-style flash_attention_score: BSH layout, GQA, bottom-right causal (sparse_mode=3)."""
import sys

import torch

from flexattn.frontends.mindspore import flash_attention_score

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
print(f"out {tuple(out.shape)}  max err {err:.2e}")
sys.exit(0 if err < 1e-4 else 1)
