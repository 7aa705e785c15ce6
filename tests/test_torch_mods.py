"""Mods written the way torch FlexAttention users write them: composed with torch's own
`and_masks` / `or_masks` (attention-gym's sliding window, prefix-LM, global sliding window),
NATTEN in Morton order (bit shifts), activations in score_mods.

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
    "expm1_fmod_atan2": lambda s, b, h, q, kv: torch.expm1(s * 0.3) - torch.fmod(s, 0.7) * 2
    + torch.atan2(s, (q - kv).float() + 0.5) + torch.atan2((kv - q).float() * 0.1 + 0.3, s) + s.fmod(q.float() + 1.5),
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
from test_torch_mods import morton_natten, PRINTED_MODS
M, N = 64, 64
qi = torch.arange(M, dtype=torch.int32)
ki = torch.arange(N, dtype=torch.int32) + 7
sc = torch.linspace(-30, 30, M * N).reshape(M, N)
bad = []
for name, (kind, src) in PRINTED_MODS.items():
    fn = eval(src)
    g = trace_score(fn) if kind == "score" else trace_mask(fn)
    kg = lift_params.kernel_graph(g)
    params = ", ".join(codegen.param_names(kg, "sb"))
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
    mod.k[(1,)](qi, ki, sc, out, *kg.params, M=M, N=N)
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
