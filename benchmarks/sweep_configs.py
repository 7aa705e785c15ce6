"""Kernel-config sweep vs torch.compile(flex_attention), one process (needs a CUDA GPU).

    PYTHONPATH=. python3 benchmarks/sweep_configs.py --cases dense,causal,softcap --dims 128,64

For each (head dim, case) at B=4, H=16, S=8192, bf16: torch flex fwd and fwd+bwd, then our
kernels (pre-traced graphs, no Python planning beyond the launch) under each forward config
(BLOCK_M, BLOCK_N, warps, stages) and each backward config (M1, N1, M2, N2, warps, stages).
Also decode (q_len 1, B=8, Hq=32, Hkv=8, D=128) at KV 8K/32K over split counts, the
kernel alone vs the public call. Prints one line per measurement; JSON to $OUT/sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

FWD_CFGS = {
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4)],
    64: [(128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
}
# (M1, N1, M2, N2, warps, stages), optionally followed by a dict of further kernel_options
# (bwd_SPLIT_DKDV, bwd_ATOMIC_DQ; default: their defaults for the head dim)
ATOMIC = {"bwd_ATOMIC_DQ": True}
BWD_CFGS = {
    128: [(64, 128, 128, 64, 8, 3), (64, 128, 64, 128, 8, 3), (64, 64, 64, 64, 4, 3),
          (64, 128, 128, 64, 8, 3, ATOMIC), (64, 128, 128, 64, 8, 2, ATOMIC), (32, 128, 128, 64, 8, 3, ATOMIC),
          (32, 128, 128, 64, 8, 2, ATOMIC), (64, 64, 128, 64, 4, 2, ATOMIC)],
    64: [(64, 128, 128, 64, 8, 3), (64, 64, 64, 64, 4, 3), (128, 128, 128, 64, 8, 3),
         (64, 64, 64, 64, 4, 3, ATOMIC), (64, 128, 64, 64, 8, 3, ATOMIC), (128, 128, 64, 64, 8, 2, ATOMIC)],
    256: [(32, 128, 64, 64, 8, 2, {"bwd_SPLIT_DKDV": True}), (64, 128, 64, 64, 8, 2, {"bwd_SPLIT_DKDV": True}),
          (32, 128, 64, 64, 8, 2, {"bwd_SPLIT_DKDV": True, **ATOMIC}),
          (32, 128, 64, 64, 8, 1, {"bwd_SPLIT_DKDV": True, **ATOMIC}),
          (16, 128, 64, 64, 8, 2, {"bwd_SPLIT_DKDV": True, **ATOMIC}),
          (32, 64, 64, 64, 4, 2, {"bwd_SPLIT_DKDV": True, **ATOMIC})],
}


def bwd_options(cfg) -> dict:
    """kernel_options of a BWD_CFGS entry."""
    opts = dict(zip(("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "bwd_num_warps", "bwd_num_stages"), cfg[:6]))
    return {**opts, **(cfg[6] if len(cfg) > 6 else {})}


def grad_error(got, ref) -> float:
    """Largest relative error (norm) of dq, dk, dv against the reference's."""
    return max(((g.float() - r.float()).norm() / r.float().norm()).item() for g, r in zip(got, ref))


def ms_of(fn, rep=150):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="dense,causal,softcap")
    p.add_argument("--dims", default="128,64")
    p.add_argument("--S", type=int, default=8192)
    p.add_argument("--no-bwd", dest="bwd", action="store_false")
    p.add_argument("--no-fwd", dest="fwd", action="store_false", help="skip the forward configs")
    p.add_argument("--decode", action="store_true")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this")
    p.add_argument("--bwd-cfgs", default=None,
                   help='JSON list of backward configs for every head dim, e.g. [[64,128,128,64,8,3,{"bwd_HOPPER":true}]]')
    a = p.parse_args()
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 10_000
    torch._dynamo.config.accumulated_recompile_limit = 10_000
    from torch.nn.attention.flex_attention import flex_attention as torch_flex, create_block_mask as torch_cbm
    import flexattn
    from flexattn.kernels import flex_attention_triton
    from flexattn.trace import trace_score
    from bench_attention import block_density, mods
    tf = torch.compile(torch_flex, dynamic=False)
    t_start = time.time()
    res = {"gpu": torch.cuda.get_device_name(), "rows": []}
    out_path = os.path.join(os.environ.get("OUT", "."), "sweep.json")
    B, H, S = 4, 16, a.S
    for D in map(int, a.dims.split(",")):
        for case in [c for c in a.cases.split(",") if c]:
            if time.time() - t_start > a.budget_s:
                print("budget reached, stopping", flush=True)
                break
            sm, mm = mods(case, S, H, "cuda")
            torch.manual_seed(0)
            q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3)]
            go = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
            tbm = torch_cbm(mm, None, None, S, S, device="cuda") if mm else None
            fbm = flexattn.create_block_mask(mm, None, None, S, S, device="cuda") if mm else None
            dens = block_density(tbm)
            fl = 4 * B * H * S * S * D * dens
            sg = trace_score(sm) if sm else None
            mg = fbm.mask_graph if fbm is not None else None

            def ours(opts):
                return lambda: flex_attention_triton(q, k, v, score_graph=sg, mask_graph=mg, block_mask=fbm,
                                                     kernel_options=opts)[0]

            def fb(f):
                def step():
                    q.grad = k.grad = v.grad = None
                    f().backward(go)
                return step

            tflex = lambda: tf(q, k, v, score_mod=sm, block_mask=tbm)  # noqa: E731
            with torch.no_grad():
                t_torch = ms_of(tflex)
            row = {"D": D, "case": case, "torch_fwd_ms": t_torch, "fwd": {}, "bwd": {}}
            print(f"D={D} {case:>8} dens {dens:.3f}: torch fwd {t_torch:.3f} ms {fl / t_torch * 1e-9:.0f} TF",
                  flush=True)
            for cfg in FWD_CFGS[D] if a.fwd else ():
                opts = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg))
                try:
                    with torch.no_grad():
                        ref = tflex()
                        got = ours(opts)()
                        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                        t = ms_of(ours(opts))
                except Exception as e:  # noqa: BLE001
                    print(f"   fwd {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                row["fwd"][str(cfg)] = t
                print(f"   fwd {cfg}: {t:.3f} ms {fl / t * 1e-9:.0f} TF ratio {t_torch / t:.2f} relerr {err:.1e}",
                      flush=True)
            if a.bwd:
                t_torch_b = ms_of(fb(tflex), rep=300)
                row["torch_fwdbwd_ms"] = t_torch_b
                fb(tflex)()
                ref_grads = [x.grad.clone() for x in (q, k, v)]
                print(f"   torch fwd+bwd {t_torch_b:.3f} ms {3.5 * fl / t_torch_b * 1e-9:.0f} TF", flush=True)
                for cfg in json.loads(a.bwd_cfgs) if a.bwd_cfgs else BWD_CFGS[D]:
                    opts = bwd_options(cfg)
                    try:
                        fb(ours(opts))()
                        err = grad_error([x.grad for x in (q, k, v)], ref_grads)
                        t = ms_of(fb(ours(opts)), rep=300)
                    except Exception as e:  # noqa: BLE001
                        print(f"   bwd {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    row["bwd"][str(cfg)] = t
                    print(f"   fwd+bwd {cfg}: {t:.3f} ms {3.5 * fl / t * 1e-9:.0f} TF ratio {t_torch_b / t:.2f} "
                          f"grad relerr {err:.1e}", flush=True)
            res["rows"].append(row)
            with open(out_path, "w") as f:
                json.dump(res, f, indent=1)
            del q, k, v, go
            torch.cuda.empty_cache()
    if a.decode:
        from flexattn.kernels import make_plan
        from flexattn.kernels.decode import decode_forward
        for S_kv in (8192, 32768):
            Bd, Hq, Hkv, D = 8, 32, 8, 128
            q = torch.randn(Bd, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
            k, v = [torch.randn(Bd, Hkv, S_kv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

            def pc(b, h, qi, kv):
                return kv <= qi + (S_kv - 1)
            tbm = torch_cbm(pc, None, None, 1, S_kv, device="cuda")
            fbm = flexattn.create_block_mask(pc, None, None, 1, S_kv, device="cuda")
            gb = 2 * Bd * Hkv * S_kv * D * 2 / 1e9
            t_t = ms_of(lambda: tf(q, k, v, block_mask=tbm, enable_gqa=True))
            t_pub = ms_of(lambda: flexattn.flex_attention(q, k, v, block_mask=fbm, enable_gqa=True))
            t_sdpa = ms_of(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            print(f"decode KV {S_kv}: torch {t_t:.3f} ms, sdpa {t_sdpa:.3f}, flexattn public {t_pub:.3f} ms", flush=True)
            for splits in (None, 8, 16, 33, 66):
                for bn in (64, 128):
                    opts = {"decode_BLOCK_N": bn}
                    if splits:
                        opts["decode_SPLITS"] = splits
                    plan = make_plan(q, k, v, score_graph=None, mask_graph=fbm.mask_graph, block_mask=fbm,
                                     scale=None, kernel_options=opts)
                    t = ms_of(lambda: decode_forward(plan, q, k, v))
                    print(f"   kernel splits {splits} BLOCK_N {bn}: {t:.3f} ms {gb / t * 1e3:.0f} GB/s "
                          f"ratio vs torch {t_t / t:.2f}", flush=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    flexattn.flex_attention(q, k, v, block_mask=fbm, enable_gqa=True)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
