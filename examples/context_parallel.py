"""Context parallelism on CPU: one causal document attention across 2 processes (gloo),
checked against single-process flex_attention on the full tensors.

    torchrun --nproc-per-node=2 examples/context_parallel.py
    python examples/context_parallel.py          # starts the 2 processes itself

Each rank holds a shard of q, k, v (balance="head_tail": rank r holds chunks r and 3-r of 4)
and the global BlockMask; it fetches only the kv blocks its queries visit. Rank 0 prints the
largest difference of the output and of dq, dk, dv from the single-process result, and the
bound; exits 1 with a message if the bound is exceeded.
"""
import os
import sys

import torch
import torch.distributed as dist

from flexattn import create_block_mask, flex_attention, masks
from flexattn import distributed as cp

BOUND = 1e-4  # float32 context-parallel result against float32 single-process
B, H, N, E, BLOCK = 1, 4, 1000, 32, 64   # N is not a multiple of 2 * 2 * BLOCK: shards are padded


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same full tensors on every rank
    q, k, v = (torch.randn(B, H, N, E) for _ in range(3))
    doc_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([300, 150, 400, 150]))
    bm = create_block_mask(masks.document(doc_ids, inner=masks.causal()), None, None, N, N, device="cpu",
                           BLOCK_SIZE=BLOCK)

    shards = [cp.shard(t, 2, balance="head_tail", block_size=BLOCK).requires_grad_() for t in (q, k, v)]
    out = cp.flex_attention(*shards, block_mask=bm, balance="head_tail")
    out.sum().backward()
    got = [cp.unshard(t, 2, balance="head_tail", seq_len=N, block_size=BLOCK)
           for t in (out.detach(), *(s.grad for s in shards))]

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = flex_attention(*full, block_mask=bm)
    ref.sum().backward()
    err = max((a - b).abs().max().item() for a, b in zip(got, [ref.detach(), *(t.grad for t in full)]))
    failed = not err < BOUND
    if rank == 0:
        print(f"document mask over {dist.get_world_size()} ranks (gloo): out, dq, dk, dv vs single-process "
              f"flex_attention, max |difference| {err:.2e}, bound {BOUND:.0e}")
    dist.destroy_process_group()
    if failed:
        sys.exit(f"context_parallel.py FAILED on rank {rank}: the context-parallel result differs from "
                 f"single-process flex_attention by {err:.2e} (bound {BOUND:.0e})")
    return 0


def _spawned(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    main()


if __name__ == "__main__":
    if "RANK" in os.environ:  # under torchrun
        main()
        if os.environ["RANK"] == "0":
            print("ok")
    else:
        import socket
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_spawned, args=(port,), nprocs=2)
        except mp.ProcessRaisedException as e:
            sys.exit(str(e))
        except mp.ProcessExitedException as e:
            sys.exit(f"context_parallel.py FAILED: {e}")
        print("ok")
