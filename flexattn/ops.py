"""flexattn's kernels as torch.library custom ops (fake implementations + autograd), so a
compiled graph can hold them and `torch.library.opcheck` can check them.

    flexattn::fwd(q, k, v, blocks, score_bufs, mask_bufs, plan_key, scale, dropout_p, dropout_seed)
        -> (out, lse)
    flexattn::bwd(q, k, v, out, lse, dout, dlse, blocks, score_bufs, mask_bufs, plan_key, ...)
        -> (dq, dk, dv, buffer grads)

Ops take only tensors and plain values. What is not a tensor - the traced graphs, the
BlockMask block size, kernel options - lives in `_PLANS` under `plan_key`, a hash of their
structure (never of captured values), so one compiled graph serves new captured values.
`blocks` holds the 8 BlockMask tensors (kv_*, full_kv_*, q_*, full_q_*; full ones may be
empty tensors when the mask has none).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import torch
from torch import Tensor

from . import kernels as K

_PLANS: dict[str, "K.Plan"] = {}


def _blocks_list(blocks: "K._Blocks") -> list[Tensor]:
    def t(x, like):
        return x if x is not None else like.new_empty((0,))
    return [blocks.kv_num, blocks.kv_idx, t(blocks.full_kv_num, blocks.kv_num), t(blocks.full_kv_idx, blocks.kv_idx),
            blocks.q_num, blocks.q_idx, t(blocks.full_q_num, blocks.q_num), t(blocks.full_q_idx, blocks.q_idx)]


def register_plan(plan: "K.Plan") -> str:
    sk = plan.score_graph.structure_key() if plan.score_graph is not None else ""
    mk = plan.mask_graph.structure_key() if plan.mask_graph is not None else ""
    params = (plan.score_graph.params if plan.score_graph is not None else [],
              plan.mask_graph.params if plan.mask_graph is not None else [])
    text = repr((sk, mk, params, plan.blocks.block, plan.blocks.has_full, sorted(plan.opts.items()), plan.grad_slots))
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    _PLANS.setdefault(key, replace(plan, score_bufs=[], mask_bufs=[], dropout_seed=None))
    return key


def _plan(key, blocks, score_bufs, mask_bufs, scale, dropout_p, dropout_seed) -> "K.Plan":
    base = _PLANS[key]
    has_full = base.blocks.has_full
    b = K._Blocks(blocks[0], blocks[1], blocks[2] if has_full else None, blocks[3] if has_full else None,
                  blocks[4], blocks[5], blocks[6] if has_full else None, blocks[7] if has_full else None,
                  base.blocks.block)
    return replace(base, blocks=b, score_bufs=list(score_bufs), mask_bufs=list(mask_bufs), scale=scale,
                   dropout_p=dropout_p, dropout_seed=dropout_seed)


@torch.library.custom_op("flexattn::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, blocks: list[Tensor], score_bufs: list[Tensor], mask_bufs: list[Tensor],
        plan_key: str, scale: float, dropout_p: float, dropout_seed: int) -> tuple[Tensor, Tensor]:
    plan = _plan(plan_key, blocks, score_bufs, mask_bufs, scale, dropout_p, dropout_seed)
    return K._run_forward(plan, q, k, v)


@fwd.register_fake
def _fwd_fake(q, k, v, blocks, score_bufs, mask_bufs, plan_key, scale, dropout_p, dropout_seed):
    B, Hq, L, _ = q.shape
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(B, Hq, L, dtype=torch.float32)


@torch.library.custom_op("flexattn::bwd", mutates_args=())
def bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor,
        blocks: list[Tensor], score_bufs: list[Tensor], mask_bufs: list[Tensor], plan_key: str, scale: float,
        dropout_p: float, dropout_seed: int) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    plan = _plan(plan_key, blocks, score_bufs, mask_bufs, scale, dropout_p, dropout_seed)
    dq, dk, dv, buf_grads = K.backward(plan, q, k, v, out, lse, dout, dlse, score_bufs)
    grads = [torch.zeros_like(t) if t.dtype.is_floating_point else t.new_zeros(()) for t in score_bufs]
    for s, g in zip(plan.grad_slots, buf_grads):
        grads[s] = g
    return dq, dk, dv, grads


@bwd.register_fake
def _bwd_fake(q, k, v, out, lse, dout, dlse, blocks, score_bufs, mask_bufs, plan_key, scale, dropout_p,
              dropout_seed):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            [torch.empty_like(t) if t.dtype.is_floating_point else t.new_empty(()) for t in score_bufs])


def _setup(ctx, inputs, output):
    q, k, v, blocks, score_bufs, mask_bufs, plan_key, scale, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *blocks, *score_bufs, *mask_bufs)
    ctx.n = (len(blocks), len(score_bufs))
    ctx.args = (plan_key, scale, dropout_p, dropout_seed)


def _backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    nb, ns = ctx.n
    blocks, score_bufs, mask_bufs = list(saved[5:5 + nb]), list(saved[5 + nb:5 + nb + ns]), list(saved[5 + nb + ns:])
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv, grads = bwd(q, k, v, out, lse, dout.contiguous(), dlse, blocks, score_bufs, mask_bufs, *ctx.args)
    grads = [g if t.requires_grad else None for g, t in zip(grads, score_bufs)]
    return dq, dk, dv, [None] * nb, grads, [None] * len(mask_bufs), None, None, None, None


fwd.register_autograd(_backward, setup_context=_setup)


def flex_attention_op(plan: "K.Plan", q, k, v):
    """Run `plan` through the custom op (what flex_attention_triton does under torch.compile)."""
    key = register_plan(plan)
    return fwd(q, k, v, _blocks_list(plan.blocks), list(plan.score_bufs), list(plan.mask_bufs), key,
               plan.scale, plan.dropout_p, int(plan.dropout_seed or 0))


def run_opcheck(q, k, v, score_mod=None, mask_mod=None):
    """torch.library.opcheck over flexattn::fwd for these inputs (an ALiBi-style score_mod with
    a captured per-head tensor and a causal mask by default)."""
    from .trace import trace_score
    from .block_mask import create_block_mask
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    slopes = torch.linspace(0.1, 1.0, H, device=q.device).requires_grad_()
    score_mod = score_mod or (lambda s, b, h, qi, kv: s - slopes[h] * (qi - kv).abs())
    mask_mod = mask_mod or (lambda b, h, qi, kv: qi >= kv)
    bm = create_block_mask(mask_mod, None, None, L, S, device=q.device)
    plan = K.make_plan(q, k, v, score_graph=trace_score(score_mod), mask_graph=bm.mask_graph, block_mask=bm,
                       scale=None, kernel_options=None)
    key = register_plan(plan)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), _blocks_list(plan.blocks),
            list(plan.score_bufs), list(plan.mask_bufs), key, plan.scale, 0.0, 0)
    torch.library.opcheck(fwd, args)
