"""The overlapped form of a rank's attention: the kv blocks its queries visit come in parts
(RankPlan.parts): its own blocks, then the received ones - one part per source rank in ring
order (overlap="ring") or all of them in one (overlap="own_first"). Every part's P2P batch is
posted first; the own part's attention runs while they are in flight; each received part
runs as soon as its batch is in. The parts' (out, lse) are merged by their lse. The backward
runs the received parts first, posting each one's dK/dV back to the owners as soon as it is
computed, then the own part while those are in flight, and waits for the dK/dV of the blocks
this rank gave only at the end.

    attend_overlapped(call, q, k, v, captured) -> (out, lse)

The merge (rows no part reaches keep out 0, lse -inf, zero gradients), in float32 (float64
for float64 inputs):

    lse = log sum_p exp(lse_p),   w_p = exp(lse_p - lse),   out = sum_p w_p out_p
    d out_p = w_p d out,          d lse_p = w_p (d lse + <d out, out_p - out>)

Messages and volumes are those of the one-shot fetch (exchange.fetch_kv): the same blocks,
K and V together, grouped by step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..block_mask import BlockMask
from ..ir import Graph
from .exchange import blocks_of, post, wait
from .plan import RankPlan


@dataclass
class Call:
    """What the parts of one flex_attention call share."""
    plan: RankPlan
    overlap: str                      # "ring" | "own_first" ("off": only graph_for is used)
    block_mask: BlockMask             # the global one
    group: object
    run: Callable                     # flex_attention_cpu or flex_attention_triton
    scale: float
    options: dict
    score_graph: Optional[Graph]      # traced over the compact kv positions `kv_pos`
    kv_pos: Optional[torch.Tensor]    # the positions tensor the score graph captured
    grad_slots: tuple = ()            # the score graph's buffers passed as `captured` (they get gradients)

    def graph_for(self, kv_pos: torch.Tensor, captured) -> Optional[Graph]:
        """The score graph of a part: its kv positions, `captured` in the grad slots."""
        if self.score_graph is None:
            return None
        bufs = [kv_pos if b is self.kv_pos else b for b in self.score_graph.buffers]
        for slot, t in zip(self.grad_slots, captured):
            bufs[slot] = t
        return self.score_graph._with_buffers(bufs)


def _forward(call: Call, q, k, v, captured, record: bool):
    """(out, lse, merged out in the merge's dtype, per part (kv leaf, out, lse) or None).
    record: the parts' kv buffers become leaves that require grad (for the backward)."""
    plan, bm, dev = call.plan, call.block_mask, q.device
    parts = plan.parts(call.overlap)
    E, kvb = k.shape[-1], plan.kv_block
    with torch.no_grad():  # the parts' kv buffers are leaves: their gradients go to the owners by hand
        kv = torch.cat([k, v], dim=-1).contiguous()  # one message per peer and step
    blocks = blocks_of(kv, kvb)
    B, H, _, _, D = blocks.shape
    posted = []
    for part in parts[1:]:
        sends = [(p, blocks.index_select(2, offs.to(dev))) for p, offs in part.send]
        recvs = [(p, kv.new_empty(B, H, slots.numel(), kvb, D)) for p, slots in part.recv]
        posted.append((sends, recvs, post(sends, recvs, call.group)))
    results = []
    for i, part in enumerate(parts):
        if i == 0:
            kv_p = blocks.index_select(2, plan.local_from.to(dev))  # (no grad: kv is detached)
        else:
            _, recvs, requests = posted[i - 1]
            wait(requests)
            kv_p = recvs[0][1] if len(recvs) == 1 else torch.cat([b for _, b in recvs], dim=2) if recvs else None
        kv_pos, mask = plan.part_on(bm, dev, call.overlap, i)
        if mask is None:
            results.append(None)
            continue
        kv_p = kv_p.view(B, H, -1, D)
        if record:
            kv_p.requires_grad_(k.requires_grad or v.requires_grad)
        out_p, lse_p = call.run(q, kv_p[..., :E], kv_p[..., E:], score_graph=call.graph_for(kv_pos, captured),
                                mask_graph=mask.mask_graph, block_mask=mask, scale=call.scale,
                                kernel_options=call.options, dropout_p=0.0, dropout_seed=0)
        results.append((kv_p, out_p, lse_p))
    done = [r for r in results if r is not None]
    mdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not done:  # no query of this rank attends to anything
        Hq, L, Ev = q.shape[1], q.shape[2], v.shape[-1]
        out = q.new_zeros(B, Hq, L, Ev)
        return out, q.new_full((B, Hq, L), float("-inf"), dtype=mdt), out.to(mdt), results
    if len(done) == 1:
        _, out, lse = done[0]
        return out, lse, out.to(mdt), results
    lses = torch.stack([lse.to(mdt) for _, _, lse in done])
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - _finite(lse))
    merged = sum(w_p[..., None] * out.to(mdt) for w_p, (_, out, _) in zip(w, done))
    return merged.to(q.dtype), lse.to(done[0][2].dtype), merged, results


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows no part reaches) as 0, so exp(lse_p - it) is 0 there."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


class _Overlapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, q, k, v, *captured):
        with torch.enable_grad():
            q_leaf = q.detach().requires_grad_(q.requires_grad)
            cap_leaves = [c.detach().requires_grad_() for c in captured]
            out, lse, merged, results = _forward(call, q_leaf, k.detach().requires_grad_(k.requires_grad),
                                                 v.detach().requires_grad_(v.requires_grad), cap_leaves, True)
        ctx.call, ctx.results, ctx.q_leaf, ctx.cap_leaves = call, results, q_leaf, cap_leaves
        ctx.merged, ctx.lse = merged, lse.detach()
        ctx.kv = (k.shape[:3], k.shape[-1], v.shape[-1], k.dtype) if k.requires_grad or v.requires_grad else None
        return out.detach(), lse.detach()

    @staticmethod
    def backward(ctx, dout, dlse):
        call, merged, lse, q_leaf, caps = ctx.call, ctx.merged, ctx.lse, ctx.q_leaf, ctx.cap_leaves
        plan, dev = call.plan, merged.device
        parts, kvb = plan.parts(call.overlap), plan.kv_block
        dout = torch.zeros_like(merged) if dout is None else dout.to(merged.dtype)
        dlse = torch.zeros_like(merged[..., 0]) if dlse is None else dlse.to(merged.dtype)
        d_total = (dout * merged).sum(-1)       # <d out, out>
        dq = torch.zeros_like(q_leaf, dtype=merged.dtype) if q_leaf.requires_grad else None  # parts summed in fp32
        dcaps = [torch.zeros_like(c) for c in caps]
        dkv = None
        if ctx.kv is not None:
            shape, E, Ev, dtype = ctx.kv
            dkv = torch.zeros(*shape, E + Ev, dtype=dtype, device=dev)
        pending = []
        # received parts first: their dK/dV go back while the rest of the backward runs
        for i in [*range(1, len(parts)), 0]:
            part, res = parts[i], ctx.results[i]
            d_part = None
            if res is not None:
                kv_p, out_p, lse_p = res
                w = torch.exp(lse_p.to(merged.dtype) - _finite(lse.to(merged.dtype)))
                do_p = (w[..., None] * dout).to(out_p.dtype)
                dl_p = (w * (dlse + (dout * out_p.to(merged.dtype)).sum(-1) - d_total)).to(lse_p.dtype)
                inputs = [t for t in (q_leaf, kv_p, *caps) if t.requires_grad]
                got = torch.autograd.grad((out_p, lse_p), inputs, (do_p, dl_p), allow_unused=True)
                grads = {id(t): g for t, g in zip(inputs, got) if g is not None}
                if id(q_leaf) in grads:
                    dq += grads[id(q_leaf)]
                for dc, c in zip(dcaps, caps):
                    if id(c) in grads:
                        dc += grads[id(c)]
                if id(kv_p) in grads:
                    d_part = blocks_of(grads[id(kv_p)], kvb)
            if dkv is None:
                continue
            dblocks = blocks_of(dkv, kvb)
            if i == 0:
                if d_part is not None:
                    dblocks.index_add_(2, plan.local_from.to(dev), d_part)
                continue
            B, H, _, _, D = dblocks.shape
            sends, start = [], 0
            for p, slots in part.recv:
                n = slots.numel()
                sends.append((p, d_part[:, :, start:start + n].contiguous() if d_part is not None
                              else dkv.new_zeros(B, H, n, kvb, D)))
                start += n
            recvs = [(p, dkv.new_empty(B, H, offs.numel(), kvb, D)) for p, offs in part.send]
            pending.append((part, sends, recvs, post(sends, recvs, call.group)))
        for part, _, recvs, requests in pending:
            wait(requests)
            for (_, offs), (_, buf) in zip(part.send, recvs):
                blocks_of(dkv, kvb).index_add_(2, offs.to(dev), buf)
        dk = dv = None
        if dkv is not None:
            dk, dv = dkv[..., :ctx.kv[1]], dkv[..., ctx.kv[1]:]
        return (None, None if dq is None else dq.to(q_leaf.dtype), dk, dv, *dcaps)


def attend_overlapped(call: Call, q, k, v, captured) -> tuple:
    """(out, lse) of this rank's queries (see the module doc); differentiable in q, k, v and
    `captured` (the score graph's buffers in call.grad_slots) when grad mode is on."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *captured)):
        return _Overlapped.apply(call, q, k, v, *captured)
    out, lse, _, _ = _forward(call, q, k, v, captured, False)
    return out, lse
