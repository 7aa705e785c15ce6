"""Where the time of a short-sequence call goes (needs a CUDA GPU).

    PYTHONPATH=. python3 benchmarks/short_sequences.py [--seq 2048]

For flexattn and SDPA, causal and dense, D=64 and 128, forward and forward+backward (B=4, H=16,
bf16): the wall time per call of 200 calls back to back, the GPU kernels' own time per call
(torch.profiler), and the host's time per call (the same call at B=H=1, S=256, where the GPU work
is tiny). When the host's time exceeds the kernels', the GPU waits for the host; `do_bench`, which
clears the L2 before each call, then times part of the host's work too. Then the host's time with
the replayed calls' TMA descriptor expansions kept and not kept (kernels.replay.KEEP_EXPANSIONS),
alternating, and a cProfile of flexattn's forward+backward (D=64, causal).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import flexattn  # noqa: E402
from bench_attention import mods  # noqa: E402
from profile_host import cprofile_calls, per_call_us as wall_us  # noqa: E402
from flexattn.kernels import tiered  # noqa: E402


def kernel_us(fn, n=20):
    """The GPU kernels' time per call, in all and per kernel name."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:40]] = per.get(e.name[:40], 0) + e.device_time / n
    return sum(per.values()), {k: round(v, 1) for k, v in per.items()}


def make(impl, case, B, H, S, D, bwd):
    score_mod, mask_mod = mods(case, S, H, "cuda")
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd) for _ in range(3)]
    grad_out = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    if impl == "flexattn":
        bm = flexattn.create_block_mask(mask_mod, None, None, S, S, device="cuda") if mask_mod else None

        def call():
            return flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
    else:
        def call():
            return F.scaled_dot_product_attention(q, k, v, is_causal=(case == "causal"))
    if bwd:
        return lambda: call().backward(grad_out)

    def fwd():
        with torch.no_grad():
            return call()
    return fwd


def host_ab(rounds=3):
    """Host µs per call (B=H=1, S=256, causal) with descriptor expansions kept / not kept, the
    two alternating; the median of `rounds`."""
    from flexattn.kernels import replay
    fns = {(D, bwd): make("flexattn", "causal", 1, 1, 256, D, bwd) for D in (64, 128) for bwd in (False, True)}
    for f in fns.values():
        f()
    torch.cuda.synchronize()
    tiered.wait()
    times: dict = {}
    try:
        for _ in range(rounds):
            for keep in (False, True):
                replay.KEEP_EXPANSIONS = keep
                for key, f in fns.items():
                    times.setdefault((key, keep), []).append(wall_us(f, 1000 if key[1] else 3000))
    finally:
        replay.KEEP_EXPANSIONS = True
    for D, bwd in fns:
        mid = {keep: sorted(times[((D, bwd), keep)])[rounds // 2] for keep in (False, True)}
        print(f"host D={D} {'fwd+bwd' if bwd else 'fwd    '}: descriptors filled every call {mid[False]:6.1f} us, "
              f"expansions kept {mid[True]:6.1f} us", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=2048)
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B=4, H=16, S={a.seq}, bf16", flush=True)
    for D in (64, 128):
        for case in ("causal", "dense"):
            for bwd in (False, True):
                for impl in ("flexattn", "sdpa"):
                    f = make(impl, case, 4, 16, a.seq, D, bwd)
                    f()
                    torch.cuda.synchronize()
                    tiered.wait()  # the mask's own kernels, not the tile-table form
                    wall = wall_us(f)
                    kernels, per_kernel = kernel_us(f)
                    host = wall_us(make(impl, case, 1, 1, 256, D, bwd))
                    print(f"D={D} {case:6s} {'fwd+bwd' if bwd else 'fwd    '} {impl:8s} wall {wall:7.1f} us  "
                          f"kernels {kernels:7.1f} us  host(S=256) {host:6.1f} us  "
                          f"{per_kernel if impl == 'flexattn' else ''}", flush=True)
    host_ab()
    f = make("flexattn", "causal", 4, 16, a.seq, 64, True)
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    print(cprofile_calls(f))


if __name__ == "__main__":
    main()
