"""flexattn against every peer, in one process on one GPU (needs a CUDA GPU; FlashAttention-4
brought by ../shared/tools/flash-peer.sh, skipped where it is not importable).

    PYTHONPATH=.:/tmp/peersite python3 benchmarks/bench_peers.py --dims 128 --seqs 2048,8192,16384 --extra gqa,32k
    PYTHONPATH=... python3 benchmarks/bench_peers.py --dims 64,256 --seqs 8192 --no-torch-triton
    PYTHONPATH=... python3 benchmarks/bench_peers.py --options '{"fwd_PINGPONG": true}'   # flexattn's kernel_options
    python3 benchmarks/bench_peers.py --table benchmarks/results/latest.json   # RESULTS.md's table

Peers: torch FlexAttention compiled with kernel_options={"BACKEND": "FLASH"} (FlashAttention-4
running the mods) and with its Triton backend, FA4's `flash_attn.cute.flash_attn_func` (dense and
causal only) and SDPA (dense and causal only). TFLOP/s as PEERS.md counts them: 4*B*Hq*S^2*D*density
/ time forward, 3.5x that forward+backward; density = fraction of non-empty 128x128 blocks.

What a user sees is measured, not only the best steady state. For flexattn a new mask's first
calls run through its tile-table form while its own kernels compile in the background
(flexattn.kernels.tiered), so per case: the first forward's wall time (`*_first_s`), then
`do_bench` right away (`flexattn_user_f` / `_user_fb`: what a benchmark written by a user
reports), then, once the background compile is done, the steady state (`flexattn_f` / `_fb`).
The peers compile inside their first call and are steady after it. A steady figure is the median
of STEADY_REPEATS do_bench medians; the "right away" ones are one do_bench each, as a user's.

Rows (a list of objects, keys case, D, S, flexattn_f, flexattn_fb, flash_f, flash_fb, fa4_f,
fa4_fb, sdpa_f, sdpa_fb, ...; TFLOP/s, null where a peer cannot run the case) go to
$OUT/latest.json after every case, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import CASES, block_density, mods  # noqa: E402


# A steady-state figure is the median of this many do_bench medians: one do_bench of a kernel dips
# by up to 10% now and then on the H200 (logs/h200_2026-12-02_forward_within_process_16k.log)
STEADY_REPEATS = 3


def ms_of(fn, repeats=1):
    return statistics.median(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
                             for _ in range(repeats))


def wall_s(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def fa4_func():
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - the peer is optional
        print(f"FA4 not importable ({type(e).__name__}: {str(e)[:120]}): fa4 columns null", flush=True)
        return None
    return flash_attn_func


def measure(fn, params, flops, first=True, repeats=STEADY_REPEATS):
    """(first call s, fwd TFLOP/s, fwd+bwd TFLOP/s) of fn; None for what fails (printed).
    repeats: do_bench runs per figure (their median); 1 for what a user sees right after a first call."""
    go = None
    res = [None, None, None]
    try:
        if first:
            with torch.no_grad():
                res[0] = wall_s(fn)
        with torch.no_grad():
            res[1] = flops / ms_of(fn, repeats) * 1e-9
        out = fn()
        go = torch.randn_like(out)

        def step():
            for p in params:
                p.grad = None
            fn().backward(go)
        res[2] = 3.5 * flops / ms_of(step, repeats) * 1e-9
    except Exception as e:  # noqa: BLE001 - a peer that cannot run a case gets null
        print(f"    failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
    return res


def run_case(case, D, S, B, Hq, Hkv, fa4, torch_triton, rows, out_path, options=None):
    from torch.nn.attention.flex_attention import create_block_mask as torch_cbm
    from torch.nn.attention.flex_attention import flex_attention as torch_flex
    import flexattn
    from flexattn.kernels import tiered

    dev = "cuda"
    base = case.split("/")[0]  # "causal/gqa" is causal with other head counts
    score_mod, mask_mod = mods(base, S, Hq, dev)
    torch.manual_seed(0)
    q = torch.randn(B, Hq, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = [torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    gqa = Hq != Hkv
    tbm = torch_cbm(mask_mod, None, None, S, S, device=dev) if mask_mod else None
    flops = 4 * B * Hq * S * S * D * block_density(tbm)
    row = {"case": case, "D": D, "S": S, "B": B, "Hq": Hq, "Hkv": Hkv, "density": block_density(tbm),
           "flexattn_options": options}

    # flexattn: a never-seen mask, as a user's script meets it
    def ours():
        return flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=fbm, enable_gqa=gqa,
                                       kernel_options=options)
    t0 = time.perf_counter()
    fbm = flexattn.create_block_mask(mask_mod, None, None, S, S, device=dev) if mask_mod else None
    row["flexattn_mask_s"] = time.perf_counter() - t0
    first, row["flexattn_user_f"], row["flexattn_user_fb"] = measure(ours, (q, k, v), flops, repeats=1)
    row["flexattn_first_s"] = first
    tiered.wait()
    _, row["flexattn_f"], row["flexattn_fb"] = measure(ours, (q, k, v), flops, first=False)
    with torch.no_grad():
        ref = ours().float()

    def check(name, fn, layout=None):
        try:
            with torch.no_grad():
                got = fn().float()
            if layout == "bshd":
                got = got.transpose(1, 2)
            row[f"{name}_relerr"] = ((got - ref).norm() / ref.norm()).item()
        except Exception:  # noqa: BLE001 - measure() reports the failure
            pass

    flash_c = torch.compile(torch_flex, dynamic=False)
    flash = lambda: flash_c(q, k, v, score_mod=score_mod, block_mask=tbm, enable_gqa=gqa,  # noqa: E731
                            kernel_options={"BACKEND": "FLASH"})
    row["flash_first_s"], row["flash_f"], row["flash_fb"] = measure(flash, (q, k, v), flops)
    check("flash", flash)
    if torch_triton:
        tri_c = torch.compile(torch_flex, dynamic=False)
        tri = lambda: tri_c(q, k, v, score_mod=score_mod, block_mask=tbm, enable_gqa=gqa)  # noqa: E731
        row["torch_triton_first_s"], row["torch_triton_f"], row["torch_triton_fb"] = measure(tri, (q, k, v), flops)
    plain = base in ("dense", "causal")
    row.update(fa4_first_s=None, fa4_f=None, fa4_fb=None, sdpa_f=None, sdpa_fb=None)
    if plain and fa4 is not None:
        qb, kb, vb = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]

        def fa():
            r = fa4(qb, kb, vb, causal=base == "causal")
            return r[0] if isinstance(r, tuple) else r
        row["fa4_first_s"], row["fa4_f"], row["fa4_fb"] = measure(fa, (qb, kb, vb), flops)
        check("fa4", fa, layout="bshd")
    if plain:
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=base == "causal", enable_gqa=gqa)
        _, row["sdpa_f"], row["sdpa_fb"] = measure(sdpa, (q, k, v), flops, first=False)
        check("sdpa", sdpa)
    rows.append(row)
    with open(out_path, "w") as f:
        json.dump(rows, f, indent=1)

    def fmt(x):
        return "   -" if x is None else f"{x:4.0f}"
    errs = " ".join(f"{k[:-7]} {v:.1e}" for k, v in row.items() if k.endswith("_relerr"))
    print(f"{case:>15} D={D:>3} S={S:>5} B={B} H={Hq}/{Hkv} | flexattn {fmt(row['flexattn_f'])}/{fmt(row['flexattn_fb'])}"
          f" (user {fmt(row['flexattn_user_f'])}/{fmt(row['flexattn_user_fb'])}, first {row['flexattn_first_s'] or 0:.2f} s)"
          f" | FLASH {fmt(row['flash_f'])}/{fmt(row['flash_fb'])} | FA4 {fmt(row['fa4_f'])}/{fmt(row['fa4_fb'])}"
          f" | SDPA {fmt(row['sdpa_f'])}/{fmt(row['sdpa_fb'])}"
          + (f" | torch-Triton {fmt(row['torch_triton_f'])}/{fmt(row['torch_triton_fb'])}" if torch_triton else "")
          + f" | relerr vs flexattn: {errs}", flush=True)
    del q, k, v
    torch.cuda.empty_cache()


NAMES = {"dense": "dense", "causal": "causal", "sliding_window": "sliding window 1024", "prefix_lm": "prefix-LM 1024",
         "document": "document causal", "alibi": "causal + ALiBi", "softcap": "causal + softcap",
         "causal/gqa": "causal, GQA 32/8 (B=2)", "causal/32k": "causal, one 32K sequence"}


def markdown(rows) -> str:
    """The rows as RESULTS.md's table: TFLOP/s fwd / fwd+bwd, and flexattn / FLASH."""
    def tf(r, k):
        f, fb = r.get(f"{k}_f"), r.get(f"{k}_fb")
        return "–" if f is None and fb is None else \
            f"{'–' if f is None else round(f)} / {'–' if fb is None else round(fb)}"

    def ratio(r, a, b):
        out = []
        for m in ("f", "fb"):
            x, y = r.get(f"{a}_{m}"), r.get(f"{b}_{m}")
            out.append("–" if not x or not y else f"{x / y:.2f}")
        return " / ".join(out)
    lines = ["| case | D | S | flexattn | flexattn, as a user first meets it | torch flex FLASH | FA4 | SDPA | "
             "flexattn / FLASH | flexattn / FA4 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {NAMES.get(r['case'], r['case'])} | {r['D']} | {r['S'] // 1024}K | {tf(r, 'flexattn')} | "
                     f"{tf(r, 'flexattn_user')} | {tf(r, 'flash')} | {tf(r, 'fa4')} | {tf(r, 'sdpa')} | "
                     f"{ratio(r, 'flexattn', 'flash')} | {ratio(r, 'flexattn', 'fa4')} |")
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["--table"]:  # print RESULTS.md's table of a latest.json
        with open(sys.argv[2]) as f:
            print(markdown(json.load(f)))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--seqs", default="8192")
    p.add_argument("--dims", default="128")
    p.add_argument("--extra", default="", help="gqa (causal, Hq=32 Hkv=8, B=2, S=8K), 32k (causal, B=1, S=32K)")
    p.add_argument("--no-torch-triton", dest="torch_triton", action="store_false")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
    p.add_argument("--json", default=None, help="default: $OUT/latest.json")
    p.add_argument("--options", default=None,
                   help='flexattn\'s kernel_options as JSON, e.g. \'{"fwd_PINGPONG": true}\' (recorded in each row)')
    a = p.parse_args()
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 10_000
    torch._dynamo.config.accumulated_recompile_limit = 10_000
    out_path = a.json or os.path.join(os.environ.get("OUT", "."), "latest.json")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    fa4 = fa4_func()
    rows, t_start = [], time.time()
    plan = [(c, D, S, 4, 16, 16) for D in map(int, a.dims.split(",")) for S in map(int, a.seqs.split(","))
            for c in a.cases.split(",") if c]
    if "gqa" in a.extra:
        plan.append(("causal/gqa", 128, 8192, 2, 32, 8))
    if "32k" in a.extra:
        plan.append(("causal/32k", 128, 32768, 1, 16, 16))
    for case, D, S, B, Hq, Hkv in plan:
        if time.time() - t_start > a.budget_s:
            print(f"budget reached: {case} D={D} S={S} and later cases not run", flush=True)
            break
        run_case(case, D, S, B, Hq, Hkv, fa4, a.torch_triton, rows, out_path,
                 json.loads(a.options) if a.options else None)


if __name__ == "__main__":
    main()
