"""flexattn's CPU path vs torch.compile(flex_attention) on CPU vs SDPA (dense bool mask for
the sparse masks, a dense float bias for ALiBi), 2 threads, float32 by default.

    PYTHONPATH=$PWD python benchmarks/bench_cpu.py [--S 4096] [--dtype float32] [--busy | --load-turns]
        [--after-op] [--masks dense causal ...] [--no-compiled] [--reps 3] [--json out.json] [--full]

Cases (--masks): dense, causal, sliding (window 256), document (six documents, causal in
each), and two score_mods under a causal mask: alibi (per-head slopes) and softcap (30 tanh);
SDPA has no softcap, so that case's SDPA columns are '-' (and ALiBi's too where its dense
bias would pass 1 GiB).

--full runs the whole matrix: S in {1K, 4K, 16K} x float32 and bfloat16 (16K takes minutes).

Prints one table (median seconds of --reps runs after one warm-up; the implementations take
turns run by run) for forward and fwd+bwd; torch.compile(flex_attention) has no CPU
backward, so its fwd+bwd column is '-'.
--busy starts two processes that burn a CPU each for the duration of the timing (the
machine's two cores are then contended, as on a shared machine). --load-turns times every call
both ways in one process, the burners stopped and running in turn, and prints each slowdown
(busy / quiet median): separate quiet and busy processes compare the machine at two moments,
and this VM's speed wanders. --after-op runs a 1024 x 1024
matmul on torch's threads, untimed, right before each timed call, as a model's projections run
just before its attention: torch's OpenMP threads then still spin, waiting for more work, when
the call starts.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import signal
import statistics
import time
import warnings

import torch
import torch._dynamo

import flexattn

MASKS = ("dense", "causal", "sliding", "document", "alibi", "softcap")
SLOPES = 2.0 ** (-8.0 * torch.arange(1, 9) / 8)   # ALiBi's slopes for 8 heads


def mask_mod_of(name, S):
    if name == "dense":
        return None
    if name in ("causal", "alibi", "softcap"):
        return lambda b, h, q, k: q >= k
    if name == "sliding":
        return lambda b, h, q, k: (q >= k) & (q - k < 256)
    doc = torch.arange(S) // max(1, S // 6)  # six documents

    def document(b, h, q, k):
        return (doc[q] == doc[k]) & (q >= k)
    return document


def score_mod_of(name):
    if name == "alibi":
        return lambda score, b, h, q, k: score + SLOPES[h] * (k - q)
    if name == "softcap":
        return lambda score, b, h, q, k: 30.0 * torch.tanh(score / 30.0)
    return None


def sdpa_inputs(name, S, dense):
    """SDPA's (attn_mask, is_causal) for the case, or None where SDPA cannot run it."""
    if name in ("dense", "causal"):
        return None, name == "causal"
    if name == "softcap" or (name == "alibi" and len(SLOPES) * S * S * 4 > 2 ** 30):
        return None
    if name == "alibi":
        pos = torch.arange(S)
        bias = SLOPES.view(-1, 1, 1) * (pos.view(1, 1, S) - pos.view(1, S, 1))
        return bias.masked_fill(~dense.view(S, S), float("-inf")).unsqueeze(0), False
    return dense, False


def _burn(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100000):
            x += 1


def timeit(fns: dict, reps: int, before=None) -> dict:
    """{name: (median, worst) seconds of reps runs after one warm-up}; the functions take
    turns run by run, so a change in the machine's load falls on all of them alike.
    before: called, untimed, right before each timed run."""
    for fn in fns.values():
        fn()
    ts = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t)
    return {name: (statistics.median(x), max(x)) for name, x in ts.items()}


def timeit_under_load(fns: dict, reps: int, burners: list, before=None) -> dict:
    """{name: (quiet median, busy median)} seconds: each function is timed reps times with the
    CPU-burning processes stopped (SIGSTOP) and as many with them running (SIGCONT), quiet and
    busy runs taking turns, so both see the same machine (this VM's speed wanders by a fifth
    within minutes: a quiet and a busy process, one after the other, compare two machines)."""
    def load(on: bool):
        for p in burners:
            os.kill(p.pid, signal.SIGCONT if on else signal.SIGSTOP)
        time.sleep(0.05)   # the scheduler settles (the burners run or sleep)
    ts = {(name, busy): [] for name in fns for busy in (False, True)}
    try:
        load(False)
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for busy in (False, True):
                load(busy)
                for name, fn in fns.items():
                    if before is not None:
                        before()
                    t = time.perf_counter()
                    fn()
                    ts[name, busy].append(time.perf_counter() - t)
    finally:
        load(True)
    return {name: (statistics.median(ts[name, False]), statistics.median(ts[name, True])) for name in fns}


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, nargs="+", default=[4096])
    ap.add_argument("--masks", nargs="+", default=list(MASKS))
    ap.add_argument("--dtype", nargs="+", default=["float32"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--load-turns", action="store_true",
                    help="time every call quiet and busy, taking turns in one process (timeit_under_load)")
    ap.add_argument("--no-compiled", action="store_true")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--full", action="store_true", help="S in {1K, 4K, 16K}, float32 and bfloat16")
    ap.add_argument("--after-op", action="store_true",
                    help="before each timed call, untimed, a 1024 x 1024 matmul on torch's threads, as a model's "
                         "projections run just before its attention")
    a = ap.parse_args()
    if a.full:
        a.S, a.dtype = [1024, 4096, 16384], ["float32", "bfloat16"]
    torch.set_num_threads(a.threads)
    B, H, D = 1, 8, 64
    from torch.nn.attention.flex_attention import create_block_mask as torch_cbm
    from torch.nn.attention.flex_attention import flex_attention as torch_flex
    # static shapes: torch's CPU template failed to build (a C++ compile error) when one
    # compiled function recompiled for a second S with dynamic shapes. Every case compiles
    # anew (new shapes, dtype or mods): past the recompile limit (8) torch would silently run
    # eager flex_attention instead, so the limit is raised to the number of cases.
    compiled = None if a.no_compiled else torch.compile(torch_flex, dynamic=False)
    n_cases = len(a.S) * len(a.dtype) * len(a.masks)
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 2 * n_cases))
    stop, procs = mp.Event(), []
    if a.busy or a.load_turns:
        procs = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(2)]
        for p in procs:
            p.start()
    rows = []
    w = torch.randn(1024, 1024)
    before = (lambda: w @ w) if a.after_op else None

    def timed(fns):
        if a.load_turns:
            return timeit_under_load(fns, a.reps, procs, before)
        return timeit(fns, a.reps, before)
    try:
        for S, dname, name in itertools.product(a.S, a.dtype, a.masks):
            dtype = getattr(torch, dname)
            g = torch.Generator().manual_seed(0)
            q, k, v = [torch.randn(B, H, S, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]
            mm, sm = mask_mod_of(name, S), score_mod_of(name)
            bm = None if mm is None else flexattn.create_block_mask(mm, None, None, S, S)
            tbm = None if mm is None else torch_cbm(mm, None, None, S, S, device="cpu")
            dense = None if mm is None or name == "causal" else flexattn.create_mask(mm, None, None, S, S)
            sdpa_args = sdpa_inputs(name, S, dense)
            r = {"S": S, "mask": name, "dtype": dname, "busy": a.busy, "load_turns": a.load_turns,
                 "after_op": a.after_op}

            def ours():
                return flexattn.flex_attention(q, k, v, sm, block_mask=bm, kernel_options={"BACKEND": "cpu"})

            def sdpa():
                attn_mask, causal = sdpa_args
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if attn_mask is None else attn_mask.to(dtype) if attn_mask.is_floating_point()
                    else attn_mask, is_causal=causal)
            # torch refuses CPU inputs that require grad, even under no_grad
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            fwd = {"flexattn_fwd": ours}
            if compiled is not None:
                fwd["compiled_fwd"] = lambda: compiled(qd, kd, vd, sm, block_mask=tbm)
            if sdpa_args is not None:
                fwd["sdpa_fwd"] = sdpa
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r.update(timed({key: _no_grad(fn) for key, fn in fwd.items()}))
            if not a.no_bwd:
                bwd = {"flexattn_fwdbwd": lambda: ours().sum().backward()}
                if sdpa_args is not None:
                    bwd["sdpa_fwdbwd"] = lambda: sdpa().sum().backward()
                r.update(timed(bwd))
            rows.append(r)
            if a.load_turns:   # quiet -> busy median seconds (busy / quiet)
                f = lambda key: ("-" if key not in r
                                 else f"{r[key][0]:.3f} -> {r[key][1]:.3f} ({r[key][1] / r[key][0]:.2f}x)")
            else:
                f = lambda key: "-" if key not in r else f"{r[key][0]:.3f} ({r[key][1]:.3f})"
            print(f"S={S:6d} {dname:8s} {name:9s} fwd: flexattn {f('flexattn_fwd')}  compiled {f('compiled_fwd')}  "
                  f"sdpa {f('sdpa_fwd')} | fwd+bwd: flexattn {f('flexattn_fwdbwd')}  sdpa {f('sdpa_fwdbwd')}",
                  flush=True)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
    what = "quiet -> busy median seconds (busy / quiet)" if a.load_turns else "median (worst) seconds"
    print(f"({what} of {a.reps}; {a.threads} threads; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()}; busy={a.busy}; after_op={a.after_op})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
