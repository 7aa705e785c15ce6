"""The generated Triton kernels under TRITON_INTERPRET=1 on CPU tensors (fp32/fp16).

TRITON_INTERPRET must be set before any @triton.jit function is built, and other test
files in the same pytest process use Triton normally - so each group of cases runs in a
fresh subprocess (`python tests/test_kernels_interpret.py GROUP`), which prints one JSON
line of failures; the pytest test of that group asserts there are none. Every check is
the numerics rule of DESIGN.md (conftest.assert_close_to_golden) against the float64
reference, for out, lse and every gradient (q, k, v and captured float tensors).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ZOO = ("none", "causal", "sliding_window", "prefix_lm", "document", "dilated_sliding_window",
       "natten_2d", "alibi_causal", "softcap", "rel_bias", "per_head_scale", "multi_read",
       "empty_rows", "and_or", "softcap_document", "padding_bias")

# group -> list of case kwargs for `_check`
GROUPS = {
    "zoo_fp32": [dict(name=n) for n in ZOO],
    "zoo_fp16": [dict(name=n, dtype="float16", L=48, S=80, Hq=4, Hkv=2) for n in ZOO],
    "shapes": [
        dict(name="causal", L=1, S=17, E=16, bwd=False),
        dict(name="document", L=17, S=113, E=80, Ev=48, Hq=4, Hkv=2),
        dict(name="rel_bias", L=127, S=129, E=64, dtype="float16"),
        dict(name="sliding_window", L=129, S=127, E=128, Ev=32, block=64),
        dict(name="none", L=113, S=1, E=32, bwd=False),
        dict(name="alibi_causal", L=113, S=113, E=32, Hq=4, Hkv=1),
        dict(name="prefix_lm", L=64, S=64, E=32, noncontig=True),
        dict(name="softcap", L=40, S=72, E=16, block=16, opts={"BLOCK_M": 16, "BLOCK_N": 16}),
    ],
    "special": [
        dict(name="empty_rows", L=80, S=80, dtype="float16"),
        dict(name="multi_read", L=64, S=64, deterministic=True),
        dict(name="causal", L=4, S=300, Hq=4, Hkv=2, E=32, bwd=False, opts={"FORCE_DECODE": True}),
        dict(name="rel_bias", L=1, S=200, Hq=4, Hkv=4, E=32, bwd=False, opts={"FORCE_DECODE": True}),
        dict(name="document", L=3, S=100, Hq=2, E=16, bwd=True, opts={"FORCE_DECODE": True}),
        dict(name="causal", L=64, S=64, dropout=0.3),
        dict(name="alibi_causal", L=64, S=64, dropout=0.2, dtype="float16", Hq=4, Hkv=2),
        dict(check="new_constants"),
        # the forward takes the row max before scaling only when the scale is positive: a
        # negative one reverses the max, and 0 * -inf (a masked score) is NaN
        dict(name="causal", L=64, S=64, scale=-0.3),
        dict(name="sliding_window", L=64, S=64, scale=0.0),
        dict(name="alibi_causal", L=64, S=64, scale=-0.2),
        # a gradient into lse as well as out (the dq kernel folds dlse into delta), with
        # fully masked rows (lse -inf) and a length that is not a multiple of the block
        dict(name="empty_rows", L=80, S=80, lse_grad=True),
        dict(name="alibi_causal", L=50, S=70, Hq=4, Hkv=2, dtype="float16", lse_grad=True),
        # dk and dv in two launches (the GPU's default for head dims over 128): score_mod
        # derivative, captured-tensor gradients, dropout, GQA, Ev != E, odd lengths
        dict(name="softcap_document", L=50, S=70, Hq=4, Hkv=2, E=32, Ev=16, opts={"bwd_SPLIT_DKDV": True}),
        dict(name="multi_read", L=64, S=64, deterministic=True, opts={"bwd_SPLIT_DKDV": True}),
        dict(name="alibi_causal", L=64, S=64, dropout=0.2, opts={"bwd_SPLIT_DKDV": True}),
        # dq from the dk/dv kernel by float32 atomics: score_mod derivative and captured-tensor
        # gradients, GQA, Ev != E, a head dim under its padding, odd lengths, dropout, lse
        # gradient, fully masked rows, and with dk / dv split
        dict(name="softcap_document", L=50, S=70, Hq=4, Hkv=2, E=24, Ev=16, opts={"bwd_ATOMIC_DQ": True}),
        dict(name="multi_read", L=64, S=64, opts={"bwd_ATOMIC_DQ": True}),
        dict(name="alibi_causal", L=64, S=64, dropout=0.2, lse_grad=True, opts={"bwd_ATOMIC_DQ": True}),
        dict(name="empty_rows", L=80, S=80, opts={"bwd_ATOMIC_DQ": True}),
        dict(name="rel_bias", L=50, S=70, Hq=4, Hkv=2, opts={"bwd_ATOMIC_DQ": True, "bwd_SPLIT_DKDV": True}),
    ],
    # rows of captured tensors reduced in the score_mod (MLA's RoPE term): the row loop in
    # the forward and backward kernels and the row gradients' atomics (fixed point too)
    "rows": [
        dict(name="mla_rope", L=40, S=48, Hq=4, Hkv=2, E=16, lse_grad=True),
        dict(name="mla_rope_dot", L=32, S=40, Hq=4, Hkv=2, E=16, dtype="float16"),
        dict(name="mla_rope_dot", L=33, S=40, Hq=2, Hkv=1, E=16, deterministic=True, opts={"bwd_SPLIT_DKDV": True}),
        # the decode kernel packs query heads into the tile's rows: h is a tile there, and
        # k_rope[b, h // 2, kv_idx] varies along both axes (one kv head, four query heads)
        dict(name="mla_rope_dot", L=3, S=70, Hq=4, Hkv=1, E=16, bwd=False, opts={"FORCE_DECODE": True}),
    ],
}


def _check(name, L=64, S=64, E=32, Ev=None, B=1, Hq=2, Hkv=None, dtype="float32", bwd=True, block=32,
           opts=None, noncontig=False, deterministic=False, dropout=0.0, scale=None, lse_grad=False):
    import torch
    import flexattn
    from flexattn.reference import reference_attention
    from flexattn.dropout import dropout_mask
    from conftest import assert_close_to_golden, make_qkv
    from mods_zoo import make_mod
    dtype = getattr(torch, dtype)
    Hkv = Hkv or Hq
    m = make_mod(name, B=B, H=Hq, L=L, S=S, requires_grad=bwd)
    m_ref = make_mod(name, B=B, H=Hq, L=L, S=S, buffer_dtype=dtype, requires_grad=bwd)
    m64 = make_mod(name, B=B, H=Hq, L=L, S=S, buffer_dtype=torch.float64, requires_grad=bwd)
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev, dtype=dtype)
    if noncontig:  # (B, S, H, D) storage seen through a transpose
        q, k, v = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    bm = flexattn.create_block_mask(m.mask_mod, B, Hq, L, S, BLOCK_SIZE=block) if m.mask_mod else None
    options = dict(opts or {}, BACKEND="triton")
    if deterministic:
        options["DETERMINISTIC"] = True
    seed = 1234
    out, lse = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm, scale=scale,
                                       enable_gqa=Hq != Hkv, return_lse=True, kernel_options=options,
                                       dropout_p=dropout, dropout_seed=seed if dropout else None)
    keep = dropout_mask(seed, B, Hq, L, S, dropout) if dropout else None
    qr, kr, vr = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ro, rl = reference_attention(qr, kr, vr, m_ref.reference_score_mod or m_ref.score_mod, m_ref.mask_mod,
                                 scale=scale, enable_gqa=True, dropout_keep=keep, dropout_p=dropout)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    go64, gl = reference_attention(q64, k64, v64, m64.reference_score_mod or m64.score_mod, m64.mask_mod,
                                   scale=scale, enable_gqa=True, dropout_keep=keep, dropout_p=dropout)
    assert_close_to_golden("out", out, ro, go64)
    assert_close_to_golden("lse", lse, rl.float() if dtype != torch.float32 else rl, gl)
    if not bwd:
        return
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    ins = [q, k, v] + list(m.captured.values())
    # with lse_grad, backpropagate through out and lse together (an empty row's -inf lse: none)
    glse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    glse = glse.masked_fill(gl.isinf(), 0.0) if lse_grad else None

    def grads(o, l, inputs):
        if glse is None:
            return torch.autograd.grad(o, inputs, go.to(o.dtype), allow_unused=True)
        return torch.autograd.grad((o, l.masked_fill(l.isinf(), 0.0)), inputs,
                                   (go.to(o.dtype), glse.to(l.dtype)), allow_unused=True)
    got = grads(out, lse, ins)
    ref = grads(ro, rl, [qr, kr, vr] + list(m_ref.captured.values()))
    gold = grads(go64, gl, [q64, k64, v64] + list(m64.captured.values()))
    for nm, a, r, g in zip(["dq", "dk", "dv"] + list(m.captured), got, ref, gold):
        assert_close_to_golden(nm, a, torch.zeros_like(a) if r is None else r,
                               torch.zeros_like(a, dtype=torch.float64) if g is None else g)
    if deterministic:  # a second run gives bitwise the same gradients
        out2 = flexattn.flex_attention(q, k, v, score_mod=m.score_mod, block_mask=bm, kernel_options=options,
                                       enable_gqa=Hq != Hkv)
        again = torch.autograd.grad(out2, ins, go)
        for nm, a, b in zip(["dq", "dk", "dv"] + list(m.captured), got, again):
            assert torch.equal(a, b), f"{nm} differs between two DETERMINISTIC runs"


def _check_new_constants_reuse_kernels():
    """Mods that differ only in a Python number (window width, softcap) run the kernels
    compiled for the first one - the numbers are kernel arguments - and stay exact."""
    import torch
    import flexattn
    from flexattn import source_cache
    from flexattn.reference import reference_attention
    from conftest import assert_close_to_golden, make_qkv

    def window(w):
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= w)

    def softcap(c):
        return lambda score, b, h, q_idx, kv_idx: c * torch.tanh(score / c)

    L = S = 64
    modules = []
    for w, c in ((10, 20.0), (23, 2.5), (1, 16.0)):
        q, k, v = make_qkv(B=1, Hq=2, Hkv=2, L=L, S=S, E=32, dtype=torch.float32)
        bm = flexattn.create_block_mask(window(w), None, None, L, S, BLOCK_SIZE=32)
        out = flexattn.flex_attention(q, k, v, score_mod=softcap(c), block_mask=bm,
                                      kernel_options={"BACKEND": "triton"})
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        got = torch.autograd.grad(out, [q, k, v], go)
        modules.append(len(source_cache._MODULES))
        qr, kr, vr = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ro, _ = reference_attention(qr, kr, vr, softcap(c), window(w))
        q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
        go64, _ = reference_attention(q64, k64, v64, softcap(c), window(w))
        assert_close_to_golden(f"out (w={w}, c={c})", out, ro, go64)
        ref = torch.autograd.grad(ro, [qr, kr, vr], go)
        gold = torch.autograd.grad(go64, [q64, k64, v64], go.double())
        for nm, a, r, g in zip(["dq", "dk", "dv"], got, ref, gold):
            assert_close_to_golden(f"{nm} (w={w}, c={c})", a, r, g)
    assert modules[0] == modules[1] == modules[2], f"new constants generated new kernel modules: {modules}"


CHECKS = {"mod": _check, "new_constants": _check_new_constants_reuse_kernels}


def _main(group: str) -> None:
    sys.path[:0] = [ROOT, HERE]
    failures = []
    for case in GROUPS[group]:
        try:
            case = dict(case)
            CHECKS[case.pop("check", "mod")](**case)
        except Exception as e:  # noqa: BLE001 - report every failing case, not just the first
            failures.append(f"{case}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
    print("RESULT " + json.dumps(failures))


def _run_group(group: str) -> list[str]:
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=ROOT + os.pathsep + HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("FLEXATTN_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "flexattn"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), group], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise AssertionError(f"group {group} crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_kernels_interpreted(group):
    failures = _run_group(group)
    assert not failures, f"{len(failures)} case(s) failed in group {group}:\n" + "\n".join(failures)


if __name__ == "__main__":
    _main(sys.argv[1])
