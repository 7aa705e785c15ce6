"""flex_attention over a process group: each rank holds a shard of q, k, v (from `shard`)
and the global BlockMask; it fetches the kv blocks its queries visit (as the plan says) and
runs local flexattn calls over them with mods that see global positions: overlapped with the
fetch (overlap.py: the own blocks while the others are in flight, then the received ones, the
parts merged by lse) or, with overlap="off", one call after the whole fetch
(exchange.fetch_kv). Forward and backward match single-process flexattn.flex_attention on the full
tensors; gradients of dk / dv go back to the ranks that own the blocks, gradients of the
score_mod's captured tensors are summed over the ranks."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..attention import _kernels
from ..block_mask import BlockMask
from ..checks import check_block_mask, check_qkv
from ..cpu import flex_attention_cpu
from ..front import check_arguments, trace_score_mod
from .agree import agree, check_group, local_error
from .exchange import fetch_kv, sum_over_ranks
from .global_mods import global_score_mod
from .layout import Balance, Layout, resolve
from .overlap import Call, attend_overlapped
from .plan import rank_plan

WHERE = "flexattn.distributed.flex_attention"
OVERLAPS = ("auto", "ring", "own_first", "off")


def _layout_for(query, key, block_mask, balance, world) -> Layout:
    """The checked layout of the call (raises ValueError / TypeError naming the fix)."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be the global BlockMask over the full sequence (create_block_mask("
                        f"mask_mod, B, H, N, N) with N the unsharded length), got {type(block_mask).__name__}")
    Q, KV = block_mask.seq_lengths
    if Q != KV:
        raise ValueError(f"block_mask has Q_LEN={Q} != KV_LEN={KV}; context parallelism shards one sequence for "
                         f"queries and keys: build the mask with Q_LEN == KV_LEN")
    qb, kvb = block_mask.BLOCK_SIZE
    layout = resolve(balance, Q, world, math.lcm(qb, kvb))
    if layout.chunk % qb or layout.chunk % kvb:
        raise ValueError(f"the layout's chunks of {layout.chunk} tokens are not whole blocks of the BlockMask's "
                         f"BLOCK_SIZE {block_mask.BLOCK_SIZE}; build the layout with block_size={math.lcm(qb, kvb)}")
    if layout.seq_len != Q:
        raise ValueError(f"balance is a layout for a sequence of {layout.seq_len} but block_mask is for {Q}")
    for name, t in (("query", query), ("key", key)):
        if t.shape[2] != layout.local_len:
            raise ValueError(f"{name} has {t.shape[2]} positions but block_mask (Q_LEN=KV_LEN={Q}) under "
                             f"balance={layout.name!r} gives each of the {world} ranks {layout.local_len}: pass "
                             f"the shards `shard(x, 2, group, balance, block_size={math.lcm(qb, kvb)})` returns "
                             f"for the full tensors the mask was built for")
    return layout


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Optional[Callable] = None,
                   block_mask: Optional[BlockMask] = None, *, group=None, balance: Balance = "head_tail",
                   scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
                   kernel_options: Optional[dict] = None, overlap: str = "auto"):
    """Context-parallel attention: `query`, `key`, `value` are this rank's shards (from
    `shard(x, 2, group, balance)`), `block_mask` the global BlockMask over the full length
    (the same on every rank), score_mod and the mask see global positions. Returns this
    rank's shard of the output [B, Hq, local_len, Ev] (and of lse [B, Hq, local_len] with
    return_lse=True); padding rows give 0 and -inf. Differentiable in q, k, v and the
    score_mod's captured float tensors (their gradient is summed over the ranks).

    overlap: how the fetch of remote kv blocks meets the compute. "ring": the own blocks'
    attention runs while every peer's blocks are in flight, then each peer's blocks as they
    arrive, in ring order (one local call per source rank), the parts merged by their lse; in
    the backward each peer's dK/dV goes back as soon as it is computed. "own_first": the same
    with one call over all received blocks. "off": wait for every block, then one call over
    them all (dK/dV go back after the whole backward). "auto" (default): "ring" on GPUs,
    "off" on the CPU path (where the compute dwarfs the transfers and the extra calls cost
    more than they hide; docs/context-parallel.md). The same blocks move in each; the numbers
    agree to rounding (the merge rounds each part's output once more).

    Every rank must call it with the same arguments apart from the shards; a bad or
    mismatched argument raises the same ValueError on every rank."""
    rank, world = check_group(group, WHERE)
    found = {}

    def check():
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
        check_qkv(query, key, value, enable_gqa)
        found["layout"] = _layout_for(query, key, block_mask, balance, world)
        B, Hq = query.shape[:2]
        check_block_mask(block_mask, B, Hq, *block_mask.seq_lengths, query.device)
        # which captured tensors get gradients decides the backward's collectives: compared too
        graph = trace_score_mod(score_mod, query.device)
        grads = torch.is_grad_enabled()
        found["captured"] = [] if graph is None else [(tuple(t.shape), grads and t.requires_grad)
                                                      for t in graph.buffers]

    error = local_error(check)
    facts = {} if error else {
        "query shape": tuple(query.shape), "key shape": tuple(key.shape), "value shape": tuple(value.shape),
        "dtype": str(query.dtype), "device type": query.device.type, "layout": found["layout"].key(),
        "block_mask": (block_mask.seq_lengths, block_mask.BLOCK_SIZE, tuple(block_mask.kv_num_blocks.shape),
                       int(block_mask.kv_num_blocks.sum()),
                       None if block_mask.full_kv_num_blocks is None else int(block_mask.full_kv_num_blocks.sum())),
        "scale": scale, "enable_gqa": bool(enable_gqa), "score_mod given": score_mod is not None, "overlap": overlap,
        "key / value require grad": torch.is_grad_enabled() and (key.requires_grad or value.requires_grad),
        "score_mod's captured tensors (shape, requires_grad)": found["captured"]}
    agree(WHERE, error, facts, group)

    if overlap == "auto":
        overlap = "ring" if query.device.type == "cuda" else "off"
    plan = rank_plan(found["layout"], block_mask, rank)
    q_pos, kv_pos, local_mask = plan.on(block_mask, query.device)
    args = check_arguments(query, key, value, scale, enable_gqa, kernel_options, 0.0, None, None)
    score_graph, grad_slots, captured = None, (), []
    if score_mod is not None:
        score_graph = trace_score_mod(global_score_mod(score_mod, q_pos, kv_pos, plan.seq_len), query.device)
        grads = torch.is_grad_enabled()
        grad_slots = tuple(j for j, t in enumerate(score_graph.buffers)
                           if grads and t.requires_grad and t is not q_pos and t is not kv_pos)
        # a captured tensor every rank holds: its gradient is the sum of the ranks' gradients
        captured = [sum_over_ranks(score_graph.buffers[j], group) for j in grad_slots]
    run = flex_attention_cpu if args.backend == "cpu" else _kernels().flex_attention_triton
    call = Call(plan, overlap, block_mask, group, run, args.scale, args.options, score_graph, kv_pos, grad_slots)
    if overlap == "off":
        k_c, v_c = fetch_kv(key, value, plan, group)
        out, lse = run(query, k_c, v_c, score_graph=call.graph_for(kv_pos, captured),
                       mask_graph=local_mask.mask_graph, block_mask=local_mask, scale=args.scale,
                       kernel_options=args.options, dropout_p=0.0, dropout_seed=0)
    else:
        out, lse = attend_overlapped(call, query, key, value, captured)
    return (out, lse) if return_lse else out
