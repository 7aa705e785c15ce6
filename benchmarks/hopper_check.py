"""The Hopper (Gluon) forward on an sm90 GPU: numerics against the float64 reference under
DESIGN.md's rule, then forward speed against flexattn's Triton kernels,
torch.compile(flex_attention) and SDPA, in one process.

    PYTHONPATH=. python3 benchmarks/hopper_check.py [--quick]
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

from bench_attention import CASES, mods, block_density  # noqa: E402
from conftest import assert_close_to_golden  # noqa: E402
import flexattn  # noqa: E402
from flexattn import codegen, create_block_mask  # noqa: E402
from flexattn import kernels as K  # noqa: E402
from flexattn.kernels import hopper_forward as HF  # noqa: E402
from flexattn.kernels.hopper_forward import HOPPER_FWD_TEMPLATE, launch_hopper_forward  # noqa: E402
from flexattn.reference import reference_attention  # noqa: E402

_MODS: dict = {}
TORCH_FLEX = None


def hopper(q, k, v, score_mod, block_mask, scale=None):
    plan = K.make_plan(q, k, v, score_graph=flexattn.trace.trace_score(score_mod) if score_mod else None,
                       mask_graph=None, block_mask=block_mask, scale=scale, kernel_options=None)
    key = (plan.score_graph.structure_key() if plan.score_graph else None,
           plan.mask_graph.structure_key() if plan.mask_graph else None, plan.small_indices)
    mod = _MODS.get(key)
    if mod is None:
        mod = _MODS[key] = codegen.load_module(K._fill(HOPPER_FWD_TEMPLATE, plan.score_graph, plan.mask_graph, None, plan.small_indices),
                                               "flex_fwd_hopper")
    args = [*codegen.buffer_args(plan.score_graph, plan.score_bufs), *codegen.buffer_args(plan.mask_graph, plan.mask_bufs)]
    return launch_hopper_forward(mod.flex_fwd_hopper, plan.blocks, q, k, v, plan.scale, plan.score_graph is not None, args)


def check(case, B, Hq, Hkv, L, S, D, dtype, dev):
    if case == "empty_rows":  # every third query row sees nothing
        score_mod, mask_mod = None, (lambda b, h, q, kv: (q % 3 != 0) & (kv <= q))
    else:
        score_mod, mask_mod = mods(case, max(L, S), Hq, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, Hq, L, D, device=dev, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=dev, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=dev, generator=g).to(dtype)
    bm = create_block_mask(mask_mod, None, None, L, S, device=dev) if mask_mod else None
    out, lse = hopper(q, k, v, score_mod, bm)
    torch.cuda.synchronize()
    gq = Hq != Hkv
    gold_o, gold_l = reference_attention(q.double(), k.double(), v.double(), score_mod, mask_mod, enable_gqa=gq)
    ref_o, ref_l = reference_attention(q, k, v, score_mod, mask_mod, enable_gqa=gq)
    assert_close_to_golden("out", out, ref_o, gold_o)
    assert_close_to_golden("lse", lse, ref_l.float(), gold_l)


def bench(case, B, H, S, D, dev, dtype=torch.bfloat16):
    global TORCH_FLEX
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm, flex_attention as t_flex
    if TORCH_FLEX is None:
        torch._dynamo.config.recompile_limit = 64
        TORCH_FLEX = torch.compile(t_flex)
    score_mod, mask_mod = mods(case, S, H, dev)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
    bm = create_block_mask(mask_mod, None, None, S, S, device=dev) if mask_mod else None
    tbm = t_cbm(mask_mod, None, None, S, S, device=dev) if mask_mod else None
    dens = block_density(tbm)
    flops = 4 * B * H * S * S * D * dens
    row = {}
    t0 = time.time()
    hopper(q, k, v, score_mod, bm)
    torch.cuda.synchronize()
    row["hopper_first_s"] = time.time() - t0
    row["hopper"] = triton.testing.do_bench(lambda: hopper(q, k, v, score_mod, bm))
    default = HF.hopper_fwd_config
    for cfg in CONFIGS.get(D, []):
        HF.hopper_fwd_config = lambda d, dv, cfg=cfg: cfg
        try:
            row["h" + "/".join(map(str, cfg))] = triton.testing.do_bench(lambda: hopper(q, k, v, score_mod, bm))
        except Exception as e:
            print("config", cfg, type(e).__name__, str(e)[:200])
        finally:
            HF.hopper_fwd_config = default
    opts = {"TIERED": False}
    flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=opts)
    row["triton"] = triton.testing.do_bench(
        lambda: flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=opts))
    tf = TORCH_FLEX
    row["torch_flex"] = triton.testing.do_bench(lambda: tf(q, k, v, score_mod=score_mod, block_mask=tbm))
    if case in ("dense", "causal"):
        row["sdpa"] = triton.testing.do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case == "causal"))
    a, b = hopper(q, k, v, score_mod, bm)
    c = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=opts)
    diff = (a.float() - c.float()).abs().max().item()
    print(f"{case:15s} D={D:3d} S={S:5d} " + "  ".join(
        f"{k_}={flops / (ms * 1e-3) / 1e12:6.1f}" for k_, ms in row.items() if not k_.endswith("_s"))
        + f"  TF/s | first {row['hopper_first_s']:.2f}s | max|hopper-triton| {diff:.3g}", flush=True)


CONFIGS: dict = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--bench-dims", default="128,64")
    ap.add_argument("--configs", default="", help="D:bm,bn,stages,warps;... extra Hopper configs to time")
    a = ap.parse_args()
    for item in filter(None, a.configs.split(";")):
        d, cfg = item.split(":")
        CONFIGS.setdefault(int(d), []).append(tuple(int(x) for x in cfg.split(",")))
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if not a.no_check:
        n = bad = 0
        shapes = [(2, 4, 4, 1000, 1000), (1, 8, 2, 300, 1000), (2, 2, 1, 129, 113)]
        plan = [(D, case, shp, torch.bfloat16) for D in (128,) for case in
                ("dense", "causal", "sliding_window", "document", "alibi", "softcap", "prefix_lm", "empty_rows")
                for shp in shapes[:2]]
        plan += [(D, case, shapes[2], dt) for D in (64, 96, 128) for case in ("causal", "softcap")
                 for dt in (torch.bfloat16, torch.float16)]
        if a.quick:
            plan = plan[::2]
        for D, case, shp, dtype in plan:
            n += 1
            try:
                check(case, *shp, D, dtype, dev)
            except Exception as e:  # report every failure, then go on
                bad += 1
                print(f"FAIL {case} shape={shp} D={D} {dtype}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"checks: {n - bad} passed, {bad} failed", flush=True)
    for D in [int(x) for x in a.bench_dims.split(",")]:
        for case in CASES:
            try:
                bench(case, 4, 16, 8192, D, dev)
            except Exception as e:
                print(f"bench {case} D={D} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
