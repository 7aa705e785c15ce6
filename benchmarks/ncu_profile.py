"""One fwd+bwd step of flexattn or a peer, bracketed for Nsight Compute (needs a CUDA GPU).

The step runs warm (compiled, tiered compile finished) and only it lies between
cudaProfilerStart and cudaProfilerStop, so `ncu --profile-from-start off` profiles exactly its
kernels:

    ncu --profile-from-start off --clock-control none --set full -o $OUT/flexattn_causal_128 \
        python3 benchmarks/ncu_profile.py flexattn --case causal --D 128
    ncu --import $OUT/flexattn_causal_128.ncu-rep --page details

impl: flexattn, fa4 (FlashAttention-4's flash_attn_func: dense and causal), flash (torch
FlexAttention compiled with kernel_options={"BACKEND": "FLASH"}), sdpa. B=4, H=16, bf16.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import mods  # noqa: E402


def step_fn(impl, case, q, k, v, options):
    """A callable returning the attention output of impl on (q, k, v), B H S D layout."""
    S = q.shape[2]
    score_mod, mask_mod = mods(case, S, q.shape[1], q.device)
    if impl == "flexattn":
        import flexattn
        bm = flexattn.create_block_mask(mask_mod, None, None, S, S, device=q.device) if mask_mod else None
        return lambda: flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=options)
    if impl == "flash":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        bm = create_block_mask(mask_mod, None, None, S, S, device=q.device) if mask_mod else None
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options={"BACKEND": "FLASH"})
    if case not in ("dense", "causal"):
        raise SystemExit(f"{impl} runs dense and causal only, not {case}")
    if impl == "sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case == "causal")
    from flash_attn.cute import flash_attn_func
    qb, kb, vb = [x.transpose(1, 2) for x in (q, k, v)]

    def fa4():
        r = flash_attn_func(qb, kb, vb, causal=case == "causal")
        return (r[0] if isinstance(r, tuple) else r).transpose(1, 2)
    return fa4


def main():
    p = argparse.ArgumentParser()
    p.add_argument("impl", choices=("flexattn", "fa4", "flash", "sdpa"))
    p.add_argument("--case", default="causal")
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--S", type=int, default=8192)
    p.add_argument("--options", default=None, help="flexattn's kernel_options as JSON")
    a = p.parse_args()
    import json
    torch.manual_seed(0)
    q, k, v = [torch.randn(4, 16, a.S, a.D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
    fn = step_fn(a.impl, a.case, q, k, v, json.loads(a.options) if a.options else None)
    go = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn().backward(go)
    for _ in range(3):
        step()
    if a.impl == "flexattn":
        from flexattn.kernels import tiered
        tiered.wait()
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
