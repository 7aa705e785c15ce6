"""tanh as the hardware's approximate tanh (Plan.fast_tanh) against the exact formula, one form
per process (needs a CUDA GPU); run the two forms alternately, e.g.

    for f in exact approx exact approx; do PYTHONPATH=. python3 benchmarks/ab_fast_tanh.py $f; done

Causal + softcap (PEERS.md's case, cap 30), bf16, B=4, H=16, S=8192, at each head dim: flexattn's
forward and fwd+bwd TFLOP/s (median of bench_peers.STEADY_REPEATS do_bench medians) and the
relative error of out, dq, dk, dv against a float64 computation of the same attention (batch 0,
head 0 of an S=2048 call).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import block_density, mods  # noqa: E402
from bench_peers import measure  # noqa: E402


def float64_error(q, k, v, go, score_mod, out, grads) -> float:
    """Largest norm-relative error of (out, dq, dk, dv) against float64 on batch 0, head 0."""
    q64, k64, v64 = [x[:1, :1].detach().double().requires_grad_() for x in (q, k, v)]
    S = q.shape[2]
    s = q64 @ k64.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = score_mod(s, 0, 0, None, None)
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    o64 = torch.softmax(s, -1) @ v64
    o64.backward(go[:1, :1].double())
    got = [out[:1, :1]] + [g[:1, :1] for g in grads]
    ref = [o64, q64.grad, k64.grad, v64.grad]
    return max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, ref))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("form", choices=("exact", "approx"))
    p.add_argument("--dims", default="64,128,256")
    p.add_argument("--S", type=int, default=8192)
    a = p.parse_args()
    import flexattn
    import flexattn.kernels.plan as plan
    if a.form == "exact":
        plan.fast_tanh = lambda q: False
    B, H, S = 4, 16, a.S
    sm, mm = mods("softcap", S, H, "cuda")
    fbm = flexattn.create_block_mask(mm, None, None, S, S, device="cuda")
    flops = 4 * B * H * S * S * block_density(fbm)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} form {a.form}", flush=True)
    for D in map(int, a.dims.split(",")):
        torch.manual_seed(0)
        q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3)]
        ours = lambda: flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=fbm)  # noqa: E731
        _, f_ours, fb_ours = measure(ours, (q, k, v), flops * D, first=False)
        n = 2048
        qs, ks, vs = [x[:, :, :n].detach().clone().requires_grad_() for x in (q, k, v)]
        bm = flexattn.create_block_mask(mm, None, None, n, n, device="cuda")
        out = flexattn.flex_attention(qs, ks, vs, score_mod=sm, block_mask=bm)
        go = torch.randn_like(out)
        out.backward(go)
        err = float64_error(qs, ks, vs, go, sm, out, [qs.grad, ks.grad, vs.grad])
        print(f"D={D} causal+softcap {a.form}: fwd {f_ours:.0f} TFLOP/s, fwd+bwd {fb_ours:.0f} TFLOP/s, "
              f"error vs float64 {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
