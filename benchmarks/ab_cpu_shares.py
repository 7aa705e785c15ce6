"""The CPU path's batched calls with their groups cut into --a against --b shares per thread
(flexattn.cpu._SHARES_PER_THREAD), the two taking turns run by run in one process (bench_cpu.timeit),
float32, B=1, H=8, D=64, 2 threads; --busy adds two CPU-burning processes. Median (worst)
seconds of 11 runs, forward and fwd+bwd.

    PYTHONPATH=$PWD python benchmarks/ab_cpu_shares.py --a 1 --b 4 --cases 4096:sliding,4096:document [--busy]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

import flexattn  # noqa: E402
import flexattn.cpu as cpu  # noqa: E402
from bench_cpu import _burn, mask_mod_of, timeit  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=int, default=1)
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--cases", default="4096:sliding,4096:document,16384:sliding,1024:sliding")
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--reps", type=int, default=11)
    a = ap.parse_args()
    torch.set_num_threads(2)
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,)) for _ in range(2 if a.busy else 0)]
    for p in burners:
        p.start()
    time.sleep(0.5 if a.busy else 0)
    try:
        for case in a.cases.split(","):
            S, name = int(case.split(":")[0]), case.split(":")[1]
            bm = flexattn.create_block_mask(mask_mod_of(name, S), None, None, S, S)
            q, k, v = [torch.randn(1, 8, S, 64, requires_grad=True) for _ in range(3)]

            def call(shares, bwd):
                def run():
                    cpu._SHARES_PER_THREAD = shares
                    if bwd:
                        flexattn.flex_attention(q, k, v, block_mask=bm).sum().backward()
                    else:
                        with torch.no_grad():
                            flexattn.flex_attention(q, k, v, block_mask=bm)
                return run
            cols = []
            for bwd in (False, True):
                r = timeit({f"x{a.a}": call(a.a, bwd), f"x{a.b}": call(a.b, bwd)}, a.reps)
                cols.append(" ".join(f"{n} {m:.3f} ({w:.3f})" for n, (m, w) in r.items()))
            print(f"{'busy' if a.busy else 'quiet'} S={S} {name:9s} fwd {cols[0]} | fwd+bwd {cols[1]}", flush=True)
    finally:
        stop.set()
        for p in burners:
            p.join()


if __name__ == "__main__":
    main()
