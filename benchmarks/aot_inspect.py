"""Compile the generated kernels for sm_90 on a machine without a GPU (Triton's bundled
ptxas) and report registers / spills / shared memory / whether the loads were pipelined.
Costs no device time; use it before a GPU run.

    python benchmarks/aot_inspect.py               # fwd/bwd for causal, D=128 and 64
"""
from __future__ import annotations

import os
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _ty(v):
    if isinstance(v, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                      torch.int32: "i32", torch.int64: "i64"}[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(type(v))


def compile_sm90(jitfn, args, kwargs):
    """args: the launch's positional values (tensors may be meta/CPU); kwargs: constexprs +
    num_warps/num_stages. Ints equal to 1 are specialised like Triton does at launch."""
    kw = dict(kwargs)
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    names = jitfn.arg_names
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if i < len(args):
            v = args[i]
            if isinstance(v, int) and not isinstance(v, bool) and v == 1:
                sig[name] = "constexpr"
                consts[(i,)] = 1
                continue
            sig[name] = _ty(v)
            if isinstance(v, torch.Tensor) or (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "constexpr"
            consts[(i,)] = kw[name]
    src = ASTSource(jitfn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def report(tag, ck):
    md = ck.metadata
    ttgir = ck.asm.get("ttgir", "")
    n_async = len(re.findall(r"async_copy_global_to_local|async_tma_copy", ttgir))
    n_wgmma = len(re.findall(r"warp_group_dot", ttgir))
    ptx = ck.asm.get("ptx", "")
    n_v4 = len(re.findall(r"ld\.global(?:\.[a-z0-9_]+)*\.v4", ptx))
    n_ld = len(re.findall(r"ld\.global", ptx))
    n_cp = len(re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx))
    n_cp_all = len(re.findall(r"cp\.async", ptx))
    local = "yes" if ".local" in ptx else "no"
    print(f"{tag}: shared {md.shared} B, ttgir async copies {n_async}, wgmma {n_wgmma}, "
          f"cp.async 16B {n_cp}/{n_cp_all}, ld.global.v4 {n_v4}/{n_ld}, local mem {local}", flush=True)
    return ck




def capture(kind, case, S=8192, D=128, B=4, H=16, cfg=None, bwd_cfg=None):
    """Run the launch path on CPU tensors but capture each launch (kernel, args, kwargs)
    instead of running it; `cfg`/`bwd_cfg` override the tile config (GPU defaults)."""
    import flexattn
    import flexattn.kernels as K
    from flexattn.trace import trace_score
    from bench_attention import mods
    sm, mm = mods(case, S, H, "cpu")
    q, k, v = [torch.empty(B, H, S, D, dtype=torch.bfloat16) for _ in range(3)]
    bm = flexattn.create_block_mask(mm, None, None, S, S) if mm else None
    sg = trace_score(sm) if sm else None
    plan = K.make_plan(q, k, v, score_graph=sg, mask_graph=bm.mask_graph if bm else None, block_mask=bm,
                       scale=None, kernel_options=None)
    launches = []
    orig = K.launch
    K.launch = lambda kernel, grid, args, kwargs, key, shrink="BLOCK_N": launches.append((kernel, grid, args, kwargs))
    old_dk = K._device_key
    K._device_key = lambda d: "sm90"
    try:
        if kind == "fwd":
            K.forward(plan, q, k, v, cfg=cfg)
        else:
            import flexattn.kernels.prep as prep
            orig_prep = prep.bwd_prep
            prep.bwd_prep = lambda out, dout, lse, dlse: (torch.empty(B, H, S), torch.empty(B, H, S))
            out = torch.empty_like(q)
            lse = torch.empty(B, H, S)
            try:
                K.backward(plan, q, k, v, out, lse, torch.empty_like(q), None, [])
            finally:
                prep.bwd_prep = orig_prep
    finally:
        K.launch = orig
        K._device_key = old_dk
    return launches


def inspect_case(kind, case, D=128, cfg=None):
    out = []
    for kernel, grid, args, kwargs in capture(kind, case, D=D, cfg=cfg):
        ck = compile_sm90(kernel, args, kwargs)
        tag = f"{kind} {case} D={D} {kernel.__name__} " + \
              " ".join(f"{k}={kwargs[k]}" for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in kwargs)
        out.append(report(tag, ck))
    return out


def main():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default="fwd,bwd")
    p.add_argument("--cases", default="dense,causal,softcap")
    p.add_argument("--dims", default="128,64")
    p.add_argument("--dump", default=None, help="folder to write ttgir/ptx")
    a = p.parse_args()
    for kind in a.kinds.split(","):
        for D in map(int, a.dims.split(",")):
            for case in a.cases.split(","):
                for ck in inspect_case(kind, case, D=D):
                    if a.dump:
                        os.makedirs(a.dump, exist_ok=True)
                        stem = f"{kind}_{case}_{D}_{ck.metadata.name}"
                        for ext in ("ttgir", "ptx"):
                            with open(os.path.join(a.dump, f"{stem}.{ext}"), "w") as f:
                                f.write(ck.asm[ext])


if __name__ == "__main__":
    main()
