"""flexattn.frontends.xformers against xFormers' documented semantics, with a dense reference
built here from the formulas (plain torch softmax, explicit masks)."""
import math

import pytest
import torch

from flexattn.dropout import dropout_mask
from flexattn.frontends import xformers as xf

f64 = torch.float64


def rand(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=f64).requires_grad_(requires_grad)


def ref_bmhk(q, k, v, keep=None, bias=None, scale=None, drop_keep=None, p=0.0):
    """Dense attention on [B, M, H, K]; keep: bool broadcastable to [B, H, M, N]; rows with no
    key give 0."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = qh @ kh.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    empty = torch.isinf(s).all(-1, keepdim=True) & (s < 0).all(-1, keepdim=True)
    pr = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if drop_keep is not None:
        pr = pr * drop_keep / (1 - p)
    return (pr @ vh).transpose(1, 2)


def block_keep(q_lens, k_lens, rule, k_slots=None):
    """Dense [Mtot, Ntot] keep of a block-diagonal mask; rule(i, j, m, n) inside block."""
    M, N = sum(q_lens), (sum(k_lens) if k_slots is None else k_slots * len(k_lens))
    keep = torch.zeros(M, N, dtype=torch.bool)
    qs = 0
    for b, (m, n) in enumerate(zip(q_lens, k_lens)):
        ks = sum(k_lens[:b]) if k_slots is None else b * k_slots
        for i in range(m):
            for j in range(n):
                keep[qs + i, ks + j] = rule(i, j, m, n)
        qs += m
    return keep


def test_no_bias_bmhk_and_scale():
    q, k, v = rand(2, 9, 3, 8), rand(2, 13, 3, 8, seed=1), rand(2, 13, 3, 6, seed=2)
    out = xf.memory_efficient_attention(q, k, v)
    assert out.shape == (2, 9, 3, 6)
    assert torch.allclose(out, ref_bmhk(q, k, v), atol=1e-10)
    out = xf.memory_efficient_attention(q, k, v, scale=0.3)
    assert torch.allclose(out, ref_bmhk(q, k, v, scale=0.3), atol=1e-10)


def test_bmk_layout():
    q, k, v = rand(2, 9, 8), rand(2, 11, 8, seed=1), rand(2, 11, 8, seed=2)
    out = xf.memory_efficient_attention(q, k, v, attn_bias=xf.LowerTriangularMask())
    i, j = torch.arange(9)[:, None], torch.arange(11)[None]
    want = ref_bmhk(q[:, :, None], k[:, :, None], v[:, :, None], keep=j <= i)[:, :, 0]
    assert out.shape == (2, 9, 8) and torch.allclose(out, want, atol=1e-10)


@pytest.mark.parametrize("expanded", [True, False])
def test_bmghk_gqa(expanded):
    B, M, N, G, H, K = 2, 7, 10, 2, 3, 8
    q = rand(B, M, G, H, K)
    k1, v1 = rand(B, N, G, 1, K, seed=1), rand(B, N, G, 1, K, seed=2)
    k, v = (k1.expand(B, N, G, H, K), v1.expand(B, N, G, H, K)) if expanded else (k1, v1)
    out = xf.memory_efficient_attention(q, k, v, attn_bias=xf.LowerTriangularFromBottomRightMask())
    i, j = torch.arange(M)[:, None], torch.arange(N)[None]
    kk, vv = k1.expand(B, N, G, H, K).reshape(B, N, G * H, K), v1.expand(B, N, G, H, K).reshape(B, N, G * H, K)
    want = ref_bmhk(q.reshape(B, M, G * H, K), kk, vv, keep=j <= i + N - M).reshape(B, M, G, H, K)
    assert out.shape == (B, M, G, H, K) and torch.allclose(out, want, atol=1e-10)


def test_tensor_bias_and_lower_triangular_with_bias():
    B, M, N, H, K = 2, 6, 6, 2, 8
    q, k, v = rand(B, M, H, K), rand(B, N, H, K, seed=1), rand(B, N, H, K, seed=2)
    bias = rand(B, H, M, N, seed=3)
    assert torch.allclose(xf.memory_efficient_attention(q, k, v, attn_bias=bias), ref_bmhk(q, k, v, bias=bias),
                          atol=1e-10)
    # broadcast (expanded) bias, and -inf entries mask
    b1 = rand(1, 1, M, N, seed=4).masked_fill(torch.eye(M, dtype=torch.bool), float("-inf")).expand(B, H, M, N)
    assert torch.allclose(xf.memory_efficient_attention(q, k, v, attn_bias=b1), ref_bmhk(q, k, v, bias=b1), atol=1e-10)
    lt = xf.LowerTriangularMask().add_bias(bias)
    assert isinstance(lt, xf.LowerTriangularMaskWithTensorBias)
    i, j = torch.arange(M)[:, None], torch.arange(N)[None]
    want = ref_bmhk(q, k, v, keep=j <= i, bias=bias)
    assert torch.allclose(xf.memory_efficient_attention(q, k, v, attn_bias=lt), want, atol=1e-10)
    mat = lt.materialize((B, H, M, N), dtype=f64)
    assert torch.equal(mat, bias.masked_fill(~(j <= i), float("-inf")))


def test_block_diagonal_family():
    ql, kl = [3, 5, 4], [4, 6, 4]
    M, N, H, K = sum(ql), sum(kl), 2, 8
    q, k, v = rand(1, M, H, K), rand(1, N, H, K, seed=1), rand(1, N, H, K, seed=2)
    bd = xf.BlockDiagonalMask.from_seqlens(ql, kl)
    cases = [
        (bd, lambda i, j, m, n: True),
        (bd.make_causal(), lambda i, j, m, n: j <= i),
        (bd.make_causal_from_bottomright(), lambda i, j, m, n: j <= i + n - m),
        (bd.make_local_attention(2), lambda i, j, m, n: i - 2 < j <= i),
        (bd.make_local_attention_from_bottomright(3), lambda i, j, m, n: i + n - m - 3 < j <= i + n - m),
        (xf.BlockDiagonalCausalMask.from_seqlens(ql, kl), lambda i, j, m, n: j <= i),
    ]
    for bias, rule in cases:
        keep = block_keep(ql, kl, rule)
        out = xf.memory_efficient_attention(q, k, v, attn_bias=bias)
        assert torch.allclose(out, ref_bmhk(q, k, v, keep=keep), atol=1e-10), type(bias).__name__
        mat = bias.materialize((M, N), dtype=f64)
        assert torch.equal(mat == 0, keep) and torch.isinf(mat[~keep]).all(), type(bias).__name__
    assert type(bd.make_causal()) is xf.BlockDiagonalCausalMask
    assert type(bd.make_local_attention_from_bottomright(3)) is xf.BlockDiagonalCausalLocalAttentionFromBottomRightMask


def test_padded_keys_mask():
    ql, pad, kl = [2, 1, 3], 5, [4, 1, 5]
    bias = xf.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(ql, pad, kl)
    M, N, H, K = sum(ql), pad * 3, 2, 8
    q, k, v = rand(1, M, H, K), rand(1, N, H, K, seed=1), rand(1, N, H, K, seed=2)
    keep = block_keep(ql, kl, lambda i, j, m, n: j <= i + n - m, k_slots=pad)
    assert torch.allclose(xf.memory_efficient_attention(q, k, v, attn_bias=bias), ref_bmhk(q, k, v, keep=keep),
                          atol=1e-10)
    with pytest.raises(ValueError, match="must be <= padding=5"):
        xf.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1], 5, [6])


def test_from_tensor_list_and_split_round_trip():
    xs = [rand(2, 3, 4, seed=1), rand(1, 5, 4, seed=2), rand(3, 2, 4, seed=3)]
    bias, packed = xf.BlockDiagonalMask.from_tensor_list(xs)
    assert packed.shape == (1, 2 * 3 + 5 + 3 * 2, 4)
    assert bias.q_seqinfo.seqlens == [3, 3, 5, 2, 2, 2]
    back = bias.split(packed)
    assert len(back) == 3 and all(torch.equal(a, b) for a, b in zip(back, xs))
    # attention over the packed batch equals attention per sequence
    qs = [rand(1, n, 2, 8, seed=10 + n) for n in (3, 6, 2)]
    bias, q = xf.BlockDiagonalMask.from_tensor_list(qs)
    out = xf.memory_efficient_attention(q, q, q, attn_bias=bias.make_causal())
    for o, x in zip(bias.split(out), qs):
        want = xf.memory_efficient_attention(x, x, x, attn_bias=xf.LowerTriangularMask())
        assert torch.allclose(o, want, atol=1e-10)


def test_forward_requires_grad_backward_and_dropout():
    B, M, N, H, K = 1, 8, 8, 2, 8
    q, k, v = rand(B, M, H, K), rand(B, N, H, K, seed=1), rand(B, N, H, K, seed=2)
    g = rand(B, M, H, K, seed=3)
    for p, seed in [(0.0, None), (0.3, 1234)]:
        out, lse = xf.memory_efficient_attention_forward_requires_grad(q, k, v, xf.LowerTriangularMask(), p=p,
                                                                       seed=seed)
        assert lse.shape == (B, H, M)
        i, j = torch.arange(M)[:, None], torch.arange(N)[None]
        keep = j <= i
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        dk = None if p == 0 else dropout_mask(seed, B, H, M, N, p).to(f64)
        want = ref_bmhk(qq, kk, vv, keep=keep, drop_keep=dk, p=p)
        assert torch.allclose(out, want, atol=1e-10)
        s = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(K)).masked_fill(~keep, float("-inf"))
        assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-5)
        grads = xf.memory_efficient_attention_backward(g, out, lse, q, k, v, xf.LowerTriangularMask(), p=p, seed=seed)
        wants = torch.autograd.grad(want, (qq, kk, vv), g)
        for a, b in zip(grads, wants):
            assert torch.allclose(a, b, atol=1e-9)
    with pytest.raises(ValueError, match="p > 0 needs seed=<int>"):
        xf.memory_efficient_attention_backward(g, out, lse, q, k, v, p=0.2)


def test_merge_attentions_equals_full_attention():
    B, M, N, G, H, K = 2, 5, 12, 1, 3, 8
    q, k, v = rand(B, M, G, H, K), rand(B, N, G, H, K, seed=1), rand(B, N, G, H, K, seed=2)
    parts = [(0, 4), (4, 9), (9, 12)]
    outs, lses = [], []
    for a, b in parts:
        o, l = xf.memory_efficient_attention_forward_requires_grad(q, k[:, a:b], v[:, a:b])
        outs.append(o)
        lses.append(l)
    full, full_lse = xf.memory_efficient_attention_forward_requires_grad(q, k, v)
    out, lse = xf.merge_attentions(outs, lses)
    assert torch.allclose(out, full, atol=1e-10) and torch.allclose(lse, full_lse, atol=1e-10)
    out2, none = xf.merge_attentions(torch.stack(outs), torch.stack(lses), write_lse=False)
    assert none is None and torch.allclose(out2, full, atol=1e-10)
    # a part with no attended key (lse -inf) contributes nothing
    empty = torch.full_like(lses[0], float("-inf"))
    out3, lse3 = xf.merge_attentions([outs[0], torch.zeros_like(outs[0])], [lses[0], empty])
    assert torch.allclose(out3, outs[0]) and torch.allclose(lse3, lses[0])


def test_errors():
    q, k, v = rand(1, 4, 2, 8), rand(1, 4, 2, 8), rand(1, 4, 2, 8)
    with pytest.raises(ValueError, match="Query/Key/Value should all have BMGHK, BMHK or BMK shape"):
        xf.memory_efficient_attention(q, k[0], v)
    with pytest.raises(ValueError, match="Query/Key/Value should all have the same dtype"):
        xf.memory_efficient_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="same embedding size K"):
        xf.memory_efficient_attention(q, rand(1, 4, 2, 4), rand(1, 4, 2, 4))
    with pytest.raises(ValueError, match="dropout probability p must be a number in \\[0, 1\\)"):
        xf.memory_efficient_attention(q, k, v, p=1.0)
    with pytest.raises(TypeError, match="attn_bias must be None, a tensor or an AttentionBias"):
        xf.memory_efficient_attention(q, k, v, attn_bias="causal")
    with pytest.raises(ValueError, match="does not broadcast"):
        xf.memory_efficient_attention(q, k, v, attn_bias=rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"Block #1 has num_keys=2 and num_queries=3. Expected `num_keys >= num_queries`"):
        xf.BlockDiagonalMask.from_seqlens([2, 3], [2, 2]).make_causal_from_bottomright()
    with pytest.raises(ValueError, match="Expected `window_size > 0`, but window_size=0"):
        xf.BlockDiagonalMask.from_seqlens([2]).make_local_attention(0)
    with pytest.raises(RuntimeError, match="No keys are attended in q_seqlen 5 k_seqlen 2 with sliding window 3"):
        xf.BlockDiagonalMask.from_seqlens([5], [2]).make_local_attention(3)
    with pytest.raises(ValueError, match="expects a batch size of 1"):
        xf.memory_efficient_attention(rand(2, 4, 2, 8), rand(2, 4, 2, 8), rand(2, 4, 2, 8),
                                      attn_bias=xf.BlockDiagonalMask.from_seqlens([2, 2]))
    with pytest.raises(ValueError, match="describes 5 queries and 5 keys, but the inputs have 4 queries"):
        xf.memory_efficient_attention(q, k, v, attn_bias=xf.BlockDiagonalMask.from_seqlens([2, 3]))
    with pytest.raises(ValueError, match="q_seqlen has 2 entries but kv_seqlen has 1"):
        xf.BlockDiagonalMask.from_seqlens([2, 2], [4])


@pytest.mark.gpu
def test_gpu_matches_cpu():
    ql, kl = [70, 130, 33], [90, 130, 40]
    q, k, v = (rand(1, n, 4, 64, seed=s).to(torch.float16) for s, n in ((0, sum(ql)), (1, sum(kl)), (2, sum(kl))))
    for bias in [xf.BlockDiagonalMask.from_seqlens(ql, kl).make_causal_from_bottomright(),
                 xf.BlockDiagonalMask.from_seqlens(ql, kl).make_local_attention(16)]:
        cpu = xf.memory_efficient_attention(q.float(), k.float(), v.float(), attn_bias=bias)
        gpu = xf.memory_efficient_attention(q.cuda(), k.cuda(), v.cuda(), attn_bias=bias)
        assert (gpu.float().cpu() - cpu).abs().max() < 2e-2
