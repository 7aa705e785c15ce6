"""create_block_mask: flexattn vs torch.nn.attention.flex_attention.create_block_mask.

Time (best of a few runs after one warm-up call) and peak memory of building the mask, at
Q = KV in {4K, 16K, 64K} for causal, sliding window 1024 and a causal document mask, plus
flexattn alone at 256K and 1M. Each case runs in its own subprocess so that peak memory is
the case's own: CPU peak = ru_maxrss of the subprocess (minus its RSS before the call:
"delta"); CUDA peak = torch.cuda.max_memory_allocated. Subprocesses get an address-space
limit (--mem-limit-gb) so a case that would exhaust the machine fails as "OOM" instead.
Where both run, the worker also checks the two BlockMasks are identical (num_blocks and
valid indices of kv_*, full_kv_*, q_*, full_q_*).

    python benchmarks/bench_block_mask.py                    # CPU, writes bench_block_mask.json
    python benchmarks/bench_block_mask.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MASKS = ("causal", "sliding_window_1024", "document")


def make_mask(name, N, device):
    import torch
    if name == "causal":
        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        return causal
    if name == "sliding_window_1024":
        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= 1024)
        return sliding_window
    if name == "document":
        # documents of pseudo-random lengths (mean ~N/16, at least 1), causal inside each
        g = torch.Generator().manual_seed(0)
        lens = torch.randint(1, max(2, N // 8), (64,), generator=g)
        lens = lens[torch.cumsum(lens, 0) < N]
        lens = torch.cat([lens, torch.tensor([N - int(lens.sum())])])
        doc = torch.repeat_interleave(torch.arange(len(lens)), lens).to(torch.int32).to(device)

        def document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        return document
    raise ValueError(name)


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(impl, mask, N, device, reps, compare):
    import torch
    mod = make_mask(mask, N, device)
    if impl == "flexattn":
        from flexattn.build_mask import create_block_mask
        build = lambda: create_block_mask(mod, None, None, N, N, device=device)  # noqa: E731
    else:
        from torch.nn.attention.flex_attention import create_block_mask
        build = lambda: create_block_mask(mod, None, None, N, N, device=device)  # noqa: E731
    # warm-up on a small size (imports, first-call overheads), then measure
    small = make_mask(mask, 1024, device)
    (create_block_mask(small, None, None, 1024, 1024, device=device))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    base_rss = _rss_kb()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        bm = build()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if len(times) < reps:
            del bm
    out = {"time_s": min(times), "times_s": times}
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["delta_mb"] = (torch.cuda.max_memory_allocated() - base_mem) / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_mb"] = peak / 1024
        out["delta_mb"] = (peak - base_rss) / 1024
    out["sparsity"] = bm.sparsity()
    if compare and impl == "torch":
        from flexattn.build_mask import create_block_mask as ours_cbm
        ours = ours_cbm(mod, None, None, N, N, device=device)
        out["identical"] = _identical(ours, bm)
    return out


def _identical(a, b):
    import torch
    for num, idx in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                     ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")]:
        na, nb = getattr(a, num).cpu(), getattr(b, num).cpu().to(torch.int32)
        if not torch.equal(na, nb):
            return False
        ia, ib = getattr(a, idx).cpu(), getattr(b, idx).cpu().to(torch.int32)
        valid = torch.arange(ia.shape[-1]) < na.unsqueeze(-1)
        if not torch.equal(ia[valid], ib[valid]):
            return False
    return True


def run_case(impl, mask, N, device, reps, timeout, mem_gb, compare):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, mask, str(N), "--device", device,
           "--reps", str(reps)] + (["--compare"] if compare else [])

    def limit():
        if mem_gb and not device.startswith("cuda"):
            b = int(mem_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (b, b))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout}s"}
    if p.returncode != 0:
        err = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
        if "memory" in err.lower() or "alloc" in err.lower() or p.returncode in (-9, 137):
            err = f"OOM (limit {mem_gb} GiB): {err[:120]}"
        return {"error": err[:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt_n(n):
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per case")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0, help="address-space limit per CPU case")
    ap.add_argument("--sizes", default="4096,16384,65536", help="sizes where both run")
    ap.add_argument("--big-sizes", default="262144,1048576", help="sizes for flexattn alone")
    ap.add_argument("--masks", default=",".join(MASKS))
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "bench_block_mask.json"))
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "MASK", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, mask, N = args.worker
        print(json.dumps(worker(impl, mask, int(N), args.device, args.reps, args.compare)))
        return
    import torch
    import triton
    sizes = [int(x) for x in args.sizes.split(",") if x]
    big = [int(x) for x in args.big_sizes.split(",") if x]
    rows = []
    for mask in args.masks.split(","):
        for N in sizes + big:
            ours = run_case("flexattn", mask, N, args.device, args.reps,
                            args.timeout, args.mem_limit_gb, False)
            theirs = run_case("torch", mask, N, args.device, 1 if N >= 1 << 16 else args.reps, args.timeout,
                              args.mem_limit_gb, N <= 1 << 14) if N in sizes else None
            rows.append({"mask": mask, "N": N, "flexattn": ours, "torch": theirs})
            print(_row(rows[-1]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "triton": triton.__version__,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print()
    print(table(rows, meta))


def _cell(r):
    if r is None:
        return "-", "-"
    if "error" in r:
        return r["error"][:40], "-"
    return f"{r['time_s']:.3f}", f"{r['peak_mb']:.0f} ({r['delta_mb']:+.0f})"


def _row(row):
    o, t = row["flexattn"], row["torch"]
    speed = f"{t['time_s'] / o['time_s']:.1f}x" if t and "error" not in t and "error" not in o else "-"
    same = {True: "yes", False: "NO"}.get((t or {}).get("identical"), "-")
    return (f"| {row['mask']} | {fmt_n(row['N'])} | {_cell(o)[0]} | {_cell(o)[1]} | {_cell(t)[0]} | "
            f"{_cell(t)[1]} | {speed} | {same} |")


def table(rows, meta):
    head = (f"{meta['date']}, device {meta['device']} ({meta['gpu'] or meta['cpu']}, {meta['cpu_count']} cores), "
            f"torch {meta['torch']}, triton {meta['triton']}\n\n"
            "| mask | Q=KV | flexattn s | flexattn peak MiB (delta) | torch s | torch peak MiB (delta) | speed-up | identical |\n"
            "|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(_row(r) for r in rows)


if __name__ == "__main__":
    main()
