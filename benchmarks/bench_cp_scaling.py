"""Context parallelism across processes, one GPU each: flexattn.distributed against torch's
experimental context parallel for FlexAttention (the one torchtitan uses), same shapes, same
process group. Run under torchrun, once per world size:

    torchrun --nproc-per-node=N benchmarks/bench_cp_scaling.py                # 128K, 512K, 1M tokens
    torchrun --nproc-per-node=N benchmarks/bench_cp_scaling.py --seqs 131072 --masks causal
    torchrun --nproc-per-node=2 benchmarks/bench_cp_scaling.py --smoke        # CPU, gloo, small: checks the harness

Shapes: B=1, 16 query heads over 4 kv heads (GQA), head dim 128, bfloat16 (float32 with
--smoke); masks: causal, and causal documents (lengths drawn from 1K-32K tokens, fixed seed).
Per (sequence length, mask), on every rank, after one warm-up call each:
  * flexattn.distributed.flex_attention with the work-balanced layout (balance=block_mask),
    overlap "auto" (on GPUs: "ring", the fetch under the own blocks' compute) and "off" (the
    whole fetch, then one call), and the fetch alone (flexattn.distributed.exchange.fetch_kv):
    the share of the fetch the overlap hides is (off - auto) / fetch, clipped to [0, 1];
  * torch: `_ContextParallel(FLEX)` on a module calling torch.compile(flex_attention) (K/V
    all-gathered, then the local call), its head-tail load balancer and `_create_cp_block_mask`.
    Private API: where this torch lacks a piece, the row says why.
Both forward outputs are unsharded and compared (max |flexattn - torch| in the row).
Times: the slowest rank's median over --reps calls (a barrier before each; CUDA synchronised),
forward and forward+backward (torch's FlexAttention has no backward on the CPU). TFLOP/s per
rank = 4 * B * Hq * D * (attended pairs) / time / N ranks (x 3.5 for forward+backward).
Rank 0 prints the table and writes the rows to --out (JSON; merge the runs of each N).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flexattn import create_block_mask, masks  # noqa: E402
from flexattn import distributed as cp  # noqa: E402
from flexattn.distributed import balanced_layout  # noqa: E402
from flexattn.distributed.exchange import fetch_kv  # noqa: E402
from flexattn.distributed.plan import rank_plan  # noqa: E402

B, HQ, HKV, D = 1, 16, 4, 128


def document_lengths(N: int, seed: int = 0) -> list[int]:
    """Document lengths drawn from 1K-32K tokens, cut to fill N exactly."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < N:
        n = min(int(torch.randint(1024, 32769, (1,), generator=g)), N - total)
        lengths.append(n)
        total += n
    return lengths


def mask_and_pairs(name: str, N: int, device):
    """(mask_mod over global positions, number of attended (q, kv) pairs)."""
    if name == "causal":
        return masks.causal(), N * (N + 1) // 2
    lengths = document_lengths(N)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))
    return masks.document(doc, inner=masks.causal()), sum(n * (n + 1) // 2 for n in lengths)


def timed(fn, reps: int, device) -> float:
    """This rank's median seconds of fn over reps calls (after one warm-up), a barrier before each."""
    times = []
    for i in range(reps + 1):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def slowest(t: float | None, device) -> float | None:
    """The largest of the ranks' values (None on any rank: None)."""
    x = torch.tensor([0.0 if t is None else t, 1.0 if t is None else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return None if x[1].item() else x[0].item()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, chunks: int = 16) -> float:
    """max |a - b| in float32, a slice of the sequence at a time (the outputs are GiBs at 1M tokens)."""
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.chunk(chunks, 2), b.chunk(chunks, 2)))


def fwd_and_fb(call, inputs, reps: int, device, backward: bool = True) -> tuple[float, float | None]:
    """(forward seconds, forward+backward seconds or None) of call() -> output."""
    if backward:
        grad = torch.ones_like(call().detach())

    def fwd():
        with torch.no_grad():
            call()

    def fb():
        for t in inputs:
            t.grad = None
        call().backward(grad)
    return timed(fwd, reps, device), (timed(fb, reps, device) if backward else None)


def flexattn_times(mask_mod, N: int, q, k, v, reps: int, device, output: bool) -> tuple[dict, torch.Tensor | None]:
    """flexattn.distributed's times (see the module doc) and, with `output`, its forward
    output unsharded (for the comparison with torch's)."""
    bm = create_block_mask(mask_mod, None, None, N, N, device=device)
    ql, kl, vl = (cp.shard(t, 2, balance=bm).requires_grad_() for t in (q, k, v))
    out = {}
    for mode in ("auto", "off"):
        def call(mode=mode):
            return cp.flex_attention(ql, kl, vl, None, bm, balance=bm, enable_gqa=True, overlap=mode)
        out[f"fwd {mode}"], out[f"fwd+bwd {mode}"] = fwd_and_fb(call, (ql, kl, vl), reps, device)
    full = None
    if output:
        with torch.no_grad():
            full = cp.unshard(cp.flex_attention(ql, kl, vl, None, bm, balance=bm, enable_gqa=True), 2, balance=bm)
    plan = rank_plan(balanced_layout(bm, dist.get_world_size()), bm, dist.get_rank())

    def fetch():
        with torch.no_grad():
            fetch_kv(kl, vl, plan, None)
    out["fetch"] = timed(fetch, reps, device)
    return out, full


def torch_times(mask_mod, N: int, q, k, v, reps: int, device) -> tuple[dict, str, torch.Tensor | None]:
    """torch's context-parallel FlexAttention: (times, a note, its forward output unsharded),
    or ({}, why it cannot run here, None)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module
        from torch.nn.attention.flex_attention import flex_attention
        try:  # where newer torch keeps it, then the older module
            from torch.distributed.tensor.experimental._context_parallel._attention import (
                _context_parallel_shard, _ContextParallel, _create_cp_block_mask, context_parallel_unshard)
            from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
        except ImportError:
            from torch.distributed.tensor.experimental._attention import (
                _context_parallel_shard, _ContextParallel, _create_cp_block_mask, _HeadTailLoadBalancer,
                context_parallel_unshard)
    except ImportError as e:
        return {}, f"torch {torch.__version__} lacks its context-parallel FlexAttention pieces ({e})", None
    try:
        world = dist.get_world_size()
        mesh = init_device_mesh(device.type, (world,))
        balancer = _HeadTailLoadBalancer(N, world, device)
        bm = _create_cp_block_mask(mask_mod, B, HQ, N, N, mesh, balancer)
        backward = device.type == "cuda"  # torch's FlexAttention has no backward on the CPU
        ql, kl, vl = (t.detach().requires_grad_(backward) for t in
                      _context_parallel_shard(mesh, [q, k, v], [2, 2, 2], balancer))
        compiled = torch.compile(flex_attention, dynamic=False)

        class Attention(torch.nn.Module):
            def forward(self, query, key, value):
                return compiled(query, key, value, block_mask=bm, enable_gqa=True)
        attention = parallelize_module(Attention(), mesh, _ContextParallel(
            seq_dim=2, attention_type=_ContextParallel.AttentionType.FLEX))
        fwd, fb = fwd_and_fb(lambda: attention(ql, kl, vl), (ql, kl, vl), reps, device, backward)
        with torch.no_grad():
            full, = context_parallel_unshard(mesh, [attention(ql, kl, vl)], [2], balancer)
        return {"fwd": fwd, "fwd+bwd": fb}, "" if backward else "no FlexAttention backward on the CPU", full
    except Exception as e:  # noqa: BLE001 - reported in the row
        return {}, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="131072,524288,1048576")
    ap.add_argument("--masks", default="causal,document")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, float32, N=2048: a check of the harness")
    ap.add_argument("--no-torch", action="store_true", help="skip torch's context parallel")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/cp-scaling-<N>ranks-<utc>.json)")
    a = ap.parse_args()
    smoke = a.smoke or not torch.cuda.is_available()
    if smoke:
        device, dtype, seqs = torch.device("cpu"), torch.float32, [2048]
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dtype, seqs = torch.bfloat16, [int(s) for s in a.seqs.split(",")]
        dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for N in seqs:
        g = torch.Generator().manual_seed(N)  # the same full tensors on every rank
        q = torch.randn(B, HQ, N, D, generator=g).to(device, dtype)
        k, v = (torch.randn(B, HKV, N, D, generator=g).to(device, dtype) for _ in range(2))
        for name in a.masks.split(","):
            mask_mod, pairs = mask_and_pairs(name, N, device)
            ours, out_ours = flexattn_times(mask_mod, N, q, k, v, a.reps, device, output=not a.no_torch)
            ours = {key: slowest(t, device) for key, t in ours.items()}
            theirs, why, out_theirs = (({}, "--no-torch", None) if a.no_torch
                                       else torch_times(mask_mod, N, q, k, v, a.reps, device))
            theirs = {key: slowest(t, device) for key, t in theirs.items()}
            # both compute the same attention: their forward outputs in the global order
            diff = None if out_theirs is None else max_abs_diff(out_ours, out_theirs)
            del out_ours, out_theirs
            flops = 4 * B * HQ * D * pairs
            row = {"N": N, "mask": name, "ranks": world, "device": torch.cuda.get_device_name(device)
                   if device.type == "cuda" else "cpu", "dtype": str(dtype), **{f"flexattn {k}": t for k, t in
                                                                                  ours.items()},
                   **{f"torch {k}": t for k, t in theirs.items()}, "torch note": why,
                   "max |flexattn - torch| (fwd)": diff}
            for who, f_key, fb_key in (("flexattn", "flexattn fwd auto", "flexattn fwd+bwd auto"),
                                       ("torch", "torch fwd", "torch fwd+bwd")):
                for kind, key, mult in (("fwd", f_key, 1.0), ("fwd+bwd", fb_key, 3.5)):
                    t = row.get(key)
                    row[f"{who} {kind} TFLOP/s per rank"] = None if t is None else mult * flops / t / world / 1e12
            fetch, off, auto = ours["fetch"], ours["fwd off"], ours["fwd auto"]
            # "auto" is "off" on the CPU path: nothing to hide there
            row["fetch hidden (fwd)"] = (None if not fetch or device.type != "cuda"
                                         else min(1.0, max(0.0, (off - auto) / fetch)))
            rows.append(row)
            if rank == 0:
                def cell(x, fmt="{:.4f}"):
                    return "-" if x is None else fmt.format(x)
                print(f"N={N} {name} ranks={world}: flexattn fwd {cell(auto)} s "
                      f"({cell(row['flexattn fwd TFLOP/s per rank'], '{:.0f}')} TF/rank), fwd+bwd "
                      f"{cell(row['flexattn fwd+bwd auto'] if 'flexattn fwd+bwd auto' in row else None)} s "
                      f"({cell(row['flexattn fwd+bwd TFLOP/s per rank'], '{:.0f}')} TF/rank), fetch {cell(fetch)} s, "
                      f"hidden {cell(row['fetch hidden (fwd)'], '{:.2f}')} | torch fwd {cell(theirs.get('fwd'))} s, "
                      f"fwd+bwd {cell(theirs.get('fwd+bwd'))} s, max|diff| {cell(diff, '{:.2g}')} {why}", flush=True)
        del q, k, v
    if rank == 0:
        stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
        path = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"cp-scaling-{world}ranks-{stamp}.json")
        meta = {"torch": torch.__version__, "world": world, "smoke": smoke,
                "device": rows[0]["device"] if rows else None, "date": stamp}
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"rows written to {path}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
