"""The per-call overhead machinery is correct: the trace cache, the infer_dtype memo, the
cached full BlockMask and graph memos.

No timing here (timing lives in benchmarks/). A cache hit is recognised by the graph
sharing node objects with the earlier trace (`g1.output is g2.output`): a re-trace builds
new nodes. Results are checked against the eager reference (which calls the mod itself,
never the trace), so a stale cached graph shows up as a wrong answer.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import flexattn.front as front_module
import flexattn.trace_cache as trace_module
from flexattn import create_block_mask, flex_attention
from flexattn.full_mask import build_full_block_mask, full_block_mask
from flexattn.masks import and_masks, or_masks
from flexattn.ir import Graph, IRError, infer_dtype
from flexattn.reference import reference_attention
from flexattn.trace import TraceError, clear_trace_cache, set_trace_cache_enabled, trace_mask, trace_score

B, H, S, E = 1, 2, 24, 8


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_trace_cache()
    previous = set_trace_cache_enabled(True)
    yield
    set_trace_cache_enabled(previous)
    clear_trace_cache()


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, E, generator=g, dtype=torch.float64) for _ in range(3)]


def check(score_mod=None, mask_mod=None):
    """flex_attention (CPU path) equals the eager reference for the mods as they are now."""
    q, k, v = qkv()
    bm = create_block_mask(mask_mod, None, None, S, S, BLOCK_SIZE=(8, 8)) if mask_mod is not None else None
    out = flex_attention(q, k, v, score_mod, bm)
    ref, _ = reference_attention(q, k, v, score_mod, mask_mod)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    return out


def same_trace(g1: Graph, g2: Graph) -> bool:
    return g1.output is g2.output


# ---- captured tensors ---------------------------------------------------------------------

def test_new_values_in_captured_tensor_keep_the_graph_and_are_used():
    bias = torch.randn(S, dtype=torch.float64)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    g1 = trace_score(score_mod)
    out1 = check(score_mod)
    bias.mul_(-3).add_(1)  # new values, same tensor
    g2 = trace_score(score_mod)
    assert same_trace(g1, g2) and g2.buffers[0] is bias
    out2 = check(score_mod)
    assert not torch.allclose(out1, out2)


def test_rebinding_a_captured_tensor_variable_retraces_with_the_new_buffer():
    bias = torch.randn(S, dtype=torch.float64)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    g1 = trace_score(score_mod)
    out1 = check(score_mod)
    old = bias
    bias = torch.randn(S, dtype=torch.float64)  # rebinds the closure cell
    g2 = trace_score(score_mod)
    assert g2.buffers[0] is bias and g1.buffers[0] is old
    out2 = check(score_mod)
    assert not torch.allclose(out1, out2)
    bias = bias.to(torch.float32)  # a new dtype: a new graph with a float32 buffer
    assert trace_score(score_mod).buffers[0].dtype == torch.float32
    check(score_mod)


def test_captured_tensor_shape_is_part_of_the_key():
    t = torch.zeros(S, dtype=torch.float64)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + t[kv_idx] + t.shape[0]  # the shape is read at trace time

    g1 = trace_score(score_mod)
    t.resize_(S + 1).zero_()
    g2 = trace_score(score_mod)
    assert not same_trace(g1, g2)
    check(score_mod)


def test_changing_a_captured_python_number_retraces():
    scale = 0.5

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * scale

    g1 = trace_score(score_mod)
    out1 = check(score_mod)
    assert same_trace(g1, trace_score(score_mod))
    scale = 2.0
    g2 = trace_score(score_mod)
    assert not same_trace(g1, g2)
    out2 = check(score_mod)
    assert not torch.allclose(out1, out2)
    scale = 2  # same value, another type: int promotes differently from float
    assert not same_trace(g2, trace_score(score_mod))
    scale = 0.5  # back to the first state: a hit again
    assert same_trace(g1, trace_score(score_mod))


GLOBAL_OFFSET = 1.0
GLOBAL_TABLE = torch.randn(S, dtype=torch.float64)


def global_score_mod(score, b, h, q_idx, kv_idx):
    return score + GLOBAL_OFFSET * GLOBAL_TABLE[q_idx]


def test_globals_the_mod_reads_are_part_of_the_key():
    global GLOBAL_OFFSET, GLOBAL_TABLE
    g1 = trace_score(global_score_mod)
    check(global_score_mod)
    saved = GLOBAL_OFFSET, GLOBAL_TABLE
    try:
        GLOBAL_OFFSET = -4.0
        g2 = trace_score(global_score_mod)
        assert not same_trace(g1, g2)
        check(global_score_mod)
        GLOBAL_TABLE = torch.randn(S, dtype=torch.float64)
        g3 = trace_score(global_score_mod)
        assert g3.buffers[0] is GLOBAL_TABLE
        check(global_score_mod)
        GLOBAL_TABLE.add_(5)  # values only: a hit
        assert same_trace(g3, trace_score(global_score_mod))
        check(global_score_mod)
    finally:
        GLOBAL_OFFSET, GLOBAL_TABLE = saved


def test_defaults_are_part_of_the_key():
    def score_mod(score, b, h, q_idx, kv_idx, w=1.0):
        return score * w

    g1 = trace_score(score_mod)
    score_mod.__defaults__ = (3.0,)
    assert not same_trace(g1, trace_score(score_mod))
    check(score_mod)


def test_helper_functions_are_walked():
    cfg = {"slope": 0.25}

    def dist(q_idx, kv_idx):
        return (q_idx - kv_idx).abs() * cfg["slope"]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - dist(q_idx, kv_idx)

    g1 = trace_score(score_mod)
    check(score_mod)
    cfg["slope"] = 1.5  # mutated inside a dict the helper reads
    assert not same_trace(g1, trace_score(score_mod))
    check(score_mod)


# ---- fresh function objects, combinators ----------------------------------------------------

def test_a_fresh_lambda_with_the_same_captures_hits_and_other_captures_miss():
    table = torch.randn(S, dtype=torch.float64)

    def make(c):
        return lambda score, b, h, q_idx, kv_idx: score + c * table[kv_idx]

    g1 = trace_score(make(0.5))
    assert same_trace(g1, trace_score(make(0.5)))  # new function object, same code and captures
    g2 = trace_score(make(1.5))
    assert not same_trace(g1, g2)
    check(make(1.5))
    # lambdas with different code never share a trace
    g3 = trace_score(lambda score, b, h, q_idx, kv_idx: score + 0.5 * table[q_idx])
    assert not same_trace(g1, g3)


def test_and_or_masks_closures():
    doc = torch.tensor([0] * 10 + [1] * 14)
    window = 6

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def near(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < window

    m1 = and_masks(causal, same_doc)
    g1 = trace_mask(m1)
    check(mask_mod=m1)
    assert same_trace(g1, trace_mask(and_masks(causal, same_doc)))  # a new closure, same parts
    assert not same_trace(g1, trace_mask(or_masks(causal, same_doc)))
    assert not same_trace(g1, trace_mask(and_masks(same_doc, causal)))
    doc = torch.tensor([0] * 5 + [1] * 19)  # rebinds a cell of a function inside the closure
    g2 = trace_mask(m1)
    assert g2.buffers[0] is doc
    check(mask_mod=m1)
    m2 = and_masks(causal, near)
    g3 = trace_mask(m2)
    window = 2
    assert not same_trace(g3, trace_mask(m2))
    check(mask_mod=m2)


def test_mask_and_score_of_one_function_are_separate_entries():
    def mod(*args):
        return args[-2] >= args[-1]

    assert trace_mask(mod).kind == "mask"
    with pytest.raises(TypeError, match="returns a bool"):
        trace_score(mod)


# ---- objects ----------------------------------------------------------------------------------

class Biased(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.randn(S, dtype=torch.float64))
        self.scale = 1.0

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score * self.scale + self.bias[kv_idx]

    def __call__(self, score, b, h, q_idx, kv_idx):  # also usable as a callable instance
        return self.score_mod(score, b, h, q_idx, kv_idx)


def test_bound_methods_and_callable_objects_see_attribute_changes():
    m = Biased()
    for mod in (m.score_mod, m):
        g1 = trace_score(mod)
        check(mod)
        assert same_trace(g1, trace_score(mod))
        m.scale = 3.0
        assert not same_trace(g1, trace_score(mod))
        check(mod)
        m.bias = torch.randn(S, dtype=torch.float64)  # a new registered buffer
        assert trace_score(mod).buffers[0] is m.bias
        check(mod)
        m.scale = 1.0


class WithProperty:
    def __init__(self):
        self._w = 1.0

    @property
    def w(self):
        return self._w

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score * self.w


def test_objects_with_properties_are_never_cached():
    obj = WithProperty()
    g1 = trace_score(obj)
    obj._w = 2.0
    assert not same_trace(g1, trace_score(obj))
    check(obj)


# ---- what must not be cached -----------------------------------------------------------------

def test_tensors_computed_while_tracing_are_not_frozen():
    doc = torch.tensor([0] * 12 + [1] * 12)

    def mask_mod(b, h, q_idx, kv_idx):
        d = doc * 2  # a new tensor every trace: caching would freeze doc's values
        return d[q_idx] == d[kv_idx]

    check(mask_mod=mask_mod)
    doc[:] = torch.tensor([0] * 3 + [1] * 21)
    g = trace_mask(mask_mod)
    assert not same_trace(g, trace_mask(mask_mod))
    check(mask_mod=mask_mod)


def test_values_read_while_tracing_are_not_frozen():
    cap = torch.tensor(2.0, dtype=torch.float64)

    def score_mod(score, b, h, q_idx, kv_idx):
        c = cap.item()  # a Python number read from the tensor at trace time
        return score * c

    out1 = check(score_mod)
    cap.fill_(-1.0)
    out2 = check(score_mod)
    assert not torch.allclose(out1, out2)


def test_cache_holds_no_strong_reference_to_captured_tensors():
    def make():
        big = torch.randn(S, dtype=torch.float64)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + big[q_idx]
        return score_mod, weakref.ref(big)

    mod, ref = make()
    trace_score(mod)
    trace_score(mod)
    assert len(trace_module._TRACE_CACHE) == 1
    del mod
    gc.collect()
    assert ref() is None


def test_errors_are_not_cached_and_disabled_cache_traces_every_time():
    flag = True

    def mask_mod(b, h, q_idx, kv_idx):
        if flag:
            return q_idx >= kv_idx
        return q_idx > kv_idx if False else torch.sin(q_idx)  # a float: not a mask

    trace_mask(mask_mod)
    flag = False
    with pytest.raises(TypeError, match="returns a float"):
        trace_mask(mask_mod)
    with pytest.raises(TypeError, match="returns a float"):
        trace_mask(mask_mod)
    with pytest.raises(TraceError):
        trace_mask(lambda b, h, q, kv: q if q > kv else kv)
    set_trace_cache_enabled(False)
    flag = True
    g1, g2 = trace_mask(mask_mod), trace_mask(mask_mod)
    assert not same_trace(g1, g2)


def test_cached_copies_are_independent():
    t = torch.randn(S, dtype=torch.float64)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + t[q_idx]

    g1, g2 = trace_score(score_mod), trace_score(score_mod)
    assert g1 is not g2 and same_trace(g1, g2)
    key = g2.structure_key()
    g1.output = g1.op("mul", g1.output, g1.const(2.0))
    assert g1.structure_key() != key and "mul" in str(g1) and "mul" not in str(g2)
    assert g2.structure_key() == key == trace_score(score_mod).structure_key()
    assert len(g1.live_nodes()) == len(g2.live_nodes()) + 2


# ---- flex_attention --------------------------------------------------------------------------

def test_flex_attention_reuses_the_block_masks_graph(monkeypatch):
    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    q, k, v = qkv()
    bm = create_block_mask(mask_mod, None, None, S, S, BLOCK_SIZE=(8, 8))
    calls = []
    monkeypatch.setattr(front_module, "trace_mask", lambda *a: calls.append(a))
    out = flex_attention(q, k, v, block_mask=bm)
    assert calls == []
    torch.testing.assert_close(out, reference_attention(q, k, v, None, mask_mod)[0])


def test_full_block_mask_is_cached_and_correct():
    for L, Skv in ((S, S), (130, 129), (1, 200)):
        a = full_block_mask(L, Skv, torch.device("cpu"))
        assert full_block_mask(L, Skv, torch.device("cpu")) is a
        dense = a.to_dense()
        fresh = build_full_block_mask(L, Skv, torch.device("cpu")).to_dense()
        assert torch.equal(dense, fresh)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 130, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 129, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for _ in range(2):
        torch.testing.assert_close(flex_attention(q, k, v), reference_attention(q, k, v)[0])


# ---- infer_dtype memo --------------------------------------------------------------------------

def test_infer_dtype_memo_keeps_value_dependent_errors():
    g = Graph("mask", "x")
    q = g.input("q_idx")
    small, huge = g.const(3), g.const(2 ** 40)
    assert infer_dtype("add", (q, small)) == torch.int32
    assert infer_dtype("add", (q, small)) == torch.int32

    def uncached(a, b):
        d = [torch.ones(1, dtype=a.dtype), b.args[0]]
        return (d[0] + d[1]).dtype

    try:
        expected = uncached(q, huge)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            infer_dtype("add", (q, huge))
    else:
        assert infer_dtype("add", (q, huge)) == expected
    neg = g.const(-1)
    with pytest.raises(RuntimeError):
        infer_dtype("pow", (q, neg))
    with pytest.raises(RuntimeError):
        infer_dtype("pow", (q, neg))
    assert infer_dtype("pow", (q, g.const(2))) == torch.int32
    assert infer_dtype("truediv", (q, small)) == torch.float32
    assert infer_dtype("mul", (small, g.const(0.5))) == torch.float32


def test_verifier_still_checks_dtypes_with_the_memo():
    g = Graph("mask", "x")
    q, kv = g.input("q_idx"), g.input("kv_idx")
    infer_dtype("lt", (q, kv))  # warm the memo
    from flexattn.ir import Node
    n = Node("lt", (q, kv), torch.int32, "bad")
    g.nodes.append(n)
    g.output = n
    with pytest.raises(IRError, match="should have dtype"):
        g.verify()
