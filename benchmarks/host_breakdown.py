"""The host's time per replayed call, beside SDPA's and the costs it is made of (needs a CUDA GPU).

    PYTHONPATH=. python3 benchmarks/host_breakdown.py [--case causal] [--dim 64]

At B=H=1, S=256 the GPU work is tiny, so back-to-back calls run at the host's pace. Prints
the wall time per call of flexattn's replayed forward and forward+backward and SDPA's (three
readings each), what a few building blocks cost on this host (an autograd.Function round
trip of three tiny tensors, torch.empty_strided, a one-element zero_, the current stream),
then cProfile's tables of the forward and the forward+backward, by own and by cumulative
time. Host speed differs between machines: compare within one run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from profile_host import autograd_cost, cprofile_calls, host_bound, per_call_us  # noqa: E402
from flexattn.kernels import tiered  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", default="causal")
    p.add_argument("--dim", type=int, default=64)
    a = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {a.case}, B=H=1, S=256, D={a.dim}, bf16")
    fwd, fwdbwd, (q, k, v, _, _, go) = host_bound(a.case, 1, 1, 256, a.dim)
    fwd()
    fwdbwd()
    torch.cuda.synchronize()
    tiered.wait()  # the mask's own kernels, replayed from here on
    detached = [x.detach() for x in (q, k, v)]

    def sdpa_fwd():
        return F.scaled_dot_product_attention(*detached, is_causal=a.case == "causal")

    def sdpa_fwdbwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=a.case == "causal").backward(go)
    for name, fn, n in (("flexattn fwd", fwd, 3000), ("flexattn fwd+bwd", fwdbwd, 1000),
                        ("SDPA fwd", sdpa_fwd, 3000), ("SDPA fwd+bwd", sdpa_fwdbwd, 1000)):
        print(f"{name}: {' '.join(f'{per_call_us(fn, n):.1f}' for _ in range(3))} us a call", flush=True)
    print(f"autograd.Function round trip of three tiny tensors: {autograd_cost():.1f} us")
    empty = lambda: torch.empty_strided((1, 1, 256, 64), (16384, 16384, 64, 1), dtype=torch.bfloat16,  # noqa: E731
                                        device="cuda")
    one = torch.empty(1, device="cuda", dtype=torch.int32)
    print(f"torch.empty_strided {per_call_us(empty, 5000):.2f} us, one-element zero_ "
          f"{per_call_us(lambda: one.zero_(), 5000):.2f} us, torch.cuda.current_stream "
          f"{per_call_us(torch.cuda.current_stream, 5000):.2f} us")
    for name, fn, n in (("fwd", fwd, 3000), ("fwd+bwd", fwdbwd, 1000)):
        for sort in ("tottime", "cumulative"):
            print(f"=== {name}, by {sort}")
            print(cprofile_calls(fn, n, top=35, sort=sort))


if __name__ == "__main__":
    main()
