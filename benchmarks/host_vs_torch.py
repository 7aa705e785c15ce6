"""Host time per call, flexattn against torch.compile(flex_attention), in one process (needs a CUDA GPU).

    PYTHONPATH=. python3 benchmarks/host_vs_torch.py --cases alibi,causal [--rounds 3]

At B=H=1, S=256, D=64 the GPU work is a few microseconds, so back-to-back calls are bound by
the host: the wall time per call is the host's cost (checks, tracing cache, plan, launches,
autograd). A fwd+bwd row of bench_attention.py is bound by the host when that cost exceeds
its GPU time, so comparing the two libraries' costs says which one falls to the host first.
Rounds alternate the libraries, so a slow stretch of the host hits both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from profile_host import per_call_us  # noqa: E402  (wall time per call, back to back, synchronised)


def calls(case, S=256, D=64):
    """{(library, "fwd" | "fwd+bwd"): a call} on one (B=1, H=1) problem."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex, create_block_mask as torch_cbm
    import flexattn
    from bench_attention import mods
    torch_flex_c = torch.compile(torch_flex, dynamic=False)
    sm, mm = mods(case, S, 1, "cuda")
    q, k, v = [torch.randn(1, 1, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    go = torch.randn(1, 1, S, D, device="cuda", dtype=torch.bfloat16)
    fbm = flexattn.create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
    tbm = torch_cbm(mm, None, None, S, S, device="cuda") if mm else None
    libs = {"flexattn": lambda: flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=fbm),
            "torch": lambda: torch_flex_c(q, k, v, score_mod=sm, block_mask=tbm)}
    out = {}
    for lib, f in libs.items():
        def fwd(f=f):
            with torch.no_grad():
                f()

        def fwdbwd(f=f):
            for t in (q, k, v):
                t.grad = None
            f().backward(go)
        out[(lib, "fwd")], out[(lib, "fwd+bwd")] = fwd, fwdbwd
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="alibi,causal")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for case in a.cases.split(","):
        fns = calls(case)
        for f in fns.values():  # compile and settle (flexattn's tiered kernels, the replays)
            f()
        from flexattn.kernels import tiered
        tiered.wait()
        times = {key: [] for key in fns}
        for _ in range(a.rounds):
            for key, f in fns.items():
                times[key].append(per_call_us(f, 400))
        for kind in ("fwd", "fwd+bwd"):
            ours, theirs = statistics.median(times[("flexattn", kind)]), statistics.median(times[("torch", kind)])
            print(f"{case:>14} {kind:>7}: flexattn {ours:6.1f} us/call, torch {theirs:6.1f} us/call "
                  f"(medians of {a.rounds} rounds; flexattn {', '.join(f'{x:.0f}' for x in times[('flexattn', kind)])}"
                  f"; torch {', '.join(f'{x:.0f}' for x in times[('torch', kind)])}) ratio {theirs / ours:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
