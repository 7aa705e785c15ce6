"""Code written for torch.nn.attention.flex_attention, run on flexattn after swapping the
import: return_aux / AuxRequest, enable_gqa with equal heads, non-contiguous q/k/v from
view(...).transpose(1, 2), torch's create_block_mask keywords, and torch.compile as
Hugging Face transformers uses it (fresh score_mod closures per call, transposed inputs
with a backward, a mask built inside a compiled forward). CPU path; the kernels under
TRITON_INTERPRET=1 where noted."""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import flexattn

tfa = pytest.importorskip("torch.nn.attention.flex_attention")


def dense(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """float64 dense attention: (out, lse) with torch's semantics (GQA by head repeat)."""
    q, k, v = (t.double() for t in (q, k, v))
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, 1)
    v = v.repeat_interleave(Hq // Hkv, 1)
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(E) if scale is None else scale)
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(Hq)[None, :, None, None]
    qi = torch.arange(L)[None, None, :, None]
    kv = torch.arange(S)[None, None, None, :]
    if score_mod is not None:
        s = score_mod(s, b, h, qi, kv)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(b, h, qi, kv).expand_as(s), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


def transposed(B, H, S, E, dtype=torch.float32, seed=0):
    """A (B, H, S, E) tensor made as transformers makes q/k/v: (B, S, H*E) -> view -> transpose."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, H * E, generator=g, dtype=dtype).view(B, S, H, E).transpose(1, 2)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# ---- return_aux ---------------------------------------------------------------------

@pytest.mark.parametrize("request_cls", [tfa.AuxRequest, flexattn.AuxRequest])
def test_return_aux_lse_matches_torch(request_cls):
    q, k, v = (torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    bm = flexattn.create_block_mask(causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    out, aux = flexattn.flex_attention(q, k, v, block_mask=bm, return_aux=request_cls(lse=True))
    assert isinstance(aux, tfa.AuxOutput) and aux.max_scores is None
    tbm = tfa.create_block_mask(causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    tout, taux = tfa.flex_attention(q, k, v, block_mask=tbm, return_aux=tfa.AuxRequest(lse=True))
    torch.testing.assert_close(out, tout, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.lse, taux.lse, atol=1e-5, rtol=1e-5)
    ref_out, ref_lse = dense(q, k, v, mask_mod=causal)
    torch.testing.assert_close(aux.lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    # lse not requested: AuxOutput(None, None), as torch
    out2, aux2 = flexattn.flex_attention(q, k, v, block_mask=bm, return_aux=request_cls())
    assert aux2 == tfa.AuxOutput(None, None) and torch.equal(out2, out)


def test_return_aux_lse_is_differentiable():
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               .requires_grad_() for i in range(3))
    out, aux = flexattn.flex_attention(q, k, v, return_aux=flexattn.AuxRequest(lse=True))
    got = torch.autograd.grad((out.sum() + aux.lse.sin().sum()), [q, k, v])
    ro, rl = dense(q, k, v)
    want = torch.autograd.grad((ro.sum() + rl.sin().sum()), [q, k, v])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)


def test_return_aux_errors_as_torch():
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="Cannot specify both return_lse and return_aux"):
        flexattn.flex_attention(q, q, q, return_lse=True, return_aux=flexattn.AuxRequest(lse=True))
    with pytest.raises(ValueError, match="Cannot specify both return_lse and return_aux"):
        tfa.flex_attention(q, q, q, return_lse=True, return_aux=tfa.AuxRequest(lse=True))
    with pytest.raises(TypeError, match="return_aux must be an AuxRequest"):
        flexattn.flex_attention(q, q, q, return_aux=True)


def test_names_exist():
    assert flexattn.AuxRequest is tfa.AuxRequest and flexattn.AuxOutput is tfa.AuxOutput
    assert flexattn.FlexKernelOptions is tfa.FlexKernelOptions


# ---- enable_gqa with equal heads, non-contiguous inputs --------------------------------

def test_enable_gqa_equal_heads_and_transposed_inputs():
    q, k, v = transposed(2, 3, 33, 8, seed=1), transposed(2, 3, 33, 8, seed=2), transposed(2, 3, 33, 8, seed=3)
    assert not q.is_contiguous()
    for t in (q, k, v):
        t.requires_grad_()
    bm = flexattn.create_block_mask(causal, None, None, 33, 33, device="cpu", BLOCK_SIZE=16)
    out, aux = flexattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_aux=flexattn.AuxRequest(lse=True))
    ro, rl = dense(q, k, v, mask_mod=causal)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(aux.lse.double(), rl, atol=2e-5, rtol=2e-5)
    got = torch.autograd.grad(out.sum(), [q, k, v])
    want = torch.autograd.grad(ro.sum(), [q, k, v])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=2e-5)


def test_transposed_inputs_kernels_interpreted(monkeypatch):
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run here only under TRITON_INTERPRET=1")
    from flexattn import kernels
    q, k, v = (transposed(1, 2, 32, 16, seed=i).requires_grad_() for i in range(3))
    bm = flexattn.create_block_mask(causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    sm = lambda s, b, h, qi, kv: s - 0.1 * (qi - kv)  # noqa: E731
    from flexattn.front import trace_score_mod
    out, lse = kernels.flex_attention_triton(q, k, v, score_graph=trace_score_mod(sm, q.device),
                                             mask_graph=bm.mask_graph, block_mask=bm, scale=0.25)
    ro, rl = dense(q, k, v, score_mod=sm, mask_mod=causal, scale=0.25)
    torch.testing.assert_close(out.double(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), rl, atol=1e-4, rtol=1e-4)


# ---- create_block_mask keywords -------------------------------------------------------

def test_create_block_mask_torch_keywords():
    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 20)
    want = tfa.create_block_mask(sliding, 1, 2, 70, 70, device="cpu", BLOCK_SIZE=16).to_dense()
    for kw in (dict(_compile=True), dict(separate_full_blocks=True), dict(compute_dq_write_order=False),
               dict(dq_kv_order=True), dict(device=None)):
        bm = flexattn.create_block_mask(sliding, 1, 2, 70, 70, **{"device": "cpu", **kw}, BLOCK_SIZE=16)
        assert torch.equal(bm.to_dense(), want), kw
    # device=None: the current accelerator if one is available (a CUDA build without a GPU: the CPU)
    expected = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"
    assert flexattn.create_block_mask(sliding, 1, 2, 70, 70, BLOCK_SIZE=16).kv_indices.device.type == expected
    # separate_full_blocks=False: every visited block is partial (the mask runs on all of them)
    bm = flexattn.create_block_mask(sliding, 1, 2, 70, 70, device="cpu", BLOCK_SIZE=16, separate_full_blocks=False)
    tbm = tfa.create_block_mask(sliding, 1, 2, 70, 70, device="cpu", BLOCK_SIZE=16, separate_full_blocks=False)
    assert torch.equal(bm.to_dense(), tbm.to_dense())
    assert bm.full_kv_num_blocks is None or int(bm.full_kv_num_blocks.sum()) == 0
    assert torch.equal(bm.kv_num_blocks, tbm.kv_num_blocks)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(flexattn.flex_attention(q, k, v, block_mask=bm).double(),
                               dense(q, k, v, mask_mod=sliding)[0], atol=1e-5, rtol=1e-5)


def test_create_block_mask_dq_write_order_keywords_accepted():
    want = flexattn.create_block_mask(causal, 1, 1, 40, 40, device="cpu", BLOCK_SIZE=16)
    for order in (False, True):
        bm = flexattn.create_block_mask(causal, 1, 1, 40, 40, device="cpu", BLOCK_SIZE=16,
                                        compute_dq_write_order=True, dq_kv_order=order)
        for a in flexattn.BlockMask._TENSOR_ATTRS:
            assert torch.equal(getattr(bm, a), getattr(want, a)), a


def test_transposed_inputs_kernels_run_interpreted():
    """test_transposed_inputs_kernels_interpreted in a fresh process with TRITON_INTERPRET=1
    (it must be set before any @triton.jit function is built)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "test_transposed_inputs_kernels_interpreted"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---- torch.compile -------------------------------------------------------------------

def test_fake_strides_equal_real_strides_for_transposed_inputs():
    """flexattn::fwd / flexattn::bwd: the fake (meta) implementations give the outputs and
    gradients the sizes and strides the real ones return, for transposed q/k/v."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from flexattn import ops
    from flexattn.codegen import kernel_graph  # noqa: F401  (ops' import path)
    from flexattn.autodiff import grad_slots
    q, k, v = (transposed(1, 2, 40, 8, seed=i) for i in range(3))
    slopes = torch.tensor([0.1, 0.3])
    bm = flexattn.create_block_mask(causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    sg = flexattn.trace_score(lambda s, b, h, qi, kv: s - slopes[h] * (qi - kv))
    key = ops.register(ops.OpSpec("cpu", sg, bm.mask_graph, bm.BLOCK_SIZE, bm.full_kv_num_blocks is not None, (),
                                  grad_slots(sg)))
    rest = (ops.blocks_list(bm), list(sg.buffers), list(bm.mask_graph.buffers), key, 0.3, 0.0, 0)
    out, lse, _ = ops.fwd(q, k, v, *rest, False)
    dout = transposed(1, 2, 40, 8, seed=7)
    real = ops.bwd(q, k, v, out, lse, dout, torch.zeros_like(lse), *rest)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fo, fl, fd = (mode.from_tensor(t) for t in (q, k, v, out, lse, dout))
        fake_fwd = ops.fwd(fq, fk, fv, *rest, False)
        fake = ops.bwd(fq, fk, fv, fo, fl, fd, torch.zeros_like(fl), *rest)
    for r, f in zip([out, lse, *real[:3], *real[3]], [*fake_fwd[:2], *fake[:3], *fake[3]]):
        assert (r.shape, r.stride()) == (f.shape, f.stride())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fwd_bwd_with_transposed_inputs(backend):
    """fwd + bwd of transposed q/k/v under torch.compile: inductor checks every custom op
    output's strides against the fake's (AssertionError: expected ... stride otherwise)."""
    if backend == "inductor":
        import shutil
        if shutil.which("g++") is None and shutil.which("c++") is None:
            pytest.skip("inductor on CPU needs a C++ compiler")
    torch._dynamo.reset()
    q, k, v = (transposed(1, 2, 40, 8, seed=i).requires_grad_() for i in range(3))
    bm = flexattn.create_block_mask(causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    sm = lambda s, b, h, qi, kv: s - 0.05 * (qi - kv)  # noqa: E731
    f = torch.compile(lambda q, k, v: flexattn.flex_attention(q, k, v, score_mod=sm, block_mask=bm,
                                                              return_aux=flexattn.AuxRequest(lse=True)),
                      fullgraph=True, backend=backend)
    import torch._inductor.config as inductor_config
    with inductor_config.patch(force_disable_caches=True):  # (a cached graph would not run the fake again)
        out, aux = f(q, k, v)
        got = torch.autograd.grad(out.sum() + aux.lse.sum(), [q, k, v])
    ro, rl = dense(q, k, v, score_mod=sm, mask_mod=causal)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    want = torch.autograd.grad(ro.sum() + rl.sum(), [q, k, v])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=2e-5)


def _counting(fn, fullgraph=True):
    cnt = CompileCounter()
    return torch.compile(fn, backend=cnt, fullgraph=fullgraph), cnt


def _strict_recompiles():
    """recompile_limit 2, and hitting it raises (instead of falling back to eager)."""
    patch = dict(recompile_limit=2)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return torch._dynamo.config.patch(**patch)


@_strict_recompiles()
def test_fresh_closure_per_call_reuses_one_graph():
    """transformers builds a new score_mod closure (same code, new captured values) on every
    layer call: one graph serves them all, each call reads its own captured tensor."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    f, cnt = _counting(lambda q, k, v, mod: flexattn.flex_attention(q, k, v, score_mod=mod))

    def make(bias, softcap):
        def score_mod(score, b, h, q_idx, kv_idx):
            if softcap is not None:
                score = softcap * torch.tanh(score / softcap)
            return score + bias[h] * (q_idx - kv_idx)
        return score_mod

    for i in range(12):
        bias = torch.randn(2, generator=torch.Generator().manual_seed(100 + i))
        mod = make(bias, 20.0)
        got = f(q, k, v, mod)
        torch.testing.assert_close(got.double(), dense(q, k, v, score_mod=mod)[0], atol=2e-5, rtol=2e-5)
    assert cnt.frame_count == 1
    # a different captured number is a different mod: it recompiles, and is right
    mod = make(bias, 5.0)
    torch.testing.assert_close(f(q, k, v, mod).double(), dense(q, k, v, score_mod=mod)[0], atol=2e-5, rtol=2e-5)
    assert cnt.frame_count == 2


@_strict_recompiles()
def test_fresh_closure_gradients_reach_each_calls_tensor():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 24, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    f, cnt = _counting(lambda q, k, v, mod: flexattn.flex_attention(q, k, v, score_mod=mod), fullgraph=True)
    for i in range(4):
        bias = torch.randn(2, generator=torch.Generator().manual_seed(i)).requires_grad_()
        mod = (lambda t: lambda s, b, h, qi, kv: s + t[h])(bias)
        (g,) = torch.autograd.grad(f(q, k, v, mod).square().sum(), [bias])
        (w,) = torch.autograd.grad(dense(q, k, v, score_mod=mod)[0].square().sum(), [bias])
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-4)
    assert cnt.frame_count == 1


class _MaskInForward(torch.nn.Module):
    def __init__(self, window):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        w = self.window

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < w)
        bm = flexattn.create_block_mask(sliding, None, None, q.shape[2], k.shape[2], device=q.device, _compile=True)
        return flexattn.flex_attention(q, k, v, block_mask=bm) * 2


def test_create_block_mask_inside_compiled_forward():
    """fullgraph=False: the mask is built outside the graph (one break), the attention inside."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 48, 8, generator=torch.Generator().manual_seed(i)).requires_grad_()
               for i in range(3))
    m = _MaskInForward(20)
    f, cnt = _counting(m, fullgraph=False)
    out = f(q, k, v)
    ro = dense(q, k, v, mask_mod=lambda b, h, qi, kv: (qi >= kv) & (qi - kv < 20))[0] * 2
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    got = torch.autograd.grad(out.sum(), [q, k, v])
    want = torch.autograd.grad(ro.sum(), [q, k, v])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=2e-5)
    f(q, k, v)
    assert cnt.frame_count <= 2  # the graph before the mask (none here) and the one after it


_WINDOW = 6


def _global_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < _WINDOW)


def test_create_block_mask_inside_fullgraph():
    """fullgraph=True: a mask_mod capturing no tensor is built while dynamo traces and
    guarded by what it reads - a fresh closure with the same window reuses the graph, a new
    window (a closure value, a global) recompiles; forward and backward match the dense
    reference."""
    global _WINDOW
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 48, 8, generator=torch.Generator().manual_seed(i)).requires_grad_()
               for i in range(3))
    cnt = CompileCounter()
    for w, graphs in ((20, 1), (20, 1), (7, 2), (20, 2)):
        out = torch.compile(_MaskInForward(w), fullgraph=True, backend=cnt)(q, k, v)
        ro = dense(q, k, v, mask_mod=lambda b, h, qi, kv: (qi >= kv) & (qi - kv < w))[0] * 2
        torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
        assert cnt.frame_count == graphs
    for g, want in zip(torch.autograd.grad(out.sum(), [q, k, v]), torch.autograd.grad(ro.sum(), [q, k, v])):
        torch.testing.assert_close(g.double(), want.double(), atol=2e-5, rtol=2e-5)

    def global_window(q, k, v):
        # composed with torch's and flexattn's combinators, as attention-gym's masks are
        mask = flexattn.and_masks(tfa.and_masks(_global_window, causal), causal)
        bm = flexattn.create_block_mask(mask, None, None, 48, 48, device="cpu")
        return flexattn.flex_attention(q, k, v, block_mask=bm)
    f, cnt = _counting(global_window)
    for window, graphs in ((6, 1), (6, 1), (11, 2)):
        _WINDOW = window
        ro = dense(q, k, v, mask_mod=lambda b, h, qi, kv: (qi >= kv) & (qi - kv < window))[0]
        torch.testing.assert_close(f(q, k, v).double(), ro, atol=2e-5, rtol=2e-5)
        assert cnt.frame_count == graphs


def test_create_block_mask_capturing_tensors_inside_fullgraph_names_the_fix():
    """A mask_mod reading a captured tensor is built outside the graph: under fullgraph=True
    dynamo's error carries the reason, which names the fix; the fix compiles. A torch
    BlockMask converted inside the graph: the same kind of error, naming from_torch."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 48, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    doc = torch.arange(48) // 10

    def document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def inside(q, k, v):
        bm = flexattn.create_block_mask(document, None, None, 48, 48, device="cpu")
        return flexattn.flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="build the BlockMask outside the compiled function"):
        torch.compile(inside, fullgraph=True, backend="eager")(q, k, v)
    bm = flexattn.create_block_mask(document, None, None, 48, 48, device="cpu")
    f, cnt = _counting(lambda q, k, v, bm: flexattn.flex_attention(q, k, v, block_mask=bm))
    torch.testing.assert_close(f(q, k, v, bm).double(), dense(q, k, v, mask_mod=document)[0], atol=2e-5, rtol=2e-5)
    assert cnt.frame_count == 1
    torch._dynamo.reset()
    tbm = tfa.create_block_mask(causal, None, None, 48, 48, device="cpu")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="BlockMask.from_torch"):
        torch.compile(lambda q: flexattn.flex_attention(q, q, q, block_mask=tbm), fullgraph=True, backend="eager")(q)


# ---- the pattern of transformers' flex integration -------------------------------------

class _Layer(torch.nn.Module):
    """An attention layer calling flex_attention the way transformers' flex_attention_forward
    does: q/k/v from view(...).transpose(1, 2), enable_gqa=True, return_aux=AuxRequest(lse=True),
    a fresh score_mod closure per call (softcap, a score mask tensor, a causal offset),
    kernel_options=None, scale given; the flex call is torch.compile'd on its own."""

    def __init__(self, flex, hidden=32, heads=4, kv_heads=2, head_dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.flex, self.heads, self.kv_heads, self.head_dim = flex, heads, kv_heads, head_dim
        self.wq = torch.nn.Parameter(torch.randn(hidden, heads * head_dim, generator=g) / hidden ** 0.5)
        self.wk = torch.nn.Parameter(torch.randn(hidden, kv_heads * head_dim, generator=g) / hidden ** 0.5)
        self.wv = torch.nn.Parameter(torch.randn(hidden, kv_heads * head_dim, generator=g) / hidden ** 0.5)

    def qkv(self, x):
        B, S, _ = x.shape
        q = (x @ self.wq).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = (x @ self.wk).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = (x @ self.wv).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, score_mask, softcap, offset):
        q, k, v = self.qkv(x)

        def score_mod(score, batch_idx, head_idx, q_idx, kv_idx):
            if softcap is not None:
                score = softcap * torch.tanh(score / softcap)
            if score_mask is not None:
                score = score + score_mask[batch_idx][0][q_idx][kv_idx]
            return torch.where(q_idx + offset >= kv_idx, score, -float("inf"))

        out, aux = self.flex(q, k, v, score_mod=score_mod, block_mask=None, enable_gqa=True,
                             scale=self.head_dim ** -0.5, kernel_options=None,
                             return_aux=flexattn.AuxRequest(lse=True))
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1), aux.lse

    def reference(self, x, score_mask, softcap, offset):
        q, k, v = (t.double() for t in self.qkv(x))
        B, S = x.shape[:2]
        k = k.repeat_interleave(self.heads // self.kv_heads, 1)
        v = v.repeat_interleave(self.heads // self.kv_heads, 1)
        s = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
        s = softcap * torch.tanh(s / softcap) + score_mask.double()
        qi, kv = torch.arange(S)[:, None], torch.arange(S)[None, :]
        s = s.masked_fill(~(qi + offset >= kv), -math.inf)
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, S, -1), torch.logsumexp(s, -1)


@_strict_recompiles()
def test_transformers_flex_forward_pattern_compiled():
    torch._dynamo.reset()
    cnt = CompileCounter()
    flex = torch.compile(flexattn.flex_attention, backend=cnt)
    layers = [_Layer(flex, kv_heads=2 if i % 2 else 4, seed=i) for i in range(4)]  # GQA and equal heads
    B, S = 2, 24
    for step in range(3):  # 12 layer calls, each with a fresh closure over a new score mask
        g = torch.Generator().manual_seed(50 + step)
        x = torch.randn(B, S, 32, generator=g, requires_grad=True)
        score_mask = torch.randn(B, 1, S, S, generator=g) * 0.5
        for layer in layers:
            out, lse = layer(x, score_mask, 30.0, 2)
            ro, rl = layer.reference(x, score_mask, 30.0, 2)
            torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=2e-5)
            params = [x, layer.wq, layer.wk, layer.wv]
            got = torch.autograd.grad(out.square().sum() + lse.sum(), params)
            want = torch.autograd.grad(ro.square().sum() + rl.sum(), params)
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=5e-5)
    assert cnt.frame_count == 2  # one graph per kv head count, whatever the closures


# ---- a torch BlockMask passed in ------------------------------------------------------

def _sliding(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 20)


def test_torch_block_mask_accepted_and_converted_once():
    from flexattn.block_mask import _FROM_TORCH
    tbm = tfa.create_block_mask(_sliding, None, 2, 70, 70, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(i)).requires_grad_()
               for i in range(3))
    out, aux = flexattn.flex_attention(q, k, v, block_mask=tbm, return_aux=flexattn.AuxRequest(lse=True))
    ro, rl = dense(q, k, v, mask_mod=_sliding)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(aux.lse.double(), rl, atol=2e-5, rtol=2e-5)
    got = torch.autograd.grad(out.sum(), [q, k, v])
    want = torch.autograd.grad(ro.sum(), [q, k, v])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=2e-5)
    # one conversion per torch mask, sharing its tensors
    bm = flexattn.BlockMask.from_torch(tbm)
    assert _FROM_TORCH[tbm] is bm and flexattn.BlockMask.from_torch(tbm) is bm
    assert bm.kv_indices is tbm.kv_indices and bm.q_indices is tbm.q_indices
    assert bm.mask_graph is not None and bm.seq_lengths == (70, 70) and bm.BLOCK_SIZE == (16, 16)
    assert torch.equal(bm.to_dense(), tbm.to_dense())
    flexattn.flex_attention(q, k, v, block_mask=tbm)
    assert len([m for m in _FROM_TORCH.keys() if m is tbm]) == 1


def test_torch_block_mask_from_kv_blocks_and_noop():
    """A torch mask built from kv blocks without the transposed indices (its q_* are derived)
    and torch's noop mask (no mask graph: attend everywhere inside the listed blocks)."""
    tbm = tfa.create_block_mask(_sliding, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    kv_only = tfa.BlockMask.from_kv_blocks(tbm.kv_num_blocks, tbm.kv_indices, tbm.full_kv_num_blocks,
                                           tbm.full_kv_indices, BLOCK_SIZE=16, mask_mod=_sliding,
                                           compute_q_blocks=False)
    assert kv_only.q_indices is None
    q, k, v = (torch.randn(1, 1, 64, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(flexattn.flex_attention(q, k, v, block_mask=kv_only).double(),
                               dense(q, k, v, mask_mod=_sliding)[0], atol=2e-5, rtol=2e-5)
    assert torch.equal(flexattn.BlockMask.from_torch(kv_only).q_indices, flexattn.BlockMask.from_torch(tbm).q_indices)
    full = tfa.create_block_mask(tfa.noop_mask, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    assert flexattn.BlockMask.from_torch(full).mask_graph is None
    q, k, v = (torch.randn(1, 1, 40, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(flexattn.flex_attention(q, k, v, block_mask=full).double(), dense(q, k, v)[0],
                               atol=2e-5, rtol=2e-5)


def test_torch_block_mask_under_torch_compile():
    """Converted outside the graph (one break), so torch.compile without fullgraph takes it."""
    torch._dynamo.reset()
    tbm = tfa.create_block_mask(_sliding, None, None, 48, 48, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(1, 2, 48, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    f, cnt = _counting(lambda q, k, v, bm: flexattn.flex_attention(q, k, v, block_mask=bm) * 2, fullgraph=False)
    frames = []
    for _ in range(3):
        torch.testing.assert_close(f(q, k, v, tbm).double(), dense(q, k, v, mask_mod=_sliding)[0] * 2,
                                   atol=2e-5, rtol=2e-5)
        frames.append(cnt.frame_count)
    assert frames[0] <= 2 and frames[-1] == frames[0]  # the attention's graph and the one after it; no recompile


def test_block_mask_of_another_class_is_refused_by_its_full_name():
    class BlockMask:  # a look-alike of another library
        pass
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(TypeError) as e:
        flexattn.flex_attention(q, q, q, block_mask=BlockMask())
    msg = str(e.value)
    assert "must be a flexattn.BlockMask, a torch.nn.attention.flex_attention.BlockMask or None" in msg
    assert f"got {__name__}.test_block_mask_of_another_class_is_refused_by_its_full_name.<locals>.BlockMask" in msg


def test_every_torch_kernel_option_is_accepted():
    """Each key of torch's FlexKernelOptions, with a value torch documents, runs a CPU call;
    torch's BACKEND values and fwd_ / bwd_ prefixed keys become flexattn's."""
    import typing
    from torch.nn.attention.flex_attention import FlexKernelOptions
    from flexattn.options import from_torch_names
    values = {int: 64, bool: True}
    q = torch.randn(1, 2, 64, 16)
    want = flexattn.flex_attention(q, q, q)
    for key, hint in typing.get_type_hints(FlexKernelOptions).items():
        if key == "BACKEND":
            continue
        value = values[hint] if key not in ("num_warps", "kpack", "matrix_instr_nonkdim", "waves_per_eu") else 4
        if key == "num_stages":
            value = 2
        got = flexattn.flex_attention(q, q, q, kernel_options={key: value})
        assert torch.equal(got, want), key
    for backend in ("AUTO", "FLASH"):
        assert torch.equal(flexattn.flex_attention(q, q, q, kernel_options={"BACKEND": backend}), want)
    with pytest.raises(ValueError, match="'triton' runs the GPU kernels, which need CUDA tensors"):
        flexattn.flex_attention(q, q, q, kernel_options={"BACKEND": "TRITON"})
    assert from_torch_names({"BACKEND": "TRITON_DECODE"}) == {"BACKEND": "triton", "FORCE_DECODE": True}
    assert from_torch_names({"fwd_num_warps": 4, "fwd_BLOCK_M": 64, "bwd_BLOCK_N2": 32}) == \
        {"num_warps": 4, "BLOCK_M": 64, "BLOCK_N2": 32}
    with pytest.raises(ValueError, match="name the same setting"):
        flexattn.flex_attention(q, q, q, kernel_options={"fwd_BLOCK_M": 64, "BLOCK_M": 32})
    with pytest.raises(ValueError, match=r"BACKEND'\] must be one of .*'TRITON_DECODE'"):
        flexattn.flex_attention(q, q, q, kernel_options={"BACKEND": "CUTE"})
