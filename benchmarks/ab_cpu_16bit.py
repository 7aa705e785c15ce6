"""The CPU path's fused backward on fp16 / bf16 inputs: torch's kernel given the 16-bit inputs as
they are against float32 copies, alternating in one process (flexattn.cpu._native_16bit forced
each way; which one a call takes is decided by the CPU's capabilities). B=1, H=8, D=64, 2 threads;
median seconds of fwd+bwd over 3 rounds after a first one. Dense and causal run whole rows (the
switch applies: 256+ rows); the sliding window's 64-row tiles run the same code either way (a
control for the noise between rounds).

    PYTHONPATH=. python benchmarks/ab_cpu_16bit.py
"""
import statistics
import time

import torch

import flexattn
import flexattn.cpu as cpu

torch.set_num_threads(2)
B, H, D = 1, 8, 64


def causal(b, h, q, kv):
    return q >= kv


def sliding(b, h, q, kv):
    return (q >= kv) & (q - kv < 256)


print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
for S in (1024, 4096):
    for name, mm in (("dense", None), ("causal", causal), ("sliding", sliding)):
        bm = flexattn.create_block_mask(mm, None, None, S, S) if mm else None
        for dt in (torch.bfloat16, torch.float16):
            q, k, v = [torch.randn(B, H, S, D, dtype=dt, requires_grad=True) for _ in range(3)]
            go = torch.randn(B, H, S, D, dtype=dt)
            res = {True: [], False: []}
            for rep in range(4):
                for native in (True, False):
                    cpu._native_16bit = lambda d, n=native: n
                    t = time.perf_counter()
                    flexattn.flex_attention(q, k, v, block_mask=bm).backward(go)
                    res[native].append(time.perf_counter() - t)
                    q.grad = k.grad = v.grad = None
            a, b = statistics.median(res[True][1:]), statistics.median(res[False][1:])
            print(f"S={S} {name:8s} {str(dt)[6:]:9s} fwd+bwd: 16-bit kernel {a:.3f} s, float32 copies {b:.3f} s "
                  f"({a / b:.2f}x)", flush=True)
