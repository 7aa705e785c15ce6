"""Every input error of flex_attention: the type, and a message that names the argument,
what was expected, what came, and the fix."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import make_qkv
from flexattn import create_block_mask, flex_attention


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def bias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx)


@pytest.fixture
def qkv():
    return make_qkv(2, 4, 4, 32, 48, 16, requires_grad=False)


def raises(exc, *fragments):
    """pytest.raises that requires every fragment (literal text) in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def test_not_a_tensor(qkv):
    q, k, v = qkv
    with raises(TypeError, "key must be a torch.Tensor", "list"):
        flex_attention(q, [1, 2], v)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_not_4d(qkv, which):
    args = list(qkv)
    args[which] = args[which][0]
    name = ("query", "key", "value")[which]
    with raises(ValueError, f"{name} must be 4-D", "got shape", ".unsqueeze(0)"):
        flex_attention(*args)


def test_unsupported_dtype(qkv):
    q, k, v = qkv
    with raises(TypeError, "query has dtype torch.int64", "supported dtypes", ".to(torch.float32)"):
        flex_attention(q.long(), k.long(), v.long())


def test_mismatched_dtypes(qkv):
    q, k, v = qkv
    with raises(TypeError, "same dtype", "torch.float32, torch.float64 and torch.float32", ".to(query.dtype)"):
        flex_attention(q, k.double(), v)


def test_mismatched_devices(qkv):
    q, k, v = qkv
    with raises(ValueError, "same device", "cpu, meta and cpu", ".to(query.device)"):
        flex_attention(q, k.to("meta"), v)


def test_mismatched_batch(qkv):
    q, k, v = qkv
    with raises(ValueError, "same batch size", "got 2, 1 and 1"):
        flex_attention(q, k[:1], v[:1])


def test_key_value_heads_mismatch(qkv):
    q, k, v = qkv
    with raises(ValueError, "key and value must have the same number of heads", "got 4 and 2"):
        flex_attention(q, k, v[:, :2])


def test_key_value_length_mismatch(qkv):
    q, k, v = qkv
    with raises(ValueError, "key and value must have the same sequence length", "got 48 and 40"):
        flex_attention(q, k, v[:, :, :40])


def test_head_dim_mismatch(qkv):
    q, k, v = qkv
    with raises(ValueError, "query and key must have the same head dimension E", "got 16 and 8"):
        flex_attention(q, k[..., :8], v)


def test_gqa_without_enable_gqa(qkv):
    q, k, v = qkv
    with raises(ValueError, "query has 4 heads but key/value have 2", "enable_gqa=True"):
        flex_attention(q, k[:, :2], v[:, :2])


def test_gqa_not_a_multiple(qkv):
    q, k, v = qkv
    with raises(ValueError, "multiple of the number of key/value heads", "Hq=4 and Hkv=3"):
        flex_attention(q, k[:, :3], v[:, :3], enable_gqa=True)


def test_block_mask_wrong_lengths(qkv):
    q, k, v = qkv
    bm = create_block_mask(causal, None, None, 64, 64)
    with raises(ValueError, "block_mask was built for (Q_LEN, KV_LEN) = (64, 64)", "query length 32",
                "Q_LEN=32, KV_LEN=48", "_adjust(32, 48)"):
        flex_attention(q, k, v, block_mask=bm)


def test_block_mask_wrong_device(qkv):
    q, k, v = qkv
    bm = create_block_mask(causal, None, None, 32, 48).to("meta")
    with raises(ValueError, "block_mask is on meta but the inputs are on cpu", "block_mask.to('cpu')"):
        flex_attention(q, k, v, block_mask=bm)


def test_block_mask_wrong_batch_or_heads(qkv):
    q, k, v = qkv
    bm = create_block_mask(causal, 3, None, 32, 48)
    with raises(ValueError, "block_mask has batch/head sizes (B=3, H=1)", "must be 1 (broadcast)", "B=2"):
        flex_attention(q, k, v, block_mask=bm)
    bm = create_block_mask(causal, None, 2, 32, 48)
    with raises(ValueError, "(B=1, H=2)", "query heads H=4"):
        flex_attention(q, k, v, block_mask=bm)


def test_mask_mod_passed_as_block_mask(qkv):
    q, k, v = qkv
    with raises(TypeError, "block_mask must be a BlockMask, got the callable 'causal'",
                "create_block_mask(mask_mod, B, H, Q_LEN=32, KV_LEN=48)"):
        flex_attention(q, k, v, block_mask=causal)


def test_block_mask_wrong_type(qkv):
    q, k, v = qkv
    with raises(TypeError, "block_mask must be a flexattn.BlockMask, a torch.nn.attention.flex_attention.BlockMask "
                           "or None, got torch.Tensor"):
        flex_attention(q, k, v, block_mask=torch.ones(32, 48, dtype=torch.bool))


def test_mask_mod_passed_as_score_mod(qkv):
    q, k, v = qkv
    with raises(TypeError, "score_mod must take 5 arguments", "'causal' takes 4", "looks like a mask_mod"):
        flex_attention(q, k, v, score_mod=causal)


def test_score_mod_returning_bool(qkv):
    q, k, v = qkv

    def masky(score, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    with raises(TypeError, "returns a bool", "looks like a mask_mod", "create_block_mask"):
        flex_attention(q, k, v, score_mod=masky)


def test_score_mod_passed_as_mask_mod():
    with raises(TypeError, "mask_mod must take 4 arguments", "'bias' takes 5", "looks like a score_mod"):
        create_block_mask(bias, None, None, 32, 48)


def test_score_mod_wrong_arity(qkv):
    q, k, v = qkv
    with raises(TypeError, "score_mod must take 5 arguments", "takes 2"):
        flex_attention(q, k, v, score_mod=lambda s, b: s)


def test_score_mod_not_callable(qkv):
    q, k, v = qkv
    with raises(TypeError, "score_mod must be a callable", "got float"):
        flex_attention(q, k, v, score_mod=1.0)


def test_block_mask_as_score_mod(qkv):
    q, k, v = qkv
    with raises(TypeError, "score_mod got a BlockMask", "block_mask=..."):
        flex_attention(q, k, v, score_mod=create_block_mask(causal, None, None, 32, 48))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_p_out_of_range(qkv, p):
    q, k, v = qkv
    with raises(ValueError, "dropout_p must be in [0, 1)", f"got {p}"):
        flex_attention(q, k, v, dropout_p=p)


def test_dropout_bad_types(qkv):
    q, k, v = qkv
    with raises(TypeError, "dropout_p must be a float", "got str"):
        flex_attention(q, k, v, dropout_p="0.1")
    with raises(TypeError, "dropout_seed must be a Python int or None", "got float"):
        flex_attention(q, k, v, dropout_p=0.1, dropout_seed=1.5)
    with raises(TypeError, "generator must be a torch.Generator or None", "got int"):
        flex_attention(q, k, v, dropout_p=0.1, generator=3)


def test_bad_scale(qkv):
    q, k, v = qkv
    with raises(TypeError, "scale must be a float or None", "got Tensor"):
        flex_attention(q, k, v, scale=torch.tensor(0.1))


def test_bad_kernel_options(qkv):
    q, k, v = qkv
    with raises(TypeError, "kernel_options must be a dict or None", "got list"):
        flex_attention(q, k, v, kernel_options=["cpu"])
    with raises(ValueError, "kernel_options['BACKEND'] must be one of", "'cuda'"):
        flex_attention(q, k, v, kernel_options={"BACKEND": "cuda"})
    with raises(ValueError, "kernel_options['BLOCK_M'] must be a positive int dividing", "block size 128", "got 48"):
        flex_attention(q, k, v, kernel_options={"BLOCK_M": 48})


def test_captured_tensor_on_wrong_device(qkv):
    q, k, v = qkv
    table = torch.zeros(8, device="meta")

    def on_meta(score, b, h, q_idx, kv_idx):
        return score + table[h]

    with raises(ValueError, "captures a tensor of shape (8,) on meta", "runs on cpu", ".to('cpu')"):
        flex_attention(q, k, v, score_mod=on_meta)


def test_empty_dimension():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=False)
    with raises(ValueError, "key has an empty dimension", "(1, 2, 0, 8)"):
        flex_attention(q, k[:, :, :0], v[:, :, :0])


def test_unknown_kernel_option_raises_on_cpu(qkv):
    # review: a typo in kernel_options was silently ignored on the CPU path (README: an
    # unknown key raises and lists the valid ones); known GPU-only keys stay accepted.
    q, k, v = qkv
    with raises(ValueError, "kernel_options", "'BLOK_M'", "valid keys", "BLOCK_M"):
        flex_attention(q, k, v, kernel_options={"BLOK_M": 64})
    flex_attention(q, k, v, kernel_options={"num_warps": 4, "BLOCK_M": 64, "BACKEND": "cpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_create_block_mask_cuda_device_without_cuda():
    # review: this raised torch's bare AssertionError "Torch not compiled with CUDA enabled"
    from flexattn import create_mask
    with raises(ValueError, "device='cuda'", "no CUDA device", "device='cpu'"):
        create_block_mask(causal, None, None, 64, 64, device="cuda")
    with raises(ValueError, "device='cuda'", "no CUDA device"):
        create_mask(causal, None, None, 64, 64, device="cuda")


def test_atomic_dq_with_deterministic_refused():
    """dq by float32 atomics cannot be reproducible: asking for both is a ValueError naming
    the two options; DETERMINISTIC alone turns the atomic default off (by head dim on the GPU)."""
    from types import SimpleNamespace

    from flexattn.kernels import backward, config
    q = torch.empty(1, 1, 8, 256)
    with raises(ValueError, "bwd_ATOMIC_DQ=True", "DETERMINISTIC=True", "drop one"):
        backward.use_atomic_dq(SimpleNamespace(opts={"bwd_ATOMIC_DQ": True, "DETERMINISTIC": True}), q, q)
    assert backward.use_atomic_dq(SimpleNamespace(opts={"bwd_ATOMIC_DQ": True}), q, q)
    gpu = torch.device("cuda", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "device_key", lambda device: "sm90")
        assert config.atomic_dq(gpu, 256, 256) and not config.atomic_dq(gpu, 128, 128)
    assert not config.atomic_dq(q.device, 256, 256)  # the interpreter: off unless asked
    from flexattn.kernels import check_kernel_options
    with pytest.raises(ValueError, match=r"kernel_options\['bwd_ATOMIC_DQ'\] must be True or False"):
        check_kernel_options({"bwd_ATOMIC_DQ": 1})
