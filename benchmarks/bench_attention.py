"""flexattn kernels vs torch.compile(flex_attention) vs SDPA, in one run (needs a CUDA GPU).

    PYTHONPATH=. python3 benchmarks/bench_attention.py --cases causal,softcap --seqs 8192 --dims 128
    PYTHONPATH=. python3 benchmarks/bench_attention.py --first-output --decode --json out.json

TFLOP/s as PEERS.md counts them: 4*B*H*S^2*D*density / time for the forward, 3.5x that
for forward+backward; density = fraction of non-empty blocks of torch's block mask
(BLOCK_SIZE 128). Medians of triton.testing.do_bench. "flexattn" goes through the public
`flexattn.flex_attention` (tracing included); "kernels" calls the kernels with pre-traced
graphs (the launch cost alone).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CASES = ("dense", "causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap")


def mods(case: str, S: int, H: int, device):
    """(score_mod, mask_mod) of a PEERS.md case; the same callables serve both libraries."""
    def causal(b, h, q, kv):
        return q >= kv

    if case == "dense":
        return None, None
    if case == "causal":
        return None, causal
    if case == "sliding_window":
        def sliding(b, h, q, kv):
            return (q >= kv) & (q - kv <= 1024)
        return None, sliding
    if case == "prefix_lm":
        def prefix(b, h, q, kv):
            return (kv < 1024) | (q >= kv)
        return None, prefix
    if case == "document":
        g = torch.Generator().manual_seed(0)
        lengths, total = [], 0
        while total < S:
            n = int(torch.randint(256, 4097, (1,), generator=g))
            lengths.append(n)
            total += n
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:S]
        doc = doc.to(torch.int32).to(device)

        def document(b, h, q, kv):
            return (doc[q] == doc[kv]) & (q >= kv)
        return None, document
    if case == "alibi":
        slopes = torch.exp2(-8.0 * (torch.arange(H, dtype=torch.float32) + 1) / H).to(device)

        def alibi(score, b, h, q, kv):
            return score + slopes[h] * (kv - q)
        return alibi, causal
    if case == "softcap":
        def softcap(score, b, h, q, kv):
            return 30.0 * torch.tanh(score / 30.0)
        return softcap, causal
    raise KeyError(case)


def block_density(torch_block_mask) -> float:
    """Fraction of non-empty blocks of torch's BlockMask (1.0 for no mask): PEERS.md's density."""
    if torch_block_mask is None:
        return 1.0
    bm = torch_block_mask
    visited = bm.kv_num_blocks.sum().item()
    if bm.full_kv_num_blocks is not None:
        visited += bm.full_kv_num_blocks.sum().item()
    return visited / bm.kv_num_blocks.numel() / bm.kv_indices.shape[-1]


def bench(fn, backward=False, grads=()):
    if backward:
        def step():
            for t in grads:
                t.grad = None
            fn().backward(go_holder[0])
        go_holder = [None]
        out = fn()
        go_holder[0] = torch.randn_like(out)
        return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def run_matrix(args, results):
    from torch.nn.attention.flex_attention import flex_attention as torch_flex, create_block_mask as torch_cbm
    import flexattn
    from flexattn.kernels import flex_attention_triton, tiered
    from flexattn.trace import trace_score
    torch_flex_c = torch.compile(torch_flex, dynamic=False)
    dev = "cuda"
    B, H = args.batch, args.heads
    for D in args.dims:
        for S in args.seqs:
            for case in args.cases:
                score_mod, mask_mod = mods(case, S, H, dev)
                torch.manual_seed(0)
                q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3)]
                tbm = torch_cbm(mask_mod, None, None, S, S, device=dev) if mask_mod else None
                fbm = flexattn.create_block_mask(mask_mod, None, None, S, S, device=dev) if mask_mod else None
                density = block_density(tbm)
                flops = 4 * B * H * S * S * D * density
                sg = trace_score(score_mod) if score_mod else None
                mg = fbm.mask_graph if fbm is not None else None
                fns = {
                    "torch_flex": lambda: torch_flex_c(q, k, v, score_mod=score_mod, block_mask=tbm),
                    "flexattn": lambda: flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=fbm),
                }
                if args.kernels:
                    fns["kernels"] = lambda: flex_attention_triton(q, k, v, score_graph=sg, mask_graph=mg,
                                                                   block_mask=fbm, scale=None)[0]
                if case in ("dense", "causal"):
                    fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=case == "causal")
                row = {"case": case, "S": S, "D": D, "B": B, "H": H, "density": density}
                # a new mask structure's first calls start its kernels compiling in the
                # background (flexattn.kernels.tiered): let them finish before timing, as
                # torch's compile finishes inside do_bench's first call, before its timing
                fns["flexattn"]().backward(torch.ones(q.shape, device=dev, dtype=q.dtype))
                tiered.wait()
                for t in (q, k, v):
                    t.grad = None
                for name, fn in fns.items():
                    if args.fwd:
                        with torch.no_grad():
                            ms = bench(fn)
                        row[f"{name}_fwd_ms"] = ms
                        row[f"{name}_fwd_tflops"] = flops / ms * 1e-9
                    if args.bwd:
                        ms = bench(fn, backward=True, grads=(q, k, v))
                        row[f"{name}_fwdbwd_ms"] = ms
                        row[f"{name}_fwdbwd_tflops"] = 3.5 * flops / ms * 1e-9
                for mode in ("fwd", "fwdbwd"):
                    if f"torch_flex_{mode}_ms" in row:
                        row[f"ratio_{mode}"] = row[f"torch_flex_{mode}_ms"] / row[f"flexattn_{mode}_ms"]
                        if f"kernels_{mode}_ms" in row:
                            row[f"ratio_kernels_{mode}"] = row[f"torch_flex_{mode}_ms"] / row[f"kernels_{mode}_ms"]
                results["matrix"].append(row)
                print(_fmt_row(row), flush=True)
                del q, k, v
                torch.cuda.empty_cache()


def _fmt_row(r):
    s = f"{r['case']:>15} S={r['S']:>5} D={r['D']:>3} dens={r['density']:.3f} |"
    for mode in ("fwd", "fwdbwd"):
        if f"flexattn_{mode}_tflops" not in r:
            continue
        s += f" {mode}: flexattn {r[f'flexattn_{mode}_tflops']:6.1f}"
        if f"kernels_{mode}_tflops" in r:
            s += f" kernels {r[f'kernels_{mode}_tflops']:6.1f}"
        s += f" torch {r[f'torch_flex_{mode}_tflops']:6.1f}"
        if f"sdpa_{mode}_tflops" in r:
            s += f" sdpa {r[f'sdpa_{mode}_tflops']:6.1f}"
        s += f" ratio {r[f'ratio_{mode}']:.2f}x"
        if f"ratio_kernels_{mode}" in r:
            s += f" (kernels {r[f'ratio_kernels_{mode}']:.2f}x)"
        s += " |"
    return s


def first_output(args, results):
    """Time from a never-seen mask (new window constant) to the first output, warm process."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex, create_block_mask as torch_cbm
    import flexattn
    torch_flex_c = torch.compile(torch_flex, dynamic=False)
    S, D, B, H = 8192, 128, 4, 16
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def make(w):
        def window(b, h, qi, kv):
            return (qi >= kv) & (qi - kv <= w)
        return window

    def make_structure(d):  # an integer divisor stays in the kernel source: new kernels
        def strided(b, h, qi, kv):
            return (qi >= kv) & ((qi - kv) % d != d - 1)
        return strided

    from flexattn.kernels import tiered
    # warm both processes' machinery with one unrelated mask (flexattn: this also compiles
    # the tile-table kernels in the background, kernels.tiered)
    m0 = make(77)
    torch_flex_c(q, k, v, block_mask=torch_cbm(m0, None, None, S, S, device="cuda"))
    flexattn.flex_attention(q, k, v, block_mask=flexattn.create_block_mask(m0, None, None, S, S, device="cuda"))
    torch.cuda.synchronize()
    tiered.wait()  # background compiles never overlap a timed region (of either library)
    rows = []
    stamp = int(time.time())
    # "new constant": a window width never seen (flexattn: a kernel argument, no compile);
    # "new structure": a mask whose kernel source is new (an integer divisor never seen)
    trials = [("new constant", make, 333 + stamp % 1000), ("new constant", make, 555 + stamp % 1000),
              ("new structure", make_structure, 11 + stamp % 97), ("new structure", make_structure, 113 + stamp % 89)]
    for kind, maker, c in trials:
        m = maker(c)
        t0 = time.perf_counter()
        bm = torch_cbm(m, None, None, S, S, device="cuda")
        torch_flex_c(q, k, v, block_mask=bm)
        torch.cuda.synchronize()
        t_torch = time.perf_counter() - t0
        m = maker(c + 1)
        t0 = time.perf_counter()
        bm = flexattn.create_block_mask(m, None, None, S, S, device="cuda")
        pending = len(tiered._submitted)
        flexattn.flex_attention(q, k, v, block_mask=bm)
        torch.cuda.synchronize()
        t_ours = time.perf_counter() - t0
        path = "tile table" if len(tiered._submitted) > pending else "own kernels"
        t1 = time.perf_counter()
        tiered.wait()
        t_bg = time.perf_counter() - t1
        flexattn.flex_attention(q, k, v, block_mask=bm)  # now through its own kernels
        torch.cuda.synchronize()
        rows.append({"kind": kind, "constant": c, "torch_s": t_torch, "flexattn_s": t_ours, "ratio": t_ours / t_torch,
                     "flexattn_path": path, "background_compile_s": t_bg})
        print(f"first output, {kind} ({c}): torch {t_torch:.3f} s, flexattn {t_ours:.3f} s ({path}; its own "
              f"kernels ready {t_bg:.2f} s later), ratio {t_ours / t_torch:.3f}", flush=True)
    results["first_output"] = rows


def decode(args, results):
    from torch.nn.attention.flex_attention import flex_attention as torch_flex, create_block_mask as torch_cbm
    import flexattn
    from flexattn.kernels import tiered
    torch_flex_c = torch.compile(torch_flex, dynamic=False)
    rows = []
    for S in (8192, 32768):
        B, Hq, Hkv, D = 8, 32, 8, 128
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = [torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

        def prefix_causal(b, h, qi, kv):  # the one query sits at the end of the cache
            return kv <= qi + (S - 1)
        tbm = torch_cbm(prefix_causal, None, None, 1, S, device="cuda")
        fbm = flexattn.create_block_mask(prefix_causal, None, None, 1, S, device="cuda")
        flexattn.flex_attention(q, k, v, block_mask=fbm, enable_gqa=True)
        tiered.wait()  # background compiles (kernels.tiered) finish before timing
        t_torch = bench(lambda: torch_flex_c(q, k, v, block_mask=tbm, enable_gqa=True))
        t_ours = bench(lambda: flexattn.flex_attention(q, k, v, block_mask=fbm, enable_gqa=True))
        t_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        gb = 2 * B * Hkv * S * D * 2 / 1e9
        r = {"S": S, "torch_ms": t_torch, "flexattn_ms": t_ours, "sdpa_ms": t_sdpa, "ratio": t_torch / t_ours,
             "flexattn_GBps": gb / t_ours * 1e3, "torch_GBps": gb / t_torch * 1e3}
        rows.append(r)
        print(f"decode q_len 1 KV {S}: flexattn {t_ours:.3f} ms ({r['flexattn_GBps']:.0f} GB/s), torch flex "
              f"{t_torch:.3f} ms ({r['torch_GBps']:.0f} GB/s), sdpa {t_sdpa:.3f} ms, ratio {r['ratio']:.2f}x",
              flush=True)
    results["decode"] = rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--seqs", default="2048,8192,16384")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--no-fwd", dest="fwd", action="store_false")
    p.add_argument("--no-bwd", dest="bwd", action="store_false")
    p.add_argument("--no-matrix", dest="matrix", action="store_false")
    p.add_argument("--first-output", action="store_true")
    p.add_argument("--no-kernels", dest="kernels", action="store_false",
                   help="skip the pre-traced kernels column (saves time)")
    p.add_argument("--decode", action="store_true")
    p.add_argument("--json", default=None, help="write results here (default $OUT/bench_attention.json)")
    args = p.parse_args()
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 10_000  # one compiled flex per case, never the dense fallback
    torch._dynamo.config.accumulated_recompile_limit = 10_000
    args.cases = [c for c in args.cases.split(",") if c]
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.dims = [int(d) for d in args.dims.split(",")]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": time.strftime("%Y-%m-%d"), "matrix": []}
    print(f"# {results['gpu']}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    try:
        if args.matrix:
            run_matrix(args, results)
        if args.first_output:
            first_output(args, results)
        if args.decode:
            decode(args, results)
    finally:
        path = args.json or os.path.join(os.environ.get("OUT", "."), "bench_attention.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
