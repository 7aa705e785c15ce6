"""The analysis is sound (FULL / EMPTY are never wrong) and precise where it should be
(linear forms are exact; causal / sliding-window / document decide all but boundary blocks)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from flexattn.analyse import EMPTY, FULL, UNDECIDED, BoxAnalyser, analyse_blocks
from flexattn.codegen import kernel_graph
from flexattn.evaluate import evaluate
from flexattn.ir import OPS
from flexattn.trace import trace_mask


def check_sound(fn, Q, KV, bs, B=1, H=1):
    """Every FULL / EMPTY decision agrees with the dense mask; returns the decisions."""
    g = trace_mask(fn)
    i32 = dict(dtype=torch.int32)
    q = torch.arange(Q, **i32)[:, None]
    kv = torch.arange(KV, **i32)[None, :]
    out = []
    for b in range(B):
        for h in range(H):
            dense = evaluate(g, b=torch.tensor(b, **i32), h=torch.tensor(h, **i32), q_idx=q, kv_idx=kv)
            dec = analyse_blocks(g, b, h, Q, KV, bs)
            for i in range(dec.shape[0]):
                for j in range(dec.shape[1]):
                    blk = dense[i * bs[0]:(i + 1) * bs[0], j * bs[1]:(j + 1) * bs[1]]
                    d = int(dec[i, j])
                    if d == FULL:
                        assert bool(blk.all()), f"block ({i}, {j}) decided FULL but has a False"
                    elif d == EMPTY:
                        assert not bool(blk.any()), f"block ({i}, {j}) decided EMPTY but has a True"
                    else:
                        assert d == UNDECIDED
            out.append(dec)
    return out


def n_undecided(dec):
    return int((dec == UNDECIDED).sum())


# ---- precision on the named masks -----------------------------------------------------------

def test_causal_only_diagonal_undecided():
    (dec,) = check_sound(lambda b, h, q, kv: q >= kv, 256, 256, (16, 16))
    assert n_undecided(dec) == 16 and int((dec == FULL).sum()) == 120


def test_linear_forms_are_exact():
    # q - (q - kv) == kv everywhere: intervals alone would lose this (dependency problem)
    (dec,) = check_sound(lambda b, h, q, kv: q - (q - kv) == kv, 64, 64, (16, 16))
    assert bool((dec == FULL).all())
    (dec,) = check_sound(lambda b, h, q, kv: (q - kv) * 2 + kv == q + q - kv, 64, 64, (16, 16))
    assert bool((dec == FULL).all())
    (dec,) = check_sound(lambda b, h, q, kv: ~(q - kv) == -(q - kv) - 1, 64, 64, (16, 16))
    assert bool((dec == FULL).all())


def test_sliding_window_decides_band_interior():
    (dec,) = check_sound(lambda b, h, q, kv: (q - kv).abs() <= 32, 256, 256, (16, 16))
    assert n_undecided(dec) == 2 * 14  # only the blocks the band edges cross
    (dec,) = check_sound(lambda b, h, q, kv: 32 > (q - kv).abs(), 256, 256, (16, 16))
    assert n_undecided(dec) <= 2 * 16


def test_document_mask_with_sparse_table():
    lens = torch.tensor([40, 24, 100, 92])
    doc = torch.repeat_interleave(torch.arange(4), lens)
    (dec,) = check_sound(lambda b, h, q, kv: doc[q] == doc[kv], 256, 256, (16, 16))
    # blocks inside one document are FULL, blocks of two different documents EMPTY
    assert n_undecided(dec) < 40 and int((dec == FULL).sum()) > 50


def test_buffer_indexed_by_point_and_range():
    table = torch.randint(0, 50, (3, 100), generator=torch.Generator().manual_seed(0))
    check_sound(lambda b, h, q, kv: table[h, q] <= table[h, kv] + 20, 100, 100, (8, 8), H=3)
    t3 = torch.randint(0, 9, (2, 10, 10), generator=torch.Generator().manual_seed(1))
    check_sound(lambda b, h, q, kv: t3[b, q % 10, kv % 10] > 4, 40, 40, (8, 8), B=2)


def test_out_of_range_reads_stay_undecided():
    short = torch.arange(10)
    g = trace_mask(lambda b, h, q, kv: short[q] >= 0)
    dec = analyse_blocks(g, 0, 0, 64, 64, (16, 16))
    # every q block reaches past index 9: evaluation must run (and raise its IndexError)
    assert bool((dec == UNDECIDED).all())


# ---- soundness over every op, including floats, NaN, overflow and unsigned ----------------

FLOAT_TABLE = torch.tensor([0.0, -1.5, float("nan"), 2.0, float("inf"), -3.0, 1e-3, 7.0])
# a row for every q_idx / kv_idx the tests evaluate (the random boxes reach 80; a read past
# the end at a kept position is an IndexError)
ROWS_Q = torch.randn(81, 6, generator=torch.Generator().manual_seed(4))
ROWS_KV = torch.randn(81, 6, generator=torch.Generator().manual_seed(5))
ROWS_INT = torch.randint(-5, 6, (7, 6), generator=torch.Generator().manual_seed(6), dtype=torch.int32)
CASES = {
    "exp_log": lambda b, h, q, kv: torch.log((q - kv).float().abs() + 1) < torch.exp((kv - q).float() / 50),
    "exp2_log2": lambda b, h, q, kv: torch.exp2((q - kv).float() / 8) > torch.log2(kv.float() + 1),
    "sqrt_rsqrt_neg_domain": lambda b, h, q, kv: torch.sqrt((q - kv).float()) > torch.rsqrt((kv - 30).float()),
    "log_of_negative_is_nan": lambda b, h, q, kv: torch.log((q - kv).float()) != torch.log((q - kv).float()),
    "trig": lambda b, h, q, kv: torch.sin(q.float() / 7) + torch.cos(kv.float() / 3) > 0.5,
    "tanh_sigmoid": lambda b, h, q, kv: torch.tanh((q - kv).float() / 10) < torch.sigmoid((kv - 20).float()) - 0.5,
    "floor_ceil_truediv": lambda b, h, q, kv: torch.floor(q / 3) == torch.ceil(kv / 3),
    "pow": lambda b, h, q, kv: ((q - kv) ** 2 <= 100) | ((q.float() + 1) ** 0.5 > kv.float() ** 0.5),
    "float_floordiv_mod": lambda b, h, q, kv: (q.float() // 2.5) % 3.0 < (kv.float() % 4.5),
    "int_floordiv_mod_negative": lambda b, h, q, kv: ((q - kv) // -3 + (q - 40) % -7) >= (kv - q) % 5 - 2,
    "min_max_clamp": lambda b, h, q, kv: torch.minimum(q, kv).clamp(5, 40) >= torch.maximum(q - 10, kv // 2),
    "where_nested": lambda b, h, q, kv: torch.where(q > kv, q - kv, torch.where(kv > 50, kv, q)) % 4 == 1,
    "bitwise_ints": lambda b, h, q, kv: ((q & kv) | (q ^ 7)) > (~kv & 15),
    "bool_ops": lambda b, h, q, kv: ((q > 10) ^ (kv < 30)) & ~(q == kv) | (q.bool() & kv.bool()),
    "casts_uint8_wrap": lambda b, h, q, kv: (q - kv).to(torch.uint8) > 200,
    "casts_int8_wrap": lambda b, h, q, kv: (q * 3).to(torch.int8) < 0,
    "int32_overflow": lambda b, h, q, kv: q * 2 ** 30 + kv > 0,
    "float_to_int_trunc": lambda b, h, q, kv: ((q - kv).float() / 7).to(torch.int32) == 0,
    "float16_rounding": lambda b, h, q, kv: (q.half() * 0.1).float() >= kv.half().float() * 0.1,
    "float_nan_table": lambda b, h, q, kv: FLOAT_TABLE[q % 8] > FLOAT_TABLE[kv % 8],
    "float_nan_ne": lambda b, h, q, kv: FLOAT_TABLE[(q // 8) % 8] != 0.0,
    "neg_abs_float": lambda b, h, q, kv: -(kv.float() - q.float()).abs() > -5.5,
    "const_mask": lambda b, h, q, kv: torch.ones_like(q, dtype=torch.bool),
    "big_consts": lambda b, h, q, kv: q + 2 ** 40 > kv,
    # shifts: by constants (affine for <<), of negative values (arithmetic >>), by amounts
    # that leave [0, bits) (0 for <<, the sign fill for >>), wrapping, unsigned, by ranges
    "shift_const": lambda b, h, q, kv: ((q >> 3) == (kv >> 3)) & ((q << 2) - (kv << 2) <= 40),
    "shift_negative": lambda b, h, q, kv: ((q - kv) >> 2) >= -3,
    "shift_out_of_range": lambda b, h, q, kv: (((q - 30) >> 40) == -1) | (((kv + 1) << 33) != 0) | ((q >> -1) < 0),
    "shift_wraps": lambda b, h, q, kv: (q << 26) > (kv << 26),
    "shift_uint8": lambda b, h, q, kv: ((q.to(torch.uint8) >> 9) == 0) & ((kv.to(torch.uint8) << 3) > 100),
    "shift_by_index": lambda b, h, q, kv: ((q >> (kv % 5)) > 3) | ((kv << (q % 40 - 4)) > 50),
    "morton": lambda b, h, q, kv: ((q >> 3) - (kv >> 3)).abs() + ((q & 7) - (kv & 7)).abs() <= 3,
    "erf_log1p": lambda b, h, q, kv: torch.erf((q - kv).float() / 9) > torch.log1p((kv - 40).float() / 10) - 0.5,
    "expm1_trunc_round": lambda b, h, q, kv: (torch.expm1((q - kv).float() / 20) > 0.3)
    | (torch.trunc((q - kv).float() / 3.5) == torch.round((kv - q).float() / 2.5)),
    "sign": lambda b, h, q, kv: (torch.sign(kv - 30) * torch.sign(q - 20) > 0) ^ (torch.sign(FLOAT_TABLE[q % 8]) >= 0),
    "fmod": lambda b, h, q, kv: (torch.fmod(q - kv, 5) == -2) | (torch.fmod((q - 30).float(), 4.5) > 2.0),
    "atan2": lambda b, h, q, kv: torch.atan2((q - 30).float(), (kv - 20).float()) > 1.0,
    "isnan_isinf": lambda b, h, q, kv: (~torch.isnan(FLOAT_TABLE[q % 8]) & (torch.isinf(FLOAT_TABLE[kv % 8]) | (q > kv)))
    | torch.isnan(q) | torch.isinf(kv),
    # rows of captured tensors reduced (MLA's RoPE term in a mask), float and integer rows
    "row_dot": lambda b, h, q, kv: (torch.dot(ROWS_Q[q], ROWS_KV[kv]) > 0.5) | (q >= kv),
    "row_sum_bounded": lambda b, h, q, kv: ((ROWS_Q[q] * ROWS_KV[kv]).sum(-1) > -1000.0) & (q >= kv),
    "row_int_sum": lambda b, h, q, kv: (ROWS_INT[q % 7] * (ROWS_INT[kv % 7] > 0)).sum(-1) + q - kv >= 0,
    "row_nan": lambda b, h, q, kv: (ROWS_Q[q] * FLOAT_TABLE[kv % 8]).sum(-1) < 1.0,
}


def test_row_sums_are_bounded_by_the_rows_range():
    """A rowsum lies in R times its row's bounds: a comparison with a far-off constant is
    decided as if it were not there (the causal blocks come out as for causal alone)."""
    rows = check_sound(CASES["row_sum_bounded"], 67, 59, (8, 4))[0]
    causal = check_sound(lambda b, h, q, kv: q >= kv, 67, 59, (8, 4))[0]
    assert torch.equal(rows, causal)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sound_on_every_op(name):
    check_sound(CASES[name], 67, 59, (8, 4))


def test_cases_cover_every_op():
    used = set()
    for fn in CASES.values():
        used |= {n.op for n in trace_mask(fn).live_nodes()}
        used |= {n.op for n in kernel_graph(trace_mask(fn)).live_nodes()}  # params
    assert used >= set(OPS) - {"input"} - {"buffer"} | {"load"}, set(OPS) - used


@pytest.mark.parametrize("name", sorted(CASES))
def test_params_bound_like_the_consts_they_replace(name):
    """A mod with its constants lifted into params (what the kernels compile) evaluates
    and analyses exactly like the traced one."""
    g = trace_mask(CASES[name])
    lifted = kernel_graph(g)
    Q, KV, bs = 67, 59, (8, 4)
    i32 = dict(dtype=torch.int32)
    idx = dict(b=torch.tensor(0, **i32), h=torch.tensor(0, **i32),
               q_idx=torch.arange(Q, **i32)[:, None], kv_idx=torch.arange(KV, **i32)[None, :])
    assert torch.equal(evaluate(lifted, **idx), evaluate(g, **idx))
    assert torch.equal(analyse_blocks(lifted, 0, 0, Q, KV, bs), analyse_blocks(g, 0, 0, Q, KV, bs))


# ---- random boxes (not block-aligned) ------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(sorted(CASES)), q0=st.integers(0, 60), ql=st.integers(0, 20),
       k0=st.integers(0, 50), kl=st.integers(0, 20))
def test_random_boxes_sound(name, q0, ql, k0, kl):
    Q, KV = 81, 71
    q1, k1 = min(Q - 1, q0 + ql), min(KV - 1, k0 + kl)
    g = trace_mask(CASES[name])
    A = BoxAnalyser(g, Q, KV)
    d = int(A.decide(0, 0, torch.tensor([[q0]]), torch.tensor([[q1]]), torch.tensor([[k0]]), torch.tensor([[k1]]))
            .reshape(-1)[0])
    i32 = dict(dtype=torch.int32)
    dense = evaluate(g, b=torch.tensor(0, **i32), h=torch.tensor(0, **i32),
                     q_idx=torch.arange(q0, q1 + 1, **i32)[:, None], kv_idx=torch.arange(k0, k1 + 1, **i32)[None, :])
    if d == FULL:
        assert bool(dense.all())
    if d == EMPTY:
        assert not bool(dense.any())
