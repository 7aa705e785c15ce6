"""Mods written the way torch FlexAttention users write them: composed with torch's own
`and_masks` / `or_masks` (attention-gym's sliding window, prefix-LM, global sliding window),
NATTEN in Morton order (bit shifts), activations in score_mods, MLA's decoupled RoPE term
(rows of captured tensors reduced in the score_mod: `torch.dot`, `(a * b).sum(-1)`).

Each is checked against torch itself: the BlockMask against torch's `create_block_mask`
(block by block: empty / partial / full), derivatives against torch.autograd in float64,
attention against the dense float64 reference (the numerics rule), and the printed Triton
under TRITON_INTERPRET=1 against the IR's torch evaluation.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as torch_flex

import flexattn
from flexattn.autodiff import differentiate
from flexattn.evaluate import evaluate
from flexattn.reference import reference_attention
from flexattn.trace import trace_score

from conftest import assert_close_to_golden, make_qkv
from mods_zoo import make_mod

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _assert_attention_like_reference(q, k, v, score_mod, mask_mod, block_mask=None):
    """flex_attention's out, dq, dk and dv against the reference in the test dtype and the
    float64 golden (the numerics rule)."""
    out = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    got = torch.autograd.grad(out, [q, k, v], go)
    qr, kr, vr = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ro, _ = reference_attention(qr, kr, vr, score_mod, mask_mod)
    ref = torch.autograd.grad(ro, [qr, kr, vr], go)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    g64, _ = reference_attention(q64, k64, v64, score_mod, mask_mod)
    gold = torch.autograd.grad(g64, [q64, k64, v64], go.double())
    assert_close_to_golden("out", out, ro, g64)
    for nm, a, r, g in zip(("dq", "dk", "dv"), got, ref, gold):
        assert_close_to_golden(nm, a, r, g)


# ---- attention-gym's masks, composed with torch's combinators ------------------------------


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def gym_sliding_window(window_size):
    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= window_size
    return torch_flex.and_masks(causal_mask, sliding_window)


def gym_prefix_lm(prefix_length):
    def prefix_mask(b, h, q_idx, kv_idx):
        return kv_idx <= prefix_length
    return torch_flex.or_masks(prefix_mask, causal_mask)


def gym_global_sliding_window(window_size, n_global):
    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window_size

    def global_tokens(b, h, q_idx, kv_idx):
        return (kv_idx < n_global) | (q_idx < n_global)
    return torch_flex.or_masks(torch_flex.and_masks(causal_mask, window), global_tokens)


def hf_style_and(*mods):
    """transformers' masking_utils.and_masks: q_idx.new_ones(()) and .to(result.device)."""
    def and_mask(batch_idx, head_idx, q_idx, kv_idx):
        result = q_idx.new_ones((), dtype=torch.bool)
        for mask in mods:
            result = result & mask(batch_idx, head_idx, q_idx, kv_idx).to(result.device)
        return result
    return and_mask


def _compact1by1(x):
    """The even bits of a 2-d Morton code, packed (one coordinate)."""
    x = x & 0x55555555
    x = (x | (x >> 1)) & 0x33333333
    x = (x | (x >> 2)) & 0x0F0F0F0F
    x = (x | (x >> 4)) & 0x00FF00FF
    x = (x | (x >> 8)) & 0x0000FFFF
    return x


def morton_natten(kernel_radius):
    """NATTEN over a 2-d grid whose tokens are stored in Morton (Z) order."""
    def natten(b, h, q_idx, kv_idx):
        qx, qy = _compact1by1(q_idx), _compact1by1(q_idx >> 1)
        kx, ky = _compact1by1(kv_idx), _compact1by1(kv_idx >> 1)
        return ((qx - kx).abs() <= kernel_radius) & ((qy - ky).abs() <= kernel_radius)
    return natten


MASKS = {
    "gym_sliding_window": gym_sliding_window(20),
    "gym_prefix_lm": gym_prefix_lm(13),
    "gym_global_sliding_window": gym_global_sliding_window(9, 5),
    "hf_and_padding": hf_style_and(causal_mask, lambda b, h, q, kv: kv % 7 != 3),
    "morton_natten": morton_natten(2),
    "nested_torch_combinators": torch_flex.or_masks(torch_flex.and_masks(gym_prefix_lm(4), morton_natten(1)),
                                                    lambda b, h, q, kv: q == kv),
}


def _states(bm, B, H):
    """[B, H, nQ, nKV] int8: 0 empty, 1 partial, 2 full, from the BCSR tensors."""
    nq = bm.kv_num_blocks.shape[-1]
    nkv = bm.kv_indices.shape[-1]
    out = torch.zeros(B, H, nq, nkv, dtype=torch.int8)
    for tensors, value in (((bm.kv_num_blocks, bm.kv_indices), 1), ((bm.full_kv_num_blocks, bm.full_kv_indices), 2)):
        num, idx = tensors
        if num is None:
            continue
        num, idx = num.expand(B, H, nq).cpu(), idx.expand(B, H, nq, idx.shape[-1]).cpu()
        for b in range(B):
            for h in range(H):
                for i in range(nq):
                    out[b, h, i, idx[b, h, i, :num[b, h, i]].long()] = value
    return out


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("L, S, block", [(256, 256, 32), (113, 200, 16)])
def test_block_mask_equals_torch_create_block_mask(name, L, S, block):
    mm = MASKS[name]
    ours = flexattn.create_block_mask(mm, 2, 2, L, S, BLOCK_SIZE=block)
    theirs = torch_flex.create_block_mask(mm, 2, 2, L, S, device="cpu", BLOCK_SIZE=block)
    a, b = _states(ours, 2, 2), _states(theirs, 2, 2)
    assert torch.equal(a, b), f"{int((a != b).sum())} blocks differ"
    assert torch.equal(flexattn.create_mask(mm, 2, 2, L, S), torch_flex.create_mask(mm, 2, 2, L, S, device="cpu"))


@pytest.mark.parametrize("name", sorted(MASKS))
def test_attention_with_torch_composed_masks_equals_the_reference(name):
    mm = MASKS[name]
    L, S = 70, 96
    q, k, v = make_qkv(B=1, Hq=2, L=L, S=S, E=16)
    bm = flexattn.create_block_mask(mm, None, None, L, S, BLOCK_SIZE=16)
    _assert_attention_like_reference(q, k, v, None, mm, bm)


# ---- activations: derivatives against torch.autograd, attention against the reference -----

SCORE_MODS = {
    "gelu": lambda s, b, h, q, kv: F.gelu(s),
    "gelu_tanh": lambda s, b, h, q, kv: F.gelu(s, approximate="tanh"),
    "silu": lambda s, b, h, q, kv: F.silu(s),
    "relu": lambda s, b, h, q, kv: F.relu(s) + torch.relu(s - 0.5),
    "softplus": lambda s, b, h, q, kv: F.softplus(s) + F.softplus(s, beta=3.0, threshold=2.0),
    "erf_sigmoid": lambda s, b, h, q, kv: torch.erf(s / 2) * 3 + torch.sigmoid(s) - s.sigmoid() * s,
    "log1p": lambda s, b, h, q, kv: torch.log1p(s.abs()) - torch.log1p(-0.5 * torch.sigmoid(s)),
    "gelu_bias_shift": lambda s, b, h, q, kv: F.gelu(s + ((q >> 2) - (kv >> 2)).float() * 0.1),
    # atan2(y, s)'s y stays 0.05 or more from 0 (y = 0 at kv - q = -3.5): with y = 0.1 * n + 0.3
    # the GPU's one-rounding fma left y = 7e-9 at n = -3 where torch's two roundings leave 0, and
    # d/ds = -y / (s^2 + y^2) turned that into a 4e-4 difference in dq (measured on the H200)
    "expm1_fmod_atan2": lambda s, b, h, q, kv: torch.expm1(s * 0.3) - torch.fmod(s, 0.7) * 2
    + torch.atan2(s, (q - kv).float() + 0.5) + torch.atan2((kv - q).float() * 0.1 + 0.35, s) + s.fmod(q.float() + 1.5),
    "rounding": lambda s, b, h, q, kv: s + torch.round(s * 2) * 0.1 + torch.trunc(s) * 0.2 + torch.sign(s) * 0.3
    + s.frac() + torch.round(s, decimals=1),
    "nan_inf_guards": lambda s, b, h, q, kv: torch.where(torch.isnan(s) | torch.isinf(s * 1e37), 0.0, s)
    + torch.isfinite(s).float(),
}


@pytest.mark.parametrize("name", sorted(SCORE_MODS))
def test_derivatives_equal_torch_autograd(name):
    fn = SCORE_MODS[name]
    d = differentiate(trace_score(fn))
    g = d.graph._with_buffers(d.graph.buffers)
    g.output = d.dscore
    # kinks and branch points included: relu at 0, softplus at its thresholds, large scores
    s = torch.cat([torch.linspace(-9, 9, 721), torch.tensor([0.0, 0.5, 20.0, 2.0 / 3.0, 60.0, 100.0, -100.0])])
    s = s.double().reshape(-1, 1).expand(-1, 3).contiguous().requires_grad_()
    q_idx = torch.tensor([[0, 5, 17]], dtype=torch.int32)
    kv_idx = torch.tensor([[3, 3, 4]], dtype=torch.int32)
    zero = torch.tensor(0, dtype=torch.int32)
    want = torch.autograd.grad(fn(s, zero, zero, q_idx, kv_idx).sum(), s)[0]
    got = evaluate(g, score=s.detach(), b=zero, h=zero, q_idx=q_idx, kv_idx=kv_idx)
    assert not got.isnan().any()
    # the derivative graph is float32 IR: a where() of two constants (a branch's 0 / 1
    # adjoint) is float32 under torch's promotion even when the score is float64, so
    # agreement is to float32 rounding (a wrong rule is off by O(1))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(SCORE_MODS))
def test_attention_with_activation_score_mods_equals_the_reference(name):
    fn = SCORE_MODS[name]
    L, S = 40, 56
    q, k, v = make_qkv(B=1, Hq=2, L=L, S=S, E=16)
    _assert_attention_like_reference(q, k, v, fn, None)


# ---- the Triton printer under TRITON_INTERPRET=1 ----------------------------------------------

# (kind, mod): printed, run on a [M, N] tile of indices by the interpreter, compared with the
# IR's torch evaluation: integer-valued results exactly, float ones to float32 rounding.
PRINTED_MODS = {
    # shifts with torch's semantics: negative values (arithmetic >>), literal amounts outside
    # [0, 32), amounts computed per element (negative and >= 32 included), int64, uint8
    "shift_literals": ("score", "lambda s, b, h, q, kv: (((q - 40) >> 3) + ((kv - 50) << 2) + ((q - kv) >> 40)"
                                " + ((q + 1) << 33) + ((kv - 60) >> -1) + (q << -2)).float()"),
    "shift_amounts": ("score", "lambda s, b, h, q, kv: (((q - 40) >> (kv - 8)) + ((kv + 1) << (q - 8))"
                               " + ((q.long() - 30) << (kv % 70)).float() / 1e15 + (1 << (kv % 40))).float()"),
    "shift_uint8_int64": ("score", "lambda s, b, h, q, kv: ((q.to(torch.uint8) >> (kv % 12)).float()"
                                   " + (q.to(torch.uint8) << 3).float() + ((q - 70).long() >> 2).float())"),
    "morton_mask": ("mask", "morton_natten(2)"),
    "activations": ("score", "lambda s, b, h, q, kv: F.gelu(s) + F.gelu(s, approximate='tanh') + F.silu(s)"
                              " + F.relu(s) + F.softplus(s) + F.softplus(s, beta=2.0, threshold=3.0)"),
    "erf_log1p": ("score", "lambda s, b, h, q, kv: torch.erf(s) + torch.log1p(s.abs() * 1e-6) * 1e6"
                           " + torch.log1p(s * 0.03) + torch.log1p(s * 0 + float('inf')).clamp(max=7.0)"
                           " + torch.erf((q - kv).half()).float()"),
    # rounding ops on exact halves and signed zeros (1 / +-0 -> +-inf, clamped), NaN's sign 0
    "round_trunc_sign": ("score", "lambda s, b, h, q, kv: torch.round((q - kv).float() * 0.5) + torch.round(s * 3.3)"
                                  " + (1 / torch.round(s * 0.01)).clamp(-5, 5) + torch.trunc(s / 7)"
                                  " + (1 / torch.trunc(s * 0.02)).clamp(-5, 5) + torch.round(s, decimals=1)"
                                  " + torch.sign(s) + torch.sign(q - kv).float() + torch.sign(s * 0 / 0)"
                                  " + torch.round(q - kv).float() + torch.round((q - kv).half() * 0.5).float()"),
    "expm1": ("score", "lambda s, b, h, q, kv: torch.expm1(s * 0.2) + torch.expm1(s * 1e-6) * 1e6"
                       " + torch.expm1(s * 5).clamp(max=50.0) + torch.expm1(s * 0 - float('inf'))"
                       " + torch.expm1((q - kv).half() * 0.125).float()"),
    # atan2 in every quadrant, on the axes, at signed zeros and infinities; fmod of both signs
    "fmod_atan2": ("score", "lambda s, b, h, q, kv: torch.fmod(s, 2.5) + torch.fmod(s, -1.3) + torch.fmod(q - kv, 7).float()"
                            " + torch.fmod(kv - 40, q + 1).float() + torch.atan2(s, (q - kv).float())"
                            " + torch.atan2((q - kv).float(), s) + torch.atan2(s * 0, s * 0 - 1)"
                            " + torch.atan2(s * 0, s * 0) + torch.atan2(1 / (s * 0), s) + torch.atan2(s, 1 / (s * 0))"
                            " + torch.atan2(1 / (s * 0), 1 / (s * 0)) + torch.atan2(q, kv)"),
    # a 16-bit value times / by a Python number: torch computes in float32 with the number
    # as it is (not rounded to float16 first); + and - round the number to float16 first
    "float16_scaling": ("score", "lambda s, b, h, q, kv: ((q - kv).half() * 0.1).float() + ((kv + 3).half() / 7.0).float()"
                                 " + (0.3 * (q * 3).half() + 0.7).float() + ((q - 2 * kv).half() * 0.3 - 0.01).float()"
                                 " + (s.half() * 1.1).float()"),
    # rows of captured tensors (MLA's RoPE term): the printed loop over the row
    "rows": ("score", "lambda s, b, h, q, kv: s + torch.dot(ROWS_Q[q], ROWS_KV[kv]) * 0.5"
                      " + (torch.tanh(ROWS_Q[q]) * s - ROWS_KV[kv % 3] / 3).sum(-1) + ROWS_INT[q % 4].sum()"),
    "isnan_isinf": ("score", "lambda s, b, h, q, kv: torch.isnan(s * 0 / 0).float() + torch.isinf(1 / (s * 0)).float()"
                             " + torch.isinf(s).float() * 3 + torch.isnan(q).float() + torch.isinf(kv).float()"
                             " + torch.isfinite(s).float() * 5 + torch.where(s.isposinf() | (1 / (s * 0)).isneginf(), 7.0, 0.0)"),
}

_PRINTED_SCRIPT = r'''
import json, sys, torch, torch.nn.functional as F, triton, triton.language as tl
sys.path[:0] = [sys.argv[1]]
from flexattn import codegen, lift_params, source_cache
from flexattn.evaluate import evaluate
from flexattn.trace import trace_mask, trace_score
from test_torch_mods import morton_natten, PRINTED_MODS, ROWS_Q, ROWS_KV, ROWS_INT
from flexattn.kernels.interpreter import apply_interpreter_fix
apply_interpreter_fix()  # what the kernels' loader does: loop bounds from scalar arguments
M, N = 64, 64
qi = torch.arange(M, dtype=torch.int32)
ki = torch.arange(N, dtype=torch.int32) + 7
sc = torch.linspace(-30, 30, M * N).reshape(M, N)
bad = []
for name, (kind, src) in PRINTED_MODS.items():
    fn = eval(src)
    g = trace_score(fn) if kind == "score" else trace_mask(fn)
    kg = lift_params.kernel_graph(g)
    params = ", ".join(codegen.buffer_params(kg, "sb"))
    call = ("m(s, 0, 0, q, kv" if kind == "score" else "m(0, 0, q, kv") + (", " + params if params else "") + ")"
    mod = source_cache.load_module(codegen.PRELUDE + codegen.mod_function("m", kg, kind, "sb") + f"""
@triton.jit
def k(QI, KI, SC, OUT, {params + ', ' if params else ''}M: tl.constexpr, N: tl.constexpr):
    q = tl.load(QI + tl.arange(0, M))[:, None]
    kv = tl.load(KI + tl.arange(0, N))[None, :]
    o = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    s = tl.load(SC + o)
    tl.store(OUT + o, ({call}).to(tl.float32) + tl.zeros([M, N], tl.float32))
""", "printed_" + name)
    out = torch.empty(M, N)
    mod.k[(1,)](qi, ki, sc, out, *codegen.buffer_args(kg), M=M, N=N)
    z = torch.tensor(0, dtype=torch.int32)
    args = dict(b=z, h=z, q_idx=qi[:, None], kv_idx=ki[None, :])
    want = (evaluate(g, score=sc, **args) if kind == "score" else evaluate(g, **args)).float()
    gold = evaluate(g, score=sc.double(), **args).double() if kind == "score" else want.double()
    err = (out.double() - gold).abs().max().item()
    ref_err = (want.double() - gold).abs().max().item()
    if not err <= 2 * ref_err + 4e-6 * max(1.0, gold.abs().max().item()):
        bad.append(f"{name}: max error {err} (torch float32: {ref_err})")
print("RESULT " + json.dumps(bad))
'''


ROWS_Q = torch.randn(64, 12, generator=torch.Generator().manual_seed(7))
ROWS_KV = torch.randn(80, 12, generator=torch.Generator().manual_seed(8))
ROWS_INT = torch.randint(-9, 9, (4, 5), generator=torch.Generator().manual_seed(9), dtype=torch.int32)


def test_printed_mods_run_like_torch_in_triton():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=ROOT + os.pathsep + HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _PRINTED_SCRIPT, ROOT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=HERE)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(lines[-1][7:]) == []


def test_printed_shifts_are_bare_for_literal_amounts():
    from flexattn import codegen, lift_params
    g = lift_params.kernel_graph(flexattn.trace.trace_mask(morton_natten(2)))
    src = codegen.mod_function("m", g, "mask", "sb")
    body = src.split("# mask_mod")[0]
    assert ">> 1" in body and ">> 8" in body and "tl.where" not in body  # no run-time range test
    assert "sbp" in src  # the masks (and the radius) are kernel arguments, the amounts are not
    assert not any(f">> sbp{i}" in src for i in range(len(g.params)))


def test_unsupported_pointwise_op_names_op_line_and_fix():
    def mod(score, b, h, q_idx, kv_idx):
        return torch.tan(score)
    with pytest.raises(flexattn.TraceError) as e:
        flexattn.trace_score(mod)
    msg = str(e.value)
    assert "torch.tan is not supported" in msg and "return torch.tan(score)" in msg and "fix:" in msg
    with pytest.raises(flexattn.TraceError, match=r"\.tan\(\) is not supported"):
        flexattn.trace_score(lambda s, b, h, q, kv: s.tan())
    with pytest.raises(flexattn.TraceError, match=r"round\(decimals=1\) of an integer value"):
        flexattn.trace_mask(lambda b, h, q, kv: (q - kv).round(decimals=1) == 0)
    with pytest.raises(flexattn.TraceError, match="round with decimals of type float"):
        flexattn.trace_score(lambda s, b, h, q, kv: s.round(decimals=1.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["expm1_fmod_atan2", "rounding", "nan_inf_guards"])
def test_pointwise_score_mods_in_gpu_kernels(name):
    """The printed pointwise ops compiled for the GPU: forward and backward kernels against the
    float64 reference (out, dq, dk, dv), with a causal mask over several blocks."""
    fn = SCORE_MODS[name]
    L = S = 300
    q, k, v = make_qkv(B=1, Hq=2, L=L, S=S, E=64, device="cuda")
    causal = lambda b, h, qi, kv: qi >= kv  # noqa: E731
    bm = flexattn.create_block_mask(causal, None, None, L, S, device="cuda")
    _assert_attention_like_reference(q, k, v, fn, causal, bm)


# ---- MLA's decoupled RoPE: rows of captured tensors reduced in the score_mod -----------------

def _assert_zoo_mod_like_golden(name, *, B=1, Hq=4, Hkv=2, L=40, S=56, E=16, dtype=torch.float32,
                                device="cpu", kernel_options=None):
    """flexattn's out, lse and the gradients of q, k, v and every captured tensor for the zoo
    mod `name` (GQA) against the reference in the test dtype and the float64 golden."""
    def build(buffer_dtype):
        return make_mod(name, B=B, H=Hq, L=L, S=S, device=device, buffer_dtype=buffer_dtype, requires_grad=True)
    m, m_ref, m64 = build(dtype), build(dtype), build(torch.float64)
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, dtype=dtype, device=device)
    bm = flexattn.create_block_mask(m.mask_mod, B, Hq, L, S, device=device) if m.mask_mod else None
    out, lse = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm, enable_gqa=True,
                                       return_lse=True, kernel_options=kernel_options)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    got = torch.autograd.grad(out, [q, k, v] + list(m.captured.values()), go.to(dtype))
    results = []
    for mod, cast in ((m_ref, dtype), (m64, torch.float64)):
        qr, kr, vr = [x.detach().to(cast).requires_grad_() for x in (q, k, v)]
        o, l = reference_attention(qr, kr, vr, mod.reference_score_mod or mod.score_mod, mod.mask_mod,
                                   enable_gqa=True)
        results.append((o, l, torch.autograd.grad(o, [qr, kr, vr] + list(mod.captured.values()), go.to(cast))))
    (ro, rl, rg), (go64, gl, gg) = results
    assert_close_to_golden("out", out, ro, go64)
    assert_close_to_golden("lse", lse, rl, gl)
    for nm, a, r, g in zip(["dq", "dk", "dv"] + list(m.captured), got, rg, gg):
        assert_close_to_golden(nm, a, r, g)


@pytest.mark.parametrize("name", ["mla_rope", "mla_rope_dot"])
def test_mla_rope_score_mod_on_the_cpu_path(name):
    """MLA's score_mod (both spellings; k_rope shared by all heads or by a group of heads)
    with GQA on the CPU path: out, lse and every gradient, q_rope and k_rope included."""
    _assert_zoo_mod_like_golden(name, kernel_options={"BACKEND": "cpu"})


def test_mla_rope_score_mod_traces_to_a_rowsum():
    m = make_mod("mla_rope_dot", B=1, H=4, L=8, S=8)
    text = str(flexattn.trace_score(m.score_mod))
    assert "float32[:] = buf0[b, h, q_idx, :]" in text and ".sum(-1)" in text


def test_float16_scaling_by_a_number_like_torch():
    """A captured float16 tensor times / by a Python number: torch's arithmetic multiplies in
    float32 with the number as it is (not rounded to float16 first) and rounds the product to
    float16; flexattn's CPU path does the same (the Triton printer's case is `float16_scaling`
    in PRINTED_MODS). torch's own flex_attention is not consistent here: eager (vmap) rounds
    the number to float16 first - flexattn given that rounded number matches it - and
    torch.compile keeps the product in float32."""
    bias = (torch.randn(2, 48, generator=torch.Generator().manual_seed(4)) * 20).half()

    def mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx] * 0.1 - bias[h, q_idx] / 3.0

    def mod_rounded(score, b, h, q_idx, kv_idx):  # the numbers as torch's vmap sees them
        return score + bias[h, kv_idx] * torch.tensor(0.1).half() - bias[h, q_idx] / torch.tensor(3.0).half()

    q, k, v = make_qkv(B=1, Hq=2, L=48, S=48, E=16, requires_grad=False)
    cpu = {"BACKEND": "cpu"}
    ref, _ = reference_attention(q, k, v, mod)
    torch.testing.assert_close(flexattn.flex_attention(q, k, v, score_mod=mod, kernel_options=cpu), ref,
                               rtol=1e-5, atol=1e-6)
    torch_eager = torch_flex.flex_attention(q, k, v, score_mod=mod)
    got_rounded = flexattn.flex_attention(q, k, v, score_mod=mod_rounded, kernel_options=cpu)
    torch.testing.assert_close(got_rounded, torch_eager, rtol=1e-5, atol=1e-6)
    assert (ref - torch_eager).abs().max() > 1e-4  # the two roundings differ visibly here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, dtype", [("mla_rope", torch.float16), ("mla_rope_dot", torch.bfloat16),
                                         ("mla_rope_dot", torch.float32)])
@pytest.mark.parametrize("backend", ["triton", "auto"])  # auto: the Triton forward on sm90 too (no Gluon row dot)
def test_mla_rope_score_mod_in_gpu_kernels(name, dtype, backend):
    """The row loop compiled for the GPU: forward and backward kernels (out, lse, dq, dk, dv,
    dq_rope, dk_rope) against the float64 reference, over several blocks, GQA, and with
    DETERMINISTIC (fixed-point atomics for the rows' gradients)."""
    opts = {"BACKEND": backend}
    _assert_zoo_mod_like_golden(name, B=2, Hq=8, Hkv=2, L=300, S=333, E=64, dtype=dtype, device="cuda",
                                kernel_options=opts)
    _assert_zoo_mod_like_golden(name, B=1, Hq=4, Hkv=4, L=257, S=129, E=128, dtype=dtype, device="cuda",
                                kernel_options=dict(opts, DETERMINISTIC=True))
