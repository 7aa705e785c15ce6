"""flexattn.nn.FlashAttention against the documented semantics (dense reference written here)."""
import math

import pytest
import torch

from flexattn.nn import FlashAttention

f64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def ref(q, k, v, keep=None, bias=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    empty = (s == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0) @ v


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("i,j", [(6, 6), (5, 9)])
def test_causal_mask_bias(flash, i, j):
    b, h, d = 2, 3, 8
    q, k, v = rand(b, h, i, d), rand(b, h, j, d, seed=1), rand(b, h, j, d, seed=2)
    key_mask = torch.rand(b, j, generator=torch.Generator().manual_seed(3)) > 0.3
    key_mask[1] = False                      # batch 1: every key masked -> output 0
    bias = rand(1, h, i, j, seed=4)
    attn = FlashAttention(causal=True, flash=flash)
    qi, kj = torch.arange(i)[:, None], torch.arange(j)[None]
    causal = kj <= qi + (j - i)              # bottom-right
    out = attn(q, k, v, mask=key_mask, attn_bias=bias)
    want = ref(q, k, v, keep=causal & key_mask[:, None, None, :], bias=bias)
    assert torch.allclose(out, want, atol=1e-10)
    assert (out[1] == 0).all()
    dense = torch.rand(b, 1, i, j, generator=torch.Generator().manual_seed(5)) > 0.5
    out = FlashAttention(flash=flash)(q, k, v, mask=dense)
    assert torch.allclose(out, ref(q, k, v, keep=dense), atol=1e-10)


def test_get_mask_is_bottom_right_true_masked():
    m = FlashAttention(causal=True).get_mask(3, 5, "cpu")
    qi, kj = torch.arange(3)[:, None], torch.arange(5)[None]
    assert m.dtype == torch.bool and torch.equal(m, kj > qi + 2)


def test_dropout_only_in_training_and_grads():
    q, k, v = (rand(1, 2, 7, 8, seed=s).requires_grad_() for s in range(3))
    attn = FlashAttention(dropout=0.5)
    attn.eval()
    assert torch.allclose(attn(q, k, v), ref(q, k, v), atol=1e-10)
    attn.train()
    torch.manual_seed(0)
    out = attn(q, k, v)
    assert not torch.allclose(out, ref(q, k, v), atol=1e-3)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_shared_kv_and_errors():
    q, k, v = rand(2, 4, 5, 8), rand(2, 5, 8, seed=1), rand(2, 5, 8, seed=2)
    out = FlashAttention()(q, k, v)
    assert torch.allclose(out, ref(q, k[:, None].expand(2, 4, 5, 8), v[:, None].expand(2, 4, 5, 8)), atol=1e-10)
    with pytest.raises(TypeError, match="mask must be a bool tensor \\(True = keep\\)"):
        FlashAttention()(q, k, v, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="a 2-D mask is a key mask"):
        FlashAttention()(q, k, v, mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_bias must be \\(batch or 1, heads, q_len, k_len\\)"):
        FlashAttention()(q, k, v, attn_bias=torch.zeros(2, 4, 5, 6, dtype=f64))
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\)"):
        FlashAttention(dropout=1.0)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    q, k, v = (rand(2, 4, 200, 64, seed=s).float() for s in range(3))
    mask = torch.rand(2, 200, generator=torch.Generator().manual_seed(1)) > 0.2
    attn = FlashAttention(causal=True).eval()
    cpu = attn(q, k, v, mask=mask)
    gpu = attn(q.cuda().half(), k.cuda().half(), v.cuda().half(), mask=mask.cuda())
    assert (gpu.float().cpu() - cpu).abs().max() < 2e-2
