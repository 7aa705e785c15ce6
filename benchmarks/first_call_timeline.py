"""What a user's calls right after a new mask's first call run at (needs a CUDA GPU).

    PYTHONPATH=. python3 benchmarks/first_call_timeline.py --dim 64 --cases causal,sliding_window,document
    PYTHONPATH=. python3 benchmarks/first_call_timeline.py --dim 64 --route-vs-direct

Timeline (default): per case (B=4, H=16, S=8K, bf16, forward only), the first call's wall time,
then 4 s of single calls, each timed by CUDA events and synchronised, reported per 200 ms window:
the median kernel time and TFLOP/s (as PEERS.md counts them), the host time per call, how many
kernels the background compiles have marked compiled (flexattn.kernels.tiered) and whether one
is still pending. The first masked case of a process compiles its own kernels in the
foreground (no tile-form kernels yet); the later ones run their tile form until their own
kernels are ready.

--route-vs-direct: after a causal mask has warmed the tile form's kernels, the sliding-window
mask's forward through the tiered route (its tile form, while its own kernels compile), the
same tile form called directly (flex_attention_triton, TIERED off), and after the background
compiles both again; each launch's kwargs and argument features are printed (which binary runs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from statistics import median

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import flexattn  # noqa: E402
from bench_attention import block_density, mods  # noqa: E402
from flexattn.kernels import flex_attention_triton, launcher, tiered  # noqa: E402
from flexattn.mask_tiles import tile_table_form  # noqa: E402

B, H, S = 4, 16, 8192


def event_ms(fn) -> float:
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1)


def pending() -> bool:
    return any(not f.done() for f in tiered._futures)


def timeline(case, q, k, v, seconds=4.0, window=0.2):
    _, mask_mod = mods(case, S, H, "cuda")
    bm = flexattn.create_block_mask(mask_mod, None, None, S, S, device="cuda")
    flops = 4 * B * H * S * S * q.shape[-1] * block_density(bm)

    def call():
        return flexattn.flex_attention(q, k, v, block_mask=bm)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    torch.cuda.synchronize()
    print(f"{case} D={q.shape[-1]} first call {time.perf_counter() - t0:.3f} s", flush=True)
    rows, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        th = time.perf_counter()
        ms = event_ms(call)
        rows.append((th - start, ms, time.perf_counter() - th, len(tiered._compiled), pending()))
    w = 0.0
    while w < seconds:
        sel = [r for r in rows if w <= r[0] < w + window]
        if sel:
            g, h = median([r[1] for r in sel]), median([r[2] for r in sel])
            print(f"  t={w:.1f}-{w + window:.1f}s n={len(sel):3d} gpu med {g:.3f} ms ({flops / g * 1e-9:.0f} TF)"
                  f" host/call med {h * 1e3:.2f} ms compiled={sel[-1][3]} pending={sel[-1][4]}", flush=True)
        w += window
    tiered.wait()


def route_vs_direct(q, k, v):
    log = []
    launch_cached = launcher.launch_cached

    def logged(kernel, grid, args, kwargs):
        log.append((grid, dict(kwargs), launcher.spec_features(args), id(kernel)))
        return launch_cached(kernel, grid, args, kwargs)
    launcher.launch_cached = logged

    def show(title):
        print(title)
        for entry in log:
            print("  ", entry)
        log.clear()
    try:
        _, causal = mods("causal", S, H, "cuda")
        bmc = flexattn.create_block_mask(causal, None, None, S, S, device="cuda")
        flexattn.flex_attention(q, k, v, block_mask=bmc)
        tiered.wait()   # the tile form's kernels are compiled now
        own = [event_ms(lambda: flexattn.flex_attention(q, k, v, block_mask=bmc)) for _ in range(30)]
        print("causal, own kernels: gpu ms", median(own))
        _, sliding = mods("sliding_window", S, H, "cuda")
        bm = flexattn.create_block_mask(sliding, None, None, S, S, device="cuda")
        log.clear()

        def routed():
            return flexattn.flex_attention(q, k, v, block_mask=bm)
        routed()
        show("sliding window, first call through the tiered route (the other form's launches are recorded, not run):")
        print("tiered route gpu ms", median([event_ms(routed) for _ in range(20)]), "pending", pending())
        tile = tile_table_form(bm)

        def direct():
            return flex_attention_triton(q, k, v, score_graph=None, mask_graph=tile.mask_graph, block_mask=tile,
                                         kernel_options={"TIERED": False})[0]
        direct()
        show("the tile form called directly:")
        print("direct tile form gpu ms", median([event_ms(direct) for _ in range(30)]))
        tiered.wait()
        print("after the background compiles: tiered route gpu ms", median([event_ms(routed) for _ in range(30)]),
              "direct tile form", median([event_ms(direct) for _ in range(30)]))
    finally:
        launcher.launch_cached = launch_cached


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--cases", default="causal,sliding_window,document,prefix_lm")
    p.add_argument("--route-vs-direct", action="store_true")
    a = p.parse_args()
    q, k, v = [torch.randn(B, H, S, a.dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    if a.route_vs_direct:
        route_vs_direct(q, k, v)
        return
    for case in a.cases.split(","):
        timeline(case, q, k, v)


if __name__ == "__main__":
    main()
