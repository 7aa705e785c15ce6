"""flexattn.distributed's layouts and plans, without processes: the plan is a function of
the layout and the global BlockMask, checked here against the dense mask."""
from __future__ import annotations

import pytest
import torch

from flexattn import create_block_mask, create_mask, masks
from flexattn.distributed import Layout, balanced_layout, make_layout, world_plan
from flexattn.distributed.plan import rank_plan

BLOCK = 16


def _doc_mask(N):
    lengths = torch.tensor([37, 5, 60, 21, 90, 33, 70, 44, 200]).repeat(N // 560 + 1)
    return masks.document(torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:N], inner=masks.causal())


MASKS = {"causal": lambda N: masks.causal(), "sliding": lambda N: masks.sliding_window(23, 0),
         "document": _doc_mask, "prefix_lm": lambda N: masks.prefix_lm(41)}


def test_head_tail_and_contiguous_layouts():
    lay = make_layout("head_tail", 300, 4, BLOCK)
    assert lay.chunks == ((0, 7), (1, 6), (2, 5), (3, 4))
    assert lay.chunk == 48 and lay.padded_len == 384 and lay.local_len == 96   # ceil(300 / 8) = 38 -> 48
    assert lay.positions(1).tolist() == list(range(48, 96)) + list(range(288, 336))
    lay = make_layout("contiguous", 256, 2, BLOCK)
    assert lay.chunks == ((0,), (1,)) and lay.local_len == 128 and lay.padded_len == 256


def test_bad_layouts_are_errors():
    with pytest.raises(ValueError, match="balance must be"):
        make_layout("zigzag", 100, 2)
    with pytest.raises(ValueError, match="same number of chunks"):
        Layout(2, 100, 64, ((0,), (1, 2)))
    with pytest.raises(ValueError, match="do not cover"):
        Layout(2, 1000, 64, ((0,), (1,)))


def _dense_needs(mask_mod, N, layout):
    """Per rank: the kv blocks holding a key some local query attends to (from the dense mask)."""
    dense = create_mask(mask_mod, None, None, N, N)[0, 0]
    out = []
    for r in range(layout.world_size):
        pos = layout.positions(r)
        pos = pos[pos < N]
        cols = torch.nonzero(dense[pos].any(0)).flatten()
        out.append(sorted(set((cols // BLOCK).tolist())))
    return out


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("balance", ["contiguous", "head_tail", "mask"])
def test_plan_fetches_exactly_the_blocks_the_dense_mask_needs(mask, balance):
    N, P = 300, 4
    mod = MASKS[mask](N)
    bm = create_block_mask(mod, None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
    layout = balanced_layout(bm, P) if balance == "mask" else make_layout(balance, N, P, BLOCK)
    plan = world_plan(layout, bm)
    assert [n.tolist() for n in plan.needed] == _dense_needs(mod, N, layout)
    for r in range(P):
        assert (plan.kv_owner[plan.remote[r]] != r).all()
        assert set(plan.remote[r].tolist()) | set(torch.nonzero(plan.kv_owner == r).flatten().tolist()) >= \
            set(plan.needed[r].tolist())
    sent, received = plan.volume(1)
    assert sum(sent) == sum(received) == sum(len(x) for x in plan.remote)


@pytest.mark.parametrize("mask", ["document", "prefix_lm"])
def test_local_block_mask_is_the_global_mask_on_the_compact_buffer(mask):
    """Each rank's local BlockMask (compact kv columns, mods on global positions) equals the
    dense mask of its queries x its fetched keys, reduced per block; padding is masked."""
    N, P = 300, 2
    mod = MASKS[mask](N)
    bm = create_block_mask(mod, None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
    dense = create_mask(mod, None, None, N, N)[0, 0]
    layout = make_layout("head_tail", N, P, BLOCK)
    for r in range(P):
        rp = rank_plan(layout, bm, r)
        q_pos, kv_pos, local = rp.on(bm, "cpu")
        qp, kp = q_pos.long(), kv_pos.long()
        want = torch.zeros(qp.numel(), kp.numel(), dtype=torch.bool)
        ok_q, ok_k = qp < N, kp < N
        want[ok_q[:, None] & ok_k[None, :]] = dense[qp.clamp(max=N - 1)][:, kp.clamp(max=N - 1)][
            ok_q[:, None] & ok_k[None, :]]
        got = create_mask(local.mask_mod, None, None, qp.numel(), kp.numel())[0, 0]
        assert torch.equal(got, want)
        blocks = want.reshape(qp.numel() // BLOCK, BLOCK, -1, BLOCK).any(3).any(1)
        assert torch.equal(local.to_dense()[0, 0].bool(), blocks)
        assert not torch.equal(got, torch.zeros_like(got))


def test_sliding_window_contiguous_first_rank_needs_nothing_remote():
    N = 1024
    bm = create_block_mask(masks.sliding_window(40, 0), None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
    plan = world_plan(make_layout("contiguous", N, 4, BLOCK), bm)
    assert plan.remote[0].numel() == 0
    assert [len(r) for r in plan.remote[1:]] == [3, 3, 3]   # 40 keys back: 3 blocks of 16


@pytest.mark.parametrize("mask", list(MASKS))
def test_balanced_layout_evens_the_work(mask):
    N = 4096
    bm = create_block_mask(MASKS[mask](N), None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
    for P in (2, 4, 8):
        assert world_plan(balanced_layout(bm, P), bm).imbalance() <= 1.10
