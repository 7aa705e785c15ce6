"""The Hopper (Gluon) forward on an sm90 GPU, through the public flex_attention: numerics
against the float64 reference under DESIGN.md's rule, then forward speed against its ping-pong
form (fwd_PINGPONG), the Triton kernels (BACKEND='triton'), torch.compile(flex_attention) and
SDPA, in one process.

    PYTHONPATH=. python3 benchmarks/hopper_check.py [--quick] [--no-check] [--bench-dims 128,64]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from bench_attention import CASES, block_density, mods  # noqa: E402
from conftest import assert_close_to_golden  # noqa: E402
import flexattn  # noqa: E402
from flexattn.reference import reference_attention  # noqa: E402

HOPPER = {"BACKEND": "hopper", "TIERED": False, "fwd_PINGPONG": False}  # the one-partition form
PINGPONG = {**HOPPER, "fwd_PINGPONG": True}
TRITON = {"BACKEND": "triton", "TIERED": False}


def check(case, B, Hq, Hkv, L, S, D, dtype, dev):
    if case == "empty_rows":  # every third query row sees nothing
        score_mod, mask_mod = None, (lambda b, h, q, kv: (q % 3 != 0) & (kv <= q))
    else:
        score_mod, mask_mod = mods(case, max(L, S), Hq, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, Hq, L, D, device=dev, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=dev, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=dev, generator=g).to(dtype)
    bm = flexattn.create_block_mask(mask_mod, None, None, L, S, device=dev) if mask_mod else None
    gqa = Hq != Hkv
    gold_o, gold_l = reference_attention(q.double(), k.double(), v.double(), score_mod, mask_mod, enable_gqa=gqa)
    ref_o, ref_l = reference_attention(q, k, v, score_mod, mask_mod, enable_gqa=gqa)
    for opts in (HOPPER, PINGPONG):
        out, lse = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=gqa,
                                           return_lse=True, kernel_options=opts)
        assert_close_to_golden("out", out, ref_o, gold_o)
        assert_close_to_golden("lse", lse, ref_l.float(), gold_l)


TORCH_FLEX = None


def bench(case, B, H, S, D, dev, dtype=torch.bfloat16):
    global TORCH_FLEX
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm, flex_attention as t_flex
    if TORCH_FLEX is None:
        torch._dynamo.config.recompile_limit = 64
        TORCH_FLEX = torch.compile(t_flex)
    score_mod, mask_mod = mods(case, S, H, dev)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
    bm = flexattn.create_block_mask(mask_mod, None, None, S, S, device=dev) if mask_mod else None
    tbm = t_cbm(mask_mod, None, None, S, S, device=dev) if mask_mod else None
    flops = 4 * B * H * S * S * D * block_density(tbm)
    fns = {
        "hopper": lambda: flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=HOPPER),
        "pingpong": lambda: flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm,
                                                    kernel_options=PINGPONG),
        "triton": lambda: flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=TRITON),
        "torch_flex": lambda: TORCH_FLEX(q, k, v, score_mod=score_mod, block_mask=tbm),
    }
    if case in ("dense", "causal"):
        fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case == "causal")
    t0 = time.time()
    a = fns["hopper"]()
    torch.cuda.synchronize()
    first = time.time() - t0
    diff = max((a.float() - fns[other]().float()).abs().max().item() for other in ("triton", "pingpong"))
    row = {name: triton.testing.do_bench(fn) for name, fn in fns.items()}
    print(f"{case:15s} D={D:3d} S={S:5d} " + "  ".join(f"{n}={flops / (ms * 1e-3) / 1e12:6.1f}" for n, ms in row.items())
          + f"  TF/s | hopper/triton {row['triton'] / row['hopper']:.3f} | pingpong/hopper "
          + f"{row['hopper'] / row['pingpong']:.3f} | first {first:.2f}s | max|hopper - triton, pingpong| {diff:.3g}",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--bench-dims", default="128")
    a = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if not a.no_check:
        n = bad = 0
        shapes = [(2, 4, 4, 1000, 1000), (1, 8, 2, 300, 1000), (2, 2, 1, 129, 113)]
        plan = [(128, case, shp, torch.bfloat16) for case in
                ("dense", "causal", "sliding_window", "document", "alibi", "softcap", "prefix_lm", "empty_rows")
                for shp in shapes[:2]]
        plan += [(D, case, shapes[2], dt) for D in (64, 96, 128) for case in ("causal", "softcap")
                 for dt in (torch.bfloat16, torch.float16)]
        for D, case, shp, dtype in plan[::2] if a.quick else plan:
            n += 1
            try:
                check(case, *shp, D, dtype, dev)
            except Exception as e:  # report every failure, then go on
                bad += 1
                print(f"FAIL {case} shape={shp} D={D} {dtype}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"checks: {n - bad} passed, {bad} failed", flush=True)
    for D in [int(x) for x in a.bench_dims.split(",") if x]:
        for case in CASES:
            try:
                bench(case, 4, 16, 8192, D, dev)
            except Exception as e:
                print(f"bench {case} D={D} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
