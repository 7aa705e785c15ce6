"""The tile-table form of a BlockMask (flexattn.mask_tiles) and the tiered-compilation
policy that uses it (flexattn.kernels.tiered).

The tile-table form must give attention bit for bit equal to the mask's own: on the CPU
path, and through the generated kernels under TRITON_INTERPRET=1 (a subprocess, as in
test_kernels_interpret.py). The policy (which form a call runs, what compiles in the
background) is checked on CPU by asking it about a CUDA device; the GPU run itself is
tests/test_gpu.py::test_tiered_new_mask_structure.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flexattn
from flexattn.mask_tiles import tile_table_form
from mods_zoo import ZOO_NAMES, make_mod

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MASKED = [n for n in ZOO_NAMES if make_mod(n, B=1, H=1, L=16, S=16, device="cpu").mask_mod is not None]


@pytest.mark.parametrize("name", MASKED)
@pytest.mark.parametrize("B,H,L,S,block", [(2, 3, 200, 333, 64), (1, 2, 129, 1000, 128)])
def test_tile_form_same_bits_cpu(name, B, H, L, S, block):
    m = make_mod(name, B=B, H=H, L=L, S=S, device="cpu", requires_grad=True)
    bm = flexattn.create_block_mask(m.mask_mod, B, H, L, S, BLOCK_SIZE=block)
    form = tile_table_form(bm)
    assert torch.equal(form.to_dense(), bm.to_dense())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, 32, generator=g).requires_grad_() for n in (L, S, S))
    outs = []
    for mask in (bm, form):
        out, lse = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=mask, return_lse=True)
        ins = [q, k, v] + list(m.captured.values())
        outs.append([out, lse, *torch.autograd.grad(out, ins, torch.ones_like(out), allow_unused=True)])
    for a, b in zip(*outs):
        assert (a is None and b is None) or torch.equal(a, b)


def test_tile_form_table_contents_and_limits():
    causal = lambda b, h, q, kv: q >= kv  # noqa: E731
    bm = flexattn.create_block_mask(causal, None, None, 300, 300, BLOCK_SIZE=128)
    # the interval form: row r of a partial block keeps columns [lows, highs)
    slots, lows, highs = tile_table_form(bm).mask_graph.buffers
    assert lows.shape == highs.shape == (16, 128) and lows.dtype == highs.dtype == torch.int32
    assert slots[0, 0].tolist() == [[1, 0, 0], [0, 2, 0], [3, 4, 5]]
    assert not lows.any() and highs[1].tolist() == list(range(1, 129))
    assert highs[5].tolist() == list(range(1, 45)) + [0] * 84   # padding rows keep nothing
    assert highs[3].tolist() == [128] * 44 + [0] * 84 and not highs[0].any() and not highs[6:].any()
    form = tile_table_form(bm, intervals=False)
    slots, tiles = form.mask_graph.buffers
    # partial: the diagonal, and the last block row (it holds padding rows), numbered row by
    # row from 1; tile 0 and the rows padding the table to 16 stay empty
    assert tiles.shape == (16, 128, 128) and not tiles[0].any() and not tiles[6:].any()
    assert slots[0, 0].tolist() == [[1, 0, 0], [0, 2, 0], [3, 4, 5]]
    assert torch.equal(tiles[5][:44, :44].bool(), torch.ones(44, 44, dtype=torch.bool).tril())
    assert not tiles[5][44:].any() and not tiles[5][:, 44:].any()  # padding is false
    assert tiles[3][:44].all() and not tiles[3][44:].any()
    assert tile_table_form(bm, intervals=False) is form  # cached on the BlockMask
    assert tile_table_form(bm, max_bytes=100_000) is None  # 16 tiles of 16 KiB do not fit (built first)
    dense = flexattn.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices)
    assert tile_table_form(dense) is None  # no traced mask: nothing to tabulate


def test_tile_form_prints_one_slot_per_row():
    """Both forms' lookups print with a slot per row (codegen.tile_table_lookup): the interval
    form's two numbers per row, the tile form's bytes at affine addresses; a mask that only
    resembles one does not."""
    from flexattn.kernels import generated_source
    causal = flexattn.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 256, 256)
    for intervals, last in ((True, "return (kv_in >= lo) & (kv_in < hi)"), (False, "return tile != 0")):
        graph = tile_table_form(causal, intervals=intervals).mask_graph
        for kind in ("fwd", "bwd", "decode"):
            src = generated_source(None, graph, kind)
            assert "tl.min(tl.min(kv_idx, 1), 0) // 128" in src and last in src
            # the Triton forward reads the slot per row as one int32, the other kernels once
            # per tile as 16-bit halves (codegen._tile_table_body)
            per_row, per_tile = "qi = _floordiv(q_idx, 128)", "qi = tl.min(tl.min(q_idx, 1), 0) // 128"
            assert (per_row in src, per_tile in src) == ((True, False) if kind == "fwd" else (False, True))
            assert ("pointer_type(tl.int16)" in src) == (kind != "fwd")
    tiles = torch.zeros(3, 128, 128, dtype=torch.int8)
    slots = torch.zeros(1, 1, 3, 3, dtype=torch.int32)
    lows, highs = torch.zeros(3, 128, dtype=torch.int32), torch.zeros(3, 128, dtype=torch.int32)
    for near in (lambda b, h, q, kv: tiles[slots[0, 0, q // 128, kv // 128], q % 128, kv % 128] != 1,
                 lambda b, h, q, kv: tiles[slots[0, 0, q // 128, kv // 96], q % 128, kv % 96] != 0,
                 lambda b, h, q, kv: tiles[slots[0, 0, kv // 128, q // 128], q % 128, kv % 128] != 0,
                 lambda b, h, q, kv: ((kv % 128 >= lows[slots[0, 0, q // 128, kv // 128], q % 128])
                                      & (kv % 128 <= highs[slots[0, 0, q // 128, kv // 128], q % 128])),
                 lambda b, h, q, kv: ((kv % 128 >= lows[slots[0, 0, q // 128, kv // 128], q % 128])
                                      & (kv % 128 < highs[slots[0, 0, q // 128, kv // 128], kv % 128]))):
        bm = flexattn.create_block_mask(near, None, None, 256, 256)
        assert "tl.min(tl.min(kv_idx" not in generated_source(None, bm.mask_graph, "fwd")


def test_tile_form_one_kernel_source_per_form():
    """Masks whose partial blocks keep one run of columns a row (causal, sliding window,
    prefix-LM, documents) share the interval form's kernel source; the others share the
    tile form's."""
    from flexattn.kernels import generated_source
    runs = [lambda b, h, q, kv: q >= kv, lambda b, h, q, kv: (q - kv).abs() <= 40,
            lambda b, h, q, kv: (kv < 100) | (q >= kv), lambda b, h, q, kv: (q // 48 == kv // 48) & (q >= kv)]
    other = [lambda b, h, q, kv: (q - kv) % 7 != 3, lambda b, h, q, kv: (kv < 64) | ((q // 32) == (kv // 32))]
    sources = {}
    for kind, masks in (("intervals", runs), ("tiles", other)):
        for mask in masks:
            form = tile_table_form(flexattn.create_block_mask(mask, None, None, 256, 256))
            assert len(form.mask_graph.buffers) == (3 if kind == "intervals" else 2)
            sources.setdefault(kind, set()).add(generated_source(None, form.mask_graph, "fwd"))
    assert len(sources["intervals"]) == len(sources["tiles"]) == 1 and sources["intervals"] != sources["tiles"]


def test_intervals_exact():
    """_intervals gives runs that reproduce every tile, or None where a row keeps two runs."""
    from flexattn.mask_tiles import _intervals
    g = torch.Generator().manual_seed(0)
    lo = torch.randint(0, 33, (50, 16), generator=g)
    hi = torch.minimum(lo + torch.randint(0, 33, (50, 16), generator=g), torch.tensor(32))
    cols = torch.arange(32)
    tiles = ((cols >= lo[..., None]) & (cols < hi[..., None])).to(torch.int8)
    lows, highs = _intervals(tiles)
    assert torch.equal(((cols >= lows[..., None]) & (cols < highs[..., None])).to(torch.int8), tiles)
    assert not lows[hi <= lo].any() and not highs[hi <= lo].any()   # rows keeping nothing: (0, 0)
    tiles[7, 3] = ((cols < 5) | (cols >= 9)).to(torch.int8)   # one row keeping two runs
    assert _intervals(tiles) is None


def test_policy_routes_new_structures_through_the_tile_form(monkeypatch):
    from flexattn.kernels import make_plan, tiered
    from flexattn.kernels.source import step_kernels
    for name in ("_compiled", "_submitted"):
        monkeypatch.setattr(tiered, name, {})
    mask = lambda b, h, q, kv: (q >= kv) & ((q - kv) % 11 != 5)  # noqa: E731
    bm = flexattn.create_block_mask(mask, None, None, 256, 256)
    q = k = v = torch.randn(1, 2, 256, 64)

    class cuda:  # a CUDA query as route sees one: its device, shape and strides
        device, shape, stride = torch.device("cuda"), q.shape, q.stride
    plan = make_plan(q, k, v, score_graph=None, mask_graph=bm.mask_graph, block_mask=bm, scale=None,
                     kernel_options={})
    cls = tiered.shape_class(plan, cuda, k, v)

    def mark_compiled(p, kinds):
        for kind in kinds:
            tiered.mark_compiled([getattr(p.module(m), n) for m, n in step_kernels(kind)], cls)

    # nothing compiled: the mask's own kernels now, the tile form's to warm afterwards
    first = tiered.route(plan, ("fwd", "bwd"), bm, cuda, k, v)
    assert first.mask_graph is plan.mask_graph and first.tiering[1].mask_graph.buffers[1].dtype == torch.int8
    assert first.tiering[2] == cls
    # tile form compiled (forward and backward): a new structure runs through it
    mark_compiled(first.tiering[1], ("fwd", "bwd"))
    routed = tiered.route(plan, ("fwd", "bwd"), bm, cuda, k, v)
    assert routed.mask_graph.buffers[1].dtype == torch.int8 and routed.tiering[1] is plan
    # only its forward compiled: a call that needs gradients does not take the tile form
    monkeypatch.setattr(tiered, "_compiled", {})
    mark_compiled(first.tiering[1], ("fwd",))
    assert tiered.route(plan, ("fwd", "bwd"), bm, cuda, k, v).mask_graph is plan.mask_graph
    assert tiered.route(plan, ("fwd",), bm, cuda, k, v).tiering[1] is plan
    # the mask's own compiled: the plan itself, nothing more to do
    mark_compiled(plan, ("fwd",))
    assert tiered.route(plan, ("fwd",), bm, cuda, k, v) is plan
    # a call whose own forward is the Hopper forward: its tile form runs the Hopper forward too
    monkeypatch.setattr(tiered, "_compiled", {})
    hopper_kinds = ("fwd_hopper", "bwd")
    first = tiered.route(plan, hopper_kinds, bm, cuda, k, v)
    assert first.mask_graph is plan.mask_graph and first.tiering[0] == "tile_form"
    mark_compiled(first.tiering[1], ("fwd", "bwd"))   # the Triton forward's tile form is not the one it needs
    assert tiered.route(plan, hopper_kinds, bm, cuda, k, v).mask_graph is plan.mask_graph
    mark_compiled(first.tiering[1], ("fwd_hopper",))
    routed = tiered.route(plan, hopper_kinds, bm, cuda, k, v)
    assert routed.tiering == ("own", plan, cls) and routed.opts == plan.opts
    # the Hopper backward: the tile form is ready once its Triton dq kernel (which the Hopper kernel
    # needs first) and its Hopper kernel are; the Triton dk/dv kernel plays no part
    monkeypatch.setattr(tiered, "_compiled", {})
    both_hopper = ("fwd_hopper", "bwd_hopper")
    tile = tiered.route(plan, both_hopper, bm, cuda, k, v).tiering[1]
    mark_compiled(tile, ("fwd_hopper", "bwd"))
    assert tiered.route(plan, both_hopper, bm, cuda, k, v).mask_graph is plan.mask_graph
    tiered.mark_compiled([tile.module("bwd_hopper").flex_bwd_dkdv_hopper], cls)
    assert tiered.route(plan, both_hopper, bm, cuda, k, v).tiering == ("own", plan, cls)
    monkeypatch.setattr(tiered, "_compiled", {})
    mark_compiled(tile, ("fwd_hopper",))
    tiered.mark_compiled([tile.module("bwd").flex_bwd_dq, tile.module("bwd_hopper").flex_bwd_dkdv_hopper], cls)
    assert tiered.route(plan, both_hopper, bm, cuda, k, v).tiering == ("own", plan, cls)
    # CPU tensors, TIERED off, AUTOTUNE on: never tiered
    off = make_plan(q, k, v, score_graph=None, mask_graph=bm.mask_graph, block_mask=bm, scale=None,
                    kernel_options={"TIERED": False})
    assert tiered.route(off, ("bwd",), bm, cuda, k, v) is off
    assert tiered.route(plan, ("bwd",), bm, q, k, v) is plan  # CPU tensors
    with pytest.raises(ValueError, match="TIERED"):
        make_plan(q, k, v, score_graph=None, mask_graph=bm.mask_graph, block_mask=bm, scale=None,
                  kernel_options={"TIERED": 1})


def test_policy_counts_kernels_compiled_per_shape_class(monkeypatch):
    """A kernel compiled for one head dim (or dtype, or length class) is not compiled for another:
    there a new mask runs through the tile form if that is compiled for it, and a foreground launch
    counts its own kernels compiled for its class only."""
    from flexattn.kernels import make_plan, tiered
    from flexattn.kernels.source import step_kernels
    for name in ("_compiled", "_submitted"):
        monkeypatch.setattr(tiered, name, {})
    mask = lambda b, h, q, kv: (q >= kv) & ((q - kv) % 11 != 5)  # noqa: E731
    bm = flexattn.create_block_mask(mask, None, None, 256, 256)

    def call(E, L=256, dtype=torch.float32, block_mask=bm):
        """A plan, the CUDA query route would see, the key / value, and the call's shape class."""
        q = torch.randn(1, 2, L, E, dtype=dtype)

        class cuda:
            device, shape, stride = torch.device("cuda"), q.shape, q.stride
        plan = make_plan(q, q, q, score_graph=None, mask_graph=block_mask.mask_graph, block_mask=block_mask,
                         scale=None, kernel_options={})
        return plan, cuda, q, tiered.shape_class(plan, cuda, q, q)

    def kernels(p, kind="fwd"):
        return [getattr(p.module(m), n) for m, n in step_kernels(kind)]

    plan64, q64, t64, cls64 = call(64)
    plan128, q128, t128, cls128 = call(128)
    assert kernels(plan64) == kernels(plan128)   # one module for both head dims: one JIT kernel
    assert len({cls64, cls128, call(64, L=200)[3], call(64, dtype=torch.bfloat16)[3]}) == 4
    assert call(64)[3] == cls64   # another call of the same class

    # the mask's own kernels and the tile form's compiled at head dim 64 only
    tile = tiered.route(plan64, ("fwd",), bm, q64, t64, t64).tiering[1]
    tiered.mark_compiled(kernels(plan64) + kernels(tile), cls64)
    assert tiered.route(plan64, ("fwd",), bm, q64, t64, t64) is plan64
    # at 128 neither is: the own kernels now, the tile form warmed for 128 afterwards
    first = tiered.route(plan128, ("fwd",), bm, q128, t128, t128)
    assert first.tiering[0] == "tile_form" and first.tiering[2] == cls128
    # the foreground launch counts the own kernels compiled at 128 (the tile form's taken as sent already)
    tiered._submitted.update(((id(kn), cls128), kn) for kn in kernels(first.tiering[1]))
    tiered.after_launch(first, lambda p: "fwd", lambda p, kind: [])
    assert tiered.route(plan128, ("fwd",), bm, q128, t128, t128) is plan128
    # a new mask of the same form, never run: at 64 through the tile form; at 128 its own kernels
    # compile in the foreground until the tile form is compiled there too
    other_mask = lambda b, h, q, kv: (q >= kv) & ((q + kv) % 13 != 2)  # noqa: E731
    other = flexattn.create_block_mask(other_mask, None, None, 256, 256)
    new64, new128 = call(64, block_mask=other)[0], call(128, block_mask=other)[0]
    assert tiered.route(new64, ("fwd",), other, q64, t64, t64).tiering[0] == "own"
    assert tiered.route(new128, ("fwd",), other, q128, t128, t128).tiering[0] == "tile_form"
    tiered.mark_compiled(kernels(first.tiering[1]), cls128)
    assert tiered.route(new128, ("fwd",), other, q128, t128, t128).tiering[0] == "own"


_INTERPRET_CHECK = r'''
import torch, flexattn
from flexattn.mask_tiles import tile_table_form
from mods_zoo import make_mod
for name, (L, S) in [("document", (96, 160)), ("natten_2d", (64, 64)), ("rel_bias", (80, 48))]:
    m = make_mod(name, B=2, H=2, L=L, S=S, device="cpu", requires_grad=True)
    bm = flexattn.create_block_mask(m.mask_mod, 2, 2, L, S, BLOCK_SIZE=32)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 32, generator=g).to(torch.float16).requires_grad_() for n in (L, S, S))
    res = []
    for mask in (bm, tile_table_form(bm)):
        out = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=mask,
                                      kernel_options={"BACKEND": "triton"})
        res.append([out, *torch.autograd.grad(out, [q, k, v], torch.ones_like(out))])
    for a, b in zip(*res):
        assert torch.equal(a, b), name
# the decode kernel packs query heads into its rows: a mask reading h looks up a slot per row
def by_head(b, h, q, kv):
    return (kv <= q + 90) & ((kv + h) % 3 != 0)
bm = flexattn.create_block_mask(by_head, 1, 4, 3, 100, BLOCK_SIZE=32)
g = torch.Generator().manual_seed(2)
q = torch.randn(1, 4, 3, 32, generator=g)
k, v = (torch.randn(1, 2, 100, 32, generator=g) for _ in range(2))
outs = [flexattn.flex_attention(q, k, v, block_mask=mask, enable_gqa=True,
                                kernel_options={"BACKEND": "triton", "FORCE_DECODE": True})
        for mask in (bm, tile_table_form(bm))]
assert torch.equal(*outs), "decode"
# the same with a mask of one run a row (the interval form) that reads h
def window_by_head(b, h, q, kv):
    return (kv <= q + 90 - 7 * h) & (kv >= q + 20 - 3 * h)
bm = flexattn.create_block_mask(window_by_head, 1, 4, 3, 100, BLOCK_SIZE=32)
form = tile_table_form(bm)
assert len(form.mask_graph.buffers) == 3, "interval form"
q = torch.randn(1, 4, 3, 32, generator=g)
outs = [flexattn.flex_attention(q, k, v, block_mask=mask, enable_gqa=True,
                                kernel_options={"BACKEND": "triton", "FORCE_DECODE": True})
        for mask in (bm, form)]
assert torch.equal(*outs), "decode, interval form"
# a hand-written lookup of the same shape over 16-wide blocks, smaller than the kernels' 32-wide
# kv tiles: the per-score form (a kv tile spans two of its blocks)
slots = torch.arange(16, dtype=torch.int32).view(1, 1, 4, 4) % 5
tiles = (torch.rand(5, 16, 16, generator=g) < 0.5).to(torch.int8)
def lookup(b, h, q, kv):
    return tiles[slots[0, 0, q // 16, kv // 16], q % 16, kv % 16] != 0
bm = flexattn.create_block_mask(lookup, None, None, 64, 64, BLOCK_SIZE=32)
q, k, v = (torch.randn(1, 2, 64, 32, generator=g) for _ in range(3))
got = flexattn.flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "triton"})
want = flexattn.flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "cpu"})
assert (got - want).abs().max() < 1e-5, "hand-written lookup"
# a hand-written interval lookup whose slots need all 32 bits (the kernels read a slot as its
# two 16-bit halves): kernels against the CPU path, forward and backward
slots = torch.arange(16, dtype=torch.int32).view(1, 1, 4, 4) % 3 + 65536
lows = torch.zeros(65539, 32, dtype=torch.int32)
highs = torch.zeros(65539, 32, dtype=torch.int32)   # rows 0-65535 keep nothing: a wrong slot shows
lows[65536:] = torch.randint(0, 32, (3, 32), generator=g, dtype=torch.int32)
highs[65536:] = torch.randint(0, 33, (3, 32), generator=g, dtype=torch.int32)
def runs(b, h, q, kv):
    s, row, col = slots[0, 0, q // 32, kv // 32], q % 32, kv % 32
    return (col >= lows[s, row]) & (col < highs[s, row])
bm = flexattn.create_block_mask(runs, None, None, 128, 128, BLOCK_SIZE=32)
q, k, v = (torch.randn(1, 2, 128, 32, generator=g).requires_grad_() for _ in range(3))
res = []
for backend in ("triton", "cpu"):
    out = flexattn.flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": backend})
    res.append([out, *torch.autograd.grad(out, [q, k, v], torch.ones_like(out))])
for a, b in zip(*res):
    assert (a - b).abs().max() < 1e-4, "hand-written interval lookup"
print("OK")
'''


def test_tile_form_same_bits_interpreted_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def test_tile_form_rows_that_differ_only_in_b():
    """A mask that does not read b, under block lists that differ per batch row (a BlockMask
    built from blocks): every row's partial blocks find their tile."""
    causal = lambda b, h, q, kv: q >= kv  # noqa: E731
    full = flexattn.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=64)
    kv_num = full.kv_num_blocks.expand(2, 1, -1).clone()
    kv_idx = full.kv_indices.expand(2, 1, -1, -1).clone()
    # batch row 1 also treats block (3, 0) as partial (causal is true on all of it: the
    # kernels evaluate the mask there and get all true)
    kv_num[1, 0, 3] += 1
    kv_idx[1, 0, 3, :2] = torch.tensor([0, 3], dtype=kv_idx.dtype)
    bm = flexattn.BlockMask.from_kv_blocks(kv_num, kv_idx, mask_mod=causal, BLOCK_SIZE=64)
    form = tile_table_form(bm)
    slots, lows, highs = form.mask_graph.buffers
    s = slots[0, 0, 3, 0]
    assert slots.shape == (1, 1, 4, 4) and s > 0 and not lows[s].any() and (highs[s] == 64).all()
    assert torch.equal(form.to_dense(), bm.to_dense())
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 256, 16, generator=g) for _ in range(3))
    assert torch.equal(flexattn.flex_attention(q, k, v, block_mask=bm), flexattn.flex_attention(q, k, v, block_mask=form))


def test_policy_keeps_a_per_row_mask_under_a_broadcast_block_mask():
    from flexattn.kernels import make_plan, tiered
    head_band = lambda b, h, q, kv: (q - kv).abs() <= 16 * (h + 1)  # noqa: E731
    bm = flexattn.create_block_mask(head_band, None, None, 256, 256)  # H=None: one row for all heads
    q = torch.randn(1, 4, 256, 64)
    plan = make_plan(q, q, q, score_graph=None, mask_graph=bm.mask_graph, block_mask=bm, scale=None,
                     kernel_options={})

    class cuda:
        device, shape, stride = torch.device("cuda"), q.shape, q.stride
    assert tiered.route(plan, ("fwd",), bm, cuda, q, q) is plan
