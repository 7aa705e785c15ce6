"""create_block_mask is exact: equal to evaluating the mask densely and reducing per block.

Also: the BCSR invariants (ascending valid indices, q_* the transpose of kv_*, full and
partial disjoint and covering the non-empty blocks), BlockMask methods, torch agreement,
bad-input errors, and hypothesis properties over random mask expressions.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from flexattn.block_mask import BlockMask
from flexattn.build_mask import create_block_mask, create_mask
from flexattn.masks import and_masks, noop_mask, or_masks
from flexattn.trace import TraceError

EMPTY, PARTIAL, FULL = 0, 1, 2


def dense_states(mask_mod, B, H, Q, KV, qb, kvb):
    """Reference: int8 [B, H, nQ, nKV] from the dense mask (padding counts False)."""
    m = create_mask(mask_mod, B, H, Q, KV)
    nq, nkv = -(-Q // qb), -(-KV // kvb)
    pad = torch.zeros(m.shape[0], m.shape[1], nq * qb, nkv * kvb, dtype=torch.bool)
    pad[..., :Q, :KV] = m
    s = pad.view(m.shape[0], m.shape[1], nq, qb, nkv, kvb).sum((3, 5))
    return torch.where(s == qb * kvb, FULL, torch.where(s > 0, PARTIAL, EMPTY)).to(torch.int8)


def check_invariants(bm: BlockMask):
    """Valid indices ascending and in range; q_* is the transpose of kv_*; full and partial
    disjoint; every row a permutation (the documented fill)."""
    def rows(num, idx):
        sel = torch.zeros(*idx.shape[:-1], idx.shape[-1], dtype=torch.bool)
        for pos in torch.nonzero(torch.ones(num.shape, dtype=torch.bool)).tolist():
            n = int(num[tuple(pos)])
            r = idx[tuple(pos)]
            assert sorted(r.tolist()) == list(range(idx.shape[-1])), "row is not a permutation"
            v = r[:n]
            assert torch.all(v[1:] > v[:-1]), "valid indices not ascending"
            sel[tuple(pos)][v.long()] = True
        return sel
    assert bm.kv_indices.dtype == torch.int32 and bm.kv_num_blocks.dtype == torch.int32
    p = rows(bm.kv_num_blocks, bm.kv_indices)
    f = rows(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (p & f).any(), "a block is both full and partial"
    assert torch.equal(rows(bm.q_num_blocks, bm.q_indices), p.transpose(-2, -1))
    assert torch.equal(rows(bm.full_q_num_blocks, bm.full_q_indices), f.transpose(-2, -1))


def assert_exact(mask_mod, B, H, Q, KV, bs=16, invariants=True):
    bm = create_block_mask(mask_mod, B, H, Q, KV, BLOCK_SIZE=bs)
    ref = dense_states(mask_mod, B or 1, H or 1, Q, KV, *bm.BLOCK_SIZE)
    got = bm.block_states()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.equal(got, ref), f"blocks differ at {torch.nonzero(got != ref)[:5].tolist()}"
    if invariants:
        check_invariants(bm)
    return bm


# ---- the named masks ---------------------------------------------------------------------

def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 20


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 23) | (q_idx >= kv_idx)


_lens = torch.tensor([17, 40, 5, 31, 60, 47])
DOC = torch.repeat_interleave(torch.arange(len(_lens)), _lens)          # 200 positions
OFFSETS = torch.cumsum(_lens, 0) - _lens


def document(b, h, q_idx, kv_idx):
    same = DOC[q_idx] == DOC[kv_idx]
    return same & (q_idx - OFFSETS[DOC[q_idx]] >= kv_idx - OFFSETS[DOC[kv_idx]])


def dilated(b, h, q_idx, kv_idx):
    d = q_idx - kv_idx
    return (d.abs() <= 40) & (d % 3 == 0)


def natten(b, h, q_idx, kv_idx):
    W = 13
    qr, qc, kr, kc = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
    return ((qr - kr).abs() <= 2) & ((qc - kc).abs() <= 2)


HEAD_WIN = torch.tensor([3, 10, 50])


def per_head(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx).abs() <= HEAD_WIN[h]) | (kv_idx == b)


NAMED = {
    "causal": causal, "sliding_window": sliding_window, "prefix_lm": prefix_lm, "document": document,
    "dilated": dilated, "natten": natten, "per_head": per_head,
    "and_masks": and_masks(causal, sliding_window), "or_masks": or_masks(dilated, prefix_lm),
    "nested": and_masks(or_masks(causal, natten), document), "noop": noop_mask,
}


@pytest.mark.parametrize("Q, KV, bs", [(128, 128, 16), (200, 173, 16), (129, 200, (32, 8)), (1, 17, 16), (17, 1, 8)])
@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_masks_exact(name, Q, KV, bs):
    uses_bh = name in ("per_head",)
    assert_exact(NAMED[name], 2 if uses_bh else None, 3 if uses_bh else None, Q, KV, bs, invariants=Q < 150)


def test_broadcast_b_h_when_unused():
    bm = create_block_mask(causal, 2, 3, 100, 100, BLOCK_SIZE=16)
    assert bm.kv_num_blocks.shape == (2, 3, 7) and bm.q_indices.shape == (2, 3, 7, 7)
    assert torch.equal(bm.block_states(), dense_states(causal, 2, 3, 100, 100, 16, 16))
    bm1 = create_block_mask(causal, None, None, 100, 100, BLOCK_SIZE=16)
    assert bm1.shape == (1, 1, 100, 100)


def test_lengths_and_edges():
    # an edge block with padding is never full, even where the mask is all true
    bm = create_block_mask(noop_mask, None, None, 20, 20, BLOCK_SIZE=16)
    assert bm.block_states()[0, 0].tolist() == [[FULL, PARTIAL], [PARTIAL, PARTIAL]]


def test_large_is_cheap_and_matches_structure():
    # 64K causal at block 128: 512 x 512 blocks; exact structure known in closed form
    N = 1 << 16
    bm = create_block_mask(causal, None, None, N, N)
    n = N // 128
    assert torch.equal(bm.kv_num_blocks[0, 0], torch.ones(n, dtype=torch.int32))
    assert torch.equal(bm.full_kv_num_blocks[0, 0], torch.arange(n, dtype=torch.int32))
    assert torch.equal(bm.kv_indices[0, 0, :, 0], torch.arange(n, dtype=torch.int32))


# ---- BlockMask methods ------------------------------------------------------------------

def test_to_dense_round_trip_and_from_kv_blocks():
    bm = create_block_mask(per_head, 2, 3, 100, 90, BLOCK_SIZE=16)
    dense = bm.to_dense()
    ref = dense_states(per_head, 2, 3, 100, 90, 16, 16)
    assert torch.equal(dense, (ref > 0).to(torch.int32))
    bm2 = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                   BLOCK_SIZE=16, mask_mod=per_head, seq_lengths=(100, 90))
    for a in BlockMask._TENSOR_ATTRS:
        assert torch.equal(getattr(bm, a), getattr(bm2, a)), a
    bm3 = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices)  # no full blocks, no mod
    assert bm3.full_kv_num_blocks is None and bm3.mask_graph is None and bm3.seq_lengths == (7 * 128, 6 * 128)
    assert torch.equal(bm3.q_num_blocks, bm.q_num_blocks)


def test_shape_numel_sparsity_repr_string():
    bm = create_block_mask(causal, 2, 2, 64, 64, BLOCK_SIZE=16)
    assert bm.shape == (2, 2, 64, 64) and bm.numel() == 2 * 2 * 64 * 64
    assert math.isclose(bm.sparsity(), 100 * 6 / 16)
    assert "kv_num_blocks=(2, 2, 4)" in repr(bm) and "mask_mod=causal" in repr(bm)
    s = bm.to_string(limit=1)
    lines = s.splitlines()
    assert lines[0] == "(0, 0)" and lines[1] == "░░      " and lines[2] == "██░░    "
    assert "to_string(limit=N)" in s
    big = create_block_mask(causal, None, None, 4096, 4096, BLOCK_SIZE=16)  # 256 x 256: sub-sampled
    rows = big.to_string(grid_size=(20, 20)).splitlines()[1:]
    assert len(rows) <= 20 and len(rows[0]) <= 40
    assert "BlockMask(shape=(2, 2, 64, 64)" in str(bm)


def test_to_device_and_as_tuple():
    bm = create_block_mask(causal, None, None, 64, 64, BLOCK_SIZE=16)
    bm2 = bm.to("cpu")
    assert bm2.device == torch.device("cpu") and bm2.mask_graph is bm.mask_graph
    t = bm.as_tuple()
    assert t[:2] == (64, 64) and t[-3:-1] == (16, 16) and t[-1] is causal and len(t) == 13


def test_getitem():
    bm = create_block_mask(per_head, 2, 3, 64, 64, BLOCK_SIZE=16)
    s = bm[1]
    assert s.kv_num_blocks.shape == (1, 3, 4)
    assert torch.equal(s.kv_indices[0], bm.kv_indices[1])
    assert torch.equal(bm[:, 2].kv_num_blocks[:, 0], bm.kv_num_blocks[:, 2])
    assert bm[1, 2, 1:3].kv_num_blocks.shape == (1, 1, 2)
    with pytest.raises(RuntimeError, match="sliced"):
        s.mask_mod(0, 0, 0, 0)  # per_head reads b and h: its meaning changed
    c = create_block_mask(causal, 2, 3, 64, 64, BLOCK_SIZE=16)
    assert c[1].mask_mod is causal  # causal ignores b: still valid


@pytest.mark.parametrize("new", [(64, 64), (50, 64), (64, 37), (33, 17), (1, 1), (48, 32)])
def test_crop_is_exact(new):
    bm = create_block_mask(document, None, None, 64, 64, BLOCK_SIZE=16)
    cropped = bm.crop(*new)
    assert cropped.seq_lengths == new
    assert torch.equal(cropped.block_states(), dense_states(document, 1, 1, *new, 16, 16))
    assert torch.equal(bm._adjust(*new).kv_indices, cropped.kv_indices)
    with pytest.raises(ValueError, match="crop can only shorten"):
        bm.crop(65, 10)


# ---- errors ---------------------------------------------------------------------------------

def test_bad_inputs():
    with pytest.raises(ValueError, match="BLOCK_SIZE must be"):
        create_block_mask(causal, 1, 1, 64, 64, BLOCK_SIZE=0)
    with pytest.raises(ValueError, match="BLOCK_SIZE must be"):
        create_block_mask(causal, 1, 1, 64, 64, BLOCK_SIZE=(16, 16, 16))
    with pytest.raises(ValueError, match="Q_LEN must be a positive int, got 0"):
        create_block_mask(causal, 1, 1, 0, 64)
    with pytest.raises(ValueError, match="B must be a positive int or None"):
        create_block_mask(causal, -1, 1, 64, 64)
    with pytest.raises(TypeError, match="mask_mod must take 4 arguments"):
        create_block_mask(lambda q, kv: q > kv, 1, 1, 64, 64)
    with pytest.raises(TypeError, match="looks like a score_mod"):
        create_block_mask(lambda s, b, h, q, kv: s, 1, 1, 64, 64)
    with pytest.raises(TypeError, match="returns a float"):
        create_block_mask(lambda b, h, q, kv: (q - kv).float(), 1, 1, 64, 64)
    with pytest.raises(TraceError, match="on cpu, but the attention runs on meta"):
        create_block_mask(document, 1, 1, 64, 64, device="meta")
    with pytest.raises(TypeError, match="and_masks argument 1"):
        and_masks(causal, lambda q: q)


def test_out_of_bounds_capture_raises_clearly():
    short = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(IndexError, match="outside"):
        create_block_mask(lambda b, h, q, kv: short[q] == short[kv], None, None, 64, 64, BLOCK_SIZE=16)


# ---- agreement with torch's own create_block_mask ------------------------------------------

@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "natten", "per_head"])
def test_matches_torch(name):
    tfa = pytest.importorskip("torch.nn.attention.flex_attention")
    mod = NAMED[name]
    B, H = (2, 3) if name == "per_head" else (1, 1)
    for Q, KV, bs in [(200, 200, 16), (173, 129, 32)]:
        ours = create_block_mask(mod, B, H, Q, KV, BLOCK_SIZE=bs)
        theirs = tfa.create_block_mask(mod, B, H, Q, KV, device="cpu", BLOCK_SIZE=bs)
        for num, idx in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                         ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")]:
            a, b = getattr(ours, num), getattr(theirs, num)
            assert torch.equal(a, b.to(a.dtype)), (name, num)
            ia, ib = getattr(ours, idx), getattr(theirs, idx)
            valid = torch.arange(ia.shape[-1]) < a.unsqueeze(-1)
            assert torch.equal(ia[valid], ib.to(ia.dtype)[valid]), (name, idx)


# ---- hypothesis: random mask expressions -------------------------------------------------

TABLE = torch.randint(-5, 40, (37,), generator=torch.Generator().manual_seed(1))


def _int_expr(depth):
    leaves = st.one_of(st.sampled_from(["q", "kv", "b", "h"]), st.integers(-6, 40).map(lambda c: ("c", c)))
    if depth == 0:
        return leaves
    sub = _int_expr(depth - 1)
    return st.one_of(
        leaves,
        st.tuples(st.sampled_from(["add", "sub", "min", "max"]), sub, sub),
        st.tuples(st.just("mul"), sub, st.integers(-3, 3).map(lambda c: ("c", c))),
        st.tuples(st.sampled_from(["floordiv", "mod"]), sub, st.integers(1, 9).map(lambda c: ("c", c))),
        st.tuples(st.sampled_from(["abs", "neg", "table"]), sub),
        st.tuples(st.just("where"), _bool_expr(depth - 1), sub, sub),
    )


def _bool_expr(depth):
    cmp = st.tuples(st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"]), _int_expr(max(depth - 1, 0)),
                    _int_expr(max(depth - 1, 0)))
    fcmp = st.tuples(st.just("fcmp"), st.sampled_from(["sigmoid", "tanh", "exp2", "sqrt"]), _int_expr(0),
                     st.floats(-2, 3, allow_nan=False).map(lambda x: round(x, 2)))
    if depth == 0:
        return cmp
    sub = _bool_expr(depth - 1)
    return st.one_of(cmp, fcmp, st.tuples(st.sampled_from(["and", "or", "xor"]), sub, sub),
                     st.tuples(st.just("not"), sub))


def build(e, env):
    if isinstance(e, str):
        return env[e]
    op = e[0]
    if op == "c":
        return e[1]
    a = [build(x, env) if isinstance(x, tuple) or (isinstance(x, str) and x in env) else x for x in e[1:]]
    F = {
        "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
        "min": lambda x, y: torch.minimum(_t(x, env), _t(y, env)), "max": lambda x, y: torch.maximum(_t(x, env), _t(y, env)),
        "floordiv": lambda x, y: x // y, "mod": lambda x, y: x % y,
        "abs": lambda x: abs(x), "neg": lambda x: -x, "table": lambda x: TABLE[_t(x, env) % TABLE.numel()],
        "where": lambda c, x, y: torch.where(c, _t(x, env), _t(y, env)),
        "lt": lambda x, y: _t(x, env) < y, "le": lambda x, y: _t(x, env) <= y, "gt": lambda x, y: _t(x, env) > y,
        "ge": lambda x, y: _t(x, env) >= y, "eq": lambda x, y: _t(x, env) == y, "ne": lambda x, y: _t(x, env) != y,
        "and": lambda x, y: x & y, "or": lambda x, y: x | y, "xor": lambda x, y: x ^ y, "not": lambda x: ~x,
        "fcmp": lambda f, x, c: getattr(torch, f)(_t(x, env).float() / 8) > c,
    }
    return F[op](*a)


def _t(x, env):
    # Python ints become tensors of the inputs' dtype (torch.where / minimum need a tensor)
    return x if not isinstance(x, int) else torch.full_like(env["q"], x)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(expr=_bool_expr(3), Q=st.integers(1, 70), KV=st.integers(1, 70), qb=st.sampled_from([4, 8, 16]),
       kvb=st.sampled_from([4, 8, 16]), B=st.sampled_from([None, 2]), H=st.sampled_from([None, 2]))
def test_random_mask_expressions_exact(expr, Q, KV, qb, kvb, B, H):
    def mod(b, h, q_idx, kv_idx):
        return build(expr, {"q": q_idx, "kv": kv_idx, "b": b, "h": h})
    try:
        create_mask(mod, B, H, Q, KV)
    except (RuntimeError, TypeError, TraceError):
        return  # e.g. an expression torch itself rejects
    assert_exact(mod, B, H, Q, KV, (qb, kvb))


def test_viz_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from flexattn.viz import save_mask_png, save_scores_png
    bm = create_block_mask(document, None, None, 200, 200, BLOCK_SIZE=16)
    for p in [save_mask_png(bm, str(tmp_path / "m.png")),
              save_mask_png(causal, str(tmp_path / "e.png"), Q_LEN=64, KV_LEN=64, element_level=True),
              save_scores_png(torch.randn(1, 2, 40, 8), torch.randn(1, 1, 30, 8), str(tmp_path / "s.png"), h=1,
                              score_mod=lambda s, b, h, q, kv: s - (q - kv).abs() * 0.1,
                              block_mask=create_block_mask(causal, None, None, 40, 30, BLOCK_SIZE=16))]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="needs Q_LEN and KV_LEN"):
        save_mask_png(causal, str(tmp_path / "x.png"))


def test_docstring_loop_rebuilds_the_dense_mask():
    import itertools
    B, H, Q, KV, bs = 2, 3, 50, 45, 16
    bm = create_block_mask(per_head, B, H, Q, KV, BLOCK_SIZE=bs)
    kv_indices, kv_num_blocks = bm.kv_indices, bm.kv_num_blocks
    full_kv_indices, full_kv_num_blocks, mask_mod = bm.full_kv_indices, bm.full_kv_num_blocks, bm.mask_mod
    nQ = kv_indices.shape[-2]
    rows = lambda i: torch.arange(i * bs, min((i + 1) * bs, Q))  # noqa: E731
    cols = lambda j: torch.arange(j * bs, min((j + 1) * bs, KV))  # noqa: E731
    dense = torch.zeros(B, H, Q, KV, dtype=torch.bool)
    # -- the loop of BlockMask's docstring, verbatim --
    for b, h, i in itertools.product(range(B), range(H), range(nQ)):
        q = rows(i)[:, None]
        for j in kv_indices[b, h, i, :kv_num_blocks[b, h, i]]:           # partial: evaluate
            dense[b, h, q, cols(j)] = mask_mod(b, h, q, cols(j))
        dense[b, h, q, [c for j in full_kv_indices[b, h, i, :full_kv_num_blocks[b, h, i]] for c in cols(j)]] = True
    assert torch.equal(dense, create_mask(per_head, B, H, Q, KV))
