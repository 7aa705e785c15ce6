"""Context parallelism: bytes each rank sends and receives per training step, and load
imbalance, from flexattn.distributed's plan (no GPU, no process group: the plan is a
function of the layout and the BlockMask, the same on every rank).

Masks: causal, causal sliding window of 4K, causal documents of 1K..32K tokens; at 128K and
1M tokens over 2, 4 and 8 ranks; layouts "contiguous", "head_tail" and the work-balanced one
(`balance=block_mask`). K/V: one sequence, 8 kv heads, head dim 128, bf16 (4 KiB per token
for K and V together), BLOCK_SIZE 128.

One step = forward + backward. flexattn.distributed: the forward fetches the kv blocks a
rank's queries visit from their owners; the backward sends those blocks' dK/dV back - so a
rank sends and receives (fetched + given) blocks per step. Baselines at their minimum volume:
all-gather of K/V in the forward + reduce-scatter of dK/dV in the backward, and a full ring
passing K/V in the forward and dK/dV in the backward (K/V kept from the forward): both move
2 * (P-1)/P * N tokens' worth per rank and step. Imbalance: max / mean non-empty blocks per
rank. The targets (causal within the ring's volume; sliding window and documents within a
quarter of an all-gather at 1M tokens over 8 ranks; load imbalance at most 1.10) are checked at
the end (exit status 1 if one is missed).

    python benchmarks/bench_context_parallel.py            # prints the table, writes the JSON
    python benchmarks/bench_context_parallel.py --quick    # 128K only
    python benchmarks/bench_context_parallel.py --local-cost   # the design check below

--local-cost times one rank's local work two ways on the CPU path (forward + backward, median
of 3): the one call flexattn.distributed makes over the compact buffer of fetched blocks, and
one call per source rank's blocks merged by their lse (what a ring or an overlapped fetch
computes), and gives each one's largest difference from a float64 run of the one call.

--wall spawns gloo worlds of 2 and 4 processes on this machine and times
flexattn.distributed.flex_attention end to end (forward, and forward + backward; the slowest
rank's median over the repetitions) for each `overlap` mode ("off": the whole fetch, then one
call; "own_first": the own blocks while the rest is in flight, then one call over the received
ones; "ring": one call per source rank as its blocks arrive) and the one-shot fetch alone (the
most an overlap can hide), causal / sliding window / document masks, the CPU path, float32. On one host with few cores this measures the mechanism
(call count, merge, waits), not what NCCL between GPUs would give.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from flexattn import create_block_mask, masks  # noqa: E402
from flexattn.distributed import balanced_layout, make_layout, world_plan  # noqa: E402

BLOCK = 128
KV_HEADS, HEAD_DIM, ELEM = 8, 128, 2
TOKEN_BYTES = KV_HEADS * 2 * HEAD_DIM * ELEM          # K and V of one token
BLOCK_BYTES = BLOCK * TOKEN_BYTES
SIZES = {"128K": 128 * 1024, "1M": 1024 * 1024}
WORLDS = (2, 4, 8)
LAYOUTS = ("contiguous", "head_tail", "balanced")


def documents(N: int) -> torch.Tensor:
    """Document ids of documents of 1K..32K tokens (seeded), the last one cut at N."""
    g = torch.Generator().manual_seed(0)
    lens = []
    while sum(lens) < N:
        lens.append(int(torch.randint(1024, 32 * 1024 + 1, (1,), generator=g)))
    return torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens))[:N]


def mask_of(name: str, N: int):
    if name == "causal":
        return masks.causal()
    if name == "sliding_window_4K":
        return masks.sliding_window(4096 - 1, 0)
    return masks.document(documents(N), inner=masks.causal())


def row(mask: str, size: str, P: int, layout_name: str, bm) -> dict:
    N = SIZES[size]
    layout = balanced_layout(bm, P) if layout_name == "balanced" else make_layout(layout_name, N, P, BLOCK)
    plan = world_plan(layout, bm)
    sent, received = plan.volume(BLOCK_BYTES)
    step = [s + r for s, r in zip(sent, received)]   # sent == received per step (see the doc)
    baseline = 2 * (P - 1) * layout.padded_len // P * TOKEN_BYTES
    return {"mask": mask, "tokens": size, "ranks": P, "layout": layout_name if layout_name != "balanced"
            else f"balanced ({layout.name})", "fwd_recv_max_MiB": max(received) / 2 ** 20,
            "fwd_sent_max_MiB": max(sent) / 2 ** 20, "step_max_MiB": max(step) / 2 ** 20,
            "step_mean_MiB": sum(step) / len(step) / 2 ** 20, "allgather_ring_step_MiB": baseline / 2 ** 20,
            "vs_allgather": max(step) / baseline, "imbalance": plan.imbalance()}


def _merge(parts):
    """(out, lse) of attention over the union of disjoint kv sets from each set's (out, lse)."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)   # rows no set reaches
    out = sum(p[0].float() * torch.exp(p[1] - safe)[..., None] for p in parts)
    return out.to(parts[0][0].dtype), lse


def local_cost(N: int = 8192, P: int = 4, rank: int = 0, H: int = 4, D: int = 64, reps: int = 3) -> None:
    """Print the --local-cost comparison (see the module doc) for causal and document masks."""
    from flexattn import flex_attention, trace_mask
    from flexattn.block_mask import BlockMask
    from flexattn.distributed.global_mods import global_mask_mod
    from flexattn.distributed.plan import rank_plan
    print(f"one rank's local work (rank {rank} of {P}, head_tail, N={N}, H={H}, D={D}, float32, CPU path, "
          f"forward + backward, median of {reps})")
    print("| mask | kv blocks (own + per peer) | one call s | per-source calls + lse merge s | "
          "one call max abs diff | merged max abs diff |")
    print("|---|---|---|---|---|---|")
    for name in ("causal", "documents of 1500"):
        docs = torch.arange(N, dtype=torch.int32) // 1500   # documents of 1500 tokens
        mod = masks.causal() if name == "causal" else masks.document(docs, inner=masks.causal())
        bm = create_block_mask(mod, None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
        rp = rank_plan(make_layout("head_tail", N, P, BLOCK), bm, rank)
        q_pos, kv_pos, whole = rp.on(bm, "cpu")
        groups = [rp.local_to] + [slots for _, slots in rp.recv]
        blocks = kv_pos.view(-1, BLOCK)
        parts_bm = []
        for slots in groups:
            pos = blocks[slots].reshape(-1)
            mod_g = global_mask_mod(bm, q_pos, pos, N)
            parts_bm.append(BlockMask._from_state(rp.local_state[..., slots], bm.BLOCK_SIZE, mod_g,
                                                  (q_pos.numel(), pos.numel()), trace_mask(mod_g)))
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, H, q_pos.numel(), D, generator=g)
        k, v = (torch.randn(1, H, kv_pos.numel(), D, generator=g) for _ in range(2))
        dout = torch.randn(q.shape, generator=g)

        def one(q, k, v):
            return flex_attention(q, k, v, block_mask=whole)

        def merged(q, k, v):
            kb, vb = k.view(1, H, -1, BLOCK, D), v.view(1, H, -1, BLOCK, D)
            return _merge([flex_attention(q, kb[:, :, s].flatten(2, 3), vb[:, :, s].flatten(2, 3), block_mask=m,
                                          return_lse=True) for s, m in zip(groups, parts_bm)])[0]

        def timed(fn):
            times = []
            for _ in range(reps):
                x = [t.clone().requires_grad_() for t in (q, k, v)]
                t0 = time.perf_counter()
                out = fn(*x)
                out.backward(dout)
                times.append(time.perf_counter() - t0)
            return sorted(times)[reps // 2], out.detach()

        t_one, o_one = timed(one)
        t_merged, o_merged = timed(merged)
        gold = flex_attention(q.double(), k.double(), v.double(), block_mask=whole)
        sizes = " + ".join(str(len(s)) for s in groups)
        print(f"| {name} | {sizes} | {t_one:.3f} | {t_merged:.3f} | {(o_one.double() - gold).abs().max():.1e} | "
              f"{(o_merged.double() - gold).abs().max():.1e} |")


WALL_MODES = ("off", "own_first", "ring")


def _wall_mask(name: str, N: int):
    if name == "causal":
        return masks.causal()
    if name == "sliding":
        return masks.sliding_window(N // 8 - 1, 0)
    return masks.document(torch.arange(N, dtype=torch.int32) // (N // 6), inner=masks.causal())


def _wall_rank(rank: int, world: int, port: int, out_dir: str, N: int, H: int, D: int, reps: int) -> None:
    """One rank of a --wall world: times every (mask, mode), writes rank{rank}.json."""
    import torch.distributed as dist
    from flexattn import distributed as cp
    from flexattn.distributed.exchange import fetch_kv
    from flexattn.distributed.plan import rank_plan
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, H, N, D, generator=g) for _ in range(3)]
    rows = []
    for mask in ("causal", "sliding", "document"):
        bm = create_block_mask(_wall_mask(mask, N), None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
        q, k, v = (cp.shard(t, 2, balance=bm).requires_grad_() for t in full)
        plan = rank_plan(balanced_layout(bm, world), bm, rank)
        fetch = []
        for i in range(reps + 1):  # the one-shot fetch alone: what an overlap can hide at most
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                fetch_kv(k, v, plan, None)
            if i:
                fetch.append(time.perf_counter() - t0)
        rows.append({"mask": mask, "mode": "fetch only", "fwd": fetch, "fwd+bwd": fetch})
        for mode in WALL_MODES:
            times = {"fwd": [], "fwd+bwd": []}
            for i in range(reps + 1):  # the first is a warm-up
                for what in times:
                    dist.barrier()
                    t0 = time.perf_counter()
                    with torch.set_grad_enabled(what != "fwd"):
                        out = cp.flex_attention(q, k, v, None, bm, balance=bm, overlap=mode)
                    if what != "fwd":
                        out.backward(torch.ones_like(out))
                    if i:
                        times[what].append(time.perf_counter() - t0)
            rows.append({"mask": mask, "mode": mode, **times})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def wall(N: int = 4096, H: int = 4, D: int = 64, reps: int = 7, worlds=(2, 4)) -> list:
    """Print the --wall table (see the module doc); its rows."""
    import socket
    import tempfile
    import torch.multiprocessing as mp
    print(f"flexattn.distributed.flex_attention wall time, gloo on this host, N={N}, H={H}, D={D}, float32, CPU "
          f"path, balance=block_mask, BLOCK_SIZE {BLOCK}; slowest rank's median of {reps}, seconds")
    print("| mask | ranks | fetch only | fwd off | fwd own_first | fwd ring | fwd+bwd off | fwd+bwd own_first | "
          "fwd+bwd ring |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = []
    for P in worlds:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as d:
            mp.start_processes(_wall_rank, args=(P, port, d, N, H, D, reps), nprocs=P, start_method="spawn")
            ranks = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(P)]
        cells = {}
        for i, row in enumerate(ranks[0]):
            for what in ("fwd", "fwd+bwd"):
                per_rep = [max(rk[i][what][j] for rk in ranks) for j in range(reps)]  # the slowest rank
                cells[(row["mask"], row["mode"], what)] = sorted(per_rep)[reps // 2]
        for mask in ("causal", "sliding", "document"):
            vals = [cells[(mask, "fetch only", "fwd")]] + [cells[(mask, m, w)] for w in ("fwd", "fwd+bwd")
                                                           for m in WALL_MODES]
            print(f"| {mask} | {P} | " + " | ".join(f"{t:.3f}" for t in vals) + " |")
            out.append({"mask": mask, "ranks": P, "N": N, "fetch only": cells[(mask, "fetch only", "fwd")],
                        **{f"{w} {m}": cells[(mask, m, w)] for w in ("fwd", "fwd+bwd") for m in WALL_MODES}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128K tokens only")
    ap.add_argument("--local-cost", action="store_true", help="only the one-call vs merged-calls comparison")
    ap.add_argument("--wall", action="store_true", help="only the wall time of each overlap mode (gloo, 2 and 4 "
                    "processes)")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "bench_context_parallel.json"))
    args = ap.parse_args()
    if args.local_cost:
        local_cost()
        return 0
    if args.wall:
        rows = wall()
        with open(os.path.join(ROOT, "benchmarks", "bench_context_parallel_wall.json"), "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}, f, indent=1)
        return 0
    rows = []
    for size in (("128K",) if args.quick else tuple(SIZES)):
        for mask in ("causal", "sliding_window_4K", "document_32K"):
            t0 = time.perf_counter()
            bm = create_block_mask(mask_of(mask, SIZES[size]), None, None, SIZES[size], SIZES[size], device="cpu",
                                   BLOCK_SIZE=BLOCK)
            t_mask = time.perf_counter() - t0
            for P in WORLDS:
                t0 = time.perf_counter()
                for lay in LAYOUTS:
                    rows.append(row(mask, size, P, lay, bm))
                print(f"# {mask} {size}: mask {t_mask:.2f} s, plans for {P} ranks {time.perf_counter() - t0:.2f} s",
                      file=sys.stderr)
    head = ("mask", "tokens", "ranks", "layout", "fwd recv max MiB", "fwd sent max MiB", "step max MiB",
            "step mean MiB", "all-gather / ring MiB", "max / all-gather", "imbalance")
    keys = ("mask", "tokens", "ranks", "layout", "fwd_recv_max_MiB", "fwd_sent_max_MiB", "step_max_MiB",
            "step_mean_MiB", "allgather_ring_step_MiB", "vs_allgather", "imbalance")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) and k in ("vs_allgather", "imbalance")
                                else f"{r[k]:.0f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    with open(args.json, "w") as f:
        json.dump({"token_bytes": TOKEN_BYTES, "block": BLOCK, "rows": rows}, f, indent=1)

    # the targets: per mask, the work-balanced layout (the one flex_attention derives from the mask)
    missed = []
    for r in rows:
        if not r["layout"].startswith("balanced"):
            continue
        what = f"{r['mask']} {r['tokens']} over {r['ranks']} ranks"
        if r["imbalance"] > 1.10:
            missed.append(f"{what}: imbalance {r['imbalance']:.3f} > 1.10")
        if r["mask"] == "causal" and r["vs_allgather"] > 1.0:
            missed.append(f"{what}: {r['vs_allgather']:.3f} x the ring's volume > 1.0")
        if r["mask"] != "causal" and r["tokens"] == "1M" and r["ranks"] == 8 and r["vs_allgather"] > 0.25:
            missed.append(f"{what}: {r['vs_allgather']:.3f} x an all-gather > 0.25")
    print("\ntargets (work-balanced layout): " + ("all met" if not missed else "MISSED:\n  " + "\n  ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
