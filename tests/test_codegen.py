"""The IR -> Triton printer, the derivative IR, and the source cache (no kernel launches here,
except the floor-division semantics check, which runs the interpreter in a subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flexattn import codegen, lift_params, source_cache
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
    assert a == b and source_cache.source_key(a) == source_cache.source_key(b)
    c = generated_source(trace_score(lambda s, b, h, q, kv: s + t1[q % 5]), None)
    assert c != a


def test_cache_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    mod = source_cache.load_module(codegen.PRELUDE + "\nX = 42\n", "unit")
    assert mod.X == 42 and any(p.name.startswith("unit_") for p in tmp_path.iterdir())


def test_cache_dir_follows_xdg(tmp_path, monkeypatch):
    """Without FLEXATTN_CACHE_DIR: $XDG_CACHE_HOME/flexattn when it is an absolute path,
    else ~/.cache/flexattn (unset, empty or relative: the XDG Base Directory default)."""
    monkeypatch.delenv("FLEXATTN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert source_cache.cache_dir() == str(tmp_path / "xdg" / "flexattn")
    assert (tmp_path / "xdg" / "flexattn").is_dir()
    home_cache = str(tmp_path / "home" / ".cache" / "flexattn")
    for value in ("", "relative/dir"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert source_cache.cache_dir() == home_cache
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert source_cache.cache_dir() == home_cache
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path / "override"))  # the override wins
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert source_cache.cache_dir() == str(tmp_path / "override")


def test_suite_uses_a_temporary_cache(tmp_path_factory):
    """conftest points FLEXATTN_CACHE_DIR at a session tmp directory: the suite never writes
    into the user's cache, and the autotuner's file lives in the same directory."""
    from flexattn.kernels import autotune
    d = os.environ.get("FLEXATTN_CACHE_DIR")
    assert d and os.path.realpath(d).startswith(os.path.realpath(tmp_path_factory.getbasetemp()) + os.sep)
    assert os.path.dirname(autotune.cache_path()) == source_cache.cache_dir() == d


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


def _index_src(fn, small):
    g = lift_params.kernel_graph(trace_score(fn))  # what the kernels print: consts lifted to params
    return codegen.mod_function("score_mod", g, "score", "sb", small_indices=small)


def test_small_index_sums_are_converted_per_row_and_column():
    """ALiBi's `kv - q` used as a float: with small indices, the difference of the indices
    converted once (an [M, 1] and a [1, N] tile), never a conversion per score."""
    alibi = lambda s, b, h, q, kv: s + 0.5 * (kv - q)  # noqa: E731
    small = _index_src(alibi, True)
    assert "f_kv_idx = tl.cast(kv_idx, tl.float32)" in small and "f_q_idx = tl.cast(q_idx, tl.float32)" in small
    assert "(f_kv_idx) - (f_q_idx)" in small and "tl.cast(v_sub" not in small, small
    assert "tl.cast(v_sub" in _index_src(alibi, False)  # large indices: the int difference, converted
    # the sum of four indices is exact in float32 below SMALL_INDEX_LIMIT; five are not
    four = _index_src(lambda s, b, h, q, kv: s + ((kv - q) + (h - b)), True)
    assert "tl.cast(v_" not in four and "f_h = tl.cast(off_h, tl.float32)" in four, four
    assert "tl.cast(v_" in _index_src(lambda s, b, h, q, kv: s + ((kv - q) + (kv - q) + kv), True)
    # a product, a lifted constant (its size is a runtime value) and int64 are not index sums
    for fn in (lambda s, b, h, q, kv: s + (kv * 2 - q), lambda s, b, h, q, kv: s + (kv - q + 3),
               lambda s, b, h, q, kv: s + (kv.to(torch.int64) - q)):
        assert "tl.cast(v_" in _index_src(fn, True), fn


def test_small_indices_bound():
    from flexattn.kernels import small_indices
    lim = codegen.SMALL_INDEX_LIMIT
    assert codegen.FLOAT_INDEX_TERMS * lim <= 2 ** 24  # every partial sum stays exact in float32
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    assert small_indices(meta(2, 16, lim - 1, 8), meta(2, 16, 64, 8))
    assert not small_indices(meta(2, 16, 64, 8), meta(2, 16, lim, 8))
    assert not small_indices(meta(1, lim, 64, 8), meta(1, lim, 64, 8))


def test_fast_tanh_prints_the_hardware_tanh_below_float64():
    """Plan.fast_tanh prints tanh (forward and derivative) as the one-instruction hardware tanh;
    a float64 tanh and a plan without it keep the exact formula."""
    softcap = lift_params.kernel_graph(trace_score(lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)))
    fast = codegen.mod_function("score_mod", softcap, "score", "sb", fast_tanh=True)
    assert "_tanh_approx(" in fast and "_tanh(" not in fast, fast
    exact = codegen.mod_function("score_mod", softcap, "score", "sb")
    assert "_tanh(" in exact and "_tanh_approx(" not in exact, exact
    dfast = codegen.mod_backward_function("score_mod_bwd", softcap, "sb", [], fast_tanh=True)
    assert "_tanh_approx(" in dfast and "_tanh(" not in dfast, dfast
    double = lift_params.kernel_graph(trace_score(lambda s, b, h, q, kv: torch.tanh(s.to(torch.float64))))
    assert "_tanh_approx(" not in codegen.mod_function("score_mod", double, "score", "sb", fast_tanh=True)


def test_fast_tanh_is_for_16_bit_inputs_on_nvidia_gpus(monkeypatch):
    from types import SimpleNamespace

    from flexattn.kernels.plan import fast_tanh
    q = lambda dtype, device: SimpleNamespace(dtype=dtype, device=torch.device(device))  # noqa: E731
    monkeypatch.setattr(codegen, "HARDWARE_MATH", True)
    assert fast_tanh(q(torch.bfloat16, "cuda")) and fast_tanh(q(torch.float16, "cuda"))
    assert not fast_tanh(q(torch.float32, "cuda")) and not fast_tanh(q(torch.bfloat16, "cpu"))
    monkeypatch.setattr(codegen, "HARDWARE_MATH", False)  # the interpreter, AMD GPUs
    assert not fast_tanh(q(torch.bfloat16, "cuda"))


def test_small_index_sums_are_bit_identical_in_triton():
    """The float32 sum of converted indices equals the converted int32 sum, bit for bit, for
    indices up to SMALL_INDEX_LIMIT (the interpreter rounds like the GPU: IEEE float32)."""
    code = r'''
import torch, triton, triton.language as tl
from flexattn import codegen, lift_params, source_cache
from flexattn.trace import trace_score
mod_fn = lambda s, b, h, q, kv: s + ((kv - q) - (h - b))
g = lift_params.kernel_graph(trace_score(mod_fn))
src = (codegen.mod_function("mod_small", g, "score", "sb", small_indices=True)
       + codegen.mod_function("mod_int", g, "score", "sb", small_indices=False))
mod = source_cache.load_module(codegen.PRELUDE + src + """
@triton.jit
def k(QI, KI, OUT_SMALL, OUT_INT, M: tl.constexpr, N: tl.constexpr):
    q = tl.load(QI + tl.arange(0, M))[:, None]
    kv = tl.load(KI + tl.arange(0, N))[None, :]
    z = tl.zeros([M, N], tl.float32)
    o = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(OUT_SMALL + o, mod_small(z, 3, 7, q, kv))
    tl.store(OUT_INT + o, mod_int(z, 3, 7, q, kv))
""", "smallindex")
lim = codegen.SMALL_INDEX_LIMIT
gen = torch.Generator().manual_seed(0)
for lo, hi in ((0, 64), (lim - 4096, lim), (0, lim)):
    qi = torch.randint(lo, hi, (32,), generator=gen, dtype=torch.int32)
    ki = torch.randint(lo, hi, (32,), generator=gen, dtype=torch.int32)
    qi[0], ki[0] = lim - 1, 0  # the extreme difference
    a, b = torch.empty(32, 32), torch.empty(32, 32)
    mod.k[(1,)](qi, ki, a, b, M=32, N=32)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (lo, hi, (a - b).abs().max())
    assert torch.equal(b, (ki[None, :] - qi[:, None] - 4).float())
print("OK")
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "OK" in proc.stdout, proc.stdout + proc.stderr


def test_floor_semantics_in_triton():
    """// and % on negative integers follow Python/torch (floor), not Triton (truncate)."""
    code = r'''
import torch, triton, triton.language as tl
from flexattn import codegen, lift_params, source_cache
mod = source_cache.load_module(codegen.PRELUDE + """
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


def test_row_dot_prints_as_a_matrix_product_and_other_rows_as_a_loop():
    """MLA's RoPE term (a q-indexed row times a kv-indexed row, summed) is a tl.dot over
    chunks of the rows; any other rowsum is a loop over the row's elements."""
    q_rope = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    k_rope = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
    dot = trace_score(lambda s, b, h, q, kv: s + torch.dot(q_rope[b, h, q], k_rope[b, 0, kv]))
    src = codegen.mod_function("m", dot, "score", "sb")
    assert src.count("tl.dot(") == 2 and "input_precision" not in src  # both tile orientations
    loop = trace_score(lambda s, b, h, q, kv: s + (q_rope[b, h, q] * k_rope[b, 0, kv] * s).sum(-1))
    src = codegen.mod_function("m", loop, "score", "sb")
    assert "tl.dot(" not in src and "for d0 in range(0, sb0_n3):" in src
    f32 = trace_score(lambda s, b, h, q, kv: s + torch.dot(q_rope[b, h, q].float(), k_rope[b, 0, kv].float()))
    assert "tl.dot(" not in codegen.mod_function("m", f32, "score", "sb")  # casts of rows: not two row loads
