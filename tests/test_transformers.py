"""flexattn.integrations.transformers: tiny random-weight transformers models built from
configs (no downloads) run with attn_implementation="flexattn" and agree with "eager" -
out and every parameter gradient under the numerics rule (golden: eager in float64), and
greedy `generate` with a KV cache giving the same tokens. Llama (GQA, left padding, packed
sequences), Gemma 2 (softcap, sliding window, query_pre_attn_scalar), Mistral (sliding
window), BERT (bidirectional encoder, padding). CPU, float32."""
from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.masking_utils")
from conftest import EPS, assert_close_to_golden  # noqa: E402

import flexattn  # noqa: E402
from flexattn.integrations import transformers as fx  # noqa: E402  (registers "flexattn")

VOCAB = 61


def tiny(kind):
    """A tiny random-weight model of `kind`, in eval mode (attention dropout off)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128,
                  initializer_range=0.3)  # large enough that attention is far from uniform
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**common, num_key_value_heads=2, head_dim=8, sliding_window=6,
                                        attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                        query_pre_attn_scalar=12, layer_types=["sliding_attention", "full_attention"])
        return transformers.Gemma2ForCausalLM(cfg).eval()
    if kind == "mistral":
        cfg = transformers.MistralConfig(**common, num_key_value_heads=1, sliding_window=5)
        return transformers.MistralForCausalLM(cfg).eval()
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64,
                                      attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, initializer_range=0.3)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()
    raise ValueError(kind)


def run(model, impl, dtype, inputs, keep):
    """(output, parameter gradients) of `model` in `dtype` with attention `impl`; the loss is a
    fixed random projection of the output at the positions `keep` (B, S) marks."""
    m = copy.deepcopy(model).to(dtype)
    m.set_attn_implementation(impl)
    assert m.config._attn_implementation == impl
    res = m(**inputs)
    y = res.logits if hasattr(res, "logits") else res.last_hidden_state
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.device, dtype)
    loss = (y * w * keep[..., None].to(y.device, dtype)).sum()
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    return y, {n: (g if g is not None else torch.zeros_like(p)) for n, p, g in zip(names, params, grads)}


def check_against_eager(model, inputs, keep):
    gold_y, gold_g = run(model, "eager", torch.float64, inputs, keep)
    ref_y, ref_g = run(model, "eager", torch.float32, inputs, keep)
    got_y, got_g = run(model, "flexattn", torch.float32, inputs, keep)
    k = keep.bool().to(gold_y.device)
    assert torch.isfinite(gold_y[k]).all(), "the float64 golden has NaN/inf entries: a test that checks nothing"
    assert_close_to_golden("out", got_y[k], ref_y[k], gold_y[k])
    for n in gold_g:
        assert_close_to_golden(f"grad {n}", got_g[n], ref_g[n], gold_g[n], eps=cancelled_eps(n, gold_g))


def cancelled_eps(name, gold_g):
    """The numerics rule's eps for a gradient that is zero in exact arithmetic (a key bias:
    softmax ignores a shift of a row's scores): what is left of it is the rounding of sums whose
    terms are as large as the weight's gradient beside it, so eps is taken at that scale (None:
    the rule's own, at the gradient's scale). Measured on BERT's key bias (float32, torch 2.13):
    eager 7.1e-07 from the float64 golden, torch's SDPA 3.5e-06 and flexattn 4.1e-06, where the
    key weight's gradient reaches 3.8: a flash-style backward takes each row's sum of P * dP as
    rowsum(dO * O), which eager's softmax backward does not."""
    weight = name[:-len("bias")] + "weight"
    if not name.endswith("bias") or weight not in gold_g:
        return None
    g, w = gold_g[name].abs().max().item(), gold_g[weight].abs().max().item()
    if g > 1e-12 * max(1.0, w):
        return None
    return EPS[torch.float32] * max(1.0, w)


def ids(B, S, seed=1):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def left_padded(B, S, pads):
    am = torch.ones(B, S, dtype=torch.long)
    for b, p in enumerate(pads):
        am[b, :p] = 0
    return am


@pytest.mark.parametrize("kind", ["llama", "gemma2", "mistral"])
def test_decoder_forward_backward_with_padding(kind):
    """Right padding, shorter than the sliding windows (5, 6), so every query row keeps a key
    and all positions are compared (a row with no key has a uniform-average eager output in
    float32 and NaN in float64; `generate` covers left padding)."""
    x = ids(2, 19)
    am = torch.ones(2, 19, dtype=torch.long)
    am[1, 16:] = 0
    check_against_eager(tiny(kind), dict(input_ids=x, attention_mask=am), torch.ones(2, 19))


def test_llama_packed_sequences():
    """Three sequences packed in one row (position_ids restart at 0, no attention_mask):
    transformers detects the packing and each token sees only its own sequence."""
    pos = torch.cat([torch.arange(6), torch.arange(9), torch.arange(5)])[None]
    x = ids(1, 20, seed=3)
    check_against_eager(tiny("llama"), dict(input_ids=x, position_ids=pos), torch.ones(1, 20))
    # the packing matters: without position_ids the outputs differ
    m = tiny("llama")
    m.set_attn_implementation("flexattn")
    assert not torch.allclose(m(input_ids=x, position_ids=pos).logits, m(input_ids=x).logits)


def test_bert_encoder_with_padding():
    x = ids(2, 17, seed=4)
    am = torch.ones(2, 17, dtype=torch.long)
    am[1, 11:] = 0  # right padding, as tokenizers pad encoders
    check_against_eager(tiny("bert"), dict(input_ids=x, attention_mask=am), am)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "mistral"])
def test_generate_same_tokens(kind):
    """Greedy decoding with a KV cache (prefill, then one query against the cache per step;
    Gemma 2 and Mistral slide their window over the cache)."""
    model = tiny(kind)
    x = ids(2, 11, seed=5)
    am = left_padded(2, 11, [0, 3])
    tokens = {}
    for impl in ("eager", "flexattn"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(x, attention_mask=am, max_new_tokens=9, do_sample=False, min_new_tokens=9)
    assert tokens["flexattn"].shape == (2, 20)
    assert torch.equal(tokens["flexattn"], tokens["eager"])


def test_from_pretrained_by_name(tmp_path):
    """attn_implementation="flexattn" through from_pretrained / from_config, and the mask the
    model builds is a flexattn BlockMask."""
    tiny("llama").save_pretrained(tmp_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flexattn")
    assert m.config._attn_implementation == "flexattn"
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    m2 = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="flexattn")
    assert m2.config._attn_implementation == "flexattn"
    from transformers.masking_utils import create_causal_mask
    emb = torch.zeros(1, 10, 32)
    mask = create_causal_mask(config=m.config, inputs_embeds=emb, attention_mask=None, cache=None,
                              position_ids=torch.arange(10)[None])
    assert isinstance(mask, flexattn.BlockMask)
    dense_mask = flexattn.create_mask(mask.mask_mod, 1, 1, 10, 10, device="cpu")
    assert torch.equal(dense_mask[0, 0], torch.ones(10, 10).tril().bool())


def dense(q, k, v, bias, scale, sinks=None):
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) * scale + bias.double()
    if sinks is not None:  # one extra column per head with the sink's logit and no value
        col = sinks.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)
        p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    else:
        p = torch.softmax(s, -1)
    return (p @ v).transpose(1, 2)


def test_forward_with_4d_mask_and_sinks():
    """A 4-d mask a caller prepared (additive float, or bool True = keep) instead of a
    BlockMask, and attention sinks (s_aux) - the inputs transformers' layers may pass."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    keep = torch.rand(2, 1, 9, 12, generator=g) > 0.3
    keep[..., 0] = True
    additive = torch.zeros(2, 1, 9, 12).masked_fill(~keep, -math.inf)
    sinks = torch.randn(4, generator=g)
    want = dense(q, k, v, additive, 0.3)
    for mask in (additive, keep):
        out, weights = fx.flexattn_attention_forward(None, q, k, v, mask, scaling=0.3)
        assert weights is None and out.shape == (2, 9, 4, 8) and out.is_contiguous()
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    out, _ = fx.flexattn_attention_forward(None, q, k, v, additive, scaling=0.3, s_aux=sinks)
    torch.testing.assert_close(out.double(), dense(q, k, v, additive, 0.3, sinks), atol=1e-5, rtol=1e-5)


def test_registered_under_its_name():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionInterface._global_mapping[fx.NAME] is fx.flexattn_attention_forward
    assert AttentionMaskInterface._global_mapping[fx.NAME] is fx.flexattn_mask


def test_forward_with_a_torch_block_mask():
    """A torch BlockMask a caller prepared (transformers returns a 4-d mask as it is)."""
    tfa = pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 20, 8, generator=g) for _ in range(3))
    tbm = tfa.create_block_mask(lambda b, h, qi, kv: qi >= kv, 2, None, 20, 20, device="cpu", BLOCK_SIZE=16)
    out, _ = fx.flexattn_attention_forward(None, q, k, v, tbm, scaling=0.4, softcap=3.0)
    causal = torch.zeros(20, 20).masked_fill(~torch.ones(20, 20).tril().bool(), -math.inf)
    s = 3.0 * torch.tanh((q.double() @ k.double().transpose(-1, -2)) * 0.4 / 3.0) + causal.double()
    want = (torch.softmax(s, -1) @ v.double()).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_compiled_model():
    """torch.compile(model) with attn_implementation="flexattn": the mask is built outside the
    graph (a break per mask), the attention inside it; new inputs of the same shape reuse the graphs."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model = tiny("llama")
    model.set_attn_implementation("flexattn")
    cnt = CompileCounter()
    f = torch.compile(model, backend=cnt)
    frames = []
    for seed in (1, 2):
        x = ids(2, 19, seed=seed)
        torch.testing.assert_close(f(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5)
        frames.append(cnt.frame_count)
    assert frames[0] == frames[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_on_gpu_kernels(kind):
    """The same checks with the Triton kernels (CUDA tensors): forward and backward against
    eager under the numerics rule, greedy generation with the cache."""
    model = tiny(kind).cuda()
    x = ids(2, 150).cuda()  # past one 128-block: the kernels skip and mask blocks
    am = torch.ones(2, 150, dtype=torch.long, device="cuda")
    am[1, 146:] = 0
    check_against_eager(model, dict(input_ids=x, attention_mask=am), torch.ones(2, 150))
    am = left_padded(2, 11, [0, 3]).cuda()
    tokens = {}
    for impl in ("eager", "flexattn"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(x[:, :11], attention_mask=am, max_new_tokens=9, do_sample=False,
                                      min_new_tokens=9)
    assert torch.equal(tokens["flexattn"], tokens["eager"])
