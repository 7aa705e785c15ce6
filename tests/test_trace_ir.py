"""Tracer and IR: every supported op traces and evaluates equal to the eager function;
the printed IR; the verifier; every TraceError / arity error path and its message."""
import math

import pytest
import torch
import torch.nn.functional as F

from flexattn.codegen import kernel_graph
from flexattn.evaluate import evaluate
from flexattn.ir import Graph, IRError, Node, OPS
from flexattn.trace import TraceError, check_buffers_device, trace_mask, trace_score

B, H, Q, KV = 2, 3, 9, 11
i32 = dict(dtype=torch.int32)
b = torch.arange(B, **i32)[:, None, None, None]
h = torch.arange(H, **i32)[None, :, None, None]
q = torch.arange(Q, **i32)[None, None, :, None]
kv = torch.arange(KV, **i32)[None, None, None, :]
score = torch.linspace(-3, 3, B * H * Q * KV).reshape(B, H, Q, KV).float()

table = torch.randn(H, Q + KV, generator=torch.Generator().manual_seed(0))
doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
offsets = torch.tensor([0, 3, 5, 9])
slopes = torch.tensor([0.5, 0.25, 0.125])

SCORE_MODS = {
    "add_sub_mul_div": lambda s, b, h, q, kv: (s + q) * 2 - kv / 3 + b - h,
    "floordiv_mod": lambda s, b, h, q, kv: s + (q // 3).float() + (kv % 4).float() + (q - kv) // 2 - (q - kv) % 3,
    "pow_neg_abs": lambda s, b, h, q, kv: -(s ** 2) + (q - kv).abs() + abs(q - 5),
    "where_min_max_clamp": lambda s, b, h, q, kv: torch.where(q >= kv, s, torch.minimum(s, torch.maximum(s * 0.5, -s)))
    + torch.clamp(s, -1.0, 1.0) + s.clamp(min=0.0),
    "transcendental": lambda s, b, h, q, kv: torch.exp(s / 4) + torch.exp2(s / 4) + torch.log(s.abs() + 1)
    + torch.log2(s.abs() + 1) + torch.sqrt(s.abs()) + torch.rsqrt(s.abs() + 1) + torch.tanh(s) + torch.sigmoid(s)
    + torch.sin(s) + torch.cos(s) + torch.floor(s) + s.ceil(),
    "casts": lambda s, b, h, q, kv: s + q.to(torch.float32) + kv.float() + (s * 3).int().float() + s.to(torch.float64).float(),
    "alibi": lambda s, b, h, q, kv: s + torch.exp2(-(h + 1).float()) * (kv - q).float(),
    "softcap": lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0),
    "rel_bias_table": lambda s, b, h, q, kv: s + table[h, q - kv + KV - 1],
    "per_head_scale": lambda s, b, h, q, kv: s * slopes[h],
    "nested": lambda s, b, h, q, kv: s + offsets[doc[q]].float() - offsets[doc[kv]].float(),
    "python_consts": lambda s, b, h, q, kv: s * math.pi + 3 - 0.5,
    "erf_log1p_relu": lambda s, b, h, q, kv: torch.erf(s) + s.erf() + torch.special.erf(s / 2)
    + torch.log1p(s.abs()) + s.log1p() + F.relu(s) + torch.relu(s - 1) + s.relu() + (q - 4).relu(),
    "shift_indices": lambda s, b, h, q, kv: s + ((q >> 1) - (kv << 2) + (1 << h) + (q - kv).bitwise_right_shift(1)
                                                 + torch.bitwise_left_shift(kv, 1)).float(),
    "to_device_dtype_other": lambda s, b, h, q, kv: s.to(s.device) + q.to(s) + kv.to(s.device, torch.float64)
    + (q - kv).to(dtype=torch.float16, non_blocking=True) + q.type_as(s),
    "rounding_sign_expm1": lambda s, b, h, q, kv: torch.expm1(s) + s.expm1() + torch.special.expm1(s / 8)
    + torch.sign(s) + s.sgn() + torch.sign(q - kv) + torch.trunc(s * 1.7) + s.fix() + torch.round(s * 2.5)
    + s.round(decimals=1) + torch.round(s * 300, decimals=-2) + s.frac() + torch.round(q - kv),
    "fmod_atan2": lambda s, b, h, q, kv: torch.fmod(s, 0.7) + s.fmod(-1.1) + torch.fmod(q - kv, 3)
    + torch.fmod(kv, q + 1).float() + torch.atan2(s, (q - kv).float()) + s.arctan2(s - 1) + torch.atan2(q, kv)
    + torch.remainder(s, 0.9) + (q - kv).remainder(-4),
    "nan_inf_tests": lambda s, b, h, q, kv: torch.where(torch.isnan(s / s) | s.isinf() | torch.isinf(q), 1.0, s)
    + torch.isfinite(1 / (q - kv)).float() + (1 / (s * 0)).isposinf().float() - torch.isneginf(1 / (s * 0)).float()
    + torch.isnan(kv).float(),
}

MASK_MODS = {
    "causal": lambda b, h, q, kv: q >= kv,
    "compare_all": lambda b, h, q, kv: (q < kv + 3) & (q <= kv + 5) & (q > kv - 4) & (q != kv + 1) | (q == 0),
    "bool_ops": lambda b, h, q, kv: ~(q < kv) ^ (kv > 3) | (b == 1),
    "int_bitwise": lambda b, h, q, kv: ((q & 3) | (kv ^ 5)) > 2,
    "doc": lambda b, h, q, kv: (doc[q] == doc[kv]) & (q - offsets[doc[q]] >= kv - offsets[doc[kv]]),
    "natten": lambda b, h, q, kv: ((q // 3 - kv // 3).abs() <= 1) & ((q % 3 - kv % 3).abs() <= 1),
    "logical": lambda b, h, q, kv: torch.logical_and(q >= kv, torch.logical_not(kv > 4)) | torch.logical_or(b > 0, h > 1),
    "const_true": lambda b, h, q, kv: torch.ones_like(q, dtype=torch.bool),
    # torch's and_masks / or_masks start from these
    "new_ones_zeros": lambda b, h, q, kv: (b.new_ones((), dtype=torch.bool) & (q >= kv))
    | q.new_zeros((), dtype=torch.bool) | (kv.new_full((), 3) == kv) | (q.new_tensor(2) == q)
    | (q.new_ones(()) + kv.new_zeros([]) == q),
    "morton": lambda b, h, q, kv: ((q >> 2) - (kv >> 2)).abs() + (((q & 3) << 1) - ((kv & 3) << 1)).abs() <= 4,
    "shift_negative_and_wide": lambda b, h, q, kv: (((q - 5) >> 1) == ((kv - 5) >> 1))
    | (((q - kv) >> (kv % 40)) == -1) | ((kv << (q % 40)) == 0) | ((q.long() << 40) > 2 ** 45),
}


def _eager(fn, *args):
    return fn(*args)


@pytest.mark.parametrize("name", sorted(SCORE_MODS))
def test_score_mods_trace_and_evaluate_like_eager(name):
    fn = SCORE_MODS[name]
    g = trace_score(fn)
    got = evaluate(g, score=score, b=b, h=h, q_idx=q, kv_idx=kv)
    want = fn(score, b, h, q, kv)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want.expand_as(got), rtol=0, atol=0, equal_nan=True)


# torch fuses these (one kernel per activation); the IR spells them with erf, tanh, exp,
# log1p and sigmoid nodes, by torch's own formulas. In float64 they agree to rounding; in
# float32, to a few ulp of the result.
ACTIVATIONS = {
    "gelu": lambda s: F.gelu(s),
    "gelu_tanh": lambda s: F.gelu(s, approximate="tanh"),
    "silu": lambda s: F.silu(s),
    "softplus": lambda s: F.softplus(s),
    "softplus_beta_threshold": lambda s: F.softplus(s, beta=2.0, threshold=3.0),
    "softplus_large": lambda s: F.softplus(s * 30),
    "sigmoid": lambda s: torch.sigmoid(s) + F.sigmoid(s) + s.sigmoid(),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_trace_and_evaluate_like_eager(name):
    f = ACTIVATIONS[name]
    g = trace_score(lambda s, b, h, q, kv: f(s))
    x = torch.cat([torch.linspace(-12, 12, 2001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -90.0])])
    zero = torch.tensor(0, dtype=torch.int32)
    run = lambda s: evaluate(g, score=s, b=zero, h=zero, q_idx=zero, kv_idx=zero)  # noqa: E731
    gold = f(x.double())
    got64 = run(x.double())
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, gold, rtol=1e-14, atol=1e-15)
    # float32: the numerics rule against torch's own float32 kernel
    got32, ref32 = run(x), f(x)
    assert got32.dtype == ref32.dtype == torch.float32
    err, ref_err = (got32.double() - gold).abs().max(), (ref32.double() - gold).abs().max()
    assert err <= 2 * ref_err + 1e-7, (err, ref_err)


def test_activation_errors_are_trace_errors():
    with pytest.raises(TraceError, match="gelu with approximate='fast'"):
        trace_score(lambda s, b, h, q, kv: F.gelu(s, approximate="fast"))
    with pytest.raises(TraceError, match="softplus with a beta of type Proxy"):
        trace_score(lambda s, b, h, q, kv: F.softplus(s, beta=s))
    with pytest.raises(TraceError, match=r"rshift is not defined for dtypes float32, int64"):
        trace_score(lambda s, b, h, q, kv: s >> 1)


@pytest.mark.parametrize("expr, what", [
    (lambda b, h, q, kv: q @ kv, r"the operator @ \(matrix product\)"),
    (lambda b, h, q, kv: kv.__rmatmul__(q), r"the operator @ \(matrix product\)"),
    (lambda b, h, q, kv: divmod(q, 3)[0] > 0, r"the operator divmod\(\)"),
    (lambda b, h, q, kv: round(q) > 0, r"the operator round\(\)"),
    (lambda b, h, q, kv: math.trunc(q) > 0, r"the operator math.trunc\(\)"),
    (lambda b, h, q, kv: q.new_ones((2,)) > 0, r"(?s)new_ones\(\) of shape \(2,\).*x.new_ones\(\(\)\)"),
    (lambda b, h, q, kv: q.to([1]) > 0, r"\.to\(\) with an argument of type list"),
    (lambda b, h, q, kv: q.new_empty(()) > 0, r"\.new_empty\(\) is not supported"),
])
def test_unsupported_operators_are_trace_errors(expr, what):
    """Never a raw TypeError: the operator is named, with the line."""
    with pytest.raises(TraceError, match=what) as e:
        trace_mask(expr)
    assert "test_trace_ir.py" in str(e.value)


def test_math_floor_ceil_on_traced_values():
    fn = lambda s, b, h, q, kv: s + math.floor(s / 3) + math.ceil(s * 2) + math.floor(q).float()  # noqa: E731
    g = trace_score(fn)
    got = evaluate(g, score=score, b=b, h=h, q_idx=q, kv_idx=kv)
    want = score + torch.floor(score / 3) + torch.ceil(score * 2) + q.float()
    torch.testing.assert_close(got, want.expand_as(got), rtol=0, atol=0)


def test_scalar_constructors_and_device_moves_in_the_ir():
    g = trace_mask(lambda b, h, q, kv: b.new_ones((), dtype=torch.bool) & (q >= kv).to(q.device))
    text = str(g)
    assert "True & " in text and "cast" not in text  # a bool constant, no cast, no device op
    g = trace_score(lambda s, b, h, q, kv: s + q.new_full((), 2.5))  # q's dtype: int32, truncated
    assert "2.5.to(torch.int32)" in str(g)
    torch.testing.assert_close(evaluate(g, score=score, b=b, h=h, q_idx=q, kv_idx=kv), (score + 2).expand(B, H, Q, KV))
    g = trace_score(lambda s, b, h, q, kv: s + q.new_tensor(2.5, dtype=torch.float64))
    assert evaluate(g, score=score, b=b, h=h, q_idx=q, kv_idx=kv).dtype == torch.float64


@pytest.mark.parametrize("name", sorted(MASK_MODS))
def test_mask_mods_trace_and_evaluate_like_eager(name):
    fn = MASK_MODS[name]
    g = trace_mask(fn)
    got = evaluate(g, b=b, h=h, q_idx=q, kv_idx=kv)
    want = fn(b, h, q, kv).expand(B, H, Q, KV)
    assert got.dtype == torch.bool
    assert torch.equal(got, want)


def test_every_ir_op_is_covered_by_the_mods():
    used = set()
    for fn in list(SCORE_MODS.values()) + list(ROW_MODS.values()):
        used |= {n.op for n in trace_score(fn).live_nodes()}
        used |= {n.op for n in kernel_graph(trace_score(fn)).live_nodes()}  # consts lifted into params
    for fn in MASK_MODS.values():
        used |= {n.op for n in trace_mask(fn).live_nodes()}
    assert used == set(OPS), f"ops never exercised: {set(OPS) - used}"


def test_printed_ir_is_readable():
    g = trace_mask(MASK_MODS["doc"])
    text = str(g)
    assert text.startswith("def mask_mod(b, h, q_idx, kv_idx):")
    assert "buf0: captured int64 tensor of shape (12,)" in text
    assert "buf0[q_idx]" in text and "return" in text.splitlines()[-1]
    assert "q_idx >= kv_idx" in str(trace_mask(MASK_MODS["causal"]))
    # structure key: values never enter, shapes never enter
    g2 = trace_mask(lambda b, h, q, kv: (doc * 2)[q] == (doc * 2)[kv])
    assert "tensor of shape" not in g.structure_key()
    assert g.structure_key() != g2.structure_key()  # different structure


def test_graph_uses():
    g = trace_mask(MASK_MODS["causal"])
    assert g.uses("q_idx") and g.uses("kv_idx") and not g.uses("b") and not g.uses("h")
    assert trace_mask(MASK_MODS["bool_ops"]).uses("b")


# ---- verifier ---------------------------------------------------------------------------

def _graph_with(op, args, dtype, kind="mask"):
    g = Graph(kind, "hand_built")
    qn, kn = g.input("q_idx"), g.input("kv_idx")
    n = Node(op, args(g, qn, kn), dtype, "bad")
    g.nodes.append(n)
    g.output = n
    return g


@pytest.mark.parametrize("case, match", [
    (lambda: _graph_with("frobnicate", lambda g, a, b: (a, b), torch.bool), "unknown op"),
    (lambda: _graph_with("lt", lambda g, a, b: (a,), torch.bool), "takes 2 arguments"),
    (lambda: _graph_with("lt", lambda g, a, b: (a, b), torch.int32), "should have dtype"),
    (lambda: _graph_with("lt", lambda g, a, b: (a, 3), torch.bool), "is not a node"),
    (lambda: _graph_with("add", lambda g, a, b: (a, b), torch.int32), "must return bool"),
    (lambda: _graph_with("where", lambda g, a, b: (a, a, b), torch.int32), "condition must be bool"),
])
def test_verifier_failures(case, match):
    with pytest.raises(IRError, match=match):
        case().verify()


def test_verifier_undefined_argument_and_load_arity():
    g = Graph("mask", "x")
    qn = g.input("q_idx")
    ghost = Node("neg", (qn,), torch.int32, "ghost")  # never added to the graph
    n = Node("lt", (ghost, qn), torch.bool, "n")
    g.nodes.append(n)
    g.output = n
    with pytest.raises(IRError, match="not defined before use"):
        g.verify()
    g = Graph("mask", "x")
    qn = g.input("q_idx")
    buf = g.buffer(torch.zeros(3, 4, dtype=torch.bool))
    n = Node("load", (buf, qn), torch.bool, "n")
    g.nodes.append(n)
    g.output = n
    with pytest.raises(IRError, match="takes 2 indices"):
        g.verify()


# ---- trace errors -----------------------------------------------------------------------

def test_python_if_on_proxy():
    def bad(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return q_idx > 0
        return kv_idx > 0
    with pytest.raises(TraceError) as e:
        trace_mask(bad)
    msg = str(e.value)
    assert "'bad'" in msg and "Python control flow" in msg and "torch.where" in msg
    assert "if q_idx > kv_idx" in msg  # the source line


def test_python_and_or_bool_on_proxy():
    with pytest.raises(TraceError, match="control flow"):
        trace_mask(lambda b, h, q, kv: (q > 0) and (kv > 0))
    with pytest.raises(TraceError, match="control flow"):
        trace_mask(lambda b, h, q, kv: bool(q > kv))
    with pytest.raises(TraceError, match="Python number"):
        trace_mask(lambda b, h, q, kv: int(q) > 3)


def test_unsupported_torch_function_is_named():
    with pytest.raises(TraceError, match=r"torch\.lgamma is not supported"):
        trace_score(lambda s, b, h, q, kv: torch.lgamma(s))
    with pytest.raises(TraceError, match=r"\.cumsum\(\) is not supported"):
        trace_score(lambda s, b, h, q, kv: s.cumsum(0))


rows = torch.randn(2, 4, 9, 8)


@pytest.mark.parametrize("mod", [
    lambda s, b, h, q, kv: s + (rows[b, h, q] * rows[b, h // 2, kv]).sum(-1),
    lambda s, b, h, q, kv: s + torch.dot(rows[b, h, q], rows[b, h // 2, kv]),
    lambda s, b, h, q, kv: s + torch.sum(rows[b, h, q] * rows[b, h // 2, kv], -1),
    lambda s, b, h, q, kv: s + rows[b, h, q] @ rows[b, h // 2, kv],
    lambda s, b, h, q, kv: s + rows[b, h, q].dot(rows[b, h // 2, kv]),
    lambda s, b, h, q, kv: s + torch.inner(rows[b, h, q], rows[b, h // 2, kv]),
    lambda s, b, h, q, kv: s + (rows[b, h, q] * rows[b, h // 2, kv]).sum(dim=-1),
    lambda s, b, h, q, kv: s + (rows[b, h, q] * rows[b, h // 2, kv]).sum(),
])
def test_row_reductions_trace_to_one_rowsum(mod):
    """MLA's RoPE score_mod, as its authors spell it: two rows of captured tensors (the
    last dimension left open), their product summed - one graph whatever the spelling."""
    g = trace_score(mod)
    text = str(g)
    assert "float32[:] = buf0[b, h, q_idx, :]" in text and "float32[:] = buf0[b, floordiv" in text
    assert ".sum(-1)" in text and [n.op for n in g.live_nodes()].count("rowsum") == 1
    bq, hq = torch.arange(2, **i32)[:, None, None, None], torch.arange(4, **i32)[None, :, None, None]
    qq, kq = torch.arange(9, **i32)[None, None, :, None], torch.arange(9, **i32)[None, None, None, :]
    sc = torch.randn(2, 4, 9, 9)
    want = sc + (rows[bq, hq, qq] * rows[bq, hq // 2, kq]).sum(-1)
    torch.testing.assert_close(evaluate(g, score=sc, b=bq, h=hq, q_idx=qq, kv_idx=kq), want)


rows_q = torch.randn(B, H, Q, 5, generator=torch.Generator().manual_seed(1))
rows_kv = torch.randn(B, 2, KV, 5, generator=torch.Generator().manual_seed(2))
rows_i = torch.randint(-3, 4, (H, 5), generator=torch.Generator().manual_seed(3), dtype=torch.int32)

# Rows combined elementwise and summed. Evaluation sums a product of two row loads as a
# matrix product (another summation order than the eager `(a * b).sum(-1)`), and other
# rows in chunks: equal to float32 rounding; integer rows exactly.
ROW_MODS = {
    "dot_gqa": lambda s, b, h, q, kv: s + (rows_q[b, h, q] * rows_kv[b, h // 2, kv]).sum(-1) * 0.5,
    "elementwise_rows": lambda s, b, h, q, kv: s + torch.sum(torch.tanh(rows_q[b, h, q]) * rows_kv[b, 0, kv]
                                                             - rows_kv[b, 1, kv].abs() / 3, dim=-1),
    "mean_where": lambda s, b, h, q, kv: s + torch.where(rows_q[b, h, q] > 0, rows_q[b, h, q], 0.0).mean(-1)
    + rows_kv[b, h // 2, kv].mean(dim=-1),
    "int_rows": lambda s, b, h, q, kv: s + (rows_i[h] * rows_i[(q + kv) % H]).sum(-1) + (rows_i[h] > 0).sum(-1),
    "row_then_element": lambda s, b, h, q, kv: s + rows_q[b, h, q][2] * (rows_q[b, h, q]).sum(-1),
}


@pytest.mark.parametrize("name", sorted(ROW_MODS))
def test_row_mods_trace_and_evaluate_like_eager(name):
    fn = ROW_MODS[name]
    g = trace_score(fn)
    got = evaluate(g, score=score, b=b, h=h, q_idx=q, kv_idx=kv)
    if name == "row_then_element":  # eager indexing of a broadcast row by one more index differs
        want = score + rows_q[b, h, q][..., 2] * rows_q[b, h, q].sum(-1)
    else:
        want = fn(score, b, h, q, kv)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want.expand_as(got), rtol=2e-6, atol=2e-6)


def test_rows_mixed_with_scalars_evaluate_like_torch():
    """A scalar operand of a row op is the same for every element of the row (eager torch
    needs the trailing dimension spelled out)."""
    def mod(s, b, h, q, kv):
        return s + (rows_q[b, h, q] * s + h - rows_kv[b, h // 2, kv] * slopes[h]).sum(-1)
    g = trace_score(mod)
    got = evaluate(g, score=score, b=b, h=h, q_idx=q, kv_idx=kv)
    want = score + (rows_q[b, h, q] * score[..., None] + h[..., None]
                    - rows_kv[b, h // 2, kv] * slopes[h][..., None]).sum(-1)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    assert evaluate(g, score=score, b=b, h=h, q_idx=q, kv_idx=kv, where=None).shape == (B, H, Q, KV)


@pytest.mark.parametrize("mod, message", [
    (lambda s, b, h, q, kv: s + (rows_q[b, h, q] * rows_i[h, :3]).sum(-1), "slicing a captured tensor"),
    (lambda s, b, h, q, kv: s + (rows_q[b, h, q] * table[h]).sum(-1), r"mul of rows of different lengths \[5, 20\]"),
    (lambda s, b, h, q, kv: s + rows_q[b, h, q], r"returns a row of length 5"),
    (lambda s, b, h, q, kv: s + rows_q[b, h, q].sum(-1, keepdim=True), r"sum\(keepdim=True\)"),
    (lambda s, b, h, q, kv: s + rows_q[b, h, q].sum(1), r"sum over dim=1 of a row"),
    (lambda s, b, h, q, kv: s + torch.dot(rows_q[b, h, q], s), r"torch.dot of a row and a scalar"),
    (lambda s, b, h, q, kv: s + rows_i[h].mean(-1), r"mean of a int32 row"),
    (lambda s, b, h, q, kv: s + table[h, rows_i[h]].sum(), r"indexed in dimension 1 by a row"),
    (lambda s, b, h, q, kv: s + (rows_q[b, h, q] * 2)[0], r"indexing a traced value"),
    (lambda s, b, h, q, kv: s + (rows_q[b] * rows_q[b]).sum(-1), r"indexed in 1 of its 4 dimensions is computed"),
    (lambda s, b, h, q, kv: s + rows_q[b, h, q].max(), r"\.max\(\) is not supported"),
])
def test_row_errors_name_the_op_line_and_fix(mod, message):
    with pytest.raises(TraceError, match=message) as e:
        trace_score(mod)
    assert "test_trace_ir.py" in str(e.value) and "fix:" in str(e.value)


def test_captured_tensor_on_wrong_device():
    g = trace_mask(MASK_MODS["doc"])
    with pytest.raises(TraceError) as e:
        check_buffers_device(g, torch.device("meta"), "mask_mod")
    assert "captures a tensor of shape (12,) on cpu" in str(e.value) and ".to('meta')" in str(e.value)


def test_non_integer_index():
    with pytest.raises(TraceError, match="indexed in dimension 0 by a float32 value"):
        trace_score(lambda s, b, h, q, kv: s + slopes[q / 2])
    with pytest.raises(TraceError, match="index True in dimension 1 of a captured tensor is not an integer"):
        trace_score(lambda s, b, h, q, kv: s + table[h, True])
    with pytest.raises(TraceError, match="slicing a captured tensor"):
        trace_score(lambda s, b, h, q, kv: s + table[:, q])
    with pytest.raises(TraceError, match="used without indexing"):
        trace_score(lambda s, b, h, q, kv: s + slopes)


def test_arity_errors_and_kind_mixups():
    with pytest.raises(TypeError, match=r"mask_mod must take 4 arguments.*takes 3"):
        trace_mask(lambda b, q, kv: q > kv)
    with pytest.raises(TypeError, match="looks like a score_mod"):
        trace_mask(lambda s, b, h, q, kv: s)
    with pytest.raises(TypeError, match="returns a float"):
        trace_mask(lambda b, h, q, kv: (q - kv).float())
    with pytest.raises(TypeError, match="returns a bool"):
        trace_score(lambda s, b, h, q, kv: q > kv)
    with pytest.raises(TypeError, match="must be a callable"):
        trace_mask(3)


def test_every_interpreter_covers_the_op_set():
    """Each interpreter handles every IR op or lists it as unsupported (tinygrad's GroupOp
    style: the op groups of flexattn.ir are the single list)."""
    from flexattn import analyse, autodiff, codegen, ir

    assert set(analyse._HANDLED) == set(ir.OPS)
    handled = set(autodiff.RULES) | autodiff.NOT_DIFFERENTIABLE | ir.LEAF_OPS | {"load", "vload"}
    assert handled == set(ir.OPS) and not set(autodiff.RULES) & autodiff.NOT_DIFFERENTIABLE
    assert ir.LEAF_OPS | codegen.PRINTED | set(codegen.UNSUPPORTED) == set(ir.OPS)
    assert not codegen.PRINTED & ir.LEAF_OPS
    # evaluate: leaves, cast and loads by hand, everything else through ir.TORCH_IMPL
    assert set(ir.TORCH_IMPL) | ir.LEAF_OPS | {"cast", "load", "vload"} == set(ir.OPS)
