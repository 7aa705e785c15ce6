"""return_aux=AuxRequest(max_scores=True): each row's largest score after scale, score_mod
and mask (natural units, -inf on fully masked rows, lse's dtype, not differentiable), as
torch.nn.attention.flex_attention returns it.

The CPU path is checked here against the float64 reference under the numerics rule and
against torch's own computation (its flex_attention higher-order op on CPU, whose dense
implementation returns the max in log2 units that torch's front end multiplies by ln 2;
torch's public CPU entry point raises for max_scores). The Triton kernels run under
TRITON_INTERPRET=1 in a subprocess (`python tests/test_max_scores.py`), the compiled path
under torch.compile(fullgraph=True), and the GPU forwards (Triton, Hopper, decode) under
the `gpu` marker.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback

import pytest
import torch

from conftest import assert_close_to_golden, make_qkv
from mods_zoo import ZOO_NAMES, make_mod
import flexattn
from flexattn import AuxRequest, create_block_mask, flex_attention
from flexattn.reference import reference_attention

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BOTH = AuxRequest(lse=True, max_scores=True)


def check_max(name, *, B=2, Hq=4, Hkv=2, L=129, S=113, E=32, dtype=torch.float32, device="cpu", block=(32, 16),
              kernel_options=None, grad=False, stats_eps=None):
    """flex_attention(..., return_aux=AuxRequest(lse=True, max_scores=True)) for zoo mod
    `name`: out, lse and max_scores under the numerics rule against the float64 golden
    (stats_eps: the rule's eps for lse and max_scores relative to the golden's scale, as
    the GPU tests give the lse: the kernels' float32 scores against a reference in the
    test dtype)."""
    m = make_mod(name, B=B, H=Hq, L=L, S=S, device=device)
    m64 = make_mod(name, B=B, H=Hq, L=L, S=S, device=device, buffer_dtype=torch.float64)
    q, k, v = make_qkv(B, Hq, Hkv, L, S, E, dtype=dtype, device=device, requires_grad=grad)
    bm = None if m.mask_mod is None else create_block_mask(m.mask_mod, None, None, L, S, device=device,
                                                           BLOCK_SIZE=block)
    gqa = Hq != Hkv
    out, aux = flex_attention(q, k, v, m.score_mod, bm, enable_gqa=gqa, return_aux=BOTH,
                              kernel_options=kernel_options)
    ref = reference_attention(q, k, v, m.score_mod, m.mask_mod, enable_gqa=gqa, max_scores=True)
    gold = reference_attention(*[x.detach().double() for x in (q, k, v)], m64.score_mod, m64.mask_mod,
                               enable_gqa=gqa, max_scores=True)
    for label, got, r, g in zip(("out", "lse", "max_scores"), (out, aux.lse, aux.max_scores), ref, gold):
        eps = None
        if stats_eps is not None and label != "out":
            eps = stats_eps * max(1.0, g[g.isfinite()].abs().max().item() if g.isfinite().any() else 1.0)
        assert_close_to_golden(f"{name} {label}", got, r, g, eps=eps)
    assert aux.max_scores.dtype == aux.lse.dtype and aux.max_scores.shape == (B, Hq, L)
    assert not aux.max_scores.requires_grad
    if m.has_empty_rows:
        assert gold[2].isinf().any()  # the case does test fully masked rows
    return q, k, v, m, bm, out, aux


# ---- CPU path ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_cpu(name):
    check_max(name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["causal", "alibi_causal", "empty_rows", "rel_bias"])
def test_dtypes_cpu(name, dtype):
    check_max(name, dtype=dtype, B=1, Hq=2, Hkv=1, L=97, S=130)


@pytest.mark.parametrize("L,S", [(1, 17), (17, 1), (113, 127)])
def test_odd_lengths_cpu(L, S):
    check_max("empty_rows" if L > 1 else "causal", L=L, S=S, Hq=4, Hkv=1, block=(16, 16))


def test_tiles_smaller_than_blocks_cpu():
    check_max("document", kernel_options={"BLOCK_M": 16, "BLOCK_N": 8})


def test_not_differentiable_and_gradients_unchanged():
    """max_scores is marked non-differentiable (torch's mark_non_differentiable); asking
    for it changes neither out, lse nor any gradient."""
    q, k, v, m, bm, out, aux = check_max("rel_bias", grad=True)
    assert aux.max_scores.grad_fn is None
    bias = m.captured["bias_table"]
    bias.requires_grad_(True)
    out, aux = flex_attention(q, k, v, m.score_mod, bm, enable_gqa=True, return_aux=BOTH)
    out2, lse2 = flex_attention(q, k, v, m.score_mod, bm, enable_gqa=True, return_lse=True)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    torch.testing.assert_close(aux.lse, lse2, atol=0, rtol=0)
    w = torch.randn_like(aux.lse)
    g1 = torch.autograd.grad((out.sum() + (aux.lse * w).sum() + aux.max_scores.nan_to_num().sum()), [q, k, v, bias])
    g2 = torch.autograd.grad((out2.sum() + (lse2 * w).sum()), [q, k, v, bias])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_only_max_requested():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, requires_grad=False)
    out, aux = flex_attention(q, k, v, return_aux=AuxRequest(max_scores=True))
    assert aux.lse is None
    gold = reference_attention(q.double(), k.double(), v.double(), max_scores=True)[2]
    torch.testing.assert_close(aux.max_scores.double(), gold, atol=1e-5, rtol=1e-5)
    # the maxima bound the lse from below, and lse <= max + log(S)
    _, lse = flex_attention(q, k, v, return_lse=True)
    assert bool((aux.max_scores <= lse + 1e-6).all()) and bool((lse <= aux.max_scores + math.log(40) + 1e-6).all())


def test_mask_only_out_matches_the_fused_path():
    """Mask-only calls asking for max_scores take the plain online softmax (the fused CPU
    kernel keeps no row max): out and lse agree with the fused path's."""
    q, k, v, m, bm, out, aux = check_max("document")
    out2, lse2 = flex_attention(q, k, v, None, bm, enable_gqa=True, return_lse=True)
    torch.testing.assert_close(out, out2, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(aux.lse, lse2, atol=2e-6, rtol=1e-5)


def torch_max_scores(q, k, v, score_mod, mask_mod, scale=None):
    """torch's max_scores through its flex_attention higher-order op (the dense math
    implementation on CPU): the op returns it in log2 units, torch's front end multiplies
    by ln 2 (torch.nn.attention.flex_attention._finalize_outputs)."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
    from torch.nn.attention import flex_attention as tfa
    L, S = q.shape[2], k.shape[2]
    tbm = tfa.create_block_mask(mask_mod or tfa.noop_mask, None, None, L, S, device="cpu")
    opts = {"BACKEND": "AUTO", "PRESCALE_QK": False, "ROWS_GUARANTEED_SAFE": False, "BLOCKS_ARE_CONTIGUOUS": False,
            "WRITE_DQ": True, "OUTPUT_LOGSUMEXP": False, "OUTPUT_MAX": True}
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    _, _, mx = flex_hop(q, k, v, score_mod or (lambda s, b, h, qi, kv: s), tbm.as_tuple(), scale, opts)
    return mx * math.log(2.0)


@pytest.mark.parametrize("name", ["none", "causal", "alibi_causal", "softcap", "rel_bias", "empty_rows",
                                  "padding_bias"])
def test_matches_torch_cpu(name):
    B, H, L, S = 2, 4, 70, 90
    m = make_mod(name, B=B, H=H, L=L, S=S)
    q, k, v = make_qkv(B, H, H, L, S, 16, requires_grad=False)
    bm = None if m.mask_mod is None else create_block_mask(m.mask_mod, None, None, L, S, device="cpu")
    _, aux = flex_attention(q, k, v, m.score_mod, bm, return_aux=AuxRequest(max_scores=True))
    want = torch_max_scores(q, k, v, m.score_mod, m.mask_mod)
    assert aux.max_scores.dtype == want.dtype == torch.float32
    assert torch.equal(aux.max_scores.isinf(), want.isinf())
    torch.testing.assert_close(aux.max_scores, want, atol=1e-5, rtol=1e-5)


def test_negative_scale_cpu():
    """The max is taken after scaling: a negative scale reverses it."""
    q, k, v = make_qkv(1, 2, 2, 33, 47, 16, requires_grad=False)
    causal = make_mod("causal", B=1, H=2, L=33, S=47).mask_mod
    bm = create_block_mask(causal, None, None, 33, 47, device="cpu")
    _, aux = flex_attention(q, k, v, None, bm, scale=-0.3, return_aux=AuxRequest(max_scores=True))
    gold = reference_attention(q.double(), k.double(), v.double(), None, causal, scale=-0.3, max_scores=True)[2]
    torch.testing.assert_close(aux.max_scores.double(), gold, atol=1e-5, rtol=1e-5)


# ---- compiled (torch.compile, fullgraph) -----------------------------------------------

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fullgraph(backend):
    if backend == "inductor":
        import shutil
        if shutil.which("g++") is None and shutil.which("c++") is None:
            pytest.skip("inductor on CPU needs a C++ compiler")
    torch._dynamo.reset()
    m = make_mod("rel_bias", B=2, H=4, L=70, S=50)
    q, k, v = make_qkv(2, 4, 2, 70, 50, 16)
    bm = create_block_mask(m.mask_mod, None, None, 70, 50, device="cpu")

    def f(q, k, v):
        return flex_attention(q, k, v, m.score_mod, bm, enable_gqa=True, return_aux=BOTH)

    out, aux = torch.compile(f, fullgraph=True, backend=backend)(q, k, v)
    e_out, e_aux = f(q, k, v)
    torch.testing.assert_close(aux.max_scores, e_aux.max_scores, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(aux.lse, e_aux.lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, e_out, atol=1e-6, rtol=1e-6)
    assert not aux.max_scores.requires_grad and aux.max_scores.shape == (2, 4, 70)
    g = torch.autograd.grad(out.sum() + aux.lse.sum(), [q, k, v])
    e_g = torch.autograd.grad(e_out.sum() + e_aux.lse.sum(), [q, k, v])
    for a, b in zip(g, e_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # lse only: no max
    _, aux2 = torch.compile(lambda q, k, v: flex_attention(q, k, v, enable_gqa=True, return_aux=AuxRequest(lse=True)),
                            fullgraph=True, backend=backend)(q, k[:, :1], v[:, :1])
    assert aux2.max_scores is None and aux2.lse.shape == (2, 4, 70)


def test_compiled_fake_shapes():
    """The op's fake implementation gives max_scores the real one's shape and dtype, and an
    empty tensor when not asked for."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from flexattn import ops
    from flexattn.autodiff import grad_slots
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, requires_grad=False)
    causal = make_mod("causal", B=1, H=2, L=40, S=40).mask_mod
    bm = create_block_mask(causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    key = ops.register(ops.OpSpec("cpu", None, bm.mask_graph, bm.BLOCK_SIZE, bm.full_kv_num_blocks is not None,
                                  (), grad_slots(None)))
    rest = (ops.blocks_list(bm), [], list(bm.mask_graph.buffers), key, 0.3, 0.0, 0)
    for want in (False, True):
        real = ops.fwd(q, k, v, *rest, want)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = ops.fwd(*(mode.from_tensor(t) for t in (q, k, v)), *rest, want)
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
        assert real[2].shape == ((1, 2, 40) if want else (0,))


def test_opcheck_with_max_scores():
    from flexattn.ops import run_opcheck
    q, k, v = make_qkv(1, 2, 2, 48, 40, 16)
    run_opcheck(q, k, v, output_max=True)


# ---- the Triton kernels, interpreted ----------------------------------------------------

INTERPRETED = [
    dict(name=n, L=65, S=47, block=(32, 32), kernel_options={"BACKEND": "triton"})
    for n in ("none", "causal", "document", "alibi_causal", "softcap", "rel_bias", "empty_rows", "padding_bias")
] + [
    dict(name="empty_rows", L=48, S=80, dtype=torch.float16, block=(16, 16), kernel_options={"BACKEND": "triton"}),
    dict(name="sliding_window", L=17, S=113, Hq=4, Hkv=1, block=(16, 16),
         kernel_options={"BACKEND": "triton", "BLOCK_M": 16, "BLOCK_N": 16}),
    # the split-KV decode kernel and its merge (GQA packed: the mask has no head dimension)
    dict(name="causal", L=4, S=300, Hq=4, Hkv=2, block=(32, 32),
         kernel_options={"BACKEND": "triton", "FORCE_DECODE": True}),
    dict(name="empty_rows", L=5, S=200, Hq=2, Hkv=2, block=(32, 32),
         kernel_options={"BACKEND": "triton", "FORCE_DECODE": True}),
    dict(name="rel_bias", L=1, S=200, Hq=4, Hkv=4, block=(32, 32),
         kernel_options={"BACKEND": "triton", "FORCE_DECODE": True}),
]


def _interpreted_extra():
    """Replayed calls (kernels.replay: the second call of a signature) return max_scores too;
    a call without it after one with it (another signature) returns none; a negative scale."""
    from flexattn import kernels
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, requires_grad=False)
    causal = make_mod("causal", B=1, H=2, L=40, S=40).mask_mod
    bm = create_block_mask(causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    opts = {"BACKEND": "triton"}
    gold = reference_attention(q.double(), k.double(), v.double(), None, causal, max_scores=True)
    runs = [flex_attention(q, k, v, None, bm, return_aux=BOTH, kernel_options=opts) for _ in range(3)]
    for out, aux in runs:
        torch.testing.assert_close(aux.max_scores.double(), gold[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.double(), gold[0], atol=1e-5, rtol=1e-5)
    assert len(kernels.replay.calls_of(bm)) == 1
    _, aux = flex_attention(q, k, v, None, bm, return_aux=AuxRequest(lse=True), kernel_options=opts)
    assert aux.max_scores is None
    assert len(kernels.replay.calls_of(bm)) == 2
    _, aux = flex_attention(q, k, v, None, bm, scale=-0.3, return_aux=BOTH, kernel_options=opts)
    neg = reference_attention(q.double(), k.double(), v.double(), None, causal, scale=-0.3, max_scores=True)[2]
    torch.testing.assert_close(aux.max_scores.double(), neg, atol=1e-5, rtol=1e-5)


def _interpreted_main() -> None:
    failures = []
    for case in INTERPRETED + [None]:
        try:
            _interpreted_extra() if case is None else check_max(**case)
        except Exception as e:  # noqa: BLE001 - report every failing case, not just the first
            failures.append(f"{case}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
    print("RESULT " + json.dumps(failures))


def test_triton_kernels_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=ROOT + os.pathsep + HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("FLEXATTN_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "flexattn"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    failures = json.loads(lines[-1][7:])
    assert not failures, f"{len(failures)} case(s) failed:\n" + "\n".join(failures)


# ---- GPU: the Triton forward, the Hopper forward, the decode kernel, compiled -------------

GPU_STATS_EPS = 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_gpu_triton_forward(name, dtype):
    check_max(name, device="cuda", dtype=dtype, B=2, Hq=4, Hkv=2, L=513, S=385, E=64, block=(128, 128),
              kernel_options={"BACKEND": "triton"}, stats_eps=GPU_STATS_EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["none", "causal", "document", "rel_bias", "softcap", "empty_rows"])
def test_gpu_hopper_forward(name):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper forward runs on sm90 only")
    check_max(name, device="cuda", dtype=torch.bfloat16, B=2, Hq=8, Hkv=2, L=640, S=515, E=128, block=(128, 128),
              kernel_options={"BACKEND": "hopper"}, stats_eps=GPU_STATS_EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("name,L,Hq,Hkv", [("causal", 4, 8, 2), ("empty_rows", 5, 4, 4), ("rel_bias", 1, 4, 4),
                                           ("document", 16, 8, 1)])
def test_gpu_decode(name, L, Hq, Hkv):
    check_max(name, device="cuda", dtype=torch.bfloat16, B=2, Hq=Hq, Hkv=Hkv, L=L, S=2000, E=64, block=(128, 128),
              kernel_options={"BACKEND": "triton", "FORCE_DECODE": True}, stats_eps=GPU_STATS_EPS)


@pytest.mark.gpu
def test_gpu_compiled():
    torch._dynamo.reset()
    m = make_mod("alibi_causal", B=2, H=4, L=300, S=300, device="cuda")
    q, k, v = make_qkv(2, 4, 4, 300, 300, 64, dtype=torch.bfloat16, device="cuda")
    bm = create_block_mask(m.mask_mod, None, None, 300, 300, device="cuda")

    def f(q, k, v):
        return flex_attention(q, k, v, m.score_mod, bm, return_aux=BOTH)

    out, aux = torch.compile(f, fullgraph=True)(q, k, v)
    e_out, e_aux = f(q, k, v)
    torch.testing.assert_close(aux.max_scores, e_aux.max_scores, atol=0, rtol=0)
    assert not aux.max_scores.requires_grad
    out.float().sum().backward()


if __name__ == "__main__":
    _interpreted_main()
