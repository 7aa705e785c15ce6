"""The IR -> Triton printer, the derivative IR, and the source cache (no kernel launches here,
except the floor-division semantics check, which runs the interpreter in a subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flexattn import codegen
from flexattn.autodiff import differentiate
from flexattn.trace import trace_mask, trace_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _src(fn, kind="score"):
    g = trace_score(fn) if kind == "score" else trace_mask(fn)
    return codegen.mod_function(f"{kind}_mod", g, kind, "sb" if kind == "score" else "mb")


@pytest.mark.parametrize("fn,expect", [
    (lambda s, b, h, q, kv: -s, "-("), (lambda s, b, h, q, kv: s.abs(), "tl.abs("),
    (lambda s, b, h, q, kv: torch.exp(s), "tl.exp("), (lambda s, b, h, q, kv: torch.exp2(s), "tl.exp2("),
    (lambda s, b, h, q, kv: torch.log(s), "tl.log("), (lambda s, b, h, q, kv: torch.log2(s), "tl.log2("),
    (lambda s, b, h, q, kv: torch.sqrt(s), "tl.sqrt("), (lambda s, b, h, q, kv: torch.rsqrt(s), "tl.rsqrt("),
    (lambda s, b, h, q, kv: torch.tanh(s), "_tanh("), (lambda s, b, h, q, kv: torch.sigmoid(s), "tl.sigmoid("),
    (lambda s, b, h, q, kv: torch.sin(s), "tl.sin("), (lambda s, b, h, q, kv: torch.cos(s), "tl.cos("),
    (lambda s, b, h, q, kv: torch.floor(s), "tl.floor("), (lambda s, b, h, q, kv: torch.ceil(s), "tl.ceil("),
    (lambda s, b, h, q, kv: s + q, ") + ("), (lambda s, b, h, q, kv: s - kv, ") - ("),
    (lambda s, b, h, q, kv: s * 2.0, ") * ("), (lambda s, b, h, q, kv: s / 3.0, ") * (1.0 / ("),
    (lambda s, b, h, q, kv: s / (q + 1), ") / ("),
    (lambda s, b, h, q, kv: s + (q // 7), "_floordiv("), (lambda s, b, h, q, kv: s + (q % 7), "_floormod("),
    (lambda s, b, h, q, kv: s ** 2, ") * ("), (lambda s, b, h, q, kv: torch.minimum(s, q), "tl.minimum("),
    (lambda s, b, h, q, kv: torch.maximum(s, kv), "tl.maximum("),
    (lambda s, b, h, q, kv: torch.where(q > kv, s, 0.0), "tl.where("),
    (lambda s, b, h, q, kv: s + (q ^ kv), ") ^ ("), (lambda s, b, h, q, kv: s + (q & 3), ") & ("),
    (lambda s, b, h, q, kv: s + (q | kv), ") | ("), (lambda s, b, h, q, kv: s + (~q), "~("),
    (lambda s, b, h, q, kv: s + q.to(torch.float16), "tl.cast(q_idx, tl.float16)"),
])
def test_printer_ops(fn, expect):
    src = _src(fn)
    assert expect in src, src
    compile(src, "<generated>", "exec")  # valid Python


def test_mask_printer_compare_and_logic():
    src = _src(lambda b, h, q, kv: ((q >= kv) & (q != 3)) | ~(kv < 2) , "mask")
    for s in (">=", "!=", "<", " | ", "== 0"):
        assert s in src
    compile(src, "<generated>", "exec")


def test_load_is_bounds_checked_int64():
    table = torch.randn(4, 9)
    src = _src(lambda s, b, h, q, kv: s + table[h, q - kv + 4])
    assert "tl.int64) * sb0_s0" in src and "< sb0_n1" in src and "other=0" in src


def test_unsupported_op_raises():
    g = trace_score(lambda s, b, h, q, kv: s ** (s * 0.5))
    with pytest.raises(codegen.CodegenError, match="pow"):
        codegen.mod_function("score_mod", g, "score", "sb")


def test_unknown_op_raises():
    g = trace_score(lambda s, b, h, q, kv: s + 1.0)
    g.output.op = "frobnicate"
    with pytest.raises(codegen.CodegenError, match="frobnicate"):
        codegen.mod_function("score_mod", g, "score", "sb")


def test_source_ignores_captured_values():
    from flexattn.kernels import generated_source
    t1, t2 = torch.randn(8), torch.randn(8) * 100

    def make(t):
        return lambda s, b, h, q, kv: s + t[q % 8]
    a = generated_source(trace_score(make(t1)), None)
    b = generated_source(trace_score(make(t2)), None)
    assert a == b and codegen.source_key(a) == codegen.source_key(b)
    c = generated_source(trace_score(lambda s, b, h, q, kv: s + t1[q % 5]), None)
    assert c != a


def test_cache_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    mod = codegen.load_module(codegen.PRELUDE + "\nX = 42\n", "unit")
    assert mod.X == 42 and any(p.name.startswith("unit_") for p in tmp_path.iterdir())


def test_derivative_ir():
    w = torch.randn(5)
    g = trace_score(lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0) + w[q % 5] * w[kv % 5])
    d = differentiate(g, grad_slots=[0])
    assert len(d.load_grads) == 2  # the same tensor read twice: one adjoint per read
    from flexattn.evaluate import evaluate
    s = torch.linspace(-3, 3, 7, dtype=torch.float32).view(7, 1)
    q = torch.arange(7, dtype=torch.int32).view(7, 1)
    kv = torch.arange(3, dtype=torch.int32).view(1, 3)
    ds = evaluate(_with_output(d.graph, d.dscore), b=0, h=0, q_idx=q,
                  kv_idx=kv, score=s)
    st = s.clone().requires_grad_()
    (2.0 * torch.tanh(st / 2.0)).sum().backward()
    assert torch.allclose(ds[:, 0], st.grad[:, 0], atol=1e-6)


def _with_output(graph, node):
    import copy
    g = copy.copy(graph)
    g.output = node
    return g


def test_floor_semantics_in_triton():
    """// and % on negative integers follow Python/torch (floor), not Triton (truncate)."""
    code = r'''
import torch, triton, triton.language as tl
from flexattn import codegen
mod = codegen.load_module(codegen.PRELUDE + """
@triton.jit
def k(A, B, Q, R, N: tl.constexpr):
    o = tl.arange(0, N)
    a = tl.load(A + o)
    b = tl.load(B + o)
    tl.store(Q + o, _floordiv(a, b))
    tl.store(R + o, _floormod(a, b))
""", "floortest")
a = torch.tensor([-7, 7, -7, 7, -6, 0, -1, 5, -9, 9, 3, -3, 1, -1, 8, -8], dtype=torch.int32)
b = torch.tensor([2, -2, -2, 2, 3, 5, 4, -4, 4, -4, 7, 7, -7, -7, 3, 3], dtype=torch.int32)
q, r = torch.empty_like(a), torch.empty_like(a)
mod.k[(1,)](a, b, q, r, N=16)
assert torch.equal(q, a // b), (q, a // b)
assert torch.equal(r, a % b), (r, a % b)
print("OK")
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def test_kernel_options_validation():
    from flexattn.kernels import check_kernel_options
    with pytest.raises(ValueError, match="valid keys"):
        check_kernel_options({"BLOCKM": 64})
    with pytest.raises(ValueError, match="power of two"):
        check_kernel_options({"BLOCK_M": 48})
    assert check_kernel_options({"BLOCK_M": 64, "bwd_num_warps": 8}) == {"BLOCK_M": 64, "bwd_num_warps": 8}
