"""Checks that every rank passes: each rank checks its own input, then the ranks compare
what they found and what they were given in one small collective, and all raise the same
error if any rank's check failed or the ranks disagree - so bad input never leaves some
ranks waiting in a collective the others never join."""
from __future__ import annotations

from typing import Callable, Optional

import torch.distributed as dist


def check_group(group, where: str) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialised; call "
                           f"torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the "
                           f"environment it reads)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{where}: this process (global rank {dist.get_rank()}) is not a member of the group it "
                         f"passed as group=; pass a group this rank belongs to")
    return rank, dist.get_world_size(group)


def local_error(check: Callable[[], None]) -> Optional[str]:
    """The text of the exception `check()` raises, or None. Any exception: one rank raising
    alone would leave the others waiting in `agree`."""
    try:
        check()
    except Exception as e:  # noqa: BLE001 - reported on every rank by agree
        return f"{type(e).__name__}: {e}"
    return None


def agree(where: str, error: Optional[str], facts: dict, group) -> None:
    """Raise the same ValueError on every rank of `group` if any rank's `error` is set or the
    ranks' `facts` (name -> plain value) differ; return on every rank otherwise."""
    world = dist.get_world_size(group)
    gathered = [None] * world
    dist.all_gather_object(gathered, (error, facts), group=group)
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if failed:
        raise ValueError(f"{where}: " + "; ".join(f"rank {r}: {e}" for r, e in failed))
    for name in facts:
        values = [f.get(name) for _, f in gathered]
        if any(v != values[0] for v in values):
            raise ValueError(f"{where}: the ranks disagree on {name}: "
                             + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                             + "; every rank must pass the same (global) arguments and shards of equal shape")
