"""Where the host time of one flex_attention call goes (needs a CUDA GPU).

    PYTHONPATH=. python3 benchmarks/profile_host.py [--case causal] [--seq 2048]

Prints: the wall time per call when the GPU work is tiny (B=H=1, S=256: host-bound) through
the JIT's launches, cached launches and replayed calls (kernels.replay), the cost of each
Triton launch taken apart (the JIT's argument binding, its cache key, the
compiled kernel's own launcher), a cProfile of fwd+bwd calls, and the time to first output
for a never-seen mask structure split into BlockMask, Triton compile stages and the rest.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def cprofile_calls(fn, n=200, top=30, sort="tottime") -> str:
    """cProfile's table (by `sort`: own time, or "cumulative"; the `top` rows) of n calls of fn,
    synchronised at the end."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats(sort).print_stats(top)
    return out.getvalue()


def host_bound(case, B, H, S, D):
    import flexattn
    from bench_attention import mods
    sm, mm = mods(case, S, H, "cuda")
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    bm = flexattn.create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
    go = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            return flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=bm)

    def fwdbwd():
        out = flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=bm)
        out.backward(go)
    return fwd, fwdbwd, (q, k, v, bm, sm, go)


def launch_parts(case, B, H, S, D):
    """Capture the launches of one fwd+bwd and time each one's pieces."""
    from triton.runtime.jit import compute_cache_key
    from flexattn.kernels import launcher
    from flexattn.kernels.launcher import launch_cached, spec_features
    fwd, fwdbwd, _ = host_bound(case, B, H, S, D)
    fwdbwd()
    captured = []
    orig = launcher.launch

    def rec(kernel, grid, args, kwargs, key, shrink="BLOCK_N"):
        kw = dict(kwargs, **launcher.SHRUNK.get(key, {}))
        captured.append((kernel, grid, args(kw) if callable(args) else args, kw))
        return orig(kernel, grid, args, kwargs, key, shrink)
    launcher.launch = rec
    try:
        fwdbwd()
    finally:
        launcher.launch = orig
    torch.cuda.synchronize()
    from triton.runtime.driver import driver
    rows = []
    for kernel, grid, args, kwargs in captured:
        dev = driver.active.get_current_device()
        stream = driver.active.get_current_stream(dev)
        kernel_cache, key_cache, target, backend, binder = kernel.device_caches[dev]
        from triton import knobs
        kw = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
        ck = kernel[grid](*args, **kwargs)
        bound, spec, opts = binder(*args, **kw)
        full = tuple(bound.values())

        def t(f):
            return per_call_us(f, 200)
        r = {"kernel": kernel.__name__, "n_args": len(args),
             "jit_launch_us": t(lambda: kernel[grid](*args, **kwargs)),
             "cached_launch_us": t(lambda: launch_cached(kernel, grid, args, kwargs)),
             "features_us": t(lambda: spec_features(args)),
             "binder_us": t(lambda: binder(*args, **kw)),
             "cache_key_us": t(lambda: compute_cache_key(key_cache, spec, opts)),
             "direct_run_us": t(lambda: ck.run(grid[0], grid[1] if len(grid) > 1 else 1, 1, stream, ck.function,
                                               ck.packed_metadata, None, None, None, *full)),
             "stream_us": t(lambda: driver.active.get_current_stream(driver.active.get_current_device()))}
        rows.append(r)
        print("launch", r, flush=True)
    return rows


def autograd_cost():
    class Id(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c):
            ctx.save_for_backward(a, b, c)
            return torch.empty_like(a), torch.empty(1, device=a.device)

        @staticmethod
        def backward(ctx, g, g2):
            a, b, c = ctx.saved_tensors
            return torch.empty_like(a), torch.empty_like(b), torch.empty_like(c)
    x = [torch.randn(16, device="cuda", requires_grad=True) for _ in range(3)]
    go = torch.randn(16, device="cuda")

    def step():
        out, _ = Id.apply(*x)
        out.backward(go)
    return per_call_us(step, 500)


def first_output_parts():
    """A never-seen mask structure at S=8K: where the seconds go."""
    import flexattn
    from triton.backends.nvidia import compiler as nvc
    times = {}
    orig_add = nvc.CUDABackend.add_stages

    def add_stages(self, stages, options, *a):
        orig_add(self, stages, options, *a)
        for name in list(stages):
            f = stages[name]

            def wrap(src, md, f=f, name=name):
                t0 = time.perf_counter()
                r = f(src, md)
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0
                return r
            stages[name] = wrap
    nvc.CUDABackend.add_stages = add_stages
    S, D, B, H = 8192, 128, 4, 16
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    stamp = int(time.time()) % 89

    def make(d):
        def strided(b, h, qi, kv):
            return (qi >= kv) & ((qi - kv) % d != d - 1)
        return strided
    w = flexattn.create_block_mask(make(7), None, None, S, S, device="cuda")
    flexattn.flex_attention(q, k, v, block_mask=w)
    torch.cuda.synchronize()
    for d in (31 + stamp, 131 + stamp):
        times.clear()
        t0 = time.perf_counter()
        bm = flexattn.create_block_mask(make(d), None, None, S, S, device="cuda")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        pr = cProfile.Profile()
        pr.enable()
        flexattn.flex_attention(q, k, v, block_mask=bm)
        torch.cuda.synchronize()
        pr.disable()
        t2 = time.perf_counter()
        print(f"first output d={d}: block mask {t1 - t0:.3f} s, flex_attention {t2 - t1:.3f} s, stages "
              + ", ".join(f"{k} {v:.3f}" for k, v in times.items()), flush=True)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(18)
        print(s.getvalue()[-6000:])


MODES = (("jit", False, False), ("cached", True, False), ("replayed", True, True))  # (name, launch cache, replay)


def set_mode(launch_cache: bool, replayed: bool) -> None:
    from flexattn.kernels import launcher, replay
    launcher._CACHE.enabled, replay.ENABLED = launch_cache, replayed


def gpu_time_ab(cases, S):
    """do_bench medians (as bench_attention.py takes them): torch flex vs our calls through
    the JIT's launches, cached launches (kernels.launcher) and replays (kernels.replay)."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex, create_block_mask as torch_cbm
    import flexattn
    from flexattn.kernels import tiered
    from bench_attention import bench, mods
    torch_flex_c = torch.compile(torch_flex, dynamic=False)
    for case in cases:
        sm, mm = mods(case, S, 16, "cuda")
        q, k, v = [torch.randn(4, 16, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3)]
        tbm = torch_cbm(mm, None, None, S, S, device="cuda") if mm else None
        fbm = flexattn.create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
        flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=fbm).backward(torch.ones_like(q))
        tiered.wait()  # a new mask's own kernels compile in the background: time them, not that
        row = {}
        for name, fn, mode in [("torch", lambda: torch_flex_c(q, k, v, score_mod=sm, block_mask=tbm), MODES[-1])] + [
                (m[0], lambda: flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=fbm), m) for m in MODES]:
            set_mode(*mode[1:])
            with torch.no_grad():
                row[name + "_fwd"] = bench(fn)
            row[name + "_fwdbwd"] = bench(fn, backward=True, grads=(q, k, v))
        set_mode(True, True)
        print(f"{case} S={S} ms: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()) + " | ratio vs torch "
              + ", ".join(f"{m} fwd {row['torch_fwd'] / row[m + '_fwd']:.2f} fwd+bwd "
                          f"{row['torch_fwdbwd'] / row[m + '_fwdbwd']:.2f}" for m, _, _ in MODES), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", default="causal")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--no-first-output", dest="first", action="store_false")
    p.add_argument("--ab-cases", default="causal,document")
    a = p.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    fwd, fwdbwd, _ = host_bound(a.case, 1, 1, 256, 128)
    fwd2, fwdbwd2, _ = host_bound(a.case, 4, 16, a.seq, 128)
    for mode in MODES + MODES:
        set_mode(*mode[1:])
        tag = f"{mode[0]:>8}"
        print(f"{tag}: host-bound (B=H=1, S=256, {a.case}): fwd {per_call_us(fwd):.1f} us/call, "
              f"fwd+bwd {per_call_us(fwdbwd):.1f} us/call | B=4 H=16 S={a.seq}: fwd {per_call_us(fwd2, 100):.1f} "
              f"us/call, fwd+bwd {per_call_us(fwdbwd2, 100):.1f} us/call (wall, back to back)", flush=True)
    print(f"autograd.Function fwd+bwd of 3 tiny tensors: {autograd_cost():.1f} us/call")
    set_mode(True, False)  # the normal path, whose launches launch_parts takes apart
    launch_parts(a.case, 1, 1, 256, 128)
    set_mode(True, True)
    print(cprofile_calls(fwdbwd))
    gpu_time_ab(a.ab_cases.split(","), a.seq)
    if a.first:
        first_output_parts()


if __name__ == "__main__":
    main()
