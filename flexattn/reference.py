"""The dense pure-PyTorch reference every test compares against.

It calls the user's Python mods directly on broadcast int32 index tensors - not through the
IR - so it checks the tracer, the evaluator and the kernels independently. It materialises
the full [B, Hq, L, S] score matrix, so it is for tests and small shapes only.

It computes in the input dtype, whatever it is: the float64 golden of the numerics rule is
`reference_attention` on float64 inputs (and float64 captured tensors).
"""
from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, score_mod=None, mask_mod=None, scale=None, enable_gqa=False,
                        dropout_keep=None, dropout_p=0.0, max_scores=False):
    """Dense attention -> (out [B,Hq,L,Ev] in q.dtype, lse [B,Hq,L] natural log, q.dtype),
    and with max_scores=True also the row maxima of the scores [B,Hq,L] (q.dtype).

    score = q @ k^T * scale; score = score_mod(score, b, h, q_idx, kv_idx); masked entries
    (mask_mod False) get -inf; P = softmax(score); with `dropout_keep` (bool, broadcastable
    to [B,Hq,L,S]) P = P * keep / (1 - dropout_p); out = P @ v. lse = logsumexp of the
    (undropped) scores. GQA: query head hq reads kv head hq // (Hq // Hkv).
    Fully masked rows give out 0 and lse -inf, and zero gradients (never NaN).
    max_scores: max over kv of the masked, score_mod-applied scores (-inf on fully masked
    rows), detached - torch's AuxOutput.max_scores.
    """
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq != Hkv:
        if not enable_gqa or Hq % Hkv:
            raise ValueError(f"reference_attention: Hq={Hq} and Hkv={Hkv} need enable_gqa=True and Hq % Hkv == 0")
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    dev = q.device
    b = torch.arange(B, dtype=torch.int32, device=dev).view(B, 1, 1, 1)
    h = torch.arange(Hq, dtype=torch.int32, device=dev).view(1, Hq, 1, 1)
    q_idx = torch.arange(L, dtype=torch.int32, device=dev).view(1, 1, L, 1)
    kv_idx = torch.arange(S, dtype=torch.int32, device=dev).view(1, 1, 1, S)

    scores = (q @ k.transpose(-1, -2)) * scale
    if score_mod is not None:
        # a captured float32 tensor may promote an fp16 score; the reference stays in q.dtype
        scores = torch.as_tensor(score_mod(scores, b, h, q_idx, kv_idx)).to(q.dtype)
        scores = scores.expand(B, Hq, L, S)
    if mask_mod is not None:
        keep = torch.as_tensor(mask_mod(b, h, q_idx, kv_idx), device=dev).to(torch.bool)
        scores = scores.masked_fill(~keep, float("-inf"))

    # Stable softmax; the row max is a constant shift (detached: softmax does not depend on it).
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    maxima = row_max.squeeze(-1)
    empty = row_max == float("-inf")                       # fully masked rows
    row_max = row_max.masked_fill(empty, 0.0)
    p = torch.exp(scores - row_max)                        # 0 at masked entries
    denom = p.sum(dim=-1, keepdim=True)
    safe = torch.where(empty, torch.ones_like(denom), denom)  # no 0/0, no log(0) in any gradient
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), torch.log(safe) + row_max)
    probs = p / safe
    if dropout_keep is not None:
        probs = probs * dropout_keep.to(probs.dtype) / (1.0 - dropout_p)
    out = probs @ v
    if max_scores:
        return out, lse.squeeze(-1), maxima
    return out, lse.squeeze(-1)
