"""The host (Python) cost of one public flex_attention call, on a machine without a GPU.

    python benchmarks/host_overhead.py --case causal [--bwd] [--decode] [--profile cumtime]

Runs the Triton path's launch preparation on CPU tensors with the kernel launches replaced
by the cached launcher's key computation (`launcher.spec_features`) - and a replayed call's
direct launches (kernels.replay) by nothing - so what is timed is flexattn's own Python per
call: checks, signature, plan, configs, argument assembly - not Triton's launcher and not
the GPU. Costs no device time; on the lent H200's host the same Python
ran about 3x slower than on a 2-core CI machine (compare benchmarks/profile_host.py there).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", default="causal")
    p.add_argument("--bwd", action="store_true", help="time forward + backward")
    p.add_argument("--decode", action="store_true", help="q_len 1 against an 8K cache (GQA 32/8)")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--profile", default=None, help="cProfile sort key (cumtime, tottime)")
    a = p.parse_args()
    import flexattn
    from flexattn.kernels import config, decode, launcher, merge
    from bench_attention import mods

    def no_launch(kernel, grid, args, kwargs):
        launcher.spec_features(args)  # the key a cached launch computes
    decode.launch_cached = merge.launch_cached = launcher.launch_cached = no_launch
    # a replayed call (kernels.replay) launches its kept entries directly: that launch too is skipped
    launcher.compiled_entry = lambda kernel, args, kwargs: (None, ())
    launcher.run_compiled = lambda entry, grid3, stream, args: None
    launcher.current_stream = lambda: 0
    config.device_key = lambda device: "sm90"  # the GPU configs
    launcher.sm_count = lambda device: 132
    if a.decode:
        B, Hq, Hkv, L, S, D = 8, 32, 8, 1, 8192, 128
    else:
        B, Hq, Hkv, L, S, D = 1, 1, 1, 256, 256, 64
    sm, mm = mods(a.case, S, Hq, "cpu")
    q = torch.randn(B, Hq, L, D, dtype=torch.bfloat16, requires_grad=a.bwd)
    k, v = [torch.randn(B, Hkv, S, D, dtype=torch.bfloat16, requires_grad=a.bwd) for _ in range(2)]
    bm = flexattn.create_block_mask(mm, None, None, L, S) if mm else None
    go = torch.randn(B, Hq, L, D, dtype=torch.bfloat16)
    opts = {"BACKEND": "triton"}

    def call():
        out = flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=Hq != Hkv,
                                      kernel_options=opts)
        if a.bwd:
            out.backward(go)
    with torch.set_grad_enabled(a.bwd):
        for _ in range(50):
            call()
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(a.n):
                call()
            print(f"{a.case} {'decode ' if a.decode else ''}{'fwd+bwd' if a.bwd else 'fwd'}: "
                  f"{(time.perf_counter() - t) / a.n * 1e6:.1f} us/call (launches mocked)")
        if a.profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.n):
                call()
            pr.disable()
            pstats.Stats(pr).sort_stats(a.profile).print_stats(30)
            if os.environ.get("CALLERS"):
                pstats.Stats(pr).print_callers(os.environ["CALLERS"])


if __name__ == "__main__":
    main()
