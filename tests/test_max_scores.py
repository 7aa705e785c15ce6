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
              kernel_options=None, grad=False):
    """flex_attention(..., return_aux=AuxRequest(lse=True, max_scores=True)) for zoo mod
    `name`: out, lse and max_scores under the numerics rule against the float64 golden."""
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
        assert_close_to_golden(f"{name} {label}", got, r, g)
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
