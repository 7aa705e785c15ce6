"""Compile the generated kernels for sm_90 on a machine without a GPU (Triton's bundled
ptxas) and report registers / spills / shared memory / whether the loads were pipelined.
Costs no device time; use it before a GPU run.

    python benchmarks/aot_inspect.py               # fwd/bwd for causal, D=128 and 64
    python benchmarks/aot_inspect.py --kinds bwd --cases dense,causal,document --seq 2048 --loops
    python benchmarks/aot_inspect.py --kinds hopper --cases causal,softcap --dims 128,256 --loops --ops
        # the Hopper (Gluon) forward; --options '{"fwd_PINGPONG": false}' for its one-partition form

Per kernel: registers and spill bytes (ptxas -v on the PTX Triton produced), shared memory,
async copies, wgmma. With --loops, per scf.for of the TTGIR (in program order: dq walks the
partial then the full kv blocks; dk/dv the partial then the full q blocks of each GQA head)
the async_wait counts inside it (num=0 in a loop: the loads are not pipelined), and per
innermost loop of the SASS (a backward branch) its instruction count and the HGMMA / MUFU /
local-memory (spill) / global-load instructions in it; with --ops, every opcode's count in it.
For the Hopper forward the registers are the launch's (warp_specialize's setmaxnreg gives the
consumer warps 240), and its SASS loops come per partition: a consumer's partial- then
full-block loop (two consumers in the ping-pong form), then the producer's two.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _ty(v):
    if hasattr(v, "block_shape") and hasattr(v, "layout"):  # a Gluon TMA descriptor (hopper_forward.descriptor)
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[v.base.dtype]
        return f"tensordesc<{dt}[{', '.join(map(str, v.block_shape))}],{v.layout!r}>"
    if hasattr(v, "block_shape") and hasattr(v, "base"):  # a Triton TMA descriptor (backward.walked_descriptors)
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[v.base.dtype]
        return f"tensordesc<{dt}[{', '.join(map(str, v.block_shape))}]>"
    if isinstance(v, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8",
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
    # compile options (a Gluon kernel also names num_warps among its parameters)
    opts = {k: kw[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kw}
    names = jitfn.arg_names
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if i < len(args):
            v = args[i]
            if v is None:
                sig[name] = "constexpr"
                consts[(i,)] = None
                continue
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
    if type(jitfn).__name__ == "GluonJITFunction":
        from triton.experimental.gluon._runtime import GluonASTSource
        src = GluonASTSource(jitfn, sig, consts, attrs)
    else:
        src = ASTSource(jitfn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas_usage(ptx):
    """(registers, spill store bytes, spill load bytes, stack bytes, why the wgmmas are serialized or
    None) from ptxas -v on the PTX. ptxas serializes a kernel's wgmmas (each waits for the one before:
    no tensor-core overlap at all) where registers are short, and says so only in this log."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([os.path.join(_BIN, "ptxas"), "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    txt = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", txt)
    sp = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    spill = tuple(int(sp.group(i)) for i in (2, 3, 1)) if sp else (-1, -1, -1)
    serial = re.search(r"wgmma.mma_async instructions are serialized due to ([^\n]*?) for the function", txt)
    return (int(regs.group(1)) if regs else -1, *spill, serial.group(1) if serial else None)


def sass_of(cubin):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", path],
                              capture_output=True, text=True).stdout


_MIN_LOOP = 16  # instructions


def sass_loops(sass, all_ops=False):
    """[(start, end, counts)] for each innermost loop of the SASS (a backward branch whose body
    holds no other loop's), in address order; all_ops: every opcode's count too (key "ops")."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    spans = []
    for addr, text in ins:
        b = re.search(r"\bBRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr and not text.startswith("BRA 0x%x" % addr):
            spans.append((int(b.group(1), 16), addr))
    # a barrier's try-wait retry (a few instructions) is no loop of the kernel's own; nor is a span
    # that crosses one ending before it (a jump back from code ptxas moved past the loops)
    spans = [(lo, hi) for lo, hi in spans if sum(lo <= a <= hi for a, _ in ins) >= _MIN_LOOP]
    spans = [(lo, hi) for lo, hi in spans if not any(lo2 < lo < hi2 < hi for lo2, hi2 in spans)]
    loops = []
    for lo, hi in spans:
        if any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2 in spans):
            continue  # holds another loop: not innermost
        ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for a, t in ins if lo <= a <= hi]
        cnt = {"instr": len(ops),
               "HGMMA": sum(o.startswith("HGMMA") for o in ops),
               "MUFU": sum(o.startswith("MUFU") for o in ops),
               "MUFU.EX2": sum(o.startswith("MUFU.EX2") for o in ops),
               "LDGSTS": sum(o.startswith("LDGSTS") for o in ops),
               "LDG": sum(o.startswith("LDG.") or o == "LDG" for o in ops),
               "STL/LDL": sum(o.startswith(("STL", "LDL")) for o in ops),
               "ISETP": sum(o.startswith("ISETP") for o in ops),
               "FSEL/SEL": sum(o.startswith(("FSEL", "SEL")) for o in ops),
               "BAR/SYNC": sum(o.startswith(("BAR", "WARPSYNC", "DEPBAR", "WARPGROUP")) for o in ops)}
        if all_ops:
            cnt["ops"] = dict(sorted(Counter(ops).items(), key=lambda kv: -kv[1]))
        loops.append((lo, hi, cnt))
    return loops


def ttgir_loops(ttgir):
    """[(async_wait nums inside, number of ops)] per scf.for of the TTGIR, in program order."""
    out, stack = [], []
    for line in ttgir.splitlines():
        if "scf.for" in line:
            stack.append({"waits": [], "ops": 0})
            continue
        if stack:
            if re.match(r"\s*} loc", line) or re.match(r"\s*}\s*$", line):
                out.append(stack.pop())
                continue
            stack[-1]["ops"] += 1
            w = re.search(r"ttg\.async_wait.*\{num = (\d+)", line)
            if w:
                stack[-1]["waits"].append(int(w.group(1)))
    return out


def report(tag, ck, loops=False, ops=False):
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
    regs, sst, sld, stack, serial = ptxas_usage(ptx)
    if serial:
        print(f"{tag}: WGMMAS SERIALIZED by ptxas ({serial})")
    print(f"{tag}: regs {regs}, spill st/ld {sst}/{sld} B (stack {stack} B), shared {md.shared} B, "
          f"ttgir async copies {n_async}, wgmma {n_wgmma}, "
          f"cp.async 16B {n_cp}/{n_cp_all}, ld.global.v4 {n_v4}/{n_ld}, local mem {local}", flush=True)
    if loops:
        for i, lp in enumerate(ttgir_loops(ttgir)):
            print(f"    ttgir loop {i}: {lp['ops']} ops, async_wait num={lp['waits']}")
        for i, (lo, hi, cnt) in enumerate(sass_loops(sass_of(ck.asm["cubin"]), all_ops=ops)):
            hist = cnt.pop("ops", None)
            print(f"    sass loop {i} [{lo:#x}-{hi:#x}]: " + ", ".join(f"{k} {v}" for k, v in cnt.items()))
            if hist:
                print("        " + ", ".join(f"{k} {v}" for k, v in hist.items()))
    return ck




def capture(kind, case, S=8192, D=128, B=4, H=16, cfg=None, bwd_cfg=None, options=None, exact_tanh=False):
    """Run the launch path on CPU tensors but capture each launch (kernel, args, kwargs)
    instead of running it; `cfg`/`bwd_cfg` override the tile config (GPU defaults), `options`
    are kernel_options; exact_tanh: tanh as the formula, not the hardware tanh a GPU call with
    these bf16 inputs takes (Plan.fast_tanh)."""
    import flexattn
    from flexattn.kernels import config, launcher, make_plan
    from flexattn.kernels.backward import flex_backward
    from flexattn.kernels.forward import flex_forward
    from flexattn.kernels.hopper_forward import hopper_forward
    from flexattn.trace import trace_score
    from bench_attention import mods
    sm, mm = mods(case, S, H, "cpu")
    q, k, v = [torch.empty(B, H, S, D, dtype=torch.bfloat16) for _ in range(3)]
    bm = flexattn.create_block_mask(mm, None, None, S, S) if mm else None
    sg = trace_score(sm) if sm else None
    plan = make_plan(q, k, v, score_graph=sg, mask_graph=bm.mask_graph if bm else None, block_mask=bm,
                     scale=None, kernel_options=options)
    plan.fast_tanh = not exact_tanh  # what make_plan decides for bf16 inputs on the GPU
    launches = []
    orig = launcher.launch
    launcher.launch = lambda kernel, grid, args, kwargs, key, **_: launches.append(
        (kernel, grid, args(kwargs) if callable(args) else args, kwargs))
    old_dk, old_sms = config.device_key, launcher.sm_count
    config.device_key = lambda d: "sm90"
    launcher.sm_count = lambda device: 132  # the H100 / H200's
    try:
        if kind == "fwd":
            flex_forward(plan, q, k, v, cfg=cfg)
        elif kind == "hopper":  # through launch_cached: recorded, not run
            with launcher.recording() as recorded:
                hopper_forward(plan, q, k, v)
            launches += recorded
        else:
            out = torch.empty_like(q)
            lse = torch.empty(B, H, S)
            with launcher.recording() as recorded:  # the Hopper backward's launch (bwd_HOPPER)
                flex_backward(plan, q, k, v, out, lse, torch.empty_like(q), None, plan.score_bufs, cfg=bwd_cfg)
            launches += recorded
    finally:
        launcher.launch = orig
        config.device_key, launcher.sm_count = old_dk, old_sms
    return launches


def inspect_case(kind, case, D=128, cfg=None, S=8192, loops=False, options=None, ops=False, exact_tanh=False):
    """cfg: the forward's or the backward's tile config (by kind); None: the default."""
    out = []
    fwd_cfg, bwd_cfg = (cfg, None) if kind == "fwd" else (None, cfg)
    for kernel, grid, args, kwargs in capture(kind, case, S=S, D=D, cfg=fwd_cfg, bwd_cfg=bwd_cfg, options=options,
                                              exact_tanh=exact_tanh):
        ck = compile_sm90(kernel, args, kwargs)
        tag = f"{kind} {case} S={S} D={D} {kernel.__name__} " + \
              " ".join(f"{k}={kwargs[k]}" for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "WANT_DQ",
                                                     "WANT_DK", "WANT_DV", "ATOMIC_DQ", "PINGPONG", "TMA_LOADS")
                       if k in kwargs)
        out.append(report(tag, ck, loops=loops, ops=ops))
    return out


def main():
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="dense,causal,softcap")
    p.add_argument("--dims", default="128,64")
    p.add_argument("--seq", type=int, default=8192, help="sequence length (Q = KV)")
    p.add_argument("--kinds", default="fwd,bwd", help="fwd, bwd (the Triton kernels), hopper (the Hopper forward)")
    p.add_argument("--loops", action="store_true", help="per-loop pipelining (TTGIR) and SASS counts")
    p.add_argument("--ops", action="store_true", help="with --loops: every opcode's count per SASS loop")
    p.add_argument("--dump", default=None, help="folder to write ttgir/ptx/sass")
    p.add_argument("--cfg", default=None,
                   help="tile config instead of the default, comma-separated: BLOCK_M,BLOCK_N,warps,stages "
                        "(fwd) or M1,N1,M2,N2,warps,stages (bwd); with one kind only")
    p.add_argument("--options", default=None, help='kernel_options as JSON, e.g. \'{"bwd_ATOMIC_DQ": true}\'')
    p.add_argument("--exact-tanh", action="store_true",
                   help="tanh as the exact formula (what float32 calls run), not the hardware tanh of bf16 calls")
    a = p.parse_args()
    options = json.loads(a.options) if a.options else None
    cfg = tuple(map(int, a.cfg.split(","))) if a.cfg else None
    if cfg and "hopper" in a.kinds.split(","):
        p.error("--cfg sets the Triton kernels' tiles; the Hopper forward's are hopper_forward.hopper_fwd_config")
    for kind in a.kinds.split(","):
        for D in map(int, a.dims.split(",")):
            for case in a.cases.split(","):
                cks = inspect_case(kind, case, D=D, cfg=cfg, S=a.seq, loops=a.loops, options=options, ops=a.ops,
                                   exact_tanh=a.exact_tanh)
                for i, ck in enumerate(cks):
                    if a.dump:
                        os.makedirs(a.dump, exist_ok=True)
                        # the launch's index too: dk and dv are two launches of one kernel
                        stem = f"{kind}_{case}_{a.seq}_{D}_{i}_{ck.metadata.name}"
                        for ext in ("ttgir", "ptx"):
                            with open(os.path.join(a.dump, f"{stem}.{ext}"), "w") as f:
                                f.write(ck.asm[ext])
                        with open(os.path.join(a.dump, f"{stem}.sass"), "w") as f:
                            f.write(sass_of(ck.asm["cubin"]))


if __name__ == "__main__":
    main()
