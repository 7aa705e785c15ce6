"""Checks that every rank passes: each rank checks its own input, then the ranks compare
what they found and what they were given in one small collective, and all raise the same
error if any rank's check failed or the ranks disagree - so bad input never leaves some
ranks waiting in a collective the others never join.

Before that collective the members of the group meet through the process group's store
(`rendezvous`): each rank posts its state (which group's call it waits in, how many calls
it has made per group, or that it left a call with an error), and waits until every member
has arrived at the same call. A member that is stuck elsewhere - it raised (say, it passed a
group it is not a member of), or it waits in a call over another group that can never
complete - makes every waiting rank raise a ValueError naming it, instead of waiting for the
process group's timeout. A rank that raised is taken as gone from the call.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

import torch.distributed as dist

_KEY = "flexattn.distributed/state/"
_POLL_S = (0.0002, 0.01)        # first and longest pause between looks at the store
_GONE_S = 3.0                  # a member that left a call over another group and did not come back
_WAIT_S = 1800.0               # a member that neither arrives nor is stuck: give up after this


class _State:
    """This process's posted state: a version (bumped by every post) and its calls per group."""
    version = 0
    counts: dict = {}


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store reachable: the checks fall back to the collective alone
        return None


def _publish(store, state: str, group: Optional[str] = None, ranks=None, note: str = "", call: int = 0) -> None:
    _State.version += 1
    store.set(_KEY + str(dist.get_rank()), json.dumps({"v": _State.version, "state": state, "group": group,
                                                       "ranks": ranks, "counts": _State.counts, "note": note,
                                                       "call": call}))


def _read(store, rank: int) -> Optional[dict]:
    key = _KEY + str(rank)
    return json.loads(store.get(key)) if store.check([key]) else None


def mark_left(note: str, group: Optional[str] = None) -> None:
    """Post that this process left its latest call over `group` (None: it is not a member of
    the group it passed) with an error."""
    store = _store() if dist.is_available() and dist.is_initialized() else None
    if store is not None:
        _publish(store, "left", group, note=note[:300], call=_State.counts.get(group, 0))


def _status(st: Optional[dict], group: str, n: int) -> str:
    """Where a member with posted state `st` is, seen from call n over `group`: "arrived",
    "may come" (not there yet, free to come), "gone" (left a call over another group with an
    error) or "waiting" (in a call elsewhere)."""
    if st is None:
        return "may come"
    if st["counts"].get(group, 0) >= n:
        return "arrived"
    if st["state"] == "left":  # an earlier call of this group: free to come; this call or elsewhere: gone
        return "may come" if st["group"] == group and st["call"] < n else "gone"
    return "may come" if st["state"] == "done" else "waiting"


def _missing(states: dict, rank: int) -> list:
    """The members of the call `rank` waits in that have not arrived at it."""
    st = states[rank]
    n = st["counts"][st["group"]]
    return [m for m in st["ranks"] if _status(states.get(m), st["group"], n) != "arrived"]


def _stuck(store, me: int, states: dict) -> Optional[set]:
    """The ranks this one waits for, transitively, if none of them can move (each gone, or
    waiting for ranks that cannot move); None if one may still arrive."""
    seen, todo = {me}, [me]
    while todo:
        r = todo.pop()
        st = states[r]
        for m in st["ranks"]:
            if m not in states:
                states[m] = _read(store, m)
        for m in _missing(states, r):
            if m in seen:
                continue
            where = _status(states[m], st["group"], st["counts"][st["group"]])
            if where == "may come":
                return None
            seen.add(m)
            if where == "waiting":
                todo.append(m)  # free to move once every member of its call is there: looked at next
    return seen - {me}


def _describe(rank: int, st: dict) -> str:
    if st["state"] == "left":
        return f"global rank {rank} left its call with an error ({st['note']})"
    return f"global rank {rank} waits in a call over another group (global ranks {st['ranks']})"


def rendezvous(group, where: str) -> None:
    """Wait until every member of `group` has arrived at this call (see the module doc);
    ValueError on every waiting rank if one never can. A call that fails here does not count
    (this rank's calls over the group stay in step with the others')."""
    store = _store()
    if store is None:
        return
    me = dist.get_rank()
    pg = dist.group.WORLD if group is None else group
    name, ranks = pg.group_name, dist.get_process_group_ranks(pg)
    n = _State.counts[name] = _State.counts.get(name, 0) + 1
    _publish(store, "waiting", name, ranks)
    pause, start, first_seen = _POLL_S[0], time.monotonic(), {}
    while True:
        states = {me: {"state": "waiting", "ranks": ranks, "group": name, "counts": dict(_State.counts)}}
        states.update({m: _read(store, m) for m in ranks if m != me})
        if not _missing(states, me):
            break
        stuck = _stuck(store, me, states)
        now = time.monotonic()
        if stuck is not None:
            for r in stuck:
                first_seen.setdefault((r, states[r]["v"]), now)
            # a wait cycle is final once seen twice alike; a rank that left: once it stays away a while
            again = {r: _read(store, r) for r in stuck}
            if all(again[r] is not None and again[r]["v"] == states[r]["v"] and
                   (states[r]["state"] != "left" or states[r]["group"] == name
                    or now - first_seen[(r, states[r]["v"])] > _GONE_S)
                   for r in stuck):
                _State.counts[name] -= 1
                _publish(store, "left", name, note="the group's ranks were not all in the call", call=n)
                whom = "; ".join(_describe(r, states[r]) for r in sorted(stuck))
                raise ValueError(f"{where}: the ranks of the group (global ranks {ranks}) are not all in this call: "
                                 f"{whom}; every rank of `group` must call with the same group (one it is a "
                                 f"member of)")
        if now - start > _WAIT_S:
            whom = ", ".join(str(m) for m in _missing(states, me))
            raise ValueError(f"{where}: global ranks {whom} of the group did not arrive in {_WAIT_S:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, _POLL_S[1])
    _publish(store, "done", name, ranks)


def check_group(group, where: str) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialised; call "
                           f"torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the "
                           f"environment it reads)")
    rank = dist.get_rank(group)
    if rank < 0:
        mark_left("it passed a group it is not a member of")
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
    ranks' `facts` (name -> plain value) differ; return on every rank otherwise.
    The members meet first (rendezvous): one stuck elsewhere is an error, not a hang."""
    rendezvous(group, where)
    try:
        _compare(where, error, facts, group)
    except ValueError as e:
        mark_left(str(e), (dist.group.WORLD if group is None else group).group_name)
        raise


def _compare(where: str, error: Optional[str], facts: dict, group) -> None:
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
