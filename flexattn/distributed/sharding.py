"""shard / unshard: a full-sequence tensor to this rank's part and back (see layout.py for
the layouts and the padding)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..block_mask import _DEFAULT_BLOCK
from .agree import agree, check_group, local_error
from .layout import Balance, Layout, resolve


def _dim(x: torch.Tensor, seq_dim: int, where: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(seq_dim, bool) or not isinstance(seq_dim, int) or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"{where}: seq_dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, "
                         f"got {seq_dim!r} (the sequence dim of (B, H, S, D) tensors is 2)")
    return seq_dim % x.dim()


def _padded(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def shard(x: torch.Tensor, seq_dim: int, group=None, balance: Balance = "head_tail", *,
          block_size: int = _DEFAULT_BLOCK) -> torch.Tensor:
    """This rank's part of the full-sequence tensor `x` (the same on every rank).

    balance: "contiguous", "head_tail", a BlockMask (its work-balanced layout) or a Layout;
    block_size: the BlockMask's block (string layouts cut chunks at its multiples: pass the
    same value to shard, unshard and use it as the BlockMask's BLOCK_SIZE). The sequence is
    padded with zeros to the layout's padded length first; flex_attention masks the padding.
    Local (no communication); differentiable."""
    where = "flexattn.distributed.shard"
    dim = _dim(x, seq_dim, where)
    rank, world = check_group(group, where)
    layout = resolve(balance, x.shape[dim], world, block_size)
    if x.shape[dim] != layout.seq_len:
        raise ValueError(f"{where}: x has {x.shape[dim]} positions along seq_dim={seq_dim} but the layout is for "
                         f"a sequence of {layout.seq_len}; pass the full-sequence tensor (or a layout for its length)")
    index = layout.positions(rank).to(x.device)
    return _padded(x, dim, layout.padded_len).index_select(dim, index)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, layout, rank, group):
        parts = [torch.empty_like(x) for _ in range(layout.world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        chunks = [None] * layout.num_chunks
        for r, part in enumerate(parts):
            for j, c in enumerate(part.split(layout.chunk, dim=dim)):
                chunks[layout.chunks[r][j]] = c
        ctx.dim, ctx.layout, ctx.rank = dim, layout, rank
        return torch.cat(chunks, dim=dim).narrow(dim, 0, layout.seq_len)

    @staticmethod
    def backward(ctx, grad):
        # the full tensor is replicated: this rank's part of its gradient is the local gradient
        index = ctx.layout.positions(ctx.rank).to(grad.device)
        return _padded(grad, ctx.dim, ctx.layout.padded_len).index_select(ctx.dim, index), None, None, None, None


def unshard(x_local: torch.Tensor, seq_dim: int, group=None, balance: Balance = "head_tail", *,
            seq_len: Optional[int] = None, block_size: int = _DEFAULT_BLOCK) -> torch.Tensor:
    """The full tensor on every rank from each rank's part `x_local` (all-gather), padding
    removed. With a string balance the global length is `seq_len` (None: keep the padded
    length); a BlockMask or a Layout knows it. Differentiable: the gradient of the (replicated)
    full tensor flows back to this rank's part. Bad or mismatched input raises on every rank."""
    where = "flexattn.distributed.unshard"
    rank, world = check_group(group, where)
    layout: Optional[Layout] = None

    def check():
        nonlocal layout
        dim = _dim(x_local, seq_dim, where)
        n = x_local.shape[dim]
        if isinstance(balance, str) and seq_len is None:
            layout = resolve(balance, n * world, world, 1)
            if layout.local_len != n:
                raise ValueError(f"{where}: a local length of {n} does not split into the layout's chunks")
        else:
            layout = resolve(balance, seq_len, world, block_size)
        if n != layout.local_len:
            raise ValueError(f"{where}: x_local has {n} positions along seq_dim={seq_dim} but the layout gives each "
                             f"rank {layout.local_len} (global length {layout.seq_len}); pass the tensor `shard` "
                             f"returned with the same balance / block_size")

    error = local_error(check)
    facts = {} if error else {"shape": tuple(x_local.shape), "dtype": str(x_local.dtype),
                              "layout": layout.key()}
    agree(where, error, facts, group)
    return _Unshard.apply(x_local, seq_dim % x_local.dim(), layout, rank, group)
