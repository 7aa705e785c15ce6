"""flexattn.distributed over real process groups (gloo, spawned processes).

One world of 2 ranks and one of 4 run every check of this file (spawning is what costs:
each world starts once, per module) and report per check; the tests below read the
reports. Every attention check compares out, lse, dq, dk, dv and the captured tensors'
gradients (on the unsharded tensors) with the float64 reference under the numerics rule.
Error checks assert that every rank raises, and the world has a deadline: a hang fails.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

from conftest import assert_close_to_golden, grads_of, make_qkv

BLOCK = 16          # BlockMask block (small: many blocks at small lengths)
DEADLINE_S = 240    # a world that takes longer is hung


@dataclass(frozen=True)
class Case:
    mask: str                    # causal | sliding | document | prefix_lm
    balance: str                 # contiguous | head_tail | mask
    score: str = ""              # "" | alibi | softcap
    N: int = 200                 # not a multiple of 2 * world * BLOCK: padded
    Hq: int = 2
    Hkv: int = 2
    backend: str = "cpu"         # kernel_options BACKEND ("triton" on CPU: the kernels, interpreted)
    device: str = "cpu"
    dtype: str = "float32"
    overlap: str = "ring"        # flex_attention's overlap= (the default, "auto", is "off" on CPU)

    @property
    def name(self) -> str:
        extra = "".join(f"-{x}" for x in (self.score, f"N{self.N}", f"gqa{self.Hq}x{self.Hkv}"
                                          if self.Hq != self.Hkv else "", self.backend if self.backend != "cpu"
                                          else "", self.dtype if self.dtype != "float32" else "",
                                          self.overlap if self.overlap != "ring" else "") if x)
        return f"{self.mask}-{self.balance}{extra}"


CASES = {
    2: [Case(m, b) for m in ("causal", "sliding", "document", "prefix_lm") for b in ("contiguous", "head_tail", "mask")]
       + [Case("causal", "head_tail", "alibi"), Case("document", "mask", "softcap"),
          Case("sliding", "head_tail", Hq=4, Hkv=2, N=173), Case("prefix_lm", "contiguous", "alibi", N=97),
          Case("sliding", "head_tail", "alibi", N=100, backend="triton"),
          Case("causal", "head_tail", "alibi", overlap="off"), Case("document", "mask", "softcap", overlap="off")],
    4: [Case("causal", "head_tail", "alibi", N=300), Case("document", "mask", "softcap", N=300),
        Case("sliding", "contiguous", Hq=4, Hkv=1, N=261), Case("prefix_lm", "mask", N=250),
        Case("causal", "head_tail", "alibi", N=300, overlap="own_first"),
        Case("document", "mask", "softcap", N=300, overlap="off")],
}
OVERLAPS = ("auto", "ring", "own_first", "off")
ERRORS = ("unequal_shards", "mask_for_other_lengths", "ranks_disagree_on_balance", "layout_for_other_world",
          "unshard_unequal_shards", "score_mod_fails_to_trace_on_one_rank", "group_without_this_rank",
          "ranks_pass_different_groups")


# ---------------------------------------------------------------------------------------
# What runs inside each rank

def _mods(case: Case, N: int, dtype):
    """(mask_mod, score_mod, captured float tensors that require grad) in `dtype`."""
    from flexattn import masks
    dev = case.device
    if case.mask == "causal":
        mask = masks.causal()
    elif case.mask == "sliding":
        mask = masks.sliding_window(23, 0)
    elif case.mask == "document":
        lengths = torch.tensor([37, 5, 60, 21, 90, 33, 70, 44] * 4)   # 1440 tokens: covers every N here
        assert int(lengths.sum()) >= N, "the document ids must cover the sequence"
        mask = masks.document(torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:N].to(dev))
    else:
        mask = masks.prefix_lm(41)
    captured, score = [], None
    if case.score == "alibi":
        slopes = torch.linspace(0.05, 0.3, case.Hq, dtype=torch.float64).to(dtype).to(dev).requires_grad_()
        captured = [slopes]

        def score(s, b, h, q, kv):
            return s - slopes[h] * (q - kv).abs()
    elif case.score == "softcap":
        def score(s, b, h, q, kv):
            return 2.0 * torch.tanh(s / 2.0)
    return mask, score, captured


def _attention_check(case: Case, group) -> None:
    from flexattn import create_block_mask
    from flexattn import distributed as cp
    from flexattn.reference import reference_attention
    N, gqa, dev, dtype = case.N, case.Hq != case.Hkv, case.device, getattr(torch, case.dtype)
    q, k, v = make_qkv(B=2, Hq=case.Hq, Hkv=case.Hkv, L=N, E=16, seed=N, dtype=dtype, device=dev)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(2, case.Hq, N, 16, generator=g).to(dtype).to(dev)
    dlse = torch.randn(2, case.Hq, N, generator=g).to(dev)
    mask, score, caps = _mods(case, N, dtype)
    _, score64, caps64 = _mods(case, N, torch.float64)
    golden = reference_attention(*(t.double() for t in (q, k, v)), score64, mask, enable_gqa=gqa)
    golden_grads = grads_of(golden, [q, k, v, *caps64], [dout.double(), dlse.double()])
    ref = reference_attention(q, k, v, score, mask, enable_gqa=gqa)
    ref_grads = grads_of(ref, [q, k, v, *caps], [dout, dlse])

    bm = create_block_mask(mask, None, None, N, N, device=dev, BLOCK_SIZE=BLOCK)
    balance = bm if case.balance == "mask" else case.balance

    def sh(t):
        return cp.shard(t.detach(), 2, group, balance, block_size=BLOCK)

    def unsh(t):
        return cp.unshard(t, 2, group, balance, seq_len=N, block_size=BLOCK)

    qs, ks, vs = (sh(t).requires_grad_() for t in (q, k, v))
    options = {"BACKEND": case.backend} if case.device == "cpu" else None
    out, lse = cp.flex_attention(qs, ks, vs, score, bm, group=group, balance=balance, enable_gqa=gqa,
                                 return_lse=True, kernel_options=options, overlap=case.overlap)
    grads = grads_of((out, lse), [qs, ks, vs, *caps], [sh(dout), sh(dlse)])
    got = [unsh(out.detach()), unsh(lse.detach())] + [unsh(t) for t in grads[:3]] + grads[3:]
    names = ["out", "lse", "dq", "dk", "dv"] + [f"grad captured {i}" for i in range(len(caps))]
    for name, x, r, gold in zip(names, got, [*ref, *ref_grads], [*golden, *golden_grads]):
        assert_close_to_golden(name, x, r, gold)


def _no_remote_check(rank: int, group, overlap: str) -> dict:
    """Sliding window of 20 under "contiguous" at N=256 over 2 ranks: rank 0's queries see only
    its own keys; rank 1's first block reaches back into rank 0's last two blocks."""
    from flexattn import create_block_mask, masks
    from flexattn import distributed as cp
    from flexattn.distributed.exchange import TRAFFIC
    N = 256
    bm = create_block_mask(masks.sliding_window(20, 0), None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
    q, k, v = (cp.shard(t.detach(), 2, group, "contiguous", block_size=BLOCK).requires_grad_()
               for t in make_qkv(B=1, Hq=2, L=N, E=16))
    TRAFFIC.reset()
    out = cp.flex_attention(q, k, v, None, bm, group=group, balance="contiguous", overlap=overlap)
    forward = (TRAFFIC.sent, TRAFFIC.received)
    TRAFFIC.reset()
    out.sum().backward()
    return {"forward": forward, "backward": (TRAFFIC.sent, TRAFFIC.received)}


def _error_check(name: str, rank: int, world: int, group, others: dict):
    """Run bad input `name`; (exception type, text) or None if nothing was raised. others:
    "first" (a group of rank 0 alone), "pair" (the last two ranks: at 2 ranks a group of the
    same ranks as `group`, but another group)."""
    from flexattn import create_block_mask, masks
    from flexattn import distributed as cp
    N = 256  # "contiguous" and "head_tail" both give shards of 128 positions (at 2 ranks) or 64 (at 4)
    bm = create_block_mask(masks.causal(), None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
    q, k, v = (cp.shard(t.detach(), 2, group, "head_tail", block_size=BLOCK) for t in make_qkv(B=1, Hq=2, L=N))
    args, kwargs = (q, k, v, None, bm), {"group": group, "balance": "head_tail"}
    call = cp.flex_attention
    if name == "unequal_shards":
        if rank == world - 1:
            args = (q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], None, bm)
    elif name == "mask_for_other_lengths":
        if rank == 1:
            args = (q, k, v, None, create_block_mask(masks.causal(), None, None, N + 64, N + 64, device="cpu",
                                                     BLOCK_SIZE=BLOCK))
    elif name == "ranks_disagree_on_balance":
        # both layouts give shards of equal length here: only comparing across ranks finds it
        kwargs["balance"] = "contiguous" if rank == 0 else "head_tail"
    elif name == "layout_for_other_world":
        kwargs["balance"] = cp.make_layout("head_tail", N, world * 2, BLOCK)
    elif name == "score_mod_fails_to_trace_on_one_rank":
        def branching(score, b, h, q_idx, kv_idx):
            return score if q_idx > kv_idx else -score  # Python control flow on an index: TraceError

        args = (q, k, v, branching if rank == 1 else None, bm)
    elif name == "group_without_this_rank":
        if rank == world - 1:
            kwargs["group"] = others["first"]
    elif name == "ranks_pass_different_groups":
        if rank == world - 1:  # the others wait in a call over `group`, this rank in one over "pair"
            kwargs["group"] = others["pair"]
    elif name == "unshard_unequal_shards":
        call, args, kwargs = cp.unshard, (q if rank else q[:, :, :-BLOCK], 2, group, "head_tail"), \
            {"seq_len": N, "block_size": BLOCK}
    try:
        call(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the test asserts the type
        return [type(e).__name__, str(e)]
    return None


def _world_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ["TRITON_INTERPRET"] = "1"  # the "triton" cases run the kernels in the interpreter
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=DEADLINE_S // 2))
    group = dist.new_group(list(range(world)))  # an explicit group (not the default one) for the calls
    report = {}
    for case in CASES[world]:
        try:
            _attention_check(case, group)
            report[case.name] = "ok"
        except Exception:  # noqa: BLE001 - reported per check
            report[case.name] = traceback.format_exc()
    if world == 2:
        report["no_remote"] = {o: _no_remote_check(rank, group, o) for o in OVERLAPS}
    others = {"first": dist.new_group([0]), "pair": dist.new_group([world - 2, world - 1])}
    for name in ERRORS:
        report["error:" + name] = _error_check(name, rank, world, group, others)
        dist.barrier()  # the next check starts on every rank after this one ended on all
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(main, world: int, tmp_path, what: str = "gloo") -> list:
    """Spawn `world` processes of main(rank, world, port, out_dir), each writing
    out_dir/rank{r}.json; their reports. Fails the test if they are not done by the deadline."""
    ctx = mp.start_processes(main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {what} world of {world} ranks did not finish within {DEADLINE_S} s (a hang)")
    return [json.load(open(os.path.join(tmp_path, f"rank{r}.json"))) for r in range(world)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}

    def report(world):
        if world not in out:
            out[world] = run_world(_world_main, world, tmp_path_factory.mktemp(f"world{world}"))
        return out[world]
    return report


# ---------------------------------------------------------------------------------------
# The tests: read the reports

ALL = [(w, c) for w, cases in CASES.items() for c in cases]


@pytest.mark.parametrize("world,case", ALL, ids=[f"world{w}-{c.name}" for w, c in ALL])
def test_matches_single_process(reports, world, case):
    failures = [f"rank {r}:\n{rep[case.name]}" for r, rep in enumerate(reports(world)) if rep[case.name] != "ok"]
    assert not failures, "\n".join(failures)


ERR = [(w, e) for w in CASES for e in ERRORS]


@pytest.mark.parametrize("world,name", ERR, ids=[f"world{w}-{e}" for w, e in ERR])
def test_bad_input_raises_on_every_rank(reports, world, name):
    got = [rep["error:" + name] for rep in reports(world)]
    assert all(g is not None for g in got), f"{name}: some ranks did not raise: {got}"
    assert all(g[0] == "ValueError" for g in got), f"{name}: expected ValueError on every rank, got {got}"
    expected = {"unequal_shards": f"rank {world - 1}", "mask_for_other_lengths": "rank 1",
                "ranks_disagree_on_balance": "disagree on layout", "layout_for_other_world": "Layout for",
                "unshard_unequal_shards": "rank 0", "score_mod_fails_to_trace_on_one_rank": "rank 1: TraceError",
                "group_without_this_rank": "not a member", "ranks_pass_different_groups": "not all in this call"}[name]
    assert all(expected in g[1] for g in got), f"{name}: every rank's message should name {expected!r}: {got}"


@pytest.mark.parametrize("overlap", OVERLAPS)
def test_a_rank_that_needs_no_remote_kv_receives_none(reports, overlap):
    r0, r1 = (rep["no_remote"][overlap] for rep in reports(2))
    # B=1, Hkv=2, E=Ev=16, float32: one kv block of K and V is 1*2*16*(16+16)*4 bytes
    block = 2 * BLOCK * 32 * 4
    assert r0["forward"] == [2 * block, 0], r0     # rank 0 sends its last 2 blocks, receives nothing
    assert r1["forward"] == [0, 2 * block], r1
    assert r1["backward"] == [2 * block, 0], r1    # dK/dV of exactly those blocks go back
    assert r0["backward"] == [0, 2 * block], r0
