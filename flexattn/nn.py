"""``flexattn.nn.FlashAttention``: the attention ``nn.Module`` of lucidrains-style models, on flexattn.

    from flexattn.nn import FlashAttention
    attend = FlashAttention(causal=True, dropout=0.1)
    out = attend(q, k, v, mask=key_padding_mask)          # q, k, v: (batch, heads, len, dim)

Semantics:

* ``q (b, h, i, d)``, ``k, v (b, h, j, d)`` (``k, v`` may also be ``(b, j, d)``, shared by all
  heads, or have fewer heads dividing ``h`` - grouped-query attention); scale ``d ** -0.5``
  unless ``scale=`` is given.
* ``mask``: bool, **True = keep**; ``(b, j)`` (key padding) or ``(b, h, i, j)``
  (any dimension may be 1 to broadcast).
* ``attn_bias``: float, added to the scaled scores; ``(b or 1, h, i, j)`` (or ``(h, i, j)``).
* ``causal=True``: query ``i`` sees keys ``<= i + (k_len - q_len)`` - aligned **bottom-right**
  when the lengths differ (a query block at the end of a longer key sequence, as in decoding
  with a cache). `get_mask(i, j, device)` returns that causal mask with **True = masked**.
* ``dropout`` is applied to the attention probabilities in training mode only.
* ``flash=True`` runs flexattn's block-sparse kernels (CPU path or Triton);
  ``flash=False`` runs the dense reference (`flexattn.reference.reference_attention`) - same
  semantics, O(i * j) memory.
* Fully masked query rows give 0 (never NaN, never a uniform average).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import masks as _masks
from . import mods as _mods

__all__ = ["FlashAttention"]


def _broadcast_index_mod(keep: torch.Tensor):
    """mask_mod reading a bool tensor [B|1, H|1, I|1, J] with broadcasting."""
    bB, bH, bI = keep.shape[0] > 1, keep.shape[1] > 1, keep.shape[2] > 1

    def mask_tensor(b, h, q_idx, kv_idx):
        return keep[b if bB else 0, h if bH else 0, q_idx if bI else 0, kv_idx]
    return _masks._named(mask_tensor, "mask_tensor")


class FlashAttention(nn.Module):
    """Attention with optional causal mask, key / dense mask, additive bias and dropout."""

    def __init__(self, causal: bool = False, dropout: float = 0.0, flash: bool = True,
                 scale: Optional[float] = None):
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"FlashAttention: dropout must be in [0, 1), got {dropout!r}")
        self.causal = bool(causal)
        self.dropout = float(dropout)
        self.flash = bool(flash)
        self.scale = scale

    def extra_repr(self) -> str:
        return f"causal={self.causal}, dropout={self.dropout}, flash={self.flash}"

    def get_mask(self, i: int, j: int, device) -> torch.Tensor:
        """Causal mask ``(i, j)``, bottom-right aligned, **True where masked** (key ``> q + j - i``)."""
        return torch.ones((i, j), device=device, dtype=torch.bool).triu(j - i + 1)

    # ---- building the mods ---------------------------------------------------------
    def _prepare(self, q, k, v, mask, attn_bias):
        if q.dim() != 4:
            raise ValueError(f"FlashAttention: q must be (batch, heads, q_len, dim), got shape {tuple(q.shape)}")
        if k.dim() == 3:
            k, v = k.unsqueeze(1), v.unsqueeze(1)
        if k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"FlashAttention: k and v must be (batch, heads, k_len, dim) or (batch, k_len, dim), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        b, h, i, _ = q.shape
        j = k.shape[2]
        mask_mods = []
        keep_shape = (1, 1)
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"FlashAttention: mask must be a bool tensor (True = keep), got {mask.dtype}")
            if mask.dim() == 2:
                if tuple(mask.shape) not in ((b, j), (1, j)):
                    raise ValueError(f"FlashAttention: a 2-D mask is a key mask (batch, k_len) = ({b}, {j}), "
                                     f"got {tuple(mask.shape)}")
                m4 = mask[:, None, None, :]
            elif mask.dim() == 4:
                m4 = mask
                try:
                    torch.broadcast_shapes(m4.shape, (b, h, i, j))
                    ok = m4.shape[-1] == j and m4.shape[0] in (1, b) and m4.shape[1] in (1, h) and m4.shape[2] in (1, i)
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ValueError(f"FlashAttention: a 4-D mask must broadcast to (batch, heads, q_len, k_len) = "
                                     f"({b}, {h}, {i}, {j}) with a full k_len, got {tuple(mask.shape)}")
            else:
                raise ValueError(f"FlashAttention: mask must be (batch, k_len) or (batch, heads, q_len, k_len), "
                                 f"got shape {tuple(mask.shape)}")
            m4 = m4.to(q.device)
            mask_mods.append(_broadcast_index_mod(m4))
            keep_shape = (m4.shape[0], m4.shape[1])
        if self.causal:
            mask_mods.append(_masks.causal("bottom_right", q_len=i, kv_len=j) if i != j else _masks.causal())
        score_mod = None
        if attn_bias is not None:
            if attn_bias.dim() == 3:
                attn_bias = attn_bias.unsqueeze(0)
            if attn_bias.dim() != 4 or attn_bias.shape[-2:] != (i, j) or attn_bias.shape[0] not in (1, b) or \
                    attn_bias.shape[1] not in (1, h):
                raise ValueError(f"FlashAttention: attn_bias must be (batch or 1, heads, q_len, k_len) = "
                                 f"({b} or 1, {h}, {i}, {j}), got {tuple(attn_bias.shape)}")
            score_mod = _mods.dense_bias(attn_bias.to(device=q.device))
        return q, k, v, mask_mods, keep_shape, score_mod

    # ---- paths ---------------------------------------------------------------------
    def flash_attn(self, q, k, v, mask=None, attn_bias=None):
        """The flexattn path (block-sparse kernels)."""
        from .attention import flex_attention
        from .build_mask import create_block_mask
        from .masks import and_masks
        from .varlen import create_varlen_block_mask

        q, k, v, mask_mods, keep_shape, score_mod = self._prepare(q, k, v, mask, attn_bias)
        i, j = q.shape[2], k.shape[2]
        if not mask_mods:
            block_mask = None
        elif len(mask_mods) == 1 and self.causal:
            block_mask = create_varlen_block_mask([0, i], [0, j], causal=True, align="bottom_right",
                                                  device=q.device)
        else:
            mm = mask_mods[0] if len(mask_mods) == 1 else and_masks(*mask_mods)
            block_mask = create_block_mask(mm, keep_shape[0], keep_shape[1], i, j, device=q.device)
        p = self.dropout if self.training else 0.0
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=self.scale,
                              enable_gqa=q.shape[1] != k.shape[1], dropout_p=p)

    def _dense_attn(self, q, k, v, mask=None, attn_bias=None):
        from .masks import and_masks
        from .dropout import draw_seed, dropout_mask
        from .reference import reference_attention

        q, k, v, mask_mods, _, score_mod = self._prepare(q, k, v, mask, attn_bias)
        mm = None if not mask_mods else (mask_mods[0] if len(mask_mods) == 1 else and_masks(*mask_mods))
        p = self.dropout if self.training else 0.0
        keep = None
        if p > 0:
            b, h, i, _ = q.shape
            keep = dropout_mask(draw_seed(None), b, h, i, k.shape[2], p, device=q.device)
        out, _ = reference_attention(q, k, v, score_mod=score_mod, mask_mod=mm, scale=self.scale,
                                     enable_gqa=q.shape[1] != k.shape[1], dropout_keep=keep, dropout_p=p)
        return out

    def forward(self, q, k, v, mask=None, attn_bias=None):
        """Attention of q over k, v: ``(batch, heads, q_len, dim_v)``."""
        if self.flash:
            return self.flash_attn(q, k, v, mask=mask, attn_bias=attn_bias)
        return self._dense_attn(q, k, v, mask=mask, attn_bias=attn_bias)
