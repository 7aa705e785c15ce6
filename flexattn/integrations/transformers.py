"""flexattn as an attention implementation of Hugging Face transformers.

    import flexattn.integrations.transformers  # registers "flexattn"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flexattn")

Importing this module registers two functions under the name "flexattn":

* `flexattn_mask` in transformers' ``AttentionMaskInterface``: the model's mask function
  (causal, sliding window, chunked, bidirectional, padding, packed sequences, cache offsets:
  transformers composes it) becomes a flexattn `BlockMask` through `create_block_mask`;
* `flexattn_attention_forward` in ``AttentionInterface``: the layer's q/k/v, the BlockMask
  (or a 4-d additive mask a caller passed), ``scaling``, ``softcap`` (Gemma 2/3), a
  ``position_bias`` and attention sinks (``s_aux``) become one `flex_attention` call, with
  ``dropout`` as flexattn's dropout_p.

transformers is not a dependency of flexattn; this module needs it (any version with
``AttentionInterface`` and ``AttentionMaskInterface``, transformers >= 4.53).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..attention import AuxRequest, flex_attention
from ..block_mask import BlockMask, as_block_mask
from ..build_mask import create_block_mask

__all__ = ["flexattn_attention_forward", "flexattn_mask", "register"]

NAME = "flexattn"  # the attn_implementation name registered on import


def flexattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                  device="cpu", **kwargs) -> BlockMask:
    """transformers' mask-interface function: the BlockMask of `mask_function` (transformers'
    ``(batch_idx, head_idx, q_idx, kv_idx) -> bool``) for `q_length` queries at positions
    ``q_offset + i`` against `kv_length` keys at ``kv_offset + j``, and'ed with the 2-d
    padding mask `attention_mask` (``[batch, >= kv_offset + kv_length]``, True = keep) when
    it masks anything. Other keywords (dtype, config, allow_is_causal_skip, use_vmap) are
    for other backends and ignored."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if attention_mask is not None and not bool(attention_mask.all()):
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding))
    q_offset = _as_int(q_offset)
    kv_offset = _as_int(kv_offset)
    if q_offset or kv_offset:
        mask_function = mu.add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    return create_block_mask(mask_function, batch_size, None, q_length, kv_length, device=device)


def _as_int(offset):
    """A cache offset: an int, or a 0-d tensor (static caches return one to avoid graph breaks)."""
    return int(offset) if isinstance(offset, torch.Tensor) else offset


def flexattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask, scaling: Optional[float] = None,
                               softcap: Optional[float] = None, s_aux: Optional[torch.Tensor] = None,
                               position_bias: Optional[torch.Tensor] = None, dropout: float = 0.0,
                               **kwargs):
    """transformers' attention-interface function: query [B, Hq, L, E], key/value
    [B, Hkv, S, E] (Hq a multiple of Hkv), attention_mask a BlockMask from `flexattn_mask`
    (or torch's),
    a 4-d additive float mask [B, 1, L, >= S] or a 4-d boolean one (True = keep), or None.
    Returns (out [B, L, Hq, Ev] contiguous, None): the attention probabilities are never
    materialised, so there are no weights to return. `sliding_window` and the other
    keywords the layers pass are already in the mask."""
    block_mask = None
    score_mask = None
    attention_mask = as_block_mask(attention_mask)  # (a torch BlockMask a caller prepared: converted)
    if isinstance(attention_mask, BlockMask):
        block_mask = attention_mask
    elif attention_mask is not None:
        score_mask = attention_mask[:, :, :, : key.shape[-2]]
        if score_mask.dtype == torch.bool:
            score_mask = torch.zeros(score_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~score_mask, -float("inf"))

    def score_mod(score, batch_idx, head_idx, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if score_mask is not None:
            score = score + score_mask[batch_idx, 0, q_idx, kv_idx]
        if position_bias is not None:
            score = score + position_bias[batch_idx, head_idx, q_idx, kv_idx]
        return score

    mods = softcap is not None or score_mask is not None or position_bias is not None
    want_lse = s_aux is not None
    result = flex_attention(query, key, value, score_mod=score_mod if mods else None, block_mask=block_mask,
                            scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
                            kernel_options=kwargs.get("kernel_options"),
                            return_aux=AuxRequest(lse=True) if want_lse else None,
                            dropout_p=float(dropout))
    if want_lse:
        out, aux = result
        out = _with_sinks(out, aux.lse, s_aux)
    else:
        out = result
    return out.transpose(1, 2).contiguous(), None


def _with_sinks(out, lse, sinks):
    """Attention sinks (gpt-oss): one extra logit per head that takes probability mass but
    carries no value; the softmax over [scores, sink] rescales out by exp(lse - lse')."""
    B, H, L, _ = out.shape
    sink = sinks.to(lse.dtype).view(1, H, 1).expand(B, H, L)
    total = torch.logaddexp(lse, sink)
    return (out * torch.exp(lse - total).unsqueeze(-1)).to(out.dtype)


def register(name: str = NAME) -> None:
    """Register flexattn with transformers under `name` (done once on import as "flexattn");
    then ``attn_implementation=name`` in from_pretrained / from_config / set_attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, flexattn_attention_forward)
    AttentionMaskInterface.register(name, flexattn_mask)


register()
