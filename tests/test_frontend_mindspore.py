"""flexattn.frontends.mindspore.flash_attention_score against MindSpore's documented semantics,
checked against a dense reference built here from the formulas (1 = discard masks)."""
import pytest
import torch

from conftest import assert_close_to_golden
from flexattn.frontends.mindspore import flash_attention_score as fas

f32, f64 = torch.float32, torch.float64


def rand(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=f64).to(f32).requires_grad_(requires_grad)


def dense_ref(q, k, v, scale, discard=None, pse=None, drop_keep=None, keep_prob=1.0):
    """BNSD dense: softmax(scale * q k^T + pse, masked where discard) (dropout) @ v; rows with
    nothing kept give 0. Computed in q's dtype."""
    N1, N2 = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(N1 // N2, 1), v.repeat_interleave(N1 // N2, 1)
    s = scale * (q @ k.transpose(-1, -2))
    if pse is not None:
        s = s + pse.to(s.dtype)
    if discard is not None:
        s = s.masked_fill(discard, float("-inf"))
    empty = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if drop_keep is not None:
        p = p * drop_keep.to(p.dtype) / keep_prob
    return p @ v


def check(got_bnsd, q, k, v, scale, **kw):
    golden = dense_ref(q.double(), k.double(), v.double(), scale, **kw)
    ref = dense_ref(q, k, v, scale, **kw)
    assert_close_to_golden("out", got_bnsd, ref, golden)


def idx(S1, S2):
    return torch.arange(S1)[:, None], torch.arange(S2)[None, :]


B, N1, N2, S1, S2, D = 2, 4, 2, 11, 16, 16


def bnsd():
    return rand(B, N1, S1, D), rand(B, N2, S2, D, seed=1), rand(B, N2, S2, D, seed=2)


@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH", "SBH"])
def test_layouts_round_trip(layout):
    q, k, v = bnsd()

    def to(x):
        Bx, N, S, Dx = x.shape
        return {"BNSD": x, "BSND": x.transpose(1, 2), "BSH": x.transpose(1, 2).reshape(Bx, S, N * Dx),
                "SBH": x.permute(2, 0, 1, 3).reshape(S, Bx, N * Dx)}[layout]
    out = fas(to(q), to(k), to(v), N1, input_layout=layout, scalar_value=0.25)
    assert out.shape == to(q).shape and out.dtype == q.dtype
    check(fas(q, k, v, N1, input_layout="BNSD", scalar_value=0.25), q, k, v, 0.25)
    assert torch.allclose(out, to(fas(q, k, v, N1, input_layout="BNSD", scalar_value=0.25)), atol=1e-6)


@pytest.mark.parametrize("mode,pre,nxt", [(0, 2147483647, 2147483647), (0, 3, 1), (0, 5, -2), (0, -1, 4),
                                          (2, 0, 0), (3, 0, 0), (4, 3, 0), (4, 2, 2)])
def test_sparse_modes(mode, pre, nxt):
    q, k, v = bnsd()
    out = fas(q, k, v, N1, input_layout="BNSD", sparse_mode=mode, pre_tokens=pre, next_tokens=nxt,
              scalar_value=0.3)
    i, j = idx(S1, S2)
    keep = {0: (j - i >= -pre) & (j - i <= nxt), 2: j <= i, 3: j <= i + S2 - S1,
            4: (j - i - (S2 - S1) >= -pre) & (j - i - (S2 - S1) <= nxt)}[mode]
    check(out, q, k, v, 0.3, discard=~keep)


def test_attn_mask_forms_and_mode_1():
    q, k, v = bnsd()
    g = torch.Generator().manual_seed(5)
    for shape in [(S1, S2), (B, 1, S1, S2), (B, N1, S1, S2)]:
        m = torch.rand(shape, generator=g) < 0.3
        for mode in (0, 1):
            out = fas(q, k, v, N1, attn_mask=m, input_layout="BNSD", sparse_mode=mode, scalar_value=0.3)
            discard = m if m.dim() == 4 else m[None, None]
            check(out, q, k, v, 0.3, discard=discard)
        out = fas(q, k, v, N1, attn_mask=m.to(torch.uint8), input_layout="BNSD", scalar_value=0.3)
        check(out, q, k, v, 0.3, discard=m if m.dim() == 4 else m[None, None])
    # mode 0 combines the band with the mask
    m = torch.rand(S1, S2, generator=g) < 0.3
    out = fas(q, k, v, N1, attn_mask=m, input_layout="BNSD", pre_tokens=2, next_tokens=0, scalar_value=0.3)
    i, j = idx(S1, S2)
    check(out, q, k, v, 0.3, discard=m | ~((j - i >= -2) & (j <= i)))
    # compressed (2048, 2048) mask for the causal modes: its contents are not used
    comp = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    out = fas(q, k, v, N1, attn_mask=comp, input_layout="BNSD", sparse_mode=2, scalar_value=0.3)
    check(out, q, k, v, 0.3, discard=~(j <= i))


def test_prefix_mode_5():
    q, k, v = bnsd()
    prefix = [3, 9]
    out = fas(q, k, v, N1, prefix=prefix, input_layout="BNSD", sparse_mode=5, scalar_value=0.3)
    i, j = idx(S1, S2)
    keep = torch.stack([(j <= i + S2 - S1) | (j < p) for p in prefix])[:, None]
    check(out, q, k, v, 0.3, discard=~keep)


def test_real_shift_full_and_gradient():
    q, k, v = bnsd()
    pse = rand(1, N1, S1, S2, seed=7, requires_grad=True)
    out = fas(q, k, v, N1, real_shift=pse, input_layout="BNSD", sparse_mode=3, scalar_value=0.3)
    i, j = idx(S1, S2)
    check(out, q, k, v, 0.3, pse=pse.detach(), discard=~(j <= i + S2 - S1))
    out.sum().backward()
    p2 = pse.detach().double().requires_grad_()
    dense_ref(q.double(), k.double(), v.double(), 0.3, pse=p2, discard=~(j <= i + S2 - S1)).sum().backward()
    assert torch.allclose(pse.grad.double(), p2.grad, atol=1e-4)


def test_real_shift_compressed_alibi():
    Bq, N, L, Dq = 1, 2, 1040, 16
    q, k, v = rand(Bq, N, L, Dq), rand(Bq, N, L, Dq, seed=1), rand(Bq, N, L, Dq, seed=2)
    slopes = torch.tensor([0.5, 0.125])
    i, j = idx(L, L)
    full = (slopes.view(1, N, 1, 1) * (j - i)).to(f32)   # depends on kv - q only
    comp = full[:, :, L - 1024:].contiguous()
    out = fas(q, k, v, N, real_shift=comp, input_layout="BNSD", sparse_mode=2, scalar_value=0.25)
    check(out, q, k, v, 0.25, pse=full, discard=~(j <= i))


def test_drop_mask_bit_packed_with_gradients():
    q, k, v = (t.requires_grad_() for t in bnsd())
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (B, N1, S1, S2 // 8), generator=g, dtype=torch.uint8)
    keep = torch.zeros(B, N1, S1, S2, dtype=torch.bool)
    for c in range(S2):  # bit c % 8 (LSB first) of byte c // 8
        keep[..., c] = ((packed[..., c // 8].int() >> (c % 8)) & 1).bool()
    i, j = idx(S1, S2)
    out = fas(q, k, v, N1, drop_mask=packed, keep_prob=0.75, input_layout="BNSD", sparse_mode=2, scalar_value=0.3)
    check(out, q, k, v, 0.3, discard=~(j <= i), drop_keep=keep, keep_prob=0.75)
    go = rand(*out.shape, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = dense_ref(q2, k2, v2, 0.3, discard=~(j <= i), drop_keep=keep, keep_prob=0.75)
    wants = torch.autograd.grad(want, (q2, k2, v2), go.double())
    for a, b in zip(grads, wants):
        assert torch.allclose(a.double(), b, atol=1e-4)


def test_tnd_varlen_equals_per_sequence():
    N, Dq = 2, 16
    q_lens, kv_lens = [3, 6, 4], [5, 6, 9]
    T1, T2 = sum(q_lens), sum(kv_lens)
    q, k, v = rand(T1, N, Dq), rand(T2, N, Dq, seed=1), rand(T2, N, Dq, seed=2)
    cq = torch.tensor(q_lens).cumsum(0).tolist()
    ck = torch.tensor(kv_lens).cumsum(0).tolist()
    for mode in (0, 2, 3):
        out = fas(q, k, v, N, input_layout="TND", actual_seq_qlen=cq, actual_seq_kvlen=ck, sparse_mode=mode,
                  scalar_value=0.25)
        assert out.shape == (T1, N, Dq)
        a = b = 0
        for ql, kl in zip(q_lens, kv_lens):
            qq, kk, vv = (x.transpose(0, 1)[None] for x in (q[a:a + ql], k[b:b + kl], v[b:b + kl]))
            per = fas(qq, kk, vv, N, input_layout="BNSD", sparse_mode=mode, scalar_value=0.25)
            assert torch.allclose(out[a:a + ql], per[0].transpose(0, 1), atol=1e-6), (mode, ql, kl)
            a, b = a + ql, b + kl


def test_errors():
    q, k, v = bnsd()
    with pytest.raises(TypeError, match="query must be float16 or bfloat16"):
        fas(q.double(), k.double(), v.double(), N1, input_layout="BNSD")
    with pytest.raises(TypeError, match="same dtype"):
        fas(q, k.half(), v, N1, input_layout="BNSD")
    with pytest.raises(ValueError, match="input_layout must be one of"):
        fas(q, k, v, N1, input_layout="BHSD")
    with pytest.raises(ValueError, match="head_num must be a positive int"):
        fas(q, k, v, 0, input_layout="BNSD")
    with pytest.raises(ValueError, match="head_num=3 but query has N1=4"):
        fas(q, k, v, 3, input_layout="BNSD")
    with pytest.raises(ValueError, match="not divisible by head_num=5"):
        fas(q.transpose(1, 2).reshape(B, S1, -1), k.transpose(1, 2).reshape(B, S2, -1),
            v.transpose(1, 2).reshape(B, S2, -1), 5)
    with pytest.raises(ValueError, match="N2=3 must divide head_num N1=4"):
        fas(q, rand(B, 3, S2, D), rand(B, 3, S2, D), N1, input_layout="BNSD")
    with pytest.raises(ValueError, match="must be 4-D"):
        fas(q[0], k, v, N1, input_layout="BNSD")
    with pytest.raises(ValueError, match="pre_tokens \\+ next_tokens must be >= 0"):
        fas(q, k, v, N1, input_layout="BNSD", pre_tokens=2, next_tokens=-3)
    with pytest.raises(ValueError, match="both negative"):
        fas(q, k, v, N1, input_layout="BNSD", sparse_mode=4, pre_tokens=-1, next_tokens=-1)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        fas(q, k, v, N1, input_layout="BNSD", attn_mask=torch.zeros(S1, S2 + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool or uint8"):
        fas(q, k, v, N1, input_layout="BNSD", attn_mask=torch.zeros(S1, S2))
    with pytest.raises(ValueError, match="sparse_mode=1 \\(allMask\\) needs the full attn_mask"):
        fas(q, k, v, N1, input_layout="BNSD", sparse_mode=1)
    with pytest.raises(ValueError, match="takes the compressed \\(2048, 2048\\) attn_mask"):
        fas(q, k, v, N1, input_layout="BNSD", sparse_mode=2, attn_mask=torch.zeros(S1, S2, dtype=torch.bool))
    for mode in (6, 7, 8):
        with pytest.raises(NotImplementedError, match=f"sparse_mode={mode} is reserved and not supported"):
            fas(q, k, v, N1, input_layout="BNSD", sparse_mode=mode)
    with pytest.raises(ValueError, match="sparse_mode must be in 0..8"):
        fas(q, k, v, N1, input_layout="BNSD", sparse_mode=9)
    with pytest.raises(ValueError, match="sparse_mode=5 needs prefix"):
        fas(q, k, v, N1, input_layout="BNSD", sparse_mode=5)
    with pytest.raises(ValueError, match="keep_prob must be in \\(0, 1\\]"):
        fas(q, k, v, N1, input_layout="BNSD", keep_prob=0.0)
    with pytest.raises(ValueError, match="drop_mask must be None when keep_prob is 1.0"):
        fas(q, k, v, N1, input_layout="BNSD", drop_mask=torch.zeros(B, N1, S1, S2 // 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="drop_mask must have shape"):
        fas(q, k, v, N1, input_layout="BNSD", keep_prob=0.5, drop_mask=torch.zeros(B, N1, S1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs S2 to be a multiple of 8"):
        fas(q, k[:, :, :12], v[:, :, :12], N1, input_layout="BNSD", keep_prob=0.5,
            drop_mask=torch.zeros(B, N1, S1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="real_shift must have shape"):
        fas(q, k, v, N1, input_layout="BNSD", real_shift=torch.zeros(1, N1, S1 + 1, S2))
    with pytest.raises(NotImplementedError, match="padding_mask is a reserved parameter"):
        fas(q, k, v, N1, input_layout="BNSD", padding_mask=torch.zeros(1))
    with pytest.raises(ValueError, match="input_layout='TND' needs actual_seq_qlen"):
        fas(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), N1, input_layout="TND")
    with pytest.raises(ValueError, match="last value of actual_seq_qlen must equal the packed length 11"):
        fas(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), N1, input_layout="TND",
            actual_seq_qlen=[5, 10], actual_seq_kvlen=[8, 16])
    with pytest.raises(ValueError, match="only used with input_layout='TND'"):
        fas(q, k, v, N1, input_layout="BNSD", actual_seq_qlen=[11])
    with pytest.raises(ValueError, match="sparse_mode=5 \\(prefix\\) is not supported with input_layout='TND'"):
        fas(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), N1, input_layout="TND",
            actual_seq_qlen=[11], actual_seq_kvlen=[16], sparse_mode=5, prefix=[1])


@pytest.mark.gpu
def test_gpu_matches_cpu():
    q, k, v = (rand(2, 300, 4 * 64, seed=s) for s in range(3))
    for mode in (0, 2, 3, 4):
        args = dict(head_num=4, sparse_mode=mode, pre_tokens=50, next_tokens=0, scalar_value=0.125)
        cpu = fas(q, k, v, **args)
        gpu = fas(q.cuda().half(), k.cuda().half(), v.cuda().half(), **args)
        assert (gpu.float().cpu() - cpu).abs().max() < 2e-2
