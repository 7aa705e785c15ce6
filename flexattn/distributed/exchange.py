"""The communication, as autograd functions over torch.distributed point-to-point ops
(gloo on CPU, NCCL on GPU; one batch_isend_irecv per exchange).

    fetch_kv(k, v, plan, group)  -> (k_compact, v_compact): the kv blocks this rank's queries
        visit, own blocks copied, the others received from their owners. Backward: the
        gradient of each received block goes back to its owner, who adds it to its dk / dv;
        only the blocks that were fetched are sent (the others' gradient is zero).
    sum_over_ranks(t, group)     -> t, whose gradient is summed over the ranks: a captured
        tensor every rank holds gets the gradient of the whole attention.

`TRAFFIC` counts the bytes this process sent and received (tests read it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0

    def reset(self) -> None:
        self.sent = self.received = 0


TRAFFIC = Traffic()


def blocks_of(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, S, D] as [B, H, S // block, block, D] (a view)."""
    B, H, S, D = x.shape
    return x.view(B, H, S // block, block, D)


def post(sends, recvs, group) -> list:
    """Post every send (peer, tensor) and receive (peer, tensor) at once (one
    batch_isend_irecv); the requests to wait on. Peers are ranks in `group`."""
    group = dist.group.WORLD if group is None else group
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, p), group) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, p), group) for p, t in recvs]
    TRAFFIC.sent += sum(t.numel() * t.element_size() for _, t in sends)
    TRAFFIC.received += sum(t.numel() * t.element_size() for _, t in recvs)
    return dist.batch_isend_irecv(ops) if ops else []


def wait(requests) -> None:
    for req in requests:
        req.wait()


def _exchange(sends, recvs, group) -> None:
    """post, then wait."""
    wait(post(sends, recvs, group))


class _FetchKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, plan, group):
        E = k.shape[-1]
        kv = torch.cat([k, v], dim=-1).contiguous()  # one message per peer
        kvb = plan.kv_block
        blocks = blocks_of(kv, kvb)
        B, H, _, _, D = blocks.shape
        compact = kv.new_empty(B, H, plan.n_compact, kvb, D)
        sends = [(p, blocks.index_select(2, offs.to(kv.device))) for p, offs in plan.send]
        recvs = [(p, kv.new_empty(B, H, slots.numel(), kvb, D)) for p, slots in plan.recv]
        _exchange(sends, recvs, group)
        compact[:, :, plan.local_to.to(kv.device)] = blocks[:, :, plan.local_from.to(kv.device)]
        for (_, slots), (_, buf) in zip(plan.recv, recvs):
            compact[:, :, slots.to(kv.device)] = buf
        ctx.plan, ctx.group, ctx.E, ctx.shape = plan, group, E, kv.shape
        compact = compact.view(B, H, plan.n_compact * kvb, D)
        return compact[..., :E], compact[..., E:]

    @staticmethod
    def backward(ctx, dk_c, dv_c):
        plan, kvb = ctx.plan, ctx.plan.kv_block
        d = blocks_of(torch.cat([dk_c, dv_c], dim=-1).contiguous(), kvb)
        B, H, _, _, D = d.shape
        dkv = d.new_zeros(ctx.shape)
        dblocks = blocks_of(dkv, kvb)
        # the received blocks' gradients go back to their owners
        sends = [(p, d.index_select(2, slots.to(d.device))) for p, slots in plan.recv]
        recvs = [(p, d.new_empty(B, H, offs.numel(), kvb, D)) for p, offs in plan.send]
        _exchange(sends, recvs, ctx.group)
        dblocks.index_add_(2, plan.local_from.to(d.device), d[:, :, plan.local_to.to(d.device)])
        for (_, offs), (_, buf) in zip(plan.send, recvs):
            dblocks.index_add_(2, offs.to(d.device), buf)
        return dkv[..., :ctx.E], dkv[..., ctx.E:], None, None


def fetch_kv(k: torch.Tensor, v: torch.Tensor, plan, group):
    """(k_compact, v_compact) of `plan` (a RankPlan); differentiable (see the module doc)."""
    return _FetchKV.apply(k, v, plan, group)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(t: torch.Tensor, group) -> torch.Tensor:
    """`t` (the same tensor on every rank) whose gradient is the sum of the ranks' gradients."""
    return _SumOverRanks.apply(t, group)
