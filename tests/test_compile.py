"""flex_attention inside torch.compile(fullgraph=True) on CPU tensors (flexattn.compiled):
the graph holds the custom op, forward and backward match eager bit for bit, guards reuse
the graph for a new BlockMask of the same structure and retrace for a new score_mod."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flexattn

H, L, E = 2, 64, 32


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, L, E, generator=g, requires_grad=True) for _ in range(3)]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(w):
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= w)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_matches_eager_forward_and_backward(backend):
    slopes = torch.linspace(0.1, 1.0, H).requires_grad_()

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    bm = flexattn.create_block_mask(causal, None, None, L, L, BLOCK_SIZE=32)

    def f(q, k, v, bm):
        return flexattn.flex_attention(q, k, v, score_mod=alibi, block_mask=bm)

    q, k, v = _qkv()
    eager = f(q, k, v, bm)
    want = torch.autograd.grad(eager.sum(), [q, k, v, slopes])
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(f, fullgraph=True, backend=counter)(q, k, v, bm)
    got = torch.autograd.grad(compiled.sum(), [q, k, v, slopes])
    assert torch.equal(compiled, eager)
    for name, a, b in zip(["dq", "dk", "dv", "dslopes"], got, want):
        assert torch.equal(a, b), name
    assert counter.frame_count == 1
    ops = [str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("flexattn.fwd" in o for o in ops), ops


def test_compiled_backward_records_no_autograd_graph(monkeypatch):
    """A compiled graph's backward calls the CPU backward with grad mode on and inputs that
    require grad; its arithmetic must record nothing (recorded, the worker threads' in-place
    writes into the shared dq raced on autograd metadata and failed now and then)."""
    from flexattn import cpu
    slopes = torch.linspace(0.1, 1.0, H).requires_grad_()

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    results = []
    backward = cpu._backward

    def recorded(*args, **kwargs):
        got = backward(*args, **kwargs)
        results.append(got)
        return got

    monkeypatch.setattr(cpu, "_backward", recorded)
    bm = flexattn.create_block_mask(causal, None, None, L, L, BLOCK_SIZE=32)
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: flexattn.flex_attention(q, k, v, score_mod=alibi, block_mask=bm),
                      fullgraph=True, backend="aot_eager")
    torch.autograd.grad(f(q, k, v).sum(), [q, k, v, slopes])
    assert len(results) == 1
    dq, dk, dv, dbufs = results[0]
    for name, g in [("dq", dq), ("dk", dk), ("dv", dv)] + [(f"dbuf{i}", g) for i, g in enumerate(dbufs)]:
        assert not g.requires_grad and g.grad_fn is None, name


def test_new_block_mask_of_same_structure_reuses_the_graph():
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda q, k, v, bm: flexattn.flex_attention(q, k, v, block_mask=bm), fullgraph=True,
                      backend=counter)
    q, k, v = _qkv()
    for n_docs in (2, 4):  # a new document layout: new captured tensor, same mask structure
        doc = torch.arange(L) * n_docs // L

        def document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        bm = flexattn.create_block_mask(document, None, None, L, L, BLOCK_SIZE=16)
        assert torch.equal(f(q, k, v, bm), flexattn.flex_attention(q, k, v, block_mask=bm))
    assert counter.frame_count == 1
    # another structure (a window width is part of it) recompiles, and is right
    bm = flexattn.create_block_mask(_window(7), None, None, L, L, BLOCK_SIZE=16)
    assert torch.equal(f(q, k, v, bm), flexattn.flex_attention(q, k, v, block_mask=bm))
    assert counter.frame_count == 2


def test_new_score_mod_closure_is_not_stale():
    """Each call passes a new closure over a different tensor: the compiled result follows it."""
    f = torch.compile(lambda q, k, v, mod: flexattn.flex_attention(q, k, v, score_mod=mod), fullgraph=True,
                      backend="aot_eager")
    q, k, v = _qkv()
    for scale in (0.5, 3.0):
        bias = torch.full((H,), scale)

        def biased(score, b, h, q_idx, kv_idx):
            return score * bias[h]
        assert torch.equal(f(q, k, v, biased), flexattn.flex_attention(q, k, v, score_mod=biased))


def test_no_block_mask_return_lse_and_gqa():
    q = torch.randn(1, 4, L, E)
    k, v = torch.randn(1, 2, L - 3, E), torch.randn(1, 2, L - 3, 16)
    f = torch.compile(lambda q, k, v: flexattn.flex_attention(q, k, v, enable_gqa=True, return_lse=True),
                      fullgraph=True, backend="aot_eager")
    out, lse = f(q, k, v)
    want, want_lse = flexattn.flex_attention(q, k, v, enable_gqa=True, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_bad_input_inside_compile_names_the_argument():
    """The eager check's ValueError: raised as is without fullgraph (dynamo falls back to eager
    at the raise); with fullgraph=True dynamo reports it as an Unsupported carrying the message."""
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: flexattn.flex_attention(q, k, v), backend="aot_eager")
    with pytest.raises(ValueError, match="query and key must have the same head dimension"):
        f(q, k[..., :16], v)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: flexattn.flex_attention(q, k, v), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="query and key must have the same head dimension"):
        f(q, k[..., :16], v)


def test_opcheck_cpu():
    from flexattn.ops import run_opcheck
    q, k, v = [torch.randn(1, 2, 64, 16) for _ in range(3)]
    run_opcheck(q, k, v)
